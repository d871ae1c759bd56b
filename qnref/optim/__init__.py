"""Optimizers: the protocol (:mod:`.base`), first-order baselines, quasi-Newton, trust-region,
Hessian-free, Kronecker-factored and Sherman–Morrison–Woodbury methods.

Every optimizer is registered by name in :data:`qnref.optim.registry.OPTIMIZERS`.
"""
from __future__ import annotations

import importlib

from .base import Optimizer, Problem, StepInfo
from .registry import OPTIMIZERS, get_optimizer_class, make_optimizer, register

#: modules that define registered optimizers (imported on first registry use)
OPTIMIZER_MODULES: tuple[str, ...] = ("first_order", "lbfgs", "lsr1", "kfac", "kbfgs", "shampoo", "tnt", "smw", "hessian_free", "sqn", "mb_lsr1", "sampled")


def load_all() -> dict:
    """Import every optimizer module so that the registry is complete."""
    for mod in OPTIMIZER_MODULES:
        importlib.import_module(f"{__name__}.{mod}")
    return OPTIMIZERS


def __getattr__(name: str):
    """Optimizer classes by class name (``qnref.optim.LSR1TrustRegion``), importing lazily."""
    for cls in load_all().values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Optimizer", "Problem", "StepInfo", "OPTIMIZERS", "make_optimizer", "get_optimizer_class", "register", "load_all"]
