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
- ``ema``: β·old + (1 − β)·new (:func:`qnref.curvature.kron.ema`).
"""
from __future__ import annotations

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


def plain_host(*arrays: Any) -> bool:
    """C-contiguous NumPy float32/float64 arrays (not subclasses with their own arithmetic) of one dtype."""
    first = arrays[0]
    return all(type(a) is numpy.ndarray and a.dtype == first.dtype and a.flags.c_contiguous for a in arrays) \
        and first.dtype in (numpy.float32, numpy.float64)


def _build() -> dict[str, Any]:
    try:
        from numba import njit  # noqa: PLC0415 - numba is heavy: `import qnref` must not load it
    except Exception:  # numba missing or broken
        return {"axpy": None, "bfgs": None, "ema": None}

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

    return {"axpy": axpy, "bfgs": bfgs, "ema": ema}
