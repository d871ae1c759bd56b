"""Pieces shared by the limited-memory quasi-Newton optimizers (L-SR1, L-BFGS).

* :func:`begin_step` draws the step's batch and evaluates f and ∇f at θ, returning ``None``
  when either is not finite (the step then does not move).
* :class:`LineFunction` evaluates φ(α) = f(θ + αd) (and φ'(α)) on one batch, remembering each
  trial point so that the gradient at the accepted point is not recomputed.
* :func:`memory_to_state` / :func:`memory_from_state` keep a :class:`PairMemory` inside a
  checkpointable state (plain arrays and ints).
"""
from __future__ import annotations

import math
from typing import Any

from .. import backend
from ..curvature.objective import Objective, Point
from .base import Problem, StepInfo, try_point
from .compact import PairMemory


def begin_step(problem: Problem, batch_size: int | None, theta: Any) -> tuple[Objective, Point | None]:
    """The step's objective (a minibatch, or the full set when ``batch_size`` is None) and the
    point at θ (``None`` when f or ∇f is not finite there)."""
    obj = problem.full() if batch_size is None else problem.batch(batch_size)
    p = try_point(obj, theta)
    if p is None or not backend.all_finite(p.grad):
        return obj, None
    return obj, p


def open_step(problem: Problem, batch_size: int | None, theta: Any, state: Any, tol: float):
    """Start a step: (objective, point at θ, None) to go on, or (objective, None, result) where
    ``result`` is the step's return value when θ does not move — f or ∇f not finite at θ, or
    ‖∇f‖ ≤ ``tol`` (converged)."""
    obj, p0 = begin_step(problem, batch_size, theta)
    if p0 is None:
        return obj, None, stay(theta, state, obj)
    if math.sqrt(float(p0.grad @ p0.grad)) <= tol:
        return obj, None, stay(theta, state, obj, p0.value, converged=True)
    return obj, p0, None


def stay(theta: Any, state: Any, obj: Objective, loss: float = math.nan, **extra: Any) -> tuple[Any, Any, StepInfo]:
    """Do not move: the start point was not finite or the method has converged."""
    info = StepInfo(loss=loss, loss_start=loss, accepted=False, nonfinite=not math.isfinite(loss),
                    evals=1, batch_size=obj.n_samples, extra=dict(extra))
    return theta, state, info


class LineFunction:
    """φ(α) = f(θ + α d) on one batch, caching the trial points by α."""

    def __init__(self, obj: Objective, theta: Any, d: Any):
        self.obj, self.theta, self.d = obj, theta, d
        self.points: dict[float, Point | None] = {}

    def point(self, alpha: float) -> Point | None:
        if alpha not in self.points:
            self.points[alpha] = try_point(self.obj, self.theta + alpha * self.d)
        return self.points[alpha]

    def phi(self, alpha: float) -> float:
        p = self.point(alpha)
        return math.inf if p is None else p.value

    def phi_dphi(self, alpha: float) -> tuple[float, float]:
        p = self.point(alpha)
        if p is None:
            return math.inf, math.nan
        return p.value, float(p.grad @ self.d)

    @property
    def evals(self) -> int:
        return len(self.points)

    @property
    def nonfinite(self) -> bool:
        """Whether some trial point had a NaN/Inf loss (it was rejected by the search)."""
        return any(p is None for p in self.points.values())


def memory_to_state(mem: PairMemory) -> dict:
    return {"S": mem._S, "Y": mem._Y, "count": mem.count}


def memory_from_state(d: dict) -> PairMemory:
    """A PairMemory over the state's own buffers (no copy: the state is updated in place)."""
    S, Y = d["S"], d["Y"]
    mem = PairMemory(S.shape[0], S.shape[1], dtype=S.dtype, xp=backend.namespace(S, Y))
    mem._S, mem._Y, mem._count = S, Y, int(d["count"])
    return mem
