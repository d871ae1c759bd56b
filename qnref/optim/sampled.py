"""Sampled quasi-Newton methods: S-LBFGS and S-LSR1 ("forget the past, just sample").

[SQN] A. S. Berahas, M. Jahani, M. Takáč, "Quasi-Newton methods for deep learning: forget the
past, just sample", arXiv:1901.09997 / OPT 2019 poster (Algorithms 1–3); reference code
OptMLGroup/SQN (``sampleSY.py``, ``S_LBFGS.py``, ``S_LSR1.py``, ``parameters.py``) [SQN-code].

Instead of the pairs (wₖ − wₖ₋₁, ∇fₖ − ∇fₖ₋₁) of classical L-BFGS / L-SR1, every iteration draws
m fresh pairs around the current iterate w (Algorithm 1)::

    sᵢ = r σᵢ,  σᵢ ~ N(0, I)                       (directions, i = 1 … m)
    option I :  yᵢ = ∇F(w + sᵢ) − ∇F(w)              (m gradient evaluations)
    option II:  yᵢ = ∇²F(w) sᵢ                       (m Hessian-vector products, point.hvp)

and keeps the pairs that pass the method's curvature-pair filter:

    S-LBFGS, eq. (1):  sᵢᵀyᵢ > ε ‖sᵢ‖²                (``lbfgs_test="ss"``, the poster/paper form)
                       sᵢᵀyᵢ > ε ‖sᵢ‖ ‖yᵢ‖            (``lbfgs_test="cosine"``, [SQN-code] sampleSY.py)
    S-LSR1,  eq. (2):  |sᵢᵀ(yᵢ − Bsᵢ)| ≥ ε ‖sᵢ‖ ‖yᵢ − Bsᵢ‖, B built from the pairs accepted so far
                       (sequential, as [SQN-code] sampleSY.py; B₀ = γI with γ = 0 there)

S-LBFGS (Algorithm 2) then steps along p = −H∇F(w) with a backtracking Armijo line search;
S-LSR1 (Algorithm 3) solves the L-SR1 trust-region subproblem exactly
(:func:`~qnref.optim.trust_region.solve_lsr1_subproblem`) and accepts by ρ = ared/pred.
No pair survives an iteration, so the state holds only the radius and a counter; the directions
come from ``problem.device_rng`` (checkpointed with the problem), so runs are reproducible.

The pair sampler :func:`sample_curvature_pairs` is shared with MB-LSR1's warm start
(:mod:`qnref.optim.mb_lsr1`, updateSY with m̂ = m).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import backend, validate
from ..curvature.objective import Point
from .base import Optimizer, Problem, StepInfo, check_choice, check_int, check_positive, evaluate, set_checked, try_point
from .costs import CostAssumptions, ModelShapes
from .drivers import close_step, line_search, open_step, trust_region_update, with_extra
from .operators import SINGULAR_RTOL, LBFGSOperator, LSR1Operator, lsr1_prune, sr1_skip
from .pairs import PairStore
from .registry import register
from .trust_region import RadiusRule, lsr1_subproblem_flops, solve_lsr1_subproblem

__all__ = [
    "SampledPairs",
    "sample_directions",
    "curvature_products",
    "lbfgs_pair_mask",
    "lsr1_pair_filter",
    "lsr1_middle",
    "sample_curvature_pairs",
    "SampledState",
    "SampledLBFGS",
    "SampledLSR1",
]

OPTIONS = ("I", "II")


# --------------------------------------------------------------------------------------------
# Algorithm 1: sampling curvature pairs
# --------------------------------------------------------------------------------------------
def sample_directions(rng: Any, theta: Any, m: int, radius: float) -> Any:
    """S (m × n, rows sᵢ = r σᵢ, σᵢ ~ N(0, I)) drawn from ``rng`` on θ's backend and dtype.

    ``rng`` is ``problem.device_rng`` (a NumPy or CuPy generator, checkpointed by
    :meth:`Problem.state`); [SQN-code] ``Stemp = radius*np.random.randn(num_weights, mmr)``.
    """
    n = int(theta.shape[0])
    try:
        Z = rng.standard_normal((int(m), n), dtype=theta.dtype)
    except (MemoryError, ValueError, OverflowError):  # refusals of huge shapes
        raise ValueError(f"memory {m} is too large: {m} × {n} sampled directions cannot be allocated; "
                         "choose a smaller memory") from None
    xp = backend.namespace(theta)
    return xp.asarray(Z) * float(radius)


def curvature_products(point: Point, S: Any, option: str) -> tuple[Any, Any, int]:
    """Y (rows yᵢ) for the directions S at ``point``; also a host mask of usable rows and the
    number of forward passes spent.

    option "I":  yᵢ = ∇F(w + sᵢ) − ∇F(w) on ``point``'s batch (m gradient evaluations); a trial
                 point with a non-finite loss/gradient gives an unusable row (never NaN in Y).
    option "II": yᵢ = ∇²F(w) sᵢ by Pearlmutter's R-op (m Hessian-vector products, exact).
    """
    xp = point.xp
    m = int(S.shape[0])
    Y = xp.zeros_like(S)
    ok = [False] * m
    evals = 0
    if option == "II":
        for i in range(m):
            hv = point.hvp(S[i])
            if backend.all_finite(hv):
                Y[i] = hv
                ok[i] = True
        return Y, ok, 0
    if option != "I":
        raise ValueError(f"option must be 'I' or 'II', got {option!r}")
    g = point.grad
    for i in range(m):
        q = try_point(point.obj, point.theta + S[i])
        evals += 1
        if q is None:
            continue
        d = q.grad - g
        if backend.all_finite(d):
            Y[i] = d
            ok[i] = True
    return Y, ok, evals


def lbfgs_pair_mask(S: Any, Y: Any, eps: float, test: str = "ss") -> list[bool]:
    """The S-LBFGS curvature-pair filter, row by row.

    ``test="ss"``: sᵢᵀyᵢ > ε‖sᵢ‖² ([SQN] eq. (1), Lemma 7); ``test="cosine"``:
    sᵢᵀyᵢ > ε‖sᵢ‖‖yᵢ‖ ([SQN-code] sampleSY.py). Non-finite rows fail.
    """
    xp = backend.namespace(S, Y)
    sy = backend.to_numpy((S * Y).sum(axis=1))
    ss = backend.to_numpy((S * S).sum(axis=1))
    if test == "ss":
        bound = eps * ss
    elif test == "cosine":
        yy = backend.to_numpy((Y * Y).sum(axis=1))
        bound = eps * (ss * yy) ** 0.5
    else:
        raise ValueError(f"lbfgs_test must be 'ss' or 'cosine', got {test!r}")
    del xp
    return [bool(math.isfinite(a) and math.isfinite(b) and a > b) for a, b in zip(sy, bound)]


def lsr1_middle(S: Any, Y: Any, gamma: float, rtol: float = SINGULAR_RTOL) -> tuple[Any, Any] | None:
    """(Ψ rows, M) of B = γI + ΨᵀM Ψ for row-stored pairs, or ``None`` when M⁻¹ is (near) singular.

    The compact L-SR1 form of [BNS94] Thm 5.1 (:class:`~qnref.optim.operators.LSR1Operator`), here
    also with γ = 0: B = Y (D + L + Lᵀ)⁻¹ Yᵀ, the B₀ = 0 form of [SQN-code] S_LSR1.py.
    """
    B = LSR1Operator.from_pairs(S, Y, gamma, rtol=rtol, check=False)
    if B.singular:
        return None
    return B.Psi.T, B.M


def lsr1_pair_filter(S: Any, Y: Any, gamma: float, eps: float, ok: list[bool] | None = None) -> list[int]:
    """Indices of the pairs kept by the sequential SR1 condition ([SQN] eq. (2)).

    Pair i is tested against B built (compact form, B₀ = γI) from the pairs kept before it:
    kept iff |sᵢᵀ(yᵢ − Bsᵢ)| ≥ ε‖sᵢ‖‖yᵢ − Bsᵢ‖ (:func:`~qnref.optim.operators.sr1_skip` with r = ε)
    and the enlarged middle matrix stays nonsingular.
    """
    kept: list[int] = []
    mid = None
    for i in range(int(S.shape[0])):
        if ok is not None and not ok[i]:
            continue
        s, y = S[i], Y[i]
        if kept:
            P, M = mid
            Bs = gamma * s + P.T @ (M @ (P @ s))
        else:
            Bs = gamma * s
        if sr1_skip(s, y, Bs, eps):
            continue
        cand = lsr1_middle(S[kept + [i]], Y[kept + [i]], gamma)
        if cand is None:
            continue
        kept.append(i)
        mid = cand
    return kept


@dataclass
class SampledPairs:
    """Pairs kept at one iterate: ``S``, ``Y`` rows (k × n), counts and the passes spent."""

    S: Any
    Y: Any
    sampled: int
    kept: int
    evals: int

    @property
    def rejected(self) -> int:
        return self.sampled - self.kept


def sample_curvature_pairs(point: Point, rng: Any, m: int, radius: float, *, option: str = "II",
                           kind: str = "lsr1", eps: float = 1e-3, gamma: float = 0.0,
                           lbfgs_test: str = "ss") -> SampledPairs:
    """[SQN] Algorithm 1 plus the filter of ``kind`` ("lbfgs": eq. (1); "lsr1": eq. (2))."""
    check_choice("kind", kind, ("lbfgs", "lsr1"))
    S = sample_directions(rng, point.theta, m, radius)
    Y, ok, evals = curvature_products(point, S, option)
    if kind == "lbfgs":
        mask = lbfgs_pair_mask(S, Y, eps, lbfgs_test)
        idx = [i for i in range(m) if mask[i] and ok[i]]
    else:
        idx = lsr1_pair_filter(S, Y, gamma, eps, ok)
    return SampledPairs(S[idx], Y[idx], m, len(idx), evals)


# --------------------------------------------------------------------------------------------
# the optimizers
# --------------------------------------------------------------------------------------------
@dataclass
class SampledState:
    """k: iterations; delta: trust-region radius (S-LSR1; NaN for S-LBFGS)."""

    k: int = 0
    delta: float = math.nan


class _SampledQN(Optimizer):
    """Shared part: batch, start point, pair sampling, hyperparameter checks."""

    family: ClassVar[str] = "quasi-newton"
    paper: ClassVar[str] = "Berahas, Jahani & Takáč (2019) arXiv:1901.09997, Alg. 1–3; OptMLGroup/SQN"
    _kind: ClassVar[str] = ""

    def __init__(self, memory: int, radius: float, option: str, eps: float, batch_size: int | None, tol: float):
        self.memory = check_int("memory", memory)
        self.radius = check_positive("radius", radius)
        self.option = check_choice("option", option, OPTIONS)
        self.eps = check_positive("eps", eps, allow_zero=True)
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size)
        self.tol = check_positive("tol", tol, allow_zero=True)

    def _pairs(self, p0: Point, problem: Problem, gamma: float = 0.0) -> SampledPairs:
        return sample_curvature_pairs(p0, problem.device_rng, self.memory, self.radius, option=self.option,
                                      kind=self._kind, eps=self.eps, gamma=gamma,
                                      lbfgs_test=getattr(self, "lbfgs_test", "ss"))


@register("s-lbfgs")
class SampledLBFGS(_SampledQN):
    """S-LBFGS ([SQN] Algorithm 2): fresh pairs at wₖ, p = −Hₖ∇F(wₖ), Armijo backtracking.

    Hₖ: two-loop recursion over the kept pairs with H₀ = γI, γ = sᵀy/yᵀy of the newest kept pair
    ([SQN-code] S_LBFGS.py); Hₖ = I when no pair passes the filter ([SQN] Lemma 7).
    Defaults ([SQN-code] parameters.py / S_LBFGS.py): m = 10, r = 0.01, ε = 10⁻³, option II,
    α₀ = 2 each iteration, c₁ = 10⁻⁴, backtracking factor 0.5; full batch (the poster's toy runs).
    Cost per iteration (poster table): nd (gradient) + mnd (pairs) + 4md (two-loop) + κ_ls nd.
    """

    _kind: ClassVar[str] = "lbfgs"

    def __init__(self, memory: int = 10, radius: float = 0.01, option: str = "II", eps: float = 1e-3,
                 lbfgs_test: str = "ss", alpha0: float = 2.0, c1: float = 1e-4, shrink: float = 0.5,
                 max_evals: int = 40, batch_size: int | None = None, tol: float = 0.0):
        super().__init__(memory, radius, option, eps, batch_size, tol)
        self.lbfgs_test = check_choice("lbfgs_test", lbfgs_test, ("ss", "cosine"))
        set_checked(self, alpha0=(alpha0, "> 0"), c1=(c1, "(0, 1)"), shrink=(shrink, "(0, 1)"),
                    max_evals=(max_evals, "int"))

    def init(self, theta: Any) -> SampledState:
        return SampledState()

    cost_formula: ClassVar[str] = "(8m + 6 + t)n + m"

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """‖g‖ (n), m sampled directions (mn), the pair filter (2mn, 3mn with the cosine test), γ of
        the newest kept pair (2n), the two-loop, gᵀp (n), θ + αp per trial (tn), the step length
        ‖d‖ (n; the new θ is the accepted trial's, :attr:`~.drivers.LineOutcome.theta`)."""
        n, m = shapes.n, self.memory
        k = assume.pairs_or(m)
        t = {"grad_norm": n, "sample_directions": m * n, "pair_filter": (3 if self.lbfgs_test == "cosine" else 2) * m * n}
        if k:
            t.update({"gamma": 2 * n, **LBFGSOperator.solve_terms(n, k, gamma_given=True)})
        return {**t, "slope": n, "line_search": assume.trials * n, "step": n}

    def step(self, theta: Any, state: SampledState, problem: Problem) -> tuple[Any, SampledState, StepInfo]:
        o = open_step(problem, self.batch_size, theta, tol=self.tol)
        if o.stop is not None:
            return theta, state, o.stop
        p0, f0, g = o.point, o.f0, o.g
        gnorm = math.sqrt(float(g @ g))
        pairs = self._pairs(p0, problem)
        fallback = False
        if pairs.kept:
            s, y = pairs.S[-1], pairs.Y[-1]
            d = -LBFGSOperator(pairs.S, pairs.Y, float(s @ y) / float(y @ y)).solve(g)
        else:
            d = -g
        slope = float(g @ d)
        if not (math.isfinite(slope) and slope < 0.0):  # safeguard: never a non-descent direction
            d, slope, fallback = -g, -gnorm * gnorm, True
        ls = line_search(o.obj, theta, d, f0, slope, rule="armijo", alpha0=self.alpha0, c1=self.c1,
                         shrink=self.shrink, max_evals=self.max_evals)
        extra = {"pairs_kept": pairs.kept, "pairs_rejected": pairs.rejected, "fallback_gradient": fallback,
                 "ls_evals": ls.evals, "ls_message": ls.message}
        moved = {"step_size": ls.alpha, "step_norm": ls.alpha * math.sqrt(float(d @ d))} if ls.success else \
            {"step_size": 0.0}
        info = close_step(o, loss=ls.value, accepted=ls.success, evals=1 + pairs.evals + ls.evals,
                          skipped=pairs.rejected, nonfinite=ls.nonfinite, extra=extra, **moved)
        new_state = SampledState(state.k + 1, state.delta)
        return (ls.theta if ls.success else theta), new_state, info


@register("s-lsr1")
class SampledLSR1(_SampledQN):
    """S-LSR1 ([SQN] Algorithm 3): fresh pairs at wₖ, exact L-SR1 trust-region step, ρ test.

    Bₖ = γI + ΨMΨᵀ from the kept pairs (γ = 0 by default: [SQN-code] S_LSR1.py builds
    B = Y(D + L + Lᵀ)⁻¹Yᵀ); Bₖ = I when no pair passes ([SQN] Lemma 10). The step solves
    min gᵀp + ½pᵀBp, ‖p‖ ≤ Δ exactly (OBS, :func:`solve_lsr1_subproblem`; the code uses
    CG-Steihaug); accepted iff ρ = ared/pred > η, radius by :class:`RadiusRule`.
    Defaults ([SQN-code]): m = 10, r = 0.01, ε = 10⁻³, η = 10⁻⁶, Δ₀ = 1 (S_LSR1.py sets
    ``deltak = 1``), Δ ← 2Δ if ρ > 0.75, Δ ← Δ/2 if ρ < 0.1 (no boundary condition:
    ``boundary_fraction = 0``); option II; full batch.
    Cost per iteration (poster table): nd + mnd + nd + κ_tr md (here the OBS solve, O(m²d)).
    """

    _kind: ClassVar[str] = "lsr1"

    def __init__(self, memory: int = 10, radius: float = 0.01, option: str = "II", eps: float = 1e-3,
                 gamma: float = 0.0, delta0: float = 1.0, eta: float = 1e-6, u: float = 0.75, l: float = 0.1,  # noqa: E741
                 increase: float = 2.0, decrease: float = 0.5, boundary_fraction: float = 0.0,
                 delta_max: float = math.inf, delta_min: float = 1e-12, batch_size: int | None = None,
                 tol: float = 0.0):
        super().__init__(memory, radius, option, eps, batch_size, tol)
        self.gamma = check_positive("gamma", gamma, allow_zero=True)
        self.delta0 = check_positive("delta0", delta0)
        # numbers here (NaN refused by name), ranges in RadiusRule below
        self.eta, self.l, self.u, self.increase, self.decrease = (
            validate.number(k, v, finite=False) for k, v in
            (("eta", eta), ("l", l), ("u", u), ("increase", increase), ("decrease", decrease)))
        self.boundary_fraction = validate.number("boundary_fraction", boundary_fraction, finite=False)
        self.delta_max = validate.number("delta_max", delta_max, finite=False)
        self.delta_min = check_positive("delta_min", delta_min)
        if self.delta_min > self.delta0:
            raise ValueError(f"delta_min={delta_min} exceeds delta0={delta0}")
        _ = self.rule  # the radius rule's checks (RadiusRule.__post_init__)

    @property
    def rule(self) -> RadiusRule:
        return RadiusRule(eta=self.eta, u=self.u, l=self.l, boundary_fraction=self.boundary_fraction,
                          increase=self.increase, decrease=self.decrease, delta_max=self.delta_max,
                          delta_min=self.delta_min)

    def init(self, theta: Any) -> SampledState:
        return SampledState(0, self.delta0)

    cost_formula: ClassVar[str] = "(2m³/3 + O(m²))n + O(m⁴): compact form re-formed per kept pair"

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """‖g‖, m sampled directions, the pair filter (:func:`lsr1_pair_filter`: candidate j tests
        B s with the j pairs kept so far, then re-forms the compact matrix with j + 1 pairs; all
        candidates kept), the compact form and the exact (QR-route) subproblem."""
        n, m = shapes.n, self.memory
        k = assume.pairs_or(m)
        filt = sum(n + (2 * j * n + j * j if j else 0) + 3 * n + LSR1Operator.build_flops(n, j + 1) for j in range(k))
        return {"grad_norm": n, "sample_directions": m * n, "pair_filter": filt,
                "compact_form": LSR1Operator.build_flops(n, k), "tr_subproblem": lsr1_subproblem_flops(n, k)}

    def step(self, theta: Any, state: SampledState, problem: Problem) -> tuple[Any, SampledState, StepInfo]:
        o = open_step(problem, self.batch_size, theta, tol=self.tol)
        if o.stop is not None:
            return theta, state, (o.stop if o.point is None else with_extra(o.stop, radius=state.delta))
        p0, f0, g = o.point, o.f0, o.g
        pairs = self._pairs(p0, problem, self.gamma)
        gam, S, Y = self.gamma, pairs.S, pairs.Y
        mid = lsr1_middle(S, Y, gam) if pairs.kept else None
        if pairs.kept and mid is None:  # cannot happen after the filter; prune as [RD16] Alg. 1
            store = PairStore.from_rows(S, Y, grams=False)
            lsr1_prune(store, gam)
            S, Y = store.S, store.Y
            mid = lsr1_middle(S, Y, gam) if S.shape[0] else None
        gam, Psi, M = (1.0, None, None) if mid is None else (gam, mid[0].T, mid[1])
        sol = solve_lsr1_subproblem(g, gam, Psi, M, state.delta)
        trial, f1 = evaluate(o.obj, theta + sol.p)
        dec = trust_region_update(self.rule, state.delta, f0 - f1, sol.pred, sol.step_norm)
        info = close_step(o, loss=f1 if dec.accepted else f0, accepted=dec.accepted,
                          step_norm=sol.step_norm if dec.accepted else 0.0, radius=dec.delta,
                          skipped=pairs.rejected, evals=2 + pairs.evals, nonfinite=trial is None,
                          extra={"rho": dec.rho, "pred": sol.pred, "sigma": sol.sigma, "lambda_min": sol.lambda_min,
                                 "pairs_kept": pairs.kept, "pairs_rejected": pairs.rejected,
                                 "hard_case": sol.hard_case})
        return (theta + sol.p if dec.accepted else theta), SampledState(state.k + 1, dec.delta), info
