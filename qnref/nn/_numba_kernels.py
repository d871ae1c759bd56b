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

#: every kernel of this module → its array-API twin ("module:function"), the code that runs on CuPy
#: (and on NumPy without numba); ``tests/nn/test_kernel_twins.py`` checks the pairing and the values
KERNEL_TWINS: dict[str, str] = {
    "im2col_t": "qnref.nn.conv:im2col_t_xp",
    "col2im_t": "qnref.nn.conv:col2im_t_xp",
    "index_add": "qnref.nn.pool:scatter_add_xp",
}


@njit(cache=True, nogil=True)
def im2col_t(x, out, sh, sw, ph, pw):  # pragma: no cover - compiled
    """Patches in the (K, N·L) layout: out (C, kh, kw, N, Ho, Wo) from the unpadded x (N, C, H, W)
    (zero where a window reaches into the padding)."""
    c_, kh, kw, n_, ho_, wo_ = out.shape
    h_, w_ = x.shape[2], x.shape[3]
    for c in range(c_):
        for i in range(kh):
            for j in range(kw):
                for n in range(n_):
                    for oh in range(ho_):
                        hh = oh * sh - ph + i
                        if hh < 0 or hh >= h_:
                            for ow in range(wo_):
                                out[c, i, j, n, oh, ow] = 0
                            continue
                        for ow in range(wo_):
                            ww = ow * sw - pw + j
                            if 0 <= ww < w_:
                                out[c, i, j, n, oh, ow] = x[n, c, hh, ww]
                            else:
                                out[c, i, j, n, oh, ow] = 0
    return out


@njit(cache=True, nogil=True)
def col2im_t(g6t, out, sh, sw, ph, pw):  # pragma: no cover - compiled
    """Adjoint of the (K, N·L) im2col layout: g6t (C, kh, kw, N, Ho, Wo) scatter-added into
    out (N, C, H, W) (zero-initialised, unpadded; padding positions are dropped). The
    per-example layout (N, C, kh, kw, Ho, Wo) uses it through a transposed view."""
    c_, kh, kw, n_, ho_, wo_ = g6t.shape
    h_, w_ = out.shape[2], out.shape[3]
    for n in range(n_):
        for c in range(c_):
            for i in range(kh):
                for j in range(kw):
                    for oh in range(ho_):
                        hh = oh * sh - ph + i
                        if hh < 0 or hh >= h_:
                            continue
                        for ow in range(wo_):
                            ww = ow * sw - pw + j
                            if 0 <= ww < w_:
                                out[n, c, hh, ww] += g6t[c, i, j, n, oh, ow]
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
        col2im_t(np.zeros((1, 1, 1, 1, 1, 1), dt).transpose(1, 2, 3, 0, 4, 5), np.zeros((1, 1, 1, 1), dt), 1, 1, 0, 0)
        im2col_t(np.zeros((1, 1, 1, 1), dt), np.zeros((1, 1, 1, 1, 1, 1), dt), 1, 1, 0, 0)
        index_add(np.zeros((1, 1), dt), np.zeros((1, 1), np.int64), np.zeros((1, 1), dt))
