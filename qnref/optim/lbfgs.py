"""L-BFGS with a strong Wolfe line search (Nocedal & Wright 2006, Alg. 7.5), optionally with the
"forgetting" of the L-SR1 paper's baseline (history discarded every k steps; Ramamurthy & Duffy
2016, §2).

Per step on one minibatch: d = −H∇f by the two-loop recursion with H₀ = γₖI,
γₖ = sᵀy / yᵀy of the newest pair (N&W eq. 7.20); a strong Wolfe search (c₁ = 10⁻⁴, c₂ = 0.9)
on the same batch; the pair (s, y) is stored only when sᵀy > ε‖s‖² (keeps H positive definite;
ε = 10⁻¹⁰ relative). The first step of a run, or after the memory was cleared, tries
α₀ = min(1, 1/‖∇f‖₁) as SciPy does; later steps try α₀ = 1.

Passes per step (issue 21): one forward + backward at θ on the step's batch (f and ∇f), then one
forward + backward per line-search trial (strong Wolfe needs f and the slope ∇fᵀd at every trial);
the accepted trial's gradient is the one in y = ∇f(θ + αd) − ∇f(θ), so nothing is evaluated twice.
That is 1 + trials gradient-equivalents (measured 2.03–2.10 on the MNIST autoencoder, the same
2 closure calls per step as ``torch.optim.LBFGS(max_iter=1)`` when one trial is accepted). The
algebra outside the evaluations is O(mn): the two-loop recursion (4mn + n), ‖∇f‖₁ on the first step,
∇fᵀd, the trial points θ + αd, s, y, sᵀy, sᵀs and the pair append (docs/benchmarks.md, issue 21).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .. import backend
from .base import Optimizer, Problem, StepInfo, check_int, check_range, set_checked
from .costs import CostAssumptions, ModelShapes
from .drivers import close_step, line_search, open_step
from .operators import LBFGSOperator
from .pairs import PairStore
from .registry import register


@dataclass
class LBFGSState:
    """memory: the (s, y) rows (:class:`~.pairs.PairStore`, a ring with its row curvatures, no
    Grams); k: steps done. A step consumes the state it is given (docs/optimizers.md, "State rule")."""

    memory: PairStore
    k: int = 0

    def __post_init__(self) -> None:
        self.memory = PairStore.coerce(self.memory)
        self.memory.ring = True  # read in place by the two-loop (a store from a pre-ring checkpoint too)


@register("lbfgs")
class LBFGS(Optimizer):
    """L-BFGS (two-loop) + strong Wolfe line search; ``forget_every=k`` clears the history every
    k steps (the L-SR1 paper's "forgetting" baseline). Defaults: memory 10 (N&W "between 3 and
    20"), c₁ = 10⁻⁴, c₂ = 0.9 (N&W §3.1 for quasi-Newton), minibatch 128."""

    family = "quasi-newton"
    paper = "Nocedal & Wright (2006) Alg. 7.5; forgetting: Ramamurthy & Duffy (2016) §2"

    def __init__(self, memory: int = 10, batch_size: int | None = 128, c1: float = 1e-4, c2: float = 0.9,
                 forget_every: int | None = None, curvature_eps: float = 1e-10, max_evals: int = 20, tol: float = 0.0):
        self.memory = check_int("memory", memory)
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size)
        self.c1 = check_range("c1", c1, 0.0, 1.0, lo_open=True, hi_open=True)
        self.c2 = check_range("c2", c2, c1, 1.0, lo_open=True, hi_open=True)
        self.forget_every = None if forget_every is None else check_int("forget_every", forget_every)
        set_checked(self, curvature_eps=(curvature_eps, "≥ 0"), max_evals=(max_evals, "int"), tol=(tol, "≥ 0"))

    def init(self, theta: Any) -> LBFGSState:
        memory = PairStore.empty(theta, self.memory, grams=False, ring=True)  # appends move no row
        memory.curvatures()  # sᵢᵀyᵢ kept per pair from the first append: ρᵢ is not re-formed per step
        return LBFGSState(memory)

    cost_formula = "(4m + 9 + 2t)n + m"

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """‖∇f‖ (n), the two-loop d = −H∇f on the kept curvatures (:meth:`~.operators.LBFGSOperator.
        from_store`: ρᵢ k divisions), ∇fᵀd (n), 2 per trial (θ + αd and the Wolfe slope), the pair
        s = αd, its sᵀy, sᵀs test and the kept curvature Σ s⊙y (4n). With forgetting: the mean memory
        over a cycle (approx.)."""
        n, k = shapes.n, assume.pairs_or(self.memory)
        if self.forget_every is not None and assume.pairs is None:
            k = min(k, max(0, (self.forget_every - 1) // 2))
        return {"grad_norm": n, **LBFGSOperator.solve_terms(n, k, kept_curvatures=True), "slope": n,
                "line_search": 2 * assume.trials * n, "pair": 4 * n}

    def step(self, theta: Any, state: LBFGSState, problem: Problem) -> tuple[Any, LBFGSState, StepInfo]:
        o = open_step(problem, self.batch_size, theta, tol=self.tol)
        if o.stop is not None:
            return theta, state, o.stop
        g, f0 = o.g, o.f0
        pairs = state.memory
        if self.forget_every is not None and state.k > 0 and state.k % self.forget_every == 0:
            pairs.clear()
        if pairs.count:
            d = LBFGSOperator.from_store(pairs).solve(g)  # a fresh array: negated in place (exact)
            backend.namespace(d).negative(d, out=d)
        else:
            d = -g
        slope = float(g @ d)
        alpha0 = 1.0 if pairs.count else min(1.0, 1.0 / float(abs(g).sum()))
        ls = line_search(o.obj, theta, d, f0, slope, rule="wolfe", alpha0=alpha0, c1=self.c1, c2=self.c2,
                         max_evals=self.max_evals)
        new_state = dataclasses.replace(state, k=state.k + 1)
        if not ls.success:
            # a failed search on a stochastic batch: keep θ, drop the (possibly stale) history
            pairs.clear()
            return theta, new_state, close_step(o, loss=f0, accepted=False, evals=1 + ls.evals, step_size=0.0,
                                                nonfinite=ls.nonfinite, extra={"pairs": 0, "message": ls.message})
        s = d  # d is this step's own array: s = αd in place, the bits of ``ls.alpha * d`` (θ + s is ls.theta)
        s *= ls.alpha
        y = ls.point.grad - g
        sy, ss = float(s @ y), float(s @ s)
        skipped = 0
        if sy > self.curvature_eps * ss:
            pairs.append(s, y)
        else:
            skipped = 1
        return ls.theta, new_state, close_step(o, loss=ls.value, accepted=True, evals=1 + ls.evals,
                                                step_norm=math.sqrt(ss), step_size=ls.alpha, skipped=skipped,
                                                nonfinite=ls.nonfinite, extra={"pairs": pairs.count})
