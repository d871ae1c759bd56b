"""Residual blocks y = act(body(x) + shortcut(x)) (He et al. 2016, "Deep residual learning").

A :class:`Residual` is a composite layer: ``body`` and ``shortcut`` are chains of ordinary layers
and the optional activation acts on the sum. Its four passes run the children's passes in order
(forward, R-forward) or in reverse (backward, R-backward) and add the two branches' input
gradients, so every product of :class:`~qnref.curvature.objective.Objective` is exact through it.

Shortcuts
---------
- ``None`` / ``"identity"``: x itself (body must preserve the shape);
- ``"pad"``: He et al.'s option A, the parameter-free identity for a block that downsamples by
  ``stride`` and widens from C_in to C_out channels: x[:, :, ::s, ::s] with zero channels appended
  (:class:`PadShortcut`). This is the shortcut of the CIFAR ResNet-20/32 of He et al. §4.2
  (0.27M / 0.46M parameters);
- ``"projection"``: option B, ``[Conv2d(C_out, 1, stride=s), BatchNorm()]`` (no BN with
  ``projection_bn=False``);
- a list of layers (any shortcut branch).

With "pad" and "projection" the stride s = ⌈H / Ho⌉ is read off the body at build time, and the
shortcut is the identity where the body keeps the shape (so one setting serves a whole network).

Naming and parameters
---------------------
:meth:`Residual.build` names the children ``f"{name}.body{i}"``, ``f"{name}.short{i}"`` and
``f"{name}.act"`` (again whenever the block is renamed), so Kronecker taps and parameter blocks are
unique. ``param_specs`` are the children's specs in the order body, shortcut, each prefixed with the
child's suffix (``body0.W``), so the layout block of a child's parameter is named
``f"{child.name}.{spec}"`` — exactly what Objective's Kronecker bookkeeping expects.
During :meth:`backward` with ``taps`` a dict, every child with ``has_kron`` records
``taps[child.name] = child.kron_taps(cache, g)`` (nested composites pass the dict on).
"""
from __future__ import annotations

from typing import Any, Sequence

from .. import backend
from .activations import Activation, activation as make_activation
from .base import Ctx, Layer, ParamSpec, Shape
from .conv import Conv2d, check_image_shape, pair
from .norm import BatchNorm


class PadShortcut(Layer):
    """Option-A shortcut: spatial subsampling by ``stride`` and zero channels up to ``out_channels``."""

    def __init__(self, out_channels: int, stride: int = 1):
        if int(out_channels) != out_channels or out_channels < 1:
            raise ValueError(f"PadShortcut out_channels must be a positive integer, got {out_channels!r}")
        self.out_channels = int(out_channels)
        self.stride = pair(stride, "PadShortcut stride", 1)

    def build(self, in_shape: Shape) -> Shape:
        check_image_shape(tuple(in_shape), "PadShortcut")
        c, h, w = (int(d) for d in in_shape)
        if self.out_channels < c:
            raise ValueError(f"PadShortcut cannot reduce channels ({c} → {self.out_channels}); use a projection shortcut")
        sh, sw = self.stride
        self.in_shape = (c, h, w)
        self.out_shape = (self.out_channels, (h - 1) // sh + 1, (w - 1) // sw + 1)
        return self.out_shape

    def describe(self) -> str:
        sh, sw = self.stride
        return f"PadShortcut(→{self.out_channels}, stride {sh if sh == sw else self.stride})"

    def _apply(self, x: Any) -> Any:
        if x is None:
            return None
        xp = backend.namespace(x)
        sh, sw = self.stride
        out = xp.zeros((x.shape[0],) + self.out_shape, dtype=x.dtype)
        out[:, : x.shape[1]] = x[:, :, ::sh, ::sw]
        return out

    def _adjoint(self, g: Any) -> Any:
        xp = backend.namespace(g)
        sh, sw = self.stride
        out = xp.zeros((g.shape[0],) + self.in_shape, dtype=g.dtype)
        out[:, :, ::sh, ::sw] = g[:, : self.in_shape[0]]
        return out

    def forward(self, p, x, ctx: Ctx):
        return self._apply(x), None

    def backward(self, p, cache, gy, gp, need_gx: bool = True):
        return self._adjoint(gy) if need_gx else None

    def jvp(self, p, cache, dx, dp):
        return self._apply(dx), None

    def backward_rop(self, p, cache, rcache, gy, rgy, dp, rgp, need_gx: bool = True):
        return (self._adjoint(gy), self._adjoint(rgy)) if need_gx else (None, None)

    def per_example_grads(self, p, cache, gy, out):
        return self._adjoint(gy)


def _add(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


class Residual(Layer):
    """y = act(body(x) + shortcut(x)); see the module docstring.

    Parameters
    ----------
    body:
        the residual branch, a list of layers.
    shortcut:
        ``None``/"identity", "pad" (option A), "projection" (option B) or a list of layers.
    projection_bn:
        whether the "projection" shortcut has a BatchNorm after its 1×1 conv.
    activation:
        name ("relu", "tanh", …), an :class:`Activation`, or ``None`` for no activation after the sum.
    """

    def __init__(
        self,
        body: Sequence[Layer],
        shortcut: "str | Sequence[Layer] | None" = None,
        activation: "str | Activation | None" = "relu",
        *,
        projection_bn: bool = True,
    ):
        if not body:
            raise ValueError("Residual needs a non-empty body")
        self.body: list[Layer] = list(body)
        self._auto: str | None = None
        if shortcut is None or shortcut == "identity":
            self.shortcut: list[Layer] = []
        elif shortcut in ("pad", "projection"):
            self.shortcut = []
            self._auto = shortcut
        elif isinstance(shortcut, str):
            raise ValueError(f"unknown shortcut {shortcut!r}; use None/'identity', 'pad', 'projection' or a list of layers")
        else:
            self.shortcut = list(shortcut)
        self.projection_bn = bool(projection_bn)
        if isinstance(activation, str):
            activation = make_activation(activation)
        self.act: Activation | None = activation
        self._counts: list[int] = []

    # -- structure ------------------------------------------------------------------------------------
    def _children(self) -> list[tuple[str, Layer]]:
        kids = [(f"body{i}", l) for i, l in enumerate(self.body)]
        kids += [(f"short{i}", l) for i, l in enumerate(self.shortcut)]
        if self.act is not None:
            kids.append(("act", self.act))
        return kids

    def _name_children(self) -> None:
        for suffix, child in self._children():
            child.name = f"{self.name}.{suffix}"

    def sublayers(self) -> list[Layer]:
        self._name_children()
        return [l for _, l in self._children()]

    def build(self, in_shape: Shape) -> Shape:
        self.in_shape = tuple(int(d) for d in in_shape)
        self._name_children()
        shape = self.in_shape
        for layer in self.body:
            shape = layer.build(shape)
        body_out = tuple(shape)
        if self._auto is not None:
            # "pad" / "projection": the identity where the body keeps the shape, else option A / B
            if body_out == self.in_shape:
                self.shortcut = []
            else:
                check_image_shape(self.in_shape, f"{self.name or 'Residual'} {self._auto!r} shortcut")
                if len(body_out) != 3:
                    raise ValueError(f"Residual {self._auto!r} shortcut needs a (C, H, W) body output, got {body_out}")
                stride = tuple(max(1, -(-self.in_shape[k] // body_out[k])) for k in (1, 2))  # ⌈H / Ho⌉, ⌈W / Wo⌉
                if self._auto == "pad":
                    self.shortcut = [PadShortcut(body_out[0], stride)]
                else:
                    self.shortcut = [Conv2d(body_out[0], 1, stride=stride)] + ([BatchNorm()] if self.projection_bn else [])
            self._name_children()
        shape = self.in_shape
        for layer in self.shortcut:
            shape = layer.build(shape)
        if tuple(shape) != body_out:
            kind = "identity shortcut" if not self.shortcut else "shortcut"
            raise ValueError(
                f"Residual: the body maps {self.in_shape} → {body_out} but the {kind} gives {tuple(shape)}; "
                "use shortcut='pad' or a projection such as [Conv2d(C_out, 1, stride=s), BatchNorm()]"
            )
        if self.act is not None:
            self.act.build(body_out)
        self.out_shape = body_out
        self.couples_examples = any(l.couples_examples for l in self.body + self.shortcut)
        return self.out_shape

    def param_specs(self) -> list[ParamSpec]:
        self._name_children()
        specs: list[ParamSpec] = []
        self._counts = []
        for suffix, child in self._children():
            cs = child.param_specs()
            self._counts.append(len(cs))
            specs.extend(ParamSpec(f"{suffix}.{s.name}", s.shape, s.kind, s.fan) for s in cs)
        return specs

    def _split(self, views: Sequence[Any] | None) -> list[Any]:
        kids = self._children()
        if not self._counts or len(self._counts) != len(kids):
            self.param_specs()
        if views is None:
            return [None] * len(kids)
        out, k = [], 0
        for c in self._counts:
            out.append(list(views[k : k + c]))
            k += c
        return out

    def describe(self) -> str:
        inner = ", ".join(l.describe() for l in self.body)
        sc = "identity" if not self.shortcut else " → ".join(l.describe() for l in self.shortcut)
        act = f", {type(self.act).__name__}" if self.act is not None else ""
        return f"Residual[{inner} | {sc}{act}]"

    def child_caches(self, cache: Any) -> list[tuple[Layer, Any]]:
        """(child, cache) pairs of one forward cache (for :func:`qnref.nn.norm.update_batchnorm_stats`)."""
        body_c, short_c, act_c = cache
        pairs = list(zip(self.body, body_c)) + list(zip(self.shortcut, short_c))
        if self.act is not None:
            pairs.append((self.act, act_c))
        return pairs

    # -- passes ----------------------------------------------------------------------------------------
    def _groups(self, views):
        parts = self._split(views)
        nb, ns = len(self.body), len(self.shortcut)
        return parts[:nb], parts[nb : nb + ns]

    def forward(self, p: Sequence[Any], x: Any, ctx: Ctx) -> tuple[Any, Any]:
        pb, ps = self._groups(p)
        h, body_c = x, []
        for layer, pv in zip(self.body, pb):
            h, c = layer.forward(pv, h, ctx)
            body_c.append(c)
        s, short_c = x, []
        for layer, pv in zip(self.shortcut, ps):
            s, c = layer.forward(pv, s, ctx)
            short_c.append(c)
        z = h + s
        act_c = None
        if self.act is not None:
            z, act_c = self.act.forward([], z, ctx)
        return z, (body_c, short_c, act_c)

    @staticmethod
    def _chain_backward(layers, pviews, caches, g, gviews, need_gx, taps):
        for k in range(len(layers) - 1, -1, -1):
            layer = layers[k]
            extra = {}
            if taps is not None:
                if layer.has_kron:
                    taps[layer.name] = layer.kron_taps(caches[k], g)
                if layer.sublayers():
                    extra["taps"] = taps
            g = layer.backward(pviews[k], caches[k], g, gviews[k], need_gx=need_gx or k > 0, **extra)
        return g

    def backward(self, p, cache, gy, gp, need_gx: bool = True, taps: dict | None = None):
        body_c, short_c, act_c = cache
        g = gy if self.act is None else self.act.backward([], act_c, gy, None)
        pb, ps = self._groups(p)
        gb, gs = self._groups(gp) if gp is not None else ([None] * len(self.body), [None] * len(self.shortcut))
        gx_body = self._chain_backward(self.body, pb, body_c, g, gb, need_gx, taps)
        if not self.shortcut:
            gx_short = g
        else:
            gx_short = self._chain_backward(self.shortcut, ps, short_c, g, gs, need_gx, taps)
        return _add(gx_body, gx_short) if need_gx else None

    def jvp(self, p, cache, dx, dp):
        body_c, short_c, act_c = cache
        pb, ps = self._groups(p)
        db, ds = self._groups(dp) if dp is not None else ([None] * len(self.body), [None] * len(self.shortcut))
        d, body_r = dx, []
        for layer, pv, dv, c in zip(self.body, pb, db, body_c):
            d, rc = layer.jvp(pv, c, d, dv)
            body_r.append(rc)
        s, short_r = dx, []
        for layer, pv, dv, c in zip(self.shortcut, ps, ds, short_c):
            s, rc = layer.jvp(pv, c, s, dv)
            short_r.append(rc)
        dz = _add(d, s)
        act_r = None
        if self.act is not None:
            if dz is None:
                return None, (body_r, short_r, None)
            dz, act_r = self.act.jvp([], act_c, dz, None)
        return dz, (body_r, short_r, act_r)

    @staticmethod
    def _chain_rop(layers, pviews, caches, rcaches, g, rg, dviews, rviews, need_gx):
        for k in range(len(layers) - 1, -1, -1):
            g, rg = layers[k].backward_rop(pviews[k], caches[k], rcaches[k], g, rg, dviews[k], rviews[k], need_gx=need_gx or k > 0)
        return g, rg

    def backward_rop(self, p, cache, rcache, gy, rgy, dp, rgp, need_gx: bool = True):
        body_c, short_c, act_c = cache
        body_r, short_r, act_r = rcache
        if self.act is not None:
            g, rg = self.act.backward_rop([], act_c, act_r, gy, rgy, None, None)
        else:
            g, rg = gy, rgy
        pb, ps = self._groups(p)
        nones = ([None] * len(self.body), [None] * len(self.shortcut))
        db, ds = self._groups(dp) if dp is not None else nones
        rb, rs = self._groups(rgp) if rgp is not None else nones
        gxb, rgxb = self._chain_rop(self.body, pb, body_c, body_r, g, rg, db, rb, need_gx)
        if not self.shortcut:
            gxs, rgxs = g, rg
        else:
            gxs, rgxs = self._chain_rop(self.shortcut, ps, short_c, short_r, g, rg, ds, rs, need_gx)
        if not need_gx:
            return None, None
        return _add(gxb, gxs), _add(rgxb, rgxs)

    def per_example_grads(self, p, cache, gy, out):
        body_c, short_c, act_c = cache
        g = gy if self.act is None else self.act.per_example_grads([], act_c, gy, [])
        pb, ps = self._groups(p)
        ob, os_ = self._groups(out)
        gb = g
        for k in range(len(self.body) - 1, -1, -1):
            gb = self.body[k].per_example_grads(pb[k], body_c[k], gb, ob[k])
        gs = g
        for k in range(len(self.shortcut) - 1, -1, -1):
            gs = self.shortcut[k].per_example_grads(ps[k], short_c[k], gs, os_[k])
        return gb + gs


def basic_block(
    channels: int,
    stride: int = 1,
    *,
    shortcut: str = "pad",
    batchnorm: bool = True,
    activation: str = "relu",
    kernel_size: int = 3,
) -> Residual:
    """He et al. (2016) basic block: [conv k×k (stride) → BN → act → conv k×k → BN] + shortcut, then act.

    ``shortcut`` is used only where the block changes the shape (stride > 1 or more channels):
    "pad" (option A, parameter-free) or "projection" (option B: 1×1 conv with the stride, plus BN
    when ``batchnorm``); where the shape is kept the shortcut is the identity.
    """
    if shortcut not in ("pad", "projection"):
        raise ValueError(f"basic_block shortcut must be 'pad' or 'projection', got {shortcut!r}")
    pad = kernel_size // 2
    body: list[Layer] = [Conv2d(channels, kernel_size, stride=stride, padding=pad)]
    if batchnorm:
        body.append(BatchNorm())
    body += [make_activation(activation), Conv2d(channels, kernel_size, padding=pad)]
    if batchnorm:
        body.append(BatchNorm())
    return Residual(body, shortcut, activation=activation, projection_bn=batchnorm)
