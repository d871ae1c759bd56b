"""Elementwise activations σ with their first and second derivatives.

For y = σ(x): the VJP is gx = σ'(x) gy, the R-op forward R{y} = σ'(x) R{x}, and the R-op of
the backward pass R{gx} = σ'(x) R{gy} + σ''(x) R{x} gy (Pearlmutter 1994, eq. for a
pointwise nonlinearity). ReLU has σ'' = 0 almost everywhere.

ReLU: σ'(x)·u = [x > 0]·u (backward, jvp, backward_rop) is one ``multiply(u, x > 0)`` — the
boolean mask enters the ufunc loop as the exact 1 or 0 of u's dtype, so the result is bit for bit
``(x > 0).astype(dtype) * u`` without the float temporary and its pass (tests/nn/test_conv_fast_paths.py).
"""
from __future__ import annotations

from typing import Any

from .. import backend
from .base import Ctx, Layer


def relu_mask_mul(x: Any, g: Any) -> Any:
    """``(x > 0).astype(x.dtype) * g``, bit for bit, as ``multiply(g, x > 0)`` when x and g share a
    dtype (one temporary of booleans instead of a float mask)."""
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
        return xp.maximum(x, 0)

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


def sigmoid(xp: Any, x: Any) -> Any:
    """The logistic function 1/(1 + e⁻ˣ), numerically stable: with e = e^{−|x|} (exp of a
    non-positive argument only, never overflows) it is 1/(1 + e) for x ≥ 0 and e/(1 + e) for x < 0,
    formed as one division of the selected numerator (the same bits as dividing twice and
    selecting; NaN stays NaN). The one implementation for the activation and the sigmoid
    cross-entropy loss."""
    e = xp.exp(-xp.abs(x))
    d = e + 1
    return xp.divide(xp.where(x >= 0, e.dtype.type(1), e), d, out=d)


def softplus(xp: Any, x: Any) -> Any:
    """log(1 + eˣ) = max(x, 0) + log1p(e^{−|x|}) (no overflow for large x, no cancellation for
    small): the one implementation for the activation and the sigmoid cross-entropy loss."""
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


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
