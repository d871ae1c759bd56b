"""L-BFGS with a strong Wolfe line search (Nocedal & Wright 2006, Alg. 7.5), optionally with the
"forgetting" of the L-SR1 paper's baseline (history discarded every k steps; Ramamurthy & Duffy
2016, §2).

Per step on one minibatch: d = −H∇f by the two-loop recursion with H₀ = γₖI,
γₖ = sᵀy / yᵀy of the newest pair (N&W eq. 7.20); a strong Wolfe search (c₁ = 10⁻⁴, c₂ = 0.9)
on the same batch; the pair (s, y) is stored only when sᵀy > ε‖s‖² (keeps H positive definite;
ε = 10⁻¹⁰ relative). The first step of a run, or after the memory was cleared, tries
α₀ = min(1, 1/‖∇f‖₁) as SciPy does; later steps try α₀ = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .base import Optimizer, Problem, StepInfo, check_int, check_positive, check_range
from .compact import PairMemory, lbfgs_two_loop
from .linesearch import strong_wolfe
from .registry import register
from ._qn_common import LineFunction, memory_from_state, memory_to_state, open_step


@dataclass
class LBFGSState:
    memory: dict
    k: int = 0


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
        self.curvature_eps = check_positive("curvature_eps", curvature_eps, allow_zero=True)
        self.max_evals = check_int("max_evals", max_evals)
        self.tol = check_positive("tol", tol, allow_zero=True)

    def init(self, theta: Any) -> LBFGSState:
        return LBFGSState(memory_to_state(PairMemory.like(theta, self.memory)))

    def step(self, theta: Any, state: LBFGSState, problem: Problem) -> tuple[Any, LBFGSState, StepInfo]:
        obj, p0, done = open_step(problem, self.batch_size, theta, state, self.tol)
        if done:
            return done
        g, f0 = p0.grad, p0.value
        mem = memory_from_state(state.memory)
        if self.forget_every is not None and state.k > 0 and state.k % self.forget_every == 0:
            mem.clear()
        d = -lbfgs_two_loop(g, mem.S, mem.Y) if mem.count else -g
        slope = float(g @ d)
        alpha0 = 1.0 if mem.count else min(1.0, 1.0 / float(abs(g).sum()))
        line = LineFunction(obj, theta, d)
        ls = strong_wolfe(line.phi_dphi, f0, slope, alpha0=alpha0, c1=self.c1, c2=self.c2, max_evals=self.max_evals)
        state.k += 1
        nonfinite = line.nonfinite
        if not ls.success:
            # a failed search on a stochastic batch: keep θ, drop the (possibly stale) history
            mem.clear()
            state.memory = memory_to_state(mem)
            return theta, state, StepInfo(loss=f0, loss_start=f0, accepted=False, step_size=0.0, evals=1 + ls.n_evals,
                                          nonfinite=nonfinite, batch_size=obj.n_samples,
                                          extra={"pairs": 0, "message": ls.message})
        s = ls.alpha * d
        p1 = line.point(ls.alpha)
        y = p1.grad - g
        sy, ss = float(s @ y), float(s @ s)
        skipped = 0
        if sy > self.curvature_eps * ss:
            mem.push(s, y)
        else:
            skipped = 1
        state.memory = memory_to_state(mem)
        return theta + s, state, StepInfo(loss=p1.value, loss_start=f0, accepted=True, step_norm=math.sqrt(ss),
                                          step_size=ls.alpha, skipped=skipped, evals=1 + ls.n_evals, nonfinite=nonfinite,
                                          batch_size=obj.n_samples, extra={"pairs": mem.count})
