"""Shampoo (Gupta, Koren & Singer 2018) as implemented in Ren's thesis, Algorithm 16 (§4.7.2).

Every tensor variable W ∈ R^{d₁×⋯×d_k} (dense/conv weights and biases as *separate* tensors,
BatchNorm γ/β and any other block as its own tensor; see ``_kron_common.tensor_parts``) gets

    ĝ ← μ ĝ + ∇_W f_M                                        (line 7)
    Ĝ⁽ⁱ⁾ ← β Ĝ⁽ⁱ⁾ + (1 − β) Ḡ⁽ⁱ⁾,  Ḡ = ∇_W f_M (empirical)    (line 9, every T₁ steps)
    Rᵢ = (Ĝ⁽ⁱ⁾ + εI)^(−1/(2k)) by coupled Newton              (line 12, every T₂ steps)
    p = ĝ ×₁ R₁ ×₂ ⋯ ×ₖ Rₖ + γ W,   W ← W − α p                  (lines 14-16)

with X⁽ⁱ⁾ = mat_i(X) mat_i(X)ᵀ (thesis §4.2.1; :func:`qnref.curvature.kron.contraction`). The inverse
roots use :func:`qnref.curvature.kron.inv_root_newton` with max 100 iterations and tolerance 1e-6
(§4.7.2 item 2); ``root="eigh"`` switches to the eigendecomposition. No grafting: the thesis's
Shampoo does not use it (it lists the Anil et al. modifications it leaves out: λ_max-scaled
damping, diagonal variant, blocking; grafting is not part of Algorithm 16).

Defaults (MLP autoencoders, batch 1000): α = 3e-4, ε = 3e-4 (Table 4.3, MNIST), μ = β = 0.9
(line 1), T₁ = 1, T₂ = 20 (§4.7.1). CNN experiments: T₁ = 10, T₂ = 100, batch 128, ε = 0.01 (§4.7.1).
"""
from __future__ import annotations

from typing import Any, ClassVar

from ..curvature import kron
from ._kron_common import TensorFactorOptimizer
from .costs import flops_eigh
from .base import check_choice, set_checked
from .registry import register


@register("shampoo")
class Shampoo(TensorFactorOptimizer):
    """Shampoo with moving-average statistics and coupled-Newton inverse roots (thesis Alg. 16)."""

    paper: ClassVar[str] = "Gupta et al. 2018; Anil et al. 2020; Ren thesis Alg. 16, Table 4.3"

    def __init__(self, lr: float = 3e-4, damping: float = 3e-4, momentum: float = 0.9, beta: float = 0.9,
                 stat_freq: int = 1, inv_freq: int = 20, batch_size: int | None = 1000, weight_decay: float = 0.0,
                 warm_start: bool = True, root: str = "newton", newton_iters: int = 100, newton_tol: float = 1e-6):
        self._setup(lr, damping, momentum, beta, stat_freq, inv_freq, batch_size, weight_decay, warm_start)
        self.root = check_choice("root", root, ("newton", "eigh"))
        set_checked(self, newton_iters=(newton_iters, "int"), newton_tol=(newton_tol, "> 0"))

    def _stat_grad(self, p) -> Any:
        return p.grad

    cost_formula: ClassVar[str] = "Σ_parts Σᵢ dᵢ²Πⱼ≠ᵢdⱼ (×2: statistics/T₁ + preconditioning) + I_root Σ (2k+1)dᵢ³/T₂ + 4n"

    def _root_flops(self, d: int, order: int, assume: Any) -> float:
        """eigh route: eigh + the d³ product + 2d²; coupled Newton: 6d² + I((2k + 1)d³ + 2d²) with
        I = ``assume.root_iters`` or the cap ``newton_iters`` (an upper bound)."""
        if self.root == "eigh":
            return flops_eigh(d) + d ** 3 + 2 * d * d
        its = assume.root_iters if assume.root_iters is not None else self.newton_iters
        return 6 * d * d + its * ((2 * order + 1) * d ** 3 + 2 * d * d)

    def _factor_matrices(self, stats: list, shape: tuple) -> list | None:
        k = len(shape)
        out = []
        for S in stats:
            if self.root == "eigh":
                out.append(kron.inv_root_eigh(S, 2 * k, self.damping))
            else:
                try:
                    R, _, _ = kron.inv_root_newton(S, 2 * k, self.damping, max_iter=self.newton_iters, tol=self.newton_tol)
                except ValueError:
                    return None
                out.append(R)
        return out
