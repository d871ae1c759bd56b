"""CPU-side CuPy conformance: qnref's CuPy code path, run by NumPy, uses only what CuPy offers.

The engine (every product of ``tools/gpu_check.products`` on its models: MLP, CNN with max/avg
pooling, BatchNorm CNN, residual net, global average pooling), every
registered optimizer (5 steps) and the data paths run on the recording device backend of
:mod:`cupy_recording`; every namespace attribute and call, array method and property, and operator
is checked against the pinned list of CuPy's public names and signatures (``tests/cupy_api.json``,
generated from the installed ``cupy-cuda13x`` by ``tools/cupy_names.py``). Flagged: names CuPy
lacks, keyword arguments it does not accept, too many positional arguments, and the NumPy-only
behaviours the recorder marks as violations (``numpy.asarray`` of device arrays, NumPy functions
called on them directly, host arrays mixed into device operations, scipy/numba on device arrays).

The recorded device path must also compute what NumPy computes: θ after every step equals the
plain NumPy run bit for bit (the recorder only changes scalar types, as CuPy does).

``python tests/test_cupy_conformance.py`` prints the report (calls, distinct names, problems).
"""
from __future__ import annotations

import collections
import functools
import json
import pathlib
import sys
import tempfile

import numpy as np
import pytest

import cupy_recording as cr

API_FILE = pathlib.Path(__file__).parent / "cupy_api.json"
API = json.loads(API_FILE.read_text())
NS = API["namespaces"]

#: Known mismatches in modules this check's owner may not edit, with the fix: (event name, file) → fix.
#: The check tolerates these and lists them; an entry that no longer occurs is reported as stale.
KNOWN: dict[tuple[str, str], str] = {}


# ---------------------------------------------------------------------- the checker
def resolve(name: str) -> tuple[str | None, list[str]]:
    """(namespace key, remaining member path) for a recorded dotted name; longest namespace first."""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        ns = ".".join(parts[:k])
        if ns in NS:
            return ns, parts[k:]
    return None, parts


def check_event(e: cr.Event) -> list[str]:
    """The problems of one recorded event (empty when CuPy offers exactly this use)."""
    where = f"{e.site}: {e.name}"
    if e.kind == "violation":
        return [f"{where}: {e.detail}"]
    if e.kind not in ("call", "attr", "method", "prop", "op"):
        return []
    ns, rest = resolve(e.name)
    if ns is None:
        return [f"{where}: not in a CuPy namespace of {API_FILE.name}"]
    entry = NS[ns]["names"].get(rest[0])
    if entry is None:
        return [f"{where}: CuPy {API['cupy_version']} has no {ns}.{rest[0]}"]
    if len(rest) > 1:  # a ufunc method (cupy.add.at) or a submodule member resolved above
        if entry["kind"] == "ufunc" and rest[1] not in entry.get("methods", []):
            return [f"{where}: CuPy ufunc {rest[0]} has no method {rest[1]}"]
        return []
    if e.kind not in ("call", "method", "op") or entry["params"] is None:
        return []
    params = entry["params"]
    kinds = {k for _, k in params}
    named = {n for n, k in params if k in ("any", "kw")}
    bad = [k for k in e.kwargs if k not in named and "**" not in kinds]
    out = [f"{where}: keyword argument {k!r} not accepted by CuPy (signature {params_text(params)})" for k in bad]
    n_pos = sum(1 for _, k in params if k in ("pos", "any"))
    if len(e.args) > n_pos and "*" not in kinds:
        out.append(f"{where}: {len(e.args)} positional arguments, CuPy takes at most {n_pos} ({params_text(params)})")
    return out


def params_text(params: list) -> str:
    pre = {"*": "*", "**": "**"}
    return "(" + ", ".join(pre.get(k, "") + n for n, k in params) + ")"


def problems(rec: cr.Recorder) -> dict[str, list[str]]:
    """Problems by message, each with the sites; known mismatches (:data:`KNOWN`) removed."""
    out: dict[str, list[str]] = collections.defaultdict(list)
    for e in rec.events:
        if any(e.name == n and e.site.startswith(f) for n, f in KNOWN):
            continue
        for p in check_event(e):
            out[p].append(e.site)
    return dict(out)


def merged(*recs: cr.Recorder) -> cr.Recorder:
    m = cr.Recorder()
    for r in recs:
        m.events.update(r.events)
    return m


# ---------------------------------------------------------------------- workloads
@functools.cache
def run_engine():
    """(recorder, rows): ``tools/gpu_check.check_products`` — every product on its models, NumPy
    against the recorded device path (relative tolerance 1e-12)."""
    rec = cr.Recorder()
    with cr.recording_backend(rec):
        rows = cr.gpu_check().check_products(1e-12)
    return rec, rows


@functools.cache
def run_data():
    """The data layer on the device: transfer, validation, subsets, scaling, a Problem's batches."""
    from qnref.data.dataset import Dataset
    from qnref.nn.activations import Tanh
    from qnref.nn.dense import Dense
    from qnref.nn.model import Sequential
    from qnref.optim.base import Problem

    r = np.random.default_rng(5)
    ds = Dataset.from_arrays("toy", r.standard_normal((400, 3)), r.integers(0, 3, 400), n_test=100)
    rec = cr.Recorder()
    with cr.recording_backend(rec):
        d = ds.to("gpu", "float64").validate().standardized().subset(200, 50, seed=1)
        d.minmax_scaled()
        d.as_autoencoder()
        back = d.to("cpu")
        model = Sequential([Dense(4), Tanh(), Dense(3)], input_shape=(3,))
        prob = Problem(model, "softmax_ce", d.X_train, d.y_train, 1e-3, seed=0)
        theta = cr.to_device(model.init(seed=0))
        for o in (prob.batch(7), prob.sample(5), prob.full()):
            o.value(theta)
        # a checkpoint written from the device, read back onto it
        from qnref import checkpoint
        from qnref.optim import make_optimizer

        opt = make_optimizer("lbfgs")
        state = opt.init(theta)
        theta, state, _ = opt.step(theta, state, prob)
        with tempfile.TemporaryDirectory() as tmp:
            path = pathlib.Path(tmp) / "ck.npz"
            checkpoint.save(path, {"theta": theta, "state": state, "problem": prob.state()}, {"run": "conformance"},
                            hints={"state": type(state)})
            payload, _ = checkpoint.load(path, hints={"state": type(state)}, device="gpu")
        assert type(payload["theta"]) is cr.DeviceArray
        opt.step(payload["theta"], payload["state"], prob)
    return rec, back


# ---------------------------------------------------------------------- tests
def test_pinned_list_names_the_namespaces_qnref_uses():
    assert API["generated_by"] == "tools/cupy_names.py" and API["cupy_version"]
    for ns in ("cupy", "cupy.linalg", "cupy.random.Generator", "cupy.ndarray", "cupyx", "cupyx.scipy.linalg"):
        assert NS[ns]["names"], ns
    assert NS["cupy"]["names"]["add"]["kind"] == "ufunc" and "at" in NS["cupy"]["names"]["add"]["methods"]


def test_pinned_list_is_current_when_cupy_is_installed():
    """Where CuPy is importable, the committed list equals what ``tools/cupy_names.py`` generates."""
    pytest.importorskip("cupy")
    import subprocess

    tool = pathlib.Path(__file__).resolve().parents[1] / "tools" / "cupy_names.py"
    p = subprocess.run([sys.executable, str(tool), "--check"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr


def test_engine_products_conform():
    rec, rows = run_engine()
    bad = [r for r in rows if not r.ok]
    assert not bad, cr.gpu_check().format_table(bad)
    assert len(rows) >= 5 * 12
    found = problems(rec)
    assert not found, "\n".join(f"{p}  [{len(s)} sites]" for p, s in found.items())
    assert rec.total > 1000


def test_every_optimizer_conforms_on_a_batchnorm_cnn():
    """2 steps of every optimizer on the 8×8 BatchNorm LeNet (conv/pool/BN paths, Kronecker factors
    of conv layers); θ equals NumPy's bit for bit (both run the kernels' array-API twins)."""
    runs = cr.optimizer_runs(2, "cnn-bn", 300)
    errors = {n: r.error for n, r in runs.items() if r.error and not r.cpu_error}
    assert not errors, errors
    for name, r in runs.items():
        if r.cpu_error:
            continue
        assert len(r.thetas) == len(r.cpu_thetas) == 2
        for i, (a, b) in enumerate(zip(r.thetas, r.cpu_thetas)):
            assert np.array_equal(a, b), f"{name} step {i}: the device path differs from NumPy"
    found = problems(merged(*(r.recorder for r in runs.values() if r.recorder)))
    assert not found, "\n".join(f"{p}  [{len(s)} sites]" for p, s in found.items())


def test_every_optimizer_conforms_and_matches_numpy():
    runs = cr.optimizer_runs()
    errors = {n: r.error for n, r in runs.items() if r.error}
    assert not errors, errors
    for name, r in runs.items():
        assert len(r.thetas) == len(r.cpu_thetas) == 5
        for i, (a, b) in enumerate(zip(r.thetas, r.cpu_thetas)):
            assert np.array_equal(a, b), f"{name} step {i}: the device path differs from NumPy"
    found = problems(merged(*(r.recorder for r in runs.values())))
    assert not found, "\n".join(f"{p}  [{len(s)} sites]" for p, s in found.items())


def test_shampoo_eigh_route_conforms_and_auto_picks_per_device():
    """root="eigh" on the device equals NumPy's eigh route bit for bit; "auto" resolves to the
    eigendecomposition on NumPy and the coupled Newton iteration on CuPy (docs/shampoo_tnt.md)."""
    from qnref.optim.shampoo import root_route

    r = cr.run_optimizer("shampoo", 2, settings={"root": "eigh"})
    assert r.error is None, r.error
    for i, (a, b) in enumerate(zip(r.thetas, r.cpu_thetas)):
        assert np.array_equal(a, b), f"shampoo root='eigh' step {i}: the device path differs from NumPy"
    found = problems(r.recorder)
    assert not found, "\n".join(f"{p}  [{len(s)} sites]" for p, s in found.items())
    assert root_route("auto", np.eye(2)) == "eigh"
    with cr.recording_backend(cr.Recorder()):
        from qnref import backend

        assert root_route("auto", backend.to_device(np.eye(2), "gpu")) == "newton"


def test_data_paths_conform():
    rec, back = run_data()
    assert type(back.X_train) is np.ndarray and back.X_train.shape == (200, 3)
    found = problems(rec)
    assert not found, "\n".join(f"{p}  [{len(s)} sites]" for p, s in found.items())


PROBE = '''
import numpy
from qnref import backend

def probe(x):
    xp = backend.namespace(x)
    a = xp.sum(x, where=x > 0)            # CuPy's sum has no `where`
    b = xp.random.default_rng(0).permutation(3)   # CuPy's Generator has no permutation
    c = numpy.asarray(x)                  # CuPy raises TypeError
    d = numpy.linalg.norm(x)              # NumPy function on a device array
    e = x + numpy.ones(x.shape)           # host array mixed into a device operation
    f = float(xp.linalg.norm(x)) + x.sum().item()   # two host syncs
    return a, b, c, d, e, f
'''


def test_checker_flags_what_cupy_rejects():
    """The check can fail: a probe compiled as a qnref file makes each kind of mistake once."""
    ns: dict = {}
    exec(compile(PROBE, f"{cr.QNREF_DIR}/_conformance_probe.py", "exec"), ns)
    rec = cr.Recorder()
    with cr.recording_backend(rec), rec.in_phase("probe"):
        ns["probe"](cr.to_device(np.arange(4.0)))
    text = "\n".join(problems(rec))
    assert "keyword argument 'where' not accepted" in text
    assert "has no cupy.random.Generator.permutation" in text
    assert "NumPy conversion of a device array" in text and "numpy.asarray" in text
    assert "numpy.linalg.norm" in text or "numpy.norm" in text
    assert "host NumPy array mixed into a device operation" in text
    assert rec.syncs["probe"] >= 3  # float(), .item() and the numpy.asarray copy


def report() -> str:
    """Calls recorded, distinct names and problems per workload (the closing note's numbers)."""
    recs = {"engine": run_engine()[0], "optimizers": merged(*(r.recorder for r in cr.optimizer_runs().values())),
            "cnn-bn opt.": merged(*(r.recorder for r in cr.optimizer_runs(2, "cnn-bn", 300).values() if r.recorder)),
            "data+ckpt": run_data()[0]}
    total = merged(*recs.values())
    lines = []
    for label, r in list(recs.items()) + [("all", total)]:
        names = {e.name for e in r.events if e.kind in ("call", "attr", "method", "prop", "op")}
        lines.append(f"{label:10s} {r.total:8d} recorded uses, {len(names):4d} distinct names, {len(problems(r))} problems")
    by_kind: collections.Counter = collections.Counter()
    for e, n in total.events.items():
        by_kind[e.kind] += n
    lines.append("by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items())))
    lines += [f"PROBLEM {p} [{len(s)} sites: {', '.join(sorted(set(s))[:4])}]" for p, s in problems(total).items()]
    lines += [f"known (left): {n} in {f}: {fix}" for (n, f), fix in KNOWN.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(print(report()))
