"""Reference trajectories of every registered optimizer (issue 16: recorded before the redesign).

For each optimizer (registry defaults) and each of two models — a small tanh MLP and a small CNN
with BatchNorm — 20 steps from a fixed seed in float64 on the CPU with one BLAS thread: θ after
every step and every :class:`~qnref.optim.base.StepInfo`.

``python tests/optim/reference_trajectories.py`` writes
``data/reference_trajectories.npz`` (θ arrays, ``allow_pickle=False``) and ``data/reference_infos.json``
(the step infos); ``test_reference_trajectories.py`` replays and compares them.

The recording was made with OpenBLAS's AVX2 ("Haswell") kernels. On a CPU where OpenBLAS picks its
AVX-512 kernels (SkylakeX) the last bits of a GEMM differ, and a chaotic trajectory (``hf`` on the
BatchNorm CNN) turns them into an O(1) difference within 18 steps. Recording and replay therefore
run in a child process with ``OPENBLAS_CORETYPE`` pinned to :data:`BLAS_CORETYPE` wherever the CPU
has AVX2 and FMA (:func:`replay_all`, and ``__main__`` re-executes itself so pinned). On a CPU with
AVX-512 numba's kernels are compiled for the AVX2 target :data:`NUMBA_CPU` as well (``NUMBA_CPU_NAME``):
numba compiles for the host, and its 512-bit code rounds the BatchNorm kernels' float64 sums
differently from the AVX2 code the recordings were made with.

Pinning OpenBLAS is not enough everywhere: NumPy picks its float64 SIMD loops (``tanh``, ``exp``, …)
by the CPU's features at run time, and on a CPU with AVX2 but no AVX-512 (NumPy's ``X86_V3``; an
AMD EPYC) they round differently from the recording machine's (``tanh`` differs from libm in 28 % of
random arguments there), and 15 chaotic trajectories (HF, the L-SR1 family, SHG, the sampled
methods) drift past 1e-12 within 20 steps. Those keys also have an **alternative recording** per
numeric environment (:data:`ALTERNATIVES`,
``data/reference_trajectories.<tag>.npz`` / ``reference_infos.<tag>.json``, made by
``--record-alternative TAG`` on such a machine: only the keys that miss the original are written).
A replay passes when it matches the original or an alternative to 1e-12 (:func:`mismatch`). An
alternative is recorded from code that a machine of the original's environment has just checked
against the original, so it records the same algorithm under other last bits.
"""
from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
from typing import Any

import numpy as np

HERE = pathlib.Path(__file__).parent / "data"
N_STEPS = 20
MODELS = ("mlp", "cnn-bn")
#: OpenBLAS kernel family of the recording (``OPENBLAS_CORETYPE``)
BLAS_CORETYPE = "Haswell"
#: LLVM target of numba's kernels (``NUMBA_CPU_NAME``) on CPUs with AVX-512: compiled for such a
#: host, the BatchNorm kernels' float64 sums vectorize differently (7 BatchNorm-CNN trajectories —
#: HF, SHG, the L-SR1 family, the sampled methods — drifted by 1e-11 to 0.5 on a Sapphire Rapids VM)
NUMBA_CPU = "haswell"
#: numeric environments with an alternative recording of the keys whose last bits differ there
ALTERNATIVES = {
    "x86-v3": "x86-64 with AVX2/FMA but no AVX-512 (NumPy X86_V3 SIMD loops; recorded on an AMD EPYC, "
              "NumPy 2.4.6, OpenBLAS 0.3.31 Haswell kernels, at the commit after 80561be, whose CI run on "
              "the original's environment replayed the original)",
}
#: relative agreement required of θ and of every info entry
RTOL = 1e-12
# Hyperparameters held at the values the recording was made with, for optimizers whose default
# changed later on purpose (the recording keeps checking the same algorithm; the new default is
# tested on its own). Add an entry here when a default changes; never re-record an old optimizer.
PINNED: dict[str, dict[str, Any]] = {
    "shampoo": {"root": "newton"},  # issue 21: the CPU default became the eigendecomposition
}


def build_problem(model_key: str):
    """The model, θ₀ and :class:`Problem` of one reference setting (float64, fixed seeds)."""
    from qnref.nn.activations import Tanh
    from qnref.nn.dense import Dense
    from qnref.nn.model import Sequential
    from qnref.nn.zoo import build_model
    from qnref.optim.base import Problem

    r = np.random.default_rng(1234)
    if model_key == "mlp":
        model = Sequential([Dense(6), Tanh(), Dense(5), Tanh(), Dense(3)], input_shape=(4,))
        X = r.standard_normal((1200, 4))
        y = (X[:, 0] + X[:, 1] * X[:, 2] > 0).astype(np.int64) + (X[:, 3] > 0.8)
    elif model_key == "cnn-bn":
        model = build_model("lenet-digits", batchnorm=True, width=0.5, n_outputs=3)
        X = r.standard_normal((1200, 1, 8, 8))
        y = (X[:, 0, :4].sum(axis=(1, 2)) > X[:, 0, 4:].sum(axis=(1, 2))).astype(np.int64) + (X[:, 0, 0, 0] > 1.0)
    else:
        raise ValueError(model_key)
    theta0 = model.init(seed=7)
    problem = Problem(model, "softmax_ce", X, y, 1e-3, seed=11)
    return model, theta0, problem


#: Step-info counts that changed on purpose since the recording: ``{key: {info entry: offset}}``, the
#: replay's value being the recorded one plus the offset at every step (θ and every other entry still
#: to RTOL, the flags exactly). Add an entry only for a count that measures work the method no longer
#: does, with the reason; never re-record.
COUNT_OFFSETS: dict[str, dict[str, int]] = {
    # issue 21: on a dense net SMW-NG's and SMW-NG-BD's curvature batch S₂ ⊆ S₁ takes its taps from the
    # rows of S₁'s backward pass, so the step no longer runs a forward pass on S₂ (3 → 2 evaluations)
    "smw-ng|mlp": {"evals": -1},
    "smw-ng-bd|mlp": {"evals": -1},
}


def expected_infos(key: str, infos: Any) -> Any:
    """The recorded step infos of ``key`` with its :data:`COUNT_OFFSETS` applied (a new list)."""
    offsets = COUNT_OFFSETS.get(key)
    if not offsets or isinstance(infos, dict):
        return infos
    return [{k: (v + offsets[k] if k in offsets else v) for k, v in step.items()} for step in infos]


def _plain(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    if v is None or isinstance(v, str):
        return v
    if hasattr(v, "shape"):
        a = np.asarray(v, dtype=np.float64)
        return float(a) if a.ndim == 0 else [float(x) for x in a.ravel()]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return repr(v)


def run(name: str, model_key: str, n_steps: int = N_STEPS) -> tuple[np.ndarray, list[dict]]:
    """θ after each of ``n_steps`` steps (row 0: θ₀) and each step's info as plain values."""
    from threadpoolctl import threadpool_limits

    from qnref.optim import make_optimizer

    _, theta, problem = build_problem(model_key)
    opt = make_optimizer(name, **PINNED.get(name, {}))
    thetas, infos = [theta.copy()], []
    with threadpool_limits(limits=1):
        state = opt.init(theta)
        for _ in range(n_steps):
            theta, state, info = opt.step(theta, state, problem)
            thetas.append(np.array(theta, dtype=np.float64, copy=True))
            infos.append(_plain(info.as_dict()))
    return np.stack(thetas), infos


def record(only: list[str] | None = None) -> None:
    """Record every registered optimizer, or (``only``) add/replace just the named ones and keep the rest.

    ``python tests/optim/reference_trajectories.py --add NAME …`` records a new optimizer without
    touching the recorded trajectories of the others (which must stay those of commit 725f262).
    """
    from qnref.optim import load_all

    arrays, infos = {}, {}
    names = sorted(load_all())
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise SystemExit(f"--add: not registered: {unknown}")
        old_arrays, old_infos = load()
        arrays = {k: v for k, v in old_arrays.items() if k.split("|")[0] not in only}
        infos = {k: v for k, v in old_infos.items() if k.split("|")[0] not in only}
        names = sorted(only)
    for name in names:
        for mk in MODELS:
            th, inf = replay_key(f"{name}|{mk}")
            infos[f"{name}|{mk}"] = inf
            if th is None:
                print(f"{name:10s} {mk:7s} refused: {inf['error']}")
                continue
            arrays[f"{name}|{mk}"] = th
            print(f"{name:10s} {mk:7s} loss {inf[0].get('loss'):.6g} → {inf[-1].get('loss'):.6g}")
    np.savez_compressed(HERE / "reference_trajectories.npz", **arrays)
    (HERE / "reference_infos.json").write_text(json.dumps(infos, indent=0, sort_keys=True, allow_nan=True))


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    """The x86-64 CPU's feature flags (empty elsewhere or where /proc/cpuinfo cannot be read);
    read once per process."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    try:
        return frozenset(pathlib.Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def _cpu_runs_coretype() -> bool:
    """Whether this CPU can run the recording's kernels (x86-64 with AVX2 and FMA)."""
    flags = _cpu_flags()
    return "avx2" in flags and "fma" in flags


def _numba_pin() -> str | None:
    """:data:`NUMBA_CPU` where the CPU has AVX-512 (numba would compile for it) and the user has
    not chosen a target; None elsewhere (an AVX2 host's own target is what the recordings saw)."""
    if "avx512f" in _cpu_flags() and _cpu_runs_coretype() and "NUMBA_CPU_NAME" not in os.environ:
        return NUMBA_CPU
    return None


def pinned_env() -> dict[str, str]:
    """The environment of a recording or replay: one BLAS thread, the recording's kernels."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if _cpu_runs_coretype():
        env["OPENBLAS_CORETYPE"] = BLAS_CORETYPE
    numba_cpu = _numba_pin()
    if numba_cpu:
        env["NUMBA_CPU_NAME"] = numba_cpu
    return env


def _is_pinned() -> bool:
    blas = not _cpu_runs_coretype() or os.environ.get("OPENBLAS_CORETYPE") == BLAS_CORETYPE
    return blas and _numba_pin() is None


def replay_key(key: str) -> tuple[np.ndarray | None, Any]:
    """(θ rows, step infos) of one ``"name|model"`` setting, or (None, the refusal) when the
    optimizer refuses the model (e.g. SMW on BatchNorm in training mode)."""
    name, mk = key.split("|")
    try:
        return run(name, mk)
    except (ValueError, TypeError) as e:
        return None, {"error": f"{type(e).__name__}: {e}"}


def _replay_to(out: pathlib.Path) -> None:
    """Run every recorded setting; write θ arrays to ``out``.npz and infos (or refusals) to ``out``.json."""
    arrays, infos = {}, {}
    for key in sorted(load()[1]):
        th, infos[key] = replay_key(key)
        if th is not None:
            arrays[key] = th
    np.savez(out.with_suffix(".npz"), **arrays)
    out.with_suffix(".json").write_text(json.dumps(infos, allow_nan=True))


def replay_all(tmp: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every recorded setting replayed in a child process with :func:`pinned_env`."""
    out = pathlib.Path(tmp) / "replay"
    root = str(pathlib.Path(__file__).resolve().parents[2])
    env = pinned_env()
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, __file__, "--replay", str(out)], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"the replay process failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    with np.load(out.with_suffix(".npz"), allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return arrays, json.loads(out.with_suffix(".json").read_text())


def load(tag: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The original recording (``tag=None``) or an alternative one: θ arrays and infos by key
    (an alternative holds only its differing keys; an absent file reads as empty)."""
    stem = "" if tag is None else f".{tag}"
    npz, js = HERE / f"reference_trajectories{stem}.npz", HERE / f"reference_infos{stem}.json"
    if tag is not None and not js.exists():
        return {}, {}
    with np.load(npz, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    infos = json.loads(js.read_text())
    infos.pop("__environment__", None)
    return arrays, infos


def mismatch(thetas: np.ndarray | None, infos: Any, want: np.ndarray | None, expected: Any) -> str | None:
    """Why a replay of one key differs from one recording of it (None: it agrees to :data:`RTOL`)."""
    if isinstance(expected, dict):     # a recorded refusal: it must still be refused the same way
        return None if infos == expected else f"recorded refusal {expected}, got {infos}"
    if thetas is None:
        return f"refused now: {infos}"
    if thetas.shape != want.shape:
        return f"θ shape {thetas.shape}, recorded {want.shape}"
    scale = np.maximum(np.abs(want).max(axis=1, keepdims=True), 1e-300)
    err = np.abs(thetas - want) / scale
    if err.max() > RTOL:
        return f"θ differs at step {int(err.max(axis=1).argmax())}: {err.max():.3e}"
    if len(infos) != len(expected):
        return f"{len(infos)} step infos, recorded {len(expected)}"
    for i, (got, exp) in enumerate(zip(infos, expected)):
        if set(got) != set(exp):
            return f"step {i}: info keys {sorted(set(got) ^ set(exp))} differ"
        for k in exp:
            if max_rel(got[k], exp[k]) > RTOL:
                return f"step {i}: info[{k!r}] = {got[k]!r}, recorded {exp[k]!r}"
    return None


def record_alternative(tag: str) -> None:
    """Write the alternative recording ``tag`` (:data:`ALTERNATIVES`): this machine's replay of
    every key that misses the original recording."""
    if tag not in ALTERNATIVES:
        raise SystemExit(f"--record-alternative: unknown tag {tag!r}; add it to ALTERNATIVES: {sorted(ALTERNATIVES)}")
    arrays, infos = load()
    out_a, out_i = {}, {"__environment__": ALTERNATIVES[tag]}
    for key in sorted(infos):
        th, inf = replay_key(key)
        why = mismatch(th, inf, arrays.get(key), expected_infos(key, infos[key]))
        if why is None:
            continue
        if th is None:
            raise SystemExit(f"{key}: {why} (a refusal is not a rounding difference: not recorded)")
        out_a[key], out_i[key] = th, inf
        print(f"{key:20s} {why}")
    np.savez_compressed(HERE / f"reference_trajectories.{tag}.npz", **out_a)
    (HERE / f"reference_infos.{tag}.json").write_text(json.dumps(out_i, indent=0, sort_keys=True, allow_nan=True))


def max_rel(a: Any, b: Any) -> float:
    """Largest relative difference between two plain values (0 when bit-identical)."""
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or set(a) != set(b):
            return math.inf
        return max((max_rel(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list) or isinstance(b, list):
        if not (isinstance(a, list) and isinstance(b, list)) or len(a) != len(b):
            return math.inf
        return max((max_rel(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or isinstance(a, str) or isinstance(b, str):
        return 0.0 if a == b else math.inf
    a, b = float(a), float(b)
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not _is_pinned():   # record and replay with the recording's BLAS kernels (module docstring)
        os.execve(sys.executable, [sys.executable, *sys.argv], pinned_env())
    if args and args[0] == "--replay" and len(args) == 2:
        _replay_to(pathlib.Path(args[1]))
    elif args and args[0] == "--add":
        record(args[1:])
    elif args and args[0] == "--record-alternative" and len(args) == 2:
        record_alternative(args[1])
    elif args:
        raise SystemExit("usage: reference_trajectories.py [--add NAME ... | --replay OUT | --record-alternative TAG]")
    else:
        record()
