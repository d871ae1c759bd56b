"""Checkpoint format (qnref/checkpoint.py): no code execution, every corruption refused with one
line, a generic dataclass schema, atomic writes, umask modes, bit-identical resume."""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import subprocess
import sys
import zipfile
from typing import Any

import numpy as np
import pytest

from qnref import checkpoint as ck
from qnref.checkpoint import CheckpointError
from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim import make_optimizer
from qnref.train import Data, load_checkpoint, save_checkpoint, train


def data(n=400):
    from test_train import data as digits

    return digits(n)


def model():
    return Sequential([Dense(12), Tanh(), Dense(10)], input_shape=(64,))


def one_line(exc: BaseException, path) -> None:
    text = str(exc)
    assert "\n" not in text and str(path) in text, text


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real mid-run checkpoint of L-SR1-TR (a few hundred parameters, pairs stored)."""
    p = tmp_path_factory.mktemp("ck") / "run.ckpt"
    train(model(), make_optimizer("lsr1-tr", batch_size=100), data(), epochs=2, seed=1, checkpoint=str(p),
          stop_after_steps=5)
    return p.read_bytes()


def resume(path, opt="lsr1-tr", **kw):
    return train(model(), make_optimizer(opt, batch_size=100), data(), epochs=2, seed=1, checkpoint=str(path),
                 resume=True, **kw)


# -- security -------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_reduce_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"qnref_checkpoint": 1, "theta": _Payload(str(marker))}))
    pickle.loads(pickle.dumps(_Payload(str(tmp_path / "control"))))  # the payload does work when unpickled
    assert (tmp_path / "control").exists()
    with pytest.raises(CheckpointError, match="old pickle checkpoint") as exc:
        resume(evil)
    one_line(exc.value, evil)
    assert not marker.exists()
    # through the command line: exit 3, one line, nothing executed
    r = subprocess.run([sys.executable, "-m", "qnref.cli", "train", "--model", "mlp", "--optimizer", "sgd", "--dataset",
                        "digits", "--epochs", "0.1", "--checkpoint", str(evil), "--resume", "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "old pickle checkpoint" in r.stderr, r.stderr
    assert not marker.exists()
    # an npz entry with object dtype (pickled inside the .npy) is refused too
    zevil = tmp_path / "obj.ckpt"
    with zipfile.ZipFile(zevil, "w") as zf:
        with zf.open("__manifest__.npy", "w") as fh:
            np.lib.format.write_array(fh, np.array([_Payload(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError):
        ck.load(zevil)
    assert not marker.exists()


def test_convert_checkpoint_needs_trust_and_converts(tmp_path):
    """A format-1 pickle written by the old code converts (explicitly trusted) and resumes."""
    from qnref.optim.base import state_to_host

    m, dd = model(), data()
    res = train(m, make_optimizer("adam", batch_size=100), dd, epochs=2, seed=1, checkpoint=str(tmp_path / "new.ckpt"),
                stop_after_steps=4)
    payload, manifest = load_checkpoint(str(tmp_path / "new.ckpt"), type(res.state))
    fp = manifest["fingerprints"]
    old = {"qnref_checkpoint": 1, "fingerprint": {"model": fp["model"]["name"], "n_params": fp["model"]["n_params"],
           "optimizer": fp["optimizer"]["class"], "hyperparameters": fp["optimizer"]["hyperparameters"],
           "data": fp["data"]["name"], "n_train": fp["data"]["n_train"], "l2": 0.0, "seed": 1, "dtype": "float64"},
           **{k: v for k, v in payload.items() if k != "state"}, "state": state_to_host(payload["state"])}
    old_path = tmp_path / "old.ckpt"
    old_path.write_bytes(pickle.dumps(old))
    with pytest.raises(CheckpointError, match="--trust"):
        ck.convert_pickle(old_path, tmp_path / "conv.ckpt")
    from qnref.cli import main

    assert main(["convert-checkpoint", str(old_path), str(tmp_path / "conv.ckpt")]) == 2
    assert main(["convert-checkpoint", "--trust", str(old_path), str(tmp_path / "conv.ckpt")]) == 0
    full = train(model(), make_optimizer("adam", batch_size=100), data(), epochs=2, seed=1)
    rest = train(model(), make_optimizer("adam", batch_size=100), data(), epochs=2, seed=1,
                 checkpoint=str(tmp_path / "conv.ckpt"), resume=True)
    np.testing.assert_array_equal(rest.theta, full.theta)


# -- corruption -----------------------------------------------------------------------------------
def _regions(raw: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges of the manifest data, one array's data and the central directory."""
    import io

    zf = zipfile.ZipFile(io.BytesIO(raw))
    out = {}
    for info in zf.infolist():
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        if info.filename == "__manifest__.npy":
            out["manifest"] = (start + 128, start + info.file_size)
        elif "theta" in info.filename:
            out["theta data"] = (start + 128, start + info.file_size)
        elif "memory" in info.filename and "array data" not in out:
            out["array data"] = (start + 128, start + info.file_size)
    cd = raw.rfind(b"PK\x01\x02", 0)
    first_cd = raw.find(b"PK\x01\x02")
    out["zip directory"] = (first_cd, raw.rfind(b"PK\x05\x06"))
    out["local headers"] = (0, 30)
    out["end record"] = (raw.rfind(b"PK\x05\x06"), len(raw))
    assert cd > 0
    return out


def test_every_region_byte_flip_is_refused_with_one_line(tmp_path, good):
    regions = _regions(good)
    assert set(regions) >= {"manifest", "theta data", "array data", "zip directory"}
    rng = np.random.default_rng(0)
    tried = 0
    for name, (lo, hi) in regions.items():
        for pos in sorted(set(rng.integers(lo, hi, 6).tolist()) | {lo, hi - 1}):
            bad = bytearray(good)
            bad[pos] ^= 0xFF
            p = tmp_path / f"flip-{pos}.ckpt"
            p.write_bytes(bytes(bad))
            with pytest.raises(CheckpointError) as exc:
                resume(p)
            one_line(exc.value, p)
            tried += 1
    assert tried >= 30


@pytest.mark.parametrize("keep", [0, 1, 10, 100, 0.5, 0.9, -1])
def test_truncated_checkpoints_are_refused(tmp_path, good, keep):
    n = keep if isinstance(keep, int) and keep >= 0 else (len(good) - 1 if keep == -1 else int(keep * len(good)))
    p = tmp_path / "cut.ckpt"
    p.write_bytes(good[:n])
    with pytest.raises(CheckpointError, match="truncated|empty|not a qnref") as exc:
        resume(p)
    one_line(exc.value, p)


def _rewrite(path, src: bytes, edit) -> None:
    """Load a good checkpoint, edit its payload, save it again with valid hashes (a lying file)."""
    tmp = path.with_suffix(".src")
    tmp.write_bytes(src)
    payload, manifest = ck.load(tmp, {"state": Any})
    edit(payload)
    ck.save(path, payload, manifest["fingerprints"])


def _state_class():
    m = model()
    return type(make_optimizer("lsr1-tr", batch_size=100).init(m.init(0)))


@pytest.mark.parametrize("case,msg", [
    ("short theta", "θ has shape"), ("nan theta", "non-finite"), ("float32 theta", "θ is float32"),
    ("no history", "lacks the field"), ("no problem", "lacks the field"), ("bad step", "step is"),
    ("bad perm", "permutation"), ("state field missing", "lacks the required field"),
    ("state field unknown", "has no field"), ("no rng", "problem state lacks rng"),
])
def test_lying_checkpoints_are_refused(tmp_path, good, case, msg):
    cls = _state_class()

    def edit(p):
        st = p["state"]
        if case == "short theta":
            p["theta"] = p["theta"][:-1]
        elif case == "nan theta":
            p["theta"] = p["theta"].copy()
            p["theta"][3] = math.nan
        elif case == "float32 theta":
            p["theta"] = p["theta"].astype(np.float32)
        elif case == "no history":
            del p["history"]
        elif case == "no problem":
            del p["problem"]
        elif case == "bad step":
            p["step"] = -3
        elif case == "bad perm":
            p["problem"]["perm"] = np.zeros_like(p["problem"]["perm"])
        elif case == "no rng":
            del p["problem"]["rng"]
        elif case == "state field missing":
            fields = {f.name: getattr(st, f.name) for f in dataclasses.fields(st)}
            required = [f.name for f in dataclasses.fields(st)
                        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
            del fields[required[0]]
            p["state"] = ck._OldState(fields)
        elif case == "state field unknown":
            p["state"] = ck._OldState({**{f.name: getattr(st, f.name) for f in dataclasses.fields(st)}, "bogus": 1})

    path = tmp_path / "lie.ckpt"
    src = tmp_path / "src.ckpt"
    src.write_bytes(good)
    payload, manifest = ck.load(src, {"state": cls})
    edit(payload)
    ck.save(path, payload, manifest["fingerprints"], {"state": cls})
    with pytest.raises(CheckpointError, match=msg) as exc:
        resume(path)
    one_line(exc.value, path)


def test_missing_file_folder_and_stray_entries(tmp_path, good):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.ckpt"))
    with pytest.raises(CheckpointError, match="directory"):
        ck.load(tmp_path)
    with pytest.raises(ValueError, match="is a folder"):
        resume(tmp_path)
    p = tmp_path / "plain.zip"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("x.txt", "hello")
    with pytest.raises(CheckpointError):
        ck.load(p)


# -- the schema -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Inner:
    a: Any
    n: int = 0


@dataclasses.dataclass
class Outer:
    inner: Inner
    maybe: Inner | None
    many: list[Inner]
    table: dict[str, Inner]
    arrays: dict
    pairs: tuple
    x: float = math.nan
    flag: bool = False
    label: str = "s"
    big: int = 2**100
    scalar: Any = None
    late: int = dataclasses.field(default=7, init=False)


def test_schema_round_trip_is_exact_and_uses_the_callers_classes(tmp_path):
    r = np.random.default_rng(0)
    v = Outer(Inner(r.standard_normal((3, 2)), 4), None, [Inner(np.arange(3)), Inner(np.float64(2.5))],
              {"k": Inner(True)}, {"S": r.standard_normal((2, 5)), 3: [1, 2.5, None], "e": np.zeros((0, 4))},
              (np.int32(7), -0.0, math.inf, "t"), x=math.nan, flag=True, scalar=np.float32(1.5))
    v.late = 9
    path = tmp_path / "s.ckpt"
    ck.save(path, {"v": v}, {"run": {"x": 1}}, {"v": Outer})
    got = ck.load(path, {"v": Outer})[0]["v"]
    assert type(got) is Outer and type(got.inner) is Inner and type(got.many[0]) is Inner and type(got.table["k"]) is Inner
    np.testing.assert_array_equal(got.inner.a, v.inner.a)
    assert got.inner.n == 4 and got.maybe is None and got.late == 9 and got.big == 2**100
    assert type(got.many[1].a) is np.float64 and got.many[1].a == 2.5
    assert type(got.scalar) is np.float32 and type(got.pairs[0]) is np.int32
    assert math.isnan(got.x) and math.copysign(1, got.pairs[1]) == -1 and got.pairs[2] == math.inf
    assert got.arrays[3] == [1, 2.5, None] and got.arrays["e"].shape == (0, 4)
    # the class comes from the caller, never from the file: without a declared class it is refused
    with pytest.raises(CheckpointError, match="dataclass where the run expects none"):
        ck.load(path, {"v": Any})
    # a dataclass whose annotation does not name it comes back as the dict of its fields
    @dataclasses.dataclass
    class Loose:
        thing: Any

    ck.save(tmp_path / "x.ckpt", {"v": Loose(Inner(1))}, {}, {"v": Loose})
    back = ck.load(tmp_path / "x.ckpt", {"v": Loose})[0]["v"]
    assert type(back) is Loose and back.thing == {"a": 1, "n": 0}
    with pytest.raises(CheckpointError, match="holds a Inner but its annotation names Outer"):
        ck.save(tmp_path / "x.ckpt", {"v": Inner(1)}, {}, {"v": Outer})
    with pytest.raises(CheckpointError, match="cannot be written"):
        ck.save(tmp_path / "x.ckpt", {"v": object()}, {})


def _same(a, b, where="state"):
    """Recursive equality of types and bits (arrays: dtype, shape, bytes; floats: NaN-aware)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            _same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}.{i}")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), where
    elif isinstance(a, float):
        assert a == b or (math.isnan(a) and math.isnan(b)), where
    else:
        assert a == b, where


@pytest.mark.parametrize("name", sorted(__import__("qnref.optim", fromlist=["load_all"]).load_all()))
def test_every_optimizers_state_round_trips_exactly(tmp_path, name):
    """The generic schema over each registered optimizer's State after a few steps (no per-optimizer code)."""
    from qnref.optim.base import Problem

    m, dd = model(), data(200)
    opt = make_optimizer(name)
    theta = m.init(0)
    state = opt.init(theta)
    prob = Problem(m, "softmax_ce", dd.X_train, dd.y_train, 1e-3, seed=0)
    for _ in range(3):
        theta, state, _ = opt.step(theta, state, prob)
    p = tmp_path / "s.ckpt"
    ck.save(p, {"state": state}, {}, {"state": type(state)})
    back = ck.load(p, {"state": type(state)})[0]["state"]
    _same(state, back)


@pytest.mark.parametrize("name,kw", [("lsr1-tr", {"batch_size": 100}), ("lbfgs", {}), ("kfac", {"batch_size": 100}),
                                     ("adam", {"batch_size": 50}), ("mb-lsr1", {}), ("shampoo", {"batch_size": 100}),
                                     ("hf", {})])
def test_resume_is_bit_identical(tmp_path, name, kw):
    m, dd = model(), data()
    full = train(m, make_optimizer(name, **kw), dd, epochs=1.5, seed=4, eval_every=0.5)
    p = str(tmp_path / "run.ckpt")
    part = train(m, make_optimizer(name, **kw), dd, epochs=1.5, seed=4, eval_every=0.5, checkpoint=p, stop_after_steps=3)
    assert part.stopped == "interrupted"
    rest = train(m, make_optimizer(name, **kw), dd, epochs=1.5, seed=4, eval_every=0.5, checkpoint=p, resume=True)
    np.testing.assert_array_equal(rest.theta, full.theta)
    assert rest.history == full.history or [h["train_loss"] for h in rest.history] == [h["train_loss"] for h in full.history]
    assert not ck.stale_temporaries(p)


# -- writing --------------------------------------------------------------------------------------
def test_atomic_write_mode_follows_umask_and_stale_temporaries_go(tmp_path):
    p = tmp_path / "m.ckpt"
    dead = tmp_path / f".m.ckpt.tmp-{2**22 + 12345}-abcd"  # a pid that does not exist
    dead.write_bytes(b"half")
    mine = tmp_path / f".m.ckpt.tmp-{os.getpid()}-zz"  # this process's own leftover
    mine.write_bytes(b"half")
    for umask, mode in ((0o027, 0o640), (0o002, 0o664), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            ck.save(p, {"x": np.arange(3.0)}, {})
        finally:
            os.umask(old)
        assert (os.stat(p).st_mode & 0o777) == mode
        assert sorted(os.listdir(tmp_path)) == ["m.ckpt"]


def test_unwritable_location_names_the_users_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    target = blocker / "sub" / "c.ckpt"
    with pytest.raises(CheckpointError) as exc:
        ck.save(target, {"x": 1}, {})
    assert str(target) in str(exc.value) and ".tmp-" not in str(exc.value)


def test_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    p = tmp_path / "c.ckpt"
    ck.save(p, {"x": np.arange(3.0)}, {})
    before = p.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "_write_npy", boom)
    with pytest.raises(KeyboardInterrupt):
        ck.save(p, {"x": np.arange(4.0)}, {})
    assert p.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["c.ckpt"]
