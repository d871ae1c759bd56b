"""Hessian-free optimization (Martens 2010), ``"hf"``, and the SHG of the second-order CNN
comparison, ``"shg"`` (:class:`SHG`: the same algorithm with stochastic *Hessian* products).

One step at θ (gradient on 20% of the data; ``hf`` multiplies by the Gauss–Newton matrix,
``shg`` by the Hessian):

1. Gradient batch D_g = ``problem.batch(⌈grad_fraction·N⌉)`` (advances the epoch stream, so
   ``problem.epochs`` counts exactly the gradient data; 20% by default, comparison paper §3.3,
   Fig. 1). f₀ = f_{D_g}(θ), g = ∇f_{D_g}(θ).
2. Curvature batch D_c ⊂ D_g (a uniform subset of the gradient batch drawn with
   ``problem.rng``; no extra data, no extra epochs; ``problem.sample`` when it is larger than
   D_g). Default 100 examples: the batch size of the comparison paper (§3.3, §4.2 varies it).
   A = C + λI with C = G (Gauss–Newton, ``Point.ggn_vp``, default; Martens 2010 §4.2) or
   C = ∇²f (``curvature="hessian"``, ``Point.hvp``).
3. :func:`cg_solve` minimises q(p) = gᵀp + ½ pᵀA p, i.e. A p = −g, from the warm start
   x₀ = ζ p_prev (ζ = 0.95, p_prev the *last* CG iterate of the previous step; Martens 2010
   §4.5), optionally preconditioned by Martens' diagonal M = (diag F̂ + λ + l2)^ξ, ξ = 0.75
   (§4.7, F̂ the empirical Fisher of the gradient batch). Termination (Martens 2010 §4.4): at
   iteration i with k = max(10, ⌈0.1 i⌉), stop when i > k, q_i < 0 and
   (q_i − q_{i−k}) / q_i < k ε, ε = 5·10⁻⁴; at most 250 iterations. Negative curvature
   (dᵀA d ≤ 0, possible only with the exact Hessian) stops CG at the current iterate.
4. CG backtracking (§4.6): iterates are stored at i = ⌈1.3ʲ⌉ and at the end;
   :func:`backtrack_iterates` walks back from the last while f_{D_g} keeps decreasing.
5. Reduction ratio ρ = (f(θ + p) − f₀) / q(p) for the backtracked p (q of the damped model that
   CG minimised, available from CG's residual at no cost) and the Levenberg–Marquardt rule
   (§4.1) λ ← 2/3 λ if ρ > 3/4, λ ← 3/2 λ if ρ < 1/4, clipped to [λ_min, λ_max]
   (:func:`update_damping`).
6. Line search: backtracking α = 1, 0.8, 0.8², … (Martens & Sutskever 2012 §8.8) until
   f(θ + αp) − f₀ ≤ 0.1 α gᵀp (comparison paper eq. 2); a failure leaves θ unchanged.
   ``step_rule="fixed"`` replaces it by θ ← θ + η p with a fixed ``lr`` η (comparison paper
   §4.4, Fig. 12: "we replace the line search computations with well tuned fixed learning
   rate"); CG, its backtracking over iterates and the damping rule stay as they are.

Safeguards: every trial point goes through :func:`~qnref.optim.base.try_point` (NaN/Inf
rejected, θ never becomes non-finite); a non-finite start point leaves θ unchanged and raises λ;
a non-finite product stops CG; a warm start with q(x₀) ≥ 0 restarts CG from zero; a direction
with gᵀp ≥ 0 is not used (λ raised, warm start cleared); λ is kept in [λ_min, λ_max].

Cost per step (counted by the shared :class:`~qnref.curvature.objective.PassCounter`): one
gradient on D_g, one forward on D_c, one curvature product on D_c per CG iteration (+1 for a
non-zero warm start): GGN = R-forward + backward, Hessian = R-forward + backward + R-backward,
then one forward on D_g per backtracking or line-search evaluation. The preconditioner adds a
forward and a per-example backward over D_g.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy

from .. import backend
from ..curvature.objective import Objective
from .base import Optimizer, Problem, StepInfo, capped_size, check_choice, check_int, check_positive, check_range, set_checked, try_point
from .costs import CostAssumptions, ModelShapes
from .drivers import close_step, open_step, with_extra
from .first_order import fixed_step_lr, fraction_size
from .linesearch import CNN_COMPARISON_C1, backtracking_armijo
from .registry import register

__all__ = ["CGResult", "cg_solve", "backtrack_iterates", "update_damping", "martens_preconditioner",
           "HessianFree", "HFState", "SHG"]


# --------------------------------------------------------------------------------------------
# Conjugate gradient
# --------------------------------------------------------------------------------------------
@dataclass
class CGResult:
    """Outcome of :func:`cg_solve`.

    x : final iterate (the last one CG produced; what Martens warm-starts the next solve from).
    iterates : stored ``(i, x_i, q_i)`` in ascending i (i = number of CG iterations done);
        always includes the final iterate.
    q : q(x_i) = ½ x_iᵀA x_i − bᵀx_i for i = 0 … iters (q(x₀) first).
    residual_norms : ‖b − A x_i‖ for i = 0 … iters.
    iters : CG iterations performed (updates of x).
    n_products : calls of ``Av`` (iters + 1 for a non-zero warm start, + 1 for the probe that
        detected negative curvature / a non-finite product).
    reason : "tol" (relative residual), "progress" (Martens' criterion), "max_iters",
        "converged" (zero residual), "negative_curvature", "nonfinite" or "zero_rhs".
    negative_curvature : a direction d with dᵀA d ≤ 0 was met.
    x0_reset : the warm start had q(x₀) ≥ 0 and CG restarted from zero.
    """

    x: Any
    iterates: list
    q: list
    residual_norms: list
    iters: int
    n_products: int
    reason: str
    negative_curvature: bool = False
    x0_reset: bool = False

    @property
    def stats(self) -> dict:
        return {"cg_iters": self.iters, "cg_products": self.n_products, "cg_reason": self.reason,
                "negative_curvature": self.negative_curvature, "x0_reset": self.x0_reset,
                "q_final": self.q[-1], "residual_final": self.residual_norms[-1]}


def _store_schedule(ratio: float, max_iters: int) -> set[int]:
    """Iterations i = ⌈ratioʲ⌉, j = 0, 1, … (Martens 2010 §4.6: ratio 1.3)."""
    out, v = set(), 1.0
    while math.ceil(v) <= max_iters:
        out.add(int(math.ceil(v)))
        v *= ratio
    return out


def cg_solve(
    Av: Callable[[Any], Any],
    b: Any,
    x0: Any = None,
    *,
    max_iters: int = 250,
    min_iters: int = 1,
    tol: float | None = None,
    progress_eps: float | None = 5e-4,
    progress_k_min: int = 10,
    progress_k_frac: float = 0.1,
    precond: Any = None,
    store_ratio: float = 1.3,
    store_all: bool = False,
    reset_bad_x0: bool = True,
) -> CGResult:
    """(Preconditioned) conjugate gradient for A x = b, A symmetric, via products ``Av(v)``.

    Minimises q(x) = ½ xᵀA x − bᵀx (with b = −g this is the HF quadratic model gᵀp + ½ pᵀA p).

    Stopping rules (any that is enabled, after at least ``min_iters`` iterations):

    * ``tol``: ‖b − A x_i‖ ≤ tol ‖b‖ (relative residual; ``None`` disables it);
    * ``progress_eps``: Martens (2010) §4.4 — with k = max(k_min, ⌈k_frac · i⌉), stop when
      i > k, q_i < 0 and (q_i − q_{i−k}) / q_i < k · ε (``None`` disables it);
    * ``max_iters``; negative curvature dᵀA d ≤ 0 (stop at the current iterate, never step
      along d); a non-finite product or scalar (stop at the current iterate).

    ``precond``: ``None``, an array d (M = diag(d), z = r / d) or a callable z = M⁻¹ r.
    q_i is tracked by the PCG identity q_{i+1} = q_i − ½ αᵢ rᵢᵀzᵢ (no extra products; q₀ =
    −½ x₀ᵀ(b + r₀)). Host syncs per iteration: dᵀA d, rᵀz and (with ``tol`` and a
    preconditioner) ‖r‖. Iterates are stored at i = ⌈``store_ratio``ʲ⌉ (or every one with
    ``store_all``) for backtracking.
    """
    xp = backend.namespace(b)
    max_iters = check_int("max_iters", max_iters, 0)
    min_iters = check_int("min_iters", min_iters, 0)
    if tol is not None:
        tol = check_positive("tol", tol, allow_zero=True)
    if progress_eps is not None:
        progress_eps = check_positive("progress_eps", progress_eps)
    progress_k_min = check_int("progress_k_min", progress_k_min, 1)
    progress_k_frac = check_positive("progress_k_frac", progress_k_frac, allow_zero=True)
    store_ratio = check_range("store_ratio", store_ratio, 1.0, math.inf, lo_open=True, hi_open=True)
    if precond is None:
        apply_m = None
    elif callable(precond):
        apply_m = precond
    else:
        backend.namespace(precond, b)
        apply_m = lambda r: r / precond  # noqa: E731

    n_products = 0
    x0_reset = False
    bnorm = math.sqrt(float(b @ b))
    if not math.isfinite(bnorm):
        raise ValueError("cg_solve: b contains NaN or Inf")
    if x0 is None or not bool(xp.any(x0 != 0)):
        x = xp.zeros_like(b)
        r = b.copy()
        q = 0.0
    else:
        x = x0.copy()
        ax = Av(x)
        n_products += 1
        r = b - ax
        q = -0.5 * float(x @ (b + r))
        if reset_bad_x0 and not (math.isfinite(q) and q < 0.0):
            x, r, q, x0_reset = xp.zeros_like(b), b.copy(), 0.0, True
    schedule = None if store_all else _store_schedule(store_ratio, max_iters)
    qs, res = [q], [math.sqrt(float(r @ r))]
    iterates: list = []
    if bnorm == 0.0:
        return CGResult(x, [(0, x.copy(), q)], qs, res, 0, n_products, "zero_rhs", False, x0_reset)

    z = r if apply_m is None else apply_m(r)
    rz = float(r @ z)
    d = z.copy()
    reason = "max_iters"
    neg = False
    i = 0
    while i < max_iters:
        if tol is not None and i >= min_iters and res[-1] <= tol * bnorm:
            reason = "tol"
            break
        if not math.isfinite(rz):  # a non-finite preconditioner: no product along a NaN direction
            reason = "nonfinite"
            break
        ad = Av(d)
        n_products += 1
        dad = float(d @ ad)
        if not math.isfinite(dad) or not math.isfinite(rz):
            reason = "nonfinite"
            break
        if dad <= 0.0:
            reason, neg = "negative_curvature", True
            break
        alpha = rz / dad
        x = x + alpha * d
        r = r - alpha * ad
        q = q - 0.5 * alpha * rz
        i += 1
        z = r if apply_m is None else apply_m(r)
        rz_new = float(r @ z)
        rr = rz_new if apply_m is None else float(r @ r)
        qs.append(q)
        res.append(math.sqrt(max(rr, 0.0)))
        if store_all or i in schedule:
            iterates.append((i, x.copy(), q))
        if rr == 0.0:  # exact solution (a zero residual would make the next direction zero)
            reason = "converged"
            break
        if progress_eps is not None and i >= min_iters:
            k = max(progress_k_min, int(math.ceil(progress_k_frac * i)))
            if i > k and q < 0.0 and (q - qs[i - k]) / q < k * progress_eps:
                reason = "progress"
                break
        if not math.isfinite(rz_new):
            reason = "nonfinite"
            break
        beta = rz_new / rz
        rz = rz_new
        d = z + beta * d
    if tol is not None and reason == "max_iters" and res[-1] <= tol * bnorm:
        reason = "tol"
    if not iterates or iterates[-1][0] != i:
        iterates.append((i, x.copy(), q))
    return CGResult(x, iterates, qs, res, i, n_products, reason, neg, x0_reset)


# --------------------------------------------------------------------------------------------
# Backtracking over CG iterates, damping rule, preconditioner
# --------------------------------------------------------------------------------------------
def backtrack_iterates(f: Callable[[Any], float], iterates: list, mode: str = "martens") -> tuple[int, float, int]:
    """Choose among the stored CG iterates ``[(i, x_i, q_i), …]`` (ascending i).

    ``mode="martens"`` (Martens 2010 §4.6): start at the last iterate and step back while the
    objective keeps decreasing; stop at the first increase. ``mode="best"``: evaluate all and
    return the arg-min. ``f`` returns a float (``inf`` for a non-finite point, which therefore
    never wins). Returns (position in ``iterates``, f there, evaluations).
    """
    if not iterates:
        raise ValueError("backtrack_iterates needs at least one iterate")
    if mode not in ("martens", "best"):
        raise ValueError(f"backtrack mode must be 'martens' or 'best', got {mode!r}")
    vals = {}

    def val(j: int) -> float:
        if j not in vals:
            v = float(f(iterates[j][1]))
            vals[j] = v if math.isfinite(v) else math.inf
        return vals[j]

    last = len(iterates) - 1
    if mode == "best":
        best = min(range(len(iterates)), key=lambda j: (val(j), -j))
        return best, val(best), len(vals)
    j = last
    while j > 0 and val(j - 1) < val(j):
        j -= 1
    return j, val(j), len(vals)


def update_damping(lam: float, rho: float, *, drop: float = 2.0 / 3.0, boost: float = 1.5,
                   rho_low: float = 0.25, rho_high: float = 0.75,
                   lam_min: float = 1e-8, lam_max: float = 1e8) -> float:
    """Levenberg–Marquardt rule of Martens (2010) §4.1: λ·drop if ρ > ρ_high, λ·boost if ρ < ρ_low
    (or ρ not finite), else unchanged; the result is clipped to [lam_min, lam_max]."""
    if not math.isfinite(rho) or rho < rho_low:
        lam = lam * boost
    elif rho > rho_high:
        lam = lam * drop
    return float(min(max(lam, lam_min), lam_max))


def martens_preconditioner(obj: Objective, theta: Any, lam: float, exponent: float = 0.75, chunk: int = 256) -> Any:
    """Martens (2010) §4.7 diagonal: d = (diag F̂ + λ + l2)^ξ with diag F̂ = (1/N) Σᵢ ∇ℓᵢ ⊙ ∇ℓᵢ on
    ``obj``'s examples (data term; the L2 coefficient is added like λ, matching G = JᵀH_LJ/N + l2·I).

    Per-example gradients are formed ``chunk`` rows at a time (memory chunk × n); cost one
    forward and one per-example backward over the batch. Not available for models whose
    examples interact (batch normalization in training mode).
    """
    xp = backend.namespace(theta)
    N = obj.n_samples
    acc = xp.zeros_like(theta)
    for a in range(0, N, chunk):
        sub = obj.subset(slice(a, min(N, a + chunk)))
        P = sub.at(theta).per_example_grads()
        acc += (P * P).sum(axis=0)
    return (acc / N + (lam + obj.l2)) ** exponent


# --------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------
@dataclass
class HFState:
    """damping λ, the last CG iterate (warm start; zeros at first), steps taken."""

    damping: float
    prev: Any
    k: int = 0


@register("hf")
class HessianFree(Optimizer):
    """Hessian-free (truncated Newton with CG on damped Gauss–Newton products), Martens 2010.

    Defaults and sources (see the module docstring and docs/hessian_free.md):
    ``grad_fraction=0.2`` (comparison paper §3.3, Fig. 1), ``curvature_batch=100`` (comparison
    paper's batch size, §3.3/§4.2), ``curvature="ggn"`` (Martens 2010 §4.2), ``damping=1.0``
    initial λ (ours, for mean-over-examples losses; adapted by the LM rule), ``drop=2/3``,
    ``boost=3/2``, ρ thresholds 1/4, 3/4 (Martens 2010 §4.1), ``warm_start_decay=0.95``
    (§4.5), ``max_cg_iters=250``, ``progress_eps=5e-4``, k = max(10, 0.1 i) (§4.4),
    ``store_ratio=1.3`` (§4.6), ``c1=0.1`` (comparison paper eq. 2), ``shrink=0.8``
    (Martens & Sutskever 2012), ``preconditioner=None`` (Martens' diagonal with ξ = 0.75 via
    ``"martens"``: it costs per-example gradients, off by default as in the comparison paper,
    which does not mention one), ``step_rule="armijo"`` (the line search of step 6;
    ``"fixed"`` with ``lr``: θ ← θ + lr·p, comparison paper §4.4; ``lr`` is refused otherwise).

    ``hf`` keeps Martens' Gauss–Newton curvature (its reference trajectory is recorded); the
    comparison paper's SHG, which multiplies by the Hessian, is :class:`SHG` (``"shg"``).
    """

    family: ClassVar[str] = "hessian-free"
    paper: ClassVar[str] = ("Martens 2010 (ICML), Hessian-free; SHG settings of 'A comparison of second-order "
                            "methods for deep convolutional neural networks' (§3.3, eq. 2)")

    def __init__(
        self,
        *,
        curvature: str = "ggn",
        damping: float = 1.0,
        grad_fraction: float | None = 0.2,
        grad_batch: int | None = None,
        curvature_batch: int | None = 100,
        curvature_fraction: float | None = None,
        max_cg_iters: int = 250,
        min_cg_iters: int = 1,
        cg_tol: float | None = None,
        progress_eps: float | None = 5e-4,
        warm_start_decay: float = 0.95,
        store_ratio: float = 1.3,
        backtrack: str = "martens",
        c1: float = CNN_COMPARISON_C1,
        shrink: float = 0.8,
        max_ls_evals: int = 20,
        drop: float = 2.0 / 3.0,
        boost: float = 1.5,
        rho_low: float = 0.25,
        rho_high: float = 0.75,
        damping_min: float = 1e-8,
        damping_max: float = 1e8,
        preconditioner: str | None = None,
        precond_exponent: float = 0.75,
        step_rule: str = "armijo",
        lr: float | None = None,
    ):
        self.curvature = check_choice("curvature", curvature, ("ggn", "hessian"))
        self.damping = check_positive("damping", damping)
        # each value is checked first (a NaN is named as such), then the pair
        self.grad_fraction = None if grad_fraction is None else check_range("grad_fraction", grad_fraction, 0.0, 1.0, lo_open=True)
        self.grad_batch = None if grad_batch is None else check_int("grad_batch", grad_batch)
        if grad_batch is not None and grad_fraction is not None:
            raise ValueError(f"give grad_batch or grad_fraction, not both (got grad_batch={grad_batch!r}, "
                             f"grad_fraction={grad_fraction!r}; grad_fraction=None for a fixed size)")
        if grad_batch is None and grad_fraction is None:
            raise ValueError("one of grad_batch or grad_fraction is required")
        self.curvature_batch = None if curvature_batch is None else check_int("curvature_batch", curvature_batch)
        self.curvature_fraction = (None if curvature_fraction is None
                                   else check_range("curvature_fraction", curvature_fraction, 0.0, 1.0, lo_open=True))
        if curvature_batch is not None and curvature_fraction is not None:
            raise ValueError(f"give curvature_batch or curvature_fraction, not both (got curvature_batch="
                             f"{curvature_batch!r}, curvature_fraction={curvature_fraction!r})")
        if curvature_batch is None and curvature_fraction is None:
            raise ValueError("one of curvature_batch or curvature_fraction is required")
        self.max_cg_iters = check_int("max_cg_iters", max_cg_iters)
        self.min_cg_iters = check_int("min_cg_iters", min_cg_iters, 0)
        if self.min_cg_iters > self.max_cg_iters:
            raise ValueError(f"min_cg_iters={min_cg_iters} exceeds max_cg_iters={max_cg_iters}")
        self.cg_tol = None if cg_tol is None else check_positive("cg_tol", cg_tol)
        self.progress_eps = None if progress_eps is None else check_positive("progress_eps", progress_eps)
        self.warm_start_decay = check_range("warm_start_decay", warm_start_decay, 0.0, 1.0)
        self.store_ratio = check_range("store_ratio", store_ratio, 1.0, math.inf, lo_open=True, hi_open=True)
        self.backtrack = check_choice("backtrack", backtrack, ("martens", "best", "none"))
        set_checked(self, c1=(c1, "(0, 1)"), shrink=(shrink, "(0, 1)"), max_ls_evals=(max_ls_evals, "int"),
                    drop=(drop, "(0, 1)"), boost=(boost, "(1, inf)"), rho_low=(rho_low, "[0, 1)"))
        self.rho_high = check_range("rho_high", rho_high, self.rho_low, 1.0, lo_open=True, hi_open=True)
        self.damping_min = check_positive("damping_min", damping_min)
        self.damping_max = check_positive("damping_max", damping_max)
        if not self.damping_min <= self.damping <= self.damping_max:
            raise ValueError(f"need damping_min ≤ damping ≤ damping_max, got {damping_min}, {damping}, {damping_max}")
        self.preconditioner = check_choice("preconditioner", preconditioner, (None, "martens"))
        self.precond_exponent = check_range("precond_exponent", precond_exponent, 0.0, 1.0)
        self.step_rule = check_choice("step_rule", step_rule, ("armijo", "fixed"))
        fixed_step_lr(self, lr)

    # -- helpers --------------------------------------------------------------------------------
    def grad_size(self, n: int) -> int:
        if self.grad_batch is not None:
            return capped_size(self, n, self.grad_batch, "grad_batch")
        return fraction_size(n, self.grad_fraction)

    def curvature_size(self, n: int) -> int:
        if self.curvature_batch is not None:
            return capped_size(self, n, self.curvature_batch, "curvature_batch")
        return fraction_size(n, self.curvature_fraction)

    def _curvature_objective(self, problem: Problem, gobj: Objective, theta: Any) -> Objective:
        m = self.curvature_size(problem.n_samples)
        if m == gobj.n_samples:
            return gobj
        if m < gobj.n_samples:
            idx = numpy.sort(problem.rng.choice(gobj.n_samples, size=m, replace=False))
            return gobj.subset(backend.namespace(theta).asarray(idx))
        return problem.sample(m)

    def init(self, theta: Any) -> HFState:
        return HFState(damping=self.damping, prev=theta * 0)

    cost_formula: ClassVar[str] = "6n·I_CG + 9n"

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """CG set-up (6n) and I_CG iterations of 6n vector work (the products Av are passes), the
        step (3n); Martens' preconditioner r/M once per iteration and at the start (building M:
        a pass, excluded)."""
        n, I = shapes.n, assume.cg_iters
        t = {"cg_setup": 6 * n, "cg_iterations": 6 * n * I, "step": 3 * n}
        if self.preconditioner == "martens":
            t["cg_preconditioner"] = n * (I + 1)
        return t

    def _lm(self, lam: float, rho: float) -> float:
        return update_damping(lam, rho, drop=self.drop, boost=self.boost, rho_low=self.rho_low,
                              rho_high=self.rho_high, lam_min=self.damping_min, lam_max=self.damping_max)

    # -- one step -----------------------------------------------------------------------------
    def step(self, theta: Any, state: HFState, problem: Problem) -> tuple[Any, HFState, StepInfo]:
        lam = float(state.damping)
        opened = open_step(problem, self.grad_size(problem.n_samples), theta, tol=None)
        if opened.stop is not None:
            st = HFState(self._lm(lam, math.nan), state.prev * 0, state.k + 1)
            return theta, st, with_extra(opened.stop, damping=st.damping)
        gobj, f0, g = opened.obj, opened.f0, opened.g
        cobj = self._curvature_objective(problem, gobj, theta)
        pc = cobj.at(theta)
        prod = pc.ggn_vp if self.curvature == "ggn" else pc.hvp

        def Av(v):
            return prod(v) + lam * v

        precond = None
        if self.preconditioner == "martens":
            precond = martens_preconditioner(gobj, theta, lam, self.precond_exponent)
        x0 = self.warm_start_decay * state.prev if self.warm_start_decay > 0 else None
        if precond is not None and not backend.all_finite(precond):
            precond = math.nan  # per-example gradients were not finite: rejected below, no CG
        cg = None if precond is math.nan else cg_solve(
            Av, -g, x0, max_iters=self.max_cg_iters, min_iters=self.min_cg_iters, tol=self.cg_tol,
            progress_eps=self.progress_eps, precond=precond, store_ratio=self.store_ratio)
        if cg is None:
            st = HFState(self._lm(lam, -math.inf), state.prev * 0, state.k + 1)
            return theta, st, close_step(opened, loss=f0, accepted=False, evals=1, step_size=0.0, nonfinite=True,
                                         skipped=1, extra={"message": "non-finite preconditioner (per-example "
                                                           "gradients): step rejected", "damping_used": lam,
                                                           "damping": st.damping})
        extra: dict = dict(cg.stats)
        extra["damping_used"] = lam
        extra["curvature_batch"] = cobj.n_samples
        if cg.reason == "nonfinite":
            # a NaN/Inf curvature product (Gv/Hv, or the preconditioner) inside CG: the step would be
            # built from it, so it is rejected (θ stays, the warm start is dropped, λ is boosted)
            extra["message"] = f"non-finite curvature product in CG at iteration {cg.iters}: step rejected"
            st = HFState(self._lm(lam, -math.inf), state.prev * 0, state.k + 1)
            extra["damping"] = st.damping
            return theta, st, close_step(opened, loss=f0, accepted=False, evals=1, step_size=0.0, nonfinite=True,
                                         skipped=1, extra=extra)

        iterates = cg.iterates
        if cg.iters == 0 and not bool(cg.x.any()):
            # negative curvature (or a non-finite product) at the very first CG direction: fall
            # back to the step of the damping term alone, p = −g/λ
            iterates = [(0, -g / lam, -0.5 * float(g @ g) / lam)]
            extra["fallback"] = "gradient"

        cache: dict = {}

        def f_at(x):
            key = id(x)
            if key not in cache:
                pt = try_point(gobj, theta + x)
                cache[key] = math.inf if pt is None else pt.value
            return cache[key]

        if self.backtrack == "none" or len(iterates) == 1:
            j, fj, bt_evals = len(iterates) - 1, f_at(iterates[-1][1]), 1
        else:
            j, fj, bt_evals = backtrack_iterates(f_at, iterates, self.backtrack)
        p, qp = iterates[j][1], iterates[j][2]
        extra["backtrack_iter"] = iterates[j][0]
        evals = 1 + bt_evals
        nonfinite = any(not math.isfinite(v) for v in cache.values())

        # reduction ratio and Levenberg–Marquardt update
        rho = (fj - f0) / qp if (qp < 0.0 and math.isfinite(fj)) else -math.inf
        new_lam = self._lm(lam, rho)
        extra["rho"] = rho
        extra["damping"] = new_lam
        new_prev = cg.x if cg.iters > 0 else state.prev * 0

        slope = float(g @ p)
        if not (slope < 0.0 and math.isfinite(slope)):
            extra["message"] = f"not a descent direction (gᵀp = {slope:.3e})"
            st = HFState(self._lm(lam, -math.inf), state.prev * 0, state.k + 1)
            extra["damping"] = st.damping
            return theta, st, close_step(opened, loss=f0, accepted=False, evals=evals, step_size=0.0,
                                         nonfinite=nonfinite, extra=extra)

        def phi(alpha: float) -> float:
            if alpha == 1.0:
                return fj
            pt = try_point(gobj, theta + alpha * p)
            return math.inf if pt is None else pt.value

        if self.step_rule == "fixed":
            # [SOC] §4.4: a fixed step instead of the line search; f at θ + lr·p is only read (a
            # NaN/Inf there rejects the step: θ stays, the only safeguard left)
            st = HFState(new_lam, new_prev, state.k + 1)
            f_new = phi(self.lr)
            evals += 0 if self.lr == 1.0 else 1
            if not math.isfinite(f_new):
                extra["message"] = f"fixed step lr={self.lr}: non-finite loss at θ + lr·p, step rejected"
                return theta, st, close_step(opened, loss=f0, accepted=False, evals=evals, step_size=0.0,
                                             nonfinite=True, extra=extra)
            step = self.lr * p
            return theta + step, st, close_step(opened, loss=f_new, accepted=True, evals=evals, step_size=self.lr,
                                                step_norm=math.sqrt(float(step @ step)), nonfinite=nonfinite,
                                                extra=extra)

        ls = backtracking_armijo(phi, f0, slope, alpha0=1.0, c1=self.c1, shrink=self.shrink, max_evals=self.max_ls_evals)
        evals += max(0, ls.n_evals - 1)
        st = HFState(new_lam, new_prev, state.k + 1)
        if not ls.success:
            extra["message"] = ls.message
            return theta, st, close_step(opened, loss=f0, accepted=False, evals=evals, step_size=0.0,
                                         nonfinite=nonfinite, extra=extra)
        step = ls.alpha * p
        return theta + step, st, close_step(opened, loss=ls.value, accepted=True, evals=evals, step_size=ls.alpha,
                                            step_norm=math.sqrt(float(step @ step)), nonfinite=nonfinite,
                                            extra=extra)


@register("shg")
class SHG(HessianFree):
    """SHG of the second-order CNN comparison ([SOC] §2.1 L47, §3.3 L87, §3.4 eq. 2, §4.3): the
    Hessian-free method with **stochastic Hessian-vector products** and the gradient on 20 % of
    the data. The same algorithm and code as :class:`HessianFree`; only ``curvature`` defaults to
    ``"hessian"`` (A v = ∇²f_{D_c}(θ) v + λv, ``Point.hvp``: the exact Hessian of the curvature
    batch, including the activations' f'' terms D_λ of [SOC] eq. 3–5, which the GGN never has).

    The text's settings and where they sit: "Stochastic Hessian and full Gradient ... we will only
    use 20% of data to compute the gradient" (§3.3) → ``grad_fraction=0.2``; the Hessian on a
    batch of "batch size as 100" (§3.3; §4.2 varies the "batch size of hessian-vector product")
    → ``curvature_batch=100``; CG "terminating it once it has made sufficient progress" (§2.1,
    which cites Martens & Sutskever 2011 and gives no rule) → Martens' progress test
    (``progress_eps=5e-4``, k = max(10, 0.1 i)); line search eq. (2), f(w + ηp) − f(w) ≤
    0.1 η ∇f(w)ᵀp on the current batch (§3.4) → ``c1=0.1`` (backtracking factor 0.8 of Martens &
    Sutskever: the text gives none). Damping, warm start and CG backtracking are Martens' (the
    text says nothing about them). With the Hessian, CG may meet negative curvature dᵀAd ≤ 0: it
    stops there (step 3 of the module docstring). ``step_rule="fixed"`` with ``lr`` is the
    fixed-rate variant of §4.4 / Fig. 12. Every other hyperparameter is :class:`HessianFree`'s.
    """

    paper: ClassVar[str] = ("SHG of 'A comparison of second-order methods for deep convolutional neural networks' "
                            "(§2.1, §3.3, eq. 2): Hessian-free (Martens 2010) with stochastic Hessian products")
    #: the defaults in which SHG differs from Martens' HF
    TEXT_DEFAULTS: ClassVar[dict[str, Any]] = {"curvature": "hessian"}

    def __init__(self, **hyperparameters: Any):
        super().__init__(**{**self.TEXT_DEFAULTS, **hyperparameters})


# SHG's signature is HessianFree's with the text's defaults (the registry, the fuzz suite and the
# paper-default look-up of capped batch sizes read it), written once from the parent's
SHG.__init__.__signature__ = inspect.signature(HessianFree.__init__).replace(parameters=[
    p.replace(default=SHG.TEXT_DEFAULTS.get(p.name, p.default))
    for p in inspect.signature(HessianFree.__init__).parameters.values()])
