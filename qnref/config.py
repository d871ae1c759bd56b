"""Run configurations as TOML: every ``qnref train``/``compare`` run with ``--out`` writes
``config.toml``; ``qnref train --config run.toml`` (``compare --config``) replays it. Presets are
such configs (:func:`preset_to_dict` / :func:`preset_from_dict`).

Reading uses the standard library's :mod:`tomllib`; writing is the small subset of TOML these
files need (:func:`dumps`): strings, booleans, integers, floats written with ``repr`` (so every bit
of a float survives the round trip; ``inf``/``nan`` included), arrays of those, tables and arrays
of tables. TOML has no null: keys whose value is None are listed in the table's ``__none__`` array
(``batch_size = None`` meaning "the full batch" must survive, it is not the default).

A train config holds the settings that determine the run — model, optimizer and its
hyperparameters, data set and sizes, epochs, seed, λ, initialisation, evaluation period, schedule,
validation split, early stopping, budgets, target, device and dtype — and none of the output
paths (give ``--out``/``--checkpoint`` when replaying). On the CPU a replay is bit-identical to the
original run, except where a wall-clock or CPU-time budget stopped it (where such a budget falls
depends on the machine; ``--max-steps`` with the original's step count replays that exactly).
"""
from __future__ import annotations

import math
import os
import re
import tomllib
from typing import Any

from . import validate as check

__all__ = ["dumps", "loads", "load", "ConfigError", "TRAIN_KEYS", "train_config", "check_train_config",
           "preset_to_dict", "preset_from_dict", "FORMAT"]

#: the ``format`` entry of every config qnref writes
FORMAT = "qnref-config-1"
_NONE = "__none__"
_BARE = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(ValueError):
    """A config file that cannot be read or holds an unknown key or a wrong type (names the file)."""


# -- writing ---------------------------------------------------------------------------------------
def _key(k: str) -> str:
    return k if _BARE.fullmatch(k) else _string(k)


def _string(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _value(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x, where) for x in v) + "]"
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:  # numpy scalars
        return _value(v.item(), where)
    raise TypeError(f"config value {where} = {v!r} cannot be written as TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(x, dict) for x in v)


def _table(d: dict, path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and not _is_table_array(v)}
    nones = [k for k, v in scalars.items() if v is None]
    for k, v in scalars.items():
        if v is not None:
            lines.append(f"{_key(k)} = {_value(v, '.'.join(path + [k]))}")
    if nones:
        lines.append(f"{_NONE} = {_value(nones, _NONE)}")
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append("")
            lines.append("[" + ".".join(_key(p) for p in path + [k]) + "]")
            _table(v, path + [k], lines)
    for k, v in d.items():
        if _is_table_array(v):
            for item in v:
                lines.append("")
                lines.append("[[" + ".".join(_key(p) for p in path + [k]) + "]]")
                _table(item, path + [k], lines)


def dumps(d: dict, comment: str = "") -> str:
    """TOML text of ``d`` (see the module docstring for what it supports)."""
    lines = [f"# {line}" for line in comment.splitlines()]
    _table(d, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


# -- reading ---------------------------------------------------------------------------------------
def _restore_none(d: Any) -> Any:
    if isinstance(d, dict):
        out = {k: _restore_none(v) for k, v in d.items() if k != _NONE}
        for k in d.get(_NONE, ()):
            out[k] = None
        return out
    if isinstance(d, list):
        return [_restore_none(x) for x in d]
    return d


def loads(text: str, source: str = "<string>") -> dict:
    try:
        return _restore_none(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})") from None


def load(path: str | os.PathLike) -> dict:
    """Read a config file (:class:`ConfigError` naming the file when it is missing or malformed)."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"--config {p}: cannot read it ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--config {p}: not UTF-8 text") from None
    return loads(text, f"--config {p}")


# -- train configs -----------------------------------------------------------------------------------
#: key → (type(s), required). Keys map to the ``qnref train`` options of the same name ('_' for '-').
TRAIN_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "format": ((str,), False),
    "command": ((str,), False),
    "model": ((str,), True),
    "optimizer": ((str,), True),
    "dataset": ((str,), True),
    "hyperparameters": ((dict,), False),
    "epochs": ((float, int), False),
    "l2": ((float, int), False),
    "seed": ((int,), False),
    "init": ((str,), False),
    "eval_every": ((float, int), False),
    "lr_schedule": ((str,), False),
    "lr_schedule_param": ((str,), False),
    "val_fraction": ((float, int), False),
    "early_stopping": ((str,), False),
    "patience": ((int,), False),
    "min_delta": ((float, int), False),
    "max_steps": ((int,), False),
    "max_time": ((float, int), False),
    "max_cpu_time": ((float, int), False),
    "target": ((str,), False),
    "stop_at_target": ((bool,), False),
    "diverge_factor": ((float, int), False),
    "checkpoint_every": ((float, int), False),
    "device": ((str,), False),
    "dtype": ((str,), False),
    "data_dir": ((str,), False),
    "n_train": ((int,), False),
    "n_test": ((int,), False),
}


def train_config(values: dict) -> dict:
    """The config dict of a train run from its settings (None entries dropped, except inside
    ``hyperparameters`` where None is a value)."""
    out: dict = {"format": FORMAT, "command": "train"}
    for k in TRAIN_KEYS:
        if k in ("format", "command"):
            continue
        v = values.get(k)
        if v is None:
            continue
        out[k] = dict(v) if k == "hyperparameters" else v
    return out


def check_train_config(cfg: dict, source: str) -> dict:
    """Keys and types of a train config, by name (:class:`ConfigError`)."""
    if cfg.get("command", "train") != "train":
        raise ConfigError(f"{source}: is a {cfg.get('command')!r} config; use `qnref {cfg.get('command')} --config`")
    if "format" in cfg and cfg["format"] != FORMAT:
        raise ConfigError(f"{source}: format {cfg['format']!r} is not {FORMAT!r}")
    for k, v in cfg.items():
        if k not in TRAIN_KEYS:
            from .optim.registry import suggest  # noqa: PLC0415

            raise ConfigError(f"{source}: {suggest(k, list(TRAIN_KEYS), 'key')}")
        kinds, _ = TRAIN_KEYS[k]
        if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
            raise ConfigError(f"{source}: {k} must be {' or '.join(t.__name__ for t in kinds)}, got {v!r}")
    missing = [k for k, (_, req) in TRAIN_KEYS.items() if req and k not in cfg]
    if missing:
        raise ConfigError(f"{source}: lacks {', '.join(missing)}")
    return cfg


# -- presets ---------------------------------------------------------------------------------------------
def _lists_to_tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def preset_to_dict(p: Any) -> dict:
    """A :class:`qnref.presets.Preset` as a compare config dict."""
    import dataclasses  # noqa: PLC0415

    out: dict = {"format": FORMAT, "command": "compare"}
    for f in dataclasses.fields(p):
        v = getattr(p, f.name)
        if f.name == "runs":
            out["runs"] = [{"label": r.label, "optimizer": r.optimizer,
                            **({"schedule": r.schedule} if r.schedule is not None else {}),
                            "hyperparameters": dict(r.hyperparameters)} for r in v]
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        elif v is not None:
            out[f.name] = v
    return out


def preset_from_dict(d: dict, source: str = "config") -> Any:
    """The :class:`qnref.presets.Preset` of a compare config dict (unknown keys refused by name)."""
    import dataclasses  # noqa: PLC0415

    from .presets import Preset, Run  # noqa: PLC0415

    d = dict(d)
    if d.pop("command", "compare") != "compare":
        raise ConfigError(f"{source}: is not a compare config; use `qnref train --config`")
    fmt = d.pop("format", FORMAT)
    if fmt != FORMAT:
        raise ConfigError(f"{source}: format {fmt!r} is not {FORMAT!r}")
    names = {f.name for f in dataclasses.fields(Preset)}
    for k in d:
        if k not in names:
            from .optim.registry import suggest  # noqa: PLC0415

            raise ConfigError(f"{source}: {suggest(k, sorted(names), 'key')}")
    for k in ("name", "dataset", "model", "runs"):
        if k not in d:
            raise ConfigError(f"{source}: lacks {k}")
    d.setdefault("description", "")
    d.setdefault("paper", "")
    runs = []
    for i, r in enumerate(d["runs"]):
        if not isinstance(r, dict) or "optimizer" not in r:
            raise ConfigError(f"{source}: runs[{i}] must be a table with an optimizer")
        extra = set(r) - {"label", "optimizer", "hyperparameters", "schedule"}
        if extra:
            raise ConfigError(f"{source}: runs[{i}] has unknown key(s) {', '.join(sorted(extra))} "
                              "(known: label, optimizer, hyperparameters, schedule)")
        runs.append(Run(str(r.get("label", r["optimizer"])), r["optimizer"],
                        _lists_to_tuples(dict(r.get("hyperparameters", {}))), r.get("schedule")))
    d["runs"] = tuple(runs)
    for k in ("seeds",):
        if k in d:
            d[k] = tuple(check.integer(f"{source}: seeds", s, 0) for s in d[k])
    for k in ("model_kwargs", "dataset_kwargs"):
        if k in d:
            d[k] = _lists_to_tuples(dict(d[k]))
    try:
        return Preset(**d)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from None
