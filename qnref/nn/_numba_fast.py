"""CPU kernels (numba) for training-mode BatchNorm on (N, C, H, W) inputs, max pooling and ReLU.

Like :mod:`qnref.nn._numba_kernels` this module imports numba at the top, so ``import qnref`` never
imports it: :func:`qnref.nn.pool.fast_kernels` loads it on first use (it honours the same switch,
``qnref.nn.conv.KERNELS``). Every kernel has an ``xp`` twin in :mod:`qnref.nn.norm` /
:mod:`qnref.nn.pool`, named in :data:`KERNEL_TWINS`, that runs on NumPy and CuPy; the tests compare
the two paths.

The kernels are ``@njit(cache=True, nogil=True)`` and serial; each takes a range [lo, hi) of the
channels (BatchNorm), of the N·C image planes (pooling) or of the entries (ReLU), whose outputs
are disjoint, and :func:`run_split` runs a few ranges side by side on the thread pool of :mod:`qnref.nn.chunks`
(one knob, ``QNREF_NUM_THREADS`` / :func:`qnref.nn.chunks.set_num_threads`, for all CPU layer
threads). So there are no races and the result does not depend on the number of threads.
Per-channel sums are accumulated in float64 whatever the input dtype (NumPy's ``x.mean``
accumulates float32 inputs in float32); the row helpers allow reassociation
(``fastmath={"reassoc"}``) only so that LLVM can vectorize the sums — no other fast-math flag, so
NaN/inf propagate as in NumPy.

Why not numba's own ``parallel=True``: its OpenMP workers spin after each parallel region and
then compete with OpenBLAS's threads for the cores (measured on the 2-core machine: a kernel run
right after a GEMM took 4.5 ms instead of 0.9 ms, ResNet-20's gradient 585–593 ms instead of
500–520 ms), and numba sizes its pool from ``NUMBA_NUM_THREADS``, ignoring ``OMP_NUM_THREADS``.
Python threads calling GIL-free kernels have neither problem.

Shapes: the BatchNorm kernels take (N, C, M) views (M = H·W) of C-contiguous arrays; the pooling
kernels take (P, H, W) / (P, Ho, Wo) views with P = N·C; the ReLU kernels take the flat (1-D)
arrays and a range of their entries.
"""
from __future__ import annotations

import numpy as np
from numba import njit
from numba import uint64 as u64  # unsigned indices: no negative-index wraparound code

from .chunks import map_chunks, num_threads, split_ranges

_FM = {"reassoc"}

#: every kernel of this module → its array-API twin ("module:function"), the code that runs on CuPy
#: (and on NumPy without numba); ``tests/nn/test_kernel_twins.py`` checks the pairing and the values
KERNEL_TWINS: dict[str, str] = {
    "bn_forward": "qnref.nn.norm:bn_forward_xp",
    "bn_sums": "qnref.nn.norm:bn_sums_xp",
    "bn_backward": "qnref.nn.norm:bn_backward_xp",
    "maxpool_forward": "qnref.nn.pool:maxpool_forward_xp",
    "maxpool_backward": "qnref.nn.pool:unpool_xp",
    "relu_forward": "qnref.nn.activations:relu_xp",
    "relu_mask_mul": "qnref.nn.activations:relu_mask_mul_xp",
}


def run_split(n: int, work) -> list:
    """``work(lo, hi)`` over a split of ``range(n)`` into one contiguous range per pool thread
    (:func:`qnref.nn.chunks.map_chunks`); the results in range order."""
    return map_chunks(work, split_ranges(n, num_threads()))


# -- row helpers (1-D contiguous rows; inlined by LLVM) ---------------------------------------
@njit(cache=True, fastmath=_FM)
def _row_sum(a):  # pragma: no cover - compiled
    s = 0.0
    for k in range(a.shape[0]):
        s += a[k]
    return s


@njit(cache=True, fastmath=_FM)
def _row_ssd(a, mu):  # pragma: no cover - compiled
    """Σ (a − μ)² in float64."""
    s = 0.0
    for k in range(a.shape[0]):
        d = a[k] - mu
        s += d * d
    return s


@njit(cache=True, fastmath=_FM)
def _row_sums2(g, xh):  # pragma: no cover - compiled
    """(Σ g, Σ g·x̂) in float64."""
    s = 0.0
    t = 0.0
    for k in range(g.shape[0]):
        gk = np.float64(g[k])
        s += gk
        t += gk * xh[k]
    return s, t


# -- ReLU (elementwise on the flat arrays; range [lo, hi) of the entries) ---------------------------
# Slices of the flat arrays, not ``range(lo, hi)`` over the whole ones: with signed loop indices
# LLVM left these loops scalar (3-4x slower than NumPy, the indexing note of _numba_kernels).
@njit(cache=True, nogil=True)
def relu_forward(x, y, lo, hi):  # pragma: no cover - compiled
    """y = max(x, 0) on entries [lo, hi), bit for bit NumPy's ``maximum(x, 0)``: x where x > 0 or x
    is NaN (the NaN itself), +0 everywhere else (−0 included)."""
    xs, ys = x[lo:hi], y[lo:hi]
    zero = xs.dtype.type(0)
    for k in range(xs.shape[0]):
        v = xs[k]
        ys[k] = v if (v > zero or v != v) else zero
    return y


@njit(cache=True, nogil=True)
def relu_mask_mul(x, g, out, lo, hi):  # pragma: no cover - compiled
    """out = g·[x > 0] on entries [lo, hi): the product g·1 or g·0 in g's dtype, bit for bit
    NumPy's ``multiply(g, x > 0)`` (NaN or ±inf in g times 0 is NaN, −g·0 is −0)."""
    xs, gs, os_ = x[lo:hi], g[lo:hi], out[lo:hi]
    one, zero = gs.dtype.type(1), gs.dtype.type(0)
    for k in range(xs.shape[0]):
        os_[k] = gs[k] * (one if xs[k] > zero else zero)
    return out


# -- BatchNorm (training mode, 4-D) ---------------------------------------------------------------
@njit(cache=True, nogil=True)
def bn_forward(x, gamma, beta, eps, xhat, y, mean, var, inv, lo, hi):  # pragma: no cover - compiled
    """Per channel c of x (N, C, M): μ = mean, σ² = mean((x − μ)²) (two passes, float64 sums),
    inv = 1/√(σ² + ε), x̂ = (x − μ)·inv, y = γ x̂ + β. Writes xhat, y (N, C, M) and the (C,) arrays
    mean, var, inv (each in its array's dtype; x̂ and y are computed from the float64 μ and inv)."""
    n_, c_, m_ = x.shape
    cnt = n_ * m_
    for c in range(lo, hi):
        s = 0.0
        for n in range(n_):
            s += _row_sum(x[n, c])
        mu = s / cnt
        q = 0.0
        for n in range(n_):
            q += _row_ssd(x[n, c], mu)
        v = q / cnt
        iv = 1.0 / np.sqrt(v + eps)
        mean[c] = mu
        var[c] = v
        inv[c] = iv
        g = np.float64(gamma[c])
        b = np.float64(beta[c])
        for n in range(n_):
            xr = x[n, c]
            hr = xhat[n, c]
            yr = y[n, c]
            for k in range(m_):
                t = (xr[k] - mu) * iv
                hr[k] = t
                yr[k] = g * t + b
    return y


@njit(cache=True, inline="always")
def _channel_sums(gy, xhat, c, sg, sgx):  # pragma: no cover - compiled
    """sg[c] = Σ gy, sgx[c] = Σ gy·x̂ over (n, m) of channel c (float64); returns both."""
    s = 0.0
    t = 0.0
    for n in range(gy.shape[0]):
        a, b = _row_sums2(gy[n, c], xhat[n, c])
        s += a
        t += b
    sg[c] = s
    sgx[c] = t
    return s, t


@njit(cache=True, nogil=True)
def bn_sums(gy, xhat, sg, sgx, lo, hi):  # pragma: no cover - compiled
    """sg[c] = Σ gy, sgx[c] = Σ gy·x̂ over (n, m), float64 accumulation (the parameter gradients)."""
    for c in range(lo, hi):
        _channel_sums(gy, xhat, c, sg, sgx)
    return sg


@njit(cache=True, nogil=True)
def bn_backward(gy, xhat, scale, gx, sg, sgx, lo, hi):  # pragma: no cover - compiled
    """Training-mode input gradient gx = scale·(gy − mean(gy) − x̂·mean(gy·x̂)) per channel, with
    scale = γ/σ (C,) and the channel sums Σ gy → sg, Σ gy·x̂ → sgx (float64) returned as well."""
    n_, c_, m_ = gy.shape
    cnt = n_ * m_
    for c in range(lo, hi):
        s, t = _channel_sums(gy, xhat, c, sg, sgx)
        mg = s / cnt
        mgx = t / cnt
        sc = np.float64(scale[c])
        for n in range(n_):
            gr = gy[n, c]
            hr = xhat[n, c]
            outr = gx[n, c]
            for k in range(m_):
                outr[k] = sc * (gr[k] - mg - hr[k] * mgx)
    return gx


# -- max pooling --------------------------------------------------------------------------------------
@njit(cache=True, fastmath=_FM)
def _nonfinite(xf, start, size):  # pragma: no cover - compiled
    """True when xf[start : start + size] holds a NaN or ±inf (Σ (x − x) is NaN exactly then)."""
    s = xf[u64(start)] - xf[u64(start)]
    for k in range(1, size):
        v = xf[u64(start + k)]
        s += v - v
    return s != s


@njit(cache=True, inline="always")
def _window(xf, base, w_, h0, w0, ilo, ihi, jlo, jhi):  # pragma: no cover - compiled
    """Max and flat index of the winner over rows ilo ≤ i < ihi, columns jlo ≤ j < jhi of the window
    at (h0, w0) of the plane starting at ``base`` (in-bounds part only). Strict ``>``: ties keep the
    first element in row-major order. Plain comparisons, so NaNs are handled by :func:`_window_nan`."""
    bi = base + (h0 + ilo) * w_ + w0 + jlo
    best = xf[u64(bi)]
    for i in range(ilo, ihi):
        row = base + (h0 + i) * w_ + w0
        for j in range(jlo, jhi):
            v = xf[u64(row + j)]
            if v > best:
                best = v
                bi = row + j
    return best, bi


@njit(cache=True, inline="always")
def _window_nan(xf, base, w_, h0, w0, ilo, ihi, jlo, jhi):  # pragma: no cover - compiled
    """:func:`_window` with ``numpy.argmax``'s NaN rule: the first NaN of the window wins."""
    bi = base + (h0 + ilo) * w_ + w0 + jlo
    best = xf[u64(bi)]
    for i in range(ilo, ihi):
        row = base + (h0 + i) * w_ + w0
        for j in range(jlo, jhi):
            v = xf[u64(row + j)]
            if v > best or (v != v and best == best):
                best = v
                bi = row + j
    return best, bi


@njit(cache=True, inline="always")
def _pool_plane(xf, yf, gf, p, h_, w_, ho_, wo_, kh, kw, sh, sw, ph, pw, nan):  # pragma: no cover - compiled
    """Max pooling of plane p. Windows that lie inside the image run the loop with the full kernel
    (constant trip counts when the caller passes literal kh, kw: unrolled, branch-free selects);
    border windows clip the loop to the in-bounds part (padding is skipped, it never wins)."""
    base = p * h_ * w_
    obase = p * ho_ * wo_
    owlo = min((pw + sw - 1) // sw, wo_)  # first output column whose window starts inside
    owhi = max(min(wo_, (w_ - kw + pw) // sw + 1), owlo)  # one past the last that ends inside
    for oh in range(ho_):
        h0 = oh * sh - ph
        ilo = max(0, -h0)
        ihi = min(kh, h_ - h0)
        ob = obase + oh * wo_
        inner = ilo == 0 and ihi == kh and not nan
        for ow in range(owlo if inner else wo_):
            w0 = ow * sw - pw
            jlo, jhi = max(0, -w0), min(kw, w_ - w0)
            if nan:
                b, bi = _window_nan(xf, base, w_, h0, w0, ilo, ihi, jlo, jhi)
            else:
                b, bi = _window(xf, base, w_, h0, w0, ilo, ihi, jlo, jhi)
            yf[u64(ob + ow)] = b
            gf[u64(ob + ow)] = bi
        if inner:
            for ow in range(owlo, owhi):
                b, bi = _window(xf, base, w_, h0, ow * sw - pw, 0, kh, 0, kw)
                yf[u64(ob + ow)] = b
                gf[u64(ob + ow)] = bi
            for ow in range(owhi, wo_):
                w0 = ow * sw - pw
                b, bi = _window(xf, base, w_, h0, w0, 0, kh, max(0, -w0), min(kw, w_ - w0))
                yf[u64(ob + ow)] = b
                gf[u64(ob + ow)] = bi


@njit(cache=True, nogil=True)
def maxpool_forward(x, kh, kw, sh, sw, ph, pw, y, gidx, lo, hi):  # pragma: no cover - compiled
    """Max over kh × kw windows of the planes x (P, H, W) (padding −∞ is skipped, so it never wins):
    y (P, Ho, Wo) and gidx (P, Ho, Wo), the flat index of the winner in the whole (P·H·W) input.
    Ties go to the first element of the window in row-major order; a NaN wins (the first one), as
    in ``numpy.argmax`` (planes holding a NaN or ±inf take the NaN-aware loop). 2×2 and 3×3 kernels
    get unrolled code."""
    p_, h_, w_ = x.shape
    ho_, wo_ = y.shape[1], y.shape[2]
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    gf = gidx.reshape(-1)
    hw = h_ * w_
    for p in range(lo, hi):
        if _nonfinite(xf, p * hw, hw):
            _pool_plane(xf, yf, gf, p, h_, w_, ho_, wo_, kh, kw, sh, sw, ph, pw, True)
        elif kh == 2 and kw == 2:
            _pool_plane(xf, yf, gf, p, h_, w_, ho_, wo_, 2, 2, sh, sw, ph, pw, False)
        elif kh == 3 and kw == 3:
            _pool_plane(xf, yf, gf, p, h_, w_, ho_, wo_, 3, 3, sh, sw, ph, pw, False)
        else:
            _pool_plane(xf, yf, gf, p, h_, w_, ho_, wo_, kh, kw, sh, sw, ph, pw, False)
    return y


@njit(cache=True, nogil=True)
def maxpool_backward(g, gidx, out, lo, hi):  # pragma: no cover - compiled
    """out (P, H·W) = 0, then out.flat[gidx[p, k]] += g[p, k] (P, L) — one plane per thread (every
    winner of plane p lies in plane p, so any stride, overlapping windows included, is race-free;
    within a plane the additions run in the order of ``index_add``). Returns the number of indices
    outside their plane (skipped; the caller then uses a whole-array scatter) — 0 for the caches
    of :func:`maxpool_forward`."""
    p_, l_ = g.shape
    hw = out.shape[1]
    bad = 0
    for p in range(lo, hi):
        orow = out[p]
        for k in range(hw):
            orow[k] = 0
        base = p * hw
        for k in range(l_):
            j = gidx[p, k] - base
            if 0 <= j < hw:
                orow[u64(j)] += g[p, k]
            else:
                bad += 1
    return bad


def warmup() -> None:
    """Compile (or load from numba's cache) the kernels for float32 and float64."""
    for dt in (np.float32, np.float64):
        x = np.zeros((2, 1, 2), dt)
        c1 = np.ones(1, dt)
        bn_forward(x, c1, c1, 1e-5, np.empty_like(x), np.empty_like(x), np.empty(1, dt), np.empty(1, dt), np.empty(1, dt), 0, 1)
        bn_sums(x, x, np.empty(1), np.empty(1), 0, 1)
        bn_backward(x, x, np.ones(1), np.empty_like(x), np.empty(1), np.empty(1), 0, 1)
        xp_ = np.zeros((1, 2, 2), dt)
        maxpool_forward(xp_, 2, 2, 2, 2, 0, 0, np.empty((1, 1, 1), dt), np.empty((1, 1, 1), np.int64), 0, 1)
        maxpool_backward(np.zeros((1, 1), dt), np.zeros((1, 1), np.int64), np.empty((1, 4), dt), 0, 1)
        v = np.zeros(2, dt)
        relu_forward(v, np.empty_like(v), 0, 2)
        relu_mask_mul(v, v, np.empty_like(v), 0, 2)
