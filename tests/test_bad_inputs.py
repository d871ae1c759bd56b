"""Property-based bad-input suite (hypothesis): every generated input ends in a clear error — one of
qnref's documented exception types, with the argument's name in a one-line message — or in a
correct result checked against an independent oracle; never in any other exception.

Categories (cases per run in brackets; ≥ 300 in all, derandomized so CI runs are reproducible):
validator [110], CLI numbers [90], CLI --opt [40], checkpoint corruption [70], readers [130],
build_model [100], output paths [40], loss targets and dtypes [50]. Set QNREF_BAD_INPUT_STATS=<file> to write the
per-category outcome counts (the table of issue 19's closing note).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import struct
import tempfile
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qnref import backend, checkpoint as ck, validate
from qnref.checkpoint import CheckpointError

STATS: dict[str, Counter] = {}


def tally(category: str, outcome: str) -> None:
    STATS.setdefault(category, Counter())[outcome] += 1


def cfg(n: int):
    return settings(max_examples=n, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def one_line_naming(exc: BaseException, *names: str) -> None:
    text = str(exc)
    assert "\n" not in text, text
    assert any(n in text for n in names), (names, text)


# -- the validator ----------------------------------------------------------------------------------
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.just(np.float64("nan")), st.just(np.int64(3)), st.just(np.bool_(True)),
    st.just(np.float32(2.5)), st.lists(st.integers(), max_size=2), st.just(np.array([1.0])), st.just(1 + 2j),
)
BOUND = st.one_of(st.none(), st.integers(-5, 5))


def _real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _expect(category: str, name: str, ok: bool, call: Any, check_result: Any) -> None:
    """Run ``call``: a ValidationError naming ``name`` when not ``ok``, else ``check_result(got)``."""
    try:
        got = call()
    except validate.ValidationError as exc:
        one_line_naming(exc, name)
        assert not ok, exc
        tally(category, "clear error")
        return
    assert ok, got
    check_result(got)
    tally(category, "correct result")


def _within(v: float, lo: Any, hi: Any, lo_open: bool = False) -> bool:
    return (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or v <= hi)


@cfg(60)
@given(v=ANY_VALUE, lo=BOUND, hi=BOUND, lo_open=st.booleans(), finite=st.booleans())
def test_validator_number(v, lo, hi, lo_open, finite):
    ok = _real(v) and not math.isnan(float(v)) and (not finite or math.isfinite(float(v))) and \
        _within(float(v), lo, hi, lo_open)

    def result(got):
        assert got == float(v) and type(got) is float

    _expect("validator", "the_arg", ok, lambda: validate.number("the_arg", v, lo, hi, lo_open=lo_open, finite=finite), result)


@cfg(40)
@given(v=ANY_VALUE, lo=BOUND, hi=BOUND)
def test_validator_integer(v, lo, hi):
    ok = _real(v) and math.isfinite(float(v)) and float(v) == int(v) and _within(int(v), lo, hi)

    def result(got):
        assert got == int(v) and type(got) is int

    _expect("validator", "n_things", ok, lambda: validate.integer("n_things", v, lo, hi), result)


@cfg(10)
@given(v=ANY_VALUE)
def test_validator_boolean(v):
    def result(got):
        assert got is bool(v)

    _expect("validator", "flag", isinstance(v, (bool, np.bool_)), lambda: validate.boolean("flag", v), result)


# -- CLI numbers (parse time) ------------------------------------------------------------------------
NUM_TEXT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-10**6, 10**6).map(str),
    st.text(alphabet="0123456789.-+eEinfa_x, ", max_size=7),
    st.sampled_from(["inf", "-inf", "nan", "NaN", "1e400", "0", "-0", "1_0", "0x10", " 5 ", "", "1,2", "١٢", "4294967296"]),
)
FLOAT_OPTS = {"--epochs": (0, True), "--checkpoint-every": (0, True), "--eval-every": (0, True), "--l2": (0, False),
              "--lr": (0, True), "--diverge-factor": (1, True), "--mpi-timeout": (0, True)}
INT_OPTS = {"--seed": (0, 2**32 - 1), "--batch-size": (1, None), "--n-train": (1, None), "--n-test": (1, None)}


def _parse(args: list[str]) -> tuple[Any, str]:
    from qnref.cli import _parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return _parser().parse_args(args), ""
        except SystemExit as exc:
            assert exc.code == 2
            return None, err.getvalue()


def _float_oracle(text: str, lo: float, lo_open: bool) -> float | None:
    try:
        v = float(text.strip())
    except ValueError:
        return None
    if not math.isfinite(v) or (v <= lo if lo_open else v < lo):
        return None
    return v


def _int_oracle(text: str, lo: int, hi: int | None) -> int | None:
    s = text.strip()
    if not re.fullmatch(r"[+-]?[0-9]{1,39}", s, re.ASCII):
        return None
    v = int(s)
    return v if v >= lo and (hi is None or v <= hi) else None


@cfg(60)
@given(opt=st.sampled_from(sorted(FLOAT_OPTS) + sorted(INT_OPTS)), text=NUM_TEXT)
def test_cli_numeric_options(opt, text):
    a, err = _parse(["train", "--model", "m", "--optimizer", "o", "--dataset", "d", f"{opt}={text}"])
    if opt in FLOAT_OPTS:
        want = _float_oracle(text, *FLOAT_OPTS[opt])
    else:
        want = _int_oracle(text, *INT_OPTS[opt])
    if a is None:
        assert want is None, (opt, text, err)
        assert err.count("\n") == 1 and err.startswith(f"qnref: error: argument {opt}: must be "), err
        tally("CLI numbers", "clear error")
        return
    got = getattr(a, opt[2:].replace("-", "_"))
    assert want is not None and got == want and type(got) is type(want), (opt, text, got)
    tally("CLI numbers", "correct result")


@cfg(30)
@given(parts=st.lists(NUM_TEXT, min_size=1, max_size=4))
def test_cli_seeds(parts):
    text = ",".join(parts)
    a, err = _parse(["compare", f"--seeds={text}"])
    want = [_int_oracle(p, 0, 2**32 - 1) for p in text.split(",")]
    if a is None:
        assert None in want, (text, err)
        assert err.count("\n") == 1 and "argument --seeds: must be comma-separated integers" in err, err
        tally("CLI numbers", "clear error")
        return
    assert None not in want and list(a.seeds) == want
    tally("CLI numbers", "correct result")


OPT_VALUES = st.one_of(st.sampled_from(["5", "12", "0.01", "0.5", "True", "False", "true"]), NUM_TEXT,
                       st.sampled_from(["True", "False", "true", "yes", "None", "[1]", "'x'", "5.0", "1e400"]))


@cfg(40)
@given(opt=st.sampled_from([("lbfgs", "memory", int), ("sgd", "lr", float), ("kfac", "warm_start", bool),
                            ("adam", "batch_size", int), ("lsr1-tr", "gram_cache", bool)]),
       values=st.one_of(st.lists(OPT_VALUES, min_size=1, max_size=1), st.lists(OPT_VALUES, min_size=2, max_size=2)))
def test_cli_opt_values(opt, values):
    """--opt KEY=VALUE: a repeated key, or a value of the wrong kind, is refused naming --opt KEY."""
    from qnref.cli import CLIError, make_optimizer, _parse_kv

    name, key, kind = opt
    try:
        hyper = _parse_kv([f"{key}={v}" for v in values])
        made = make_optimizer(name, hyper)
    except (CLIError, validate.ValidationError) as exc:
        one_line_naming(exc, f"--opt {key}", key)
        tally("CLI --opt", "clear error")
        return
    except (ValueError, TypeError) as exc:  # the optimizer's own range checks name the hyperparameter
        one_line_naming(exc, key)
        tally("CLI --opt", "clear error")
        return
    assert len(values) == 1
    got = made.hyperparameters()[key]
    default = __import__("inspect").signature(type(made).__init__).parameters[key].default
    assert isinstance(got, kind) or (kind is float and isinstance(got, int) and not isinstance(got, bool)) or \
        (got is None and default is None)
    tally("CLI --opt", "correct result")


# -- checkpoints ---------------------------------------------------------------------------------------
_GOOD: dict[str, Any] = {}


def _good() -> tuple[bytes, type]:
    """A small real training checkpoint (L-BFGS on a tiny net), built once."""
    if not _GOOD:
        from qnref.nn.activations import Tanh
        from qnref.nn.dense import Dense
        from qnref.nn.model import Sequential
        from qnref.optim import make_optimizer
        from qnref.train import Data, train

        r = np.random.default_rng(0)
        X, y = r.standard_normal((60, 4)), r.integers(0, 3, 60)
        m = Sequential([Dense(3), Tanh(), Dense(3)], input_shape=(4,))
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "g.ckpt")
            res = train(m, make_optimizer("lbfgs", batch_size=20), Data(X, y, name="rand"), epochs=1, checkpoint=p,
                        stop_after_steps=4)
            _GOOD["bytes"] = open(p, "rb").read()
            _GOOD["cls"] = type(res.state)
    return _GOOD["bytes"], _GOOD["cls"]


def _load(raw: bytes) -> Any:
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "c.ckpt")
        with open(p, "wb") as fh:
            fh.write(raw)
        try:
            return ck.load(p, {"state": _good()[1]}), p
        except CheckpointError as exc:
            one_line_naming(exc, p)
            return exc, p


@cfg(40)
@given(data=st.data())
def test_checkpoint_random_corruption(data):
    good, _ = _good()
    how = data.draw(st.sampled_from(["flip", "truncate", "append", "insert", "zero-run"]))
    raw = bytearray(good)
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 3))):
            pos = data.draw(st.integers(0, len(raw) - 1))
            raw[pos] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif how == "append":
        raw += data.draw(st.binary(min_size=1, max_size=64))
    elif how == "insert":
        pos = data.draw(st.integers(0, len(raw)))
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        pos = data.draw(st.integers(0, len(raw) - 8))
        raw[pos:pos + 8] = bytes(8)
    out, _ = _load(bytes(raw))
    if bytes(raw) == good:  # a no-op corruption (e.g. zeros over zeros)
        assert not isinstance(out, Exception)
        tally("checkpoint corruption", "correct result")
        return
    assert isinstance(out, CheckpointError), how
    tally("checkpoint corruption", "clear error")


JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                              st.text(max_size=5), st.sampled_from(["<f8", ">f8", "|O", "float64", "k", "dict", "array"])),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["k", "v", "ref", "shape", "dtype", "host"]), c, max_size=3),
                    max_leaves=6)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


@cfg(30)
@given(data=st.data())
def test_checkpoint_lying_manifests(data):
    """Manifests edited anywhere and re-hashed (so only the deep checks can catch them)."""
    good, cls = _good()
    (payload, manifest), _ = _load(good)
    with np.load(io.BytesIO(good), allow_pickle=False) as npz:
        arrays = {n: npz[n] for n in npz.files if not n.startswith("__manifest")}
    paths = _paths(manifest)
    where = data.draw(st.sampled_from(paths[1:]))
    value = data.draw(JSON)
    edited = json.loads(json.dumps(manifest))
    node = edited
    for k in where[:-1]:
        node = node[k]
    node[where[-1]] = value
    if data.draw(st.booleans()):  # also drop or add an array entry
        name = data.draw(st.sampled_from(sorted(arrays)))
        if data.draw(st.booleans()):
            arrays.pop(name)
        else:
            arrays["extra"] = np.zeros(2)
    buf = io.BytesIO()
    ck.write_archive(buf, json.dumps(edited).encode(), arrays)
    out, p = _load(buf.getvalue())
    if isinstance(out, CheckpointError):
        tally("checkpoint corruption", "clear error")
        return
    # accepted: it must decode to a complete, consistent tree (an edit of an unused value)
    got, man = out
    assert set(got) == set(payload)
    tally("checkpoint corruption", "correct result")


# -- readers ---------------------------------------------------------------------------------------
@cfg(50)
@given(raw=st.one_of(st.binary(max_size=40), st.binary(max_size=6).map(lambda b: b"\x00\x00" + b)))
def test_idx_random_bytes(raw):
    from qnref.data.idx import parse_idx

    try:
        a = parse_idx(raw, "rand.idx")
    except ValueError as exc:
        one_line_naming(exc, "rand.idx")
        tally("readers", "clear error")
        return
    code, ndim = raw[2], raw[3]
    tally("readers", "correct result")
    assert a.ndim == ndim and a.size * a.itemsize == len(raw) - 4 - 4 * ndim


IDX_CODES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@cfg(50)
@given(code=st.one_of(st.sampled_from(sorted(IDX_CODES)), st.sampled_from([0, 7, 0x0A, 0xFF])),
       dims=st.lists(st.integers(0, 4), min_size=0, max_size=4), ndim_lie=st.one_of(st.just(0), st.integers(-1, 1)),
       extra=st.one_of(st.just(0), st.integers(-3, 3)), expect=st.sampled_from([None, None, 1, 3]))
def test_idx_structured_headers(code, dims, ndim_lie, extra, expect):
    from qnref.data.idx import parse_idx

    ndim = max(0, len(dims) + ndim_lie)
    itemsize = np.dtype(IDX_CODES.get(code, ">u1")).itemsize
    count = int(np.prod(dims)) if dims else 1
    body = bytes(range(256)) * (1 + count * itemsize // 256)
    raw = bytes([0, 0, code, ndim]) + struct.pack(f">{len(dims)}I", *dims) + body[:max(0, count * itemsize + extra)]
    want_ok = (code in IDX_CODES and ndim == len(dims) and ndim > 0 and extra == 0 and (expect is None or expect == ndim))
    try:
        a = parse_idx(raw, "hdr.idx", expect_ndim=expect)
    except ValueError as exc:
        one_line_naming(exc, "hdr.idx")
        tally("readers", "clear error")
        if want_ok:
            raise AssertionError(f"refused a valid file: {exc}")
        return
    # an inconsistent header can still describe a valid (other) file; check the decode itself
    dt = np.dtype(IDX_CODES[raw[2]])
    dd = struct.unpack(f">{raw[3]}I", raw[4:4 + 4 * raw[3]])
    want = np.frombuffer(raw, dtype=dt, offset=4 + 4 * raw[3]).reshape(dd)
    np.testing.assert_array_equal(a, want)
    assert a.dtype.isnative
    tally("readers", "correct result")


@cfg(30)
@given(raw=st.one_of(st.binary(max_size=64),
                     st.builds(lambda o: __import__("pickle").dumps(o, protocol=2),
                               st.one_of(st.dictionaries(st.sampled_from([b"data", b"labels", "data", "labels", b"x"]),
                                                         st.one_of(st.integers(), st.lists(st.integers(-2, 12), max_size=3),
                                                                   st.none()), max_size=3),
                                         st.lists(st.integers(), max_size=3), st.text(max_size=3)))))
def test_cifar_batch_random_bytes(raw):
    from qnref.data.cifar import parse_batch

    try:
        X, y = parse_batch(raw, "batch_r")
    except ValueError as exc:
        one_line_naming(exc, "batch_r")
        tally("readers", "clear error")
        return
    assert X.shape[1:] == (3, 32, 32) and len(X) == len(y)
    tally("readers", "correct result")


# -- build_model ----------------------------------------------------------------------------------
SIZE = st.one_of(st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=2),
                 st.none())


VALID_MODEL_ARGS = st.tuples(st.lists(st.integers(1, 20), max_size=3), st.floats(0.1, 3), st.one_of(st.none(), st.integers(1, 12)),
                             st.one_of(st.none(), st.lists(st.integers(1, 6), min_size=1, max_size=3)))
RANDOM_MODEL_ARGS = st.tuples(
    st.one_of(st.lists(SIZE, max_size=3), st.tuples(SIZE), st.text(max_size=3), st.integers(), st.none()),
    st.one_of(st.just(1.0), st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 3)),
    st.one_of(st.none(), st.integers(-2, 12), st.floats(allow_nan=True)),
    st.one_of(st.none(), st.lists(st.integers(-1, 6), max_size=3)))


@cfg(60)
@given(args=st.one_of(VALID_MODEL_ARGS, RANDOM_MODEL_ARGS))
def test_build_model_arguments(args):
    hidden, width, n_out, shape = args
    from qnref.nn.zoo import build_model

    def is_int(v: Any, lo: int) -> bool:
        return _real(v) and (isinstance(v, (int, np.integer)) or (math.isfinite(v) and float(v).is_integer())) and v >= lo

    ok = isinstance(hidden, (list, tuple)) and all(is_int(h, 1) for h in hidden)
    ok = ok and _real(width) and math.isfinite(width) and 0 < width <= 1e6
    ok = ok and (n_out is None or is_int(n_out, 1)) and (shape is None or (len(shape) > 0 and all(d >= 1 for d in shape)))
    try:
        m = build_model("mlp", input_shape=shape, n_outputs=n_out, width=width, hidden=hidden)
    except ValueError as exc:
        one_line_naming(exc, "hidden", "width", "n_outputs", "input_shape")
        assert not ok, exc
        tally("build_model", "clear error")
        return
    assert ok
    d_in = int(np.prod(shape)) if shape else 40
    sizes = [d_in] + [max(1, int(round(int(h) * width))) for h in hidden] + [10 if n_out is None else int(n_out)]
    assert m.n_params == sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
    tally("build_model", "correct result")


MODEL_KW = {"width": st.one_of(st.floats(0.1, 2), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=2), st.booleans()),
            "n_outputs": st.one_of(st.integers(-1, 12), st.floats(allow_nan=True), st.text(max_size=2)),
            "batchnorm": st.one_of(st.booleans(), st.integers(0, 1), st.text(max_size=3)),
            "activation": st.one_of(st.sampled_from(["relu", "tanh", "sigmoid", "nope"]), st.integers(), st.none()),
            "depth": st.one_of(st.sampled_from([8, 14, 20]), st.integers(-2, 30), st.text(max_size=2), st.floats(allow_nan=True)),
            "shortcut": st.one_of(st.sampled_from(["pad", "projection", "x"]), st.integers())}


@cfg(40)
@given(name=st.sampled_from(sorted(__import__("qnref.nn.zoo", fromlist=["MODELS"]).MODELS)),
       kw=st.sampled_from(sorted(MODEL_KW)), data=st.data())
def test_every_model_builder_names_its_bad_argument(name, kw, data):
    """Any registered model with one generated keyword: a model, or an error naming the keyword
    (or, for a keyword the builder does not take, the unexpected keyword)."""
    from qnref.nn.model import Sequential
    from qnref.nn.zoo import build_model

    value = data.draw(MODEL_KW[kw])
    try:
        m = build_model(name, **{kw: value})
    except (ValueError, TypeError) as exc:
        one_line_naming(exc, kw, "unexpected keyword")
        tally("build_model", "clear error")
        return
    assert isinstance(m, Sequential) and m.n_params > 0
    tally("build_model", "correct result")


# -- output paths ---------------------------------------------------------------------------------
@cfg(40)
@given(parts=st.lists(st.sampled_from(["afile", "adir", "new", "x.ckpt", "..", "."]), min_size=1, max_size=4),
       kind=st.sampled_from(["file", "dir"]))
def test_output_paths(parts, kind):
    """--checkpoint / --out paths through files, folders and new names: refused naming the user's
    path, or accepted when the file/folder could be created; nothing is created by the check."""
    with tempfile.TemporaryDirectory() as root:
        open(os.path.join(root, "afile"), "w").close()
        os.mkdir(os.path.join(root, "adir"))
        path = os.path.join(root, *parts)
        before = sorted(os.listdir(root))
        # the oracle walks the path with the OS's own answers (no '..' folding)
        if kind == "file":
            clash = os.path.isdir(path) or parts[-1] in (".", "..") or (os.path.lexists(path) and not os.path.isfile(path))
            probe = os.path.dirname(path)
        else:
            clash = os.path.lexists(path) and not os.path.isdir(path)
            probe = path
        while not os.path.lexists(probe):
            probe = os.path.dirname(probe)
        ok = not clash and os.path.isdir(probe)
        try:
            (validate.output_file if kind == "file" else validate.output_dir)("--out", path)
        except validate.PathError as exc:
            one_line_naming(exc, path)
            assert not ok, (path, exc)
            tally("paths", "clear error")
        else:
            assert ok, path
            tally("paths", "correct result")
        assert sorted(os.listdir(root)) == before


# -- loss targets and dtypes ----------------------------------------------------------------------
@cfg(30)
@given(rows=st.lists(st.lists(st.floats(-1, 6, allow_nan=False), min_size=3, max_size=3), min_size=1, max_size=4),
       normalise=st.booleans())
def test_softmax_probability_targets(rows, normalise):
    from qnref.nn.losses import get_loss

    y = np.abs(np.array(rows)) if normalise else np.array(rows)
    if normalise:
        s = y.sum(axis=1, keepdims=True)
        y = np.where(s > 0, y / np.where(s > 0, s, 1), 1 / 3)
    ok = bool((y >= 0).all() and np.all(np.abs(y.sum(axis=1) - 1) <= 1e-6))
    try:
        got = get_loss("softmax_ce").check((len(y), 3), y)
    except ValueError as exc:
        one_line_naming(exc, "softmax_ce")
        assert not ok, (y, exc)
        tally("loss targets and dtypes", "clear error")
        return
    assert ok and got is y
    tally("loss targets and dtypes", "correct result")


@cfg(20)
@given(dt=st.sampled_from(["<f8", ">f8", "<f4", ">f4", "f2", "i8", "u1", "c16", "O", "bool", "float64", "xx", "S3", "M8"]))
def test_dtype_check(dt):
    try:
        got = backend.check_dtype(dt)
    except backend.BackendError as exc:
        one_line_naming(exc, "dtype")
        assert not (np.dtype(dt).name in ("float32", "float64") and np.dtype(dt).isnative) if dt != "xx" else True
        tally("loss targets and dtypes", "clear error")
        return
    assert got.name in ("float32", "float64") and got.isnative
    tally("loss targets and dtypes", "correct result")


def test_zz_enough_cases_and_nothing_else():
    """Runs last: the suite tried ≥ 300 cases, each a clear error or a correct result."""
    total = sum(sum(c.values()) for c in STATS.values())
    if total == 0:
        pytest.skip("run with the rest of the file")
    assert total >= 300, STATS
    assert all(set(c) <= {"clear error", "correct result"} for c in STATS.values())
    out = os.environ.get("QNREF_BAD_INPUT_STATS")
    if out:
        with open(out, "w") as fh:
            json.dump({k: dict(v) for k, v in STATS.items()}, fh, indent=1)
