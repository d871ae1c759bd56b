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
``{"type": "batchnorm", "gamma": (C,), "beta": (C,),              ``BatchNorm(eps, momentum)``; blocks
"running_mean": (C,), "running_var": (C,), "eps": 1e-5,           gamma, beta; running statistics
"momentum": 0.1}`` (running stats optional: 0 / 1)                copied both ways
``{"type": "pad_shortcut", "out_channels": C, "stride": s}``     ``PadShortcut`` (option A)
``{"type": "residual", "body": [entries…], "shortcut": None |    ``Residual(body, shortcut, act)``:
[entries…], "activation": "relu" | … | None}``                     y = act(body(x) + shortcut(x))
===============================================================  =================================

:func:`split` separates a spec into a static *structure* (hashable; types and hyper-parameters)
and a *params* pytree (a list with one dict ``{"W", "b"}`` or ``{}`` per layer), so that
``apply(structure, params, X, train=True)`` is a pure function JAX can differentiate, ``vmap`` and
``jit``. BatchNorm: ``gamma``/``beta`` are parameters (in ``params``); the running statistics are
constants of the function kept in the *structure* (tuples of floats), used when ``train=False``;
``train=True`` normalises with the batch statistics (biased variance, like qnref and torch) and
never updates the running statistics. A residual entry's params are ``{"body": [...],
"shortcut": [...]}`` (the shortcut list is empty for the identity).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy

from qnref import backend
from qnref.nn import activations as qact
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.nn.reshape import Flatten

__all__ = ["UnsupportedLayerError", "layer_keys", "split", "merge", "apply", "from_spec", "to_spec", "theta_to_params",
           "params_to_theta", "enable_x64"]

ACTIVATIONS = ("relu", "tanh", "sigmoid", "softplus", "identity")
POOLS = ("maxpool2d", "avgpool2d")
TYPES = ("dense", "conv2d", "flatten", "global_avg_pool", "batchnorm", "pad_shortcut", "residual") + ACTIVATIONS + POOLS


class UnsupportedLayerError(TypeError):
    """A spec entry (type, position) with no qnref counterpart."""


def enable_x64() -> None:
    """``jax.config.update("jax_enable_x64", True)`` — JAX computes in float32 otherwise.

    qnref never calls it (compare, JaxObjective and the transformation use the scoped x64_scope).
    It is a process-wide switch (arrays created before it stay float32).
    """
    import jax

    jax.config.update("jax_enable_x64", True)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _check(entry: Any, pos: Any) -> str:
    if not isinstance(entry, dict) or "type" not in entry:
        raise UnsupportedLayerError(f"spec entry at position {pos} must be a dict with a 'type', got {entry!r}")
    t = entry["type"]
    if t not in TYPES:
        raise UnsupportedLayerError(f"cannot convert spec layer type {t!r} at position {pos} to qnref: "
                                    f"no qnref counterpart (supported: {', '.join(TYPES)})")
    return t


def _floats(a: Any, c: int, default: float) -> tuple:
    if a is None:
        return (float(default),) * c
    return tuple(float(x) for x in numpy.asarray(a, dtype=numpy.float64).reshape(-1))


def split(spec: Sequence[dict], _where: str = "") -> tuple[tuple, list[dict]]:
    """(structure, params): static layer descriptions and the parameter pytree."""
    structure, params = [], []
    for pos, e in enumerate(spec):
        t = _check(e, f"{_where}{pos}")
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
        elif t == "batchnorm":
            c = int(numpy.shape(e["gamma"])[0])
            mom = e.get("momentum", 0.1)
            structure.append(("batchnorm", float(e.get("eps", 1e-5)), None if mom is None else float(mom),
                              _floats(e.get("running_mean"), c, 0.0), _floats(e.get("running_var"), c, 1.0)))
            params.append({"gamma": e["gamma"], "beta": e["beta"]})
        elif t == "pad_shortcut":
            structure.append(("pad_shortcut", int(e["out_channels"]), _pair(e.get("stride", 1))))
            params.append({})
        elif t == "residual":
            bs, bp = split(e["body"], f"{_where}{pos}.body.")
            sc = e.get("shortcut")
            ss, sp = split(sc, f"{_where}{pos}.shortcut.") if sc else ((), [])
            act = e.get("activation", "relu")
            if act is not None and act not in ACTIVATIONS:
                raise UnsupportedLayerError(f"residual entry at position {_where}{pos}: activation must be one of "
                                            f"{ACTIVATIONS} or None, got {act!r}")
            structure.append(("residual", bs, ss, act))
            params.append({"body": bp, "shortcut": sp})
        else:
            structure.append((t,))
            params.append({})
    return tuple(structure), params


def merge(structure: tuple, params: list[dict]) -> list[dict]:
    """Inverse of :func:`split`."""
    out = []
    for s, p in zip(structure, params):
        t = s[0]
        if t == "residual":
            out.append({"type": t, "body": merge(s[1], p["body"]), "shortcut": merge(s[2], p["shortcut"]) if s[2] else None,
                        "activation": s[3]})
            continue
        e = {"type": t, **p}
        if t == "conv2d":
            e.update(stride=s[1], padding=s[2])
        elif t in POOLS:
            e.update(kernel_size=s[1], stride=s[2], padding=s[3])
        elif t == "batchnorm":
            e.update(eps=s[1], momentum=s[2], running_mean=numpy.array(s[3]), running_var=numpy.array(s[4]))
        elif t == "pad_shortcut":
            e.update(out_channels=s[1], stride=s[2])
        out.append(e)
    return out


def apply(structure: tuple, params: list[dict], X: Any, *, train: bool = True, perturb: dict | None = None,
          record: dict | None = None) -> Any:
    """The network's outputs (pure; jnp/lax only).

    ``train`` selects BatchNorm's statistics (batch when True, the structure's running ones when
    False). ``perturb`` {key: array} is added to the outputs of dense/conv layers (the derivative with
    respect to it is the pre-activation gradient gₗ); ``record`` collects their inputs {key: a}. Keys
    are position paths: ``"3"`` for the top-level entry 3, ``"3.body.0"`` / ``"3.shortcut.0"`` inside
    a residual entry.
    """
    return _apply(structure, params, X, train, perturb, record, "")


def _act(t: str, h: Any) -> Any:
    import jax
    import jax.numpy as jnp

    if t == "relu":
        return jnp.maximum(h, 0)
    if t == "tanh":
        return jnp.tanh(h)
    if t == "sigmoid":
        return jax.nn.sigmoid(h)
    if t == "softplus":
        return jax.nn.softplus(h)
    return h  # identity


def _apply(structure: tuple, params: list[dict], X: Any, train: bool, perturb: dict | None, record: dict | None,
           prefix: str) -> Any:
    import jax.numpy as jnp
    from jax import lax

    h = X
    for pos, (s, p) in enumerate(zip(structure, params)):
        t = s[0]
        key = f"{prefix}{pos}"
        if t in ("dense", "conv2d") and record is not None:
            record[key] = h
        if t == "dense":
            h = h @ p["W"].T + p["b"]
        elif t == "conv2d":
            (sh, sw), (ph, pw) = s[1], s[2]
            h = lax.conv_general_dilated(h, p["W"], (sh, sw), [(ph, ph), (pw, pw)],
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=lax.Precision.HIGHEST)
            h = h + p["b"][None, :, None, None]
        elif t in ACTIVATIONS:
            h = _act(t, h)
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
        elif t == "batchnorm":
            shape = (1, -1, 1, 1) if h.ndim == 4 else (1, -1)
            axes = (0, 2, 3) if h.ndim == 4 else (0,)
            eps = s[1]
            if train:
                mu = h.mean(axis=axes, keepdims=True)
                xc = h - mu
                var = (xc * xc).mean(axis=axes, keepdims=True)
                xhat = xc / jnp.sqrt(var + eps)
            else:
                rm = jnp.asarray(s[3], dtype=h.dtype).reshape(shape)
                rv = jnp.asarray(s[4], dtype=h.dtype).reshape(shape)
                xhat = (h - rm) * (1.0 / jnp.sqrt(rv + eps))
            h = p["gamma"].reshape(shape) * xhat + p["beta"].reshape(shape)
        elif t == "pad_shortcut":
            c_out, (sh, sw) = s[1], s[2]
            y = h[:, :, ::sh, ::sw]
            h = jnp.pad(y, ((0, 0), (0, c_out - y.shape[1]), (0, 0), (0, 0)))
        elif t == "residual":
            b = _apply(s[1], p["body"], h, train, perturb, record, f"{key}.body.")
            sc = _apply(s[2], p["shortcut"], h, train, perturb, record, f"{key}.shortcut.") if s[2] else h
            h = b + sc
            if s[3] is not None:
                h = _act(s[3], h)
        if perturb is not None and key in perturb:
            h = h + perturb[key]
    return h


def _qnref_layer(s: tuple, p: dict, pos: Any):
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
    if t == "batchnorm":
        from qnref.nn.norm import BatchNorm

        return BatchNorm(eps=s[1], momentum=s[2])
    if t == "pad_shortcut":
        from qnref.nn.residual import PadShortcut

        return PadShortcut(s[1], s[2])
    if t == "residual":
        from qnref.nn.residual import Residual

        body = [_qnref_layer(bs, bp, f"{pos}.body.{i}") for i, (bs, bp) in enumerate(zip(s[1], p["body"]))]
        short = [_qnref_layer(ss, sp, f"{pos}.shortcut.{i}") for i, (ss, sp) in enumerate(zip(s[2], p["shortcut"]))]
        return Residual(body, short, activation=s[3])
    from qnref.nn import pool

    if t == "global_avg_pool":
        return pool.GlobalAvgPool()
    cls = pool.MaxPool2d if t == "maxpool2d" else pool.AvgPool2d
    return cls(s[1], s[2], s[3])


def _walk(layers: Sequence[Any], structure: tuple, params: list, prefix: str = ""):
    """(key, qnref layer, structure entry, params entry) in depth-first order (residual children after the block)."""
    for pos, (layer, s, p) in enumerate(zip(layers, structure, params)):
        key = f"{prefix}{pos}"
        yield key, layer, s, p
        if s[0] == "residual":
            yield from _walk(layer.body, s[1], p["body"], f"{key}.body.")
            if s[2]:
                yield from _walk(layer.shortcut, s[2], p["shortcut"], f"{key}.shortcut.")


def layer_keys(model: Sequential, structure: tuple) -> dict:
    """{apply key ("3", "3.body.0", …): qnref layer} for every entry of ``structure``."""
    return {k: layer for k, layer, _, _ in _walk(model.layers, structure, _empty_params(structure))}


def _empty_params(structure: tuple) -> list:
    return [{"body": _empty_params(s[1]), "shortcut": _empty_params(s[2])} if s[0] == "residual" else {}
            for s in structure]


def from_spec(spec: Sequence[dict], input_shape: Sequence[int], *, dtype: Any = "float64") -> tuple[Sequential, Any]:
    """(qnref model, θ) computing the same function as ``spec`` (weights copied into W̄ = [W b])."""
    dt = backend.check_dtype(dtype)
    structure, params = split(spec)
    layers = [_qnref_layer(s, p, pos) for pos, (s, p) in enumerate(zip(structure, params))]
    model = Sequential(layers, input_shape)
    for key, layer, s, p in _walk(model.layers, structure, params):
        if s[0] == "dense" and layer.in_shape[0] != p["W"].shape[1]:
            raise ValueError(f"spec layer 'dense' at position {key} has W of shape {tuple(p['W'].shape)} but receives "
                             f"{layer.in_shape[0]} features (input_shape {tuple(input_shape)})")
        if s[0] == "batchnorm":
            if len(s[3]) != layer.channels or numpy.shape(p["gamma"]) != (layer.channels,):
                raise ValueError(f"spec layer 'batchnorm' at position {key} has {numpy.shape(p['gamma'])[0]} channels "
                                 f"but receives {layer.channels}")
            layer.running_mean = numpy.array(s[3], dtype=numpy.float64)
            layer.running_var = numpy.array(s[4], dtype=numpy.float64)
    theta = params_to_theta(model, structure, params).astype(dt)
    return model, theta


def params_to_theta(model: Sequential, structure: tuple, params: list[dict]) -> numpy.ndarray:
    """Flat qnref θ (float64, NumPy) from a params pytree."""
    theta = numpy.zeros(model.n_params)
    views = {b.name: v for b, v in zip(model.layout.blocks, model.layout.views(theta))}
    for _, layer, s, p in _walk(model.layers, structure, params):
        if s[0] in ("dense", "conv2d"):
            wb = views[f"{layer.name}.W"]
            w = numpy.asarray(p["W"], dtype=numpy.float64)
            wb[:, :-1] = w.reshape(w.shape[0], -1)
            wb[:, -1] = numpy.asarray(p["b"], dtype=numpy.float64)
        elif s[0] == "batchnorm":
            views[f"{layer.name}.gamma"][...] = numpy.asarray(p["gamma"], dtype=numpy.float64)
            views[f"{layer.name}.beta"][...] = numpy.asarray(p["beta"], dtype=numpy.float64)
    return theta


def theta_to_params(model: Sequential, structure: tuple, theta: Any) -> list[dict]:
    """Differentiable map from a flat jnp θ (qnref layout) to the params pytree."""
    return _theta_to_params(model.layout, model.layers, structure, theta)


def _theta_to_params(layout: Any, layers: Sequence[Any], structure: tuple, theta: Any) -> list[dict]:
    def blk(name):
        b = layout.index(name)
        return theta[b.offset:b.stop].reshape(b.shape)

    params = []
    for layer, s in zip(layers, structure):
        if s[0] in ("dense", "conv2d"):
            wb = blk(f"{layer.name}.W")
            w = wb[:, :-1]
            if s[0] == "conv2d":
                kh, kw = layer.kernel_size
                w = w.reshape(layer.out_channels, layer.in_shape[0], kh, kw)
            params.append({"W": w, "b": wb[:, -1]})
        elif s[0] == "batchnorm":
            params.append({"gamma": blk(f"{layer.name}.gamma"), "beta": blk(f"{layer.name}.beta")})
        elif s[0] == "residual":
            params.append({"body": _theta_to_params(layout, layer.body, s[1], theta),
                           "shortcut": _theta_to_params(layout, layer.shortcut, s[2], theta) if s[2] else []})
        else:
            params.append({})
    return params


def to_spec(model: Sequential, theta: Any) -> list[dict]:
    """A spec (NumPy arrays) computing the same function as (model, θ)."""
    model.layout.check(theta)
    th = backend.to_numpy(theta)
    views = {b.name: v for b, v in zip(model.layout.blocks, model.layout.views(th))}
    return _to_spec(model.layers, views, "")


def _to_spec(layers: Sequence[Any], views: dict, where: str) -> list[dict]:
    from qnref.nn import pool
    from qnref.nn.conv import Conv2d
    from qnref.nn.norm import BatchNorm
    from qnref.nn.residual import PadShortcut, Residual

    spec: list[dict] = []
    names = {qact.ReLU: "relu", qact.Tanh: "tanh", qact.Sigmoid: "sigmoid", qact.Softplus: "softplus", qact.Identity: "identity"}
    for pos, layer in enumerate(layers):
        t = type(layer)
        if t is Dense:
            wb = views[f"{layer.name}.W"]
            spec.append({"type": "dense", "W": wb[:, :-1].copy(), "b": wb[:, -1].copy()})
        elif t is Conv2d:
            wb = views[f"{layer.name}.W"]
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
        elif t is BatchNorm:
            spec.append({"type": "batchnorm", "gamma": views[f"{layer.name}.gamma"].copy(),
                         "beta": views[f"{layer.name}.beta"].copy(), "eps": layer.eps, "momentum": layer.momentum,
                         "running_mean": numpy.array(backend.to_numpy(layer.running_mean), dtype=numpy.float64),
                         "running_var": numpy.array(backend.to_numpy(layer.running_var), dtype=numpy.float64)})
        elif t is PadShortcut:
            spec.append({"type": "pad_shortcut", "out_channels": layer.out_channels, "stride": layer.stride})
        elif t is Residual:
            act = None if layer.act is None else names.get(type(layer.act))
            if layer.act is not None and act is None:
                raise UnsupportedLayerError(f"cannot convert the activation {layer.act.describe()} of the residual block "
                                            f"at position {where}{pos} to a JAX spec")
            spec.append({"type": "residual", "body": _to_spec(layer.body, views, f"{where}{pos}.body."),
                         "shortcut": _to_spec(layer.shortcut, views, f"{where}{pos}.shortcut.") if layer.shortcut else None,
                         "activation": act})
        else:
            raise UnsupportedLayerError(f"cannot convert qnref layer {layer.describe()} at position {where}{pos} to a JAX spec")
    return spec
