"""L-SR1 with a trust region (Algorithm 1) and with a line search (Algorithm 2) of
Ramamurthy & Duffy, "L-SR1: a second order optimization method for deep learning" [RD16].

Both keep the limited-memory SR1 matrix in compact form (Byrd, Nocedal & Schnabel 1994):
B = γI + Ψ M Ψᵀ with Ψ = Y − γS, M = (D + L + Lᵀ − γSᵀS)⁻¹ (:class:`~.compact.LSR1Compact`).
Every step works on one minibatch: f, ∇f at θ and at the trial point are evaluated on the same
batch, so y = ∇f_B(θ + s) − ∇f_B(θ) is a consistent curvature pair.

Deviation from the printed pseudocode, on purpose: the paper writes M⁻¹ = SᵀY − SᵀB₀S, which is
the compact SR1 middle matrix only when SᵀY is symmetric (exact pairs of a quadratic). We use the
symmetric D + L + Lᵀ − γSᵀS of Byrd et al. (1994, Thm 5.1), which the paper cites as its source.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import backend
from .base import Optimizer, Problem, StepInfo, check_int, check_positive, check_range, try_point
from .compact import (GramCache, LSR1Compact, PairMemory, lsr1_prune_count,
                      lsr1_prune_count_from_grams, sr1_skip)
from .linesearch import backtracking_armijo
from .registry import register
from .trust_region import (RadiusRule, reduction_ratio, solve_lsr1_subproblem,
                           solve_lsr1_subproblem_gram, steihaug_cg)
from ._qn_common import LineFunction, memory_from_state, memory_to_state, open_step


def _rcond_psd(G: Any) -> float:
    """λ_min/λ_max of a symmetric PSD Gram matrix (negative rounding counts as 0)."""
    xp = backend.namespace(G)
    ev = backend.to_numpy(xp.linalg.eigvalsh(G))
    top = float(ev.max()) if ev.size else 0.0
    return max(float(ev.min()), 0.0) / top if top > 0.0 and math.isfinite(top) else 0.0


@dataclass
class LSR1State:
    """memory: S, Y buffers (m × n) and the pair count; delta: radius (NaN before the first
    step: Δ₀ = ‖∇f(x₀)‖ is set then); step_length: λ of the previous line-search step;
    grams: the cached k × k Grams SY, SS, YY of the stored pairs (``LSR1TrustRegion(
    gram_cache=True)``, the default; None with ``gram_cache=False``, and in checkpoints written
    without them, until a cached step rebuilds them once from the pairs)."""

    memory: dict
    delta: float = math.nan
    step_length: float = 1.0
    k: int = 0
    grams: dict | None = None


class _LSR1Base(Optimizer):
    family = "quasi-newton"
    paper = "Ramamurthy & Duffy (2016), appendix Algorithms 1–2"

    def __init__(self, memory: int, gamma: float, r: float, batch_size: int | None, tol: float):
        self.memory = check_int("memory", memory)
        g = float(gamma)
        if g == 0 or not math.isfinite(g):
            raise ValueError(f"gamma (B₀ = γI) must be finite and nonzero, got {gamma}")
        self.gamma = g
        self.r = check_range("r", r, 0.0, 1.0, lo_open=True, hi_open=True)
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size)
        self.tol = check_positive("tol", tol, allow_zero=True)

    def init(self, theta: Any) -> LSR1State:
        return LSR1State(memory_to_state(PairMemory.like(theta, self.memory)))

    def _compact(self, mem: PairMemory, inverse: bool = False) -> LSR1Compact | None:
        """The compact matrix of the stored pairs; the line-search variant only needs the
        inverse form, whose middle matrix N was checked when pruning (so M⁻¹ may be singular)."""
        return LSR1Compact(mem.S, mem.Y, self.gamma, check=not inverse) if mem.count else None

    def _store(self, mem: PairMemory, s: Any, y: Any, skip: bool, inverse: bool) -> int:
        """Append (s, y) unless the SR1 rule says skip, then drop the oldest pairs until the
        compact form is usable (Alg. 1 lines 26–39 / Alg. 2 lines 19–32). Returns 1 if skipped."""
        if skip:
            return 1
        mem.push(s, y)
        mem.remove_oldest(lsr1_prune_count(mem.S, mem.Y, self.gamma, inverse=inverse))
        return 0


@register("lsr1-tr")
class LSR1TrustRegion(_LSR1Base):
    """L-SR1 with a trust region, [RD16] Algorithm 1 (subproblem solved exactly, Brust et al. 2017).

    Defaults: memory m = 5, radius decrease 0.5 and increase 2.0 ([RD16] §4.2, "default
    settings"), u = 0.75, ρ-fraction 0.8, l = 0.1 (Alg. 1 lines 18–25), η = 10⁻⁴ ∈ (0, 10⁻³)
    (line 13), Δ₀ = ‖∇f(x₀)‖ (Require line), B₀ = γI with γ = 1 ("typically γI"), SR1 skip
    threshold r = 10⁻⁸ (Nocedal & Wright eq. 6.26), minibatch 128 ([RD16] §4.2).

    Steps: s = argmin gᵀs + ½sᵀBs s.t. ‖s‖ ≤ Δ (with no pairs, B = B₀: s = −g/γ cut to the
    radius, which is the paper's s = −∇f when γ = 1 and ‖∇f‖ ≤ Δ); pred = −(gᵀs + ½sᵀBs);
    ared = f(x) − f(x + s); accept iff ared/pred > η; pairs are stored whether or not the step
    was accepted (line 12). ``solver="steihaug"`` uses truncated CG on B instead of the exact
    solver. A trial point with NaN/Inf loss or gradient counts as ρ = −∞: rejected, radius halved.

    ``gram_cache=True`` (the default) keeps SᵀY, SᵀS, YᵀY in the state, bordered in O(kn) when
    a pair is stored and sliced when old pairs are dropped (:class:`~.compact.GramCache`); the
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
                 gram_rcond: float = 1e-6):
        super().__init__(memory, gamma, r, batch_size, tol)
        self.gram_cache = bool(gram_cache)
        self.gram_rcond = check_range("gram_rcond", gram_rcond, 0.0, 1.0, hi_open=True)
        self._gram_fallbacks = 0
        check_range("eta", eta, 0.0, 1.0, hi_open=True)
        check_range("l", l, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("u", u, l, 1.0, lo_open=True, hi_open=True)
        check_range("rho_fraction", rho_fraction, 0.0, 1.0, lo_open=True)
        if not increase > 1:
            raise ValueError(f"increase must be > 1, got {increase}")
        check_range("decrease", decrease, 0.0, 1.0, lo_open=True, hi_open=True)
        if delta0 is not None:
            check_positive("delta0", delta0)
        if solver not in ("exact", "steihaug"):
            raise ValueError(f"solver must be 'exact' or 'steihaug', got {solver!r}")
        self.eta, self.u, self.rho_fraction, self.l = eta, u, rho_fraction, l
        self.increase, self.decrease, self.delta0, self.solver = increase, decrease, delta0, solver
        self._rule = RadiusRule(eta=eta, u=u, l=l, boundary_fraction=rho_fraction, increase=increase, decrease=decrease)

    def _solve(self, g: Any, B: LSR1Compact | None, delta: float) -> tuple[Any, float]:
        xp = backend.namespace(g)
        if self.solver == "steihaug":
            bv = (lambda v: B.matvec(v)) if B is not None else (lambda v: self.gamma * v)
            res = steihaug_cg(g, bv, delta)
            s = res.p
            return s, -float(g @ s + 0.5 * (s @ bv(s)))
        if B is None:
            empty = xp.zeros((g.shape[0], 0), dtype=g.dtype)
            sol = solve_lsr1_subproblem(g, self.gamma, empty, xp.zeros((0, 0), dtype=g.dtype), delta)
        else:
            sol = solve_lsr1_subproblem(g, self.gamma, B.Psi, B.M, delta)
        return sol.p, sol.pred

    def init(self, theta: Any) -> LSR1State:
        state = super().init(theta)
        if self.gram_cache:
            state.grams = GramCache.empty_like(theta).state()
        return state

    def _grams(self, state: LSR1State, mem: PairMemory) -> GramCache:
        """The state's Gram cache; rebuilt from the pairs (O(k²n), once) when absent or stale."""
        if state.grams is not None:
            gc = GramCache.from_state(state.grams)
            if gc.count == mem.count:
                return gc
        return GramCache.from_pairs(mem.S, mem.Y)

    def _solve_cached(self, g: Any, B: LSR1Compact | None, delta: float) -> tuple[Any, float, Any]:
        if self.solver == "steihaug" and B is not None:
            _ = B.Psi  # form Ψ = Y − γS once (kn): a CG product B·d then costs (2k + 1)n, not 4kn + n
        if self.solver == "steihaug" or B is None:
            s, pred = self._solve(g, B, delta)
            return s, pred, None
        PtP = B.psi_gram()
        if _rcond_psd(PtP) < self.gram_rcond:
            # ΨᵀΨ squares κ(Ψ): with κ(Ψ)² > 1/gram_rcond the Gram route would lose more than
            # ε/gram_rcond of relative accuracy, so this step takes the QR route (O(m²n)).
            self._gram_fallbacks += 1
            s, pred = self._solve(g, B, delta)
            return s, pred, None
        sol = solve_lsr1_subproblem_gram(g, self.gamma, B.psi_t, B.psi, PtP, B.M, delta)
        return sol.p, sol.pred, sol.Bp

    def _step_cached(self, theta: Any, state: LSR1State, obj: Any, g: Any, f0: float):
        """One step with the Gram cache: O(mn) + O(m³) (see the class docstring)."""
        mem = memory_from_state(state.memory)
        gc = self._grams(state, mem)
        B = (LSR1Compact.from_grams(mem.S, mem.Y, self.gamma, gc.SY, gc.SS, gc.YY)
             if mem.count else None)
        s, pred, Bs = self._solve_cached(g, B, state.delta)
        snorm = math.sqrt(float(s @ s))
        p1 = try_point(obj, theta + s)
        nonfinite = p1 is None or not backend.all_finite(p1.grad)
        skipped = 0
        if not nonfinite:
            y = p1.grad - g
            if Bs is None:
                Bs = B.matvec(s) if B is not None else self.gamma * s
            skipped = int(sr1_skip(s, y, Bs, self.r))
            if not skipped:
                if mem.count == mem.capacity:  # PairMemory.push drops the oldest pair
                    mem.remove_oldest(1)
                    gc.drop(1)
                gc.push(mem.S, mem.Y, s, y)
                mem.push(s, y)
                d = lsr1_prune_count_from_grams(gc.SY, gc.SS, gc.YY, self.gamma)
                mem.remove_oldest(d)
                gc.drop(d)
        state.grams = gc.state()
        return s, pred, snorm, p1, nonfinite, skipped, mem

    def step(self, theta: Any, state: LSR1State, problem: Problem) -> tuple[Any, LSR1State, StepInfo]:
        obj, p0, done = open_step(problem, self.batch_size, theta, state, self.tol)
        if done:
            return done
        g, f0 = p0.grad, p0.value
        if math.isnan(state.delta):  # Δ₀ = ‖∇f(x₀)‖ (Alg. 1, Require)
            state.delta = self.delta0 if self.delta0 is not None else math.sqrt(float(g @ g))
        if self.gram_cache:
            before = self._gram_fallbacks
            s, pred, snorm, p1, nonfinite, skipped, mem = self._step_cached(theta, state, obj, g, f0)
            out = self._close(theta, state, obj, s, pred, snorm, p1, nonfinite, skipped, mem, f0)
            out[2].extra["gram_fallback"] = self._gram_fallbacks - before
            return out
        mem = memory_from_state(state.memory)
        B = self._compact(mem)
        s, pred = self._solve(g, B, state.delta)
        snorm = math.sqrt(float(s @ s))
        p1 = try_point(obj, theta + s)
        nonfinite = p1 is None or not backend.all_finite(p1.grad)
        skipped = 0
        if not nonfinite:
            y = p1.grad - g
            Bs = B.matvec(s) if B is not None else self.gamma * s
            skipped = self._store(mem, s, y, sr1_skip(s, y, Bs, self.r), inverse=False)
        state.grams = None  # pairs changed without the cache: a cached step would rebuild it
        return self._close(theta, state, obj, s, pred, snorm, p1, nonfinite, skipped, mem, f0)

    def _close(self, theta, state, obj, s, pred, snorm, p1, nonfinite, skipped, mem, f0):
        trial = theta + s
        ared = -math.inf if nonfinite else f0 - p1.value
        rho = reduction_ratio(ared, pred)
        accepted = self._rule.accept(rho)
        delta_old = state.delta
        state.delta = self._rule.update(state.delta, rho, snorm)
        state.memory = memory_to_state(mem)
        state.k += 1
        new = trial if accepted else theta
        loss = p1.value if accepted else f0
        return new, state, StepInfo(loss=loss, loss_start=f0, accepted=accepted, step_norm=snorm if accepted else 0.0,
                                    radius=state.delta, skipped=skipped, evals=2, nonfinite=nonfinite,
                                    batch_size=obj.n_samples,
                                    extra={"rho": rho, "pred": pred, "ared": ared, "delta_used": delta_old, "trial_norm": snorm,
                                           "pairs": mem.count})


@register("lsr1-ls")
class LSR1LineSearch(_LSR1Base):
    """L-SR1 with a backtracking line search, [RD16] Algorithm 2.

    d = −H∇f with the inverse compact form H = H₀ + (S − H₀Y) N⁻¹ (S − H₀Y)ᵀ, H₀ = (1/γ)I
    (γ = 1: the paper's H₀ = I); first trial step λ₀ = min{1, 2λₖ₋₁} (line 10); pairs kept when
    |yᵀ(s − Hy)| ≥ r‖y‖‖s − Hy‖ (line 19). Safeguard not in the paper: SR1's H may be indefinite,
    so when d is not a descent direction the step falls back to d = −∇f/γ (counted in
    ``extra["fallback"]``). The line search is Armijo backtracking (c₁ = 10⁻⁴, halving), one of
    the Dennis & Schnabel methods the paper tested.
    """

    def __init__(self, memory: int = 5, gamma: float = 1.0, r: float = 1e-8, batch_size: int | None = 128,
                 c1: float = 1e-4, shrink: float = 0.5, max_evals: int = 30, tol: float = 0.0):
        super().__init__(memory, gamma, r, batch_size, tol)
        self.c1 = check_range("c1", c1, 0.0, 1.0, lo_open=True, hi_open=True)
        self.shrink = check_range("shrink", shrink, 0.0, 1.0, lo_open=True, hi_open=True)
        self.max_evals = check_int("max_evals", max_evals)

    def step(self, theta: Any, state: LSR1State, problem: Problem) -> tuple[Any, LSR1State, StepInfo]:
        obj, p0, done = open_step(problem, self.batch_size, theta, state, self.tol)
        if done:
            return done
        g, f0 = p0.grad, p0.value
        mem = memory_from_state(state.memory)
        H = self._compact(mem, inverse=True)
        d = -H.solve(g) if H is not None else -g / self.gamma
        slope = float(g @ d)
        fallback = not (slope < 0 and math.isfinite(slope))
        if fallback:
            d = -g / self.gamma
            slope = float(g @ d)
        lam0 = 1.0 if state.k == 0 else min(1.0, 2.0 * state.step_length)
        line = LineFunction(obj, theta, d)
        ls = backtracking_armijo(line.phi, f0, slope, alpha0=lam0, c1=self.c1, shrink=self.shrink, max_evals=self.max_evals)
        state.k += 1
        nonfinite = line.nonfinite
        if not ls.success:
            state.memory = memory_to_state(mem)
            return theta, state, StepInfo(loss=f0, loss_start=f0, accepted=False, step_size=0.0, evals=1 + ls.n_evals,
                                          nonfinite=nonfinite, batch_size=obj.n_samples,
                                          extra={"fallback": fallback, "pairs": mem.count, "message": ls.message})
        state.step_length = ls.alpha
        s = ls.alpha * d
        p1 = line.point(ls.alpha)
        skipped = 0
        if backend.all_finite(p1.grad):
            y = p1.grad - g
            Hy = H.solve(y) if H is not None else y / self.gamma
            # self-dual SR1 rule on the inverse: |yᵀ(s − Hy)| ≥ r‖y‖‖s − Hy‖
            skipped = self._store(mem, s, y, sr1_skip(y, s, Hy, self.r), inverse=True)
        else:
            nonfinite, skipped = True, 1
        state.memory = memory_to_state(mem)
        return theta + s, state, StepInfo(loss=p1.value, loss_start=f0, accepted=True, step_norm=math.sqrt(float(s @ s)),
                                          step_size=ls.alpha, skipped=skipped, evals=1 + ls.n_evals, nonfinite=nonfinite,
                                          batch_size=obj.n_samples, extra={"fallback": fallback, "pairs": mem.count})
