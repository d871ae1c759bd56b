"""Shampoo (Gupta, Koren & Singer 2018) as implemented in Ren's thesis, Algorithm 16 (§4.7.2).

Every tensor variable W ∈ R^{d₁×⋯×d_k} (dense/conv weights and biases as *separate* tensors,
BatchNorm γ/β and any other block as its own tensor; see ``_kron_common.tensor_parts``) gets

    ĝ ← μ ĝ + ∇_W f_M                                        (line 7)
    Ĝ⁽ⁱ⁾ ← β Ĝ⁽ⁱ⁾ + (1 − β) Ḡ⁽ⁱ⁾,  Ḡ = ∇_W f_M (empirical)    (line 9, every T₁ steps)
    Rᵢ = (Ĝ⁽ⁱ⁾ + εI)^(−1/(2k)) by coupled Newton              (line 12, every T₂ steps)
    p = ĝ ×₁ R₁ ×₂ ⋯ ×ₖ Rₖ + γ W,   W ← W − α p                  (lines 14-16)

with X⁽ⁱ⁾ = mat_i(X) mat_i(X)ᵀ (thesis §4.2.1; :func:`qnref.curvature.kron.contraction`).

Inverse roots (``root``), chosen by measurement per device (issue 21; docs/shampoo_tnt.md has the
timings): ``"eigh"`` — the eigendecomposition (:func:`qnref.curvature.kron.inv_root_eigh`),
exact up to round-off; ``"newton"`` — the thesis's coupled Newton iteration
(:func:`qnref.curvature.kron.inv_root_newton`, max 100 iterations, tolerance 1e-6, §4.7.2 item 2);
``"auto"`` (default) — eigh for NumPy factors (on the 2-core CPU 4–17× faster than the Newton
iteration at 250×250 and 1000×1000), Newton for CuPy factors (matrix products only; not yet
measured on a GPU, so the thesis's route is kept there). No grafting: the thesis's
Shampoo does not use it (it lists the Anil et al. modifications it leaves out: λ_max-scaled
damping, diagonal variant, blocking; grafting is not part of Algorithm 16).

Defaults (MLP autoencoders, batch 1000): α = 3e-4, ε = 3e-4 (Table 4.3, MNIST), μ = β = 0.9
(line 1), T₁ = 1, T₂ = 20 (§4.7.1). CNN experiments: T₁ = 10, T₂ = 100, batch 128, ε = 0.01 (§4.7.1).
"""
from __future__ import annotations

from typing import Any, ClassVar

from .. import backend
from ..curvature import kron
from ._kron_common import TensorFactorOptimizer
from .costs import flops_eigh
from .base import check_choice, set_checked
from .registry import register


#: inverse-root routes: "auto" resolves per array type (:func:`root_route`)
ROOTS = ("auto", "eigh", "newton")


def root_route(root: str, M: Any) -> str:
    """The route that ``root`` takes for the factor ``M``: "auto" → "eigh" on NumPy (measured the
    fastest exact route on the CPU, docs/shampoo_tnt.md), "newton" on CuPy (unmeasured there: the
    thesis's matrix-product iteration is kept); "eigh"/"newton" as given."""
    if root != "auto":
        return root
    return "newton" if backend.is_cupy_array(M) else "eigh"


@register("shampoo")
class Shampoo(TensorFactorOptimizer):
    """Shampoo with moving-average statistics (thesis Alg. 16); inverse roots by eigendecomposition
    on the CPU (``root="auto"``), the thesis's coupled Newton iteration with ``root="newton"``."""

    paper: ClassVar[str] = "Gupta et al. 2018; Anil et al. 2020; Ren thesis Alg. 16, Table 4.3"

    def __init__(self, lr: float = 3e-4, damping: float = 3e-4, momentum: float = 0.9, beta: float = 0.9,
                 stat_freq: int = 1, inv_freq: int = 20, batch_size: int | None = 1000, weight_decay: float = 0.0,
                 warm_start: bool = True, root: str = "auto", newton_iters: int = 100, newton_tol: float = 1e-6):
        self._setup(lr, damping, momentum, beta, stat_freq, inv_freq, batch_size, weight_decay, warm_start)
        self.root = check_choice("root", root, ROOTS)
        set_checked(self, newton_iters=(newton_iters, "int"), newton_tol=(newton_tol, "> 0"))

    def _stat_grad(self, p) -> Any:
        return p.grad

    cost_formula: ClassVar[str] = ("Σ_parts Σᵢ [dᵢ(dᵢ+1)/2 Πⱼ≠ᵢdⱼ (statistics, /T₁) + dᵢ²Πⱼ≠ᵢdⱼ (preconditioning)] "
                                   "+ Σ (3dᵢ³ + dᵢ²(dᵢ+1)/2 + 2dᵢ²)/T₂ (eigh; newton: I_root (2k+1)dᵢ³) + 4n")

    def _root_flops(self, d: int, order: int, assume: Any) -> float:
        """eigh route ("eigh", and "auto": its CPU route): eigh + the Gram product (V D^½)(V D^½)ᵀ
        (a syrk, d²(d+1)/2: :func:`~qnref.curvature.kron.inv_root_eigh`) + 2d²; coupled
        Newton: 6d² + I((2k + 1)d³ + 2d²) with I = ``assume.root_iters`` or the cap ``newton_iters``
        (an upper bound)."""
        if self.root != "newton":
            return flops_eigh(d) + d * d * (d + 1) / 2 + 2 * d * d
        its = assume.root_iters if assume.root_iters is not None else self.newton_iters
        return 6 * d * d + its * ((2 * order + 1) * d ** 3 + 2 * d * d)

    def _factor_matrices(self, stats: list, shape: tuple) -> list | None:
        k = len(shape)
        out = []
        for S in stats:
            if root_route(self.root, S) == "eigh":
                out.append(kron.inv_root_eigh(S, 2 * k, self.damping))
            else:
                try:
                    R, _, _ = kron.inv_root_newton(S, 2 * k, self.damping, max_iter=self.newton_iters, tol=self.newton_tol)
                except ValueError:
                    return None
                out.append(R)
        return out
