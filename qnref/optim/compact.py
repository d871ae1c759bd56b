"""Dense quasi-Newton updates: the n × n oracles of the limited-memory operators.

The limited-memory algebra lives in :mod:`~.operators` (L-BFGS, L-SR1, the pruning loop, the
inverse BFGS update) and the pair storage in :mod:`~.pairs`; what stays here are the dense
direct updates the tests compare the operators with ([NW06] J. Nocedal, S. J. Wright, *Numerical
Optimization*, 2nd ed.: BFGS (6.19), SR1 (6.24)/(6.25), skip rule (6.26)).
"""
from __future__ import annotations

from typing import Any

from .. import backend
from .operators import sr1_skip

__all__ = ["bfgs_update", "sr1_update", "sr1_inverse_update"]


def bfgs_update(B: Any, s: Any, y: Any) -> Any:
    """Dense BFGS update B⁺ = B − Bs sᵀB / sᵀBs + y yᵀ / yᵀs ([NW06] eq. 6.19).

    Raises ``ValueError`` unless sᵀy > 0 and sᵀBs > 0 (skip or damp beforehand).
    """
    xp = backend.namespace(B, s, y)
    Bs = B @ s
    sy, sBs = float(s @ y), float(s @ Bs)
    if not (sy > 0.0 and sBs > 0.0):
        raise ValueError(f"BFGS update needs s^T y > 0 and s^T B s > 0 (got {sy:.3e}, {sBs:.3e})")
    return B - xp.outer(Bs, Bs) / sBs + xp.outer(y, y) / sy


def sr1_update(B: Any, s: Any, y: Any, r: float = 1e-8) -> tuple[Any, bool]:
    """Dense SR1 update B⁺ = B + (y − Bs)(y − Bs)ᵀ / (y − Bs)ᵀs ([NW06] eq. 6.24).

    Returns ``(B_new, skipped)``; when :func:`sr1_skip` says so, ``B_new`` is a copy of B.
    """
    xp = backend.namespace(B, s, y)
    Bs = B @ s
    if sr1_skip(s, y, Bs, r):
        return B.copy(), True
    v = y - Bs
    return B + xp.outer(v, v) / float(v @ s), False


def sr1_inverse_update(H: Any, s: Any, y: Any, r: float = 1e-8) -> tuple[Any, bool]:
    """Dense inverse SR1 update H⁺ = H + (s − Hy)(s − Hy)ᵀ / (s − Hy)ᵀy ([NW06] eq. 6.25), skip rule
    |yᵀ(s − Hy)| ≥ r‖y‖‖s − Hy‖ ([RD16] Alg. 2 line 19). SR1 is self-dual: this is
    :func:`sr1_update` with the roles of s and y exchanged. Returns ``(H_new, skipped)``."""
    return sr1_update(H, y, s, r)
