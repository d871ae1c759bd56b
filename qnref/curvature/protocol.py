"""What an optimizer may ask of a problem, an objective and a point: the written protocol.

Every optimizer in :mod:`qnref.optim` touches the training task only through these three
layers (``problem.batch(B).at(θ).hvp(v)``); every type in the repository implements them:

======================  ================================  =====================================  ============================
layer                   NumPy/CuPy engine                 data-parallel                          torch / JAX adapters
======================  ================================  =====================================  ============================
:class:`ProblemProtocol`  ``qnref.optim.base.Problem``      ``DistributedProblem``                 ``TorchProblem``, ``JaxProblem``
:class:`ObjectiveProtocol`  ``Objective``                   ``DistributedObjective``               ``TorchObjective``, ``JaxObjective``
:class:`PointProtocol`  ``Point``                         ``DistributedPoint``                   ``TorchPoint``, ``JaxPoint``
======================  ================================  =====================================  ============================

A point splits into **primitives** (:class:`PointPrimitives`, what a new point type must
implement) and **derived products** implemented once in
:class:`qnref.curvature.derived.PointProducts` on top of them. Conventions (all points):

- f(θ) = (1/N) Σᵢ ℓ(zᵢ, yᵢ) + (λ/2)‖θ‖²: **mean** over the N examples of the batch, λ = ``l2``;
- J = ∂z/∂θ stacked over examples, Jᵢ the rows of example i, H_{L,i} = ∇²_z ℓ(zᵢ, yᵢ);
- the L2 term is in ``value``, ``grad``, ``hvp`` and ``ggn_vp``; it is **not** in ``jvp``/``vjp``
  (Jacobian products, no 1/N), nor in ``fisher_vp``, ``per_example_grads``, ``gram`` and
  ``layer_stats`` (statistical objects of the data term; add λI yourself);
- Hessian products by the R-op of the backward pass (Pearlmutter 1994, "Fast exact
  multiplication by the Hessian", eq. 4–5); GGN G = (1/N) Jᵀ H_L J + λI (Schraudolph 2002,
  eq. 7; Martens 2010 §4.2); Fisher kinds: empirical (1/N) Σ gᵢ gᵢᵀ, sampled (targets ỹ ~ p(y|z)),
  exact E_ỹ = (1/N) Jᵀ H_L J for canonical (exponential-family) losses (Martens 2020, "New
  insights and perspectives on the natural gradient method", §9.2);
- Gram matrices of Ren's thesis ch. 5 (Alg. 17–22); layer taps (āₗ₋₁, gₗ) of Martens & Grosse
  2015 (KFAC, §3) with W̄ = [W b].

A point type that cannot offer a product (layer taps of an opaque torch module) raises
:class:`UnsupportedProductError` naming the product and what to use instead, never an
``AttributeError``. Bad directions raise ``ValueError`` (shape), ``TypeError`` (dtype or array
library) or :class:`~qnref.curvature.objective.NonFiniteError` (NaN/Inf; a ``ValueError``).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

__all__ = ["UnsupportedProductError", "OPTIMIZER_NEEDS", "optimizer_needs", "ModelStructure", "PointPrimitives", "PointProtocol", "ObjectiveProtocol",
           "ProblemProtocol", "FISHER_KINDS", "GRAM_KINDS", "TARGETS", "TapReducer", "reduce_taps"]

#: ``kind`` of :meth:`PointProtocol.fisher_vp`.
FISHER_KINDS = ("empirical", "sampled", "exact")
#: ``kind`` of :meth:`PointProtocol.gram`.
GRAM_KINDS = ("grad", "jacobian")
#: string ``targets`` of the per-example quantities (or an explicit array of targets).
TARGETS = ("empirical", "sampled")


class UnsupportedProductError(NotImplementedError):
    """A point/problem type cannot offer this product; the message names it and the alternative."""


#: What each registered optimizer asks of a problem (the adapters refuse a mode that cannot give it):
#: "grad" — f and ∇f at the points it chooses (a closure / ``value_fn`` suffices);
#: "curvature" — Hessian/GGN/Fisher products or Gram matrices (any point type);
#: "layers" — Kronecker layer taps (qnref's layer structure: an engine model or a converted one).
OPTIMIZER_NEEDS: dict[str, str] = {
    "sgd": "grad", "momentum": "grad", "nag": "grad", "adam": "grad", "rmsprop": "grad", "adagrad": "grad",
    "adadelta": "grad", "svrg": "grad", "gd-ls": "grad", "lbfgs": "grad", "lsr1-tr": "grad", "lsr1-ls": "grad",
    "mb-lsr1": "grad", "lssr1-tr": "grad", "gd": "grad", "soc-sr1": "grad",
    "s-lbfgs": "curvature", "s-lsr1": "curvature",  # option "I" (gradient differences): "grad"
    "sqn": "curvature", "hf": "curvature", "shg": "curvature", "smw-gn": "curvature", "smw-ng": "curvature",
    "smw-ng-bd": "curvature",  # per-layer taps on dense nets, per-example gradient rows otherwise
    "kfac": "layers", "kbfgs": "layers", "kbfgs-l": "layers", "shampoo": "layers", "tnt": "layers",
    "tnt-ideal": "layers",
}


def optimizer_needs(optimizer: Any) -> str:
    """"grad", "curvature" or "layers" for a qnref optimizer instance (:data:`OPTIMIZER_NEEDS`)."""
    name = getattr(optimizer, "name", type(optimizer).__name__)
    if name not in OPTIMIZER_NEEDS:
        raise ValueError(f"no requirement is declared for optimizer {name!r}; add it to "
                         "qnref.curvature.protocol.OPTIMIZER_NEEDS")
    need = OPTIMIZER_NEEDS[name]
    if name in ("s-lbfgs", "s-lsr1") and getattr(optimizer, "option", "II") == "I":
        need = "grad"
    return need


#: ``reduce(name, tap) -> value`` of :meth:`PointPrimitives.layer_stats`
TapReducer = Callable[[str, Any], Any]


def reduce_taps(taps: dict, reduce: TapReducer | None) -> dict:
    """``{name: reduce(name, tap)}`` (``taps`` itself when ``reduce`` is None): the meaning of
    ``layer_stats(targets, reduce)`` for point types that record all taps first."""
    return taps if reduce is None else {name: reduce(name, t) for name, t in taps.items()}


@runtime_checkable
class ModelStructure(Protocol):
    """The model structure Kronecker methods (KFAC, K-BFGS, Shampoo, TNT) need.

    ``layout``: the :class:`~qnref.params.ParamLayout` of θ (blocks, ``views``); ``kron_layers``:
    the layers with Kronecker structure (``name``, ``kind`` "dense"/"conv", parameter block) in
    θ order — an opaque model raises :class:`UnsupportedProductError` here; ``couples_examples``:
    True when examples of a batch interact (batch normalization in training mode).
    """

    layout: Any
    couples_examples: bool

    @property
    def kron_layers(self) -> Sequence[Any]: ...


@runtime_checkable
class PointPrimitives(Protocol):
    """What a point type implements itself; :class:`~qnref.curvature.derived.PointProducts` adds the rest.

    Rows: a data-parallel point holds only its shard's rows; the ``local_*`` primitives act on
    those rows and ``reduce_sum``/``gather_rows``/``local_rows`` (identities for one process)
    combine them. ``N`` is the number of examples of the whole batch.
    """

    theta: Any
    obj: Any

    @property
    def N(self) -> int: ...
    @property
    def xp(self) -> Any: ...
    @property
    def layout(self) -> Any: ...
    @property
    def value(self) -> float:
        """f(θ) (mean data loss + (λ/2)‖θ‖²) as a Python float."""
    @property
    def grad(self) -> Any:
        """∇f(θ) = (1/N) Jᵀ ∂ℓ/∂z + λθ, cached."""
    @property
    def z(self) -> Any:
        """Network outputs of the batch, (N, *output_shape)."""

    def hvp(self, v: Any) -> Any:
        """∇²f(θ) v exactly (R-op of the backward pass, Pearlmutter 1994), λv included."""
    def local_jvp(self, v: Any) -> Any:
        """J v on the point's own rows (v already checked)."""
    def local_vjp(self, u: Any, call: str) -> Any:
        """Σᵢ Jᵢᵀ uᵢ over the point's own rows (no 1/N, no λ); ``call`` names the product for the counter."""
    def local_loss_hvp(self, u: Any) -> Any:
        """H_{L,i} uᵢ per own row (the output-space Hessian of ℓᵢ, no 1/N)."""
    def local_output_grads(self, targets: Any) -> Any:
        """eᵢ = ∂ℓ(zᵢ, tᵢ)/∂zᵢ per own row; ``targets`` is "empirical", "sampled" or an array of targets."""
    def local_loss_sqrt_hessian(self) -> Any:
        """Factors Sᵢ with H_{L,i} = Sᵢ Sᵢᵀ per own row (outputs (N, C)): (n_own, C, C), or
        (n_own, C) holding √diag(H_{L,i}) when the loss's output Hessian is diagonal (mse,
        sigmoid_ce). Any factor with Sᵢ Sᵢᵀ = H_{L,i} is valid (SMW-GN's direction does not depend
        on the choice); :class:`~qnref.curvature.derived.PointProducts` derives one from
        ``local_loss_hvp`` (symmetric eigen-square-root) for point types without a closed form."""
    def local_loss_hessian(self) -> Any:
        """H_{L,i} per own row: (n_own, C, C), or its diagonal (n_own, C) for diagonal-Hessian losses
        (the same shape rule as :meth:`local_loss_sqrt_hessian`)."""
    def sampled_targets(self) -> Any:
        """ỹ ~ p(y | z) of the whole batch, drawn once per point."""
    def per_example_grads(self, targets: Any = "empirical") -> Any:
        """(N, n) rows gᵢ = ∇_θ ℓ(zᵢ, tᵢ) (data term, no 1/N)."""
    def layer_stats(self, targets: Any = "empirical", reduce: TapReducer | None = None) -> dict:
        """Per Kronecker layer {"a": āₗ₋₁, "g": gₗ = ∂ℓᵢ/∂hₗ, "kind": …} (KFAC §3). ``reduce``: each
        layer's value is ``reduce(name, tap)`` instead (:func:`reduce_taps`); the engine applies it as
        soon as the layer's tap is recorded, so that the tap's arrays are freed layer by layer."""
    def reduce_sum(self, x: Any) -> Any: ...
    def gather_rows(self, x: Any) -> Any: ...
    def local_rows(self, u: Any) -> Any: ...
    def check_independent(self, what: str) -> None:
        """Raise when per-example quantities are meaningless (examples coupled by BatchNorm)."""


@runtime_checkable
class PointProtocol(PointPrimitives, Protocol):
    """Everything an optimizer may ask of a point: the primitives plus the derived products."""

    @property
    def l2(self) -> float: ...
    @property
    def counter(self) -> Any: ...
    @property
    def dz(self) -> Any:
        """∂ℓᵢ/∂zᵢ at the true targets, (N, *output_shape)."""

    def check_direction(self, v: Any, what: str = "v") -> None: ...
    def jvp(self, v: Any) -> Any:
        """J v, (N, *output_shape)."""
    def vjp(self, u: Any) -> Any:
        """Jᵀ u = Σᵢ Jᵢᵀ uᵢ for u of the outputs' shape (no 1/N, no λ)."""
    def ggn_vp(self, v: Any) -> Any:
        """G v = (1/N) Jᵀ H_L J v + λ v."""
    def fisher_vp(self, v: Any, kind: str = "empirical", *, targets: Any = None) -> Any:
        """F v, kind in :data:`FISHER_KINDS` (no λ)."""
    def output_grads(self, targets: Any = "empirical") -> Any:
        """eᵢ = ∂ℓ(zᵢ, tᵢ)/∂zᵢ of the whole batch."""
    def loss_sqrt_hessian(self) -> Any:
        """:meth:`~PointPrimitives.local_loss_sqrt_hessian` of the whole batch (rows gathered)."""
    def loss_hessian(self) -> Any:
        """:meth:`~PointPrimitives.local_loss_hessian` of the whole batch (rows gathered)."""
    def gram(self, kind: str = "grad") -> Any:
        """N × N [gᵢᵀgⱼ] (``"grad"``) or NC × NC [Jᵢ Jⱼᵀ] (``"jacobian"``, row i·C + c)."""


@runtime_checkable
class ObjectiveProtocol(Protocol):
    """f on one fixed batch: ``at(θ)`` runs the forward pass once and returns a point."""

    l2: float
    counter: Any

    @property
    def n_samples(self) -> int: ...
    @property
    def xp(self) -> Any: ...
    @property
    def layout(self) -> Any: ...
    @property
    def model(self) -> Any:
        """The :class:`ModelStructure`."""

    def at(self, theta: Any) -> PointProtocol: ...
    def subset(self, idx: Any) -> "ObjectiveProtocol":
        """The same objective on positions ``idx`` of this batch (shares counter and RNG)."""


@runtime_checkable
class ProblemProtocol(Protocol):
    """Training data + model + loss; hands out objectives (see :class:`qnref.optim.base.Problem`).

    ``batch(size)`` advances the epoch stream (sampling without replacement within an epoch);
    ``sample(size)`` draws an independent sample (does not advance it); ``full()`` is the whole
    set and counts one data pass, ``full_objective`` does not; ``subset(idx)`` given indices.
    ``rng``: host NumPy generator of the index stream; ``device_rng``: generator of sampled
    targets; ``counter``: the shared pass counter; ``state()``/``load_state()`` resume bit-identically.
    """

    rng: Any
    device_rng: Any
    counter: Any
    l2: float

    @property
    def n_samples(self) -> int: ...
    @property
    def epochs(self) -> float: ...
    @property
    def xp(self) -> Any: ...
    @property
    def model(self) -> Any:
        """The :class:`ModelStructure`."""
    @property
    def layout(self) -> Any: ...
    @property
    def full_objective(self) -> ObjectiveProtocol: ...

    def batch(self, size: int) -> ObjectiveProtocol: ...
    def sample(self, size: int) -> ObjectiveProtocol: ...
    def full(self) -> ObjectiveProtocol: ...
    def subset(self, idx: Any) -> ObjectiveProtocol: ...
    def state(self) -> dict: ...
    def load_state(self, st: dict) -> None: ...
