"""Subsampled Gauss-Newton and natural gradient through the Sherman–Morrison–Woodbury identity.

Ren & Goldfarb, "Efficient subsampled Gauss-Newton and natural gradient methods for training
neural networks" (arXiv:1906.02353), = chapter 5 of Y. Ren's thesis (§5.2–5.5, Algorithms 17–23,
eqs. 5.4–5.7). Registered as ``"smw-gn"`` (:class:`SMWGN`), ``"smw-ng"`` (:class:`SMWNG`) and
``"smw-ng-bd"`` (:class:`SMWNGBD`, the block-diagonal SMW-NG of §5.8, L2816); all are the class
:class:`SMWOptimizer` with a different curvature matrix.

Notation (all on the curvature minibatch S₂ of N₂ examples, J stacked over examples)
-------------------------------------------------------------------------------------
* data-term curvature  B_d = (1/N₂) Jᵀ H J                                   (eq. 5.2 / 5.3)
    GN: J = (J₁; …; J_N₂) output Jacobians (N₂C × n), H = diag(H_{L,1}, …) output Hessians;
    NG: J = (∇ℓ₁ᵀ; …; ∇ℓ_N₂ᵀ) per-example gradients (N₂ × n), H = I (empirical Fisher, eq. 5.3).
* the problem's weight decay l2 (``Problem(l2=…)``) is part of f, so the curvature of the
  quadratic model is B = B_d + l2·I (exactly :func:`qnref.curvature.dense.ggn` for GN).
* λ = λ_LM + τ  (§5.2.3);  G = B + λI = B_d + μI with μ = λ + l2          (eq. 5.4)
* direction p = −G⁻¹ g with g the gradient of f on the gradient batch S₁ (Alg. 23, line 4–5).

The three SMW forms (``form=``), all exact, none forms an n × n matrix
---------------------------------------------------------------------
``"5.6"`` (default; symmetric, uses the factor H_{L,i} = Sᵢ Sᵢᵀ from the point's ``loss_sqrt_hessian()``).
    With J̃ = diag(Sᵢᵀ) J, B_d = (1/N₂) J̃ᵀ J̃ and SMW gives
        G⁻¹ = (1/μ)(I − (1/N₂) J̃ᵀ D⁻¹ J̃),   D = μI + (1/N₂) J̃ J̃ᵀ = μI + (1/N₂) Sᵀ (J Jᵀ) S.
    This is eq. 5.6 multiplied through by the factor (D₅.₆ = μH⁻¹ + JJᵀ/N₂ ⇒ Sᵀ D₅.₆ S = D) and
    needs no inverse of H, so it is valid for singular H (softmax) too. D is symmetric positive
    definite (N₂C × N₂C for GN, N₂ × N₂ for NG where S = I and J̃ = J).
        u = J̃ g  (one R-forward: uᵢ = Sᵢᵀ (J g)ᵢ),  w = D⁻¹ u,
        p = −(1/μ)(g − (1/N₂) Jᵀ (S w))   (one backward with per-example output weights Sᵢ wᵢ),
    and J̃ p = −w, so pᵀ B_d p = ‖w‖²/N₂ comes for free.
``"5.7"`` (non-symmetric, no factor of H):  G⁻¹ = (1/μ)(I − (1/N₂) Jᵀ H D⁻¹ J), D = μI + (1/N₂) J Jᵀ H.
        u = J g,  d = D⁻¹ u,  p = −(1/μ)(g − (1/N₂) Jᵀ (H d)),  J p = −d,  pᵀ B_d p = dᵀ H d / N₂.
    The thesis proposes it for non-invertible H (softmax with GN); D is non-symmetric (general LU).
``"5.6-inv"`` (eq. 5.6 literally):  D = μ H⁻¹ + (1/N₂) J Jᵀ,  d = D⁻¹ u,  p = −(1/μ)(g − (1/N₂) Jᵀ d),
        J p = −H⁻¹ d,  pᵀ B_d p = dᵀ H⁻¹ d / N₂.  Only for invertible H (mse; sigmoid_ce away from
        saturation). Raises for softmax_ce, whose H_L is always singular (H 1 = 0).

For NG, H = I and the three forms coincide, so SMW-NG accepts ``form="5.6"`` only.

SMW-NG-BD (thesis §5.8, L2816: "a block diagonal version of SMW-NG, namely, SMW-NG-BD, where in each
block, the matrix is inverted by SMW, in order to mimic the block diagonal approximation used by KFAC")
----------------------------------------------------------------------------------------------------
B_d = diag(B₁, …, B_L), one block per layer l (its parameter blocks together: W̄ = [W b] of a dense or
conv layer), Bₗ = (1/N₂) Jₗᵀ Jₗ with Jₗ = (∇_{θₗ}ℓ₁ᵀ; …) the layer's per-example gradient rows. Each
block of G = B_d + μI is inverted by SMW (the NG case of eq. 5.6, H = I) on its own:
    Dₗ = μI + (1/N₂) Jₗ Jₗᵀ (N₂ × N₂),  uₗ = Jₗ gₗ,  wₗ = Dₗ⁻¹ uₗ,  pₗ = −(1/μ)(gₗ − (1/N₂) Jₗᵀ wₗ),
and Jₗ pₗ = −wₗ, so pᵀ B_d p = Σₗ ‖wₗ‖²/N₂. For nets whose parametrised layers are all dense,
everything comes from one backward pass of layer taps (āᵢ, γᵢ = ∂ℓᵢ/∂hᵢ; ∇_{W̄}ℓᵢ = γᵢ āᵢᵀ):
Jₗ Jₗᵀ = (Ā Āᵀ) ⊙ (Γ Γᵀ) (the Kronecker trick of Alg. 22, one layer's term), (Jₗ gₗ)ᵢ = γᵢᵀ Gₗ āᵢ,
Jₗᵀ w = Γᵀ diag(w) Ā: no R-forward and no extra backward pass. Otherwise (conv, other blocks) the
explicit per-example gradient rows (``Point.per_example_grads``, N₂ × n) are split by layer.
Same λ_LM rule, S₁/S₂ sampling and Alg. 23 step as SMW-NG; λ and μ are shared by all blocks.

J Jᵀ comes from :meth:`Point.gram` ("jacobian" for GN, "grad" for NG): the Kronecker trick of
§5.3.3 / §5.4.6–5.4.7 (Alg. 22) when every parametrised layer is dense, otherwise an explicit
per-example fallback (forms N₂C (GN) or N₂ (NG) n-vectors: O(N₂ C n) memory, slower). J g and Jᵀ u
are R-forward / backward passes of the curvature batch (Alg. 19, 21).

The algorithm (Alg. 23) and the λ_LM rule (§5.2.3)
-------------------------------------------------
    draw S₁ (N₁ examples) and S₂ ⊆ S₁ (N₂ examples, uniformly without replacement)
    g = ∇f_{S₁}(θ);  p = −(B + λI)⁻¹ g on S₂;
    ρ = (f_{S₁}(θ) − f_{S₁}(θ + p)) / (m(0) − m(p)),  m(0) − m(p) = −gᵀp − ½ pᵀ B p    (eq. 5.5)
    λ_LM ← boost·λ_LM if ρ < ε;  drop·λ_LM if ρ > 1 − ε;  unchanged otherwise;  λ = λ_LM + τ
    θ ← θ + α p
``rho_at="update"`` evaluates ρ at the actual update αp instead of p (m(0) − m(αp)); then
``StepInfo.loss`` is known without an extra pass. The thesis writes ρ with p_t (default).

Semi-stochastic variant (§5.6, Theorem 6): ``full_gradient=True`` uses g and f of the whole
training set (``problem.full()``), S₂ = ``problem.sample(N₂)``, α = 1 and accepts a step only when
ρ ≥ η (0 < η < ε). Theorem 6 proves lim ‖∇f‖ = 0 for it.

Defaults (thesis §5.8, "for all experiments"): λ_LM⁽⁰⁾ = 1, boost = 1.01, drop = 0.99, ε = 1/4,
τ = 10⁻³ (taken from Kiros 2013); N₁ = 60, N₂ = 30 (MNIST and webspam experiments); α = 0.1
(MNIST: "initial learning rates for other methods were also set to be 0.1"; CIFAR used 0.01,
webspam 0.05 for SMW-GN and 0.1 for SMW-NG). No momentum (the experiments use none).
Not from the thesis: η = ε/2 for the semi-stochastic variant (the thesis only requires 0 < η < ε).

Safeguards: a non-finite gradient, direction, D solve or trial loss never moves θ; the step
reports ``accepted=False, nonfinite=True`` and λ_LM is boosted (ρ = −∞) when the trial failed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy

from .. import backend
from ..curvature import kron
from ..curvature.objective import Point
from ..curvature.protocol import UnsupportedProductError
from .costs import CostAssumptions, ModelShapes, dense_pass_mults, floor_summary, flops_solve
from .base import Optimizer, Problem, StepInfo, check_bool, check_choice, check_int, check_positive, check_range, set_checked, try_point
from .drivers import close_step, open_step, stay, with_extra
from .registry import register

__all__ = ["SMWOptimizer", "SMWGN", "SMWNG", "SMWNGBD", "SMWState", "SMWDirection", "smw_direction",
           "smw_bd_direction", "taps_direction", "rhs_by_gram", "dense_layers", "layer_groups", "update_lambda_lm", "FORMS"]

FORMS = ("5.6", "5.7", "5.6-inv")
CURVATURES = ("gn", "ng", "ng-bd")
BD_ROUTES = ("auto", "taps", "rows")


# -- the λ_LM rule of §5.2.3 -------------------------------------------------------------------------
def update_lambda_lm(lambda_lm: float, rho: float, *, eps: float = 0.25, boost: float = 1.01, drop: float = 0.99) -> float:
    """One step of the Levenberg–Marquardt rule of thesis §5.2.3.

    ρ < ε → boost·λ_LM;  ρ > 1 − ε → drop·λ_LM;  otherwise unchanged. A failed trial is passed as
    ρ = −∞ (boost). ρ = NaN (no predicted decrease, i.e. g = 0 and p = 0) leaves λ_LM unchanged.
    """
    if math.isnan(rho):
        return lambda_lm
    if rho < eps:
        return lambda_lm * boost
    if rho > 1.0 - eps:
        return lambda_lm * drop
    return lambda_lm


# -- the SMW direction -----------------------------------------------------------------------------
@dataclass
class SMWDirection:
    """p = −(B + λI)⁻¹ g and the pieces of the quadratic model m(p) = f + gᵀp + ½ pᵀBp.

    ``pBp`` includes the L2 part (l2·‖p‖²); ``model_decrease`` = m(0) − m(p) = −gᵀp − ½ pᵀBp.
    ``finite`` is False when the D solve or p produced NaN/Inf (or D was singular). ``blocks``:
    the number of D systems solved (SMW-NG-BD: one per layer, each ``d_size`` × ``d_size``).
    """

    p: Any
    g_dot_p: float
    pBp: float
    mu: float
    d_size: int
    form: str
    finite: bool = True
    blocks: int = 1
    pp: float = math.nan      # ‖p‖² (pᵀBp's l2 part and the step norm; one pass over p)

    @property
    def model_decrease(self) -> float:
        return -self.g_dot_p - 0.5 * self.pBp

    def model_decrease_at(self, t: float) -> float:
        """m(0) − m(t p) for a scaled step t p."""
        return -t * self.g_dot_p - 0.5 * t * t * self.pBp


def _solve(xp, D, u):
    """D⁻¹ u, or None when D is singular or the result is not finite."""
    try:
        x = xp.linalg.solve(D, u)
    except Exception:  # numpy.linalg.LinAlgError; CuPy returns NaN instead
        return None
    return x if backend.all_finite(x) else None


class _BlockDiag:
    """diag(M₁, …, M_N) with C × C blocks: ``m`` is (N, C) for diagonal blocks or (N, C, C)."""

    def __init__(self, xp, N, C, m):
        self.xp, self.N, self.C, self.m = xp, N, C, m
        self.is_diag = m.ndim == 2

    @property
    def T(self) -> "_BlockDiag":
        return self if self.is_diag else _BlockDiag(self.xp, self.N, self.C, self.xp.ascontiguousarray(self.m.transpose(0, 2, 1)))

    def apply(self, v):
        """(Mᵢ vᵢ)ᵢ for v (N, C)."""
        return self.m * v if self.is_diag else self.xp.einsum("icd,id->ic", self.m, v)

    def left(self, K):
        """diag(M) · K for K (N C × N C)."""
        xp, N, C = self.xp, self.N, self.C
        if self.is_diag:
            return self.m.reshape(N * C, 1) * K
        return xp.matmul(self.m, K.reshape(N, C, N * C)).reshape(N * C, N * C)

    def right(self, K):
        """K · diag(M) for K (N C × N C), batched GEMMs over the column blocks."""
        xp, N, C = self.xp, self.N, self.C
        if self.is_diag:
            return K * self.m.reshape(1, N * C)
        KT = xp.ascontiguousarray(K.reshape(N * C, N, C).transpose(1, 0, 2))   # (j, i·c, d)
        return xp.matmul(KT, self.m).transpose(1, 0, 2).reshape(N * C, N * C)

    def inv(self) -> "_BlockDiag | None":
        xp = self.xp
        try:
            mi = 1.0 / self.m if self.is_diag else xp.linalg.inv(self.m)
        except Exception:  # singular block
            return None
        return _BlockDiag(xp, self.N, self.C, mi) if backend.all_finite(mi) else None

    def dense(self):
        xp, N, C = self.xp, self.N, self.C
        out = xp.zeros((N, C, N, C), dtype=self.m.dtype)
        idx = xp.arange(N)
        out[idx, :, idx, :] = self.m[:, :, None] * xp.eye(C, dtype=self.m.dtype) if self.is_diag else self.m
        return out.reshape(N * C, N * C)


def _bcast(w, ndim):
    return w.reshape((-1,) + (1,) * (ndim - 1))


def _check_lambda(lam: float) -> None:
    if not (lam > 0) or not math.isfinite(lam):
        raise ValueError(f"λ must be finite and > 0, got {lam}")


def _finished(l2: float, g: Any, p: Any, pBp_data: Any, mu: float, d_size: int, form: str, blocks: int = 1) -> SMWDirection:
    """The :class:`SMWDirection` of p: gᵀp and pᵀBp = pᵀB_d p + l2‖p‖² (not finite → ``finite=False``).

    ‖p‖² is finite only for a finite p (a NaN or ±Inf entry makes it NaN or +Inf), so it is the
    finiteness check of p too: two passes over p in all (‖p‖², gᵀp), not three (issue 21)."""
    pp = float(p @ p)
    if not math.isfinite(pp):
        return SMWDirection(p, math.nan, math.nan, mu, d_size, form, finite=False, blocks=blocks, pp=pp)
    gp = float(g @ p)
    pBp = float(pBp_data) + l2 * pp
    return SMWDirection(p, gp, pBp, mu, d_size, form, finite=math.isfinite(gp) and math.isfinite(pBp), blocks=blocks,
                        pp=pp)


def smw_direction(curv: Point, g: Any, lam: float, *, curvature: str = "gn", form: str = "5.6") -> SMWDirection:
    """The LM direction p = −(B + λI)⁻¹ g by SMW (eqs. 5.6/5.7), on the curvature batch ``curv``.

    ``curv`` is the objective on S₂ evaluated at θ (a :class:`Point`); ``g`` any vector of the
    parameter layout (the gradient on S₁). B = (1/N₂) Jᵀ H J + l2·I with l2 = ``curv.l2``
    (GN: output Jacobians and output Hessians; NG: per-example gradients and H = I). See the
    module docstring for the three forms. Passes on S₂: the Gram matrix (GN: C backward passes
    with the Kronecker trick; NG: one), one R-forward (J g) and one backward (Jᵀ ·).
    """
    check_choice("curvature", curvature, CURVATURES)
    check_choice("form", form, FORMS)
    _check_lambda(lam)
    if curvature in ("ng", "ng-bd") and form != "5.6":
        raise ValueError("SMW-NG has H = I, so eqs. 5.6 and 5.7 coincide: use form='5.6'")
    if curvature == "ng-bd":
        return smw_bd_direction(curv, g, lam)
    xp = curv.xp
    N = curv.N
    mu = float(lam) + curv.l2
    z = curv.z
    jg = curv.jvp(g)                                   # J_out g, output shape (N, …)

    def finish(p, pBp_data, d_size):
        return _finished(curv.l2, g, p, pBp_data, mu, d_size, form)

    def fail(d_size):
        return SMWDirection(xp.full_like(g, xp.nan), math.nan, math.nan, mu, d_size, form, finite=False)

    if curvature == "ng":
        e = curv.dz                                                 # ∂ℓᵢ/∂zᵢ: ∇ℓᵢ = J_iᵀ eᵢ
        u = (e * jg).reshape(N, -1).sum(axis=1)                     # (J g)ᵢ = ∇ℓᵢᵀ g = eᵢᵀ (J_out g)ᵢ
        w = _gram_solve(xp, curv.gram("grad"), u, mu, N)           # K = [∇ℓᵢᵀ ∇ℓⱼ], N₂ × N₂
        if w is None:
            return fail(N)
        p = -(g - curv.vjp(e * _bcast(w / N, e.ndim))) / mu         # Jᵀ w = Σ wᵢ ∇ℓᵢ = J_outᵀ (wᵢ eᵢ)
        return finish(p, (w @ w) / N, N)

    # Gauss-Newton
    if z.ndim != 2:
        raise ValueError("SMW-GN needs 2-D outputs (N, C)")
    C = z.shape[1]
    NC = N * C
    K = curv.gram("jacobian")                                       # [Jᵢ Jⱼᵀ], N C × N C, row i·C + c
    if form == "5.6":
        S = _BlockDiag(xp, N, C, curv.loss_sqrt_hessian())   # (N, C) √diag for mse/sigmoid_ce
        u = S.T.apply(jg).reshape(NC)                               # J̃ g = Sᵢᵀ (J g)ᵢ
        D = kron.add_identity_(kron.sym(S.T.left(S.right(K)) / N), mu)   # Sᵀ (J Jᵀ) S / N₂ + μI
        w = _solve(xp, D, u)
        if w is None:
            return fail(NC)
        p = -(g - curv.vjp(S.apply(w.reshape(N, C)) / N)) / mu      # J̃ᵀ w = J_outᵀ (Sᵢ wᵢ)
        return finish(p, (w @ w) / N, NC)
    H = _BlockDiag(xp, N, C, curv.loss_hessian())
    u = jg.reshape(NC)
    if form == "5.7":
        D = kron.add_identity_(H.right(K) / N, mu)                  # J Jᵀ H / N₂ + μI (not symmetric)
        d = _solve(xp, D, u)
        if d is None:
            return fail(NC)
        Hd = H.apply(d.reshape(N, C))
        p = -(g - curv.vjp(Hd / N)) / mu
        return finish(p, (d @ Hd.reshape(NC)) / N, NC)
    # "5.6-inv": eq. 5.6 literally, D = μ H⁻¹ + J Jᵀ / N₂
    if not H.is_diag and float(xp.abs(H.m.sum(axis=2)).max()) <= 1e-12 * float(xp.abs(H.m).max()):  # H_L 1 = 0
        raise ValueError("form '5.6-inv' needs invertible output Hessians; softmax_ce has H_L 1 = 0 "
                         "(singular): use form '5.6' (factored, default) or '5.7'")
    Hinv = H.inv()
    if Hinv is None:
        return fail(NC)
    D = K / N + mu * Hinv.dense()
    D = 0.5 * (D + D.T)
    d = _solve(xp, D, u)
    if d is None:
        return fail(NC)
    p = -(g - curv.vjp(d.reshape(N, C) / N)) / mu
    return finish(p, (d @ Hinv.apply(d.reshape(N, C)).reshape(NC)) / N, NC)


# -- SMW-NG-BD: one SMW solve per layer block (thesis §5.8, L2816) --------------------------------------
def layer_groups(layout: Any) -> list[list[int]]:
    """Indices of θ's parameter blocks grouped by layer, in θ order: the blocks of SMW-NG-BD.

    A layer's blocks share the name before the last "." (``"3.conv2d.W"``; ``"2.batchnorm.gamma"``
    and ``"2.batchnorm.beta"`` form one group), so a dense or conv layer is its W̄ = [W b].
    """
    groups: dict[str, list[int]] = {}
    for k, b in enumerate(layout.blocks):
        groups.setdefault(str(b.name).rsplit(".", 1)[0], []).append(k)
    return list(groups.values())


def _dense_taps_route(curv: Any) -> list | None:
    """The Kronecker layers of the point's model when every parametrised layer is dense (one W̄ per
    layer, taps give everything; :func:`dense_layers`), else None (explicit per-example rows)."""
    return dense_layers(getattr(getattr(curv, "obj", None), "model", None))


def dense_layers(model: Any) -> list | None:
    """The Kronecker layers of ``model`` when every parametrised layer is dense and every parameter
    block is one of theirs, else None (conv layers, BatchNorm, a model that is not a qnref one)."""
    from ._kron_common import kron_structure  # noqa: PLC0415

    try:
        layers, others = kron_structure(model)
    except (UnsupportedProductError, AttributeError, KeyError, ValueError, TypeError):
        return None
    return layers if layers and not others and all(L.kind == "dense" for L in layers) else None


def _gram_solve(xp: Any, K: Any, u: Any, mu: float, N: int) -> Any:
    """w = D⁻¹ u with D = μI + K/N₂ (K an N₂ × N₂ gradient Gram, symmetrised: SMW-NG's, or one layer's
    for SMW-NG-BD), or None when singular / not finite."""
    return _solve(xp, kron.add_identity_(kron.sym(K / N), mu), u)


def _bd_layer_direction(xp: Any, g: Any, jtw: Any, mu: float, out: Any) -> None:
    """out ← pₗ = −(gₗ − Jₗᵀwₗ/N₂)/μ, given ``jtw`` = Jₗᵀwₗ/N₂ (a fresh array, overwritten), in two
    passes: (Jₗᵀwₗ/N₂ − gₗ)/μ is the same rounding (negation and a − b = −(b − a) are exact)."""
    xp.subtract(jtw, g, out=jtw)
    xp.divide(jtw, mu, out=out)


def rhs_by_gram(n1: int, block_shape: tuple) -> bool:
    """Whether a layer's (Jₗgₗ)ᵢ over S₂ costs fewer multiplications as the S₂ × S₁ Gram trick
    (N₁(a + o) per example) than as γᵢᵀGₗāᵢ (o·a), for an o × a block and N₁ = ``n1``."""
    o, a = block_shape
    return n1 * (a + o) < o * a


def taps_direction(xp: Any, layout: Any, layers: list, taps: dict, g: Any, mu: float, l2: float, *,
                   block_diagonal: bool, batch_taps: dict | None = None) -> SMWDirection:
    """SMW-NG's (``block_diagonal=False``) or SMW-NG-BD's direction from the layer taps of the
    curvature batch on a net whose parametrised layers are all dense (:func:`dense_layers`).

    ``taps[L.name]`` holds āᵢ (N₂, a) and γᵢ = ∂ℓᵢ/∂hᵢ (N₂, o) per example; ∇_{W̄ₗ}ℓᵢ = γᵢāᵢᵀ, so
    Jₗ Jₗᵀ = (ĀĀᵀ) ⊙ (ΓΓᵀ) (Alg. 22, :func:`kron.tap_gram`), (Jₗgₗ)ᵢ = γᵢᵀ Gₗ āᵢ and
    Jₗᵀw = Γᵀ diag(w) Ā: no R-forward and no backward pass. NG solves D = μI + (1/N₂) Σₗ JₗJₗᵀ once
    for u = Σₗ Jₗgₗ (J = [J₁ … J_L]); NG-BD solves one Dₗ per layer (module docstring). Both set
    pₗ = −(gₗ − Jₗᵀw/N₂)/μ, and pᵀB_d p = ‖w‖²/N₂ (J p = −w, per block for NG-BD).

    ``batch_taps``: the gradient batch's taps of the mean loss (ā, γ/N₁ over S₁), given when g is
    exactly S₁'s gradient Σⱼ γⱼāⱼᵀ/N₁ (no L2 term). Then (Jₗgₗ)ᵢ = Σⱼ (āᵢᵀāⱼ)(γᵢᵀγⱼ)/N₁, the Gram
    trick between S₂ and S₁: N₂N₁(a + o) multiplications instead of N₂·o·a, taken for the layers where
    that is fewer (:func:`rhs_by_gram`)."""
    N = int(taps[layers[0].name]["a"].shape[0])
    gv = layout.views(g)
    p = xp.empty_like(g)
    pv = layout.views(p)
    parts = [(taps[L.name]["a"], taps[L.name]["g"], gv[L.block], pv[L.block], L.name) for L in layers]
    blocks = len(parts) if block_diagonal else 1

    def jg(a, gam, gl, name):
        b = batch_taps[name] if batch_taps is not None else None
        if b is not None and rhs_by_gram(b["a"].shape[0], gl.shape):
            return ((a @ b["a"].T) * (gam @ b["g"].T)).sum(axis=1)  # Σⱼ (āᵢᵀāⱼ)(γᵢᵀγⱼ/N₁)
        return ((gam @ gl) * a).sum(axis=1)                        # (Jₗ gₗ)ᵢ = γᵢᵀ Gₗ āᵢ

    def direction(a, gam, gl, pl, w):
        _bd_layer_direction(xp, gl, (gam * (w / N)[:, None]).T @ a, mu, pl)   # Jₗᵀw = Γᵀ diag(w) Ā

    def failed():
        return SMWDirection(xp.full_like(g, xp.nan), math.nan, math.nan, mu, N, "5.6", finite=False, blocks=blocks)

    ww = 0.0
    if block_diagonal:
        for a, gam, gl, pl, name in parts:
            w = _gram_solve(xp, kron.tap_gram(a, gam), jg(a, gam, gl, name), mu, N)
            if w is None:
                return failed()
            direction(a, gam, gl, pl, w)
            ww += float(w @ w)
    else:
        K = u = 0
        for a, gam, gl, _, name in parts:
            K = K + kron.tap_gram(a, gam)
            u = u + jg(a, gam, gl, name)
        w = _gram_solve(xp, K, u, mu, N)
        if w is None:
            return failed()
        for a, gam, gl, pl, _ in parts:
            direction(a, gam, gl, pl, w)
        ww = float(w @ w)
    return _finished(l2, g, p, ww / N, mu, N, "5.6", blocks=blocks)


def smw_bd_direction(curv: Any, g: Any, lam: float, *, route: str = "auto") -> SMWDirection:
    """SMW-NG-BD's direction p = −(B_BD + λI)⁻¹ g (thesis §5.8, L2816; module docstring).

    B_BD = diag_l((1/N₂) Jₗᵀ Jₗ) + l2·I: the empirical Fisher of the curvature batch ``curv`` with
    its off-diagonal layer blocks dropped (:func:`layer_groups`), each block inverted by SMW.
    ``route``: "taps" (dense nets: per-layer Gram (ĀĀᵀ) ⊙ (ΓΓᵀ), Jₗgₗ and Jₗᵀwₗ from one backward
    pass of layer taps), "rows" (explicit per-example gradient rows split by layer; any model with
    independent examples) or "auto" (taps when possible). Refused (``ValueError``) when examples are
    coupled (BatchNorm in training mode), as SMW-NG is.
    """
    check_choice("route", route, BD_ROUTES)
    _check_lambda(lam)
    curv.check_independent("SMW-NG-BD (per-example gradients)")
    xp = curv.xp
    N = curv.N
    mu = float(lam) + curv.l2
    layout = curv.layout
    layers = _dense_taps_route(curv) if route != "rows" else None
    if route == "taps" and layers is None:
        raise ValueError("route 'taps' needs a net whose parametrised layers are all dense; use route='rows'")
    taps = None
    if layers is not None:
        try:
            taps = curv.layer_stats("empirical")                      # one backward pass on S₂
        except UnsupportedProductError:                               # a point without layer taps
            if route == "taps":
                raise
    if taps is not None:
        return taps_direction(xp, layout, layers, taps, g, mu, curv.l2, block_diagonal=True)
    P = curv.per_example_grads()                                      # (N, n) rows ∇ℓᵢ
    p = xp.empty_like(g)
    ww = 0.0
    groups = layer_groups(layout)
    for grp in groups:
        idx = xp.concatenate([xp.arange(layout.blocks[k].offset, layout.blocks[k].stop) for k in grp])
        Pl = P[:, idx]
        w = _gram_solve(xp, kron.gram(Pl), Pl @ g[idx], mu, N)
        if w is None:
            return SMWDirection(xp.full_like(g, xp.nan), math.nan, math.nan, mu, N, "5.6", finite=False,
                                blocks=len(groups))
        p[idx] = -(g[idx] - Pl.T @ (w / N)) / mu
        ww += float(w @ w)
    return _finished(curv.l2, g, p, ww / N, mu, N, "5.6", blocks=len(groups))


# -- the optimizer -----------------------------------------------------------------------------------
@dataclass
class SMWState:
    """λ_LM (the LM part of λ = λ_LM + τ), the iteration count and rejected steps so far."""

    lambda_lm: float
    t: int = 0
    rejected: int = 0


class SMWOptimizer(Optimizer):
    """Subsampled GN / NG with LM damping, directions by SMW (thesis Alg. 23). See module docs.

    Parameters (defaults: thesis §5.8)
    ----------
    lr:              α in θ ← θ + α p. ``None``: 0.1 (MNIST experiment) or 1 for the
                     semi-stochastic variant (Theorem 6).
    batch_size:      N₁, gradient batch S₁ (60).
    curvature_batch: N₂, curvature batch S₂ ⊆ S₁ (30); must not exceed N₁.
    lambda_lm:       initial λ_LM (1).
    tau:             τ ≥ 0 added to λ_LM (10⁻³).
    boost, drop:     λ_LM factors, drop < 1 < boost (1.01, 0.99).
    eps:             ratio threshold, 0 < ε < ½ (¼).
    form:            "5.6" (factored symmetric, default), "5.7" or "5.6-inv" (GN only).
    full_gradient:   semi-stochastic variant (g and ρ on the full training set).
    eta:             accept a step only when ρ ≥ η (0 ≤ η < ε). ``None``: always accept (the
                     fully stochastic Alg. 23), ε/2 in the semi-stochastic variant.
    rho_at:          "direction" (ρ at θ + p, eq. 5.5) or "update" (ρ at θ + αp).
    """

    family: ClassVar[str] = "smw"
    paper: ClassVar[str] = "Ren & Goldfarb 2019 (arXiv:1906.02353); Ren thesis ch. 5, §5.8"
    curvature: ClassVar[str] = "gn"
    forms: ClassVar[tuple[str, ...]] = FORMS

    def __init__(
        self,
        lr: float | None = None,
        batch_size: int = 60,
        curvature_batch: int = 30,
        lambda_lm: float = 1.0,
        tau: float = 1e-3,
        boost: float = 1.01,
        drop: float = 0.99,
        eps: float = 0.25,
        form: str = "5.6",
        full_gradient: bool = False,
        eta: float | None = None,
        rho_at: str = "direction",
    ):
        self.full_gradient = check_bool("full_gradient", full_gradient)
        self.lr = (1.0 if self.full_gradient else 0.1) if lr is None else check_positive("lr", lr)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.curvature_batch = check_int("curvature_batch", curvature_batch, 1)
        if not self.full_gradient and self.curvature_batch > self.batch_size:
            raise ValueError(f"curvature_batch (N₂ = {curvature_batch}) must not exceed batch_size "
                             f"(N₁ = {batch_size}): S₂ ⊆ S₁ (Alg. 23)")
        set_checked(self, lambda_lm=(lambda_lm, "> 0"), tau=(tau, "≥ 0"), boost=(boost, "> 1"))
        self.drop = check_range("drop", drop, 0.0, 1.0, lo_open=True, hi_open=True)
        self.eps = check_range("eps", eps, 0.0, 0.5, lo_open=True, hi_open=True)
        if form not in self.forms:
            hint = " (H = I for NG, so eqs. 5.6 and 5.7 coincide)" if self.curvature != "gn" else ""
            raise ValueError(f"form must be one of {self.forms}{hint}, got {form!r}")
        self.form = form
        if eta is None:
            self.eta = 0.5 * self.eps if self.full_gradient else None
        else:
            self.eta = check_range("eta", eta, 0.0, self.eps, hi_open=True)
        self.rho_at = check_choice("rho_at", rho_at, ("direction", "update"))

    def init(self, theta: Any) -> SMWState:
        return SMWState(lambda_lm=self.lambda_lm)

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """With N₂ = min(curvature_batch, batch_size) and C outputs: NG-BD, and NG on dense nets with
        S₂ ⊆ S₁ (the taps route; :meth:`_taps_flops`); NG otherwise — Jacobian dots (N₂C), the scaled Gram
        (2N₂²), its solve, the weights, Jᵀw (n), the model (2n + N₂); NG-BD otherwise — the rows
        route (:meth:`_taps_flops`); GN — the output Hessian, the right-hand side, the scaled
        N₂C × N₂C Gram, its solve, the weights, Jᵀw, the model (eq. 5.7 / 5.6-inv approximate: the
        same leading terms); the trial and step (3n)."""
        n, C = shapes.n, shapes.out
        N2 = min(self.curvature_batch, self.batch_size)
        NC = N2 * C
        if self.curvature == "ng-bd" or (self.curvature == "ng" and not self.full_gradient and self._taps_shapes(shapes)):
            return {**self._taps_flops(shapes, self.batch_size, N2, assume), "trial_and_step": 3 * n}
        if self.curvature == "ng":
            t = {"jacobian_dot": NC, "gram_scale": 2 * N2 * N2, "solve": flops_solve(N2, 1), "weights": N2 + NC,
                 "direction": n, "model": 2 * n + N2}
        elif self.form == "5.6":
            t = {"output_hessian": 3 * NC, "rhs": NC, "scaled_gram": 4 * NC * NC, "solve": flops_solve(NC, 1),
                 "weights": 2 * NC, "direction": n, "model": 2 * n + NC}
        else:
            t = {"output_hessian": 2 * NC, "scaled_gram": 3 * NC * NC, "solve": flops_solve(NC, 1),
                 "weights": 3 * NC, "direction": n, "model": 2 * n + 2 * NC}
        return {**t, "trial_and_step": 3 * n}

    def step_floor(self, model: Any, assume: CostAssumptions | None = None) -> dict[str, Any]:
        """The floor of one Alg. 23 step on a dense net (issue 21): the passes' GEMM
        multiplications (:func:`dense_pass_mults`) plus :meth:`algebra_flops`, as a multiple of a
        gradient on S₁ (N₁ examples). Passes: ∇f on S₁ (F + B), the trial forward on S₁ (F).
        SMW-NG and SMW-NG-BD (S₂ ⊆ S₁): ∇f comes from a backward pass of taps on S₁ and its ∇W̄ =
        ΓᵀĀ/N₁ GEMMs (F + B in all), S₂'s taps are rows of S₁'s, and the per-layer Gram GEMMs
        N₂²(a + o) + N₂² (Alg. 22) are the only other pass terms (:meth:`_s1_taps_route`).
        Otherwise (SMW-GN; NG's semi-stochastic variant, whose S₂ is its own sample): the forward on S₂
        (F), the taps backward of the Gram (B − F per output: γ only, no ∇W̄ GEMMs, ``want_params=False``)
        with C²N₂²(a + o) + C²N₂² per layer, the R-forward J g (2F: W ṙ + V ā per layer) and the
        backward Jᵀw (B); NG-BD's variant has the forward, the taps backward and the Gram GEMMs only.
        ``model``: a dense Sequential (or its layout)."""
        from .costs import model_shapes  # noqa: PLC0415

        shapes = model_shapes(model)
        N1, N2 = self.batch_size, min(self.curvature_batch, self.batch_size)
        F1, B1 = dense_pass_mults(shapes, N1)
        F2, B2 = dense_pass_mults(shapes, N2)
        C = shapes.out if self.curvature == "gn" else 1
        gram = sum(C * C * N2 * N2 * (a + o) + C * C * N2 * N2 for o, a in shapes.layers)
        passes = {"gradient_s1": F1 + B1, "trial_forward_s1": F1}
        if self.curvature != "gn" and not self.full_gradient:
            passes["gram_gemms"] = gram
        else:
            passes.update(forward_s2=F2, gram_backward_s2=C * (B2 - F2), gram_gemms=gram)
            if self.curvature != "ng-bd":
                passes.update(rforward_s2=2 * F2, backward_s2=B2)
        return floor_summary(passes, self.algebra_flops(shapes, N1, assume or CostAssumptions()), F1 + B1)

    @staticmethod
    def _taps_shapes(shapes: ModelShapes) -> bool:
        """Whether the cost model's layers are all dense (the taps route's nets)."""
        return bool(shapes.layers) and not shapes.others and all(len(w) == 2 for w in shapes.w_shapes)

    def _taps_flops(self, shapes: ModelShapes, N1: int, N2: int, assume: CostAssumptions) -> dict[str, float]:
        """SMW-NG-BD, and SMW-NG on dense nets (:func:`taps_direction`; layers o × a, nₗ = o·a), per
        layer: the right-hand side γᵢᵀGₗāᵢ (N₂nₗ + N₂a), or, on the S₁ route without an L2 term
        where :func:`rhs_by_gram` takes it, Σⱼ(āᵢᵀāⱼ)(γᵢᵀγⱼ)/N₁ (N₂N₁(a + o) + N₂N₁); the weights w/N₂
        and Γ diag(w/N₂) (N₂ + N₂o), Jₗᵀw = Γᵀdiag(w)Ā (N₂nₗ); per solved system (one per layer for
        NG-BD, one for NG) the Gram's scaling (2N₂²), the solve and ‖w‖² (N₂); then the 1/μ (n) and
        the model (2n). SMW-NG-BD on other nets (rows route, blocks of sizes nₗ): Pₗgₗ (N₂nₗ), the
        scaling, the solve, w/N₂ (N₂), Pₗᵀw (N₂nₗ), 1/μ (n). The per-layer Gram matrices themselves
        ((ĀĀᵀ) ⊙ (ΓΓᵀ) or PₗPₗᵀ) are counted with the passes, as the Gram of the Jacobian route is
        (module :mod:`.costs`)."""
        if self._taps_shapes(shapes):
            L = list(shapes.layers)
            gram_rhs = not (self.full_gradient or assume.l2)
            rhs = sum(N2 * N1 * (a + o) + N2 * N1 if gram_rhs and rhs_by_gram(N1, (o, a)) else N2 * o * a + N2 * a
                      for o, a in L)
            weights = sum(N2 + N2 * o for o, a in L)
            sizes = [o * a for o, a in L]
        else:
            sizes = [o * a for o, a in shapes.layers] + list(shapes.others)
            rhs = sum(N2 * m for m in sizes)
            weights = N2 * len(sizes)
        solved = len(sizes) if self.curvature == "ng-bd" else 1
        return {"gram_scale": 2 * N2 * N2 * solved, "rhs": rhs, "solve": solved * flops_solve(N2, 1),
                "weights": weights, "direction": sum(N2 * m for m in sizes) + shapes.n,
                "model": 2 * shapes.n + N2 * solved}

    def _curvature_rows(self, problem: Problem, n1: int) -> Any:
        """S₂ ⊆ S₁ uniformly without replacement (Alg. 23 line 3): sorted host indices into S₁'s
        ``n1`` examples, or None when S₂ = S₁ (N₂ ≥ N₁). Not for the semi-stochastic variant."""
        if self.curvature_batch >= n1:
            return None
        return numpy.sort(problem.rng.choice(n1, size=self.curvature_batch, replace=False))

    def _s1_taps_route(self, problem: Problem) -> list | None:
        """The dense layers when S₂'s taps can be rows of S₁'s (SMW-NG and SMW-NG-BD, S₂ ⊆ S₁, a qnref
        net whose parametrised layers are all dense), else None. At one θ the curvature batch's
        activations āᵢ and output gradients γᵢ are S₁'s rows, so one backward pass of taps on S₁ gives
        ∇f (∇W̄ = ΓᵀĀ/N₁) and every curvature quantity (:func:`taps_direction`): no forward pass on S₂,
        no R-forward and no backward on S₂ (issue 21: steps that do only what the step needs)."""
        if self.curvature == "gn" or self.full_gradient:
            return None
        return dense_layers(getattr(problem, "model", None))

    def step(self, theta: Any, state: SMWState, problem: Problem) -> tuple[Any, SMWState, StepInfo]:
        """One iteration of Alg. 23 (see the class and module docstrings)."""
        layers = self._s1_taps_route(problem)
        opened = open_step(problem, None if self.full_gradient else self.batch_size, theta, tol=None,
                           need_grad=layers is None)
        if self.full_gradient:
            obj2, rows = problem.sample(self.curvature_batch), None
        else:
            obj2, rows = opened.obj, self._curvature_rows(problem, opened.obj.n_samples)
        lam = state.lambda_lm + self.tau
        extra = {"lambda": lam, "curvature_batch": obj2.n_samples if rows is None else len(rows), "form": self.form}
        # the taps route needs a plain engine point (data-parallel and framework points take the passes);
        # leaving it, make the ∇f check that open_step skipped for it
        if layers is not None and opened.stop is None and type(opened.point) is not Point:
            layers = None
            if not backend.all_finite(opened.g):
                opened = opened._replace(point=None, stop=stay(opened.obj))

        def stopped(info: StepInfo) -> tuple[Any, SMWState, StepInfo]:
            """θ does not move: a non-finite start (f or ∇f), the step counted as rejected."""
            info = with_extra(dataclasses.replace(info, step_size=self.lr), **extra)
            return theta, SMWState(state.lambda_lm, state.t + 1, state.rejected + 1), info

        if opened.stop is not None:
            return stopped(opened.stop)
        # overflow in the direction, the trial forward pass or θ + αp is detected explicitly below
        # (finiteness checks) and turned into a rejected step, so NumPy's warnings are silenced here
        with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if layers is not None:
                g, d = self._s1_taps_direction(problem, opened.point, layers, rows, lam)
                evals = 1
                if g is None:                                             # ∇f not finite at θ
                    return stopped(stay(opened.obj))
            else:
                g = opened.g
                if rows is not None:
                    obj2 = obj2.subset(backend.namespace(theta).asarray(rows))
                pt2 = opened.point if obj2 is opened.obj else obj2.at(theta)
                d = smw_direction(pt2, g, lam, curvature=self.curvature, form=self.form)
                evals = 1 + (pt2 is not opened.point)
            return self._finish(theta, state, opened, g, d, evals, extra)

    def _s1_taps_direction(self, problem: Problem, p1: Point, layers: list, rows: Any, lam: float) -> tuple:
        """(∇f, direction) from one backward pass on S₁ (:meth:`_s1_taps_route`); (None, None) when ∇f
        is not finite. :meth:`Point.grad_with_taps` gives ∇f (the bits of ``Point.grad``) and the taps
        of the mean loss, γᵢ/N₁; S₂'s taps are their rows ``rows`` (all of them when None), γᵢ
        restored by the factor N₁."""
        p1.check_independent("SMW-NG (per-example gradients)")
        g, taps = p1.grad_with_taps()
        if not backend.all_finite(g):
            return None, None
        xp, N1 = p1.xp, p1.N
        at = slice(None) if rows is None else xp.asarray(rows)
        rows_taps = {L.name: {"kind": "dense", "a": taps[L.name]["a"][at], "g": taps[L.name]["g"][at] * N1}
                     for L in layers}
        mu = float(lam) + p1.l2
        return g, taps_direction(xp, problem.layout, layers, rows_taps, g, mu, p1.l2,
                                 block_diagonal=self.curvature == "ng-bd", batch_taps=None if p1.l2 else taps)

    def _finish(self, theta, state, opened, g, d, evals, extra):
        f0 = opened.f0
        extra["d_size"] = d.d_size
        if self.curvature == "ng-bd":
            extra["blocks"] = d.blocks

        def rejected(lam_lm, evals, nonfinite):
            info = close_step(opened, loss=f0, accepted=False, evals=evals, step_size=self.lr, nonfinite=nonfinite,
                              extra=extra)
            return theta, SMWState(lam_lm, state.t + 1, state.rejected + 1), info

        if not d.finite:
            lam_lm = update_lambda_lm(state.lambda_lm, -math.inf, eps=self.eps, boost=self.boost, drop=self.drop)
            extra.update(rho=-math.inf, lambda_lm=lam_lm)
            return rejected(lam_lm, evals, True)
        t = 1.0 if self.rho_at == "direction" else self.lr
        pred = d.model_decrease_at(t)
        trial = theta + d.p if t == 1.0 else theta + t * d.p      # 1·p = p exactly
        pt = try_point(opened.obj, trial)                           # None when the trial θ is not finite
        evals += 1
        if pt is None:
            rho, f_trial = -math.inf, math.nan
        else:
            f_trial = pt.value
            rho = (f0 - f_trial) / pred if pred > 0 else math.nan
        lam_lm = update_lambda_lm(state.lambda_lm, rho, eps=self.eps, boost=self.boost, drop=self.drop)
        extra.update(rho=rho, lambda_lm=lam_lm, model_decrease=pred, loss_trial=f_trial)
        new = None if pt is None else _update(theta, d.p, self.lr, t, trial)
        if new is None:
            return rejected(lam_lm, evals, True)
        if self.eta is not None and not (rho >= self.eta):
            return rejected(lam_lm, evals, False)
        info = close_step(opened, loss=f_trial if t == self.lr else math.nan,    # f at θ + αp known only if evaluated
                          accepted=True, evals=evals, step_size=self.lr,
                          step_norm=self.lr * math.sqrt(d.pp), extra=extra)
        return new, SMWState(lam_lm, state.t + 1, state.rejected), info


def _update(theta: Any, p: Any, lr: float, t: float, trial: Any) -> Any:
    """θ + αp, or None when it is not finite (Alg. 23's update), given the finite trial θ + tp
    (evaluated, so θ is finite too). No finiteness pass where the trial decides it: for t = α the
    update *is* the trial; for t = 1 ≥ α > 0 every entry of fl(θ + fl(αp)) lies between θᵢ and
    fl(θᵢ + pᵢ) (rounding is monotone and fl(αpᵢ) lies between 0 and pᵢ), so it is finite."""
    if t == lr:
        return trial
    new = lr * p
    new += theta                              # = θ + αp (addition commutes exactly), one temporary fewer
    return new if (t == 1.0 and lr <= 1.0) or backend.all_finite(new) else None


@register("smw-gn")
class SMWGN(SMWOptimizer):
    """Subsampled Gauss-Newton (B = (1/N₂) Σ Jᵢᵀ H_{L,i} Jᵢ) with SMW directions."""

    curvature = "gn"
    forms = FORMS
    cost_formula: ClassVar[str] = "4(N₂C)² + (N₂C)³/3 + 6n + O(N₂C)"


@register("smw-ng")
class SMWNG(SMWOptimizer):
    """Subsampled (empirical-Fisher) natural gradient (B = (1/N₂) Σ ∇ℓᵢ ∇ℓᵢᵀ) with SMW directions."""

    curvature = "ng"
    forms = ("5.6",)
    cost_formula: ClassVar[str] = "2N₂² + N₂³/3 + 6n + O(N₂C); dense nets with S₂ ⊆ S₁: + Σₗ 2N₂nₗ (from taps) + O(L N₂ d)"


@register("smw-ng-bd")
class SMWNGBD(SMWOptimizer):
    """Block-diagonal SMW-NG (thesis §5.8, L2816): the empirical Fisher of S₂ restricted to its
    per-layer diagonal blocks, each block inverted by SMW (N₂ × N₂ systems, one per layer);
    otherwise Alg. 23 with the λ_LM rule of §5.2.3 and the §5.8 defaults, as SMW-NG."""

    curvature = "ng-bd"
    forms = ("5.6",)
    cost_formula: ClassVar[str] = "Σₗ (2N₂² + N₂³/3 + 2N₂nₗ) + 6n + O(L N₂ d)"
