"""Optimizers on plain functions f: Rⁿ → R (Rosenbrock, logistic regression written by hand, …).

:class:`FunctionProblem` gives any optimizer the same interface as a network
:class:`~qnref.optim.base.Problem`: ``batch``/``sample``/``full`` all return one
:class:`FunctionObjective` whose points have ``value``, ``grad``, ``hvp`` (and ``ggn_vp`` = ``hvp``).
Each ``full()``/``batch()`` call counts one epoch; each evaluation counts passes as for a network
with one example.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy

from .. import backend
from .objective import NonFiniteError, PassCounter


class FunctionPoint:
    def __init__(self, obj: "FunctionObjective", theta: Any):
        self.obj, self.theta = obj, theta
        self.value = float(obj.fun(theta))
        obj.counter.add("forward", 1, "forward")
        self._grad = None

    @property
    def grad(self) -> Any:
        if self._grad is None:
            self.obj.counter.add("backward", 1, "grad")
            self._grad = self.obj.grad_fn(self.theta)
        return self._grad

    def hvp(self, v: Any) -> Any:
        if self.obj.hvp_fn is None:
            raise NotImplementedError("this FunctionObjective has no Hessian-vector product")
        self.obj.counter.add("rforward", 1)
        self.obj.counter.add("rbackward", 1, "hvp")
        return self.obj.hvp_fn(self.theta, v)

    ggn_vp = hvp


class FunctionObjective:
    """f, ∇f and optionally ∇²f v given as Python callables on 1-D arrays."""

    def __init__(self, fun: Callable, grad: Callable, hvp: Callable | None = None, counter: PassCounter | None = None):
        self.fun, self.grad_fn, self.hvp_fn = fun, grad, hvp
        self.counter = counter if counter is not None else PassCounter()
        self.n_samples = 1

    def at(self, theta: Any) -> FunctionPoint:
        if not backend.all_finite(theta):
            raise NonFiniteError("theta contains NaN or Inf")
        return FunctionPoint(self, theta)

    def value(self, theta: Any) -> float:
        return self.at(theta).value


class FunctionProblem:
    """A deterministic 'data set' of one function: every draw is the same objective."""

    def __init__(self, fun: Callable, grad: Callable, hvp: Callable | None = None, seed: int = 0):
        self.objective = FunctionObjective(fun, grad, hvp)
        self.counter = self.objective.counter
        self.rng = numpy.random.default_rng(seed)
        self.device_rng = self.rng
        self.n_samples = 1
        self.samples_drawn = 0

    @property
    def epochs(self) -> float:
        return float(self.samples_drawn)

    def full(self) -> FunctionObjective:
        self.samples_drawn += 1
        return self.objective

    def batch(self, size: int | None = None) -> FunctionObjective:
        return self.full()

    def sample(self, size: int | None = None) -> FunctionObjective:
        return self.objective

    @property
    def full_objective(self) -> FunctionObjective:
        return self.objective


def rosenbrock_problem(n: int = 2) -> FunctionProblem:
    """The extended Rosenbrock function Σ 100 (x_{i+1} − x_i²)² + (1 − x_i)², minimum at x = 1."""
    def f(x):
        return float((100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum())

    def g(x):
        xp = backend.namespace(x)
        out = xp.zeros_like(x)
        d = x[1:] - x[:-1] ** 2
        out[:-1] += -400.0 * x[:-1] * d - 2 * (1 - x[:-1])
        out[1:] += 200.0 * d
        return out

    def hv(x, v):
        xp = backend.namespace(x)
        out = xp.zeros_like(x)
        d = x[1:] - x[:-1] ** 2
        # ∂²/∂x_i² = −400 d + 800 x_i² + 2 ; ∂²/∂x_i∂x_{i+1} = −400 x_i ; ∂²/∂x_{i+1}² += 200
        out[:-1] += (-400.0 * d + 800.0 * x[:-1] ** 2 + 2.0) * v[:-1] - 400.0 * x[:-1] * v[1:]
        out[1:] += 200.0 * v[1:] - 400.0 * x[:-1] * v[:-1]
        return out

    return FunctionProblem(f, g, hv)
