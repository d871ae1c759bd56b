"""docs/variants.md cannot rot: every code reference, setting and test reference of its table resolves.

The table rows are those whose first cell is a row number (1–67, the audit's rows) or "A<n>" (rows issue 20
added). Per row:

- code column, each backticked token is one of
  ``qnref.module:Name[.attr]`` (imported, attributes looked up),
  ``name`` (a registered optimizer),
  ``name(key=value, ...)`` / ``name(**VARIANTS["key"])`` (a registered optimizer; every key is a parameter of
  its constructor, every VARIANTS key exists, and the optimizer constructs with those values);
- tests column: ``tests/....py::test_name``, the file exists and defines ``def test_name``;
- status: "yes", "documented deviation", "missing" or "n/a"; every row but "n/a" names a test;
- the counts table at the end equals the statuses of rows 1–67, and those rows are all present.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

from qnref.optim.kbfgs import VARIANTS
from qnref.optim.registry import get_optimizer_class, make_optimizer

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "variants.md"
STATUSES = ("documented deviation", "yes", "missing", "n/a")
ROW_ID = re.compile(r"^(\d+|A\d+)$")
CALL = re.compile(r"^([a-z][\w-]*)\((.*)\)$")
TEST = re.compile(r"^(tests/[\w/]+\.py)::(test_\w+)$")


def cells(line: str) -> list[str]:
    """The cells of a table line (a pipe escaped as \\| stays inside its cell)."""
    parts = re.split(r"(?<!\\)\|", line.strip())
    return [p.strip() for p in parts[1:-1]]


def rows() -> list[dict]:
    out = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("|"):
            continue
        c = cells(line)
        if len(c) == 6 and ROW_ID.match(c[0]):
            out.append({"id": c[0], "code": re.findall(r"`([^`]+)`", c[3]), "tests": re.findall(r"`([^`]+)`", c[4]),
                        "status": c[5]})
    return out


ROWS = rows()


def status_of(text: str) -> str:
    for s in STATUSES:
        if text.startswith(s):
            return s
    raise AssertionError(f"status must start with one of {STATUSES}: {text[:60]!r}")


def check_code(token: str) -> None:
    if token.startswith("qnref"):
        mod, _, attrs = token.partition(":")
        assert attrs, f"{token!r}: want module:Name"
        obj = importlib.import_module(mod)
        for a in attrs.split("."):
            obj = getattr(obj, a)
        return
    m = CALL.match(token)
    name, args = (m.group(1), m.group(2)) if m else (token, "")
    assert re.fullmatch(r"[a-z][\w-]*", name), f"unknown code reference form {token!r}"
    cls = get_optimizer_class(name)          # ValueError for an unregistered name
    if not args:
        return
    call = ast.parse(f"f({args})", mode="eval").body
    assert not call.args, f"{token!r}: settings are keyword arguments"
    kw: dict = {}
    for k in call.keywords:
        if k.arg is None:                    # **VARIANTS["key"]
            v = k.value
            assert (isinstance(v, ast.Subscript) and isinstance(v.value, ast.Name) and v.value.id == "VARIANTS"), \
                f"{token!r}: only **VARIANTS[...] may be unpacked"
            key = ast.literal_eval(v.slice)
            assert key in VARIANTS, f"{token!r}: VARIANTS has no {key!r} (has {sorted(VARIANTS)})"
            kw.update(VARIANTS[key])
        else:
            kw[k.arg] = ast.literal_eval(k.value)
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = set(kw) - params
    assert not unknown, f"{token!r}: {sorted(unknown)} not parameters of {cls.__name__}"
    make_optimizer(name, **kw)


def check_test(token: str) -> None:
    m = TEST.match(token)
    assert m, f"test reference {token!r} is not tests/...py::test_name"
    path = ROOT / m.group(1)
    assert path.is_file(), f"{token!r}: no file {m.group(1)}"
    assert re.search(rf"^\s*def {m.group(2)}\(", path.read_text(), re.M), f"{token!r}: no function {m.group(2)}"


def test_the_table_has_the_audits_rows_in_order():
    ids = [r["id"] for r in ROWS if r["id"].isdigit()]
    assert ids == [str(i) for i in range(1, 68)]
    assert len({r["id"] for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_code_references_resolve(row):
    s = status_of(row["status"])
    if s in ("n/a", "missing"):
        return
    assert row["code"], f"row {row['id']}: no code reference"
    for token in row["code"]:
        check_code(token)


@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_test_references_exist(row):
    s = status_of(row["status"])
    if s != "n/a":
        assert row["tests"], f"row {row['id']}: status {s!r} without a test"
    for token in row["tests"]:
        check_test(token)


def test_counts_match_the_statuses():
    want = {s: 0 for s in STATUSES}
    for r in ROWS:
        if r["id"].isdigit():
            want[status_of(r["status"])] += 1
    text = DOC.read_text().split("## Counts", 1)[1]
    got = {}
    for line in text.splitlines():
        c = cells(line) if line.startswith("|") else []
        if len(c) == 3 and c[0] in STATUSES:
            got[c[0]] = int(c[2])
    assert got == want


@pytest.mark.parametrize("token,why", [
    ("qnref.optim.kbfgs:NoSuchThing", AttributeError),
    ("no-such-optimizer", ValueError),
    ('kbfgs(no_such_option=1)', AssertionError),
    ('kbfgs-l(**VARIANTS["no-such-variant"])', AssertionError),
])
def test_the_checker_fails_on_bad_references(token, why):
    with pytest.raises(why):
        check_code(token)
    with pytest.raises(AssertionError):
        check_test("tests/optim/test_kfac_ch2.py::test_no_such_test")


#: settings the table states as the registered defaults (row: name, the default hyperparameters)
STATED_DEFAULTS = {
    "2": ("lsr1-tr", {"delta0": None}),
    "3": ("lsr1-tr", {"eta": 1e-4}),
    "5": ("lsr1-tr", {"r": 1e-8}),
    "9": ("lsr1-tr", {"step_tol": 0.0}),
    "14": ("mb-lsr1", {"eps": 1e-5}),
    "17": ("mb-lsr1", {"zeta": 1.0}),
    "18": ("mb-lsr1", {"K": 10}),
    "23": ("mb-lsr1", {"memory": 16, "batch_size": 128, "delta0": 1e-4}),
    "24": ("s-lbfgs", {"option": "II"}),
    "25": ("s-lbfgs", {"lbfgs_test": "ss"}),
    "29": ("shg", {"curvature": "hessian"}),
    "30": ("shg", {"grad_fraction": 0.2}),
    "32": ("shg", {"c1": 0.1}),
    "33": ("soc-sr1", {"c1": 0.1}),
    "35": ("gd", {"fraction": 0.2, "lr": 0.01}),
    "38": ("kbfgs-l", {"memory": 100}),
    "44": ("rmsprop", {"warm_start": False}),
    "56": ("tnt-ideal", {"population": "data"}),
    "57": ("shampoo", {"root": "auto"}),
    "62": ("smw-gn", {"tau": 1e-3}),
}


@pytest.mark.parametrize("row", sorted(STATED_DEFAULTS, key=int))
def test_stated_defaults_are_the_registered_defaults(row):
    """Where a row's code column or status states a default, the registered optimizer has it, and the
    row's setting names the same optimizer."""
    name, want = STATED_DEFAULTS[row]
    opt = make_optimizer(name)
    assert {k: getattr(opt, k) for k in want} == want
    (r,) = [r for r in ROWS if r["id"] == row]
    assert any(t == name or t.startswith(name + "(") for t in r["code"]), (row, r["code"])
