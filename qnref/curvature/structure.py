"""The :class:`~qnref.curvature.protocol.ModelStructure` of a model qnref cannot look inside.

A torch ``nn.Module`` or a JAX ``apply_fn`` is opaque to qnref: θ's layout is known (the
framework's parameter order), but not which parameters form Kronecker layers. :class:`OpaqueModel`
offers the layout and raises :class:`~qnref.curvature.protocol.UnsupportedProductError` for the
layer structure, so Kronecker optimizers fail with one clear message instead of an
``AttributeError``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy

from .. import backend
from ..params import ParamLayout, ParamSpec
from .protocol import UnsupportedProductError


def layout_of(blocks: "Sequence[tuple[str, tuple[int, ...]]]") -> ParamLayout:
    """A :class:`ParamLayout` of named blocks (name, shape) stored one after another, row-major."""
    return ParamLayout([("", ParamSpec(name, tuple(int(d) for d in shape))) for name, shape in blocks])


def positions(idx: Any, n: int) -> numpy.ndarray:
    """Host int64 positions of ``subset(idx)`` among ``n`` examples: a slice, a boolean mask, or
    integer indices (NumPy, CuPy or a sequence), as NumPy indexing understands them."""
    if isinstance(idx, slice):
        return numpy.arange(n, dtype=numpy.int64)[idx]
    pos = numpy.asarray(backend.to_numpy(idx) if backend.is_cupy_array(idx) else idx)
    if pos.dtype == bool:
        if pos.shape != (n,):
            raise ValueError(f"a boolean subset mask must have shape ({n},), got {pos.shape}")
        return numpy.flatnonzero(pos)
    return pos.astype(numpy.int64, copy=False).reshape(-1)


def no_layer_structure(product: str, framework: str) -> UnsupportedProductError:
    """The error of a product that needs qnref's per-layer structure on an opaque model."""
    convert = {"torch": "convert the model to a qnref Sequential (qnref_torch.convert) and use qnref's Problem, or ",
               "jax": "convert the model to a qnref Sequential (qnref_jax.from_spec) and use qnref's Problem, or "}
    return UnsupportedProductError(
        f"{product} needs qnref's per-layer (Kronecker) structure, which an opaque {framework} model does not "
        f"expose; {convert.get(framework, '')}use an optimizer that needs only value, grad, hvp, ggn_vp, "
        "fisher_vp, per_example_grads or gram")


class NoKronLayers(Sequence):
    """``kron_layers`` of an opaque model: any use (iteration, length, indexing) raises the error
    naming the product; the attribute itself exists, so protocol checks (``isinstance``) hold."""

    def __init__(self, framework: str):
        self.framework = framework

    def _refuse(self) -> UnsupportedProductError:
        return no_layer_structure("the Kronecker layer list (model.kron_layers)", self.framework)

    def __getitem__(self, i: Any) -> Any:
        raise self._refuse()

    def __len__(self) -> int:
        raise self._refuse()

    def __iter__(self):
        raise self._refuse()

    def __repr__(self) -> str:
        return f"NoKronLayers({self.framework})"


class OpaqueModel:
    """Model structure of a framework model: ``layout`` and ``couples_examples``; no Kronecker layers.

    ``native`` is the framework object (the ``nn.Module`` or the JAX ``apply_fn``).
    """

    def __init__(self, native: Any, layout: ParamLayout, framework: str, couples_examples: bool = False):
        self.native = native
        self.layout = layout
        self.framework = framework
        self.couples_examples = bool(couples_examples)

    @property
    def kron_layers(self) -> NoKronLayers:
        return NoKronLayers(self.framework)

    def __repr__(self) -> str:
        return f"OpaqueModel({self.framework}, n={self.layout.size})"


class ConvertedModel:
    """Model structure of a framework model converted to a qnref :class:`~qnref.nn.model.Sequential`
    (``qnref_torch.convert``, ``qnref_jax.from_spec``): θ in the qnref model's layout (W̄ = [W b]),
    its Kronecker layers, and ``couples_examples`` asked of the framework model (``couples``, a
    zero-argument callable: torch BatchNorm modules switch between train and eval).

    The framework point computes every product itself; the Kronecker layer taps and the sampled
    targets come from the *engine twin* (:meth:`twin`): qnref's own objective on the converted
    model and the same batch, drawing from the problem's generator, so a run matches qnref's
    engine on the converted model draw for draw.
    """

    def __init__(self, qmodel: Any, couples: Any, native: Any = None):
        self.qmodel = qmodel
        self.layout = qmodel.layout
        self._couples = couples
        self.native = native

    @property
    def kron_layers(self) -> Any:
        return self.qmodel.kron_layers

    @property
    def couples_examples(self) -> bool:
        return bool(self._couples())

    def twin(self, loss: str, X: Any, y: Any, l2: float, rng: Any) -> Any:
        """qnref's :class:`~qnref.curvature.objective.Objective` on the converted model and this batch
        (host or CuPy arrays ``X``, ``y``); its passes go to a private counter (the framework point
        already counts the forward pass; the taps' backward is not added)."""
        from .objective import Objective, PassCounter  # noqa: PLC0415  (objective imports this module's users)

        return Objective(self.qmodel, loss, X, y, l2, train=self.couples_examples, counter=PassCounter(), rng=rng,
                         validate=False)

    def __repr__(self) -> str:
        return f"ConvertedModel(n={self.layout.size}, kron_layers={len(self.qmodel.kron_layers)})"
