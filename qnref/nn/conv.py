"""2-D convolution on NCHW inputs by im2col (sliding windows) and one (batched) GEMM.

Notation (Ren's thesis §3.2.1, Grosse & Martens 2016 "KFC"): a layer with C_in input channels,
C_out output channels and kh × kw filters maps x (N, C_in, H, W) to h (N, C_out, Ho, Wo) with
Ho = ⌊(H + 2 ph − kh) / sh⌋ + 1 (same for the width). Its L = Ho·Wo output locations t each see
one patch of K = C_in·kh·kw inputs, flattened channel-major (c, i, j) — the order of
``W.reshape(C_out, C_in, kh, kw)`` in PyTorch — and extended by a homogeneous 1:

    āₜ = [x_{c, t_h·sh + i − ph, t_w·sw + j − pw} for c, i, j ; 1] ∈ R^{K+1},
    hₜ = W̄ āₜ,       W̄ = [W b] ∈ R^{C_out × (K+1)}   (bias = last column).

So the layer is one GEMM of W̄ with the homogeneous patch matrices. The forward cache is the
(contiguous) input x itself, as in PyTorch: patches are rebuilt where a pass needs them. On the
CPU the forward and backward passes run over chunks of examples whose (K, n·L) patch block
(:func:`im2col_t`, columns ordered (example, location)) is about ``CHUNK_BYTES``: im2col, the
GEMMs and col2im of a chunk run back to back while the block is in cache, chunks run in parallel
threads (:mod:`qnref.nn.chunks`), and ∂/∂W̄ is summed over chunks in chunk order. Memory is
O(input) per layer instead of O(K·N·L) for stored patches (9× the input for 3×3 kernels).
jvp/backward_rop/per-example passes use the per-example (N, K, L) patches of :func:`im2col`.
The parameter block is ``W̄`` of shape (C_out, K + 1), ParamSpec kind "weight",
fan = (C_in·kh·kw, C_out·kh·kw).

Passes
------
- backward: ∂ℓ/∂W̄ = Σ_{i,t} g_{i,t} ā_{i,t}ᵀ with g = ∂ℓ/∂h; gx = col2im(Wᵀ g) (scatter-add of
  the patch gradients back to the pixels they came from);
- jvp: R{Hᵢ} = W im2col(dx)ᵢ + dW Āᵢ + db (the layer is bilinear in (x, W̄));
- backward_rop: R{gW̄} = Σ R{g} āᵀ + Σ g R{ā}ᵀ (the g ⊗ dx cross term, R{ā} = [im2col(dx); 0]),
  R{gx} = col2im(Wᵀ R{g} + dWᵀ g);
- per_example_grads: Σₜ g_{i,t} ā_{i,t}ᵀ per example (a batched GEMM over the locations);
- kron_taps: ``{"kind": "conv", "a": ā (N, L, K+1), "g": g (N, L, C_out)}`` — raw, per example
  and per location, *not* averaged. With them the mean-loss gradient is
  ∂f/∂W̄ = (1/N) Σᵢ Σₜ g_{i,t} ā_{i,t}ᵀ when g is taken per example (``Objective.layer_stats``).
  The KFC factors of Grosse & Martens (2016) and Ren's thesis eq. (3.9) are
  A = Eᵢ[Σₜ āₜ āₜᵀ] (sum over locations) and G = Eᵢ[(1/L) Σₜ gₜ gₜᵀ] (mean over locations);
  the Kronecker module chooses and documents the reduction, the taps stay raw.

im2col/col2im run numba kernels on the CPU (when numba imports) and strided views / a loop over
the kh·kw kernel offsets with strided slice adds otherwise — the same code on NumPy and CuPy (the CuPy path is
correct by construction and exercised in the GPU tests only when a device is present).
See docs/cnn.md for timings.
"""
from __future__ import annotations

import importlib
import types
from collections.abc import Mapping
from typing import Any, Callable, Sequence

from .. import backend
from .base import Ctx, Layer, ParamSpec, Shape
from .chunks import example_chunks, map_chunks

#: "auto" (numba on the CPU when it imports), "numba" (require it) or "xp" (pure NumPy/CuPy path).
KERNELS = "auto"

#: "im2col" (default) or "winograd": on the CPU (numba), stride-1 3×3 convolutions with padding ≤ 2
#: then run the forward pass and the input gradient by Winograd's minimal filtering F(2×2, 3×3)
#: (Lavin & Gray 2016; :func:`winograd_conv`) — 16 instead of 36 multiplications per 2×2 output tile
#: and channel pair, exact in exact arithmetic, a different rounding (docs/cnn.md). The weight
#: gradient keeps the im2col GEMM.
ALGORITHM = "im2col"

#: CPU forward/backward work on example chunks whose (K, n·L) patch block has about this many
#: bytes, so im2col, the GEMMs and col2im of a chunk share the cache (docs/cnn.md: measured).
CHUNK_BYTES = 1 << 21

_kernel_modules: dict[str, types.ModuleType | None] = {}


def lazy_kernels(module: str) -> types.ModuleType | None:
    """The numba kernel module ``qnref.nn.<module>``, imported on first use (numba is heavy and
    ``import qnref`` must not load it); None when numba is unavailable or ``KERNELS == "xp"``."""
    if KERNELS == "xp":
        return None
    if module not in _kernel_modules:
        try:
            _kernel_modules[module] = importlib.import_module(f"{__package__}.{module}")
        except Exception:  # numba missing or broken
            _kernel_modules[module] = None
    if _kernel_modules[module] is None and KERNELS == "numba":
        raise RuntimeError("qnref.nn.conv.KERNELS = 'numba' but numba could not be imported")
    return _kernel_modules[module]


def numba_kernels() -> types.ModuleType | None:
    """The im2col/col2im/index_add kernels (:mod:`qnref.nn._numba_kernels`), see :func:`lazy_kernels`."""
    return lazy_kernels("_numba_kernels")


def use_numba(x: Any) -> bool:
    """True when the CPU numba kernels should handle ``x``."""
    return KERNELS != "xp" and not backend.is_cupy_array(x) and numba_kernels() is not None


# -- shape helpers ----------------------------------------------------------------------------
def pair(v: Any, what: str, minimum: int) -> tuple[int, int]:
    """(a, b) from an int or a pair of ints, each ≥ ``minimum``."""
    vals = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(vals) != 2 or any(int(a) != a or a < minimum for a in vals):
        raise ValueError(f"{what} must be an integer ≥ {minimum} or a pair of them, got {v!r}")
    return int(vals[0]), int(vals[1])


def check_image_shape(in_shape: Shape, who: str) -> None:
    """Raise a clear error unless the per-example shape is (C, H, W)."""
    if len(in_shape) != 3:
        hint = " (insert a Reshape/Unflatten before it, or use Dense for flat inputs)" if len(in_shape) == 1 else ""
        raise ValueError(f"{who} needs per-example inputs of shape (C, H, W) in NCHW layout, got {tuple(in_shape)}{hint}")


def check_batch(x: Any, in_shape: Shape, who: str) -> None:
    """Raise a clear error when a batch does not match the shape the layer was built for."""
    if getattr(x, "ndim", None) != len(in_shape) + 1:
        raise ValueError(f"{who} expects a batch of shape (N, {', '.join(map(str, in_shape))}), got {tuple(getattr(x, 'shape', ()))}")
    if tuple(x.shape[1:]) != tuple(in_shape):
        if len(in_shape) == 3 and x.shape[1] != in_shape[0]:
            extra = ""
            if x.shape[-1] == in_shape[0]:
                extra = " — the input looks channels-last (NHWC); qnref uses NCHW, transpose with x.transpose(0, 3, 1, 2)"
            raise ValueError(f"{who}: channel mismatch, built for {in_shape[0]} input channels, got {x.shape[1]} (input shape {tuple(x.shape)}){extra}")
        raise ValueError(f"{who} was built for per-example shape {tuple(in_shape)}, got {tuple(x.shape[1:])}")


def out_size(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def pad(x: Any, ph: int, pw: int, value: float = 0.0) -> Any:
    """Zero (or ``value``) padding of the two spatial axes; a contiguous array either way."""
    xp = backend.namespace(x)
    if ph == 0 and pw == 0:
        return xp.ascontiguousarray(x)
    out = xp.full(x.shape[:2] + (x.shape[2] + 2 * ph, x.shape[3] + 2 * pw), value, dtype=x.dtype)
    out[:, :, ph : ph + x.shape[2], pw : pw + x.shape[3]] = x
    return out


def windows(xpad: Any, kh: int, kw: int, sh: int, sw: int, ho: int, wo: int) -> Any:
    """Read-only strided view (N, C, Ho, Wo, kh, kw) of the sliding windows of a contiguous array."""
    xp = backend.namespace(xpad)
    s0, s1, s2, s3 = xpad.strides
    return xp.lib.stride_tricks.as_strided(
        xpad, shape=(xpad.shape[0], xpad.shape[1], ho, wo, kh, kw), strides=(s0, s1, s2 * sh, s3 * sw, s2, s3)
    )


def im2col(x: Any, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> Any:
    """Per-example patch matrices (N, K, L): K = C·kh·kw rows ordered (c, i, j), L = Ho·Wo
    columns ordered (oh, ow). One strided view of the padded input and one copy."""
    n, c, h, w = x.shape
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    v = windows(pad(x, ph, pw), kh, kw, sh, sw, ho, wo)  # (N, C, Ho, Wo, kh, kw)
    return v.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)


def scatter_windows_xp(g6: Any, xpad_shape: tuple, sh: int, sw: int) -> Any:
    """Σ over windows: g6 (N, C, kh, kw, Ho, Wo) added into zeros(xpad_shape). NumPy and CuPy."""
    xp = backend.namespace(g6)
    out = xp.zeros(xpad_shape, dtype=g6.dtype)
    _, _, kh, kw, ho, wo = g6.shape
    for i in range(kh):
        for j in range(kw):
            out[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw] += g6[:, :, i, j]
    return out


def col2im(gcols: Any, x_shape: tuple, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> Any:
    """Adjoint of :func:`im2col`: scatter-add (N, K, L) patch gradients to (N, C, H, W)."""
    if use_numba(gcols):
        xp, (n, c, h, w) = backend.namespace(gcols), x_shape
        g6 = xp.ascontiguousarray(gcols).reshape(n, c, kh, kw, out_size(h, kh, sh, ph), out_size(w, kw, sw, pw))
        return numba_kernels().col2im(g6, xp.zeros(x_shape, dtype=gcols.dtype), sh, sw, ph, pw)
    return col2im_xp(gcols, x_shape, kh, kw, sh, sw, ph, pw)


def col2im_xp(gcols: Any, x_shape: tuple, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> Any:
    """The array-API twin of the numba kernel ``col2im`` (NumPy and CuPy): strided slice adds over
    the kh·kw kernel offsets into the padded image, then the unpadded part."""
    n, c, h, w = x_shape
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    xp = backend.namespace(gcols)
    g6 = xp.ascontiguousarray(gcols).reshape(n, c, kh, kw, ho, wo)
    out = scatter_windows_xp(g6, (n, c, h + 2 * ph, w + 2 * pw), sh, sw)
    if ph or pw:
        out = xp.ascontiguousarray(out[:, :, ph : ph + h, pw : pw + w])
    return out


def im2col_t(x: Any, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, *, homogeneous: bool = False) -> Any:
    """All patches as one (K, N·L) matrix (rows (c, i, j), columns (n, oh, ow)): the layout of the
    forward cache, so that the forward pass and the weight gradient are single GEMMs over the batch.
    ``im2col_t(x).reshape(K, N, L).transpose(1, 0, 2)`` equals :func:`im2col` (a view).
    ``homogeneous``: the (K + 1, N·L) matrix of the ā with their trailing 1 (built in place)."""
    n, c, h, w = x.shape
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    xp = backend.namespace(x)
    K, cols = c * kh * kw, n * ho * wo
    if use_numba(x):
        buf = xp.empty((K + int(homogeneous), cols), dtype=x.dtype)
        numba_kernels().im2col_t(xp.ascontiguousarray(x), buf[:K].reshape(c, kh, kw, n, ho, wo), sh, sw, ph, pw)
    elif homogeneous:
        buf = xp.empty((K + 1, cols), dtype=x.dtype)
        buf[:K] = im2col_t_xp(x, kh, kw, sh, sw, ph, pw)
    else:
        return im2col_t_xp(x, kh, kw, sh, sw, ph, pw)
    if homogeneous:
        buf[K] = 1
    return buf


def im2col_t_xp(x: Any, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> Any:
    """The array-API twin of the numba kernel ``im2col_t`` (NumPy and CuPy): one strided view of
    the padded input, transposed to the (K, N·L) layout and copied."""
    n, c, h, w = x.shape
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    v = windows(pad(x, ph, pw), kh, kw, sh, sw, ho, wo)  # (N, C, Ho, Wo, kh, kw)
    return v.transpose(1, 4, 5, 0, 2, 3).reshape(c * kh * kw, n * ho * wo)


def col2im_t(gcols: Any, x_shape: tuple, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, out: Any = None) -> Any:
    """Adjoint of :func:`im2col_t`: scatter-add (K, N·L) patch gradients to (N, C, H, W).
    ``out``: optional zero-initialised contiguous destination of shape ``x_shape`` (returned)."""
    if not use_numba(gcols):
        full = col2im_t_xp(gcols, x_shape, kh, kw, sh, sw, ph, pw)
        if out is None:
            return full
        out[...] = full
        return out
    n, c, h, w = x_shape
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    xp = backend.namespace(gcols)
    g6t = xp.ascontiguousarray(gcols).reshape(c, kh, kw, n, ho, wo)
    if out is None:
        out = xp.zeros((n, c, h, w), dtype=gcols.dtype)
    return numba_kernels().col2im_t(g6t, out, sh, sw, ph, pw)


def col2im_t_xp(gcols: Any, x_shape: tuple, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> Any:
    """The array-API twin of the numba kernel ``col2im_t`` (NumPy and CuPy): strided slice adds
    over the kh·kw kernel offsets into the padded image, then the unpadded part (a new array)."""
    n, c, h, w = x_shape
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    xp = backend.namespace(gcols)
    g6t = xp.ascontiguousarray(gcols).reshape(c, kh, kw, n, ho, wo)
    full = scatter_windows_xp(g6t.transpose(3, 0, 1, 2, 4, 5), (n, c, h + 2 * ph, w + 2 * pw), sh, sw)
    return xp.ascontiguousarray(full[:, :, ph : ph + h, pw : pw + w]) if ph or pw else full


# -- Winograd F(2×2, 3×3) -----------------------------------------------------------------------------
#: the filter transform G of F(2×2, 3×3) (Lavin & Gray 2016, eq. 7): U = G g Gᵀ for a 3×3 filter g
WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_filters(w4: Any) -> Any:
    """U (16, C_out, C_in): U[4a + b, o, c] = (G w4[o, c] Gᵀ)_ab, formed in float64 and rounded once."""
    import numpy  # noqa: PLC0415 - CPU route only

    G = numpy.array(WINOGRAD_G)
    U = numpy.einsum("ai,ocij,bj->aboc", G, w4.astype(numpy.float64), G)
    return numpy.ascontiguousarray(U.reshape(16, w4.shape[0], w4.shape[1]).astype(w4.dtype))


def winograd_conv(x: Any, w4: Any, bias: Any, ph: int, pw: int, out: Any = None) -> Any:
    """Correlation of x (N, C, H, W) with 3×3 filters w4 (C_out, C, 3, 3), stride 1, zero padding
    (ph, pw) ≤ 2, plus ``bias`` (C_out,), by Winograd's F(2×2, 3×3) on the CPU: per chunk of
    examples the input tiles Bᵀ d B (numba), 16 GEMMs U_ξ V_ξ over the channels (one batched
    ``matmul``), the output transform Aᵀ M A + b (numba). Chunks as in the im2col route
    (``CHUNK_BYTES`` of transformed input each, on the chunk threads); results do not depend on
    the thread count."""
    import numpy  # noqa: PLC0415

    n, c, h, w = x.shape
    co = w4.shape[0]
    ho, wo = h + 2 * ph - 2, w + 2 * pw - 2
    th, tw = (ho + 1) // 2, (wo + 1) // 2
    T = th * tw
    U = winograd_filters(w4)
    b = numpy.ascontiguousarray(bias, dtype=x.dtype)
    if out is None:
        out = numpy.empty((n, co, ho, wo), dtype=x.dtype)
    k = numba_kernels()
    x = numpy.ascontiguousarray(x)

    def chunk(a: int, e: int) -> None:
        V = numpy.empty((16, c, (e - a) * T), dtype=x.dtype)
        k._wino_input(x, V, a, e, ph, pw, th, tw)
        k._wino_output(numpy.matmul(U, V), b, out, a, e, th, tw)

    map_chunks(chunk, example_chunks(x, 16 * c * T * x.dtype.itemsize, CHUNK_BYTES))
    return out


def _sum_outer(g: Any, cols: Any) -> Any:
    """Σᵢ gᵢ colsᵢᵀ over the examples, for g (N, C_out, L) and cols (N, K, L): (C_out, K)."""
    return (g @ cols.transpose(0, 2, 1)).sum(axis=0)


class Conv2d(Layer):
    """Convolution h = W̄ ∗ [x; 1] on NCHW inputs (see the module docstring for the conventions).

    Parameters
    ----------
    out_channels:
        number of filters C_out.
    kernel_size, stride, padding:
        ints or (height, width) pairs; zero padding on both sides.
    in_channels:
        optional; when given, :meth:`build` checks it against the input shape.
    """

    kron_dense = False
    has_kron = True

    def __init__(self, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0, *, in_channels: int | None = None):
        if int(out_channels) != out_channels or out_channels < 1:
            raise ValueError(f"Conv2d out_channels must be a positive integer, got {out_channels!r}")
        self.out_channels = int(out_channels)
        self.kernel_size = pair(kernel_size, "Conv2d kernel_size", 1)
        self.stride = pair(stride, "Conv2d stride", 1)
        self.padding = pair(padding, "Conv2d padding", 0)
        self.in_channels = in_channels

    # -- set-up ---------------------------------------------------------------------------------
    def build(self, in_shape: Shape) -> Shape:
        who = self.describe()
        check_image_shape(in_shape, who)
        c, h, w = (int(d) for d in in_shape)
        if self.in_channels is not None and self.in_channels != c:
            raise ValueError(f"{who}: channel mismatch, declared in_channels={self.in_channels} but the input has {c} channels (shape {tuple(in_shape)})")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if kh > h + 2 * ph or kw > w + 2 * pw:
            raise ValueError(f"{who}: kernel {kh}×{kw} is larger than the padded input {h + 2 * ph}×{w + 2 * pw} (input {h}×{w}, padding {ph},{pw})")
        self.in_shape = (c, h, w)
        self.out_shape = (self.out_channels, out_size(h, kh, sh, ph), out_size(w, kw, sw, pw))
        return self.out_shape

    @property
    def patch_size(self) -> int:
        """K = C_in·kh·kw (without the homogeneous coordinate)."""
        return self.in_shape[0] * self.kernel_size[0] * self.kernel_size[1]

    def param_specs(self) -> list[ParamSpec]:
        kk = self.kernel_size[0] * self.kernel_size[1]
        k = self.patch_size
        return [ParamSpec("W", (self.out_channels, k + 1), "weight", (k, self.out_channels * kk))]

    def describe(self) -> str:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        cin = self.in_shape[0] if self.in_shape else "?"
        extra = ""
        if (sh, sw) != (1, 1):
            extra += f", stride {sh}" if sh == sw else f", stride ({sh},{sw})"
        if (ph, pw) != (0, 0):
            extra += f", pad {ph}" if ph == pw else f", pad ({ph},{pw})"
        return f"Conv2d({cin}→{self.out_channels}, {kh}×{kw}{extra})"

    # -- helpers ----------------------------------------------------------------------------------
    def _im2col(self, x: Any) -> Any:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return im2col(x, kh, kw, sh, sw, ph, pw)

    def _col2im(self, gcols: Any, n: int) -> Any:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return col2im(gcols, (n,) + self.in_shape, kh, kw, sh, sw, ph, pw)

    def _patches_t(self, x: Any, homogeneous: bool = False) -> Any:
        """(K, n·L) patch matrix of a (sub-)batch x (columns ordered (example, location));
        ``homogeneous``: (K + 1, n·L) with the row of ones."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return im2col_t(x, kh, kw, sh, sw, ph, pw, homogeneous=homogeneous)

    def _cols(self, x: Any) -> Any:
        """Per-example (N, K, L) patch matrices of the cached input (a view of one (K, N·L) copy)."""
        L = self.out_shape[1] * self.out_shape[2]
        return self._patches_t(x).reshape(self.patch_size, -1, L).transpose(1, 0, 2)

    def _chunks(self, x: Any) -> list[tuple[int, int]]:
        """Example ranges whose (K, n·L) patch block is about ``CHUNK_BYTES``."""
        per_example = self.patch_size * self.out_shape[1] * self.out_shape[2] * x.dtype.itemsize
        return example_chunks(x, per_example, CHUNK_BYTES)

    def _affine(self, cols: Any, wb: Any) -> Any:
        """W̄ applied to the homogeneous patches: (N, C_out, L)."""
        y = wb[:, :-1] @ cols
        y += wb[:, -1:]
        return y

    def _flat(self, g: Any) -> Any:
        """(N, C_out, Ho, Wo) → (N, C_out, L) (a view for contiguous g)."""
        return g.reshape(g.shape[0], self.out_channels, -1)

    def _winograd(self, x: Any) -> bool:
        """Whether the Winograd route serves this layer and array (``ALGORITHM``, 3×3, stride 1,
        padding ≤ 2, CPU numba)."""
        if ALGORITHM not in ("im2col", "winograd"):
            raise ValueError(f"qnref.nn.conv.ALGORITHM must be 'im2col' or 'winograd', got {ALGORITHM!r}")
        return (ALGORITHM == "winograd" and self.kernel_size == (3, 3) and self.stride == (1, 1)
                and max(self.padding) <= 2 and use_numba(x))

    def _w4(self, wb: Any) -> Any:
        """The weights as (C_out, C_in, kh, kw) (a copy without the bias column)."""
        (kh, kw) = self.kernel_size
        return backend.namespace(wb).ascontiguousarray(wb[:, :-1]).reshape(self.out_channels, self.in_shape[0], kh, kw)

    # -- passes -----------------------------------------------------------------------------------
    def forward(self, p: Sequence[Any], x: Any, ctx: Ctx) -> tuple[Any, Any]:
        check_batch(x, self.in_shape, self.describe())
        xp = backend.namespace(x)
        x = xp.ascontiguousarray(x)
        if self._winograd(x):
            return winograd_conv(x, self._w4(p[0]), p[0][:, -1], *self.padding), x
        n, co = x.shape[0], self.out_channels
        w, b = p[0][:, :-1], p[0][:, -1:]
        out = xp.empty((n,) + self.out_shape, dtype=x.dtype)
        out3 = self._flat(out)

        def chunk(a: int, e: int) -> None:  # patches built and consumed while they are in cache
            y = w @ self._patches_t(x[a:e])  # (C_out, n·L)
            y += b
            out3[a:e] = y.reshape(co, e - a, -1).transpose(1, 0, 2)

        map_chunks(chunk, self._chunks(x))
        return out, x  # the cache is the input; patches are rebuilt where needed

    def backward(self, p, cache, gy, gp, need_gx: bool = True):
        x, w = cache, p[0][:, :-1]
        xp = backend.namespace(gy)
        n, co = gy.shape[0], self.out_channels
        g3 = self._flat(gy)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        wino = need_gx and self._winograd(gy)
        if wino:  # gx = gy ⋆ (flipped, transposed W) with padding 2 − p: the same Winograd route
            w4 = self._w4(p[0])
            wf = xp.ascontiguousarray(w4.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
            gx = winograd_conv(xp.ascontiguousarray(gy), wf, xp.zeros(self.in_shape[0], dtype=gy.dtype), 2 - ph, 2 - pw)
            if gp is None:
                return gx
        else:  # zeroed chunk by chunk below, on the chunk's thread and just before its scatter-add
            gx = xp.empty((n,) + self.in_shape, dtype=gy.dtype) if need_gx else None

        def chunk(a: int, e: int) -> Any:
            g_t = xp.ascontiguousarray(g3[a:e].transpose(1, 0, 2)).reshape(co, -1)  # (C_out, n·L)
            if need_gx and not wino:
                dst = gx[a:e]
                dst.fill(0)                 # in parallel and in cache (a serial memset was 2 % of a gradient)
                col2im_t(w.T @ g_t, (e - a,) + self.in_shape, kh, kw, sh, sw, ph, pw, out=dst)
            # this chunk's ∂/∂Wᵀ: the (K, C_out) product is BLAS's fast orientation here
            return self._patches_t(x[a:e]) @ g_t.T if gp is not None else None

        parts = map_chunks(chunk, self._chunks(x))
        if gp is not None:
            gwt = parts[0]
            for part in parts[1:]:  # chunk order: independent of the thread count
                gwt += part
            gp[0][:, :-1] = gwt.T
            gp[0][:, -1] = g3.sum(axis=(0, 2))
        return gx

    def jvp(self, p, cache, dx, dp):
        cols, wb = self._cols(cache), p[0]
        n = cols.shape[0]
        dy = None
        if dp:
            dy = self._affine(cols, dp[0])
        dcols = None
        if dx is not None:
            dcols = self._im2col(dx)
            t = wb[:, :-1] @ dcols
            dy = t if dy is None else dy + t
        if dy is None:  # neither input nor parameters move
            return backend.namespace(cols).zeros((n,) + self.out_shape, dtype=cols.dtype), (cols, None)
        return dy.reshape((n,) + self.out_shape), (cols, dcols)

    def backward_rop(self, p, cache, rcache, gy, rgy, dp, rgp, need_gx: bool = True):
        # gx = col2im(Wᵀ g);  R{gx} = col2im(Wᵀ R{g} + dWᵀ g)
        # R{gW̄} = Σ R{g} āᵀ + Σ g R{ā}ᵀ, with R{ā} = [im2col(dx); 0]
        (cols, dcols), w = rcache, p[0][:, :-1]
        g, rg = self._flat(gy), self._flat(rgy)
        if rgp:
            rgw = _sum_outer(rg, cols)
            if dcols is not None:
                rgw += _sum_outer(g, dcols)
            rgp[0][:, :-1] = rgw
            rgp[0][:, -1] = rg.sum(axis=(0, 2))
        if not need_gx:
            return None, None
        n = gy.shape[0]
        rgc = w.T @ rg
        if dp:
            rgc += dp[0][:, :-1].T @ g
        return self._col2im(w.T @ g, n), self._col2im(rgc, n)

    def per_example_grads(self, p, cache, gy, out):
        cols = self._cols(cache)
        g = self._flat(gy)
        out[0][:, :, :-1] = g @ cols.transpose(0, 2, 1)
        out[0][:, :, -1] = g.sum(axis=2)
        return self._col2im(p[0][:, :-1].T @ g, gy.shape[0])

    def kron_taps(self, cache, gy):
        """Raw KFC taps: ā (N, L, K+1) with a homogeneous 1 and g (N, L, C_out), per location,
        as a :class:`ConvTap` that streams them chunk by chunk."""
        return ConvTap(self, cache, gy)


class ConvTap(Mapping):
    """The KFC taps of one conv layer without their (N, L, K+1) patch tensor (issue 21).

    Holds the layer's cached input x and the output gradient g (N, C_out, Ho, Wo), no copies. The
    reductions of :mod:`qnref.curvature.kron` (factors, â, the A-action, ∂W̄) ask for
    :meth:`map_row_blocks`: per chunk of examples the homogeneous patches are rebuilt (as in the
    backward pass) and handed over as row blocks ā (n·L, K+1) and g (n·L, C_out), rows ordered
    (example, location) — the rows of ``tap["a"].reshape(-1, K+1)``. Memory is one chunk instead of
    9× the input per 3×3 layer (ResNet-20, batch 128: ≈ 0.8 GB of patches for all layers).
    ``tap["a"]`` still builds the full tensor (type-2 taps, Gram matrices, BackPACK factors);
    ``tap["g"]`` is a (N, L, C_out) view."""

    def __init__(self, layer: "Conv2d", x: Any, gy: Any):
        self.layer, self.x, self.gy = layer, x, gy
        self.n = int(x.shape[0])
        self.locations = int(layer.out_shape[1] * layer.out_shape[2])

    def __getitem__(self, key: str) -> Any:
        if key == "kind":
            return "conv"
        if key == "g":
            return self.layer._flat(self.gy).transpose(0, 2, 1)
        if key == "a":
            full = self.layer._patches_t(self.x, homogeneous=True).reshape(-1, self.n, self.locations)
            return backend.namespace(full).ascontiguousarray(full.transpose(1, 2, 0))
        raise KeyError(key)

    def __iter__(self):
        return iter(("kind", "a", "g"))

    def __len__(self) -> int:
        return 3

    def map_row_blocks(self, fn: Callable[[Any, Any], Any], need_a: bool = True, need_g: bool = True) -> list:
        """``[fn(ā_c, g_c) for each chunk c]`` in chunk order (``None`` for a block not needed)."""
        layer = self.layer
        g3 = layer._flat(self.gy)
        xp = backend.namespace(g3)

        def block(a: int, e: int) -> Any:
            ab = layer._patches_t(self.x[a:e], homogeneous=True).T if need_a else None
            gb = xp.ascontiguousarray(g3[a:e].transpose(1, 0, 2)).reshape(layer.out_channels, -1).T if need_g else None
            return fn(ab, gb)

        return map_chunks(block, layer._chunks(self.x))
