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

Idealized TNT (thesis Algorithm 14, §4.4; registered ``"tnt-ideal"``, :class:`TNTIdeal`) replaces
the estimates by the **true** expectations at θ_t: with G = DW the sampling-based gradient of one
example x (targets y ~ p(y|x, θ)),

    E[G⁽ⁱ⁾] = (1/|X|) Σ_{x∈X} E_{y~p(y|x)}[mat_i(G_{x,y}) mat_i(G_{x,y})ᵀ]        (line 4)

over the population X (``population="data"``: the training set, the thesis's Q_x; ``"batch"``:
the step's minibatch), exactly: for the losses here E_y[∂ℓ/∂z ∂ℓ/∂zᵀ] = H_L = S Sᵀ (softmax_ce:
categorical, sigmoid_ce: Bernoulli, mse: N(z, I); Martens 2020 §9.2) and mat_i is linear, so
E_y[…] = Σ_c mat_i(Jₓᵀ sₓ,c) mat_i(Jₓᵀ sₓ,c)ᵀ with sₓ,c the columns of Sₓ (one per-example backward
pass per column c; :func:`fisher_contractions`). Then Ũᵢ by (4.10), p_t = ∇L̄_t ×₁ (Ũ₁ + εI)⁻¹ ⋯
×ₖ (Ũₖ + εI)⁻¹ with ∇L̄_t the minibatch gradient (line 3, 5) and θ ← θ − α_t p_t (line 6),
α_t = α t^(−β) (Theorem 5's form; β = ``decay``). No momentum, no moving averages, no warm start,
no weight decay. G here is one example's gradient, so E[G⁽ⁱ⁾] is m times the expectation of
Algorithm 15's Ḡ⁽ⁱ⁾ (a batch mean of m zero-mean gradients): ε and α are not interchangeable
between the two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import backend
from ..curvature import kron
from ..curvature.protocol import UnsupportedProductError
from ._kron_common import (TensorFactorOptimizer, TensorPart, descend, full_chunks, precondition_parts,
                           sampled_mean_grad, tensor_parts)
from .costs import CostAssumptions, ModelShapes, flops_spd_inv
from .base import Optimizer, Problem, StepInfo, check_choice, check_int, check_positive, check_range, draw_size
from .drivers import close_step, nonfinite_step, open_step
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

    cost_formula: ClassVar[str] = ("Σ_parts Σᵢ [dᵢ(dᵢ+1)/2 Πⱼ≠ᵢdⱼ (statistics, /T₁) + dᵢ²Πⱼ≠ᵢdⱼ (preconditioning)] "
                                   "+ Σ (dᵢ³/2 + 4dᵢ²)/T₂ (dᵢ³ below order 128) + NC/T₁ + 4n")
    _root_term: ClassVar[str] = "inverses"

    def _root_flops(self, d: int, order: int, assume: Any) -> float:
        """The damped inverse (:func:`~.costs.flops_spd_inv`: d³/2 by Cholesky, d³ by LU below order
        128) and the factor's scaling (4d²)."""
        return flops_spd_inv(d) + 4 * d * d

    def _floor_passes(self, F: float, B: float) -> dict[str, float]:
        """The sampled-gradient backward pass every T₁ steps (B/T₁; TNT-EF reuses the gradient's)."""
        return {"sampled_backward": B / self.stat_freq if self.fisher == "sampled" else 0.0}

    def _extra_flops(self, shapes: Any, batch_size: int) -> dict:
        """The sampled-gradient scaling dz/N every T₁ steps (sampled Fisher)."""
        return {"sampled_grad_scale": batch_size * shapes.out / self.stat_freq} if self.fisher == "sampled" else {}

    def _factor_matrices(self, stats: list, shape: tuple) -> list | None:
        return damped_inverse_factors(stats, shape, self.damping)


def damped_inverse_factors(stats: list, shape: tuple, damping: float) -> list:
    """(Ũᵢ + εI)⁻¹ for i = 1…k, Ũᵢ from the contractions by (4.10) (Alg. 15 lines 15-16, Alg. 14 line 5)."""
    out = []
    for U in tnt_factors(stats, shape):      # a fresh array each: ε is added to its diagonal in place
        # Ũᵢ is symmetric by construction (a syrk, its average, scaled and shifted): lower=True (issue 21)
        out.append(kron.spd_inverse(kron.add_identity_(U, damping), lower=True))
    return out


# -- idealized TNT (thesis Algorithm 14) ---------------------------------------------------------------
#: per-example gradient rows held at once when the population is processed in chunks (≈ 32 MB float64)
CHUNK_ELEMENTS = 1 << 22


def _engine_point(point: Any) -> Any:
    """The qnref point whose model runs the per-example backward passes: the point itself, or the
    engine twin of a torch/JAX point on a converted model (``engine_point``, layout "qnref")."""
    if hasattr(point, "caches") and hasattr(getattr(point.obj, "model", None), "per_example_grads"):
        return point
    twin = getattr(point, "engine_point", None)
    if twin is None:
        raise UnsupportedProductError("tnt-ideal needs per-example backward passes with output weights (qnref's "
                                      "engine model, or a converted torch/JAX model with layout='qnref')")
    return twin()


def _part_rows(bviews: list, part: TensorPart) -> Any:
    """The per-example tensors (N, *part.shape) of a tensor part from batched block views."""
    v = bviews[part.block]
    n = v.shape[0]
    if part.part == "W":
        return v[:, :, :-1].reshape((n,) + part.shape)
    if part.part == "b":
        return v[:, :, -1]
    return v.reshape((n,) + part.shape)


def fisher_contractions(point: Any, parts: list[TensorPart]) -> list[list[Any]]:
    """Σ_x E_{y~p(y|x)}[mat_i(G) mat_i(G)ᵀ] over the point's examples, per tensor part and mode.

    G = DW of one example (its sampling-based gradient). Exactly, with H_{L,x} = Sₓ Sₓᵀ
    (:meth:`loss_sqrt_hessian`; = E_y[∂ℓ/∂z ∂ℓ/∂zᵀ] for softmax_ce, sigmoid_ce, mse):
    Σ_x Σ_c mat_i(Jₓᵀ sₓ,c) mat_i(Jₓᵀ sₓ,c)ᵀ, one per-example backward pass per column c (C passes,
    counted). A sum, not a mean. Examples must be independent (no BatchNorm in training mode).
    """
    point.check_independent("tnt-ideal (exact per-example Fisher statistics)")
    eng = _engine_point(point)
    xp, z = eng.xp, eng.z
    if z.ndim != 2:
        raise ValueError(f"tnt-ideal needs 2-D outputs (N, C), got shape {tuple(z.shape)}")
    S = eng.loss_sqrt_hessian()                     # (N, C, C) with H = S Sᵀ, or the diagonal's root (N, C)
    n, C = z.shape
    model, layout = eng.obj.model, eng.layout
    total = None
    for c in range(C):
        if S.ndim == 3:
            U = xp.ascontiguousarray(S[:, :, c])
        else:                                       # diagonal H_L: Sₓ e_c = √h_{x,c} e_c
            U = xp.zeros_like(z)
            U[:, c] = S[:, c]
        eng.counter.add("backward", n, "fisher_contractions")
        rows = model.per_example_grads(eng.theta, eng.caches, U)      # (N, n) rows Jₓᵀ sₓ,c
        bviews = layout.batched_views(rows)
        # Σ_x mat_i(Xₓ) mat_i(Xₓ)ᵀ = mat_{i+1}(X) mat_{i+1}(X)ᵀ for X stacking the examples first
        new = [[kron.contraction(_part_rows(bviews, q), i + 1) for i in range(len(q.shape))] for q in parts]
        total = new if total is None else [[a + b for a, b in zip(ta, tb)] for ta, tb in zip(total, new)]
    return total


@dataclass
class TNTIdealState:
    """Steps taken (the t of α_t = α t^(−β))."""

    k: int = 0


@register("tnt-ideal")
class TNTIdeal(Optimizer):
    """Idealized TNT (thesis Algorithm 14): true expectations E[G⁽ⁱ⁾] at every θ_t (module docstring).

    Parameters
    ----------
    lr:          α (α_t = α t^(−β)). The thesis gives no value for Algorithm 14 (analysis only);
                 0.1 = Table 4.3's α = 1e-4 for TNT times its batch size 1000, the factor by which
                 the per-example statistics here exceed Algorithm 15's batch-mean ones.
    damping:     ε of (Ũᵢ + εI)⁻¹ (0.1, the symbol's Table 4.3 value).
    batch_size:  m of the gradient minibatch (1000, as TNT; capped at the training set).
    population:  "data" (the whole training set, the thesis's x ~ Q_x) or "batch" (the step's batch).
    decay:       β of α_t = α t^(−β), 0 ≤ β < 1 (0: constant; Theorem 5 takes β ∈ (0.5, 1)).
    """

    family: ClassVar[str] = "kronecker"
    paper: ClassVar[str] = "Ren & Goldfarb 2021; Ren thesis Alg. 14, (4.10), Theorem 5"
    cost_formula: ClassVar[str] = "Σ_parts Σᵢ (C·N_pop·dᵢ²Πⱼ≠ᵢdⱼ + dᵢ³ + 4dᵢ²) + Σ dᵢΠdⱼ + 2n (+ C per-example passes over N_pop)"

    def __init__(self, lr: float = 0.1, damping: float = 0.1, batch_size: int | None = 1000, population: str = "data",
                 decay: float = 0.0):
        self.lr = check_positive("lr", lr)
        self.damping = check_positive("damping", damping)
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size, 1)
        self.population = check_choice("population", population, ("data", "batch"))
        self.decay = check_range("decay", decay, 0.0, 1.0, hi_open=True)

    def init(self, theta: Any) -> TNTIdealState:
        return TNTIdealState()

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """Per step, C outputs, N_pop = ``batch_size`` for population "batch" (for "data" the
        training set's size replaces it): the exact contractions Σ_x Σ_c mat_i(Gₓ,c)mat_i(Gₓ,c)ᵀ
        (C·N_pop·dᵢ²Πⱼ≠ᵢdⱼ per mode) and their 1/N_pop, the damped inverses (dᵢ³ + 4dᵢ², as TNT's),
        the mode products (dᵢΠdⱼ per mode), the step (2n). The C per-example backward passes are
        objective passes (not counted here)."""
        parts = [q for w in shapes.w_shapes for q in (tuple(w), (w[0],))] + [(s,) for s in shapes.others]
        modes = sum(d * math.prod(shp) for shp in parts for d in shp)
        C = shapes.out
        return {"statistics": C * batch_size * modes, "statistics_mean": sum(d * d for shp in parts for d in shp),
                "inverses": sum(flops_spd_inv(d) + 4 * d * d for shp in parts for d in shp),
                "precondition": modes, "step": 2 * shapes.n}

    def _population(self, problem: Problem, obj: Any, theta: Any) -> list:
        """The points of the population at θ: the step's batch, or the training set in chunks of at
        most :data:`CHUNK_ELEMENTS` per-example gradient entries (``problem.full_objective``'s
        examples; not counted as an epoch: the expectation is the algorithm's oracle)."""
        if self.population == "batch":
            return [obj]
        n = problem.layout.size
        size = max(1, min(problem.n_samples, CHUNK_ELEMENTS // max(n, 1)))
        if size >= problem.n_samples:
            return [problem.full_objective]
        return list(full_chunks(problem, size))

    def step(self, theta: Any, state: TNTIdealState, problem: Problem) -> tuple[Any, TNTIdealState, StepInfo]:
        """One iteration of Algorithm 14 (lines 2–6)."""
        k = state.k + 1
        lr = self.lr * k ** (-self.decay) if self.decay else self.lr
        opened = open_step(problem, draw_size(self, problem, self.batch_size), theta, tol=None)
        if opened.stop is not None:
            return theta, TNTIdealState(k), opened.stop
        parts = tensor_parts(problem.model)
        total, n_pop, evals = None, 0, 1
        for obj in self._population(problem, opened.obj, theta):
            pt = opened.point if obj is opened.obj else obj.at(theta)
            evals += pt is not opened.point
            c = fisher_contractions(pt, parts)
            n_pop += obj.n_samples
            total = c if total is None else [[a + b for a, b in zip(ta, tb)] for ta, tb in zip(total, c)]
        stats = [[S / n_pop for S in a] for a in total]                       # E over x ~ Q_x (line 4)
        try:
            mats = [damped_inverse_factors(st, q.shape, self.damping) for st, q in zip(stats, parts)]
        except Exception:  # numpy.linalg.LinAlgError (singular Ũᵢ + εI, e.g. ε below rounding); CuPy gives NaN
            mats = None
        if mats is None or not all(backend.all_finite(m) for ms in mats for m in ms):
            return theta, TNTIdealState(k), nonfinite_step(opened, lr, skipped=1)
        P = precondition_parts(problem.layout, parts, mats, opened.g)            # p_t (line 5)
        moved = descend(theta, P, lr, 0.0)                                       # θ − α_t p_t (line 6)
        if moved is None:
            return theta, TNTIdealState(k), nonfinite_step(opened, lr)
        info = close_step(opened, loss=opened.f0, accepted=True, evals=evals, step_size=lr, step_norm=moved[1],
                          extra={"population": n_pop})
        return moved[0], TNTIdealState(k), info
