"""Finite-difference oracles shared by the layer and product tests (float64, central differences)."""
from __future__ import annotations

import numpy as np

from qnref.nn.base import Ctx
from qnref.params import ParamLayout

EPS = 1e-6


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.abs(b).max(), 1e-12)
    return float(np.abs(a - b).max() / scale)


def fd_directional(fun, x, dx, eps=EPS):
    """(fun(x + eps dx) − fun(x − eps dx)) / (2 eps) for array-valued fun."""
    return (fun(x + eps * dx) - fun(x - eps * dx)) / (2 * eps)


def layer_setup(layer, in_shape, n, seed=0, scale=1.0):
    """Build ``layer`` and draw random params (as a flat vector), input and directions."""
    r = np.random.default_rng(seed)
    out_shape = layer.build(tuple(in_shape))
    layout = ParamLayout([("", s) for s in layer.param_specs()])
    theta = r.standard_normal(layout.size) * 0.5
    x = r.standard_normal((n,) + tuple(in_shape)) * scale
    return layout, theta, x, out_shape, r


def conv_pass(layer, in_shape, n, seed=0):
    """Build a Conv2d ``layer``, draw W̄ (C_out, K+1), x (n, *in_shape) and an output gradient gy, and
    run the forward pass: (W̄, x, y, cache, gy)."""
    layer.build(tuple(in_shape))
    r = np.random.default_rng(seed)
    wb = r.standard_normal((layer.out_channels, layer.patch_size + 1))
    x = r.standard_normal((n,) + tuple(in_shape))
    y, cache = layer.forward([wb], x, Ctx())
    return wb, x, y, cache, r.standard_normal(y.shape)


def check_layer_passes(layer, in_shape, n=3, seed=0, train=True, tol=1e-7, scale=1.0, first_layer=False):
    """Check backward, jvp and backward_rop of ``layer`` against central finite differences.

    The joint map (x, θ) ↦ y is differentiated along a random direction (dx, dθ):
    - jvp      == d/dt y(x + t dx, θ + t dθ)
    - backward == gradient of ⟨gy, y⟩ in x and θ (checked along the same direction)
    - backward_rop == d/dt backward(x + t dx, θ + t dθ; gy + t rgy)
    """
    layout, theta, x, out_shape, r = layer_setup(layer, in_shape, n, seed, scale)
    ctx = Ctx(train=train)
    dth = r.standard_normal(theta.shape)
    dx = None if first_layer else r.standard_normal(x.shape)
    gy = r.standard_normal((n,) + tuple(out_shape))
    rgy = r.standard_normal(gy.shape)

    def fwd(th, xx):
        return layer.forward(layout.views(th), xx, ctx)

    def bwd(th, xx, g):
        y, cache = fwd(th, xx)
        gp = np.zeros_like(th)
        gx = layer.backward(layout.views(th), cache, g, layout.views(gp))
        return gx, gp

    dxx = np.zeros_like(x) if dx is None else dx
    # jvp
    y, cache = fwd(theta, x)
    jy, rcache = layer.jvp(layout.views(theta), cache, dx, layout.views(dth))
    fd_y = (fwd(theta + EPS * dth, x + EPS * dxx)[0] - fwd(theta - EPS * dth, x - EPS * dxx)[0]) / (2 * EPS)
    assert rel_err(jy, fd_y) < tol, f"jvp: {rel_err(jy, fd_y)}"
    # backward: ⟨gx, dx⟩ + ⟨gθ, dθ⟩ = d/dt ⟨gy, y⟩
    gx, gp = bwd(theta, x, gy)
    lhs = float((gx * dxx).sum() + gp @ dth)
    rhs = float((gy * fd_y).sum())
    assert abs(lhs - rhs) <= tol * max(1.0, abs(rhs)), f"backward: {lhs} vs {rhs}"
    # elementwise parameter gradient
    for i in range(min(theta.size, 40)):
        e = np.zeros_like(theta)
        e[i] = EPS
        fd = float((gy * (fwd(theta + e, x)[0] - fwd(theta - e, x)[0])).sum() / (2 * EPS))
        assert abs(gp[i] - fd) <= tol * max(1.0, abs(fd)), f"param grad {i}: {gp[i]} vs {fd}"
    # backward_rop
    rgp = np.zeros_like(theta)
    gx2, rgx = layer.backward_rop(layout.views(theta), cache, rcache, gy, rgy, layout.views(dth), layout.views(rgp))
    gxp, gpp = bwd(theta + EPS * dth, x + EPS * dxx, gy + EPS * rgy)
    gxm, gpm = bwd(theta - EPS * dth, x - EPS * dxx, gy - EPS * rgy)
    assert rel_err(gx2, gx) < 1e-12
    if theta.size:
        assert rel_err(rgp, (gpp - gpm) / (2 * EPS)) < tol, f"R-op params: {rel_err(rgp, (gpp - gpm) / (2 * EPS))}"
    assert rel_err(rgx, (gxp - gxm) / (2 * EPS)) < tol, f"R-op input: {rel_err(rgx, (gxp - gxm) / (2 * EPS))}"
    return layout, theta, x
