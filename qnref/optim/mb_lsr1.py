"""MB-LSR1 (minibatch stochastic L-SR1 trust region) and L-SSR1-TR as its special case.

[MB] J. D. Griffin, M. Jahani, M. Takáč, S. Yektamaram, W. Zhou, "A minibatch stochastic
quasi-Newton method adapted for nonconvex deep learning problems", Algorithms 1–6.
[SQN] Berahas, Jahani & Takáč (2019): the sampled pairs of the warm start (m̂ = m).

One iteration k (Algorithm 1) = the functions below, in this order::

    getStep   (Alg. 4)  p* = argmin ĝᵀp + ½pᵀBp, ‖p‖ ≤ δ        solve_lsr1_subproblem (B = γI + ΨMΨᵀ)
                        v = μv − ηα_s ĝ + (1 − η)s ;  v ← min(1, δ/‖v‖) v          :func:`hybrid_direction`
                        p = (1 − η)p* + μv ;          p ← min(1, δ/‖p‖) p
                        p ← −p if pᵀĝ > 0
                        restart L-SR1 (B = γI) if min(|ĝᵀp|, |ĝᵀp|/‖p‖) < ξ‖ĝ‖    :func:`restart_test`
                        α: f̂(w + αp) ≤ f̂(w) + c₁αĝᵀp on the step's batch (backtracking Armijo)
                        s = αp ;  R = f̂(w + p*) − f̂(w) ;  ρ = R / Q(p*),  Q(p*) = ĝᵀp* + ½p*ᵀBp*
                        y = ∇f̂(w + s) − ĝ   (same batch)
    ExitCheck (Alg. 2)  ‖ĝ‖ ≤ ε → full gradient at wₖ₊₁; stop if ‖∇f‖ ≤ ε               :func:`exit_check`
    getRadius (Alg. 5)  ρ̂ = (ζTρ̂ + ρ)/(ζT + 1), T ← ζT + 1;
                        ρ̂ < 0.1 → δ = min(δ, ‖s‖);  ρ̂ ≥ 0.5 and ‖s‖ ≥ δ → δ = 2δ
                                         :func:`~.drivers.trust_region_update`, :class:`~.trust_region.AveragedRadiusRule`
    updateSY  (Alg. 3)  ρ < τ and m̂ ≥ 0: m̂ = 0 → S = Y = [];  m̂ > 0 → m̂ sampled pairs [SQN];
                        else append (s, y) (SR1 skip rule) and drop the oldest              :func:`update_sy`
    getBatch  (Alg. 6)  every K iterations: f̂ on a fresh sample of min(1.1 n_b, 5000);
                        f̂(w) − f̂_K ≥ −γ₁ + γ₂ ΣR_j → n_b = min(2n_b, N) (ζ ← 0 at n_b = N);
                        f̂_K = f̂(w)                                                          :func:`batch_rule`

L-SSR1-TR (Erway et al. 2019) is the special case m̂ = −1, γ₂ = η = ζ = 0 and a progress check on
all N examples ([MB] §3): class :class:`LSSR1TR` ("lssr1-tr") fixes exactly these.

Safeguards (not in the paper, all documented in ``docs/mb_lsr1.md``): a trial point whose loss
or gradient is not finite fails the line search (θ never becomes NaN); a non-finite or
undefined ρ counts as ``rho_floor`` and every ρ is clipped below at ``rho_floor`` (so one
garbage ratio cannot pin the running average ρ̂ for ever); the radius never drops below
``delta_min``; when the restart test still fails right after a restart, the step is the
steepest-descent step −min(1, δ/‖ĝ‖)ĝ; ‖s‖ ≥ δ is tested with a relative tolerance of 10⁻¹²
(the clipped p has ‖p‖ = δ only up to rounding).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import backend
from ..curvature.objective import Point
from .base import Optimizer, Problem, StepInfo, capped_size, check_bool, check_int, check_range, evaluate, set_checked, try_point
from .costs import CostAssumptions, ModelShapes
from .drivers import line_search, open_step, trust_region_update
from .operators import LSR1Operator, lsr1_prune, lsr1_prune_flops, sr1_skip
from .pairs import PairStore
from .registry import register
from .sampled import OPTIONS, sample_curvature_pairs
from .trust_region import (AveragedRadiusRule, lsr1_subproblem_flops, lsr1_subproblem_gram_flops,
                           solve_compact_subproblem)

__all__ = ["MBLSR1State", "MBLSR1", "LSSR1TR", "clip_to_radius", "hybrid_direction", "restart_test",
           "batch_rule", "progress_sample_size"]


# --------------------------------------------------------------------------------------------
# the sub-algorithms as pure functions (unit-tested against hand-computed cases)
# --------------------------------------------------------------------------------------------
def clip_to_radius(x: Any, delta: float) -> Any:
    """min(1, δ/‖x‖) x  (Alg. 4 lines 5 and 7); x itself when ‖x‖ ≤ δ or x = 0."""
    nrm = float(backend.namespace(x).linalg.norm(x))
    return x * (delta / nrm) if nrm > delta else x


def hybrid_direction(p_star: Any, g: Any, v: Any, s: Any, delta: float, *, eta: float, mu: float,
                     alpha_s: float) -> tuple[Any, Any]:
    """Alg. 4 lines 4–10: the momentum/SGD hybrid. Returns (p, v_new).

    v = μv − ηα_s ĝ + (1 − η)s, clipped to δ;  p = (1 − η)p* + μv, clipped to δ;  p ← −p if pᵀĝ > 0.
    """
    v_new = clip_to_radius(mu * v - (eta * alpha_s) * g + (1.0 - eta) * s, delta)
    p = clip_to_radius((1.0 - eta) * p_star + mu * v_new, delta)
    if float(p @ g) > 0.0:
        p = -p
    return p, v_new


def restart_test(gp: float, p_norm: float, g_norm: float, xi: float) -> bool:
    """True when L-SR1 must restart (Alg. 4 line 11): min(|ĝᵀp|, |ĝᵀp|/‖p‖) < ξ‖ĝ‖.

    A zero step (‖p‖ = 0) with ĝ ≠ 0 restarts; ĝ = 0 never does (0 < 0 is false).
    """
    a = abs(gp)
    ratio = a / p_norm if p_norm > 0.0 else 0.0
    return min(a, ratio) < xi * g_norm


def progress_sample_size(n_b: int, N: int, *, factor: float = 1.1, cap: int = 5000, full: bool = False) -> int:
    """n̂ = min(⌈factor·n_b⌉, cap, N) (Alg. 6 line 3), or N for L-SSR1-TR."""
    if full:
        return int(N)
    return int(min(math.ceil(factor * n_b - 1e-9), cap, N))


def batch_rule(n_b: int, N: int, f_new: float, f_K: float, R_sum: float, gamma1: float, gamma2: float,
               zeta: float) -> tuple[int, float, bool]:
    """Alg. 6 lines 5–11: double n_b when f̂(w) − f̂_K ≥ −γ₁ + γ₂ ΣR_j. Returns (n_b, ζ, doubled).

    A non-finite f̂(w) counts as no progress (double); a non-finite f̂_K (no previous check) never
    doubles. ζ becomes 0 once n_b = N.
    """
    doubled = False
    if math.isfinite(f_K) and (not math.isfinite(f_new) or f_new - f_K >= -gamma1 + gamma2 * R_sum):
        n_b = min(2 * n_b, N)
        doubled = True
        if n_b == N:
            zeta = 0.0
    return n_b, zeta, doubled


# --------------------------------------------------------------------------------------------
# state and optimizer
# --------------------------------------------------------------------------------------------
@dataclass
class MBLSR1State:
    """Checkpointable state (arrays and scalars; ``memory`` is a :class:`~.pairs.PairStore` with the
    Grams, updated in place: a step consumes the state it is given, docs/optimizers.md).

    v, s: momentum and the last step; delta: radius δ; rho_hat, T: averaged ratio of Alg. 5;
    zeta: current ζ (set to 0 when n_b reaches N); n_b: current batch size; f_K: last progress
    value f̂_K (inf before the first check); R_sum: Σ R_j since that check; k: iteration;
    restarts: L-SR1 restarts so far (Alg. 4 line 12 and Alg. 3); converged: ExitCheck said stop.
    """

    memory: PairStore
    v: Any
    s: Any
    delta: float
    rho_hat: float = 0.0
    T: float = 0.0
    zeta: float = 1.0
    n_b: int = 128
    f_K: float = math.inf
    R_sum: float = 0.0
    k: int = 0
    restarts: int = 0
    converged: bool = False

    def __post_init__(self) -> None:
        self.memory = PairStore.coerce(self.memory)


@register("mb-lsr1")
class MBLSR1(Optimizer):
    """MB-LSR1 ([MB] Algorithm 1). Defaults (source):

    memory m = 16, batch n_b = 128, δ₀ = 10⁻⁴ ([MB] Table 2: smallest m, batch of the grid,
    largest δ₀); ζ = 1 ([MB] §4 "we found good performance by simply setting ζ = 1");
    progress sample min(1.1n_b, 5000) ([MB] Alg. 6); radius thresholds 0.1 / 0.5 / ×2 ([MB] Alg. 5);
    μ = 0.9 ([MB] Table 2 momentum grid, footnote 3). Not given in the paper (our choices):
    m̂ = 0 (vanilla restart), τ = 0, K = 10, γ₁ = 0, γ₂ = 0.1 (Theorem 4.1 needs
    0 ≤ γ₁, γ₂ ≤ 1, γ₁ + γ₂ > 0), η = 0.1, α_s = 1, ξ = 10⁻⁸, ε = 10⁻⁵, c₁ = 10⁻⁴ and
    backtracking by ½ ([NW06] Alg. 3.1), B₀ = γI with γ = 1 ("initial matrix being I", Alg. 4),
    SR1 skip r = 10⁻⁸ ([NW06] 6.26), warm start: option II, r = 0.01, ε = 10⁻³ ([SQN] code).

    Pairs live in the state's :class:`~.pairs.PairStore`, updated in place (no copies per step).
    ``gram_cache=True`` is L-SR1-TR's O(mn) route end to end: SᵀY, SᵀS, YᵀY bordered incrementally
    (O(mn) per stored pair), M⁻¹ and the pruning test from them (O(m³)), and the subproblem solved
    from ΨᵀΨ and Ψ products (:func:`~.trust_region.solve_compact_subproblem`; the QR route when
    λ_min/λ_max(ΨᵀΨ) < ``gram_rcond``, ``extra["gram_fallback"]``). Off by default: the bordered
    Grams differ from fresh products by a few ulps, which moves a 20-step run by ≈ 5·10⁻¹²
    relative (more than the reference trajectories' 10⁻¹²); measured per-step times of both
    routes: docs/mb_lsr1.md.
    """

    family: ClassVar[str] = "trust-region"
    paper: ClassVar[str] = "Griffin, Jahani, Takáč, Yektamaram & Zhou, MB-LSR1, Algorithms 1–6"
    _full_progress: ClassVar[bool] = False

    def __init__(self, memory: int = 16, batch_size: int = 128, delta0: float = 1e-4, restart_memory: int = 0,
                 tau: float = 0.0, K: int = 10, gamma1: float = 0.0, gamma2: float = 0.1, zeta: float = 1.0,
                 mu: float = 0.9, alpha_s: float = 1.0, eta: float = 0.1, xi: float = 1e-8, eps: float = 1e-5,
                 c1: float = 1e-4, shrink: float = 0.5, max_evals: int = 30, gamma: float = 1.0,
                 sr1_r: float = 1e-8, progress_factor: float = 1.1, progress_cap: int = 5000,
                 radius_low: float = 0.1, radius_high: float = 0.5, radius_increase: float = 2.0,
                 delta_min: float = 1e-12, rho_floor: float = -1.0, warm_option: str = "II",
                 warm_radius: float = 0.01, warm_eps: float = 1e-3, gram_cache: bool = False,
                 gram_rcond: float = 1e-6):
        self.memory = check_int("memory", memory)
        self.gram_cache = check_bool("gram_cache", gram_cache)
        set_checked(self, gram_rcond=(gram_rcond, "[0, 1)"), batch_size=(batch_size, "int"), delta0=(delta0, "> 0"))
        rm = check_int("restart_memory", restart_memory, -1)
        if not (rm == -1 or 0 <= rm <= self.memory):
            raise ValueError(f"restart_memory (m̂) must be -1 (off), 0 (restart) or 1…memory (warm start), got {restart_memory!r}")
        self.restart_memory = rm
        set_checked(self, tau=(tau, "finite"), K=(K, "int"), gamma1=(gamma1, "[0, 1]"), gamma2=(gamma2, "[0, 1]"),
                    zeta=(zeta, "[0, 1]"), mu=(mu, "[0, 1)"), alpha_s=(alpha_s, "[0, 1]"), eta=(eta, "[0, 1]"),
                    xi=(xi, "≥ 0"), eps=(eps, "≥ 0"), c1=(c1, "(0, 1)"), shrink=(shrink, "(0, 1)"),
                    max_evals=(max_evals, "int"), gamma=(gamma, "> 0"), sr1_r=(sr1_r, "(0, 1)"),
                    progress_factor=(progress_factor, "[1, inf]"), progress_cap=(progress_cap, "int"),
                    radius_low=(radius_low, "finite"))
        self.radius_high = check_range("radius_high (≥ radius_low)", radius_high, self.radius_low, math.inf)
        set_checked(self, radius_increase=(radius_increase, "> 1"), delta_min=(delta_min, "> 0"))
        if self.delta_min > self.delta0:
            raise ValueError(f"delta_min={delta_min} exceeds delta0={delta0}")
        set_checked(self, rho_floor=(rho_floor, "finite"), warm_option=(warm_option, OPTIONS),
                    warm_radius=(warm_radius, "> 0"), warm_eps=(warm_eps, "≥ 0"))

    # -- state ------------------------------------------------------------------------------
    def init(self, theta: Any) -> MBLSR1State:
        xp = backend.namespace(theta)
        return MBLSR1State(memory=PairStore.empty(theta, self.memory, grams=self.gram_cache), v=xp.zeros_like(theta),
                           s=xp.zeros_like(theta), delta=self.delta0, zeta=self.zeta, n_b=self.batch_size)

    cost_formula: ClassVar[str] = ("(7m² + 9m + 23 + t)n + O(m³); gram_cache=True: (18m + 22 + t)n + O(m³) "
                                   "with the memory full")

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """One generic iteration (no restart, no hybrid clipping beyond the norms, no Gram fallback):
        ‖ĝ‖, the compact form, the subproblem, the hybrid direction (8n) and its checks (2n), θ + αp
        per trial, s and θ + s (2n), B s, the SR1 test (3n), pruning. QR route (``gram_cache=False``):
        Grams and Ψ re-formed, the QR solver (the store reuses the step's B). Gram route: M from the kept
        Grams, the Gram solver, B s by Ψ products (Ψ not formed), the Gram border (4k'n + 3n,
        k' = k, or m − 1 with the memory full) and the pruning test on the Grams."""
        n, m = shapes.n, self.memory
        k = assume.pairs_or(m)
        k1 = min(k + 1, m)
        t = {"grad_norm": n, "compact_form": LSR1Operator.build_flops(n, k, grams=self.gram_cache)}
        if self.gram_cache:
            t.update(lsr1_subproblem_gram_flops(n, k))
        else:
            t["tr_subproblem"] = lsr1_subproblem_flops(n, k)
        # B s: Ψ formed by the QR route; from the Grams two Ψ products (2kn + k each), M· and γs
        Bs = 2 * LSR1Operator.psi_flops(n, k) + k * k + n if self.gram_cache else LSR1Operator.matvec_flops(n, k)
        t.update({"hybrid_direction": 8 * n, "direction_checks": 2 * n, "line_search": assume.trials * n,
                  "step": 2 * n, "Bs": Bs, "sr1_test": 3 * n, "prune": lsr1_prune_flops(n, k1, grams=self.gram_cache)})
        if self.gram_cache:
            t["gram_update"] = 4 * (k if k < m else m - 1) * n + 3 * n
        return t

    @property
    def rule(self) -> AveragedRadiusRule:
        return AveragedRadiusRule(low=self.radius_low, high=self.radius_high, increase=self.radius_increase,
                                  delta_min=self.delta_min)

    # -- pieces -------------------------------------------------------------------------------
    def _compact(self, pairs: PairStore) -> LSR1Operator | None:
        return LSR1Operator.from_store(pairs, self.gamma) if pairs.count else None

    def _tr_step(self, g: Any, B: LSR1Operator | None, delta: float):
        """(p*, Gram fallback) of the L-SR1 trust-region subproblem with the latest pairs (Alg. 4 line 3)."""
        return solve_compact_subproblem(g, self.gamma, B, delta, gram=self.gram_cache, gram_rcond=self.gram_rcond)

    def _prune(self, pairs: PairStore) -> None:
        lsr1_prune(pairs, self.gamma)

    def _store(self, pairs: PairStore, B: LSR1Operator | None, s: Any, y: Any) -> int:
        """Classic update (Alg. 3 lines 10–12) with the SR1 skip rule; returns 1 if skipped."""
        Bs = self.gamma * s if B is None else B.matvec(s)
        if sr1_skip(s, y, Bs, self.sr1_r):
            return 1
        pairs.append(s, y)
        self._prune(pairs)
        return 0

    def _warm_start(self, pairs: PairStore, point: Point, problem: Problem) -> int:
        """Alg. 3 lines 3–5: replace the pairs by m̂ pairs sampled around w ([SQN] Alg. 1)."""
        sampled = sample_curvature_pairs(point, problem.device_rng, self.restart_memory, self.warm_radius,
                                         option=self.warm_option, kind="lsr1", eps=self.warm_eps,
                                         gamma=self.gamma)
        pairs.clear()
        for i in range(sampled.kept):
            pairs.append(sampled.S[i], sampled.Y[i])
        self._prune(pairs)
        return sampled.evals

    def update_sy(self, pairs: PairStore, s: Any, y: Any | None, rho: float, point: Point | None,
                  problem: Problem, B: LSR1Operator | None = None) -> tuple[str, int, int]:
        """Algorithm 3. Returns (action, skipped, extra forward passes); ``B``: the compact matrix of
        the pairs as they are now when the caller has it (built here otherwise).

        action: "restart" (m̂ = 0), "warm" (m̂ > 0), "push", "skip" (SR1 rule or no usable pair).
        """
        if rho < self.tau and self.restart_memory >= 0:
            if self.restart_memory == 0 or point is None:
                pairs.clear()
                return "restart", 0, 0
            return "warm", 0, self._warm_start(pairs, point, problem)
        if y is None:
            return "skip", 1, 0
        if B is None:
            B = self._compact(pairs)
        skipped = self._store(pairs, B, s, y)
        return ("skip" if skipped else "push"), skipped, 0

    # -- one iteration ------------------------------------------------------------------------
    def _get_step(self, g: Any, g_norm: float, pairs: PairStore, state: MBLSR1State):
        """getStep (Alg. 4 lines 3–16) up to the line search: (p*, p, v, gᵀp, B, restarts, fallback,
        Gram fallback)."""
        delta = state.delta
        restarts = 0
        fallback = False
        while True:
            B = self._compact(pairs)
            sol, gram_fallback = self._tr_step(g, B, delta)
            p, v = hybrid_direction(sol.p, g, state.v, state.s, delta, eta=self.eta, mu=self.mu,
                                    alpha_s=self.alpha_s)
            gp = float(p @ g)
            p_norm = math.sqrt(float(p @ p))
            if not restart_test(gp, p_norm, g_norm, self.xi):
                break
            if restarts == 0 and pairs.count:
                pairs.clear()  # "restart LSR1 with initial matrix being I", then getStep again
                restarts += 1
                continue
            if restarts == 0:
                restarts += 1  # nothing to clear: restarting would give the same p
            if g_norm > 0.0:  # safeguard: steepest descent within the radius
                p = g * (-min(1.0, delta / g_norm))
                gp, fallback = float(p @ g), True
            break
        return sol, p, v, gp, B, restarts, fallback, gram_fallback

    def _progress(self, state: MBLSR1State, problem: Problem, theta_new: Any, n_b: int, R_sum: float):
        """getBatch (Alg. 6): (f̂_K, ζ, n_b next, R_sum, doubled, f̂ checked, progress, evals)."""
        f_K, zeta, n_next = state.f_K, state.zeta, n_b
        if state.k % self.K != 0:
            return f_K, zeta, n_next, R_sum, False, math.nan, False, 0
        N = problem.n_samples
        size = progress_sample_size(n_b, N, factor=self.progress_factor, cap=self.progress_cap,
                                    full=self._full_progress)
        f_check = evaluate(problem.sample(size), theta_new)[1]
        n_next, zeta, doubled = batch_rule(n_b, N, f_check, f_K, R_sum, self.gamma1, self.gamma2, zeta)
        f_K = f_check if math.isfinite(f_check) else math.inf
        return f_K, zeta, n_next, 0.0, doubled, f_check, True, 1

    def step(self, theta: Any, state: MBLSR1State, problem: Problem) -> tuple[Any, MBLSR1State, StepInfo]:
        N = problem.n_samples
        n_b = capped_size(self, N, state.n_b, "batch_size")
        if state.converged:
            return theta, state, StepInfo(accepted=False, batch_size=0, radius=state.delta,
                                          extra={"converged": True})
        o = open_step(problem, n_b, theta, tol=None)
        if o.stop is not None:
            return theta, state, dataclasses.replace(o.stop, radius=state.delta)
        obj, p0, g, f0 = o.obj, o.point, o.g, o.f0
        g_norm = math.sqrt(float(g @ g))
        pairs = state.memory
        delta = state.delta

        # ---- getStep (Alg. 4) ----
        sol, p, v, gp, B, restarts, fallback, gram_fallback = self._get_step(g, g_norm, pairs, state)
        ls = line_search(obj, theta, p, f0, gp, rule="armijo", alpha0=1.0, c1=self.c1, shrink=self.shrink,
                         max_evals=self.max_evals)
        evals = 1 + ls.evals
        y = None
        if ls.success:
            s = ls.alpha * p
            if backend.all_finite(ls.point.grad):
                y = ls.point.grad - g
            theta_new = ls.theta
        else:
            s = backend.namespace(theta).zeros_like(theta)
            theta_new = theta
        f_new = ls.value
        s_norm = math.sqrt(float(s @ s))

        # R = f̂(w + p*) − f̂(w) and ρ = R / Q(p*)  (Alg. 4 lines 17–18)
        if ls.success and ls.alpha == 1.0 and not fallback and bool((p == sol.p).all()):
            f_star = f_new
        else:
            f_star = evaluate(obj, theta + sol.p)[1]
            evals += 1
        R = f_star - f0

        # ---- ExitCheck (Alg. 2) ----
        converged = False
        if g_norm <= self.eps:
            pf = try_point(problem.full(), theta_new)
            evals += 1
            if pf is not None and math.sqrt(float(pf.grad @ pf.grad)) <= self.eps:
                converged = True

        # ---- getRadius (Alg. 5): ρ = ared/pred (−inf → floor), averaged ----
        dec = trust_region_update(self.rule, delta, -R, sol.pred, s_norm, rho_floor=self.rho_floor,
                                  average=(state.zeta, state.rho_hat, state.T))

        # ---- updateSY (Alg. 3) ----
        sy_point = ls.point if ls.point is not None else p0
        action, skipped, warm_evals = self.update_sy(pairs, s, y, dec.rho, sy_point, problem, B)
        evals += warm_evals
        if action in ("restart", "warm"):
            restarts += 1

        # ---- getBatch (Alg. 6) ----
        R_sum = state.R_sum + (R if math.isfinite(R) else 0.0)
        f_K, zeta, n_next, R_sum, doubled, f_check, progress, p_evals = self._progress(state, problem, theta_new,
                                                                                        n_b, R_sum)
        evals += p_evals

        new_state = MBLSR1State(memory=pairs, v=v, s=s, delta=dec.delta, rho_hat=dec.rho_hat, T=dec.T,
                                zeta=zeta, n_b=n_next, f_K=f_K, R_sum=R_sum, k=state.k + 1,
                                restarts=state.restarts + restarts, converged=converged)
        info = StepInfo(loss=f_new, loss_start=f0, accepted=bool(ls.success), step_norm=s_norm, radius=dec.delta,
                        step_size=ls.alpha, skipped=skipped, evals=evals, batch_size=n_b, nonfinite=ls.nonfinite,
                        extra={"rho": dec.rho, "rho_hat": dec.rho_hat, "R": R, "pred": sol.pred, "sigma": sol.sigma,
                               "pairs": pairs.count, "restarts": restarts, "sy_action": action,
                               "fallback_gradient": fallback, "progress_check": progress,
                               "progress_value": f_check, "batch_doubled": doubled, "n_b_next": n_next,
                               "converged": converged, "ls_message": ls.message,
                               **({"gram_fallback": int(gram_fallback)} if self.gram_cache else {})})
        return theta_new, new_state, info


@register("lssr1-tr")
class LSSR1TR(MBLSR1):
    """L-SSR1-TR (Erway, Griffin, Marcia & Omheni 2019) as MB-LSR1's special case ([MB] §3):
    m̂ = −1 (no restart/warm start in updateSY), γ₂ = η = ζ = 0 and the progress check on all N
    examples. These are fixed; the other hyperparameters are MB-LSR1's, except γ₁ = 10⁻³ (with
    γ₂ = 0 Theorem 4.1 needs γ₁ > 0; the value is our choice)."""

    paper: ClassVar[str] = "Griffin et al. MB-LSR1 §3 (special case); Erway et al. 2019"
    cost_formula: ClassVar[str] = "as mb-lsr1"
    _full_progress: ClassVar[bool] = True

    def __init__(self, memory: int = 16, batch_size: int = 128, delta0: float = 1e-4, K: int = 10,
                 gamma1: float = 1e-3, mu: float = 0.9, xi: float = 1e-8, eps: float = 1e-5, c1: float = 1e-4,
                 shrink: float = 0.5, max_evals: int = 30, gamma: float = 1.0, sr1_r: float = 1e-8,
                 radius_low: float = 0.1, radius_high: float = 0.5, radius_increase: float = 2.0,
                 delta_min: float = 1e-12, rho_floor: float = -1.0, gram_cache: bool = False,
                 gram_rcond: float = 1e-6):
        super().__init__(memory=memory, batch_size=batch_size, delta0=delta0, restart_memory=-1, K=K,
                         gamma1=gamma1, gamma2=0.0, zeta=0.0, mu=mu, alpha_s=1.0, eta=0.0, xi=xi, eps=eps,
                         c1=c1, shrink=shrink, max_evals=max_evals, gamma=gamma, sr1_r=sr1_r,
                         radius_low=radius_low, radius_high=radius_high, radius_increase=radius_increase,
                         delta_min=delta_min, rho_floor=rho_floor, gram_cache=gram_cache, gram_rcond=gram_rcond)
