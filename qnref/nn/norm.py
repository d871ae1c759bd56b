"""Batch normalization (Ioffe & Szegedy 2015) with exact first- and second-order passes.

``BatchNorm()`` normalises each channel c of a dense (N, C) or convolutional (N, C, H, W) input
over the m = N (dense) or m = N·H·W (conv) values of that channel in the batch:

    μ = mean(x),  σ² = mean((x − μ)²)  (biased),  σ = √(σ² + ε),  x̂ = (x − μ)/σ,  y = γ x̂ + β.

Parameters: two blocks ``gamma`` (kind "scale", initialised to 1) and ``beta`` (kind "shift",
initialised to 0), each of shape (C,).

Modes
-----
*Training* (``ctx.train`` True): batch statistics, so the examples of a batch interact
(``couples_examples = True``). Every pass differentiates through μ and σ. With
P(u) = u − mean(u) − x̂ mean(x̂ u) (per channel, a symmetric projection):

- backward:     gx = P(γ gy)/σ,  gγ = Σ gy x̂,  gβ = Σ gy;
- jvp:          dσ = mean(x̂ dx),  dx̂ = P(dx)/σ,  R{y} = γ dx̂ + dγ x̂ + dβ;
- backward_rop: R{gx} = P(R{γ gy})/σ − (dσ/σ) gx − [dx̂ mean(x̂ γgy) + x̂ mean(dx̂ γgy)]/σ,
                R{gγ} = Σ (R{gy} x̂ + gy dx̂), R{gβ} = Σ R{gy}
  — the exact R-op of the backward pass, so ``Objective.hvp`` is the Hessian of the training-mode
  objective (the function of θ that the batch statistics define). Per-example gradients do not
  exist in this mode and raise.

*Evaluation* (``ctx.train`` False): running statistics μ_r, σ_r² replace the batch ones, the layer
is affine per channel, examples are independent (per-example gradients, Fisher products, Gram
matrices all work).

Running statistics are *buffers*, not parameters: ``running_mean``, ``running_var`` (float64,
on the device of the last update) live on the layer object and change **only** through
:meth:`BatchNorm.update_running_stats` (or the model-level :func:`update_batchnorm_stats`,
:func:`estimate_batchnorm_stats`, :func:`reset_batchnorm_stats`). No forward, gradient, hvp or
GGN product touches them. The update follows PyTorch: r ← (1 − momentum) r + momentum · batch, with
the unbiased batch variance σ² m/(m − 1); ``momentum=None`` gives the cumulative average over all
updates since the last reset.

CPU kernels: in training mode, (N, C, H, W) NumPy inputs of float32/float64 run the forward pass
and the backward pass (gx, gγ, gβ) through GIL-free numba kernels (:mod:`qnref.nn._numba_fast`,
channel ranges on the chunk thread pool, per-channel sums in float64 — at least as accurate as NumPy's, which
accumulates float32 inputs in float32). They fill the same cache (x̂, 1/σ, μ, σ² in the input
dtype), so jvp and backward_rop, eval mode, dense inputs and CuPy keep the ``xp`` code below;
``qnref.nn.conv.KERNELS = "xp"`` switches the kernels off (tests compare the two paths).
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy

from .. import backend
from .base import Ctx, Layer, ParamSpec, Shape
from .conv import check_batch
from .pool import fast_kernels, use_fast


class BatchNorm(Layer):
    """Batch normalization over the channel axis 1 of (N, C) or (N, C, H, W) inputs."""

    couples_examples = True

    def __init__(self, eps: float = 1e-5, momentum: float | None = 0.1):
        if not eps > 0:
            raise ValueError(f"BatchNorm eps must be positive, got {eps}")
        if momentum is not None and not 0 < momentum <= 1:
            raise ValueError(f"BatchNorm momentum must lie in (0, 1] or be None (cumulative), got {momentum}")
        self.eps = float(eps)
        self.momentum = momentum
        self.running_mean: Any = None
        self.running_var: Any = None
        self.num_batches_tracked = 0

    # -- set-up -----------------------------------------------------------------------------------
    def build(self, in_shape: Shape) -> Shape:
        in_shape = tuple(int(d) for d in in_shape)
        if len(in_shape) not in (1, 3):
            raise ValueError(f"BatchNorm needs per-example inputs (C,) or (C, H, W), got {in_shape}")
        if self.in_shape != in_shape or self.running_mean is None:
            self.in_shape = in_shape
            self.reset_running_stats()
        self.out_shape = in_shape
        return in_shape

    @property
    def channels(self) -> int:
        return self.in_shape[0]

    @property
    def conv(self) -> bool:
        return len(self.in_shape) == 3

    def param_specs(self) -> list[ParamSpec]:
        c = self.channels
        return [ParamSpec("gamma", (c,), "scale", (c, c)), ParamSpec("beta", (c,), "shift", (c, c))]

    def describe(self) -> str:
        return f"BatchNorm({self.channels if self.in_shape else '?'}{', spatial' if self.in_shape and self.conv else ''})"

    def reset_running_stats(self) -> None:
        c = self.in_shape[0]
        self.running_mean = numpy.zeros(c)
        self.running_var = numpy.ones(c)
        self.num_batches_tracked = 0

    # -- helpers ------------------------------------------------------------------------------------
    def _axes(self) -> tuple[int, ...]:
        return (0, 2, 3) if self.conv else (0,)

    def _b(self, v: Any) -> Any:
        """(C,) → broadcastable (1, C) or (1, C, 1, 1)."""
        return v.reshape((1, -1, 1, 1) if self.conv else (1, -1))

    def _mean(self, a: Any) -> Any:
        return a.mean(axis=self._axes(), keepdims=True)

    def _sum(self, a: Any) -> Any:
        return a.sum(axis=self._axes())

    def _stats_on(self, xp: Any, dtype: Any) -> tuple[Any, Any]:
        """Running statistics as arrays of ``xp`` (moved there once, kept in float64)."""
        if (xp is numpy) == backend.is_cupy_array(self.running_mean):
            self.running_mean = backend.to_device(self.running_mean, "cpu" if xp is numpy else "gpu")
            self.running_var = backend.to_device(self.running_var, "cpu" if xp is numpy else "gpu")
        return self.running_mean.astype(dtype), self.running_var.astype(dtype)

    # -- passes ---------------------------------------------------------------------------------------
    def forward(self, p: Sequence[Any], x: Any, ctx: Ctx) -> tuple[Any, Any]:
        check_batch(x, self.in_shape, self.describe())
        xp = backend.namespace(x)
        gamma, beta = self._b(p[0]), self._b(p[1])
        if ctx.train:
            m = x.size // self.channels
            if m < 2:
                raise ValueError(
                    f"{self.describe()} in training mode needs more than one value per channel "
                    f"(got input shape {tuple(x.shape)}); use a larger batch or train=False"
                )
            if self._fast(x, p):
                return self._forward_fast(p, x, m)
            y, xhat, mu, var, inv = bn_forward_xp(x, gamma, beta, self.eps, self._axes())
            return y, {"train": True, "xhat": xhat, "inv": inv, "mean": mu, "var": var, "m": m}
        rm, rv = self._stats_on(xp, x.dtype)
        inv = self._b(1.0 / xp.sqrt(rv + self.eps))
        xhat = (x - self._b(rm)) * inv
        y = gamma * xhat
        y += beta
        return y, {"train": False, "xhat": xhat, "inv": inv}

    def _fast(self, a: Any, p: Sequence[Any]) -> bool:
        """Use the numba kernels: 4-D NumPy float32/float64 input, parameters of the same dtype."""
        return (
            self.conv
            and use_fast(a)
            and a.size > 0
            and all(isinstance(v, numpy.ndarray) and v.dtype == a.dtype for v in p)
        )

    def _forward_fast(self, p: Sequence[Any], x: Any, m: int) -> tuple[Any, Any]:
        """Training-mode forward on the CPU: one kernel per channel range, in parallel (two-pass float64 statistics)."""
        n, c = x.shape[:2]
        xhat = numpy.empty(x.shape, dtype=x.dtype)
        y = numpy.empty(x.shape, dtype=x.dtype)
        mu, var, inv = (numpy.empty(c, dtype=x.dtype) for _ in range(3))
        k = fast_kernels()
        x3, h3, y3 = numpy.ascontiguousarray(x).reshape(n, c, -1), xhat.reshape(n, c, -1), y.reshape(n, c, -1)
        k.run_split(c, lambda lo, hi: k.bn_forward(x3, p[0], p[1], self.eps, h3, y3, mu, var, inv, lo, hi))
        b = self._b
        return y, {"train": True, "xhat": xhat, "inv": b(inv), "mean": b(mu), "var": b(var), "m": m}

    def _backward_fast(self, p, xhat, inv, gy, gp, need_gx: bool):
        """Training-mode backward on the CPU: channel sums (float64) and gx in one pass per channel range."""
        n, c = gy.shape[:2]
        k = fast_kernels()
        g3 = numpy.ascontiguousarray(gy).reshape(n, c, -1)
        h3 = numpy.ascontiguousarray(xhat).reshape(n, c, -1)
        s_g, s_gx = numpy.empty(c), numpy.empty(c)
        gx = None
        if need_gx:
            scale = p[0].astype(numpy.float64) * inv.reshape(-1).astype(numpy.float64)  # γ/σ
            gx = numpy.empty(gy.shape, dtype=gy.dtype)
            gx3 = gx.reshape(n, c, -1)
            k.run_split(c, lambda lo, hi: k.bn_backward(g3, h3, scale, gx3, s_g, s_gx, lo, hi))
        else:
            k.run_split(c, lambda lo, hi: k.bn_sums(g3, h3, s_g, s_gx, lo, hi))
        if gp is not None:
            gp[0][...] = s_gx
            gp[1][...] = s_g
        return gx

    def _project(self, u: Any, xhat: Any) -> Any:
        """P(u) = u − mean(u) − x̂ mean(x̂ u), per channel."""
        return u - self._mean(u) - xhat * self._mean(xhat * u)

    def backward(self, p, cache, gy, gp, need_gx: bool = True):
        xhat, inv = cache["xhat"], cache["inv"]
        if cache["train"] and self._fast(gy, p) and isinstance(xhat, numpy.ndarray) and xhat.dtype == gy.dtype:
            return self._backward_fast(p, xhat, inv, gy, gp, need_gx)
        if not cache["train"] or not need_gx:
            if gp is not None:
                gp[1][...], gp[0][...] = bn_sums_xp(gy, xhat, self._axes())
            return inv * (gy * self._b(p[0])) if need_gx else None
        # gx = γ/σ · P(gy) with the channel sums Σ gy x̂ and Σ gy shared with gγ, gβ
        gx, s_g, s_gx = bn_backward_xp(gy, xhat, self._b(p[0]) * inv, self._axes())
        if gp is not None:
            gp[0][...] = s_gx
            gp[1][...] = s_g
        return gx

    def jvp(self, p, cache, dx, dp):
        xhat, inv = cache["xhat"], cache["inv"]
        dy = None
        if dp:
            dy = self._b(dp[0]) * xhat + self._b(dp[1])
        if dx is None:
            if dy is None:
                dy = backend.namespace(xhat).zeros_like(xhat)
            return dy, None
        if cache["train"]:
            dsig = self._mean(xhat * dx)  # dσ
            dxh = inv * (dx - self._mean(dx) - xhat * dsig)
        else:
            dsig, dxh = None, inv * dx
        t = self._b(p[0]) * dxh
        return (t if dy is None else dy + t), (dxh, dsig)

    def backward_rop(self, p, cache, rcache, gy, rgy, dp, rgp, need_gx: bool = True):
        xhat, inv = cache["xhat"], cache["inv"]
        dxh, dsig = rcache if rcache is not None else (None, None)
        if rgp:
            rg = rgy * xhat
            if dxh is not None:
                rg = rg + gy * dxh
            rgp[0][...] = self._sum(rg)
            rgp[1][...] = self._sum(rgy)
        if not need_gx:
            return None, None
        gamma = self._b(p[0])
        gxh = gamma * gy
        rgxh = gamma * rgy
        if dp:
            rgxh = rgxh + self._b(dp[0]) * gy
        if not cache["train"]:
            return inv * gxh, inv * rgxh
        gx = inv * self._project(gxh, xhat)
        rgx = inv * self._project(rgxh, xhat)
        if dxh is not None:
            rgx -= dsig * inv * gx
            rgx -= inv * (dxh * self._mean(xhat * gxh) + xhat * self._mean(dxh * gxh))
        return gx, rgx

    def per_example_grads(self, p, cache, gy, out):
        if cache["train"]:
            raise ValueError(
                f"{self.describe()} in training mode couples the examples of a batch: per-example gradients "
                "are undefined; run the forward pass with train=False (running statistics)"
            )
        xhat, inv = cache["xhat"], cache["inv"]
        sp = (2, 3) if self.conv else ()
        gxh = gy * xhat
        out[0][...] = gxh.sum(axis=sp) if sp else gxh
        out[1][...] = gy.sum(axis=sp) if sp else gy
        return inv * gy * self._b(p[0])

    # -- running statistics (buffers) -------------------------------------------------------------------
    def update_running_stats(self, cache: dict) -> None:
        """Fold the batch statistics of a training-mode forward ``cache`` into the running ones."""
        if not isinstance(cache, dict) or not cache.get("train"):
            raise ValueError("update_running_stats needs the cache of a training-mode forward pass (train=True)")
        xp = backend.namespace(cache["mean"])
        self._stats_on(xp, "float64")
        m = cache["m"]
        mean = cache["mean"].reshape(-1).astype("float64")
        var = cache["var"].reshape(-1).astype("float64") * (m / (m - 1))
        self.num_batches_tracked += 1
        f = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
        self.running_mean = (1 - f) * self.running_mean + f * mean
        self.running_var = (1 - f) * self.running_var + f * var


# -- array-API twins of the numba kernels (NumPy and CuPy) ----------------------------------------
def bn_forward_xp(x: Any, gamma: Any, beta: Any, eps: float, axes: tuple[int, ...]) -> tuple[Any, Any, Any, Any, Any]:
    """Training-mode BatchNorm forward, the twin of the numba kernel ``bn_forward``: over ``axes``
    μ = mean(x), σ² = mean((x − μ)²) (two passes), inv = 1/√(σ² + ε), x̂ = (x − μ)·inv,
    y = γ x̂ + β (``gamma``/``beta`` broadcastable). Returns (y, x̂, μ, σ², inv), statistics with
    kept dimensions. [BN] Ioffe & Szegedy 2015, Algorithm 1."""
    xp = backend.namespace(x)
    mu = x.mean(axis=axes, keepdims=True)
    xhat = x - mu  # x − μ, normalised in place below
    var = xp.square(xhat).mean(axis=axes, keepdims=True)
    inv = 1.0 / xp.sqrt(var + eps)
    xhat *= inv
    y = gamma * xhat
    y += beta
    return y, xhat, mu, var, inv


def bn_sums_xp(gy: Any, xhat: Any, axes: tuple[int, ...]) -> tuple[Any, Any]:
    """The channel sums (Σ gy, Σ gy·x̂) over ``axes`` — gβ and gγ; the twin of ``bn_sums``."""
    return gy.sum(axis=axes), (gy * xhat).sum(axis=axes)


def bn_backward_xp(gy: Any, xhat: Any, scale: Any, axes: tuple[int, ...]) -> tuple[Any, Any, Any]:
    """Training-mode input gradient gx = scale·(gy − mean(gy) − x̂·mean(gy·x̂)) with ``scale`` = γ/σ
    (broadcastable), and the channel sums; the twin of ``bn_backward``. Returns (gx, Σ gy, Σ gy·x̂).
    [BN] Ioffe & Szegedy 2015, §3 (the backward pass of Algorithm 1)."""
    s_g, s_gx = bn_sums_xp(gy, xhat, axes)
    m = gy.size // s_g.size
    shape = tuple(-1 if a == 1 else 1 for a in range(gy.ndim))
    gx = gy - (s_g / m).reshape(shape)
    t = xhat * (s_gx / m).reshape(shape)
    gx -= t
    gx *= scale
    return gx, s_g, s_gx


# -- model-level helpers ----------------------------------------------------------------------------
def layers_with_caches(layers: Sequence[Layer], caches: Sequence[Any]) -> Iterator[tuple[Layer, Any]]:
    """(layer, cache) pairs in depth-first order, descending into composites via ``child_caches``."""
    if len(layers) != len(caches):
        raise ValueError(f"{len(caches)} caches for {len(layers)} layers; pass the caches of model.forward")
    for layer, cache in zip(layers, caches):
        yield layer, cache
        if layer.sublayers():
            kids = layer.child_caches(cache)  # type: ignore[attr-defined]
            yield from layers_with_caches([k for k, _ in kids], [c for _, c in kids])


def batchnorm_layers(model: Any) -> list[BatchNorm]:
    """Every BatchNorm of a model (composites included)."""
    from .base import walk  # noqa: PLC0415

    return [l for l in walk(model.layers) if isinstance(l, BatchNorm)]


def update_batchnorm_stats(model: Any, caches: Sequence[Any]) -> int:
    """Update the running statistics of every BatchNorm from a training-mode ``model.forward``.

    This is the only way running statistics change (besides :func:`estimate_batchnorm_stats` and
    :func:`reset_batchnorm_stats`); call it once per optimizer step with the caches of the step's
    forward pass. Returns the number of layers updated.
    """
    n = 0
    for layer, cache in layers_with_caches(model.layers, caches):
        if isinstance(layer, BatchNorm):
            layer.update_running_stats(cache)
            n += 1
    return n


def reset_batchnorm_stats(model: Any) -> None:
    """Running means to 0, variances to 1, counters to 0."""
    for layer in batchnorm_layers(model):
        layer.reset_running_stats()


def estimate_batchnorm_stats(model: Any, theta: Any, X: Any, batch_size: int | None = None) -> None:
    """Replace the running statistics by the cumulative average over the batches of ``X``.

    Each batch runs a training-mode forward pass (so deeper layers see batch-normalised inputs,
    as during training); the statistics are the equally weighted averages of the batch means and
    unbiased variances. Momenta are restored afterwards.
    """
    layers = batchnorm_layers(model)
    saved = [l.momentum for l in layers]
    try:
        for l in layers:
            l.reset_running_stats()
            l.momentum = None
        n = X.shape[0]
        bs = n if batch_size is None else int(batch_size)
        for start in range(0, n, bs):
            _, caches = model.forward(theta, X[start : start + bs], train=True)
            update_batchnorm_stats(model, caches)
    finally:
        for l, m in zip(layers, saved):
            l.momentum = m
