"""Every registered optimizer replays the trajectories recorded before the protocol redesign.

The recording (``data/reference_trajectories.npz`` and ``data/reference_infos.json``, written by
``python tests/optim/reference_trajectories.py`` at the commit before issue 16's changes) holds θ
after each of 20 steps and each step's info, for a small MLP and a small BatchNorm CNN in float64
on one BLAS thread. A refactoring of shared algebra must leave them unchanged: the test asserts
agreement to 1e-12 relative (θ, losses, radii, every info entry) and exact equality of counts and
flags, against the original or an alternative recording of another numeric environment;
docs/design.md lists which trajectories are bit-identical. The replays run once, in a child
process with the recording's OpenBLAS kernels pinned (``reference_trajectories.replay_all``).
"""
import pytest

import reference_trajectories as ref

_ARRAYS, _INFOS = ref.load()
_ALTERNATIVES = {tag: ref.load(tag) for tag in ref.ALTERNATIVES}


def test_every_registered_optimizer_is_recorded():
    from qnref.optim import load_all

    recorded = {k.split("|")[0] for k in _INFOS}
    assert recorded == set(load_all()), "record a reference trajectory for each new optimizer"


def test_count_offsets_name_recorded_counts():
    """Each documented count change names a recorded key and an integer entry of its step infos."""
    for key, offsets in ref.COUNT_OFFSETS.items():
        assert key in _INFOS and not isinstance(_INFOS[key], dict), key
        for entry, off in offsets.items():
            assert isinstance(off, int) and off != 0, (key, entry)
            assert all(isinstance(step[entry], int) for step in _INFOS[key]), (key, entry)


def test_alternatives_hold_only_recorded_keys():
    for tag, (arrays, infos) in _ALTERNATIVES.items():
        assert set(infos) <= set(_INFOS), f"{tag}: keys not in the original recording"
        assert set(arrays) == set(infos), f"{tag}: θ arrays and infos name different keys"


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    return ref.replay_all(tmp_path_factory.mktemp("replay"))


@pytest.mark.parametrize("key", sorted(_INFOS))
def test_trajectory_matches_recording(key, replayed):
    """The replay agrees with the original recording, or with an alternative recording of a numeric
    environment whose last bits differ (module docstring of ``reference_trajectories``)."""
    arrays, got_infos = replayed
    got = (arrays.get(key), got_infos[key])
    why = ref.mismatch(*got, _ARRAYS.get(key), ref.expected_infos(key, _INFOS[key]))
    if why is None:
        return
    tried = [f"original: {why}"]
    for tag, (alt_arrays, alt_infos) in _ALTERNATIVES.items():
        if key in alt_infos:
            alt = ref.mismatch(*got, alt_arrays[key], ref.expected_infos(key, alt_infos[key]))
            if alt is None:
                return
            tried.append(f"{tag}: {alt}")
    pytest.fail("; ".join(tried))


@pytest.mark.parametrize("flags,numba", [({"avx2", "fma", "avx512f"}, "haswell"), ({"avx2", "fma"}, None), (set(), None)])
def test_pinned_environment_follows_the_cpu(monkeypatch, flags, numba):
    """OpenBLAS's AVX2 kernels wherever the CPU runs them; numba's AVX2 target only where numba
    would otherwise compile for AVX-512; a user's own NUMBA_CPU_NAME is kept."""
    monkeypatch.delenv("NUMBA_CPU_NAME", raising=False)
    monkeypatch.setattr(ref, "_cpu_flags", lambda: flags)
    env = ref.pinned_env()
    assert env.get("NUMBA_CPU_NAME") == numba
    assert env.get("OPENBLAS_CORETYPE") == ("Haswell" if "avx2" in flags else ref.os.environ.get("OPENBLAS_CORETYPE"))
    assert env["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv("NUMBA_CPU_NAME", "skylake-avx512")
    assert ref.pinned_env()["NUMBA_CPU_NAME"] == "skylake-avx512"
