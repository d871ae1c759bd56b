"""KFAC: Kronecker-factored approximate curvature (Martens & Grosse 2015; KFC for conv layers,
Grosse & Martens 2016), as the baseline of Ren's thesis: Algorithm 12 (ch. 3, ``version="ch3"``,
the default) and Algorithm 7 (ch. 2, ``version="ch2"``).

``version="ch3"``, thesis Algorithm 12 (L1507-1529). Per step k (batch M_k of size m)::

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

``version="ch2"``, thesis Algorithm 7 (L810-824), where it differs from the above::

    ĝ ← μ ĝ + (1 − μ) ∇f_{M_k}(θ)        ch. 2's moving average of the gradient (§2.5.2 item 1, L592;
                                          Alg. 7 uses ĝ, "always initialized as zero", L836);
                                          Alg. 7 has one decay β = 0.9 for ĝ, A and G (L897-907):
                                          ``momentum`` and ``beta`` both default to it
    statistics every step (l. 8-9; ``stat_freq`` T₁ = 1 by default, a larger T₁ is this code's
        generalisation), at the new θ with ỹ sampled from the model (l. 8)
    if k ≤ T or k ≡ 0 (mod T): H_A = (A + √λ I)⁻¹, H_G = (G + √λ I)⁻¹    l. 10-11: π = 1 (``use_pi``
        is Alg. 12's option and is not used), T = ``inv_freq`` (T = 20, L907)

Alg. 7 has no weight decay (ch. 2 puts (η/2)‖θ‖² in the loss, L848: the problem's ``l2``); ``weight_decay``
γ still applies when set. BatchNorm blocks (not in ch. 2's autoencoders) move along ĝ as in Alg. 12.
Ch. 2's tuned (α, λ) are (1, 3), (0.1, 0.1), (0.3, 0.3) on MNIST, FACES, CURVES (Table 2.5, L884-886):
pass them explicitly; the defaults are ch. 3's.

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
from .costs import CostAssumptions, ModelShapes, flops_spd_inv
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
    """KFAC with factored Tikhonov damping, momentum, EMA statistics (thesis Algorithm 12, or
    Algorithm 7 with ``version="ch2"``).

    Parameters: ``lr`` α, ``damping`` λ, ``momentum`` μ, ``beta`` (statistics decay),
    ``stat_freq`` T₁, ``inv_freq`` T₂, ``batch_size`` m (None: full batch), ``fisher``
    ("sampled" true Fisher, "empirical" (KFAC-EF, §4.7.3) or "exact": the type-2 factors
    G = Eₓ E_{ỹ~p(y|x)}[ggᵀ], one backward per output, Botev et al. 2017), ``use_pi`` (π split of
    Alg. 12; False: π = 1), ``weight_decay`` γ, ``warm_start`` (estimate A, G on the whole data before
    step 1), ``version`` ("ch3" = Alg. 12, "ch2" = Alg. 7: ĝ ← μĝ + (1−μ)∇f, π = 1, inverses when
    k ≤ T₂ or k ≡ 0 mod T₂).
    """

    family: ClassVar[str] = "kronecker"
    paper: ClassVar[str] = "Martens & Grosse 2015; Grosse & Martens 2016; Ren thesis Alg. 12, Tables 3.5/4.3"

    def __init__(self, lr: float = 0.03, damping: float = 1.0, momentum: float = 0.9, beta: float = 0.9,
                 stat_freq: int = 1, inv_freq: int = 20, batch_size: int | None = 1000, fisher: str = "sampled",
                 use_pi: bool = True, weight_decay: float = 0.0, warm_start: bool = True, version: str = "ch3"):
        self.lr, self.momentum, self.beta, self.batch_size, self.weight_decay = kc.check_common(
            lr, momentum, beta, batch_size, weight_decay)
        self.damping = check_positive("damping", damping)
        self.stat_freq = kc.validate_freq("stat_freq", stat_freq)
        self.inv_freq = kc.validate_freq("inv_freq", inv_freq)
        self.fisher = check_choice("fisher", fisher, ("sampled", "empirical", "exact"))
        self.use_pi = check_bool("use_pi", use_pi)
        self.warm_start = check_bool("warm_start", warm_start)
        self.version = check_choice("version", version, ("ch3", "ch2"))

    @property
    def _pi_split(self) -> bool:
        """Alg. 12 l. 19 splits the damping by π; Alg. 7 l. 11 uses π = 1."""
        return self.use_pi and self.version == "ch3"

    def _inverses_due(self, k: int) -> bool:
        """Alg. 12 l. 17: k ≡ 0 (mod T₂); Alg. 7 l. 10: k ≤ T or k ≡ 0 (mod T)."""
        return k % self.inv_freq == 0 or (self.version == "ch2" and k <= self.inv_freq)

    def init(self, theta: Any) -> KFACState:
        xp = backend.namespace(theta)
        return KFACState(mom=xp.zeros_like(theta))

    cost_formula: ClassVar[str] = ("Σ o a(o + a) + Σ (N+3)(a² + o²)/T₁ + Σ (a³ + o³ + 3a² + 3o²)/T₂ + 4n "
                                   "(ch2: 5n; fisher='exact': N·C o² for G)")

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """Per dense block (o × a): the preconditioning H_G ∇W̄ H_A, factor statistics
        ((N + 1)(a² + o²)) and their EMA every T₁ steps, the damped inverses (d³ + 3d²) every T₂;
        momentum (n) and the step (2n, + n with weight decay)."""
        n, lay, N = shapes.n, shapes.layers, batch_size
        N_g = N * shapes.out if self.fisher == "exact" else N   # type-2: C outer products per example
        return {"momentum": n if self.version == "ch3" else 2 * n, "precondition": kc.kron_precondition_flops(lay),
                "step": 2 * n + (n if self.weight_decay else 0),
                "factor_statistics": sum((N + 1) * a * a + (N_g + 1) * o * o for o, a in lay) / self.stat_freq,
                "factor_ema": sum(2 * (a * a + o * o) for o, a in lay) / self.stat_freq,
                "inverses": sum(flops_spd_inv(d) + 3 * d * d for o, a in lay for d in (o, a)) / self.inv_freq}

    def step_floor(self, model: Any, batch_size: int | None = None) -> dict[str, float]:
        """A floor on one step's cost as a multiple of one gradient (issue 21), from the layer GEMMs alone.

        One gradient on N examples costs 3·N·Lₗ·oₗ·aₗ multiplications per Kronecker layer (forward W̄ā,
        ∂W̄ = gᵀā, ∂ā = W̄ᵀg; Lₗ output locations, 1 for dense layers) — elementwise work, activations and
        BatchNorm are left out, so the real gradient costs more and every ratio here is a lower bound of
        its kind. Per step KFAC adds, every T₁ steps, the curvature pass at θ⁺ (forward + ∂ā: 2·N·L·o·a;
        with ``fisher="exact"`` C backward passes instead of one) and the symmetric factor products N·L·(a(a+1) + o(o+1))/2
        (C·N·L·o(o+1)/2 for G of type 2), every T₂ steps the inverses (a³ + o³), and every step the
        preconditioning o²a + oa² and the vector work (momentum and step: 3n, ch2 4n, + n with weight decay). Returns the terms (multiplications), the
        gradient's, ``passes`` (gradient equivalents of the passes: 1 + (2/3)/T₁) and ``floor`` (the
        step in gradients: passes + algebra / gradient). An SGD-momentum step costs one gradient + 3n,
        so ``floor`` is also a floor of the KFAC / SGD-m step-time ratio at the same batch."""
        from .costs import model_shapes  # noqa: PLC0415

        shapes = model_shapes(model)
        N = int(batch_size if batch_size is not None else (self.batch_size or 1000))
        locs = []
        for layer in model.kron_layers:
            out = tuple(getattr(layer, "out_shape", ()) or ())
            locs.append(int(math.prod(out[1:])) if (not getattr(layer, "kron_dense", False) and len(out) > 1) else 1)
        C = shapes.out if self.fisher == "exact" else 1
        grad = sum(3 * N * L * o * a for (o, a), L in zip(shapes.layers, locs))
        curv_pass = sum((1 + C) * N * L * o * a for (o, a), L in zip(shapes.layers, locs)) / self.stat_freq
        # A = āᵀā/N and G are symmetric: a rank-k update (BLAS syrk, which NumPy's ``x.T @ x`` calls) costs
        # rows·d(d+1)/2
        stats = sum(N * L * (a * (a + 1) + C * o * (o + 1)) / 2 for (o, a), L in zip(shapes.layers, locs)) / self.stat_freq
        inverses = sum(flops_spd_inv(d) for o, a in shapes.layers for d in (o, a)) / self.inv_freq
        precond = kc.kron_precondition_flops(shapes.layers)
        vector = (3 if self.version == "ch3" else 4) * shapes.n + (shapes.n if self.weight_decay else 0)
        algebra = stats + inverses + precond + vector
        return {"gradient": grad, "curvature_pass": curv_pass, "factor_statistics": stats, "inverses": inverses,
                "precondition": precond, "vector": vector, "passes": 1 + curv_pass / grad if grad else math.inf,
                "floor": (grad + curv_pass + algebra) / grad if grad else math.inf}

    # -- statistics ----------------------------------------------------------------------------------------
    def _batch_factors(self, p) -> dict:
        # each layer's tap becomes its (A, G) during the backward pass: no tap outlives its layer
        return p.layer_stats(self.fisher, lambda name, t: kron.factors(t))

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
            HA, HG, pi = kron.damped_inverses(A, G, self.damping, use_pi=self._pi_split)
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
        layers, others = kc.kron_structure(problem.model)
        state, opened = kc.open_kron_step(self, state, problem, theta, layers, KFACState)
        if opened.stop is not None:
            return theta, state, opened.stop
        k = state.k + 1
        if self.version == "ch3":
            mom = self.momentum * state.mom + opened.g                     # Alg. 12 l. 7
        else:
            mom = self.momentum * state.mom + (1.0 - self.momentum) * opened.g   # §2.5.2 (L592)
        # the Kronecker blocks are overwritten below; only the other blocks keep the momentum
        P = mom.copy() if others else backend.namespace(mom).empty_like(mom)
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
        if self._inverses_due(k):
            skipped += self._invert(new, layers)
        info = close_step(opened, loss=loss, accepted=True, evals=evals, step_size=self.lr, step_norm=step_norm,
                          skipped=skipped, extra={"pi": {name: float(v) for name, v in new.pi.items()}})
        return theta_new, new, info
