"""torch ``nn.Sequential`` ⇄ qnref :class:`~qnref.nn.model.Sequential` with the same weights.

Supported torch layers (nested ``nn.Sequential`` containers are flattened):

==========================================  =====================================================
torch                                       qnref
==========================================  =====================================================
``nn.Linear(in, out, bias=True)``           ``Dense(out)``; block W̄ = [weight  bias] (out × in+1)
``nn.Conv2d(…, dilation=1, groups=1,        ``Conv2d(out, kernel, stride, padding)``; block
padding_mode="zeros", bias=True)``          W̄ = [weight.reshape(C_out, C_in·kh·kw)  bias]
``nn.ReLU`` ``nn.Tanh`` ``nn.Sigmoid``      ``ReLU`` ``Tanh`` ``Sigmoid`` ``Identity``
``nn.Identity``
``nn.Softplus(beta=1)``                     ``Softplus`` (torch switches to the identity above
                                            ``threshold`` = 20, where the two differ by < 2.1e-9)
``nn.Flatten(start_dim=1, end_dim=-1)``     ``Flatten``
``nn.MaxPool2d(dilation=1, ceil_mode=False)`` ``MaxPool2d`` (padding counts as −∞ in both)
``nn.AvgPool2d(count_include_pad=True,      ``AvgPool2d``
ceil_mode=False, divisor_override=None)``
``nn.AdaptiveAvgPool2d(1)`` + ``Flatten``    ``GlobalAvgPool`` (the Flatten is absorbed)
``nn.BatchNorm1d`` / ``nn.BatchNorm2d``     ``BatchNorm(eps, momentum)``; blocks gamma = weight,
(affine=True)                               beta = bias; running statistics copied both ways
:class:`ResidualBlock` (body, shortcut,     ``Residual(body, shortcut, act)``: y = act(body(x) +
activation)                                 shortcut(x)); shortcut ``None``/``Identity`` → identity,
                                            any convertible module / Sequential → that branch
:class:`PadShortcut` (out_channels, stride) ``PadShortcut`` (option A: x[:, :, ::s, ::s] + zero channels)
==========================================  =====================================================

Inside a :class:`ResidualBlock` the positions are module paths (``3.body.1``, ``3.shortcut.0``,
``3.activation``), and so are the parameter names (``3.body.0.weight``).

Anything else raises :class:`UnsupportedLayerError` naming the layer's type and its position
(the index path in the torch container, e.g. ``features.3``).

The qnref θ is float64 by default (``dtype=``); :func:`to_torch` builds the torch module in θ's
dtype. Parameters are always *copied* between the two (weights must be re-laid out as W̄ = [W b]);
:mod:`qnref_torch.objective` is the zero-copy path for optimizing a torch model in place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy
import torch
import torch.nn.functional as F
from torch import nn

from qnref import backend
from qnref.nn import activations as qact
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.nn.reshape import Flatten

__all__ = ["running_stats", "set_running_stats", "UnsupportedLayerError", "ResidualBlock", "PadShortcut", "Conversion", "convert", "from_torch", "to_torch", "theta_to_torch_params",
           "torch_to_theta"]


class UnsupportedLayerError(TypeError):
    """A torch layer (type, position) with no qnref counterpart, or with unsupported options."""


def _optional(modname: str, attr: str):
    try:
        mod = __import__(f"qnref.nn.{modname}", fromlist=[attr])
        return getattr(mod, attr)
    except (ImportError, AttributeError):
        return None


@dataclass
class ParamMap:
    """How one torch parameter is read from a qnref block.

    kind: "dense_w" (W̄[:, :-1]), "dense_b" (W̄[:, -1]), "conv_w" (W̄[:, :-1].reshape(torch shape)),
    "vec" (the whole block, BatchNorm gamma/beta).
    """

    torch_name: str
    block: str
    kind: str
    shape: tuple[int, ...]


@dataclass
class Conversion:
    """The result of :func:`convert`: the qnref model, θ, and the name/parameter correspondence."""

    model: Sequential
    theta: Any
    params: list[ParamMap] = field(default_factory=list)
    #: qnref layer name → dotted torch module path (for hooks on Linear/Conv2d)
    layer_paths: dict[str, str] = field(default_factory=dict)
    #: qnref layer name → torch module (the original one)
    torch_layers: dict[str, nn.Module] = field(default_factory=dict)


def _flatten_modules(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        out = []
        for name, child in module.named_children():
            out.extend(_flatten_modules(child, f"{prefix}.{name}" if prefix else name))
        return out
    return [(prefix, module)]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _where(path: str, mod: nn.Module) -> str:
    return f"layer {type(mod).__name__} at position {path!r} ({mod!r})"


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _unsupported(path: str, mod: nn.Module, why: str = "") -> UnsupportedLayerError:
    base = f"cannot convert {_where(path, mod)} to qnref"
    return UnsupportedLayerError(base + (f": {why}" if why else ": no qnref counterpart (supported: Linear, Conv2d, "
                                 "ReLU, Tanh, Sigmoid, Softplus, Identity, Flatten, MaxPool2d, AvgPool2d, "
                                 "AdaptiveAvgPool2d(1)+Flatten, BatchNorm1d/2d, nested Sequential, "
                                 "qnref_torch.ResidualBlock, qnref_torch.PadShortcut)"))


def _np(t: torch.Tensor, dtype) -> numpy.ndarray:
    return t.detach().to("cpu", torch.float64).numpy().astype(dtype)


class PadShortcut(nn.Module):
    """Option-A shortcut of He et al. (2016): ``x[:, :, ::s, ::s]`` with zero channels appended up to
    ``out_channels`` (parameter-free); the torch twin of :class:`qnref.nn.residual.PadShortcut`."""

    def __init__(self, out_channels: int, stride: Any = 1):
        super().__init__()
        self.out_channels = int(out_channels)
        self.stride = _pair(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh, sw = self.stride
        y = x[:, :, ::sh, ::sw]
        extra = self.out_channels - y.shape[1]
        if extra < 0:
            raise ValueError(f"PadShortcut cannot reduce channels ({y.shape[1]} → {self.out_channels})")
        return F.pad(y, (0, 0, 0, 0, 0, extra)) if extra else y

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, stride={self.stride}"


class ResidualBlock(nn.Module):
    """y = activation(body(x) + shortcut(x)) — the torch twin of :class:`qnref.nn.residual.Residual`.

    ``body``: an ``nn.Sequential`` (or a list of modules) of convertible layers;
    ``shortcut``: ``None`` or ``nn.Identity()`` (identity), :class:`PadShortcut` (option A), or any
    convertible module / ``nn.Sequential`` (option B: ``nn.Sequential(nn.Conv2d(C_in, C_out, 1,
    stride=s), nn.BatchNorm2d(C_out))``); ``activation``: an activation module (``nn.ReLU()`` by
    default; ``nn.Tanh``, ``nn.Sigmoid``, ``nn.Softplus``, ``nn.Identity``) or ``None`` (no
    activation after the sum). :func:`from_torch` converts it to ``Residual`` and :func:`to_torch`
    produces it; parameter names are ``body.<i>.weight``, ``shortcut[.<i>].weight``.
    """

    def __init__(self, body: "nn.Sequential | Sequence[nn.Module]", shortcut: nn.Module | None = None,
                 activation: "nn.Module | None | str" = "relu"):
        super().__init__()
        self.body = body if isinstance(body, nn.Sequential) else nn.Sequential(*body)
        if len(self.body) == 0:
            raise ValueError("ResidualBlock needs a non-empty body")
        self.shortcut = shortcut
        self.activation = nn.ReLU() if isinstance(activation, str) and activation == "relu" else activation
        if isinstance(self.activation, str):
            raise ValueError(f"activation must be an nn.Module, None or 'relu', got {activation!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.body(x) + (x if self.shortcut is None else self.shortcut(x))
        return z if self.activation is None else self.activation(z)


_ACT_TYPES = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Softplus)


def _convert_list(mods: list[tuple[str, nn.Module]], plan: list, classes: dict) -> list:
    """qnref layers for a flat list of (path, torch module); appends (qnref layer, path, module, entries) to ``plan``."""
    Conv2d, MaxPool2d, AvgPool2d, GlobalAvgPool, BatchNorm = (classes[k] for k in
                                                              ("Conv2d", "MaxPool2d", "AvgPool2d", "GlobalAvgPool", "BatchNorm"))
    layers: list = []
    skip_next_flatten = False
    for i, (path, mod) in enumerate(mods):
        t = type(mod)
        if skip_next_flatten:
            skip_next_flatten = False
            if isinstance(mod, nn.Flatten):
                continue
        entries: list[tuple[str, str]] = []
        if t is nn.Linear:
            if mod.bias is None:
                raise _unsupported(path, mod, "qnref Dense always has a bias (W̄ = [W b]); use bias=True")
            layer = Dense(mod.out_features)
            entries = [("weight", "dense_w"), ("bias", "dense_b")]
        elif t is nn.Conv2d:
            if Conv2d is None:
                raise _unsupported(path, mod, "qnref.nn.conv is not available")
            if _pair(mod.dilation) != (1, 1) or mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                raise _unsupported(path, mod, "only dilation=1, groups=1, padding_mode='zeros' and integer padding are supported")
            if mod.bias is None:
                raise _unsupported(path, mod, "qnref Conv2d always has a bias (W̄ = [W b]); use bias=True")
            layer = Conv2d(mod.out_channels, _pair(mod.kernel_size), _pair(mod.stride), _pair(mod.padding),
                           in_channels=mod.in_channels)
            entries = [("weight", "conv_w"), ("bias", "dense_b")]
        elif t in (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity):
            layer = {nn.ReLU: qact.ReLU, nn.Tanh: qact.Tanh, nn.Sigmoid: qact.Sigmoid, nn.Identity: qact.Identity}[t]()
        elif t is nn.Softplus:
            if float(mod.beta) != 1.0:
                raise _unsupported(path, mod, f"only beta=1 is supported, got beta={mod.beta}")
            layer = qact.Softplus()
        elif t is nn.Flatten:
            if mod.start_dim != 1 or mod.end_dim != -1:
                raise _unsupported(path, mod, "only Flatten(start_dim=1, end_dim=-1) is supported")
            layer = Flatten()
        elif t is nn.MaxPool2d:
            if MaxPool2d is None:
                raise _unsupported(path, mod, "qnref.nn.pool is not available")
            if _pair(mod.dilation) != (1, 1) or mod.ceil_mode or mod.return_indices:
                raise _unsupported(path, mod, "only dilation=1, ceil_mode=False, return_indices=False are supported")
            stride = mod.stride if mod.stride is not None else mod.kernel_size
            layer = MaxPool2d(_pair(mod.kernel_size), _pair(stride), _pair(mod.padding))
        elif t is nn.AvgPool2d:
            if AvgPool2d is None:
                raise _unsupported(path, mod, "qnref.nn.pool is not available")
            if mod.ceil_mode or not mod.count_include_pad or mod.divisor_override is not None:
                raise _unsupported(path, mod, "only ceil_mode=False, count_include_pad=True, divisor_override=None are supported")
            stride = mod.stride if mod.stride is not None else mod.kernel_size
            layer = AvgPool2d(_pair(mod.kernel_size), _pair(stride), _pair(mod.padding))
        elif t is nn.AdaptiveAvgPool2d:
            nxt = mods[i + 1][1] if i + 1 < len(mods) else None
            if GlobalAvgPool is None or _pair(mod.output_size) != (1, 1) or not (
                    isinstance(nxt, nn.Flatten) and nxt.start_dim == 1 and nxt.end_dim == -1):
                raise _unsupported(path, mod, "only AdaptiveAvgPool2d(1) followed by Flatten() (→ GlobalAvgPool) is supported")
            layer = GlobalAvgPool()
            skip_next_flatten = True
        elif t in (nn.BatchNorm1d, nn.BatchNorm2d):
            if BatchNorm is None:
                raise _unsupported(path, mod, "qnref.nn.norm is not available")
            if not mod.affine or not mod.track_running_stats:
                raise _unsupported(path, mod, "only affine=True, track_running_stats=True are supported")
            layer = BatchNorm(eps=mod.eps, momentum=mod.momentum)
            entries = [("weight", "vec"), ("bias", "vec")]
        elif t is PadShortcut:
            from qnref.nn.residual import PadShortcut as QPad  # noqa: PLC0415

            layer = QPad(mod.out_channels, mod.stride)
        elif t is ResidualBlock:
            from qnref.nn.residual import Residual  # noqa: PLC0415

            body = _convert_list(_flatten_modules(mod.body, _join(path, "body")), plan, classes)
            sc = mod.shortcut
            short = [] if sc is None or type(sc) is nn.Identity else _convert_list(
                _flatten_modules(sc, _join(path, "shortcut")), plan, classes)
            act = None
            if mod.activation is not None:
                if not isinstance(mod.activation, _ACT_TYPES):
                    raise _unsupported(_join(path, "activation"), mod.activation,
                                       "a ResidualBlock activation must be ReLU, Tanh, Sigmoid, Softplus, Identity or None")
                (act,) = _convert_list([(_join(path, "activation"), mod.activation)], plan, classes)
            layer = Residual(body, short, activation=act)
        else:
            raise _unsupported(path, mod)
        layers.append(layer)
        plan.append((layer, path, mod, entries))
    return layers


_LEAF_TYPES = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Softplus, nn.Flatten, nn.MaxPool2d,
               nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d)


def _plain(module: nn.Module) -> bool:
    """An nn.Sequential (nested) of the table's layers, ResidualBlock and PadShortcut: converted by position."""
    if type(module) in (nn.Sequential, ResidualBlock):
        kids = [module.body] + ([module.shortcut] if module.shortcut is not None else []) + (
            [module.activation] if module.activation is not None else []) if type(module) is ResidualBlock else list(module)
        return all(_plain(k) for k in kids)
    return type(module) in _LEAF_TYPES or type(module) is PadShortcut


def convert(module: nn.Module, input_shape: Sequence[int], *, dtype: Any = "float64") -> Conversion:
    """Convert ``module`` (an ``nn.Sequential`` of the table's layers, or any ``nn.Module`` whose
    ``forward`` composes them: traced with ``torch.fx``, see :mod:`qnref_torch.fx`); see the module docs."""
    dt = backend.check_dtype(dtype)
    classes = {"Conv2d": _optional("conv", "Conv2d"), "MaxPool2d": _optional("pool", "MaxPool2d"),
               "AvgPool2d": _optional("pool", "AvgPool2d"), "GlobalAvgPool": _optional("pool", "GlobalAvgPool"),
               "BatchNorm": _optional("norm", "BatchNorm")}
    mods = _flatten_modules(module)  # path "" for a single (non-Sequential) module: its parameters are "weight", …
    plan: list[tuple[Any, str, nn.Module, list[tuple[str, str]]]] = []  # (qnref layer, path, module, [(param, kind)])
    if _plain(module):
        layers = _convert_list(mods, plan, classes)
    else:  # any other nn.Module: trace its forward with torch.fx (qnref_torch.fx)
        from .fx import fx_layers  # noqa: PLC0415

        layers = fx_layers(module, plan, classes)
    if not layers:
        raise ValueError("the torch module contains no layers")
    model = Sequential(layers, input_shape)
    theta = numpy.zeros(model.n_params, dtype=dt)
    views = model.layout.views(theta)
    block_of = {b.name: k for k, b in enumerate(model.layout.blocks)}
    conv = Conversion(model, theta)
    for layer, path, mod, entries in plan:
        conv.layer_paths[layer.name] = path
        conv.torch_layers[layer.name] = mod
        pname = lambda a, _p=path: _join(_p, a)  # noqa: E731
        if isinstance(mod, nn.Linear) and layer.in_shape[0] != mod.in_features:
            raise ValueError(f"{_where(path, mod)} expects {mod.in_features} input features but receives "
                             f"{layer.in_shape[0]} (input_shape {tuple(input_shape)} propagated through the earlier layers)")
        if entries and entries[0][1] in ("dense_w", "conv_w"):
            blk = f"{layer.name}.W"
            wb = views[block_of[blk]]
            wb[:, :-1] = _np(mod.weight, dt).reshape(wb.shape[0], -1)
            wb[:, -1] = _np(mod.bias, dt)
            conv.params.append(ParamMap(pname("weight"), blk, entries[0][1], tuple(mod.weight.shape)))
            conv.params.append(ParamMap(pname("bias"), blk, "dense_b", tuple(mod.bias.shape)))
        elif entries:  # BatchNorm: gamma, beta
            g, b = f"{layer.name}.gamma", f"{layer.name}.beta"
            views[block_of[g]][...] = _np(mod.weight, dt)
            views[block_of[b]][...] = _np(mod.bias, dt)
            conv.params.append(ParamMap(pname("weight"), g, "vec", tuple(mod.weight.shape)))
            conv.params.append(ParamMap(pname("bias"), b, "vec", tuple(mod.bias.shape)))
            layer.running_mean = _np(mod.running_mean, numpy.float64)
            layer.running_var = _np(mod.running_var, numpy.float64)
            layer.num_batches_tracked = int(mod.num_batches_tracked)
    return conv


def from_torch(module: nn.Module, input_shape: Sequence[int], *, dtype: Any = "float64") -> tuple[Sequential, Any]:
    """(qnref model, θ) computing the same function as ``module`` (a copy of its weights)."""
    c = convert(module, input_shape, dtype=dtype)
    return c.model, c.theta


def theta_to_torch_params(conv: Conversion, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Differentiable map from a flat torch θ (qnref layout) to ``{torch_name: tensor}``.

    Used with ``torch.func.functional_call(module, params, X)`` so that torch's derivatives are
    taken with respect to qnref's θ directly (same coordinates, no permutation).
    """
    layout = conv.model.layout
    out = {}
    for pm in conv.params:
        b = layout.index(pm.block)
        blk = theta[b.offset:b.stop].reshape(b.shape)
        if pm.kind == "dense_w":
            out[pm.torch_name] = blk[:, :-1]
        elif pm.kind == "conv_w":
            out[pm.torch_name] = blk[:, :-1].reshape(pm.shape)
        elif pm.kind == "dense_b":
            out[pm.torch_name] = blk[:, -1]
        else:
            out[pm.torch_name] = blk
    return out


def torch_to_theta(conv: Conversion, grads: dict[str, torch.Tensor]) -> numpy.ndarray:
    """Inverse of :func:`theta_to_torch_params` for per-parameter arrays (e.g. torch gradients)."""
    layout = conv.model.layout
    theta = numpy.zeros(layout.size)
    views = {b.name: v for b, v in zip(layout.blocks, layout.views(theta))}
    for pm in conv.params:
        v = views[pm.block]
        g = grads[pm.torch_name].detach().cpu().double().numpy()
        if pm.kind in ("dense_w", "conv_w"):
            v[:, :-1] = g.reshape(v.shape[0], -1)
        elif pm.kind == "dense_b":
            v[:, -1] = g
        else:
            v[...] = g
    return theta


_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def to_torch(model: Sequential, theta: Any) -> nn.Sequential:
    """A torch ``nn.Sequential`` (dtype of θ, on the CPU) computing the same function as (model, θ).

    qnref ``Residual`` blocks become :class:`ResidualBlock` (identity shortcut → ``None``,
    ``PadShortcut`` → :class:`PadShortcut`, any other shortcut → an ``nn.Sequential``).
    """
    model.layout.check(theta)
    th = backend.to_numpy(theta)
    dt = _TORCH_DTYPES[th.dtype.name]
    views = {b.name: v for b, v in zip(model.layout.blocks, model.layout.views(th))}
    return nn.Sequential(*_to_torch_list(model.layers, views, dt, ""))


def _to_torch_list(layers: Sequence[Any], views: dict, dt: torch.dtype, where: str) -> list[nn.Module]:
    Conv2d = _optional("conv", "Conv2d")
    MaxPool2d = _optional("pool", "MaxPool2d")
    AvgPool2d = _optional("pool", "AvgPool2d")
    GlobalAvgPool = _optional("pool", "GlobalAvgPool")
    BatchNorm = _optional("norm", "BatchNorm")
    Residual = _optional("residual", "Residual")
    QPad = _optional("residual", "PadShortcut")
    simple = {qact.ReLU: nn.ReLU, qact.Tanh: nn.Tanh, qact.Sigmoid: nn.Sigmoid, qact.Softplus: nn.Softplus,
              qact.Identity: nn.Identity, Flatten: nn.Flatten}

    def arr(a):
        return torch.from_numpy(numpy.ascontiguousarray(a))

    mods: list[nn.Module] = []
    for pos, layer in enumerate(layers):
        t = type(layer)
        if t is Dense:
            wb = views[f"{layer.name}.W"]
            m = nn.Linear(layer.in_shape[0], layer.units, dtype=dt)
            with torch.no_grad():
                m.weight.copy_(arr(wb[:, :-1]))
                m.bias.copy_(arr(wb[:, -1]))
        elif Conv2d is not None and t is Conv2d:
            wb = views[f"{layer.name}.W"]
            m = nn.Conv2d(layer.in_shape[0], layer.out_channels, layer.kernel_size, layer.stride, layer.padding, dtype=dt)
            with torch.no_grad():
                m.weight.copy_(arr(wb[:, :-1]).reshape(m.weight.shape))
                m.bias.copy_(arr(wb[:, -1]))
        elif t in simple:
            m = simple[t]()
        elif MaxPool2d is not None and t is MaxPool2d:
            m = nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding)
        elif AvgPool2d is not None and t is AvgPool2d:
            m = nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding, count_include_pad=True)
        elif GlobalAvgPool is not None and t is GlobalAvgPool:
            mods.append(nn.AdaptiveAvgPool2d(1))
            m = nn.Flatten()
        elif BatchNorm is not None and t is BatchNorm:
            cls = nn.BatchNorm2d if layer.conv else nn.BatchNorm1d
            m = cls(layer.channels, eps=layer.eps, momentum=layer.momentum, dtype=dt)
            with torch.no_grad():
                m.weight.copy_(arr(views[f"{layer.name}.gamma"]))
                m.bias.copy_(arr(views[f"{layer.name}.beta"]))
                m.running_mean.copy_(torch.from_numpy(backend.to_numpy(layer.running_mean)).to(dt))
                m.running_var.copy_(torch.from_numpy(backend.to_numpy(layer.running_var)).to(dt))
                m.num_batches_tracked.fill_(int(layer.num_batches_tracked))
        elif QPad is not None and t is QPad:
            m = PadShortcut(layer.out_channels, layer.stride)
        elif Residual is not None and t is Residual:
            body = nn.Sequential(*_to_torch_list(layer.body, views, dt, f"{where}{pos}.body."))
            short = None
            if layer.shortcut:
                sc = _to_torch_list(layer.shortcut, views, dt, f"{where}{pos}.shortcut.")
                short = sc[0] if len(sc) == 1 and isinstance(sc[0], PadShortcut) else nn.Sequential(*sc)
            act = None
            if layer.act is not None:
                (act,) = _to_torch_list([layer.act], views, dt, f"{where}{pos}.activation.")
            m = ResidualBlock(body, short, act)
        else:
            raise UnsupportedLayerError(f"cannot convert qnref layer {layer.describe()} ({t.__name__}) at position "
                                        f"{where}{pos} (name {layer.name!r}) to torch: no torch counterpart implemented")
        mods.append(m)
    return mods


def running_stats(source: "nn.Module | Conversion") -> dict[str, dict[str, Any]]:
    """BatchNorm running statistics by torch module path, first layer to last:
    ``{path: {"running_mean", "running_var", "num_batches_tracked"}}`` (NumPy float64 copies).

    ``source``: a torch module (its BatchNorm buffers) or a :class:`Conversion` (the statistics held
    by the converted qnref model's BatchNorm layers, e.g. after qnref's own ``update_batchnorm_stats``)."""
    out: dict[str, dict[str, Any]] = {}
    if isinstance(source, Conversion):
        for name, path in source.layer_paths.items():
            mod = source.torch_layers.get(name)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                layer = _layer_by_name(source.model, name)
                out[path] = {"running_mean": backend.to_numpy(layer.running_mean).astype(numpy.float64),
                             "running_var": backend.to_numpy(layer.running_var).astype(numpy.float64),
                             "num_batches_tracked": int(getattr(layer, "num_batches_tracked", 0))}
        return out
    for path, m in source.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            out[path] = {"running_mean": _np(m.running_mean, numpy.float64), "running_var": _np(m.running_var, numpy.float64),
                         "num_batches_tracked": int(m.num_batches_tracked)}
    return out


def set_running_stats(target: "nn.Module | Conversion", stats: dict[str, dict[str, Any]]) -> None:
    """Write ``stats`` (as :func:`running_stats` returns them, keyed by torch module path) into a torch
    module's BatchNorm buffers or a :class:`Conversion`'s qnref BatchNorm layers. Unknown paths raise."""
    if isinstance(target, Conversion):
        by_path = {path: name for name, path in target.layer_paths.items()
                   if isinstance(target.torch_layers.get(name), nn.modules.batchnorm._BatchNorm)}
        for path, st in stats.items():
            if path not in by_path:
                raise KeyError(f"no BatchNorm layer at torch path {path!r} (known: {sorted(by_path)})")
            layer = _layer_by_name(target.model, by_path[path])
            layer.running_mean = numpy.array(st["running_mean"], dtype=numpy.float64)
            layer.running_var = numpy.array(st["running_var"], dtype=numpy.float64)
            layer.num_batches_tracked = int(st.get("num_batches_tracked", 0))
        return
    mods = dict(target.named_modules())
    for path, st in stats.items():
        m = mods.get(path)
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise KeyError(f"no BatchNorm module at path {path!r}")
        with torch.no_grad():
            m.running_mean.copy_(torch.as_tensor(numpy.asarray(st["running_mean"]), dtype=m.running_mean.dtype))
            m.running_var.copy_(torch.as_tensor(numpy.asarray(st["running_var"]), dtype=m.running_var.dtype))
            m.num_batches_tracked.fill_(int(st.get("num_batches_tracked", 0)))


def _layer_by_name(model: Sequential, name: str) -> Any:
    from qnref.nn.base import walk  # noqa: PLC0415

    for layer in walk(model.layers):
        if layer.name == name:
            return layer
    raise KeyError(f"no qnref layer named {name!r}")
