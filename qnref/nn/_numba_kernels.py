"""CPU kernels (numba) for the scatter-adds that NumPy cannot vectorize in one pass.

This module imports numba at the top, so it is **never** imported by ``import qnref``: the layers
load it lazily (:func:`qnref.nn.conv.numba_kernels`) the first time a CPU backward pass needs it.
Every kernel has an ``xp``-generic twin in :mod:`qnref.nn.conv` / :mod:`qnref.nn.pool` (a loop over
the kh·kw kernel offsets with strided slice adds), named in :data:`KERNEL_TWINS`, that runs on NumPy
and CuPy; tests compare the two.

All kernels are ``@njit(cache=True)`` (compiled once per dtype, the machine code is cached next to
this file) and serial; im2col/col2im release the GIL (``nogil``) so that
:func:`qnref.nn.chunks.map_chunks` runs them on disjoint chunks of the batch in parallel threads.
See docs/cnn.md for the measurements that motivated them.
"""
from __future__ import annotations

import numpy as np
from numba import njit
from numba import uint64 as U

#: every kernel of this module → its array-API twin ("module:function"), the code that runs on CuPy
#: (and on NumPy without numba); ``tests/nn/test_kernel_twins.py`` checks the pairing and the values
KERNEL_TWINS: dict[str, str] = {
    "im2col_t": "qnref.nn.conv:im2col_t_xp",
    "col2im_t": "qnref.nn.conv:col2im_t_xp",
    "col2im": "qnref.nn.conv:col2im_xp",
    "index_add": "qnref.nn.pool:scatter_add_xp",
}


@njit(cache=True, nogil=True)
def _span(off, s, w_, wo_):  # pragma: no cover - compiled
    """The output columns lo ≤ ow < hi whose input column ow·s + off lies in [0, w_)."""
    lo = 0 if off >= 0 else (s - 1 - off) // s
    hi = 0 if w_ - 1 - off < 0 else min(wo_, (w_ - 1 - off) // s + 1)
    return min(lo, hi), hi


@njit(cache=True, inline="always")
def _zero_edges(of, r, ulo, uhi, uwo):  # pragma: no cover - compiled
    """Zero the columns [0, lo) and [hi, wo) of the output row starting at flat offset r."""
    for ow in range(ulo):
        of[r + ow] = 0
    for ow in range(uhi, uwo):
        of[r + ow] = 0


# Indexing note (measured, docs/cnn.md "Fourth round"): every kernel below indexes flat views with
# **unsigned** offsets. numba wraps a negative signed index around, so an index such as ``ow + off``
# (off < 0 at a padded edge) keeps a per-element check that stops LLVM from vectorizing the loop;
# unsigned offsets and loop bounds computed once per row (``_span``) leave a plain vector copy/add.
# On AVX2 (no masked stores) that made im2col 2.5-4x and col2im 3-8x faster at ResNet-20's shapes.


@njit(cache=True, nogil=True)
def im2col_t(x, out, sh, sw, ph, pw):  # pragma: no cover - compiled
    """Patches in the (K, N·L) layout: out (C, kh, kw, N, Ho, Wo) from the unpadded x (N, C, H, W)
    (zero where a window reaches into the padding); both C-contiguous.

    Stride 1 with "same" padding (Ho = H, Wo = W): one (c, i, j, n) plane of ``out`` is the input
    plane shifted by (i − ph)·W + (j − pw), so it is copied as one run, and the pw columns at each
    row's edge that the shift wraps around are zeroed after it. Otherwise row by row."""
    if not (x.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("im2col_t: x and out must be C-contiguous")
    c_, kh, kw, n_, ho_, wo_ = out.shape
    h_, w_ = x.shape[2], x.shape[3]
    xf, of = x.ravel(), out.ravel()
    plane, uwo, usw = U(ho_ * wo_), U(wo_), U(sw)
    same = sh == 1 and sw == 1 and ho_ == h_ and wo_ == w_
    for c in range(c_):
        for i in range(kh):
            for j in range(kw):
                lo, hi = _span(j - pw, sw, w_, wo_)
                ulo, uhi = U(lo), U(hi)
                for n in range(n_):
                    ob = U(((c * kh + i) * kw + j) * n_ + n) * plane
                    xb = (n * c_ + c) * h_ * w_
                    if same:
                        oh_lo, oh_hi = max(0, ph - i), min(ho_, h_ + ph - i)
                        if oh_lo >= oh_hi or lo >= hi:
                            for t in range(plane):
                                of[ob + t] = 0
                            continue
                        t0, t1 = U(oh_lo * wo_ + lo), U((oh_hi - 1) * wo_ + hi)
                        src = U(xb + (oh_lo - ph + i) * w_ + lo - pw + j)
                        for t in range(t1 - t0):
                            of[ob + t0 + t] = xf[src + t]
                        for t in range(t0):
                            of[ob + t] = 0
                        for t in range(t1, plane):
                            of[ob + t] = 0
                        for oh in range(oh_lo, oh_hi):  # the wrapped-around edge columns
                            _zero_edges(of, ob + U(oh * wo_), ulo, uhi, uwo)
                        continue
                    for oh in range(ho_):
                        hh = oh * sh - ph + i
                        r = ob + U(oh * wo_)
                        if hh < 0 or hh >= h_:
                            for ow in range(uwo):
                                of[r + ow] = 0
                            continue
                        _zero_edges(of, r, ulo, uhi, uwo)
                        src, dst = U(xb + hh * w_ + lo * sw - pw + j), r + ulo
                        if sw == 1:
                            for t in range(uhi - ulo):
                                of[dst + t] = xf[src + t]
                        else:
                            for t in range(uhi - ulo):
                                of[dst + t] = xf[src + t * usw]
    return out


@njit(cache=True, nogil=True)
def _col2im(gf, gs, out, kh, kw, ho_, wo_, sh, sw, ph, pw):  # pragma: no cover - compiled
    """Scatter-add of flat patch gradients ``gf`` into the C-contiguous out (N, C, H, W): the
    (Ho, Wo) plane of (c, i, j, n) starts at gf[c·gs[0] + i·gs[1] + j·gs[2] + n·gs[3]]. Each element
    of ``out`` receives its terms in (i, j) order, whichever layout ``gs`` describes."""
    n_, c_, h_, w_ = out.shape
    of, usw = out.ravel(), U(sw)
    for n in range(n_):
        for c in range(c_):
            xb = (n * c_ + c) * h_ * w_
            for i in range(kh):
                for j in range(kw):
                    lo, hi = _span(j - pw, sw, w_, wo_)
                    ulo, m = U(lo), U(hi - lo)
                    gb = U(c * gs[0] + i * gs[1] + j * gs[2] + n * gs[3])
                    for oh in range(ho_):
                        hh = oh * sh - ph + i
                        if hh < 0 or hh >= h_:
                            continue
                        src = gb + U(oh * wo_) + ulo
                        dst = U(xb + hh * w_ + lo * sw - pw + j)
                        if sw == 1:
                            for t in range(m):
                                of[dst + t] += gf[src + t]
                        else:
                            for t in range(m):
                                of[dst + t * usw] += gf[src + t]
    return out


@njit(cache=True, nogil=True)
def col2im_t(g6t, out, sh, sw, ph, pw):  # pragma: no cover - compiled
    """Adjoint of the (K, N·L) im2col layout: the C-contiguous g6t (C, kh, kw, N, Ho, Wo)
    scatter-added into the C-contiguous out (N, C, H, W) (zero-initialised, unpadded; padding
    positions are dropped)."""
    if not (g6t.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("col2im_t: g6t and out must be C-contiguous")
    c_, kh, kw, n_, ho_, wo_ = g6t.shape
    L = ho_ * wo_
    gs = (kh * kw * n_ * L, kw * n_ * L, n_ * L, L)
    return _col2im(g6t.ravel(), gs, out, kh, kw, ho_, wo_, sh, sw, ph, pw)


@njit(cache=True, nogil=True)
def col2im(g6, out, sh, sw, ph, pw):  # pragma: no cover - compiled
    """Adjoint of the per-example (N, K, L) im2col layout: the C-contiguous g6 (N, C, kh, kw, Ho, Wo)
    scatter-added into the C-contiguous, zero-initialised out (N, C, H, W) (same sums, in the same
    order, as :func:`col2im_t` on the transposed layout)."""
    if not (g6.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("col2im: g6 and out must be C-contiguous")
    n_, c_, kh, kw, ho_, wo_ = g6.shape
    L = ho_ * wo_
    gs = (kh * kw * L, kw * L, L, c_ * kh * kw * L)
    return _col2im(g6.ravel(), gs, out, kh, kw, ho_, wo_, sh, sw, ph, pw)


# -- Winograd F(2×2, 3×3) (Lavin & Gray 2016), stride 1; private: CPU-only route of qnref.nn.conv --------
@njit(cache=True, nogil=True)
def _wino_input(x, V, a, e, ph, pw, th_, tw_):  # pragma: no cover - compiled
    """V[ξ, c, (n − a)·T + t] = (Bᵀ d B)_ξ for the 4×4 input tile d of output tile t = (ty, tx)
    (rows 2ty − ph … 2ty − ph + 3, zero outside x), examples a ≤ n < e; ξ = 4·row + column,
    Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]], T = th_·tw_."""
    h_, w_ = x.shape[2], x.shape[3]
    c_ = x.shape[1]
    T = th_ * tw_
    d = np.empty(16, dtype=x.dtype)
    for c in range(c_):
        for n in range(a, e):
            base = (n - a) * T
            for ty in range(th_):
                r0 = 2 * ty - ph
                rin = r0 >= 0 and r0 + 3 < h_
                for tx in range(tw_):
                    c0 = 2 * tx - pw
                    if rin and c0 >= 0 and c0 + 3 < w_:
                        for i in range(4):
                            for j in range(4):
                                d[4 * i + j] = x[n, c, r0 + i, c0 + j]
                    else:
                        for i in range(4):
                            r = r0 + i
                            for j in range(4):
                                cc = c0 + j
                                if 0 <= r < h_ and 0 <= cc < w_:
                                    d[4 * i + j] = x[n, c, r, cc]
                                else:
                                    d[4 * i + j] = 0
                    col = base + ty * tw_ + tx
                    for j in range(4):  # t = Bᵀ d, column j
                        t0 = d[j] - d[8 + j]
                        t1 = d[4 + j] + d[8 + j]
                        t2 = d[8 + j] - d[4 + j]
                        t3 = d[4 + j] - d[12 + j]
                        d[j], d[4 + j], d[8 + j], d[12 + j] = t0, t1, t2, t3
                    for i in range(4):  # V = t B, row i
                        r = 4 * i
                        V[r, c, col] = d[r] - d[r + 2]
                        V[r + 1, c, col] = d[r + 1] + d[r + 2]
                        V[r + 2, c, col] = d[r + 2] - d[r + 1]
                        V[r + 3, c, col] = d[r + 1] - d[r + 3]
    return V


@njit(cache=True, nogil=True)
def _wino_output(M, b, out, a, e, th_, tw_):  # pragma: no cover - compiled
    """out[n, o, 2ty + i, 2tx + j] = (Aᵀ m A)_ij + b[o] for m = M[:, o, (n − a)·T + t] (4×4),
    Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]; positions past the output's edge are skipped."""
    co_, ho_, wo_ = out.shape[1], out.shape[2], out.shape[3]
    T = th_ * tw_
    for o in range(co_):
        bo = b[o]
        for n in range(a, e):
            base = (n - a) * T
            for ty in range(th_):
                y0 = 2 * ty
                for tx in range(tw_):
                    x0 = 2 * tx
                    col = base + ty * tw_ + tx
                    s00 = M[0, o, col] + M[4, o, col] + M[8, o, col]
                    s01 = M[1, o, col] + M[5, o, col] + M[9, o, col]
                    s02 = M[2, o, col] + M[6, o, col] + M[10, o, col]
                    s03 = M[3, o, col] + M[7, o, col] + M[11, o, col]
                    s10 = M[4, o, col] - M[8, o, col] - M[12, o, col]
                    s11 = M[5, o, col] - M[9, o, col] - M[13, o, col]
                    s12 = M[6, o, col] - M[10, o, col] - M[14, o, col]
                    s13 = M[7, o, col] - M[11, o, col] - M[15, o, col]
                    out[n, o, y0, x0] = (s00 + s01 + s02) + bo
                    if x0 + 1 < wo_:
                        out[n, o, y0, x0 + 1] = (s01 - s02 - s03) + bo
                    if y0 + 1 < ho_:
                        out[n, o, y0 + 1, x0] = (s10 + s11 + s12) + bo
                        if x0 + 1 < wo_:
                            out[n, o, y0 + 1, x0 + 1] = (s11 - s12 - s13) + bo
    return out


@njit(cache=True)
def index_add(gy, idx, out):  # pragma: no cover - compiled
    """out[r, idx[r, k]] += gy[r, k] for (R, K) arrays ``gy``/``idx`` and (R, M) ``out`` (max-pool backward)."""
    r_, k_ = gy.shape
    for r in range(r_):
        for k in range(k_):
            out[r, idx[r, k]] += gy[r, k]
    return out


def warmup() -> None:
    """Compile (or load from cache) the kernels for float32 and float64."""
    for dt in (np.float32, np.float64):
        col2im_t(np.zeros((1, 1, 1, 1, 1, 1), dt), np.zeros((1, 1, 1, 1), dt), 1, 1, 0, 0)
        col2im(np.zeros((1, 1, 1, 1, 1, 1), dt), np.zeros((1, 1, 1, 1), dt), 1, 1, 0, 0)
        im2col_t(np.zeros((1, 1, 1, 1), dt), np.zeros((1, 1, 1, 1, 1, 1), dt), 1, 1, 0, 0)
        index_add(np.zeros((1, 1), dt), np.zeros((1, 1), np.int64), np.zeros((1, 1), dt))
        _wino_input(np.zeros((1, 1, 2, 2), dt), np.empty((16, 1, 1), dt), 0, 1, 1, 1, 1, 1)
        _wino_output(np.zeros((16, 1, 1), dt), np.zeros(1, dt), np.empty((1, 1, 2, 2), dt), 0, 1, 1, 1)
