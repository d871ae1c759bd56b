"""Every registered optimizer replays the trajectories recorded before the protocol redesign.

The recording (``data/reference_trajectories.npz`` and ``data/reference_infos.json``, written by
``python tests/optim/reference_trajectories.py`` at the commit before issue 16's changes) holds θ
after each of 20 steps and each step's info, for a small MLP and a small BatchNorm CNN in float64
on one BLAS thread. A refactoring of shared algebra must leave them unchanged: the test asserts
agreement to 1e-12 relative (θ, losses, radii, every info entry) and exact equality of counts and
flags; docs/design.md lists which trajectories are bit-identical. The replays run once, in a child
process with the recording's OpenBLAS kernels pinned (``reference_trajectories.replay_all``).
"""
import json

import numpy as np
import pytest

import reference_trajectories as ref

_ARRAYS = np.load(ref.HERE / "reference_trajectories.npz", allow_pickle=False)
_INFOS = json.loads((ref.HERE / "reference_infos.json").read_text())
RTOL = 1e-12


def test_every_registered_optimizer_is_recorded():
    from qnref.optim import load_all

    recorded = {k.split("|")[0] for k in _INFOS}
    assert recorded == set(load_all()), "record a reference trajectory for each new optimizer"


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    return ref.replay_all(tmp_path_factory.mktemp("replay"))


@pytest.mark.parametrize("key", sorted(_INFOS))
def test_trajectory_matches_recording(key, replayed):
    expected = _INFOS[key]
    arrays, got_infos = replayed
    if isinstance(expected, dict):  # a recorded refusal: it must still be refused the same way
        assert got_infos[key] == expected
        return
    assert key in arrays, f"refused now: {got_infos[key]}"
    thetas, infos = arrays[key], got_infos[key]
    want = _ARRAYS[key]
    assert thetas.shape == want.shape
    scale = np.maximum(np.abs(want).max(axis=1, keepdims=True), 1e-300)
    err = np.abs(thetas - want) / scale
    assert err.max() <= RTOL, f"θ differs at step {int(err.max(axis=1).argmax())}: {err.max():.3e}"
    assert len(infos) == len(expected)
    for i, (got, exp) in enumerate(zip(infos, expected)):
        assert set(got) == set(exp), f"step {i}: info keys {sorted(set(got) ^ set(exp))} differ"
        for k in exp:
            assert ref.max_rel(got[k], exp[k]) <= RTOL, f"step {i}: info[{k!r}] = {got[k]!r}, recorded {exp[k]!r}"
