"""Pooling on NCHW inputs: max, average and global average.

Max pooling is piecewise linear: on the piece selected by the forward pass it is the gather
y = x[argmax]. All four passes use that same selection, so the R-ops are exact wherever the
maximum of each window is unique (ties are broken towards the first element of the window in
row-major order, consistently in every pass):

- backward: scatter-add gy to the argmax positions (windows may overlap when stride < kernel);
- jvp: R{y} = dx[argmax] (a gather);
- backward_rop: (backward(gy), backward(R{gy})) — the second derivative is zero on each piece.

The cache holds the flat index of each window's winner in the *unpadded* input (padding is −∞
and at most half the kernel, so a winner is never a padding position); jvp is one gather and
backward one scatter-add into the input, with no padded buffer. On the CPU with numba the forward
pass (max and winner index in one fused pass) and the scatter-add run GIL-free kernels of
:mod:`qnref.nn._numba_fast` (ranges of image planes on the chunk thread pool; loaded by :func:`fast_kernels`). The
``xp`` twin, used on CuPy, without numba or with ``qnref.nn.conv.KERNELS = "xp"``, takes the
argmax of a strided window view and gathers; its scatter-add is a plain indexed assignment when
the windows do not overlap (stride ≥ kernel) and ``numpy.add.at`` otherwise (on CuPy the
assignment or ``cupyx.scatter_add``, GPU-tested only where a device is present).

Average pooling (zero padding counted in the mean, PyTorch's ``count_include_pad=True``) and global
average pooling are linear maps: jvp is the forward map of dx and backward_rop applies the
adjoint to gy and R{gy}.
"""
from __future__ import annotations

import types
from typing import Any

import numpy

from .. import backend
from . import conv as _conv
from .base import Ctx, Layer, Shape
from .conv import check_batch, check_image_shape, out_size, pad, pair, windows

def fast_kernels() -> types.ModuleType | None:
    """:mod:`qnref.nn._numba_fast` (BatchNorm and max-pool kernels), imported on first use; None when
    numba is unavailable or ``qnref.nn.conv.KERNELS == "xp"`` (the same switch as the conv kernels)."""
    return _conv.lazy_kernels("_numba_fast")


def use_fast(x: Any) -> bool:
    """True when the CPU kernels of :mod:`qnref.nn._numba_fast` should handle the NumPy array ``x``
    (float32 or float64)."""
    return (
        _conv.KERNELS != "xp"
        and isinstance(x, numpy.ndarray)
        and not backend.is_cupy_array(x)  # host memory only (also for ndarray-like device stand-ins)
        and x.dtype in (numpy.float32, numpy.float64)
        and fast_kernels() is not None
    )


def _check_window(who: str, in_shape: Shape, kernel, stride, padding) -> tuple[int, int]:
    check_image_shape(in_shape, who)
    _, h, w = in_shape
    (kh, kw), (ph, pw) = kernel, padding
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"{who}: padding {padding} must be at most half the kernel {kernel}")
    if kh > h + 2 * ph or kw > w + 2 * pw:
        raise ValueError(f"{who}: kernel {kh}×{kw} is larger than the padded input {h + 2 * ph}×{w + 2 * pw}")
    return out_size(h, kh, stride[0], ph), out_size(w, kw, stride[1], pw)


def maxpool_forward_xp(x: Any, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                       out_hw: tuple[int, int]) -> tuple[Any, Any]:
    """The array-API twin of the numba kernel ``maxpool_forward`` (NumPy and CuPy): argmax over a
    strided view of the −∞-padded input (N, C, H, W), then a gather. Returns y (N, C, Ho, Wo) and
    the flat index of each winner in the whole (N·C·H·W) input (first maximum wins, as argmax)."""
    xp = backend.namespace(x)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    ho, wo = out_hw
    hp, wp = h + 2 * ph, w + 2 * pw
    xpad = pad(x, ph, pw, value=-float("inf"))
    v = windows(xpad, kh, kw, sh, sw, ho, wo).reshape(n, c, ho, wo, kh * kw)
    a = v.argmax(axis=-1)
    # row and column of each winner in the unpadded input (never in the padding: padding ≤ k/2)
    rows = xp.arange(ho).reshape(ho, 1) * sh + a // kw - ph
    cols = xp.arange(wo).reshape(1, wo) * sw + a % kw - pw
    y = xpad.reshape(n * c, hp * wp)[xp.arange(n * c).reshape(n, c, 1, 1), (rows + ph) * wp + cols + pw]
    # flat index of the winner in the whole (N·C·H·W) input buffer
    gidx = rows * w + cols + (xp.arange(n * c) * (h * w)).reshape(n, c, 1, 1)
    return y, gidx


def scatter_add_xp(out: Any, idx: Any, g: Any) -> Any:
    """``out[idx] += g`` with repeated indices accumulated: ``numpy.add.at`` on NumPy,
    ``cupyx.scatter_add`` on CuPy (the array-API twin of the numba kernel ``index_add``). Returns ``out``."""
    if backend.is_cupy_array(out):
        import cupyx  # noqa: PLC0415 - lazy, GPU only

        cupyx.scatter_add(out, idx, g)
    else:
        numpy.add.at(out, idx, g)
    return out


def unpool_xp(g: Any, idx: Any, size: int, disjoint: bool) -> Any:
    """Max-pool backward on NumPy/CuPy (the twin of ``maxpool_backward``): the flat gradients ``g``
    added at the flat winner indices ``idx`` of a zero (``size``,) array; a plain assignment when
    the windows are ``disjoint`` (stride ≥ kernel: the winners are distinct)."""
    xp = backend.namespace(g)
    out = xp.zeros(size, dtype=g.dtype)
    if disjoint:
        out[idx] = g
        return out
    return scatter_add_xp(out, idx, g)


class _Pool2d(Layer):
    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0):
        self.kernel_size = pair(kernel_size, f"{type(self).__name__} kernel_size", 1)
        self.stride = self.kernel_size if stride is None else pair(stride, f"{type(self).__name__} stride", 1)
        self.padding = pair(padding, f"{type(self).__name__} padding", 0)

    def build(self, in_shape: Shape) -> Shape:
        ho, wo = _check_window(self.describe(), tuple(in_shape), self.kernel_size, self.stride, self.padding)
        self.in_shape = tuple(int(d) for d in in_shape)
        self.out_shape = (self.in_shape[0], ho, wo)
        return self.out_shape

    def describe(self) -> str:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        s = f"{type(self).__name__}({kh}×{kw}"
        if (sh, sw) != (kh, kw):
            s += f", stride {sh}" if sh == sw else f", stride ({sh},{sw})"
        if (ph, pw) != (0, 0):
            s += f", pad {ph}" if ph == pw else f", pad ({ph},{pw})"
        return s + ")"

    def per_example_grads(self, p, cache, gy, out):
        return self.backward(p, cache, gy, None)


class MaxPool2d(_Pool2d):
    """Max pooling over kh × kw windows (stride defaults to the kernel; padding counts as −∞)."""

    def forward(self, p, x: Any, ctx: Ctx):
        check_batch(x, self.in_shape, self.describe())
        if use_fast(x):
            return self._forward_fast(x)
        return self._forward_xp(x)

    def _forward_fast(self, x: Any):
        """Fused max + winner index, parallel over the N·C planes (:mod:`qnref.nn._numba_fast`)."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        n, c, h, w = x.shape
        _, ho, wo = self.out_shape
        y = numpy.empty((n, c, ho, wo), dtype=x.dtype)
        gidx = numpy.empty((n, c, ho, wo), dtype=numpy.intp)
        k = fast_kernels()
        x3, y3, i3 = numpy.ascontiguousarray(x).reshape(n * c, h, w), y.reshape(n * c, ho, wo), gidx.reshape(n * c, ho, wo)
        k.run_split(n * c, lambda lo, hi: k.maxpool_forward(x3, kh, kw, sh, sw, ph, pw, y3, i3, lo, hi))
        return y, (gidx, x.shape)

    def _forward_xp(self, x: Any):
        """The NumPy/CuPy twin (:func:`maxpool_forward_xp`)."""
        y, gidx = maxpool_forward_xp(x, self.kernel_size, self.stride, self.padding, self.out_shape[1:])
        return y, (gidx, x.shape)

    def _scatter(self, cache, gy):
        gidx, x_shape = cache
        xp = backend.namespace(gy)
        size = 1
        for d in x_shape:
            size *= d
        if use_fast(gy) and gidx.dtype == numpy.intp and gy.size:
            # planes split among threads: the winners of plane r all lie in plane r (race-free for any stride)
            planes = x_shape[0] * x_shape[1]
            out = numpy.empty((planes, size // planes), dtype=gy.dtype)
            k = fast_kernels()
            g2, i2 = numpy.ascontiguousarray(gy).reshape(planes, -1), numpy.ascontiguousarray(gidx).reshape(planes, -1)
            if sum(k.run_split(planes, lambda lo, hi: k.maxpool_backward(g2, i2, out, lo, hi))) == 0:
                return out.reshape(x_shape)
            # (an xp-path cache whose winner sits outside its plane: only when x holds −∞ next to padding)
        g, idx = xp.ascontiguousarray(gy).reshape(-1), gidx.reshape(-1)
        if _conv.use_numba(gy):
            out = _conv.numba_kernels().index_add(g.reshape(1, -1), idx.reshape(1, -1), xp.zeros((1, size), dtype=gy.dtype))
        else:
            disjoint = self.stride[0] >= self.kernel_size[0] and self.stride[1] >= self.kernel_size[1]
            out = unpool_xp(g, idx, size, disjoint)
        return out.reshape(x_shape)

    def backward(self, p, cache, gy, gp, need_gx: bool = True):
        return self._scatter(cache, gy) if need_gx else None

    def jvp(self, p, cache, dx, dp):
        if dx is None:
            return None, None
        return dx.reshape(-1)[cache[0]], None

    def backward_rop(self, p, cache, rcache, gy, rgy, dp, rgp, need_gx: bool = True):
        if not need_gx:
            return None, None
        return self._scatter(cache, gy), self._scatter(cache, rgy)


class AvgPool2d(_Pool2d):
    """Average pooling over kh × kw windows (zero padding counted in the mean). A linear map."""

    def _apply(self, x: Any) -> Any:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        _, ho, wo = self.out_shape
        v = windows(pad(x, ph, pw), kh, kw, sh, sw, ho, wo)
        return v.sum(axis=(4, 5)) * (1.0 / (kh * kw))

    def _adjoint(self, g: Any) -> Any:
        xp = backend.namespace(g)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        n, c, ho, wo = g.shape
        h, w = self.in_shape[1:]
        out = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=g.dtype)
        gs = g * (1.0 / (kh * kw))
        for i in range(kh):
            for j in range(kw):
                out[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw] += gs
        if ph or pw:
            out = xp.ascontiguousarray(out[:, :, ph : ph + h, pw : pw + w])
        return out

    def forward(self, p, x, ctx: Ctx):
        check_batch(x, self.in_shape, self.describe())
        return self._apply(x), None

    def backward(self, p, cache, gy, gp, need_gx: bool = True):
        return self._adjoint(gy) if need_gx else None

    def jvp(self, p, cache, dx, dp):
        return (None if dx is None else self._apply(dx)), None

    def backward_rop(self, p, cache, rcache, gy, rgy, dp, rgp, need_gx: bool = True):
        if not need_gx:
            return None, None
        return self._adjoint(gy), self._adjoint(rgy)


class GlobalAvgPool(Layer):
    """(N, C, H, W) → (N, C): the mean over all spatial positions (ResNets, all-CNN-C)."""

    def build(self, in_shape: Shape) -> Shape:
        check_image_shape(tuple(in_shape), "GlobalAvgPool")
        self.in_shape = tuple(int(d) for d in in_shape)
        self.out_shape = (self.in_shape[0],)
        return self.out_shape

    def _adjoint(self, g: Any) -> Any:
        xp = backend.namespace(g)
        _, h, w = self.in_shape
        return g[:, :, None, None] * xp.full((1, 1, h, w), 1.0 / (h * w), dtype=g.dtype)

    def forward(self, p, x, ctx: Ctx):
        check_batch(x, self.in_shape, "GlobalAvgPool")
        return x.mean(axis=(2, 3)), None

    def backward(self, p, cache, gy, gp, need_gx: bool = True):
        return self._adjoint(gy) if need_gx else None

    def jvp(self, p, cache, dx, dp):
        return (None if dx is None else dx.mean(axis=(2, 3))), None

    def backward_rop(self, p, cache, rcache, gy, rgy, dp, rgp, need_gx: bool = True):
        if not need_gx:
            return None, None
        return self._adjoint(gy), self._adjoint(rgy)

    def per_example_grads(self, p, cache, gy, out):
        return self._adjoint(gy)
