"""Shared machinery of the Kronecker-factored optimizers (KFAC, K-BFGS, Shampoo, TNT).

* :func:`kron_structure`: which parameter blocks belong to dense/conv layers (W̄ = [W b], one
  Kronecker block each) and which do not (BatchNorm scale/shift, anything else);
* :func:`tensor_parts`: the thesis's *tensor variables* for Shampoo and TNT (ch. 4): a dense W̄ is
  split into W (d_out × d_in) and b (d_out); a conv W̄ into the 3-way W (C_out, C_in, kh·kw) and b
  (thesis §4.7.2: "the size of the filter, the number of input channels, and the number of output
  channels"); every other block is a tensor of its own shape;
* the damping of K-BFGS's pairs: Powell / double damping (thesis Algorithm 3), D_P D_LM
  (Algorithm 8); the BFGS algebra itself (inverse update, L-BFGS product) is the shared one of
  :mod:`qnref.optim.operators`;
* the Kronecker step opening (warm start of the statistics over the whole training set, then
  :func:`qnref.optim.drivers.open_step` with ``tol=None``) and the finite check of Δθ.
"""
from __future__ import annotations

import dataclasses

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from .. import backend
from ..curvature import kron
from ..curvature.objective import Point
from .base import Optimizer, Problem, StepInfo, check_bool, check_int, check_positive, check_range, draw_size, evaluate
from .costs import CostAssumptions, ModelShapes, dense_pass_mults, floor_summary, model_shapes
from .drivers import Opened, close_step, finite_move, nonfinite_step, open_step, step_objective


# -- model structure ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class KronLayer:
    name: str          # layer name (the key of the taps)
    block: int         # index of its W̄ block in the layout
    kind: str          # "dense" or "conv"
    shape: tuple       # W̄ shape (d_out, d_in + 1)
    w_shape: tuple     # shape of the weight tensor W for Shampoo/TNT (without the bias)


def kron_structure(model) -> tuple[list[KronLayer], list[int]]:
    """(Kronecker layers, indices of the other blocks) of a :class:`Sequential` model."""
    layout = model.layout
    layers = []
    used = set()
    for layer in model.kron_layers:
        bname = f"{layer.name}.W"
        try:
            b = layout.index(bname)
        except KeyError:
            raise ValueError(f"Kronecker layer {layer.name!r} has no parameter block {bname!r}") from None
        k = layout.blocks.index(b)
        d_out = b.shape[0]
        if getattr(layer, "kron_dense", False):
            kind, w_shape = "dense", (d_out, b.shape[1] - 1)
        else:
            kind = "conv"
            cin = int(layer.in_shape[0])
            w_shape = (d_out, cin, (b.shape[1] - 1) // cin)
        layers.append(KronLayer(layer.name, k, kind, tuple(b.shape), w_shape))
        used.add(k)
    others = [k for k in range(len(layout.blocks)) if k not in used]
    return layers, others


@dataclass(frozen=True)
class TensorPart:
    """One tensor variable: block index, which part of it, and its tensor shape."""

    block: int
    part: str          # "W" (weights of a W̄), "b" (bias column of a W̄) or "all"
    shape: tuple


def tensor_parts(model) -> list[TensorPart]:
    layers, others = kron_structure(model)
    parts = []
    for L in layers:
        parts.append(TensorPart(L.block, "W", tuple(L.w_shape)))
        parts.append(TensorPart(L.block, "b", (L.shape[0],)))
    for k in others:
        shp = tuple(model.layout.blocks[k].shape) or (1,)
        parts.append(TensorPart(k, "all", shp))
    return parts


def read_part(views: list, part: TensorPart) -> Any:
    v = views[part.block]
    if part.part == "W":
        return v[:, :-1].reshape(part.shape)
    if part.part == "b":
        return v[:, -1]
    return v.reshape(part.shape)


def precondition_parts(layout, parts: list[TensorPart], mats: list, g: Any) -> Any:
    """P with each tensor part of ``g`` multiplied by its per-mode matrices, X ×₁ U₁ ⋯ ×ₖ Uₖ
    (thesis Alg. 15 line 18, Alg. 16 line 14, Alg. 14 line 5): a new vector, every entry written
    (the parts tile θ: :func:`tensor_parts`)."""
    P = backend.namespace(g).empty_like(g)
    gv, pv = layout.views(g), layout.views(P)
    for q, ms in zip(parts, mats):
        X = read_part(gv, q)
        for i, U in enumerate(ms):
            X = kron.mode_product(X, U, i)
        write_part(pv, q, X)
    return P


def write_part(views: list, part: TensorPart, value: Any) -> None:
    v = views[part.block]
    if part.part == "W":
        v[:, :-1] = value.reshape(v.shape[0], -1)
    elif part.part == "b":
        v[:, -1] = value
    else:
        v[...] = value.reshape(v.shape)


# -- gradients and taps ---------------------------------------------------------------------------------
def grad_from_blocks(layout, layers: list[KronLayer], blocks: dict, p: Point) -> Any:
    """∇f when every block is a Kronecker block, from each layer's ∇W̄ = (1/N) Σᵢ Σₜ gᵢₜ āᵢₜᵀ of
    the empirical taps (:func:`qnref.curvature.kron.weight_grad`; saves a backward pass), + λθ for
    the problem's L2 term."""
    xp = backend.namespace(p.theta)
    grad = xp.empty_like(p.theta)
    views = layout.views(grad)
    for L in layers:
        views[L.block][...] = blocks[L.name]
    if p.l2:
        grad += p.l2 * p.theta
    return grad


def sampled_mean_grad(p: Point) -> Any:
    """Minibatch mean of the sampling-based gradients (targets ỹ ~ model; thesis §4.2, Alg. 15 l. 7)."""
    return p.vjp(p.output_grads("sampled") / p.N)


def full_chunks(problem: Problem, size: int):
    """Objectives covering the whole training set in consecutive chunks of ``size`` (warm starts)."""
    n = problem.n_samples
    size = min(int(size), n)
    import numpy  # host indices only

    for start in range(0, n, size):
        yield problem.subset(numpy.arange(start, min(n, start + size)))


# -- step driver -------------------------------------------------------------------------------------------
def check_common(lr, momentum, beta, batch_size, weight_decay) -> tuple:
    return (
        check_positive("lr", lr),
        check_range("momentum", momentum, 0.0, 1.0, hi_open=True),
        check_range("beta", beta, 0.0, 1.0, hi_open=True),
        None if batch_size is None else check_int("batch_size", batch_size, 1),
        check_positive("weight_decay", weight_decay, allow_zero=True),
    )


def open_kron_step(opt: Any, state: Any, problem: Problem, theta: Any, structure: Any, state_cls: type, *,
                   need_grad: bool = True) -> tuple[Any, Opened]:
    """Start of a Kronecker step: the statistics warm start on the first step (``opt._warm`` on a
    fresh ``state_cls``), then :func:`~.drivers.open_step` (``tol=None``) on the step's batch."""
    bad = 0
    if not state.initialized:
        state = state_cls(k=state.k, mom=state.mom)
        bad = opt._warm(state, problem, theta, structure) or 0
    opened = open_step(problem, kron_batch(problem, opt.batch_size, opt), theta, tol=None, need_grad=need_grad)
    if bad:  # the warm start refused non-finite statistics: the step info says so
        opened = opened._replace(warm_skipped=bad, stop=None if opened.stop is None else
                                 dataclasses.replace(opened.stop, skipped=opened.stop.skipped + bad))
    return state, opened


def kron_precondition_flops(layers: list) -> float:
    """H_G ∇W̄ H_A per dense block (o × a): o²a + oa² multiplications."""
    return sum(o * o * a + o * a * a for o, a in layers)


def kron_batch(problem: Problem, batch_size: int | None, opt: Any = None) -> int | None:
    """The Kronecker methods' batch: the paper default capped at the whole training set (thesis
    full-batch runs); a chosen ``batch_size`` above the set is refused (:func:`~.base.draw_size`)."""
    if opt is not None:
        return draw_size(opt, problem, batch_size)
    return None if batch_size is None else min(batch_size, problem.n_samples)


def descend(theta: Any, P: Any, lr: float, weight_decay: float) -> tuple[Any, float] | None:
    """θ − α (P + γ θ) and its step norm, or ``None`` when that step is not finite (θ stays):
    the update of every Kronecker method (thesis Alg. 9, 12, 15, 16; γ = weight decay).
    ``P`` (the step's own preconditioned direction) is consumed."""
    if weight_decay:
        P += weight_decay * theta
    P *= -lr   # in place: the bits of −α·P without its temporary
    return finite_move(theta, P)


def second_pass(opened: Opened, theta_new: Any, due: bool) -> tuple[Point | None, float, int, bool]:
    """The curvature pass of KFAC / K-BFGS at θ⁺ on the step's own batch, every T steps (thesis
    Alg. 12 line 12, Alg. 9 line 10): (point at θ⁺ or None, f at the returned iterate as far as
    known, evaluations of the step, whether the pass was due but θ⁺ is not finite there). A due
    pass first releases the point at θ (:meth:`~qnref.curvature.objective.Point.release`): callers
    must have asked it for everything they need."""
    if not due:
        return None, opened.f0, 1, False
    release = getattr(opened.point, "release", None)   # the θ point's activations are not needed any more
    if release is not None:
        release()
    p_new, f_new = evaluate(opened.obj, theta_new)
    return p_new, opened.f0 if p_new is None else f_new, 2, p_new is None


def warm_objectives(problem: Problem, batch_size: int | None, whole_set: bool) -> list:
    """Objectives of the statistics warm start (thesis §3.7.2): the whole training set in
    consecutive chunks of ``batch_size`` when ``whole_set``, else one step batch."""
    if whole_set:
        return list(full_chunks(problem, batch_size or problem.n_samples))
    return [step_objective(problem, kron_batch(problem, batch_size))]


def all_finite(*arrays) -> bool:
    return all(backend.all_finite(a) for a in arrays)


# -- damping of the BFGS pairs (K-BFGS) ---------------------------------------------------------------------
def powell_on_H(s: Any, y: Any, Hy: Any, mu1: float) -> Any:
    """Powell's damping on H (thesis §2.3.1): s̃ = θ₁ s + (1 − θ₁) H y so that s̃ᵀy ≥ μ₁ yᵀHy."""
    sy = float(s @ y)
    yHy = float(y @ Hy)
    if sy < mu1 * yHy:
        th = (1.0 - mu1) * yHy / (yHy - sy)
        return th * s + (1.0 - th) * Hy
    return s


def double_damping(s: Any, y: Any, Hy: Any, mu1: float, mu2: float) -> tuple[Any, Any]:
    """Double damping DD (thesis Algorithm 3): Powell on H, then Powell with B = I (μ₂ ∈ (0, 1])."""
    st = powell_on_H(s, y, Hy, mu1)
    ss = float(st @ st)
    sy = float(st @ y)
    if sy < mu2 * ss:
        th2 = (1.0 - mu2) * ss / (ss - sy)
        yt = th2 * y + (1.0 - th2) * st
    else:
        yt = y
    return st, yt


def dp_dlm(s: Any, y: Any, Hy: Any, mu1: float, mu2: float) -> tuple[Any, Any]:
    """D_P D_LM (thesis Algorithm 8): Powell on H, then ỹ = y + μ₂ s̃ (LM damping, any μ₂ > 0)."""
    st = powell_on_H(s, y, Hy, mu1)
    return st, y + mu2 * st


def dpi_dlm(s: Any, y: Any, mu1: float, mu2: float) -> tuple[Any, Any]:
    """D_P(I) D_LM (thesis Algorithm 11, §3.6): D_P D_LM with H = μ₂⁻¹ I in Powell's step (the
    initial L-BFGS matrix of K-BFGS(L)), so no product with H_G is needed: s̃ᵀy ≥ (μ₁/μ₂) yᵀy,
    ỹ = y + μ₂ s̃; Lemma 4: s̃ᵀs̃ / s̃ᵀỹ ≤ 1/μ₂, ỹᵀỹ / s̃ᵀỹ ≤ μ₂(1 + 2μ₁)/μ₁."""
    return dp_dlm(s, y, y / mu2, mu1, mu2)


def dd_skip_passes(st: Any, yt: Any, Hyt: Any, mu1: float) -> bool:
    """The test of the "DD-skip" (thesis Algorithm 5 line 17): the damped pair (s̃, ỹ) updates H
    only when s̃ᵀỹ ≥ μ₁ ỹᵀ H ỹ (``Hyt`` = H ỹ with the H before the update), the bound of
    Lemma 2's proof (2.8).

    Powell's step (Alg. 3 l. 2-3) makes s̃ᵀy = μ₁ yᵀHy exactly, so whenever DD's second step leaves
    ỹ = y the test is an equality, which l. 17 keeps (≥): the comparison allows a relative margin of
    √ε of the dtype so that rounding does not decide those pairs."""
    import numpy  # dtype constants only (CuPy dtypes are NumPy's)

    bound = mu1 * float(yt @ Hyt)
    return float(st @ yt) >= bound - math.sqrt(float(numpy.finfo(st.dtype).eps)) * abs(bound)


def validate_freq(name: str, value: int) -> int:
    return check_int(name, value, 1)


def sqrt_split(damping: float, L: int) -> tuple[float, float]:
    """(λ_A, λ_G) = (√L √λ, √λ / √L) (thesis §3.3.2; L = 1 for dense layers gives √λ each)."""
    r = math.sqrt(damping)
    return math.sqrt(L) * r, r / math.sqrt(L)


Callback = Callable[..., Any]


# -- tensor-factor preconditioners (Shampoo, TNT) ----------------------------------------------------------
@dataclass
class KronState:
    """The start of every Kronecker method's state: steps taken k, whether the statistics have been
    warm-started (:func:`open_kron_step`), the momentum ĝ."""

    k: int = 0
    initialized: bool = False
    mom: Any = None


@dataclass
class TensorState(KronState):
    stats: list = None      # per tensor part: list of k_l contraction estimates Ĝ⁽ⁱ⁾
    precond: list = None    # per tensor part: list of k_l preconditioning matrices


class TensorFactorOptimizer(Optimizer):
    """Common driver of Shampoo (thesis Algorithm 16) and TNT (Algorithm 15).

    Per step t: ĝ ← μ ĝ + ∇f_M(θ) (line 7 / 10); if t ≡ 0 (mod T₁) update Ĝ⁽ⁱ⁾ ← β Ĝ⁽ⁱ⁾ + (1−β) Ḡ⁽ⁱ⁾
    for every tensor variable and mode, Ḡ = :meth:`_stat_grad` (the minibatch gradient for
    Shampoo, the minibatch mean of sampling-based gradients for TNT); if t ≡ 0 (mod T₂) recompute
    the per-mode matrices Uᵢ (:meth:`_factor_matrices`); then p = ĝ ×₁ U₁ ⋯ ×ₖ Uₖ + γ W and
    W ← W − α p. Warm start (line 2): Ĝ⁽ⁱ⁾ = average of Ḡ⁽ⁱ⁾ over the training set in consecutive
    batches of ``batch_size`` (a trailing smaller batch is dropped when there are others).
    """

    family: ClassVar[str] = "kronecker"

    def _setup(self, lr, damping, momentum, beta, stat_freq, inv_freq, batch_size, weight_decay, warm_start):
        self.lr, self.momentum, self.beta, self.batch_size, self.weight_decay = check_common(
            lr, momentum, beta, batch_size, weight_decay)
        self.damping = check_positive("damping", damping)
        self.stat_freq = validate_freq("stat_freq", stat_freq)
        self.inv_freq = validate_freq("inv_freq", inv_freq)
        self.warm_start = check_bool("warm_start", warm_start)

    def init(self, theta: Any) -> TensorState:
        return TensorState(mom=backend.namespace(theta).zeros_like(theta))

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """Tensor variables: W (o, d_in) and b (o,) per layer, the other blocks. Momentum (n); every
        T₁ steps the contractions Ĝ⁽ⁱ⁾ = mat_i(X) mat_i(X)ᵀ (symmetric: one syrk, dᵢ(dᵢ+1)/2 Πⱼ≠ᵢdⱼ
        per mode, as K-FAC's factors are counted) and their EMA (2dᵢ²); every T₂ steps the per-mode
        matrices (:meth:`_root_flops`); the mode products ĝ ×₁ U₁ ⋯ ×ₖ Uₖ (GEMMs, dᵢ²Πⱼ≠ᵢdⱼ per
        mode); the step (2n, + n with weight decay)."""
        parts = [q for w in shapes.w_shapes for q in (tuple(w), (w[0],))] + [(s,) for s in shapes.others]
        modes = sum(d * math.prod(shp) for shp in parts for d in shp)
        sym_modes = sum((d + 1) * math.prod(shp) / 2 for shp in parts for d in shp)
        t = {"momentum": shapes.n, "statistics": sym_modes / self.stat_freq,
             "statistics_ema": sum(2 * d * d for shp in parts for d in shp) / self.stat_freq,
             **self._extra_flops(shapes, batch_size),
             self._root_term: sum(self._root_flops(d, len(shp), assume) for shp in parts for d in shp) / self.inv_freq}
        return {**t, "precondition": modes, "step": 2 * shapes.n + (shapes.n if self.weight_decay else 0)}

    def step_floor(self, model: Any, batch_size: int | None = None,
                   assume: CostAssumptions | None = None) -> dict[str, Any]:
        """The floor of one step on a dense net (issue 21), in gradients on the batch (m =
        ``batch_size``, default the optimizer's, else 1000): the gradient (F + B,
        :func:`~.costs.dense_pass_mults`), the method's extra passes (:meth:`_floor_passes`: TNT's
        sampled backward every T₁ steps; none for Shampoo, whose statistics are the gradient's) and
        :meth:`algebra_flops` (statistics and EMA /T₁, roots or inverses /T₂, mode products,
        momentum, step), by :func:`~.costs.floor_summary`. An SGD-momentum step's floor is
        1 + 2n/(F + B)."""
        shapes = model_shapes(model)
        m = batch_size or self.batch_size or 1000
        F, B = dense_pass_mults(shapes, m)
        passes = {"gradient": F + B, **self._floor_passes(F, B)}
        return floor_summary(passes, self.algebra_flops(shapes, m, assume or CostAssumptions()), F + B)

    def _floor_passes(self, F: float, B: float) -> dict[str, float]:
        """Passes beyond the gradient in a step's floor, by name (multiplications; F, B: one forward
        and one backward pass on the batch)."""
        return {}

    _root_term: ClassVar[str] = "roots"

    def _root_flops(self, d: int, order: int, assume: Any) -> float:
        raise NotImplementedError

    def _extra_flops(self, shapes: Any, batch_size: int) -> dict:
        return {}

    # hooks
    def _stat_grad(self, p: Point) -> Any:
        raise NotImplementedError

    def _factor_matrices(self, stats: list, shape: tuple) -> list | None:
        raise NotImplementedError

    # helpers
    def _contractions(self, layout, parts, flat: Any) -> list:
        views = layout.views(flat)
        return [[kron.contraction(read_part(views, q), i) for i in range(len(q.shape))] for q in parts]

    def _recompute(self, stats: list, parts, old: list | None) -> tuple[list, int]:
        out, bad = [], 0
        for j, q in enumerate(parts):
            mats = self._factor_matrices(stats[j], q.shape)
            if mats is None or not all(backend.all_finite(m) for m in mats):
                bad += 1
                mats = old[j] if old is not None else [backend.namespace(s).eye(s.shape[0], dtype=s.dtype) / self.damping for s in stats[j]]
            out.append(mats)
        return out, bad

    def _warm(self, state: TensorState, problem: Problem, theta: Any, parts) -> int:
        objs = warm_objectives(problem, self.batch_size, self.warm_start)
        if len(objs) > 1 and objs[-1].n_samples < objs[0].n_samples:
            objs = objs[:-1]
        total = None
        for obj in objs:
            c = self._contractions(problem.layout, parts, self._stat_grad(obj.at(theta)))
            total = c if total is None else [[x + y for x, y in zip(a, b)] for a, b in zip(total, c)]
        state.stats = [[x / len(objs) for x in a] for a in total]
        state.precond, bad = self._recompute(state.stats, parts, None)
        state.initialized = True
        return bad

    def step(self, theta: Any, state: TensorState, problem: Problem) -> tuple[Any, TensorState, StepInfo]:
        layout = problem.layout
        parts = tensor_parts(problem.model)
        state, opened = open_kron_step(self, state, problem, theta, parts, TensorState)
        if opened.stop is not None:
            return theta, state, opened.stop
        p = opened.point
        k = state.k + 1
        mom = self.momentum * state.mom + p.grad
        stats, precond, skipped = state.stats, state.precond, 0
        if k % self.stat_freq == 0:
            sg = self._stat_grad(p)
            if backend.all_finite(sg):
                new_c = self._contractions(layout, parts, sg)
                stats = [[kron.ema(o, n, self.beta) for o, n in zip(a, b)] for a, b in zip(stats, new_c)]
            else:
                skipped += 1
        if k % self.inv_freq == 0:
            precond, bad = self._recompute(stats, parts, precond)
            skipped += bad
        P = precondition_parts(layout, parts, precond, mom)
        moved = descend(theta, P, self.lr, self.weight_decay)
        if moved is None:
            return theta, state, nonfinite_step(opened, self.lr, skipped)
        info = close_step(opened, loss=opened.f0, accepted=True, evals=1, step_size=self.lr, step_norm=moved[1],
                          skipped=skipped)
        return moved[0], TensorState(k=k, initialized=True, mom=mom, stats=stats, precond=precond), info
