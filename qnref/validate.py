"""One validator for every number, integer and flag that enters qnref (CLI options, ``train``
arguments, hyperparameters): the message names the argument, the value and what is allowed.

    number("epochs", x, lo=0, lo_open=True)        # finite float > 0
    integer("memory", m, lo=1)                      # checked *before* conversion: NaN, 2.5, True,
                                                    # "5" are refused by name, never by int()
    boolean("warm_start", v)                        # only True/False (and numpy.bool_)
    parse_number("--l2", "1e-3", lo=0)              # the same checks on command-line text
    parse_integers("--seeds", "0,1,2", lo=0)        # comma-separated integers

Every refusal is a :class:`ValidationError` (a ``ValueError``) whose text reads
``<name> must be <allowed>, got <value>``. The optimizer helpers ``check_positive``,
``check_range`` and ``check_int`` of :mod:`qnref.optim.base` are meant to delegate here.
"""
from __future__ import annotations

import math
import numbers
import os
import re
import tempfile
from typing import Any

import numpy

__all__ = ["ValidationError", "PathError", "number", "integer", "boolean", "parse_number", "parse_integer",
           "parse_integers", "describe_range", "output_file", "output_dir", "make_dir"]

_INT_TEXT = re.compile(r"[+-]?[0-9]+", re.ASCII)


class ValidationError(ValueError):
    """A value outside what an argument allows; ``name``, ``value`` and ``allowed`` are attributes."""

    def __init__(self, name: str, value: Any, allowed: str):
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"{name} must be {allowed}, got {_show(value)}")


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= 80 else text[:77] + "..."


def describe_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
                   kind: str = "number", finite: bool = True) -> str:
    """The 'allowed' phrase of a message: ``a finite number > 0``, ``an integer in [1, 10]``, …"""
    head = ("a finite number" if finite else "a number") if kind == "number" else "an integer"
    if lo is not None and hi is not None:
        return f"{head} in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{head} {'>' if lo_open else '≥'} {_num(lo)}"
    if hi is not None:
        return f"{head} {'<' if hi_open else '≤'} {_num(hi)}"
    return head


def _num(v: float) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() and abs(v) < 1e16 else str(v)


def _in_range(v: float, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> bool:
    if lo is not None and not (v > lo if lo_open else v >= lo):
        return False
    return hi is None or (v < hi if hi_open else v <= hi)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not _is_bool(value)


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, numpy.bool_))


def number(name: str, value: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, finite: bool = True) -> float:
    """``value`` as a float: a real number (not a bool, not a string), finite unless ``finite=False``
    (NaN is always refused), within the bounds."""
    allowed = describe_range(lo, hi, lo_open=lo_open, hi_open=hi_open, finite=finite)
    if not _is_real(value) or getattr(value, "ndim", 0) != 0:
        raise ValidationError(name, value, allowed)
    try:
        v = float(value)
    except (OverflowError, ValueError, TypeError):  # huge integers
        raise ValidationError(name, value, allowed) from None
    if math.isnan(v) or (finite and math.isinf(v)) or not _in_range(v, lo, hi, lo_open, hi_open):
        raise ValidationError(name, value, allowed)
    return v


def integer(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int: an integer or an integral finite float (5.0), checked before any
    conversion, within [lo, hi]."""
    allowed = describe_range(lo, hi, kind="integer")
    if not _is_real(value) or getattr(value, "ndim", 0) != 0:
        raise ValidationError(name, value, allowed)
    if isinstance(value, numbers.Integral):
        v = int(value)
    else:
        f = float(value)
        if not math.isfinite(f) or not f.is_integer():
            raise ValidationError(name, value, allowed)
        v = int(f)
    if not _in_range(v, lo, hi, False, False):
        raise ValidationError(name, value, allowed)
    return v


def boolean(name: str, value: Any) -> bool:
    """``value`` when it is True or False (``numpy.bool_`` too); 1, 'yes', None, … are refused."""
    if not _is_bool(value):
        raise ValidationError(name, value, "True or False")
    return bool(value)


def parse_number(name: str, text: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False, finite: bool = True) -> float:
    """:func:`number` on command-line text ('1e-3', '0.5'; 'inf'/'nan' are refused unless allowed)."""
    try:
        v = float(str(text).strip())
    except ValueError:
        raise ValidationError(name, text, describe_range(lo, hi, lo_open=lo_open, hi_open=hi_open, finite=finite)) from None
    try:
        return number(name, v, lo, hi, lo_open=lo_open, hi_open=hi_open, finite=finite)
    except ValidationError:
        raise ValidationError(name, text, describe_range(lo, hi, lo_open=lo_open, hi_open=hi_open, finite=finite)) from None


def parse_integer(name: str, text: str, lo: int | None = None, hi: int | None = None) -> int:
    """:func:`integer` on command-line text (decimal digits with an optional sign only)."""
    s = str(text).strip()
    if not _INT_TEXT.fullmatch(s) or len(s) > 40:
        raise ValidationError(name, text, describe_range(lo, hi, kind="integer"))
    try:
        return integer(name, int(s), lo, hi)
    except ValidationError:
        raise ValidationError(name, text, describe_range(lo, hi, kind="integer")) from None


def parse_integers(name: str, text: str, lo: int | None = None, hi: int | None = None) -> tuple[int, ...]:
    """Comma-separated integers ('0,1,2'), each checked by :func:`parse_integer`; at least one."""
    allowed = "comma-separated " + describe_range(lo, hi, kind="integer").replace("an integer", "integers")
    parts = [p.strip() for p in str(text).split(",")]
    if any(p == "" for p in parts):
        raise ValidationError(name, text, allowed)
    out = []
    for p in parts:
        try:
            out.append(parse_integer(name, p, lo, hi))
        except ValidationError:
            raise ValidationError(name, text, allowed) from None
    return tuple(out)


# -- output paths ---------------------------------------------------------------------------------
class PathError(ValueError):
    """An output path that cannot be used (a file where a folder is needed, a folder where a file
    is needed, an unwritable or uncreatable location); the message holds the user's own path."""


def _nearest_existing(path: str) -> str:
    """The nearest existing ancestor, walking the path as the OS will (no '..' folding: 'f/..'
    passes through the file f)."""
    p = path
    while p and not os.path.lexists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p or "."


def _probe_writable(option: str, user_path: str, folder: str) -> None:
    """Create and remove a probe file in ``folder`` (os.access is wrong for root and read-only mounts)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".qnref-probe-", dir=folder)
    except OSError as exc:
        raise PathError(f"{option} {user_path}: cannot write in {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def _check_ancestors(option: str, user_path: str, target: str) -> None:
    base = _nearest_existing(os.path.dirname(target.rstrip(os.sep) or target))
    if not os.path.isdir(base):
        raise PathError(f"{option} {user_path}: {base} is a file, not a folder")
    _probe_writable(option, user_path, base)


def output_file(option: str, path: str | os.PathLike) -> str:
    """Check that ``path`` can be written as a file (its folder exists or can be created, is a
    folder, is writable; ``path`` itself is not a folder). Creates nothing; returns the path."""
    user = os.fspath(path)
    if not user or "\0" in user:
        raise PathError(f"{option} must be a file name, got {user!r}")
    if os.path.isdir(user) or os.path.basename(user) in ("", ".", ".."):
        raise PathError(f"{option} {user}: is a folder; give a file name")
    if os.path.lexists(user) and not os.path.isfile(user):
        raise PathError(f"{option} {user}: exists and is not a regular file")
    _check_ancestors(option, user, user)
    return user


def output_dir(option: str, path: str | os.PathLike) -> str:
    """Check that ``path`` is, or can be created as, a writable folder. Creates nothing."""
    user = os.fspath(path)
    if not user or "\0" in user:
        raise PathError(f"{option} must be a folder name, got {user!r}")
    if os.path.lexists(user) and not os.path.isdir(user):
        raise PathError(f"{option} {user}: is a file, not a folder")
    if os.path.isdir(user):
        _probe_writable(option, user, user)
    else:
        _check_ancestors(option, user, user)
    return user


def make_dir(option: str, path: str | os.PathLike) -> str:
    """Create the folder checked by :func:`output_dir` (the user's path in any error)."""
    user = os.fspath(path)
    try:
        os.makedirs(user, exist_ok=True)
    except OSError as exc:
        raise PathError(f"{option} {user}: cannot create the folder ({exc.strerror or exc})") from None
    return user
