"""Name → optimizer class registry (``qnref list optimizers``, the CLI, benchmarks)."""
from __future__ import annotations

import difflib
from typing import Any, Callable

OPTIMIZERS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: register an optimizer under ``name`` (also sets ``cls.name``)."""

    def deco(cls: type) -> type:
        if name in OPTIMIZERS and OPTIMIZERS[name] is not cls:
            raise ValueError(f"optimizer name {name!r} registered twice")
        cls.name = name
        OPTIMIZERS[name] = cls
        return cls

    return deco


def suggest(name: str, choices: list[str], what: str) -> str:
    """'unknown X; did you mean …?': names that extend the input first, then difflib's closest."""
    starts = sorted(c for c in choices if c.startswith(name))
    close = (starts + [c for c in difflib.get_close_matches(name, choices, n=3, cutoff=0.5) if c not in starts])[:3]
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {what} {name!r}{hint} (known: {', '.join(sorted(choices))})"


def get_optimizer_class(name: str) -> type:
    from . import load_all

    load_all()
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(suggest(name, list(OPTIMIZERS), "optimizer")) from None


def make_optimizer(name: str, **hyperparameters: Any) -> Any:
    """An optimizer by registry name with the given hyperparameters (paper defaults otherwise)."""
    return get_optimizer_class(name)(**hyperparameters)
