"""The layer protocol shared by every building block of a :class:`~qnref.nn.model.Sequential`.

A layer is a pure function y = φ(x; p) of its input x (batch first) and its parameter blocks p
(zero-copy views into the flat θ, see :mod:`qnref.params`). It supplies four passes:

``forward(p, x, ctx)``
    y and a cache of whatever the other passes need.
``backward(p, cache, gy, gp)``
    the VJP: returns gx = (∂φ/∂x)ᵀ gy and *writes* (∂φ/∂p)ᵀ gy into the views ``gp``
    (``gp`` is ``None`` when the parameter gradient is not wanted).
``jvp(p, cache, dx, dp)``
    the R-op of the forward pass (Pearlmutter 1994): R{y} = (∂φ/∂x) dx + (∂φ/∂p) dp.
    ``dx`` is ``None`` when the input does not depend on θ (the first layer).
``backward_rop(p, cache, rcache, gy, rgy, dp, rgp)``
    the R-op of the backward pass: returns (gx, R{gx}) and writes R{(∂φ/∂p)ᵀ gy} into ``rgp``.
    ``rcache`` is what :meth:`jvp` returned besides R{y} (for most layers the input
    direction dx). With ``gy`` = ∂f/∂y this gives exact Hessian-vector products.

Optional passes:

``per_example_grads(p, cache, gy, out)``
    writes ∂ℓᵢ/∂p for every example i into ``out`` (a list of (N, *shape) views).
``kron_taps(cache, gy)``
    for layers with Kronecker structure (dense, conv): the homogeneous inputs aₗ₋₁ and the
    pre-activation gradients gₗ that KFAC, K-BFGS, Shampoo/TNT statistics and the Gram
    trick need.

``ctx`` carries the mode (``train``) and, when asked for, a dict that collects taps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..params import ParamSpec  # noqa: F401 - re-exported: the layer modules import it from here

Shape = tuple[int, ...]


@dataclass
class Ctx:
    """Per-call context: the training mode and, when asked for, a dict that collects taps."""

    train: bool = True
    taps: dict | None = None


class Layer:
    """Base class; subclasses override what they support (see module docstring)."""

    #: True when the parameter gradient of one example is an outer product gₗ aₗ₋₁ᵀ (dense).
    kron_dense: bool = False
    #: True for layers that provide :meth:`kron_taps` (dense and conv).
    has_kron: bool = False
    #: True when examples in a batch interact in training mode (batch normalization).
    couples_examples: bool = False

    name: str = ""
    in_shape: Shape = ()
    out_shape: Shape = ()

    def build(self, in_shape: Shape) -> Shape:
        """Record the per-example input shape, return the per-example output shape."""
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(in_shape)
        return self.out_shape

    def param_specs(self) -> list[ParamSpec]:
        return []

    # -- passes -------------------------------------------------------------------------
    def forward(self, p: Sequence[Any], x: Any, ctx: Ctx) -> tuple[Any, Any]:
        raise NotImplementedError

    def backward(self, p: Sequence[Any], cache: Any, gy: Any, gp: Sequence[Any] | None) -> Any:
        raise NotImplementedError

    def jvp(self, p: Sequence[Any], cache: Any, dx: Any | None, dp: Sequence[Any] | None) -> tuple[Any, Any]:
        """Return (R{y}, rcache)."""
        raise NotImplementedError

    def backward_rop(
        self,
        p: Sequence[Any],
        cache: Any,
        rcache: Any,
        gy: Any,
        rgy: Any,
        dp: Sequence[Any] | None,
        rgp: Sequence[Any] | None,
    ) -> tuple[Any, Any]:
        raise NotImplementedError

    def per_example_grads(self, p: Sequence[Any], cache: Any, gy: Any, out: Sequence[Any]) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no per-example gradients")

    def kron_taps(self, cache: Any, gy: Any) -> dict:
        raise NotImplementedError(f"{type(self).__name__} has no Kronecker structure")

    # -- composite support ----------------------------------------------------------------
    def sublayers(self) -> list["Layer"]:
        """Children of a composite layer (residual block); empty for plain layers."""
        return []

    def describe(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.describe()}"


def walk(layers: Sequence[Layer]) -> list[Layer]:
    """All layers in depth-first order, composites followed by their children."""
    out: list[Layer] = []
    for layer in layers:
        out.append(layer)
        out.extend(walk(layer.sublayers()))
    return out

