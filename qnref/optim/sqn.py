"""SQN: the stochastic quasi-Newton method of Byrd, Hansen, Nocedal & Singer (2016), Alg. 1–2,
with the backtracking line search of the second-order CNN comparison paper (§3.4, eq. 2).

Iteration k = 1, 2, … (``state.k`` counts completed iterations):

* gradient batch S = ``problem.batch(b)`` (advances the epoch stream), g = ∇F_S(w_k);
* the window sum w̄ += w_k (Alg. 1 line 6);
* direction d = −g for k ≤ 2L or while no pair is stored (Alg. 1 lines 7–8), else
  d = −H_t g by the L-BFGS two-loop recursion over the last M pairs with H⁰ = (sᵀy / yᵀy) I of
  the newest pair (Alg. 2; :meth:`~qnref.optim.operators.LBFGSOperator.solve`);
* step: ``step_rule="armijo"`` (default): backtracking α = α₀, α₀·shrink, … on the *same*
  batch until f_S(w + αd) − f_S(w) ≤ 0.1 α gᵀd (comparison paper eq. 2, which replaced the
  paper's β/k schedule because "this scheme does not work on most of our experiments");
  a failed search leaves w unchanged. ``step_rule="decay"``: α_k = β/k (Byrd et al. 2016 §3).
* every L iterations (k mod L = 0, Alg. 1 lines 12–20): w̄_t = w̄ / L; from the second window
  on, s_t = w̄_t − w̄_{t−1} and y_t = ∇²F_{S_H}(w̄_t) s_t on an independent sample S_H of b_H
  examples (``problem.sample``: does not advance the epoch count); the pair is stored when
  s_tᵀy_t > ε‖s_t‖² and both are finite (the Hessian of a neural net is indefinite; Byrd et al.
  assume convexity) — otherwise it is skipped and counted. ``curvature="ggn"`` uses G s_t
  instead (always sᵀy ≥ 0).

So the first pair exists after iteration 2L and the memory changes exactly at k = 2L, 3L, 4L, ….

Cost per iteration: one gradient on b examples, the line-search forwards on the same b, the
two-loop recursion 4Mn + n multiplications; every L iterations one Hessian-vector product on b_H
examples (forward + R-forward + backward + R-backward ≈ 2 gradient passes per example).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy

from .. import backend
from .base import Optimizer, Problem, StepInfo, check_choice, draw_size, check_int, set_checked, try_point
from .costs import CostAssumptions, ModelShapes
from .drivers import line_search
from .linesearch import CNN_COMPARISON_C1
from .operators import LBFGSOperator
from .pairs import PairStore
from .registry import register

__all__ = ["SQN", "SQNState", "sqn_direction"]


def sqn_direction(g: Any, pairs: PairStore) -> Any:
    """H_t g of Byrd et al. (2016) Alg. 2: two-loop recursion, H⁰ = (sᵀy/yᵀy) I of the newest pair
    (= g when the store is empty)."""
    if pairs.count == 0:
        return g.copy()
    return LBFGSOperator(pairs.S, pairs.Y).solve(g)


@dataclass
class SQNState:
    """memory: the (s_t, y_t) rows (:class:`~.pairs.PairStore`, no Grams); wbar_sum: Σ w_k over
    the current window; wbar_prev: the previous window average w̄_{t−1}; t: windows completed;
    k: iterations done; pairs / skipped: curvature pairs stored / rejected so far. A step consumes
    the state it is given (docs/optimizers.md, "State rule")."""

    memory: PairStore
    wbar_sum: Any
    wbar_prev: Any
    t: int = 0
    k: int = 0
    pairs: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        self.memory = PairStore.coerce(self.memory)


@register("sqn")
class SQN(Optimizer):
    """Stochastic quasi-Newton (Byrd, Hansen, Nocedal & Singer 2016) with line search.

    Defaults: ``batch_size=100`` (comparison paper §3.3), ``L=20``, ``memory=10`` (M),
    ``curvature_batch=300`` (b_H) — the settings of Byrd et al. 2016 §4 as we recall them (their
    text is not in this repository; the comparison paper tuned but did not report them),
    ``curvature="hessian"`` (Byrd et al.: sub-sampled Hessian), ``step_rule="armijo"`` with
    ``c1=0.1`` (comparison paper eq. 2), ``alpha0=1``, ``shrink=0.5`` (N&W Alg. 3.1 halving; the
    comparison paper does not give its factor), ``beta=1.0`` for ``step_rule="decay"``
    (Byrd et al. tune β per problem), ``curvature_eps=1e-10``.
    """

    family: ClassVar[str] = "quasi-newton"
    paper: ClassVar[str] = ("Byrd, Hansen, Nocedal & Singer 2016 (SIAM J. Optim. 26(2)), Alg. 1-2; line search: "
                            "'A comparison of second-order methods for deep convolutional neural networks' §3.4 eq. 2")

    def __init__(
        self,
        *,
        batch_size: int | None = 100,
        L: int = 20,
        memory: int = 10,
        curvature_batch: int = 300,
        curvature: str = "hessian",
        step_rule: str = "armijo",
        alpha0: float = 1.0,
        c1: float = CNN_COMPARISON_C1,
        shrink: float = 0.5,
        max_ls_evals: int = 20,
        beta: float = 1.0,
        curvature_eps: float = 1e-10,
    ):
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size)
        set_checked(self, L=(L, "int"), memory=(memory, "int"), curvature_batch=(curvature_batch, "int"))
        self.curvature = check_choice("curvature", curvature, ("hessian", "ggn"))
        self.step_rule = check_choice("step_rule", step_rule, ("armijo", "decay"))
        set_checked(self, alpha0=(alpha0, "> 0"), c1=(c1, "(0, 1)"), shrink=(shrink, "(0, 1)"),
                    max_ls_evals=(max_ls_evals, "int"), beta=(beta, "> 0"), curvature_eps=(curvature_eps, "≥ 0"))

    def init(self, theta: Any) -> SQNState:
        return SQNState(memory=PairStore.empty(theta, self.memory, grams=False),
                        wbar_sum=theta * 0, wbar_prev=theta * 0)

    cost_formula: ClassVar[str] = "(5m + 5 + t + 4/L)n + m (Armijo); (5m + 6 + 4/L)n + m (β/k steps)"

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """The two-loop, gᵀd (n), θ + αd per trial (tn, Armijo rule: the accepted trial is the new θ,
        :attr:`~.drivers.LineOutcome.theta`), the update (n for the window sum; + n for θ + αd with
        β/k steps), the window means and the pair (4n every L steps)."""
        n = shapes.n
        t = {**LBFGSOperator.solve_terms(n, assume.pairs_or(self.memory)), "slope": n}
        if self.step_rule == "armijo":
            t["line_search"] = assume.trials * n
        update = n if self.step_rule == "armijo" else 2 * n
        return {**t, "update": update, "window": 4 * n / self.L}

    # -- curvature pairs ----------------------------------------------------------------------
    def _end_window(self, state: SQNState, problem: Problem, extra: dict) -> None:
        """Alg. 1 lines 13–19: average the window; from the second window on, form (s_t, y_t)."""
        wbar = state.wbar_sum / self.L
        if state.t > 0:
            s = wbar - state.wbar_prev
            ss = float(s @ s)
            y = None
            if ss > 0.0 and math.isfinite(ss) and backend.all_finite(wbar):
                cobj = problem.sample(draw_size(self, problem, self.curvature_batch, "curvature_batch"))
                pt = try_point(cobj, wbar)
                if pt is not None:
                    y = pt.hvp(s) if self.curvature == "hessian" else pt.ggn_vp(s)
            sy = float(s @ y) if y is not None else math.nan
            if y is not None and math.isfinite(sy) and sy > self.curvature_eps * ss and backend.all_finite(y):
                state.memory.append(s, y)
                state.pairs += 1
                extra["pair_added"] = True
            else:
                state.skipped += 1
                extra["pair_skipped"] = True
            extra["sy"] = sy
        state.wbar_prev = wbar
        state.wbar_sum = state.wbar_sum * 0
        state.t += 1

    # -- one iteration ------------------------------------------------------------------------
    def _move(self, obj: Any, theta: Any, p0: Any, d: Any, slope: float, k: int) -> tuple[Any, dict, dict]:
        """The step along d: (θ_new, StepInfo fields, extra)."""
        if self.step_rule == "armijo":
            ls = line_search(obj, theta, d, p0.value, slope, rule="armijo", alpha0=self.alpha0, c1=self.c1,
                             shrink=self.shrink, max_evals=self.max_ls_evals)
            fields = {"evals": 1 + ls.evals, "nonfinite": ls.nonfinite, "loss": ls.value}
            if ls.success:
                return ls.theta, {**fields, "step_size": ls.alpha, "accepted": True}, {}
            return theta, {**fields, "step_size": 0.0, "accepted": False}, {"message": ls.message}
        alpha = self.beta / k
        with numpy.errstate(over="ignore", invalid="ignore"):  # overflow → rejected below
            cand = theta + alpha * d
        if backend.all_finite(cand):
            # not evaluated (no extra forward pass)
            return cand, {"evals": 1, "loss": math.nan, "step_size": alpha, "accepted": True}, {}
        return theta, {"evals": 1, "loss": p0.value, "step_size": 0.0, "accepted": False, "nonfinite": True}, {}

    def step(self, theta: Any, state: SQNState, problem: Problem) -> tuple[Any, SQNState, StepInfo]:
        obj = problem.full() if self.batch_size is None else problem.batch(draw_size(self, problem, self.batch_size))
        mem = state.memory
        k = state.k + 1
        state.k = k
        state.wbar_sum = state.wbar_sum + theta
        extra: dict = {}
        p0 = try_point(obj, theta)
        if p0 is None or not backend.all_finite(p0.grad):
            loss = math.nan if p0 is None else p0.value
            fields = {"loss": loss, "loss_start": loss, "accepted": False, "nonfinite": True, "evals": 1}
            new_theta = theta
        else:
            g = p0.grad
            use_h = k > 2 * self.L and mem.count > 0
            d = -sqn_direction(g, mem) if use_h else -g
            slope = float(g @ d)
            if use_h and not (slope < 0.0 and math.isfinite(slope)):
                d, slope, use_h = -g, -float(g @ g), False  # safeguard: H not positive definite numerically
                extra["fallback"] = "gradient"
            extra["quasi_newton"] = use_h
            new_theta, fields, more = self._move(obj, theta, p0, d, slope, k)
            extra.update(more)
            fields["loss_start"] = p0.value
            if fields["accepted"]:
                diff = new_theta - theta
                fields["step_norm"] = math.sqrt(float(diff @ diff))
        if k % self.L == 0:
            self._end_window(state, problem, extra)
        extra["pairs"] = mem.count
        info = StepInfo(batch_size=obj.n_samples, skipped=int(bool(extra.get("pair_skipped"))), extra=extra, **fields)
        return new_theta, state, info
