"""Opening and closing a step of the methods without a convergence test: first-order,
Kronecker-factored, Hessian-free, SMW (θ ← θ + Δθ at a fixed rate, or after their own safeguards).

:func:`open_fixed_step` is :func:`qnref.optim.drivers.open_step` without its ‖∇f‖ ≤ tol stop
(these methods step at ∇f = 0 too — momentum keeps moving — and computing ‖∇f‖ would cost a dot
product and a host sync per step); the step is closed with :func:`~qnref.optim.drivers.close_step`.
The rule added here: Δθ is applied only when it is finite (one host sync, ‖Δθ‖², which is also the
step norm the StepInfo reports), otherwise θ and the state stay and the step reports
``accepted=False, nonfinite=True``.
"""
from __future__ import annotations

import math
from typing import Any

from .base import Problem, StepInfo, try_point
from .drivers import Opened, close_step, finite_point, stay

__all__ = ["step_objective", "open_fixed_step", "finite_move", "nonfinite_step"]


def step_objective(problem: Problem, batch_size: int | None) -> Any:
    """The step's objective: ``problem.batch(batch_size)``, or the whole set (``problem.full()``,
    counted as an epoch) when ``batch_size`` is None."""
    return problem.full() if batch_size is None else problem.batch(batch_size)


def open_fixed_step(problem: Problem, batch_size: int | None, theta: Any, *, need_grad: bool = True) -> Opened:
    """Draw the step's batch (:func:`step_objective`) and evaluate θ; ``stop`` is set when f (and,
    with ``need_grad``, ∇f) is not finite at θ. ``need_grad=False`` leaves ∇f uncomputed (K-BFGS
    forms it from the layer taps, saving a backward pass; the caller checks it)."""
    obj = step_objective(problem, batch_size)
    p = finite_point(obj, theta) if need_grad else try_point(obj, theta)
    return Opened(obj, p, stay(obj) if p is None else None)


def finite_move(theta: Any, delta: Any) -> tuple[Any, float] | None:
    """(θ + Δθ, ‖Δθ‖) when Δθ is finite, else ``None`` (θ must not move). One host sync."""
    sq = float(delta @ delta)
    if not math.isfinite(sq):
        return None
    return theta + delta, math.sqrt(sq)


def nonfinite_step(opened: Opened, lr: float, skipped: int = 0) -> StepInfo:
    """StepInfo of an opened step that does not move because ∇f or Δθ is not finite."""
    return close_step(opened, loss=opened.f0, accepted=False, evals=1, step_size=lr, nonfinite=True, skipped=skipped)
