"""Globalization drivers shared by the optimizers (the scipy split: approximation / subproblem /
globalization — this module is the third part).

* :func:`open_step` / :func:`close_step` / :func:`stay` — open a step (draw the batch, evaluate
  f and ∇f at θ, stop on a non-finite start or convergence) and build the step's
  :class:`~.base.StepInfo` from a small named result (:class:`Opened`), never from long positional
  tuples. :func:`with_extra` returns a *new* StepInfo with more ``extra`` entries (helpers never
  mutate a StepInfo handed to them).
* :func:`line_search` — one line-search driver: φ(α) = f(θ + αd) on the step's batch
  (:class:`LineFunction`, trial points cached so the gradient at the accepted point is not
  recomputed), Armijo backtracking or strong Wolfe (:mod:`~.linesearch`), returning
  :class:`LineOutcome`.
* :func:`trust_region_update` — one trust-region driver: ρ = ared/pred (:func:`~.trust_region.
  reduction_ratio`), the accept test and the radius rule of the method (:class:`~.trust_region.
  RadiusRule`: [RD16] Alg. 1 lines 13 and 18–25, S-LSR1's variant via its parameters; MB-LSR1's
  averaged ratio, [MB] Alg. 5, via ``average``), returning :class:`TrustRegionDecision`.

State rule (docs/optimizers.md): a step consumes the state it is given; nothing here keeps
per-run values.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

from .. import backend
from ..curvature.objective import Objective, Point
from .base import Problem, StepInfo, evaluate
from .linesearch import backtracking_armijo, strong_wolfe
from .trust_region import AveragedRadiusRule, RadiusRule, reduction_ratio

__all__ = ["Opened", "open_step", "step_objective", "finite_move", "nonfinite_step", "finite_point", "stay", "close_step", "with_extra", "LineFunction",
           "LineOutcome", "line_search", "TrustRegionDecision", "trust_region_update"]


# -- opening and closing a step -----------------------------------------------------------------------
class Opened(NamedTuple):
    """The start of a step.

    obj:   the step's objective (minibatch, or the full set).
    point: the point at θ (``None`` when f, or ∇f when it was asked for, is not finite there).
    stop:  the StepInfo of a step that does not move (non-finite start, or ‖∇f‖ ≤ tol), else None.
           The caller returns ``theta, state, opened.stop`` then.
    f0:    f at θ, read once from the point (one host sync; NaN when not finite).
    warm_skipped: curvature blocks a statistics warm start of this step refused as non-finite
           (Kronecker methods); :func:`close_step` adds them to ``skipped``.
    """

    obj: Objective
    point: Point | None
    stop: StepInfo | None
    f0: float = math.nan
    warm_skipped: int = 0

    @property
    def g(self) -> Any:
        return self.point.grad

    @property
    def batch_size(self) -> int:
        return self.obj.n_samples


def finite_point(obj: Objective, theta: Any) -> tuple[Point | None, float]:
    """(point, f) at θ when f and ∇f are finite there (f read once), else ``(None, nan)``."""
    p, f = evaluate(obj, theta)
    return (p, f) if p is not None and backend.all_finite(p.grad) else (None, math.nan)


def stay(obj: Objective, loss: float = math.nan, *, evals: int = 1, **extra: Any) -> StepInfo:
    """StepInfo of a step that does not move: the start was not finite (``loss`` NaN) or the method
    has converged (pass ``converged=True``); ``extra`` goes to ``StepInfo.extra``."""
    return StepInfo(loss=loss, loss_start=loss, accepted=False, nonfinite=not math.isfinite(loss), evals=evals,
                    batch_size=obj.n_samples, extra=dict(extra))


def step_objective(problem: Problem, batch_size: int | None) -> Objective:
    """The step's objective: ``problem.batch(batch_size)``, or the whole set (``problem.full()``,
    counted as an epoch) when ``batch_size`` is None."""
    return problem.full() if batch_size is None else problem.batch(batch_size)


def open_step(problem: Problem, batch_size: int | None, theta: Any, *, tol: float | None = 0.0,
              need_grad: bool = True) -> Opened:
    """Draw the step's batch (:func:`step_objective`) and evaluate θ.

    ``stop`` is set when θ must not move: f (or, with ``need_grad``, ∇f) not finite at θ
    (``nonfinite=True``), or ‖∇f‖ ≤ ``tol`` (``extra["converged"] = True``; tol = 0 stops only at
    ∇f = 0). ``tol=None`` has no convergence stop and costs no ‖∇f‖ (the methods without a
    convergence test: first-order, Kronecker, HF, SMW — momentum moves at ∇f = 0 too).
    ``need_grad=False`` leaves ∇f unchecked (first-order rules check their finite Δθ instead,
    :func:`finite_move`; K-BFGS forms ∇f from the layer taps).
    """
    obj = step_objective(problem, batch_size)
    p, f0 = (finite_point if need_grad else evaluate)(obj, theta)
    if p is None:
        return Opened(obj, None, stay(obj))
    if tol is not None and math.sqrt(float(p.grad @ p.grad)) <= tol:
        return Opened(obj, p, stay(obj, f0, converged=True), f0)
    return Opened(obj, p, None, f0)


def finite_move(theta: Any, delta: Any) -> tuple[Any, float] | None:
    """(θ + Δθ, ‖Δθ‖) when Δθ is finite, else ``None`` (θ must not move). One host sync."""
    sq = float(delta @ delta)
    if not math.isfinite(sq):
        return None
    return theta + delta, math.sqrt(sq)


def nonfinite_step(opened: Opened, lr: float, skipped: int = 0) -> StepInfo:
    """StepInfo of an opened step that does not move because ∇f or Δθ is not finite."""
    return close_step(opened, loss=opened.f0, accepted=False, evals=1, step_size=lr, nonfinite=True, skipped=skipped)


def close_step(opened: Opened, *, loss: float, accepted: bool, evals: int, **fields: Any) -> StepInfo:
    """The StepInfo of an opened step: ``loss_start`` and ``batch_size`` come from ``opened``;
    ``fields`` are the other :class:`~.base.StepInfo` fields (step_norm, radius, step_size,
    skipped, nonfinite, extra)."""
    if opened.warm_skipped:
        fields["skipped"] = fields.get("skipped", 0) + opened.warm_skipped
    return StepInfo(loss=loss, loss_start=opened.f0, accepted=accepted, evals=evals,
                    batch_size=opened.obj.n_samples, **fields)


def with_extra(info: StepInfo, **extra: Any) -> StepInfo:
    """A new StepInfo equal to ``info`` with ``extra`` merged into its ``extra`` dict."""
    return dataclasses.replace(info, extra={**info.extra, **extra})


# -- the line-search driver ---------------------------------------------------------------------------
class LineFunction:
    """φ(α) = f(θ + α d) on one batch, caching the trial points, their values and the trial θ by α
    (the accepted one is the step's new θ: :attr:`LineOutcome.theta`)."""

    def __init__(self, obj: Objective, theta: Any, d: Any):
        self.obj, self.theta, self.d = obj, theta, d
        self.trials: dict[float, tuple[Point | None, float]] = {}
        self.thetas: dict[float, Any] = {}
        self.bad_slopes = 0  # trials with a finite loss but a NaN/Inf gradient (slope)

    def _trial(self, alpha: float) -> tuple[Point | None, float]:
        if alpha not in self.trials:
            x = self.theta + alpha * self.d
            self.thetas[alpha] = x
            self.trials[alpha] = evaluate(self.obj, x)
        return self.trials[alpha]

    def point(self, alpha: float) -> Point | None:
        return self._trial(alpha)[0]

    def phi(self, alpha: float) -> float:
        p, f = self._trial(alpha)
        return math.inf if p is None else f

    def phi_dphi(self, alpha: float) -> tuple[float, float]:
        p, f = self._trial(alpha)
        if p is None:
            return math.inf, math.nan
        slope = float(p.grad @ self.d)
        if not math.isfinite(slope):
            self.bad_slopes += 1
        return f, slope

    @property
    def evals(self) -> int:
        return len(self.trials)

    @property
    def nonfinite(self) -> bool:
        """Whether some trial point had a NaN/Inf loss or gradient (it was rejected by the search)."""
        return self.bad_slopes > 0 or any(p is None for p, _ in self.trials.values())

    def describe(self, message: str) -> str:
        """The search's message, prefixed with the non-finite trials it met (so a stalled search
        says why, not only "max_evals reached")."""
        bad_f = sum(p is None for p, _ in self.trials.values())
        notes = []
        if bad_f:
            notes.append(f"{bad_f} of {self.evals} trials had a non-finite loss")
        if self.bad_slopes:
            notes.append(f"{self.bad_slopes} of {self.evals} trials had a non-finite gradient")
        return f"{'; '.join(notes)}: {message}" if notes else message


class LineOutcome(NamedTuple):
    """Result of :func:`line_search`.

    success: a step length satisfying the search's conditions was found; alpha: it (0 on failure);
    point: the point at θ + αd (None on failure); value: f there (f0 on failure); evals: trial
    evaluations; nonfinite: some trial was NaN/Inf; message: the search's message; theta: the
    accepted trial θ + αd itself (None on failure) — the step's new θ, bit for bit ``theta + alpha * d``
    without a second pass over n (issue 21: the L-BFGS step re-formed it, 2 ms at n = 2.8·10⁶).
    """

    success: bool
    alpha: float
    point: Point | None
    value: float
    evals: int
    nonfinite: bool
    message: str
    theta: Any = None


def line_search(obj: Objective, theta: Any, d: Any, f0: float, slope: float, *, rule: str = "armijo",
                alpha0: float = 1.0, c1: float = 1e-4, c2: float = 0.9, shrink: float = 0.5,
                max_evals: int = 30) -> LineOutcome:
    """Search along d from θ on ``obj`` (the step's batch), f0 = f(θ), slope = ∇f(θ)ᵀd < 0.

    ``rule="armijo"``: backtracking α₀, α₀·shrink, … until f(θ + αd) ≤ f0 + c₁ α slope
    (Nocedal & Wright Alg. 3.1); ``rule="wolfe"``: strong Wolfe conditions with c₁, c₂ (N&W
    Alg. 3.5/3.6). A trial with a non-finite loss counts as φ = +∞ (rejected).
    """
    line = LineFunction(obj, theta, d)
    if rule == "armijo":
        ls = backtracking_armijo(line.phi, f0, slope, alpha0=alpha0, c1=c1, shrink=shrink, max_evals=max_evals)
    elif rule == "wolfe":
        ls = strong_wolfe(line.phi_dphi, f0, slope, alpha0=alpha0, c1=c1, c2=c2, max_evals=max_evals)
    else:
        raise ValueError(f"rule must be 'armijo' or 'wolfe', got {rule!r}")
    if not ls.success:
        return LineOutcome(False, 0.0, None, f0, ls.n_evals, line.nonfinite, line.describe(ls.message))
    p, f = line._trial(ls.alpha)
    return LineOutcome(True, ls.alpha, p, f, ls.n_evals, line.nonfinite, ls.message, line.thetas[ls.alpha])


# -- the trust-region driver --------------------------------------------------------------------------
class TrustRegionDecision(NamedTuple):
    """ρ = ared/pred (after the floor), whether the trial is accepted, the new radius, and the
    running average ρ̂ and weight T of [MB] Alg. 5 (NaN / 0 without ``average``)."""

    rho: float
    accepted: bool
    delta: float
    rho_hat: float = math.nan
    T: float = 0.0


def trust_region_update(rule: RadiusRule | AveragedRadiusRule, delta: float, ared: float, pred: float, step_norm: float, *,
                        rho_floor: float = -math.inf,
                        average: tuple[float, float, float] | None = None) -> TrustRegionDecision:
    """One trust-region decision: ρ = ared/pred (a non-finite trial passes ared = −∞ → ρ = −∞),
    ρ ← max(ρ, ``rho_floor``), accept by ``rule.accept(ρ)``, new radius ``rule.update(Δ, ρ, ‖s‖)``.

    ``average = (ζ, ρ̂, T)`` selects the non-monotone variant of [MB] Alg. 5: ρ̂ ← (ζTρ̂ + ρ)/(ζT + 1),
    T ← ζT + 1, and the radius rule sees ρ̂ instead of ρ.
    """
    rho = max(reduction_ratio(ared, pred), rho_floor)
    accepted = rule.accept(rho)
    if average is None:
        return TrustRegionDecision(rho, accepted, rule.update(delta, rho, step_norm))
    zeta, rho_hat, T = average
    num = zeta * T * rho_hat + rho
    T = zeta * T + 1.0
    rho_hat = num / T
    return TrustRegionDecision(rho, accepted, rule.update(delta, rho_hat, step_norm), rho_hat, T)
