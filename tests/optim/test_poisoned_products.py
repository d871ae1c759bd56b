"""Step info never hides a failure (issue 19, item 6).

Each product kind an optimizer can ask a point for (value, grad, hvp, ggn_vp, fisher_vp,
layer_stats, per-example gradients, gram) is poisoned in turn: the point returns it full of NaN
(or +inf). For every registered optimizer that uses the poisoned product (detected by counting
the calls), θ must stay finite and some step from the first poisoned call on must say so in its
step info (``nonfinite`` or ``skipped``). Optimizers that never ask for a product are not judged
on it (the test records which ones do, so a method that starts using a product is covered).
"""
import math

import numpy as np
import pytest

from qnref.curvature.objective import Objective, Point
from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim import load_all, make_optimizer
from qnref.optim.base import Problem

KINDS = ("value", "grad", "hvp", "ggn_vp", "fisher_vp", "layer_stats", "per_example_grads", "gram")
STEPS = 12

def _point_class(kind: str, poison: float, calls: list) -> type:
    """A Point whose ``kind`` product is poisoned; every call appends to ``calls``."""

    class Poisoned(Point):
        def _opened(self):
            """Called by the objective right after the forward pass."""

    if kind == "value":
        def _opened(self):
            calls.append(kind)
            self._losses = self._losses * poison
        Poisoned._opened = _opened
    elif kind == "grad":
        def grad(self):
            calls.append(kind)
            return Point.grad.fget(self) * poison
        Poisoned.grad = property(grad)
    elif kind == "layer_stats":
        def layer_stats(self, targets="empirical", reduce=None):
            calls.append(kind)

            def poisoned(name, t):
                t = {"kind": t["kind"], "a": t["a"], "g": t["g"] * poison}
                return t if reduce is None else reduce(name, t)
            return Point.layer_stats(self, targets, poisoned)
        Poisoned.layer_stats = layer_stats
    else:
        base = getattr(Point, kind)

        def product(self, *a, **kw):
            calls.append(kind)
            return base(self, *a, **kw) * poison
        setattr(Poisoned, kind, product)
    return Poisoned


class _PoisonedObjective(Objective):
    point_class: type = Point

    def at(self, theta):
        p = super().at(theta)
        p.__class__ = self.point_class
        p._opened()
        return p

    def subset(self, idx):
        obj = super().subset(idx)
        obj.__class__ = type(self)
        return obj


class _PoisonedProblem(Problem):
    def __init__(self, *a, point_class, **kw):
        super().__init__(*a, **kw)
        self._cls = type("Obj", (_PoisonedObjective,), {"point_class": point_class})
        self._full.__class__ = self._cls

    def subset(self, idx):
        obj = super().subset(idx)
        obj.__class__ = self._cls
        return obj


def _problem(point_class):
    r = np.random.default_rng(0)
    model = Sequential([Dense(5), Tanh(), Dense(3)], input_shape=(4,))
    X, y = r.standard_normal((256, 4)), r.integers(0, 3, 256)
    return model, _PoisonedProblem(model, "softmax_ce", X, y, 1e-3, seed=0, point_class=point_class)


#: small-problem settings so every method reaches its curvature products within STEPS steps
SETTINGS = {"sqn": dict(L=3)}
#: variants that reach the products the defaults do not use (Hv, per-example gradients)
VARIANTS = [(name, SETTINGS.get(name, {})) for name in sorted(load_all())] + [
    ("hf", dict(curvature="hessian")), ("hf", dict(preconditioner="martens")),
    ("sqn", dict(L=3, curvature="hessian")), ("kfac", dict(fisher="empirical"))]

def _run_poisoned(name: str, settings: dict, kind: str, poison: float) -> tuple[int | None, bool]:
    """(first step that used the poisoned product or None, whether a later step info reported it)."""
    calls: list = []
    model, prob = _problem(_point_class(kind, poison, calls))
    opt = make_optimizer(name, **settings)
    th0 = model.init(0)
    th, st = th0, opt.init(th0)
    first_call, reported = None, False
    for k in range(STEPS):
        before = len(calls)
        th, st, info = opt.step(th, st, prob)
        assert np.all(np.isfinite(th)), f"{name}: θ became non-finite with poisoned {kind}"
        if first_call is None and len(calls) > before:
            first_call = k
        if first_call is not None and (info.nonfinite or info.skipped):
            reported = True
    return first_call, reported


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("poison", [math.nan, math.inf])
@pytest.mark.parametrize("name,settings", VARIANTS,
                         ids=[n + "".join(f"[{k}={v}]" for k, v in kw.items()) for n, kw in VARIANTS])
def test_poisoned_products_are_reported(name, settings, poison):
    """Each product kind the method uses, poisoned in turn: θ stays finite and a step info says so.
    Kinds the method never asks for are not judged (use is detected by counting calls)."""
    used, hidden = [], []
    for kind in KINDS:
        first_call, reported = _run_poisoned(name, settings, kind, poison)
        if first_call is None:
            continue
        used.append(kind)
        if not reported:
            hidden.append(f"{kind} (used from step {first_call})")
    assert "value" in used, f"{name} {settings}: the poisoned value was never read ({used})"
    assert not hidden, f"{name} {settings} used poisoned {', '.join(hidden)} but no step info said nonfinite/skipped"
