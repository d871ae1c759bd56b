"""Flatten: (N, C, H, W) → (N, C·H·W), a pure reshape in every pass."""
from __future__ import annotations

from .base import Ctx, Layer, Shape


class Flatten(Layer):
    def build(self, in_shape: Shape) -> Shape:
        self.in_shape = tuple(in_shape)
        size = 1
        for d in in_shape:
            size *= d
        self.out_shape = (size,)
        return self.out_shape

    def _flat(self, x):
        return None if x is None else x.reshape(x.shape[0], -1)

    def _unflat(self, g):
        return None if g is None else g.reshape((g.shape[0],) + self.in_shape)

    def forward(self, p, x, ctx: Ctx):
        return self._flat(x), None

    def backward(self, p, cache, gy, gp, need_gx: bool = True):
        return self._unflat(gy)

    def jvp(self, p, cache, dx, dp):
        return self._flat(dx), None

    def backward_rop(self, p, cache, rcache, gy, rgy, dp, rgp, need_gx: bool = True):
        return self._unflat(gy), self._unflat(rgy)

    def per_example_grads(self, p, cache, gy, out):
        return self._unflat(gy)
