"""L-SR1 with a trust region (Algorithm 1) and with a line search (Algorithm 2) of
Ramamurthy & Duffy, "L-SR1: a second order optimization method for deep learning" [RD16].

Both keep the limited-memory SR1 matrix in compact form (Byrd, Nocedal & Schnabel 1994):
B = γI + Ψ M Ψᵀ with Ψ = Y − γS, M = (D + L + Lᵀ − γSᵀS)⁻¹ (:class:`~.operators.LSR1Operator`).
Every step works on one minibatch: f, ∇f at θ and at the trial point are evaluated on the same
batch, so y = ∇f_B(θ + s) − ∇f_B(θ) is a consistent curvature pair.

Deviation from the printed pseudocode, on purpose: the paper writes M⁻¹ = SᵀY − SᵀB₀S, which is
the compact SR1 middle matrix only when SᵀY is symmetric (exact pairs of a quadratic). We use the
symmetric D + L + Lᵀ − γSᵀS of Byrd et al. (1994, Thm 5.1), which the paper cites as its source.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .. import backend
from .base import Optimizer, Problem, StepInfo, check_bool, check_choice, check_int, check_positive, check_range, set_checked
from .costs import CostAssumptions, ModelShapes
from .drivers import close_step, finite_point, line_search, open_step, stay, trust_region_update
from .first_order import fixed_step_lr
from .operators import LSR1Operator, lsr1_prune, lsr1_prune_flops, sr1_skip
from .pairs import PairStore
from .registry import register
from .trust_region import (RadiusRule, lsr1_subproblem_flops, lsr1_subproblem_gram_flops, solve_compact_subproblem,
                           steihaug_cg)


@dataclass
class LSR1State:
    """memory: the :class:`~.pairs.PairStore` (S, Y rows; with the Grams SY, SS, YY for
    ``LSR1TrustRegion(gram_cache=True)``, the default); delta: radius (NaN before the first step:
    Δ₀ = ‖∇f(x₀)‖ is set then); step_length: λ of the previous line-search step; k: steps done;
    trial_norm, trial_nonfinite: ‖s‖ of the previous trust-region trial step and whether it was
    rejected as non-finite.
    A step consumes the state it is given (docs/optimizers.md, "State rule")."""

    memory: PairStore
    delta: float = math.nan
    step_length: float = 1.0
    k: int = 0
    #: ‖s‖ of the last trial step (Alg. 1 line 2's ‖s_k‖ > t test; ∞ before the first step)
    trial_norm: float = math.inf
    #: the last trial point had a NaN/Inf loss or gradient (no pair could be stored from it)
    trial_nonfinite: bool = False

    def __post_init__(self) -> None:
        self.memory = PairStore.coerce(self.memory)


class _LSR1Base(Optimizer):
    family = "quasi-newton"
    paper = "Ramamurthy & Duffy (2016), appendix Algorithms 1–2"
    _grams = False

    def __init__(self, memory: int, gamma: float, r: float, batch_size: int | None, tol: float):
        self.memory = check_int("memory", memory)
        self.gamma = check_positive("gamma (B₀ = γI, positive definite)", gamma)
        self.r = check_range("r", r, 0.0, 1.0, lo_open=True, hi_open=True)
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size)
        self.tol = check_positive("tol", tol, allow_zero=True)

    def init(self, theta: Any) -> LSR1State:
        return LSR1State(PairStore.empty(theta, self.memory, grams=self._grams))

    def _store(self, pairs: PairStore, s: Any, y: Any, skip: bool, inverse: bool) -> int:
        """Append (s, y) unless the SR1 rule says skip, then drop the oldest pairs until the
        compact form is usable (Alg. 1 lines 26–39 / Alg. 2 lines 19–32). Returns 1 if skipped."""
        if skip:
            return 1
        pairs.append(s, y)
        lsr1_prune(pairs, self.gamma, inverse=inverse)
        return 0


@register("lsr1-tr")
class LSR1TrustRegion(_LSR1Base):
    """L-SR1 with a trust region, [RD16] Algorithm 1 (subproblem solved exactly, Brust et al. 2017).

    Defaults: memory m = 5, radius decrease 0.5 and increase 2.0 ([RD16] §4.2, "default
    settings"), u = 0.75, ρ-fraction 0.8, l = 0.1 (Alg. 1 lines 18–25), η = 10⁻⁴ ∈ (0, 10⁻³)
    (line 13), Δ₀ = ‖∇f(x₀)‖ (Require line), B₀ = γI with γ = 1 ("typically γI"), SR1 skip
    threshold r = 10⁻⁸ (Nocedal & Wright eq. 6.26), minibatch 128 ([RD16] §4.2).

    Steps: s = argmin gᵀs + ½sᵀBs s.t. ‖s‖ ≤ Δ; with an empty memory (k = 0, or every pair
    pruned) s = −∇f and B = B₀ (Alg. 1 lines 3–5: no radius cut, whatever Δ and γ; safeguard:
    right after a non-finite trial, which stores no pair, −∇f is cut to the halved radius, else
    the same rejected step would repeat forever);
    pred = −(gᵀs + ½sᵀBs); ared = f(x) − f(x + s); accept iff ared/pred > η; the radius rule
    (lines 18–25) follows in every case; pairs are stored whether or not the step was accepted
    (line 12). ``solver="steihaug"`` uses truncated CG on B instead of the exact solver. A trial
    point with NaN/Inf loss or gradient counts as ρ = −∞: rejected, radius halved.

    Loop test (Alg. 1 line 2, "‖∇f(x_k)‖ > t and ‖s_k‖ > t"): ``tol`` is the gradient test
    (‖∇f‖ ≤ tol stops), ``step_tol`` the step test: once a trial step had ‖s‖ ≤ ``step_tol``
    the next steps do not move (``extra["converged"]``, ``extra["message"]``). Both default to
    0 (no stop before ∇f = 0 / s = 0); the paper's one t is ``tol = step_tol = t``.

    ``gram_cache=True`` (the default) keeps SᵀY, SᵀS, YᵀY in the state, bordered in O(kn) when
    a pair is stored and sliced when old pairs are dropped (:class:`~.pairs.PairStore`); the
    compact form, the pruning test and the exact solve (:func:`~.trust_region.
    solve_lsr1_subproblem_gram`, eigendecomposition of ΨᵀΨ, no QR of Ψ) then cost O(mn) + O(m³)
    per step, the paper's claim: (14m + 10)n + O(m³) multiplications with the memory full
    (:mod:`~.costs`). ΨᵀΨ squares κ(Ψ): a step with λ_min/λ_max(ΨᵀΨ) below ``gram_rcond``
    (10⁻⁶, κ(Ψ) > 10³) takes the QR route instead (``extra["gram_fallback"]`` = 1; ≈ 2m²n for
    the QR, still less than a ``gram_cache=False`` step), so cached and uncached steps agree to
    ≈ ε/gram_rcond ≈ 10⁻¹⁰ relative. Nearly dependent pairs (full-batch runs close to a
    minimizer) trigger it; minibatch training rarely does.

    ``gram_cache=False`` is the exact-QR reference route: Grams re-formed and a thin QR of Ψ every
    step, O(m²n): (7m² + 9m + 12)n + O(m³). Checkpoints of either setting load under the other
    (the Grams are rebuilt from the pairs, or dropped).
    """

    def __init__(self, memory: int = 5, gamma: float = 1.0, r: float = 1e-8, batch_size: int | None = 128,
                 eta: float = 1e-4, u: float = 0.75, rho_fraction: float = 0.8, l: float = 0.1,  # noqa: E741
                 increase: float = 2.0, decrease: float = 0.5, delta0: float | None = None,
                 solver: str = "exact", tol: float = 0.0, gram_cache: bool = True,
                 gram_rcond: float = 1e-6, step_tol: float = 0.0):
        super().__init__(memory, gamma, r, batch_size, tol)
        self.step_tol = check_positive("step_tol", step_tol, allow_zero=True)
        self.gram_cache = check_bool("gram_cache", gram_cache)
        self.gram_rcond = check_range("gram_rcond", gram_rcond, 0.0, 1.0, hi_open=True)
        check_range("rho_fraction", rho_fraction, 0.0, 1.0, lo_open=True)
        self._rule = RadiusRule(eta=eta, u=u, l=l, boundary_fraction=rho_fraction, increase=increase, decrease=decrease)
        if delta0 is not None:
            check_positive("delta0", delta0)
        self.eta, self.u, self.rho_fraction, self.l = eta, u, rho_fraction, l
        self.increase, self.decrease, self.delta0 = increase, decrease, delta0
        self.solver = check_choice("solver", solver, ("exact", "steihaug"))

    @property
    def _grams(self) -> bool:  # type: ignore[override]
        return self.gram_cache

    cost_formula = ("(14m + 10)n + O(m³) (default gram_cache=True; (14k + 14)n while k < m pairs); "
                    "gram_cache=False: (7m² + 9m + 12)n + O(m³)")

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """Generic step (no Gram fallback, no hard case, Ψ of full rank, the newest memory kept).

        ``gram_cache=True``: M from the kept Grams (O(k³)), the Gram solver
        (:func:`~.trust_region.lsr1_subproblem_gram_flops`; its Bp serves the SR1 test), ‖s‖ (n),
        the SR1 test (3n), the Gram border S s, Y s, S y, Y y (4k'n with k' = k, or m − 1 when the
        memory is full and the oldest pair is dropped first) and sᵀy, sᵀs, yᵀy (3n), the pruning
        test on the Grams, ‖g‖ (n): (14k + 14)n + O(k³) while k < m, (14m + 10)n + O(m³) with the
        memory full. ``gram_cache=False``: Grams re-formed, Ψ formed and a thin QR of it
        (:func:`~.trust_region.lsr1_subproblem_flops`), B s, pruning from the pairs.
        ``solver="steihaug"``: about 10 CG iterations of B·d (approximate) and B s by one more."""
        n, m = shapes.n, self.memory
        k = assume.pairs_or(m)
        k1 = min(k + 1, m)
        t = {"grad_norm": n, "compact_form": LSR1Operator.build_flops(n, k, grams=self.gram_cache)}
        if self.solver == "steihaug":
            if self.gram_cache and k:
                t["form_psi"] = k * n
            t.update({"tr_subproblem": 10 * (LSR1Operator.matvec_flops(n, k) + 6 * n),
                      "Bs": LSR1Operator.matvec_flops(n, k)})
        elif not self.gram_cache:
            t.update({"tr_subproblem": lsr1_subproblem_flops(n, k), "Bs": LSR1Operator.matvec_flops(n, k)})
        else:
            t.update(lsr1_subproblem_gram_flops(n, k))
        if not k:  # empty memory (Alg. 1 l.3–5): s = −g, B s = γs (n), pred = −(gᵀs + ½sᵀBs) (2n)
            t.update({"tr_subproblem": 2 * n, "Bs": n})
        t.update({"step_norm": n, "sr1_test": 3 * n,
                  "prune": lsr1_prune_flops(n, k1, grams=self.gram_cache)})
        if self.gram_cache:
            t["gram_update"] = 4 * (k if k < m else m - 1) * n + 3 * n
        return t

    def _solve(self, g: Any, B: LSR1Operator | None, delta: float) -> tuple[Any, float, Any, int]:
        """(s, pred, B s or None, Gram fallback 0/1) of the subproblem min gᵀs + ½sᵀBs, ‖s‖ ≤ Δ."""
        if self.solver == "steihaug":
            if B is not None:
                _ = B.Psi  # form Ψ = Y − γS once (kn): a CG product B·d then costs (2k + 1)n, not 4kn + n
            bv = B.matvec if B is not None else (lambda v: self.gamma * v)
            s = steihaug_cg(g, bv, delta).p
            return s, -float(g @ s + 0.5 * (s @ bv(s))), None, 0
        sol, fallback = solve_compact_subproblem(g, self.gamma, B, delta, gram=self.gram_cache,
                                                 gram_rcond=self.gram_rcond)
        # the Gram route's Bp serves the SR1 test; the QR route's B s is recomputed from B
        return sol.p, sol.pred, (sol.Bp if self.gram_cache and B is not None and not fallback else None), int(fallback)

    def step(self, theta: Any, state: LSR1State, problem: Problem) -> tuple[Any, LSR1State, StepInfo]:
        o = open_step(problem, self.batch_size, theta, tol=self.tol)
        if o.stop is not None:
            return theta, state, o.stop
        if self.step_tol > 0 and state.trial_norm <= self.step_tol:  # Alg. 1 line 2: ‖s_k‖ > t fails
            return theta, state, stay(o.obj, o.f0, converged=True,
                                      message=f"‖s‖ = {state.trial_norm:.3e} ≤ step_tol = {self.step_tol:.3e}")
        g, f0 = o.g, o.f0
        delta = state.delta
        if math.isnan(delta):  # Δ₀ = ‖∇f(x₀)‖ (Alg. 1, Require)
            delta = self.delta0 if self.delta0 is not None else math.sqrt(float(g @ g))
        pairs = state.memory
        if self.gram_cache:
            pairs.ensure_grams()  # once, for a checkpoint written with gram_cache=False
        else:
            pairs.drop_grams()
        if pairs.count:
            B = LSR1Operator.from_store(pairs, self.gamma)
            s, pred, Bs, fallback = self._solve(g, B, delta)
        else:  # Alg. 1 lines 3–5: empty memory, s = −∇f, B = B₀ (not the radius-cut B₀ step)
            B, fallback = None, 0
            s = -g
            if state.trial_nonfinite:
                # safeguard (not in the paper): a non-finite trial stores no pair, so with an empty
                # memory Alg. 1 would repeat the same rejected −∇f forever; cut it to the halved Δ
                gn = math.sqrt(float(g @ g))
                if gn > delta:
                    s = (delta / gn) * s
            Bs = self.gamma * s
            pred = -float(g @ s + 0.5 * (s @ Bs))
        snorm = math.sqrt(float(s @ s))
        theta1 = theta + s  # the trial θ, evaluated and (if accepted) returned: formed once
        p1, f1 = finite_point(o.obj, theta1)
        skipped = 0
        if p1 is not None:  # pairs are stored whether or not the step is accepted (Alg. 1 line 12)
            y = p1.grad - g
            if Bs is None:
                Bs = B.matvec(s) if B is not None else self.gamma * s
            skipped = self._store(pairs, s, y, sr1_skip(s, y, Bs, self.r), inverse=False)
        ared = -math.inf if p1 is None else f0 - f1
        dec = trust_region_update(self._rule, delta, ared, pred, snorm)
        extra = {"rho": dec.rho, "pred": pred, "ared": ared, "delta_used": delta, "trial_norm": snorm,
                 "pairs": pairs.count}
        if self.gram_cache:
            extra["gram_fallback"] = fallback
        info = close_step(o, loss=f1 if dec.accepted else f0, accepted=dec.accepted, evals=2,
                          step_norm=snorm if dec.accepted else 0.0, radius=dec.delta, skipped=skipped,
                          nonfinite=p1 is None, extra=extra)
        new_state = dataclasses.replace(state, delta=dec.delta, k=state.k + 1, trial_norm=snorm,
                                        trial_nonfinite=p1 is None)
        return (theta1 if dec.accepted else theta), new_state, info


@register("lsr1-ls")
class LSR1LineSearch(_LSR1Base):
    """L-SR1 with a backtracking line search, [RD16] Algorithm 2.

    d = −H∇f with the inverse compact form H = H₀ + (S − H₀Y) N⁻¹ (S − H₀Y)ᵀ, H₀ = (1/γ)I
    (γ = 1: the paper's H₀ = I); first trial step λ₀ = min{1, 2λₖ₋₁} (line 10); pairs kept when
    |yᵀ(s − Hy)| ≥ r‖y‖‖s − Hy‖ (line 19). Safeguard not in the paper: SR1's H may be indefinite,
    so when d is not a descent direction the step falls back to d = −∇f/γ (counted in
    ``extra["fallback"]``). The line search is Armijo backtracking (c₁ = 10⁻⁴, halving), one of
    the Dennis & Schnabel methods the paper tested.

    ``step_rule="fixed"`` with ``lr`` η replaces the search by s = η d (the fixed-rate SR1 of the
    second-order CNN comparison, [SOC] §4.4 / Fig. 12: "we replace the line search computations
    with well tuned fixed learning rate"; the text reports that it does not work — "larger step
    sizes usually cause model to explode", smaller ones stagnate). The step is taken whatever
    f does there; only a NaN/Inf loss or gradient at θ + s rejects it (θ stays, no pair stored).
    The pair (s, y = ∇f_B(θ + s) − ∇f_B(θ)) is kept by the same rule. ``lr`` is refused with the
    line search.
    """

    def __init__(self, memory: int = 5, gamma: float = 1.0, r: float = 1e-8, batch_size: int | None = 128,
                 c1: float = 1e-4, shrink: float = 0.5, max_evals: int = 30, tol: float = 0.0,
                 step_rule: str = "armijo", lr: float | None = None):
        super().__init__(memory, gamma, r, batch_size, tol)
        set_checked(self, c1=(c1, "(0, 1)"), shrink=(shrink, "(0, 1)"), max_evals=(max_evals, "int"),
                    step_rule=(step_rule, ("armijo", "fixed")))
        fixed_step_lr(self, lr)

    cost_formula = "(5m² + 5m + 11 + t)n + O(m³)"

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """‖g‖, the compact form from the pairs, the inverse middle N⁻¹, H g, gᵀd, θ + λd per trial
        (none with ``step_rule="fixed"``: s = ηd is the pair's n), the pair s = λd, H y, the SR1
        test (3n), pruning on the inverse form, ‖s‖."""
        n = shapes.n
        k = assume.pairs_or(self.memory)
        t = {"grad_norm": n, "compact_form": LSR1Operator.build_flops(n, k)}
        if k:
            t["inverse_middle"] = LSR1Operator.inverse_setup_flops(n, k)
        if self.step_rule != "fixed":
            t["line_search"] = assume.trials * n
        return {**t, "Hg": LSR1Operator.solve_flops(n, k), "slope": n, "pair": n,
                "Hy": LSR1Operator.solve_flops(n, k), "sr1_test": 3 * n,
                "prune": lsr1_prune_flops(n, min(k + 1, self.memory), inverse=True), "step_norm": n}

    def step(self, theta: Any, state: LSR1State, problem: Problem) -> tuple[Any, LSR1State, StepInfo]:
        o = open_step(problem, self.batch_size, theta, tol=self.tol)
        if o.stop is not None:
            return theta, state, o.stop
        g, f0 = o.g, o.f0
        pairs = state.memory
        # the inverse form only: its middle matrix N was checked when pruning (M⁻¹ may be singular)
        H = LSR1Operator.from_store(pairs, self.gamma, check=False) if pairs.count else None
        d = -H.solve(g) if H is not None else -g / self.gamma
        slope = float(g @ d)
        fallback = not (slope < 0 and math.isfinite(slope))
        if fallback:
            d = -g / self.gamma
            slope = float(g @ d)
        if self.step_rule == "fixed":
            s = self.lr * d
            theta1 = theta + s  # formed once: evaluated here, returned below
            p1, f1 = finite_point(o.obj, theta1)
            alpha, evals, nonfinite = self.lr, 1, p1 is None
            if p1 is None:
                info = close_step(o, loss=f0, accepted=False, evals=2, step_size=0.0, nonfinite=True,
                                  extra={"fallback": fallback, "pairs": pairs.count,
                                         "message": f"fixed step lr={self.lr}: non-finite loss or gradient at θ + s"})
                return theta, dataclasses.replace(state, k=state.k + 1), info
        else:
            lam0 = 1.0 if state.k == 0 else min(1.0, 2.0 * state.step_length)
            ls = line_search(o.obj, theta, d, f0, slope, rule="armijo", alpha0=lam0, c1=self.c1, shrink=self.shrink,
                             max_evals=self.max_evals)
            if not ls.success:
                info = close_step(o, loss=f0, accepted=False, evals=1 + ls.evals, step_size=0.0, nonfinite=ls.nonfinite,
                                  extra={"fallback": fallback, "pairs": pairs.count, "message": ls.message})
                return theta, dataclasses.replace(state, k=state.k + 1), info
            alpha, evals, nonfinite, p1, f1, theta1 = ls.alpha, ls.evals, ls.nonfinite, ls.point, ls.value, ls.theta
            s = alpha * d
        skipped = 0
        if backend.all_finite(p1.grad):
            y = p1.grad - g
            Hy = H.solve(y) if H is not None else y / self.gamma
            # self-dual SR1 rule on the inverse: |yᵀ(s − Hy)| ≥ r‖y‖‖s − Hy‖
            skipped = self._store(pairs, s, y, sr1_skip(y, s, Hy, self.r), inverse=True)
        else:
            nonfinite, skipped = True, 1
        info = close_step(o, loss=f1, accepted=True, evals=1 + evals, step_norm=math.sqrt(float(s @ s)),
                          step_size=alpha, skipped=skipped, nonfinite=nonfinite,
                          extra={"fallback": fallback, "pairs": pairs.count})
        return theta1, dataclasses.replace(state, step_length=alpha, k=state.k + 1), info


@register("soc-sr1")
class SOCSR1(LSR1LineSearch):
    """The "SR1" of the second-order CNN comparison ([SOC] §2.2, §3.3 L87, §3.4 L101): L-SR1 of
    Ramamurthy & Duffy "with ... Line Search" (§2.2) and the line search of eq. (2),

        f(w + ηp) − f(w) ≤ 0.1 η ∇f(w)ᵀp    (both sides on the current batch),

    i.e. :class:`LSR1LineSearch` ([RD16] Algorithm 2, the same code) with the text's settings:
    ``c1=0.1`` (eq. 2) and ``batch_size=100`` ("results are based on selecting batch size as
    100", §3.3). The text gives no memory, backtracking factor or first trial step: [RD16]'s
    m = 5 and λ₀ = min{1, 2λₖ₋₁} and halving (Nocedal & Wright Alg. 3.1) are kept. ``lsr1-ls``
    keeps [RD16]'s own settings (c₁ = 10⁻⁴, batch 128). ``step_rule="fixed"`` with ``lr`` is the
    fixed-rate SR1 of §4.4 / Fig. 12.
    """

    paper = ("SR1 of 'A comparison of second-order methods for deep convolutional neural networks' (§3.4 eq. 2): "
             "Ramamurthy & Duffy (2016) Algorithm 2")

    def __init__(self, memory: int = 5, gamma: float = 1.0, r: float = 1e-8, batch_size: int | None = 100,
                 c1: float = 0.1, shrink: float = 0.5, max_evals: int = 30, tol: float = 0.0,
                 step_rule: str = "armijo", lr: float | None = None):
        super().__init__(memory=memory, gamma=gamma, r=r, batch_size=batch_size, c1=c1, shrink=shrink,
                         max_evals=max_evals, tol=tol, step_rule=step_rule, lr=lr)
