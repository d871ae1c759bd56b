"""Elementwise activations σ with their first and second derivatives.

For y = σ(x): the VJP is gx = σ'(x) gy, the R-op forward R{y} = σ'(x) R{x}, and the R-op of
the backward pass R{gx} = σ'(x) R{gy} + σ''(x) R{x} gy (Pearlmutter 1994, eq. for a
pointwise nonlinearity). ReLU has σ'' = 0 almost everywhere.

ReLU: σ'(x)·u = [x > 0]·u (backward, jvp, backward_rop) is one ``multiply(u, x > 0)`` — the
boolean mask enters the ufunc loop as the exact 1 or 0 of u's dtype, so the result is bit for bit
``(x > 0).astype(dtype) * u`` without the float temporary and its pass (tests/nn/test_conv_fast_paths.py).
On the activations of conv nets (4-D host arrays) the forward max(x, 0) and that product run as
numba passes split over the layer threads, bit for bit the same (NumPy's ``maximum`` and
``multiply`` are single-threaded, and ``maximum``'s NaN handling made it compute-bound: 0.77 ms
for 8 MB against 0.17 ms; docs/cnn.md, "Fifth round").
"""
from __future__ import annotations

from typing import Any

import numpy

from .. import backend
from ..host_kernels import MIN_SIZE, plain_host, split_ranges
from .base import Ctx, Layer
from .chunks import map_chunks, rowwise
from .pool import fast_kernels, use_fast


#: fewest entries of a 4-D (image) array for the numba ReLU kernels: below it NumPy's loop takes
#: microseconds (:data:`qnref.host_kernels.MIN_SIZE`, which also keeps small models from loading numba)
FAST_MIN = MIN_SIZE


def _fast_relu(*arrays: Any) -> Any:
    """The kernel module (:mod:`qnref.nn._numba_fast`) when the ReLU kernels run on these arrays:
    C-contiguous 4-D host float arrays of one dtype and shape with at least :data:`FAST_MIN` entries
    — the activations of conv nets, whose layers load numba anyway; None otherwise (MLP activations
    keep NumPy's loop, so an MLP never loads numba for its ReLUs)."""
    first = arrays[0]
    if getattr(first, "ndim", 0) != 4 or first.size < FAST_MIN or not plain_host(*arrays) \
            or any(a.shape != first.shape for a in arrays) or not use_fast(first):
        return None
    return fast_kernels()


def _run_flat(kernel: Any, *arrays: Any) -> Any:
    """``kernel(*flat arrays, lo, hi)`` over :func:`qnref.host_kernels.split_ranges` of the entries
    (one range on the calling thread below ``SPLIT_SIZE`` entries, where a pool round trip would
    cost more than the pass; else a few on the pool); the last array is the output, returned with
    the first one's shape."""
    flat = [a.reshape(-1) for a in arrays]
    map_chunks(lambda lo, hi: kernel(*flat, lo, hi), split_ranges(flat[0].size))
    return arrays[-1]


def relu(x: Any) -> Any:
    """max(x, 0), bit for bit ``maximum(x, 0)`` (NaN stays NaN, −0 becomes +0); on conv activations
    one numba pass split over the layer threads (:func:`_fast_relu`)."""
    k = _fast_relu(x)
    if k is None:
        return relu_xp(x)
    return _run_flat(k.relu_forward, x, numpy.empty_like(x))


def relu_xp(x: Any) -> Any:
    """The array-API twin of the kernel ``relu_forward`` (NumPy and CuPy)."""
    return backend.namespace(x).maximum(x, 0)


def relu_mask_mul(x: Any, g: Any) -> Any:
    """``(x > 0).astype(x.dtype) * g``, bit for bit: on conv activations one numba pass split over
    the layer threads (:func:`_fast_relu`), else :func:`relu_mask_mul_xp`."""
    k = _fast_relu(x, g)
    if k is None:
        return relu_mask_mul_xp(x, g)
    return _run_flat(k.relu_mask_mul, x, g, numpy.empty_like(g))


def relu_mask_mul_xp(x: Any, g: Any) -> Any:
    """``(x > 0).astype(x.dtype) * g`` as ``multiply(g, x > 0)`` when x and g share a dtype (one
    temporary of booleans instead of a float mask); the twin of the kernel ``relu_mask_mul``."""
    xp = backend.namespace(x, g)
    if x.dtype == g.dtype:
        return xp.multiply(g, x > 0)
    return (x > 0).astype(x.dtype) * g


class Activation(Layer):
    """Base class: subclasses give ``f``, ``d1`` and ``d2`` (in terms of x and y = f(x))."""

    def f(self, xp, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def d1(self, xp, x, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def d2(self, xp, x, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, p, x: Any, ctx: Ctx):
        xp = backend.namespace(x)
        y = self.f(xp, x)
        return y, (x, y)

    def backward(self, p, cache, gy, gp, need_gx: bool = True):
        x, y = cache
        return self.d1(backend.namespace(x), x, y) * gy

    def jvp(self, p, cache, dx, dp):
        if dx is None:
            return None, None
        x, y = cache
        return self.d1(backend.namespace(x), x, y) * dx, dx

    def backward_rop(self, p, cache, rcache, gy, rgy, dp, rgp, need_gx: bool = True):
        x, y = cache
        xp = backend.namespace(x)
        d1 = self.d1(xp, x, y)
        gx = d1 * gy
        rgx = d1 * rgy
        if rcache is not None:
            rgx += self.d2(xp, x, y) * rcache * gy
        return gx, rgx

    def per_example_grads(self, p, cache, gy, out):
        return self.backward(p, cache, gy, None)


class ReLU(Activation):
    def backward(self, p, cache, gy, gp, need_gx: bool = True):
        return relu_mask_mul(cache[0], gy)

    def jvp(self, p, cache, dx, dp):
        if dx is None:
            return None, None
        return relu_mask_mul(cache[0], dx), dx

    def backward_rop(self, p, cache, rcache, gy, rgy, dp, rgp, need_gx: bool = True):
        x = cache[0]
        gx, rgx = relu_mask_mul(x, gy), relu_mask_mul(x, rgy)
        if rcache is not None:  # σ'' = 0: the term adds zeros, kept for NumPy's NaN/inf propagation
            rgx += self.d2(backend.namespace(x), x, None) * rcache * gy
        return gx, rgx

    def f(self, xp, x):
        return relu(x)

    def d1(self, xp, x, y):
        return (x > 0).astype(x.dtype)

    def d2(self, xp, x, y):
        return xp.zeros_like(x)


class Tanh(Activation):
    def f(self, xp, x):
        return xp.tanh(x)

    def d1(self, xp, x, y):
        return 1 - y * y

    def d2(self, xp, x, y):
        return -2 * y * (1 - y * y)


def sigmoid_expr(xp: Any, x: Any) -> Any:
    """The logistic function 1/(1 + e⁻ˣ), numerically stable: with e = e^{−|x|} (exp of a
    non-positive argument only, never overflows) it is 1/(1 + e) for x ≥ 0 and e/(1 + e) for x < 0,
    formed as one division of the selected numerator (the same bits as dividing twice and
    selecting; NaN stays NaN). The one formula for the activation and the sigmoid cross-entropy
    loss, on one thread (:func:`sigmoid` splits it over rows)."""
    e = xp.exp(-xp.abs(x))
    d = e + 1
    return xp.divide(xp.where(x >= 0, e.dtype.type(1), e), d, out=d)


def softplus_expr(xp: Any, x: Any) -> Any:
    """log(1 + eˣ) = max(x, 0) + log1p(e^{−|x|}) (no overflow for large x, no cancellation for
    small): the one formula for the activation and the sigmoid cross-entropy loss, on one thread."""
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


def sigmoid(xp: Any, x: Any) -> Any:
    """:func:`sigmoid_expr` over ranges of rows on the layer threads (:func:`~qnref.nn.chunks.rowwise`,
    the same bits)."""
    return rowwise(lambda v: sigmoid_expr(xp, v), x)


def softplus(xp: Any, x: Any) -> Any:
    """:func:`softplus_expr` over ranges of rows on the layer threads (the same bits)."""
    return rowwise(lambda v: softplus_expr(xp, v), x)


class Sigmoid(Activation):
    def f(self, xp, x):
        return sigmoid(xp, x)

    def d1(self, xp, x, y):
        return y * (1 - y)

    def d2(self, xp, x, y):
        return y * (1 - y) * (1 - 2 * y)


class Softplus(Activation):
    """softplus(x) = log(1 + eˣ), computed as max(x, 0) + log1p(e^{−|x|})."""

    def f(self, xp, x):
        return softplus(xp, x)

    def d1(self, xp, x, y):
        return sigmoid(xp, x)

    def d2(self, xp, x, y):
        s = sigmoid(xp, x)
        return s * (1 - s)


class Identity(Activation):
    def f(self, xp, x):
        return x

    def d1(self, xp, x, y):
        return xp.ones_like(x)

    def d2(self, xp, x, y):
        return xp.zeros_like(x)


ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid, "softplus": Softplus, "identity": Identity, "linear": Identity}


def activation(name: str) -> Activation:
    """An activation layer by name (relu, tanh, sigmoid, softplus, identity)."""
    try:
        return ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None
