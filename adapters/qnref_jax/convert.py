"""A small JAX model spec ⇄ qnref :class:`~qnref.nn.model.Sequential`, and its pure apply function.

A *spec* is a list of layer dicts (NCHW images, like qnref and PyTorch):

===============================================================  =================================
spec entry                                                       qnref layer
===============================================================  =================================
``{"type": "dense", "W": (out, in), "b": (out,)}``               ``Dense(out)``, W̄ = [W b]
``{"type": "conv2d", "W": (C_out, C_in, kh, kw), "b": (C_out,),   ``Conv2d``, W̄ = [W.reshape(C_out, -1) b]
"stride": 1, "padding": 0}``
``{"type": "relu" | "tanh" | "sigmoid" | "softplus" | "identity"}``  the activation
``{"type": "flatten"}``                                          ``Flatten``
``{"type": "maxpool2d" | "avgpool2d", "kernel_size": k,           ``MaxPool2d`` / ``AvgPool2d``
"stride": k, "padding": 0}``                                     (avg counts padding zeros)
``{"type": "global_avg_pool"}``                                  ``GlobalAvgPool``
===============================================================  =================================

:func:`split` separates a spec into a static *structure* (hashable; types and hyper-parameters)
and a *params* pytree (a list with one dict ``{"W", "b"}`` or ``{}`` per layer), so that
``apply(structure, params, X)`` is a pure function JAX can differentiate, ``vmap`` and ``jit``.
BatchNorm and residual blocks are not part of the JAX spec (see docs/adapters.md).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy

from qnref import backend
from qnref.nn import activations as qact
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.nn.reshape import Flatten

__all__ = ["UnsupportedLayerError", "split", "merge", "apply", "from_spec", "to_spec", "theta_to_params",
           "params_to_theta", "enable_x64"]

ACTIVATIONS = ("relu", "tanh", "sigmoid", "softplus", "identity")
POOLS = ("maxpool2d", "avgpool2d")
TYPES = ("dense", "conv2d", "flatten", "global_avg_pool") + ACTIVATIONS + POOLS


class UnsupportedLayerError(TypeError):
    """A spec entry (type, position) with no qnref counterpart."""


def enable_x64() -> None:
    """``jax.config.update("jax_enable_x64", True)`` — JAX computes in float32 otherwise.

    Called by :func:`qnref_jax.compare.compare` and by :class:`qnref_jax.objective.JaxObjective`.
    It is a process-wide switch (arrays created before it stay float32).
    """
    import jax

    jax.config.update("jax_enable_x64", True)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _check(entry: Any, pos: int) -> str:
    if not isinstance(entry, dict) or "type" not in entry:
        raise UnsupportedLayerError(f"spec entry at position {pos} must be a dict with a 'type', got {entry!r}")
    t = entry["type"]
    if t not in TYPES:
        raise UnsupportedLayerError(f"cannot convert spec layer type {t!r} at position {pos} to qnref: "
                                    f"no qnref counterpart (supported: {', '.join(TYPES)})")
    return t


def split(spec: Sequence[dict]) -> tuple[tuple, list[dict]]:
    """(structure, params): static layer descriptions and the parameter pytree."""
    structure, params = [], []
    for pos, e in enumerate(spec):
        t = _check(e, pos)
        if t == "dense":
            structure.append(("dense",))
            params.append({"W": e["W"], "b": e["b"]})
        elif t == "conv2d":
            structure.append(("conv2d", _pair(e.get("stride", 1)), _pair(e.get("padding", 0))))
            params.append({"W": e["W"], "b": e["b"]})
        elif t in POOLS:
            k = _pair(e["kernel_size"])
            structure.append((t, k, _pair(e.get("stride") or k), _pair(e.get("padding", 0))))
            params.append({})
        else:
            structure.append((t,))
            params.append({})
    return tuple(structure), params


def merge(structure: tuple, params: list[dict]) -> list[dict]:
    """Inverse of :func:`split`."""
    out = []
    for s, p in zip(structure, params):
        t = s[0]
        e = {"type": t, **p}
        if t == "conv2d":
            e.update(stride=s[1], padding=s[2])
        elif t in POOLS:
            e.update(kernel_size=s[1], stride=s[2], padding=s[3])
        out.append(e)
    return out


def apply(structure: tuple, params: list[dict], X: Any, *, perturb: dict | None = None, record: dict | None = None) -> Any:
    """The network's outputs (pure; jnp/lax only).

    ``perturb`` {position: array} is added to the outputs of dense/conv layers (the derivative with
    respect to it is the pre-activation gradient gₗ); ``record`` collects their inputs {position: a}.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    h = X
    for pos, (s, p) in enumerate(zip(structure, params)):
        t = s[0]
        if t in ("dense", "conv2d") and record is not None:
            record[pos] = h
        if t == "dense":
            h = h @ p["W"].T + p["b"]
        elif t == "conv2d":
            (sh, sw), (ph, pw) = s[1], s[2]
            h = lax.conv_general_dilated(h, p["W"], (sh, sw), [(ph, ph), (pw, pw)],
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=lax.Precision.HIGHEST)
            h = h + p["b"][None, :, None, None]
        elif t == "relu":
            h = jnp.maximum(h, 0)
        elif t == "tanh":
            h = jnp.tanh(h)
        elif t == "sigmoid":
            h = jax.nn.sigmoid(h)
        elif t == "softplus":
            h = jax.nn.softplus(h)
        elif t == "identity":
            pass
        elif t == "flatten":
            h = h.reshape(h.shape[0], -1)
        elif t == "global_avg_pool":
            h = h.mean(axis=(2, 3))
        elif t == "maxpool2d":
            (kh, kw), (sh, sw), (ph, pw) = s[1], s[2], s[3]
            h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 1, kh, kw), (1, 1, sh, sw), [(0, 0), (0, 0), (ph, ph), (pw, pw)])
        elif t == "avgpool2d":
            (kh, kw), (sh, sw), (ph, pw) = s[1], s[2], s[3]
            h = lax.reduce_window(h, 0.0, lax.add, (1, 1, kh, kw), (1, 1, sh, sw), [(0, 0), (0, 0), (ph, ph), (pw, pw)])
            h = h / (kh * kw)
        if perturb is not None and pos in perturb:
            h = h + perturb[pos]
    return h


def _qnref_layer(s: tuple, p: dict, pos: int):
    t = s[0]
    if t == "dense":
        return Dense(int(p["W"].shape[0]))
    if t == "conv2d":
        from qnref.nn.conv import Conv2d

        w = p["W"]
        return Conv2d(int(w.shape[0]), (int(w.shape[2]), int(w.shape[3])), s[1], s[2], in_channels=int(w.shape[1]))
    if t in ACTIVATIONS:
        return qact.activation(t)
    if t == "flatten":
        return Flatten()
    from qnref.nn import pool

    if t == "global_avg_pool":
        return pool.GlobalAvgPool()
    cls = pool.MaxPool2d if t == "maxpool2d" else pool.AvgPool2d
    return cls(s[1], s[2], s[3])


def from_spec(spec: Sequence[dict], input_shape: Sequence[int], *, dtype: Any = "float64") -> tuple[Sequential, Any]:
    """(qnref model, θ) computing the same function as ``spec`` (weights copied into W̄ = [W b])."""
    dt = backend.check_dtype(dtype)
    structure, params = split(spec)
    layers = [_qnref_layer(s, p, pos) for pos, (s, p) in enumerate(zip(structure, params))]
    model = Sequential(layers, input_shape)
    for pos, (layer, s, p) in enumerate(zip(model.layers, structure, params)):
        if s[0] == "dense" and layer.in_shape[0] != p["W"].shape[1]:
            raise ValueError(f"spec layer 'dense' at position {pos} has W of shape {tuple(p['W'].shape)} but receives "
                             f"{layer.in_shape[0]} features (input_shape {tuple(input_shape)})")
    theta = params_to_theta(model, structure, params).astype(dt)
    return model, theta


def _block_views(model: Sequential, theta: Any) -> list:
    """Per layer position: the W̄ view (or None)."""
    views = model.layout.views(theta)
    names = [b.name for b in model.layout.blocks]
    out = []
    for layer in model.layers:
        idx = [k for k, n in enumerate(names) if n.rsplit(".", 1)[0] == layer.name]
        out.append(views[idx[0]] if idx else None)
    return out


def params_to_theta(model: Sequential, structure: tuple, params: list[dict]) -> numpy.ndarray:
    """Flat qnref θ (float64, NumPy) from a params pytree."""
    theta = numpy.zeros(model.n_params)
    for wb, s, p in zip(_block_views(model, theta), structure, params):
        if s[0] in ("dense", "conv2d"):
            w = numpy.asarray(p["W"], dtype=numpy.float64)
            wb[:, :-1] = w.reshape(w.shape[0], -1)
            wb[:, -1] = numpy.asarray(p["b"], dtype=numpy.float64)
    return theta


def theta_to_params(model: Sequential, structure: tuple, theta: Any) -> list[dict]:
    """Differentiable map from a flat jnp θ (qnref layout) to the params pytree."""
    params = []
    for layer, s in zip(model.layers, structure):
        if s[0] in ("dense", "conv2d"):
            b = model.layout.index(f"{layer.name}.W")
            wb = theta[b.offset:b.stop].reshape(b.shape)
            w = wb[:, :-1]
            if s[0] == "conv2d":
                kh, kw = layer.kernel_size
                w = w.reshape(layer.out_channels, layer.in_shape[0], kh, kw)
            params.append({"W": w, "b": wb[:, -1]})
        else:
            params.append({})
    return params


def to_spec(model: Sequential, theta: Any) -> list[dict]:
    """A spec (NumPy arrays) computing the same function as (model, θ)."""
    from qnref.nn import pool
    from qnref.nn.conv import Conv2d

    model.layout.check(theta)
    th = backend.to_numpy(theta)
    spec: list[dict] = []
    names = {qact.ReLU: "relu", qact.Tanh: "tanh", qact.Sigmoid: "sigmoid", qact.Softplus: "softplus", qact.Identity: "identity"}
    for pos, (layer, wb) in enumerate(zip(model.layers, _block_views(model, th))):
        t = type(layer)
        if t is Dense:
            spec.append({"type": "dense", "W": wb[:, :-1].copy(), "b": wb[:, -1].copy()})
        elif t is Conv2d:
            kh, kw = layer.kernel_size
            spec.append({"type": "conv2d", "W": wb[:, :-1].reshape(layer.out_channels, layer.in_shape[0], kh, kw).copy(),
                         "b": wb[:, -1].copy(), "stride": layer.stride, "padding": layer.padding})
        elif t in names:
            spec.append({"type": names[t]})
        elif t is Flatten:
            spec.append({"type": "flatten"})
        elif t is pool.GlobalAvgPool:
            spec.append({"type": "global_avg_pool"})
        elif t in (pool.MaxPool2d, pool.AvgPool2d):
            spec.append({"type": "maxpool2d" if t is pool.MaxPool2d else "avgpool2d", "kernel_size": layer.kernel_size,
                         "stride": layer.stride, "padding": layer.padding})
        else:
            raise UnsupportedLayerError(f"cannot convert qnref layer {layer.describe()} at position {pos} to a JAX spec")
    return spec
