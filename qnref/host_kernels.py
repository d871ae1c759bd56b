"""numba kernels of the optimizer algebra on the host, each bit for bit the NumPy expression it replaces.

A kernel here fuses the passes of one whole-array NumPy expression into one pass over its operands
(fewer memory transfers and no temporaries) and gives each entry exactly the rounded operations of
that expression: compiled without fast-math, so no FMA contraction and no reassociation
(docs/design.md, "optimizer host kernels"). Callers use a kernel only where :func:`plain_host` holds
and the scalars have the arrays' dtype, and otherwise run the NumPy expression itself; for operands
below :data:`MIN_SIZE` entries (a process that never reaches it does not import numba), with numba
missing or with ``qnref.nn.conv.KERNELS = "xp"`` (the pure NumPy/CuPy paths) :func:`kernel` returns None.

- ``axpy``: q ← q + c·y (the two-loop's update, :func:`qnref.optim.operators.axpy_`);
- ``bfgs``: H − ρ(s(Hy)ᵀ + (Hy)sᵀ) + c·ssᵀ (:func:`qnref.optim.operators.bfgs_inverse_update`);
- ``ema``: β·old + (1 − β)·new (:func:`qnref.curvature.kron.ema`);
- ``dot``, ``axpy_dot``, ``scale_dot``: the two-loop's passes (:meth:`qnref.optim.operators.
  LBFGSOperator.solve`): a dot product, q ← q + c·y then zᵀq, q ← g·q then zᵀq, in one pass each
  over the entries of one range. The updates of q are bit for bit NumPy's; the dot products are
  **not** BLAS's bits: they accumulate in float64 (for float32 operands more accurate than
  ``sdot``, which sums in float32) in the lane order LLVM vectorises them in (``reassoc``). They run
  over the fixed ranges of :func:`split_ranges` on the layer thread pool (:func:`split_sum`), so a
  result depends on n and the machine's vector width, never on the thread count;
- ``nonfinite``: Σ (xⱼ − xⱼ), +0 when every entry is finite and NaN otherwise (±inf − ±inf and NaN − NaN
  are NaN, and a NaN term stays in a sum however it is associated), for :func:`all_finite`: one read
  pass split over the pool, against NumPy's ``isfinite(x).all()`` (a boolean temporary written and
  read, on one thread): 1.18–1.28 → 0.78 ms on cold 2.8·10⁶-entry float32 vectors (Intel Xeon),
  0.55–0.62 → 0.40 ms (Zen 4); used only in processes that have loaded numba for other work.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy

_KERNELS: dict[str, Any] = {}  # name → the compiled kernel, or None without numba (filled on first use)

#: fewest entries an operand must have for a kernel to run: below it the NumPy expression costs
#: microseconds, and importing numba costs ≈ 140 MB resident — the Kronecker steps of the small
#: 64-32-16-8 autoencoder peaked at 3.8× an SGD step's process memory when their EMA loaded it
MIN_SIZE = 1 << 16


def kernel(name: str, size: int) -> Any:
    """The numba kernel ``name`` (compiled on first use, GIL-free) for operands of ``size`` entries,
    or None when ``size`` < :data:`MIN_SIZE`, numba is missing or ``qnref.nn.conv.KERNELS == "xp"``."""
    from .nn import conv  # noqa: PLC0415 - the package's one kernel switch, read at call time

    if size < MIN_SIZE or conv.KERNELS == "xp":
        return None
    if not _KERNELS:
        _KERNELS.update(_build())
    return _KERNELS.get(name)


#: operands of at least this many entries are split into ranges that run on the layer thread pool
#: (:func:`split_sum`): one pool round trip costs ≈ 75 µs on the 2-vCPU machines, a pass over 2¹⁹
#: float32 entries ≈ 0.15 ms
SPLIT_SIZE = 1 << 19


def split_ranges(n: int) -> list[tuple[int, int]]:
    """The ranges of ``range(n)`` a split kernel runs on, set by n alone: one below
    :data:`SPLIT_SIZE` entries, else 2, 4 or 8 near-equal ones (8 from 4·SPLIT_SIZE; a multiple of
    the common thread counts, so the pool's threads get equal shares)."""
    parts = 1 if n < SPLIT_SIZE else 2 if n < 2 * SPLIT_SIZE else 4 if n < 4 * SPLIT_SIZE else 8
    return [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]


def split_sum(work: Any, n: int) -> float:
    """Σ of ``work(lo, hi)`` (a float) over :func:`split_ranges` (n), the ranges run side by side on
    the layer thread pool (:func:`qnref.nn.chunks.map_chunks`, ``QNREF_NUM_THREADS``) and the
    partial results added in range order: the same number for every thread count."""
    from .nn.chunks import map_chunks  # noqa: PLC0415 - the pool (and threadpoolctl) only on first use

    total = 0.0
    for part in map_chunks(work, split_ranges(n)):
        total += part
    return total


def all_finite(x: Any) -> bool | None:
    """Whether every entry of ``x`` is finite, by the ``nonfinite`` kernel over :func:`split_ranges`;
    None when ``x`` is not a contiguous host float array of at least :data:`MIN_SIZE` entries,
    when the process has not loaded numba, or when there is no kernel (the caller then uses the
    expression). The cheap size test comes first: most callers pass small arrays.

    Only where numba is loaded already: the kernel saves ≈ 0.2 ms per call on a 2.8·10⁶-entry vector
    (0.40 against 0.55–0.62 ms for ``isfinite(x).all()``, 2-vCPU Zen 4), and loading numba for it
    cost an MLP process ≈ 170 MB: ``Objective``'s check of its data loaded it, and the MNIST
    autoencoder's gradient peaked at 309 MB instead of 138 MB (issue 21, ninth round)."""
    if type(x) is not numpy.ndarray or x.size < MIN_SIZE or "numba" not in sys.modules or not plain_host(x):
        return None
    k = kernel("nonfinite", x.size)
    if k is None:
        return None
    flat = x.reshape(-1)
    return split_sum(lambda lo, hi: k(flat[lo:hi]), flat.size) == 0.0


def plain_host(*arrays: Any) -> bool:
    """C-contiguous NumPy float32/float64 arrays (not subclasses with their own arithmetic) of one dtype."""
    first = arrays[0]
    return all(type(a) is numpy.ndarray and a.dtype == first.dtype and a.flags.c_contiguous for a in arrays) \
        and first.dtype in (numpy.float32, numpy.float64)


def _build() -> dict[str, Any]:
    try:
        from numba import njit  # noqa: PLC0415 - numba is heavy: `import qnref` must not load it
    except Exception:  # numba missing or broken
        return {name: None for name in ("axpy", "bfgs", "ema", "dot", "axpy_dot", "scale_dot", "nonfinite")}

    @njit(cache=True, nogil=True)
    def axpy(q, c, y):  # pragma: no cover - compiled
        for j in range(q.shape[0]):
            q[j] = q[j] + c * y[j]

    @njit(cache=True, nogil=True)
    def bfgs(H, s, Hy, rho, c, out):  # pragma: no cover - compiled
        # out = H − ρ(s(Hy)ᵀ + (Hy)sᵀ) + c·ssᵀ, each entry rounded as NumPy's whole-array expression
        n = H.shape[0]
        for i in range(n):
            si, hi = s[i], Hy[i]
            for j in range(n):
                out[i, j] = (H[i, j] - rho * (si * Hy[j] + hi * s[j])) + c * (si * s[j])
        return out

    @njit(cache=True, nogil=True)
    def ema(old, new, b, c, out):  # pragma: no cover - compiled
        # 1-D views of contiguous arrays: out = b·old + c·new, NumPy's rounding of each product and the sum
        for j in range(old.shape[0]):
            out[j] = b * old[j] + c * new[j]
        return out

    # the two-loop's passes: only the float64 sums may be reassociated (vectorised); the updates of q
    # are single roundings with nothing to reassociate, so they keep NumPy's bits (tested)
    @njit(cache=True, nogil=True, fastmath={"reassoc"})
    def dot(a, z):  # pragma: no cover - compiled
        s = 0.0
        for j in range(a.shape[0]):
            s += numpy.float64(z[j]) * numpy.float64(a[j])
        return s

    @njit(cache=True, nogil=True, fastmath={"reassoc"})
    def axpy_dot(q, c, y, z):  # pragma: no cover - compiled
        s = 0.0
        for j in range(q.shape[0]):
            t = q[j] + c * y[j]
            q[j] = t
            s += numpy.float64(z[j]) * numpy.float64(t)
        return s

    @njit(cache=True, nogil=True, fastmath={"reassoc"})
    def scale_dot(q, g, z):  # pragma: no cover - compiled
        s = 0.0
        for j in range(q.shape[0]):
            t = q[j] * g
            q[j] = t
            s += numpy.float64(z[j]) * numpy.float64(t)
        return s

    @njit(cache=True, nogil=True, fastmath={"reassoc"})
    def nonfinite(x):  # pragma: no cover - compiled
        # reassoc only: without nnan/ninf LLVM may not fold x − x to 0, so every NaN/inf term counts
        s = 0.0
        for j in range(x.shape[0]):
            s += x[j] - x[j]
        return s

    return {"axpy": axpy, "bfgs": bfgs, "ema": ema, "dot": dot, "axpy_dot": axpy_dot, "scale_dot": scale_dot,
            "nonfinite": nonfinite}
