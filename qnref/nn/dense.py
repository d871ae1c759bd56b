"""Fully connected layer y = x Wᵀ + b with parameters stored as W̄ = [W b] (out × in+1)."""
from __future__ import annotations

from typing import Any, Sequence

from .. import backend
from .base import Ctx, Layer, ParamSpec, Shape


class Dense(Layer):
    """Affine layer hₗ = Wₗ aₗ₋₁ + bₗ (the papers' notation, batch as rows: H = A Wᵀ + 1 bᵀ).

    The parameter block is W̄ₗ = [Wₗ bₗ] of shape (units, in+1); its homogeneous input is
    āₗ₋₁ = [aₗ₋₁; 1], so ∂ℓ/∂W̄ₗ = gₗ āₗ₋₁ᵀ with gₗ = ∂ℓ/∂hₗ (Ren's thesis eq. 2.2; Martens &
    Grosse 2015 §3).
    """

    kron_dense = True
    has_kron = True

    def __init__(self, units: int):
        if int(units) != units or units < 1:
            raise ValueError(f"Dense units must be a positive integer, got {units!r}")
        self.units = int(units)

    def build(self, in_shape: Shape) -> Shape:
        if len(in_shape) != 1:
            raise ValueError(
                f"Dense({self.units}) needs flat per-example inputs, got shape {tuple(in_shape)}; "
                "insert a Flatten() before it"
            )
        self.in_shape = tuple(in_shape)
        self.out_shape = (self.units,)
        return self.out_shape

    def param_specs(self) -> list[ParamSpec]:
        d_in = self.in_shape[0]
        return [ParamSpec("W", (self.units, d_in + 1), "weight", (d_in, self.units))]

    def describe(self) -> str:
        return f"Dense({self.in_shape[0] if self.in_shape else '?'}→{self.units})"

    def forward(self, p: Sequence[Any], x: Any, ctx: Ctx) -> tuple[Any, Any]:
        wb = p[0]
        y = x @ wb[:, :-1].T
        y += wb[:, -1]
        return y, x

    def backward(self, p, cache, gy, gp, need_gx: bool = True):
        x, wb = cache, p[0]
        if gp is not None:
            # the GEMM writes the W part of the gradient block in place (a strided view: ldc = in + 1),
            # the bits of ``gp[0][:, :-1] = gy.T @ x`` without its temporary and copy (0.4-0.7 ms a
            # 1000 x 784 layer at batch 250; issue 21)
            backend.namespace(x).matmul(gy.T, x, out=gp[0][:, :-1])
            gp[0][:, -1] = gy.sum(axis=0)
        return gy @ wb[:, :-1] if need_gx else None

    def jvp(self, p, cache, dx, dp):
        x, wb = cache, p[0]
        dy = None
        if dp is not None:
            dwb = dp[0]
            dy = x @ dwb[:, :-1].T
            dy += dwb[:, -1]
        if dx is not None:
            t = dx @ wb[:, :-1].T
            dy = t if dy is None else dy + t
        if dy is None:  # neither input nor parameters move
            dy = backend.namespace(x).zeros((x.shape[0], self.units), dtype=x.dtype)
        return dy, dx

    def backward_rop(self, p, cache, rcache, gy, rgy, dp, rgp, need_gx: bool = True):
        # gx = gy W; R{gx} = R{gy} W + gy R{W};  R{gW̄} = R{gy}ᵀ x̄ + gyᵀ R{x̄}
        x, dx, w = cache, rcache, p[0][:, :-1]
        if rgp is not None:
            rgw = rgp[0][:, :-1]  # written in place, as in backward
            backend.namespace(x).matmul(rgy.T, x, out=rgw)
            if dx is not None:
                rgw += gy.T @ dx
            rgp[0][:, -1] = rgy.sum(axis=0)
        if not need_gx:
            return None, None
        gx = gy @ w
        rgx = rgy @ w
        if dp is not None:
            rgx += gy @ dp[0][:, :-1]
        return gx, rgx

    def per_example_grads(self, p, cache, gy, out):
        xp_out = out[0]
        x = cache
        xp_out[:, :, :-1] = gy[:, :, None] * x[:, None, :]
        xp_out[:, :, -1] = gy
        return gy @ p[0][:, :-1]

    def kron_taps(self, cache, gy):
        x = cache
        xp = backend.namespace(x)
        ones = xp.ones((x.shape[0], 1), dtype=x.dtype)
        return {"kind": "dense", "a": xp.concatenate([x, ones], axis=1), "g": gy}
