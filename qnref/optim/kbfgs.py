"""K-BFGS and K-BFGS(L): Kronecker-factored quasi-Newton methods (Ren's thesis ch. 2 and 3;
Goldfarb, Ren & Bahamou 2020; Ren, Bahamou & Goldfarb 2021).

Each dense/conv block W̄_l is preconditioned by H_A^l ⊗ H_G^l ≈ (A_l ⊗ G_l)⁻¹ (thesis (2.4), (3.10));
in our row-major layout the step is  P_l = H_G^l ĝ_l H_A^l  (see :mod:`qnref.curvature.kron`).

``version="ch3"`` (default; thesis Algorithm 9, the improved method, "K-BFGS" in Table 3.3)::

    ĝ ← β ĝ + ∇f_M(θ);  θ_l ← θ_l − α H_G ĝ_l H_A;  other blocks: θ ← θ − (α/λ) ĝ   (§3.4.3)
    every T steps, with a second forward/backward pass over the same batch at θ⁺:
      H_A: "minibatched" Hessian-action BFGS (§3.3.2, (3.14)-(3.15)):
           s_A = H_A â,  y_A = Ã s_A + λ_A s_A,  Ã = Eᵢ[Σₜ āᵢₜāᵢₜᵀ] of the batch (never formed)
      H_G: s_G ← β s_G + (1−β)(h̄⁺ − h̄),  y_G ← β y_G + (1−β)(ḡ⁺ − ḡ)      ((3.12)-(3.13))
           (s̃, ỹ) = D_P D_LM(s_G, y_G; H_G, μ₁, λ_G)                      (Algorithm 8)
           BFGS update of H_G (K-BFGS) or append (s̃, ỹ) to the L-BFGS memory (K-BFGS(L))
    init: A from the whole training set, H_A = (A + λ_A I)⁻¹, H_G = λ_G⁻¹ I (L-BFGS: H₀ = λ_G⁻¹ I)

``version="ch2"`` (thesis Algorithm 4, "K-BFGS-20", MLPs)::

    ĝ ← β ĝ + (1−β) ∇f_M(θ)                                           (§2.5.2 item 1)
    H_A: A ← β A + (1−β) Ã (moving average), s_A = H_A ā̄, y_A = (A + λ_A I) s_A       (§2.4)
    H_G: (s̃, ỹ) = DD(s_G, y_G; H_G, μ₁, μ₂ = λ_G), double damping (Algorithm 3), μ₂ ≤ 1
    init: H_G = I (L-BFGS: H₀ = I), H_A = (A + λ_A I)⁻¹ from the whole training set; T = 1

Here h̄ = Eᵢ[(1/L)Σₜ hᵢₜ] and ḡ = Eᵢ[(1/L)Σₜ gᵢₜ] are batch means of the pre-activations and of the
per-example pre-activation gradients ∂ℓᵢ/∂hᵢ (L = 1 for dense layers), â the batch mean of ā.
Damping split (§3.3.2, §3.4.3): λ_A = √L √λ, λ_G = √λ / √L (dense: √λ each).
Pairs with s̃ᵀỹ ≤ 0 or non-finite entries are skipped (counted in ``StepInfo.skipped``); the thesis
always updates (§2.3: after damping s̃ᵀỹ > 0 holds by construction unless s̃ = 0). Components of
ḡ⁺ − ḡ below the rounding bound of the two means (:func:`~qnref.curvature.kron.mean_g_rounding`)
are taken as 0: for a layer feeding BatchNorm ḡ = 0 exactly, y_G = 0 and the update leaves
H_G = I/λ_G, as in exact arithmetic, instead of an O(1) update made of rounding noise.

The version is a preset of three independent pieces, each of which can be set on its own
(``None``: the version's choice), plus four options that both versions leave off:

================  =========================================  ======================  =======================
hyperparameter    choices                                    ``ch3`` (Alg. 9)        ``ch2`` (Alg. 4)
================  =========================================  ======================  =======================
damping_scheme    "dpdlm" (Alg. 8), "dd" (Alg. 3),           "dpdlm"                 "dd"
                  "dpidlm" (D_P(I) D_LM, Alg. 11)
hessian_action    the estimate of A: "minibatch" Ã of the    "minibatch"             "moving-average"
                  batch ((3.14)-(3.15)) or "moving-average"
                  A ← βA + (1−β)Ã (§2.4)
gradient          ĝ: "momentum" βĝ + ∇f (Alg. 9 l. 8),       "momentum"              "moving-average"
                  "moving-average" βĝ + (1−β)∇f (Alg. 4
                  l. 8), "minibatch" ∇f (Alg. 5 l. 8, 10 l. 6)
exact_inverse     H_A = (A + λ_A I)⁻¹ of that estimate of A  False                   False
                  every T steps instead of the BFGS update
                  (Alg. 5 l. 21-23; Alg. 10 l. 12)
skip              skip the H_G update when s̃ᵀỹ < μ₁ỹᵀH_Gỹ   False                   False
                  (Alg. 5 l. 17, the "DD-skip")
lr_power          α_k = α k^(−lr_power), lr_power ∈ (0.5, 1)  None (α constant)       None
                  (Theorems 2 and 4)
double_grad       ∇f ← ½(∇f_M + ∇f⁺ of the previous step's    False                   False
                  curvature pass at this θ) (§2.8.3)
================  =========================================  ======================  =======================

The version alone fixes H_G⁽⁰⁾ (λ_G⁻¹ I for ch3, I for ch2). :data:`VARIANTS` names the settings of
the thesis's other algorithms: Table 3.8's ablation rows, the convergence variants Alg. 5 (§2.7) and
Alg. 10 (§3.6) and §2.8.3's double-grad (docs/kbfgs.md).

Non-curvature steps (k ≢ 0 mod T) take the objective's plain gradient (one backward pass); the
layer taps (ā, g) are built only on curvature steps, where the H_A/H_G updates need them (issue 21).

Defaults (MLP autoencoders, batch 1000, thesis §3.7.1): α = 0.03, λ = 0.3 (Table 3.5, MNIST,
both K-BFGS and K-BFGS(L)), β = 0.9, μ₁ = 0.2 (Algorithm 9 line 1), T = 1 (§3.7.1; CNNs: T = 20,
§3.7.1), L-BFGS memory p = 100 (§2.8.2, §3.4.3). Chapter-2 defaults from Table 2.6 (batch 100,
MNIST) are α = 0.1, λ = 0.3 for both versions; pass them explicitly with ``version="ch2"``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .. import backend
from ..curvature import kron
from . import _kron_common as kc
from .costs import CostAssumptions, ModelShapes, flops_inv, flops_spd_inv
from .base import Optimizer, Problem, StepInfo, check_bool, check_choice, check_int, check_positive, check_range
from .operators import LBFGSOperator, bfgs_inverse_update
from .pairs import PairStore
from .drivers import close_step, nonfinite_step
from .registry import register

#: the pieces each ``version`` presets (module docstring table)
PRESETS: dict[str, dict[str, str]] = {
    "ch3": {"damping_scheme": "dpdlm", "hessian_action": "minibatch", "gradient": "momentum"},
    "ch2": {"damping_scheme": "dd", "hessian_action": "moving-average", "gradient": "moving-average"},
}
DAMPING_SCHEMES = ("dpdlm", "dd", "dpidlm")
HESSIAN_ACTIONS = ("minibatch", "moving-average")
GRADIENTS = ("momentum", "moving-average", "minibatch")

#: The thesis's other K-BFGS algorithms as settings of ``kbfgs`` / ``kbfgs-l`` (docs/kbfgs.md):
#: ``make_optimizer("kbfgs-l", **VARIANTS["alg5"])``. Table 3.8 rows: "K-BFGS" = ``version="ch3"``,
#: "K-BFGS-20" = ``version="ch2"``, "#1 off" / "#2 off" below. Alg. 5 and Alg. 10 are K-BFGS(L)
#: algorithms (their proofs bound the L-BFGS matrix); with ``kbfgs`` they give the BFGS analogue.
#: ``lr_power`` 0.9: Theorems 2/4 ask for α_k ∝ k^(−β), β ∈ (0.5, 1), and give no value; Alg. 5 l. 1
#: sets β = 0.9 with the same letter, which we take as the default exponent.
VARIANTS: dict[str, dict[str, Any]] = {
    "table3.8-#1-off": {"version": "ch3", "damping_scheme": "dd"},
    "table3.8-#2-off": {"version": "ch3", "hessian_action": "moving-average"},
    "alg5": {"version": "ch2", "exact_inverse": True, "gradient": "minibatch", "skip": True, "lr_power": 0.9},
    "alg10": {"version": "ch3", "damping_scheme": "dpidlm", "exact_inverse": True, "gradient": "minibatch",
              "lr_power": 0.9},
    "double-grad": {"version": "ch2", "double_grad": True},
}


def _lbfgs_setup_flops(o: int, p: int) -> float:
    """The compact L-BFGS operator's middle with p pairs in R^o (once per layer and step, shared by
    the step's products: ``KBFGS._apply_HG``): SYᵀ and YYᵀ, R⁻¹, R⁻ᵀ(D + γYYᵀ)R⁻¹, γY."""
    return 0 if p == 0 else 2 * p * p * o + flops_inv(p) + p * p + 2 * p ** 3 + o * p


def _lbfgs_apply_flops(o: int, p: int, c: int) -> float:
    """The L-BFGS product with H_G on an o × c block with p pairs (H₀ = γI), its middle built."""
    if p == 0:
        return o * c
    return 2 * p * o * c + 4 * p * p * c + 2 * p * o * c + o * c


def _bfgs_inverse_update_flops(d: int) -> float:
    """The dense inverse BFGS update as counted for K-BFGS: H y (d²), six d² elementwise products,
    two dots."""
    return 7 * d * d + 2 * d


@dataclass
class KBFGSState(kc.KronState):
    HA: dict = field(default_factory=dict)
    HG: dict = field(default_factory=dict)      # K-BFGS: dense H_G
    pairs: dict = field(default_factory=dict)   # K-BFGS(L): per layer, the (s̃, ỹ) pairs of H_G (PairStore rows)
    sG: dict = field(default_factory=dict)
    yG: dict = field(default_factory=dict)
    A: dict = field(default_factory=dict)       # hessian_action="moving-average" only: moving average of A
    lam: dict = field(default_factory=dict)     # per layer (λ_A, λ_G)
    grad_plus: Any = None                       # double_grad: ∇f at θ on the previous step's batch (its θ⁺ pass)

    def __post_init__(self) -> None:
        # a state restored from a checkpoint holds the stores' plain dicts
        self.pairs = {name: PairStore.coerce(v) for name, v in self.pairs.items()}


@register("kbfgs")
class KBFGS(Optimizer):
    """K-BFGS (BFGS for H_G); see the module docstring. ``memory=None`` means full BFGS."""

    family: ClassVar[str] = "kronecker"
    paper: ClassVar[str] = "Ren thesis ch. 2-3 (Alg. 3, 4, 5, 8, 9, 10, 11; Tables 2.6, 3.5, 3.8; §2.8.3)"
    _limited: ClassVar[bool] = False

    def __init__(self, lr: float = 0.03, damping: float = 0.3, beta: float = 0.9, mu1: float = 0.2,
                 curvature_freq: int = 1, batch_size: int | None = 1000, version: str = "ch3",
                 weight_decay: float = 0.0, warm_start: bool = True, memory: int | None = None,
                 damping_scheme: str | None = None, hessian_action: str | None = None, gradient: str | None = None,
                 exact_inverse: bool = False, skip: bool = False, lr_power: float | None = None,
                 double_grad: bool = False):
        self.lr, _, self.beta, self.batch_size, self.weight_decay = kc.check_common(lr, 0.0, beta, batch_size, weight_decay)
        self.damping = check_positive("damping", damping)
        self.mu1 = check_range("mu1", mu1, 0.0, 1.0, lo_open=True, hi_open=True)
        self.curvature_freq = kc.validate_freq("curvature_freq", curvature_freq)
        check_choice("version", version, tuple(PRESETS))
        self.version = version
        preset = PRESETS[version]
        self.damping_scheme = check_choice("damping_scheme", preset["damping_scheme"] if damping_scheme is None
                                           else damping_scheme, DAMPING_SCHEMES)
        self.hessian_action = check_choice("hessian_action", preset["hessian_action"] if hessian_action is None
                                           else hessian_action, HESSIAN_ACTIONS)
        self.gradient = check_choice("gradient", preset["gradient"] if gradient is None else gradient, GRADIENTS)
        if self.damping_scheme == "dd" and damping > 1:
            raise ValueError(f"double damping (damping_scheme='dd', version='ch2') uses μ₂ = √λ ∈ (0, 1] "
                             f"(thesis §2.3.1); got damping={damping}")
        self.exact_inverse = check_bool("exact_inverse", exact_inverse)
        self.skip = check_bool("skip", skip)
        self.lr_power = None if lr_power is None else check_range("lr_power", lr_power, 0.5, 1.0, lo_open=True,
                                                                  hi_open=True)
        self.double_grad = check_bool("double_grad", double_grad)
        self.warm_start = check_bool("warm_start", warm_start)
        if self._limited:
            self.memory = check_int("memory", 100 if memory is None else memory, 1)
        elif memory is not None:
            raise ValueError("memory is a K-BFGS(L) option; use the 'kbfgs-l' optimizer")
        else:
            self.memory = None

    def init(self, theta: Any) -> KBFGSState:
        return KBFGSState(mom=backend.namespace(theta).zeros_like(theta))

    def step_size(self, k: int) -> float:
        """α_k: α, or α k^(−lr_power) (thesis Theorems 2 and 4: α_k = κ/(L κ̄²) k^(−β), β ∈ (0.5, 1))."""
        return self.lr if self.lr_power is None else self.lr * float(k) ** (-self.lr_power)

    cost_formula: ClassVar[str] = "Σ o a(o + a) + Σ[(N+1)oa + 2Na + 8a² + 8o² + 2oa + …]/T + 4n"

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """∇W̄ = gᵀā/N from the taps (curvature steps only; other steps take the objective's
        gradient), the gradient estimate, the scale and the step; the preconditioning
        H_G ∇W̄ H_A (K-BFGS(L): H_G by L-BFGS with p pairs); every T steps per layer the H_A update
        (â, H_A â, the ã-action or the moving average, λ_A s_A, s_Aᵀy_A, the BFGS update; or the
        estimate of A and its damped inverse) and the H_G update (h̄ at both points, ḡ means, the
        EMAs of s_G and y_G, H_G y, damping, the skip test, update). Conv layers: N stands for
        N·|T| in the A terms (the shapes carry no locations)."""
        n, lay, N, T = shapes.n, shapes.layers, batch_size, self.curvature_freq
        limited = self.memory is not None
        p = assume.pairs_or(self.memory or 0)
        t = {"grad_from_taps": sum((N + 1) * o * a for o, a in lay) / T if not shapes.others else 0,
             "momentum": {"momentum": n, "moving-average": 2 * n, "minibatch": 0}[self.gradient],
             "scale": n, "step": 2 * n,
             "precondition": (sum(o * a * a + _lbfgs_setup_flops(o, p) + _lbfgs_apply_flops(o, p, a) for o, a in lay)
                              if limited else kc.kron_precondition_flops(lay))}
        if self.double_grad:
            t["double_grad"] = n
        upd_a = upd_g = 0.0
        for o, a in lay:
            est = N * a * a + a * a + (2 * a * a if self.hessian_action == "moving-average" else 0)
            if self.exact_inverse:
                upd_a += est + a * a + flops_spd_inv(a) + 2 * a * a     # + λ_A I, sym, inverse, sym
            else:
                ya = 2 * N * a + a if self.hessian_action == "minibatch" else est + a * a
                upd_a += 3 * a + a * a + ya + _bfgs_inverse_update_flops(a)
            hg = _lbfgs_apply_flops(o, p, 1) if limited else o * o
            upd_g += 2 * a + 2 * o * a + 10 * o + (o if self.damping_scheme == "dpidlm" else hg)
            upd_g += o if self.damping_scheme == "dd" else 0
            upd_g += hg + 2 * o if self.skip else 0
            upd_g += 0 if limited else _bfgs_inverse_update_flops(o)
        return {**t, "HA_update": upd_a / T, "HG_update": upd_g / T}

    def step_floor(self, model: Any, batch_size: int | None = None) -> dict[str, float]:
        """The least a K-BFGS step must do, as a multiple of a gradient (issue 21; the keys
        ``gradient``, ``passes`` and ``floor`` of every method's ``step_floor``).

        Per Kronecker layer with output size o, input size a (= d_in + 1; conv: C_in·kh·kw + 1) and
        |T| output locations (1 for dense layers), a gradient's GEMMs cost G = Σ 3N|T|oa
        multiplications (forward h = W̄ā, ∂W̄ and ∂ā, N|T|oa each). On top of it a step must do

        - ``extra_passes`` = 1/T: a second forward/backward over the batch at θ⁺ every T steps, whose
          GEMMs are ``second_pass`` = (2/3)·G/T (forward and ∂ā; the taps replace ∂W̄);
        - ``precondition`` = Σ (o²a + oa²) (BFGS) or Σ (oa² + 4p·oa) (L-BFGS, p pairs), every step;
        - ``curvature`` = Σ [2N|T|a + 7a² + 2oa + (8o² or 4p·o)] / T: the Hessian action on s_A, the
          BFGS update of H_A, h̄ at both points, the H_G product and its update.

        ``passes`` = 1 + (2/3)/T (the gradient and the second pass, in gradients) and ``floor`` =
        1 + (second_pass + precondition + curvature) / G, the floor of the measured K-BFGS step /
        gradient and of the K-BFGS step / SGD step (element-wise work, the taps' patch matrices, BatchNorm and the
        curvature step's first-pass taps, which replace the gradient's ∂W̄ GEMM, not counted).
        """
        N = int(batch_size if batch_size is not None else (self.batch_size or 1000))
        layers, _ = kc.kron_structure(model)
        by_name = {layer.name: layer for layer in model.kron_layers}
        T = self.curvature_freq
        p = self.memory or 0
        grad = pre = curv = 0.0
        for L in layers:
            o, a = L.shape
            out = tuple(getattr(by_name[L.name], "out_shape", ()))
            locs = int(out[1] * out[2]) if L.kind == "conv" and len(out) == 3 else 1
            grad += 3 * N * locs * o * a
            pre += o * a * a + (4 * p * o * a if self.memory is not None else o * o * a)
            curv += 2 * N * locs * a + 7 * a * a + 2 * o * a + (4 * p * o if self.memory is not None else 8 * o * o)
        second = 2.0 * grad / (3 * T)
        extra = second + pre + curv / T
        return {"gradient": grad, "extra_passes": 1.0 / T, "second_pass": second, "precondition": pre,
                "curvature": curv / T, "passes": 1.0 + second / grad if grad else 1.0,
                "floor": 1.0 + extra / grad if grad else 1.0}

    # -- initialisation ----------------------------------------------------------------------------------
    def _warm(self, state: KBFGSState, problem: Problem, theta: Any, layers) -> None:
        xp = backend.namespace(theta)
        sums: dict = {}
        locs: dict = {}
        count = 0
        for obj in kc.warm_objectives(problem, self.batch_size, self.warm_start):
            stats = obj.at(theta).layer_stats("empirical", lambda name, t: (kron.factor_sums(t, need_g=False)[0],
                                                                             kron.locations(t)))
            for name, (sa, locs[name]) in stats.items():
                sums[name] = sums.get(name, 0) + sa
            count += obj.n_samples
        for L in layers:
            A = sums[L.name] / count
            lamA, lamG = kc.sqrt_split(self.damping, locs[L.name])
            state.lam[L.name] = (lamA, lamG)
            state.HA[L.name] = kron.spd_inverse(kron.plus_identity(A, lamA), lower=True)
            if self.hessian_action == "moving-average":
                state.A[L.name] = A
            d_out = L.shape[0]
            if self.memory is None:
                state.HG[L.name] = xp.eye(d_out, dtype=theta.dtype) * self._h0(lamG)
            else:
                state.pairs[L.name] = PairStore.empty(xp.zeros(d_out, dtype=theta.dtype), self.memory, grams=False)
            state.sG[L.name] = xp.zeros(d_out, dtype=theta.dtype)
            state.yG[L.name] = xp.zeros(d_out, dtype=theta.dtype)
        state.initialized = True

    def _h0(self, lamG: float) -> float:
        """Scale γ of the initial H_G = γ I: 1/λ_G (Alg. 9 line 3) or 1 (Alg. 4 line 3)."""
        return 1.0 / lamG if self.version == "ch3" else 1.0

    def _apply_HG(self, state: KBFGSState, name: str, X: Any, ops: dict | None = None) -> Any:
        """H_G X: the dense BFGS matrix, or (K-BFGS(L)) the compact L-BFGS inverse with H₀ = γ I
        (Byrd, Nocedal & Schnabel 1994 eq. (3.1); the thesis's "non-loop" form, §2.3) on X's columns.

        ``ops`` (K-BFGS(L)) keeps each layer's operator, whose 2p × 2p middle matrix costs O(p²o + p³),
        between the products of one step: the preconditioning and the damping's H_G y see the same
        pairs (the new pair is appended after both), so the second product reuses the first's middle."""
        if self.memory is None:
            return state.HG[name] @ X
        op = None if ops is None else ops.get(name)
        if op is None:
            pairs = state.pairs[name]
            op = LBFGSOperator(pairs.S, pairs.Y, self._h0(state.lam[name][1]))
            if ops is not None:
                ops[name] = op
        return op.solve_compact(X)

    # -- step -----------------------------------------------------------------------------------------------
    def _summarize(self, st: KBFGSState, need_grad: bool, at_theta: bool):
        """The ``layer_stats`` reducer: what the updates need of one layer's tap, computed while the
        tap exists (:meth:`~qnref.curvature.objective.Point.layer_stats`): â, ḡ and its rounding
        bound, ∇W̄ (``need_grad``) and, at θ (``at_theta``), the H_A update's statistics — s_A = H_A â
        with Ã s_A ((3.14)-(3.15)), or the batch's A for the moving average / exact inverse."""
        def reduce(name: str, t: Any) -> dict:
            out = {"mean_a": kron.mean_a(t), "mean_g": kron.mean_g(t), "g_round": kron.mean_g_rounding(t)}
            if need_grad:
                out["grad"] = kron.weight_grad(t)
            if at_theta:
                if self.hessian_action == "moving-average" or self.exact_inverse:
                    out["A"] = kron.factor_A(t)
                else:
                    out["sA"] = st.HA[name] @ out["mean_a"]
                    out["AsA"] = kron.apply_A(t, out["sA"])
            return out
        return reduce

    def step(self, theta: Any, state: KBFGSState, problem: Problem) -> tuple[Any, KBFGSState, StepInfo]:
        layout = problem.layout
        layers, others = kc.kron_structure(problem.model)
        state, opened = kc.open_kron_step(self, state, problem, theta, layers, KBFGSState, need_grad=False)
        if opened.stop is not None:
            return theta, state, opened.stop
        p = opened.point
        k = state.k + 1
        due = k % self.curvature_freq == 0
        # the layer taps only where the curvature update needs them (issue 21); otherwise the plain gradient
        taps = p.layer_stats("empirical", self._summarize(state, not others, True)) if due else None
        grad = kc.grad_from_blocks(layout, layers, {n: t["grad"] for n, t in taps.items()}, p) if due and not others \
            else p.grad
        if self.double_grad and state.grad_plus is not None:
            grad = 0.5 * (grad + state.grad_plus)      # a gradient on both batches at this θ (§2.8.3)
        if not backend.all_finite(grad):
            return theta, state, nonfinite_step(opened, self.step_size(k))
        if self.gradient == "minibatch":
            mom = grad                                   # Alg. 5 l. 8, Alg. 10 l. 6
        else:
            mom = self.beta * state.mom + (grad if self.gradient == "momentum" else (1.0 - self.beta) * grad)
        lr = self.step_size(k)
        # non-Kronecker blocks: momentum with rate α/λ (thesis §3.4.3); the Kronecker ones are overwritten below
        P = mom / self.damping if others else backend.namespace(mom).empty_like(mom)
        pv, mv = layout.views(P), layout.views(mom)
        ops = {}    # K-BFGS(L): each layer's compact operator, shared by this step's products (_apply_HG)
        for L in layers:
            pv[L.block][...] = self._apply_HG(state, L.name, mv[L.block] @ state.HA[L.name], ops)
        moved = kc.descend(theta, P, lr, self.weight_decay)
        if moved is None:
            return theta, state, nonfinite_step(opened, lr)
        theta_new, step_norm = moved
        # consumes ``state``: its per-layer dicts change in place
        new = dataclasses.replace(state, k=k, mom=mom, grad_plus=None)
        p_new, loss, evals, failed = kc.second_pass(opened, theta_new, k % self.curvature_freq == 0)
        skipped = 2 * len(layers) if failed else 0
        if p_new is not None:
            taps_new = p_new.layer_stats("empirical", self._summarize(new, self.double_grad and not others, False))
            if self.double_grad:
                g_plus = (kc.grad_from_blocks(layout, layers, {n: t["grad"] for n, t in taps_new.items()}, p_new)
                          if not others else p_new.grad)
                new.grad_plus = g_plus if backend.all_finite(g_plus) else None
            w_old, w_new = layout.views(theta), layout.views(theta_new)
            for L in layers:
                skipped += self._update_layer(new, L, taps[L.name], taps_new[L.name], w_old[L.block], w_new[L.block],
                                              ops)
        info = close_step(opened, loss=loss, accepted=True, evals=evals, step_size=lr, step_norm=step_norm,
                          skipped=skipped)
        return theta_new, new, info

    def _update_HA(self, st: KBFGSState, name: str, t: dict, lamA: float) -> int:
        """H_A from the summary ``t`` of the tap at θ (:meth:`_summarize`); returns 1 when the update is
        refused (non-finite, sᵀy ≤ 0)."""
        HA = st.HA[name]
        if self.hessian_action == "moving-average":
            A = kron.ema(st.A[name], t["A"], self.beta)
            st.A[name] = A
        if self.exact_inverse:
            # H_A = (A + λ_A I)⁻¹ of the moving average (Alg. 5 l. 21-23) or of the batch's Ã (Alg. 10 l. 12)
            if self.hessian_action == "minibatch":
                A = t["A"]
            H = kron.spd_inverse(kron.plus_identity(A, lamA), lower=True)
            if not kc.all_finite(H):
                return 1
            st.HA[name] = H
            return 0
        # Hessian-action BFGS: s_A = H_A â, y_A = (A + λ_A I) s_A
        if self.hessian_action == "minibatch":
            sA = t["sA"]
            yA = t["AsA"] + lamA * sA
        else:
            sA = HA @ t["mean_a"]
            yA = A @ sA + lamA * sA
        if kc.all_finite(sA, yA) and float(sA @ yA) > 0:
            st.HA[name] = bfgs_inverse_update(HA, sA, yA)
            return 0
        return 1

    def _update_layer(self, st: KBFGSState, L, t, t_new, w_old, w_new, ops: dict | None = None) -> int:
        """Curvature updates of one layer; returns the number of skipped updates."""
        name = L.name
        lamA, lamG = st.lam[name]
        skipped = self._update_HA(st, name, t, lamA)
        # H_G by damped BFGS / L-BFGS on averaged pre-activations and their gradients
        dh = w_new @ t_new["mean_a"] - w_old @ t["mean_a"]          # h̄ = W̄ â (kron.mean_h)
        dg = t_new["mean_g"] - t["mean_g"]
        # components at rounding level are 0: a layer feeding BatchNorm has ḡ = 0 in exact arithmetic,
        # and a y_G of rounding noise made H_G's update O(1) noise (not reproducible; float32: overflow)
        xp = backend.namespace(dg)
        dg = xp.where(xp.abs(dg) <= t_new["g_round"] + t["g_round"], 0, dg)
        sG = self.beta * st.sG[name] + (1.0 - self.beta) * dh
        yG = self.beta * st.yG[name] + (1.0 - self.beta) * dg
        st.sG[name], st.yG[name] = sG, yG
        if self.damping_scheme == "dpidlm":
            s_t, y_t = kc.dpi_dlm(sG, yG, self.mu1, lamG)
        else:
            Hy = self._apply_HG(st, name, yG, ops)
            damp = kc.dp_dlm if self.damping_scheme == "dpdlm" else kc.double_damping
            s_t, y_t = damp(sG, yG, Hy, self.mu1, lamG)
        if not (kc.all_finite(s_t, y_t) and float(s_t @ y_t) > 0):
            return skipped + 1
        if self.skip and not kc.dd_skip_passes(s_t, y_t, self._apply_HG(st, name, y_t, ops), self.mu1):
            return skipped + 1
        if self.memory is None:
            st.HG[name] = bfgs_inverse_update(st.HG[name], s_t, y_t)
        else:
            st.pairs[name].append(s_t, y_t)      # the oldest pair goes when the memory is full
        return skipped


@register("kbfgs-l")
class KBFGSL(KBFGS):
    """K-BFGS(L): L-BFGS with ``memory`` p pairs (default 100, thesis §2.8.2) for H_G."""

    cost_formula: ClassVar[str] = "Σ[o a² + 4p o a + 4p² a] + L-BFGS setup O(p²o + p³) per layer and step + …"

    _limited: ClassVar[bool] = True
