"""TNT: Tensor-Normal Training (Ren & Goldfarb 2021; Ren's thesis ch. 4, Algorithm 15).

The block of the Fisher of a tensor variable W ∈ R^{d₁×⋯×d_k} is modelled as the covariance of a
zero-mean tensor-normal sampling-based gradient G = DW: F_W = U₁ ⊗ ⋯ ⊗ U_k (thesis §4.3.2, Def. 1).
From the contraction identity E[G⁽ⁱ⁾] = Uᵢ Π_{j≠i} tr(Uⱼ) ((4.2)) and the normalisation c = 1,
tr(Ũᵢ)/dᵢ equal for all i (§4.3.3):

    Ũᵢ = Ĝ⁽ⁱ⁾ / (c₀^{k−1} Π_{j≠i} dⱼ),   c₀ = (tr Ĝ⁽ⁱ⁾ / Π_j dⱼ)^{1/k}          (4.10)

(tr Ĝ⁽ⁱ⁾ = ‖G‖²_F is the same for every mode), and the step is

    ĝ ← μ ĝ + ∇_W f_M                                                        (line 10)
    Ĝ⁽ⁱ⁾ ← β Ĝ⁽ⁱ⁾ + (1 − β) Ḡ⁽ⁱ⁾,  Ḡ = minibatch mean of DW with ỹ ~ p(y|x,θ) (lines 7, 12; every T₁)
    Vᵢ = (Ũᵢ + εI)⁻¹                                                        (lines 15-16; every T₂)
    p = ĝ ×₁ V₁ ⋯ ×ₖ V_k + γ W,   W ← W − α p                                   (lines 18-20)

Ḡ is the *mean* sampled gradient of the batch, as Algorithm 15 line 7 states; since the sampled
gradients have zero mean, E[Ḡ⁽ⁱ⁾] is 1/m of the per-example contraction (m = batch size): ε and α
are relative to that scale (which is why the thesis's tuned α are small, Table 4.3).
``fisher="empirical"`` gives TNT-EF (§4.7.3). Tensor variables: dense/conv weights and biases
separately (§4.3.4 (ii)), conv weights as 3-way tensors (§4.7.2), BatchNorm γ/β as 1-way tensors.

Defaults (MLP autoencoders, batch 1000): α = 1e-4, ε = 0.1 (Table 4.3, MNIST), μ = β = 0.9
(line 1), T₁ = 1, T₂ = 20 (§4.7.1). CNN experiments: T₁ = 10, T₂ = 100, batch 128 (§4.7.1).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

from .. import backend
from ..curvature import kron
from ._kron_common import TensorFactorOptimizer, sampled_mean_grad
from .costs import flops_inv
from .base import check_choice
from .registry import register


def tnt_factors(stats: list, shape: tuple) -> list:
    """Ũ₁, …, Ũ_k from the contraction estimates Ĝ⁽ⁱ⁾ by (4.10) (zero statistics give zeros)."""
    k = len(shape)
    total = math.prod(shape)
    tr = backend.scalar(stats[0].trace())
    c0 = (max(tr, 0.0) / total) ** (1.0 / k)
    out = []
    for i, S in enumerate(stats):
        others = total // shape[i]
        denom = (c0 ** (k - 1)) * others
        out.append(S / denom if denom > 0 else S * 0.0)
    return out


@register("tnt")
class TNT(TensorFactorOptimizer):
    """Tensor-Normal Training (thesis Algorithm 15)."""

    paper: ClassVar[str] = "Ren & Goldfarb 2021; Ren thesis Alg. 15, (4.10), Table 4.3"

    def __init__(self, lr: float = 1e-4, damping: float = 0.1, momentum: float = 0.9, beta: float = 0.9,
                 stat_freq: int = 1, inv_freq: int = 20, batch_size: int | None = 1000, weight_decay: float = 0.0,
                 warm_start: bool = True, fisher: str = "sampled"):
        self._setup(lr, damping, momentum, beta, stat_freq, inv_freq, batch_size, weight_decay, warm_start)
        self.fisher = check_choice("fisher", fisher, ("sampled", "empirical"))

    def _stat_grad(self, p) -> Any:
        return sampled_mean_grad(p) if self.fisher == "sampled" else p.grad

    cost_formula: ClassVar[str] = "Σ_parts Σᵢ dᵢ²Πⱼ≠ᵢdⱼ (×2) + Σ (dᵢ³ + 4dᵢ²)/T₂ + NC/T₁ + 4n"
    _root_term: ClassVar[str] = "inverses"

    def _root_flops(self, d: int, order: int, assume: Any) -> float:
        """The damped inverse (d³) and the factor's scaling (4d²)."""
        return flops_inv(d) + 4 * d * d

    def _extra_flops(self, shapes: Any, batch_size: int) -> dict:
        """The sampled-gradient scaling dz/N every T₁ steps (sampled Fisher)."""
        return {"sampled_grad_scale": batch_size * shapes.out / self.stat_freq} if self.fisher == "sampled" else {}

    def _factor_matrices(self, stats: list, shape: tuple) -> list | None:
        xp = backend.namespace(stats[0])
        return [kron.spd_inverse(U + self.damping * xp.eye(U.shape[0], dtype=U.dtype)) for U in tnt_factors(stats, shape)]
