"""KFAC: Kronecker-factored approximate curvature (Martens & Grosse 2015; KFC for conv layers,
Grosse & Martens 2016), as the baseline of Ren's thesis, Algorithm 12 (ch. 3; Algorithm 7 in ch. 2).

Per step k (batch M_k of size m)::

    ĝ ← μ ĝ + ∇f_{M_k}(θ)                                  momentum, Alg. 12 line 7 (μ = β = 0.9)
    P_l = H_G^l ĝ_l H_A^l        for dense/conv blocks W̄_l   (row-major layout, see curvature/kron.py)
    P   = ĝ                      for every other block (BatchNorm γ/β: "the gradient direction",
                                                            thesis §3.7.2 and §4.7.2)
    θ ← θ − α (P + γ θ)                                    γ = weight decay (thesis §3.7.2; default 0)
    if k ≡ 0 (mod T₁): one more pass over M_k at the new θ with targets ỹ sampled from the model
        (``fisher="sampled"``, Alg. 12 line 12; ``"empirical"`` uses the labels), and
        A_l ← β A_l + (1 − β) Â_l,  G_l ← β G_l + (1 − β) Ĝ_l               (line 14)
    if k ≡ 0 (mod T₂): H_A = (A + π√λ I)⁻¹, H_G = (G + √λ/π I)⁻¹,
        π = sqrt((tr A/dim A)/(tr G/dim G))                                   (line 19)

Â, Ĝ follow :mod:`qnref.curvature.kron` (dense: means of āāᵀ, ggᵀ with per-example g; conv: A
summed and G averaged over locations, thesis (3.9)). Before the first step A, G are estimated on
the whole training set (warm start, thesis §3.7.2 "initial estimates of Ω and Γ are computed from
the whole dataset"), in chunks of ``batch_size``; those passes are counted in the problem's counter.

Defaults (MLP autoencoders): lr α = 0.03 and damping λ = 1 (thesis Table 3.5 and Table 4.3, MNIST),
μ = β = 0.9 (Alg. 12 line 1), T₁ = 1, T₂ = 20 (§3.7.1, §4.7.1), batch 1000 (§2.8.2, §3.7.1).
For the CNN experiments the thesis uses T₁ = 10, T₂ = 100 and batch 128 (§3.7.1, §4.7.1).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .. import backend
from ..curvature import kron
from . import _kron_common as kc
from .costs import CostAssumptions, ModelShapes, flops_inv
from .base import Optimizer, Problem, StepInfo, check_bool, check_choice, check_positive
from .drivers import close_step, nonfinite_step
from .registry import register


@dataclass
class KFACState(kc.KronState):
    A: dict = field(default_factory=dict)
    G: dict = field(default_factory=dict)
    HA: dict = field(default_factory=dict)
    HG: dict = field(default_factory=dict)
    pi: dict = field(default_factory=dict)


@register("kfac")
class KFAC(Optimizer):
    """KFAC with factored Tikhonov damping, momentum, EMA statistics (thesis Algorithm 12).

    Parameters: ``lr`` α, ``damping`` λ, ``momentum`` μ, ``beta`` (statistics decay),
    ``stat_freq`` T₁, ``inv_freq`` T₂, ``batch_size`` m (None: full batch), ``fisher``
    ("sampled" true Fisher, or "empirical"), ``use_pi`` (π split; False gives Alg. 7's π = 1),
    ``weight_decay`` γ, ``warm_start`` (estimate A, G on the whole data before step 1).
    """

    family: ClassVar[str] = "kronecker"
    paper: ClassVar[str] = "Martens & Grosse 2015; Grosse & Martens 2016; Ren thesis Alg. 12, Tables 3.5/4.3"

    def __init__(self, lr: float = 0.03, damping: float = 1.0, momentum: float = 0.9, beta: float = 0.9,
                 stat_freq: int = 1, inv_freq: int = 20, batch_size: int | None = 1000, fisher: str = "sampled",
                 use_pi: bool = True, weight_decay: float = 0.0, warm_start: bool = True):
        self.lr, self.momentum, self.beta, self.batch_size, self.weight_decay = kc.check_common(
            lr, momentum, beta, batch_size, weight_decay)
        self.damping = check_positive("damping", damping)
        self.stat_freq = kc.validate_freq("stat_freq", stat_freq)
        self.inv_freq = kc.validate_freq("inv_freq", inv_freq)
        self.fisher = check_choice("fisher", fisher, ("sampled", "empirical"))
        self.use_pi = check_bool("use_pi", use_pi)
        self.warm_start = check_bool("warm_start", warm_start)

    def init(self, theta: Any) -> KFACState:
        xp = backend.namespace(theta)
        return KFACState(mom=xp.zeros_like(theta))

    cost_formula: ClassVar[str] = "Σ o a(o + a) + Σ (N+3)(a² + o²)/T₁ + Σ (a³ + o³ + 3a² + 3o²)/T₂ + 4n"

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """Per dense block (o × a): the preconditioning H_G ∇W̄ H_A, factor statistics
        ((N + 1)(a² + o²)) and their EMA every T₁ steps, the damped inverses (d³ + 3d²) every T₂;
        momentum (n) and the step (2n, + n with weight decay)."""
        n, lay, N = shapes.n, shapes.layers, batch_size
        return {"momentum": n, "precondition": kc.kron_precondition_flops(lay),
                "step": 2 * n + (n if self.weight_decay else 0),
                "factor_statistics": sum((N + 1) * (a * a + o * o) for o, a in lay) / self.stat_freq,
                "factor_ema": sum(2 * (a * a + o * o) for o, a in lay) / self.stat_freq,
                "inverses": sum(flops_inv(d) + 3 * d * d for o, a in lay for d in (o, a)) / self.inv_freq}

    # -- statistics ----------------------------------------------------------------------------------------
    def _batch_factors(self, p) -> dict:
        taps = p.layer_stats(self.fisher)
        return {name: kron.factors(t) for name, t in taps.items()}

    def _warm(self, state: KFACState, problem: Problem, theta: Any, layers) -> int:
        sums: dict = {}
        count = 0
        for obj in kc.warm_objectives(problem, self.batch_size, self.warm_start):
            fac = self._batch_factors(obj.at(theta))
            n = obj.n_samples
            for name, (A, G) in fac.items():
                if name in sums:
                    sums[name] = (sums[name][0] + n * A, sums[name][1] + n * G)
                else:
                    sums[name] = (n * A, n * G)
            count += n
        for L in layers:
            A, G = sums[L.name]
            state.A[L.name], state.G[L.name] = A / count, G / count
        bad = self._invert(state, layers)
        state.initialized = True
        return bad

    def _invert(self, state: KFACState, layers) -> int:
        bad = 0
        for L in layers:
            A, G = state.A[L.name], state.G[L.name]
            HA, HG, pi = kron.damped_inverses(A, G, self.damping, use_pi=self.use_pi)
            if kc.all_finite(HA, HG):
                state.HA[L.name], state.HG[L.name], state.pi[L.name] = HA, HG, pi
            else:
                bad += 1
                if L.name not in state.HA:  # no inverse yet (warm start): (λI)^-1 split over both factors
                    xp, r = backend.namespace(A), 1.0 / math.sqrt(self.damping)
                    state.HA[L.name] = r * xp.eye(A.shape[0], dtype=A.dtype)
                    state.HG[L.name] = r * xp.eye(G.shape[0], dtype=G.dtype)
                    state.pi[L.name] = 1.0
        return bad

    # -- step -------------------------------------------------------------------------------------------------
    def step(self, theta: Any, state: KFACState, problem: Problem) -> tuple[Any, KFACState, StepInfo]:
        layout = problem.layout
        layers, _ = kc.kron_structure(problem.model)
        state, opened = kc.open_kron_step(self, state, problem, theta, layers, KFACState)
        if opened.stop is not None:
            return theta, state, opened.stop
        k = state.k + 1
        mom = self.momentum * state.mom + opened.g
        P = mom.copy()
        pv, mv = layout.views(P), layout.views(mom)
        for L in layers:
            pv[L.block][...] = kron.precondition(mv[L.block], state.HG[L.name], state.HA[L.name])
        moved = kc.descend(theta, P, self.lr, self.weight_decay)
        if moved is None:
            return theta, state, nonfinite_step(opened, self.lr)
        theta_new, step_norm = moved
        new = dataclasses.replace(state, k=k, mom=mom)   # consumes ``state``: its factor dicts change in place
        p_new, loss, evals, failed = kc.second_pass(opened, theta_new, k % self.stat_freq == 0)
        skipped = len(layers) if failed else 0
        if p_new is not None:
            fac = self._batch_factors(p_new)
            for L in layers:
                A, G = fac[L.name]
                if kc.all_finite(A, G):
                    new.A[L.name] = kron.ema(new.A[L.name], A, self.beta)
                    new.G[L.name] = kron.ema(new.G[L.name], G, self.beta)
                else:
                    skipped += 1
        if k % self.inv_freq == 0:
            skipped += self._invert(new, layers)
        info = close_step(opened, loss=loss, accepted=True, evals=evals, step_size=self.lr, step_norm=step_norm,
                          skipped=skipped, extra={"pi": {name: float(v) for name, v in new.pi.items()}})
        return theta_new, new, info
