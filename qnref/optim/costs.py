"""Per-step cost of each optimizer's *own algebra* (issue 10: "flops of the optimizer's own algebra").

The optimizer's own algebra is the arithmetic a step does on top of the objective's passes
(forward, backward, R-op / Gauss-Newton products, per-example Gram matrices, layer taps): vector
updates, two-loop recursions, compact-form products, small dense factorizations, Kronecker factor
statistics, inverses and inverse roots, preconditioning GEMMs, SMW solves, CG vector operations.

:func:`algebra_flops` returns ``{"per_step": int, "terms": {name: int}}`` for every registered
optimizer. Each optimizer class declares its own cost model next to its step:
``Optimizer.algebra_flops(shapes, batch_size, assume) -> {term: multiplications}`` (a function of
n, the memory m, the batch N and the layer shapes, :class:`ModelShapes`, under the nominal
:class:`CostAssumptions`) and ``Optimizer.cost_formula`` (the leading terms in words). The models
were derived by reading each implementation (not the papers), operation by operation, so that
they count what the code does; they are built from the operators' own counts
(:meth:`.operators.LBFGSOperator.two_loop_flops`, :meth:`.operators.LSR1Operator.matvec_flops`,
…, :func:`.trust_region.lsr1_subproblem_flops`) and the LAPACK nominal costs of this module.

Counting convention
-------------------
**Multiplications**, a multiply-add counting once (Nocedal & Wright §7.2 and Ramamurthy & Duffy §3; IEEE flops ≈ 2 × these numbers):

* an elementwise ``*`` or ``/`` on arrays of k elements (after broadcasting) counts k, scalar
  operations on Python floats / 0-d results count 0; ``+``, ``−``, negation, ``sqrt``, ``abs``,
  comparisons, sums, copies, concatenations count 0 (``mean`` counts its division);
* a product ``A @ B`` of (m × k)(k × p) counts m·k·p, so a dot product of length n counts n;
* dense LAPACK routines (never counted elementwise; the nominal multiplication counts below are
  the textbook leading terms, hence *approximate*): ``inv`` d³, ``solve`` d³/3 + d²·(right-hand
  sides), ``eigvalsh`` 2d³/3 (tridiagonal reduction), ``eigh`` with vectors 3d³, ``svd`` of a
  small square matrix 6d³, Householder QR with Q of an n × k matrix 2nk² − 2k³/3.

Terms that run every T steps are divided by T (``/T₁`` statistics, ``/T₂`` inverses and roots,
``/L`` SQN windows); each term is rounded to an integer separately.

Data-dependent counts (:class:`CostAssumptions`, keyword arguments of :func:`algebra_flops`)
-----------------------------------------------------------------------------------------
* ``pairs``: curvature pairs in memory — default the memory size (steady state, memory full);
* ``trials``: line-search trial points per step — default 1 (the first trial accepted);
* ``cg_iters``: CG iterations of Hessian-free — default 10 (the thesis's runs stop after tens;
  the cap ``max_cg_iters`` is 250);
* ``root_iters``: coupled-Newton iterations of a Shampoo inverse root — default the cap
  ``newton_iters`` (100): an **upper bound**;
* SR1 pair tests accept, no restart, no hard case in the trust-region solve; damping of K-BFGS
  inactive (Powell's branch not taken); hybrid directions of MB-LSR1 not clipped (only the norm).

Counted as objective passes, hence excluded here: f/∇f, Hv, Gv, Jv, Jᵀv, per-example Gram matrices
(SMW), layer taps (activations ā and pre-activation gradients g), the loss's dz (sampled targets).
Included although a pass might own it: ∇W̄ = gᵀā/N formed from taps by K-BFGS
(``grad_from_blocks``), the sampled-gradient scaling dz/N of TNT, and the output-Hessian diagonal
of SMW-GN (≈ 2NC, sigmoid/mse losses).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

__all__ = ["algebra_flops", "model_shapes", "ModelShapes", "CostAssumptions", "flops_inv", "flops_spd_inv", "flops_solve",
           "flops_eigvalsh", "flops_eigh", "flops_svd", "flops_qr"]


# -- LAPACK nominal costs (multiplications) --------------------------------------------------------
def flops_inv(d: int) -> float:
    """A general d × d inverse (LU: getrf + getri), in multiplications."""
    return d ** 3


def flops_spd_inv(d: int) -> float:
    """A symmetric positive-definite inverse as :func:`qnref.curvature.kron.spd_inverse` takes it:
    by Cholesky (potrf + potri, d³/6 + d³/3 multiplications) from order ``CHOLESKY_MIN_DIM`` on,
    by LU (:func:`flops_inv`) below it."""
    from ..curvature.kron import CHOLESKY_MIN_DIM  # noqa: PLC0415

    return d ** 3 / 2 if d >= CHOLESKY_MIN_DIM else flops_inv(d)


def flops_solve(d: int, rhs: int) -> float:
    return d ** 3 / 3 + d * d * rhs


def flops_eigvalsh(d: int) -> float:
    return 2 * d ** 3 / 3


def flops_eigh(d: int) -> float:
    return 3 * d ** 3


def flops_svd(d: int) -> float:
    return 6 * d ** 3


def flops_qr(n: int, k: int) -> float:
    return 2 * n * k * k - 2 * k ** 3 / 3


# -- what a cost model is a function of -------------------------------------------------------------
class ModelShapes(NamedTuple):
    """n: parameters; layers: (d_out, d_in + 1) of the Kronecker (dense) blocks; w_shapes: their
    weight shapes; others: sizes of the other blocks; out: output dimension C."""

    n: int
    layers: list
    w_shapes: list
    others: list
    out: int


class CostAssumptions(NamedTuple):
    """The nominal data-dependent counts (module docstring): line-search ``trials``, curvature
    ``pairs`` in memory (None: the memory size), HF's ``cg_iters``, Shampoo's ``root_iters``
    (None: the cap), and whether the problem has an ``l2`` term."""

    trials: int = 1
    pairs: int | None = None
    cg_iters: int = 10
    root_iters: int | None = None
    l2: bool = False   # the problem has an L2 term (SMW-NG's right-hand sides then skip the Gram trick)

    def pairs_or(self, memory: int) -> int:
        return memory if self.pairs is None else self.pairs


def model_shapes(layout_or_model: Any) -> ModelShapes:
    """The :class:`ModelShapes` of a model or a parameter layout.

    A :class:`~qnref.nn.model.Sequential` gives the exact Kronecker structure (conv layers
    included, through :func:`._kron_common.kron_structure`); a bare
    :class:`~qnref.params.ParamLayout` is read as dense layers: every 2-D block named ``*.W``.
    """
    layout = getattr(layout_or_model, "layout", layout_or_model)
    blocks = list(layout.blocks)
    n = int(layout.size)
    if hasattr(layout_or_model, "kron_layers"):
        from ._kron_common import kron_structure  # noqa: PLC0415

        layers, others = kron_structure(layout_or_model)
        lay = [(int(L.shape[0]), int(L.shape[1])) for L in layers]
        wshapes = [tuple(int(s) for s in L.w_shape) for L in layers]
        oth = [int(math.prod(blocks[k].shape)) for k in others]
    else:
        lay, wshapes, oth = [], [], []
        for b in blocks:
            shp = tuple(int(s) for s in b.shape)
            if len(shp) == 2 and str(b.name).endswith(".W"):
                lay.append(shp)
                wshapes.append((shp[0], shp[1] - 1))
            else:
                oth.append(int(math.prod(shp)))
    return ModelShapes(n, lay, wshapes, oth, lay[-1][0] if lay else n)


# -- step floors (issue 21): the passes and algebra a step cannot avoid, in gradients --------------------
def dense_pass_mults(shapes: ModelShapes, N: int) -> tuple[float, float]:
    """(forward, backward) multiplications of one pass over N examples of a dense net (layers o × a,
    a = d_in + 1): forward N·Σ o·a (the GEMMs W̄ā); backward N·Σ o·a (∇W̄ = γᵀĀ) + N·Σ_{l≥2} o(a − 1)
    (γ Wₗ for the layer below; none below the first layer). Activations and the loss are not
    counted: the multiplications an implementation cannot avoid (a *floor*). Dense nets only."""
    if shapes.others or any(len(w) != 2 for w in shapes.w_shapes):
        raise ValueError("the pass floor is defined for nets of dense layers only (no conv, BatchNorm or other blocks)")
    fwd = N * sum(o * a for o, a in shapes.layers)
    bwd = fwd + N * sum(o * (a - 1) for o, a in shapes.layers[1:])
    return float(fwd), float(bwd)


def floor_summary(passes: dict[str, float], algebra: dict[str, float], gradient: float) -> dict[str, Any]:
    """The floor of one step in gradients (the keys of ``KFAC.step_floor`` where they mean the same):
    ``pass_terms`` (multiplications by pass), ``algebra`` (:meth:`algebra_flops`, summed),
    ``gradient`` (one gradient on the step's batch), ``passes`` (the passes in gradients) and
    ``floor`` (passes + algebra, in gradients)."""
    p = sum(passes.values())
    return {"pass_terms": passes, "algebra": sum(algebra.values()), "gradient": gradient, "passes": p / gradient,
            "floor": (p + sum(algebra.values())) / gradient}


def algebra_flops(opt: Any, layout_or_model: Any, batch_size: int | None = None, *,
                  trials: int = 1, pairs: int | None = None, cg_iters: int = 10,
                  root_iters: int | None = None, l2: bool = False) -> dict:
    """Multiplications of one step of ``opt``'s own algebra (see the module docstring): the
    optimizer's own cost model, ``opt.algebra_flops(shapes, batch_size, assumptions)``.

    ``opt``: an optimizer instance or a registry name (paper defaults). ``layout_or_model``: a
    :class:`~qnref.nn.model.Sequential` (needed for conv nets) or a ParamLayout. ``batch_size``:
    the examples per step (default: ``opt.batch_size``, else 1000; it matters for KFAC / K-BFGS /
    TNT factor statistics only). The keyword arguments fix the data-dependent counts.

    Returns ``{"per_step": int, "terms": {name: int}}`` (amortized terms already divided by their
    period; ``per_step`` = sum of the rounded terms).
    """
    if isinstance(opt, str):
        from .registry import make_optimizer  # noqa: PLC0415

        opt = make_optimizer(opt)
    model = getattr(opt, "algebra_flops", None)
    if model is None or not getattr(opt, "cost_formula", ""):
        raise ValueError(f"no algebra cost model for optimizer {getattr(opt, 'name', opt)!r}")
    N = batch_size if batch_size is not None else getattr(opt, "batch_size", None)
    raw = model(model_shapes(layout_or_model), int(1000 if N is None else N),
                CostAssumptions(int(trials), pairs, int(cg_iters), root_iters, bool(l2)))
    terms = {k: int(round(v)) for k, v in raw.items()}
    return {"per_step": int(sum(terms.values())), "terms": terms}
