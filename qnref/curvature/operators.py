"""Linear-operator views of the curvature matrices at one θ.

``as_operator(point, "hessian" | "ggn" | "fisher")`` returns a ``scipy.sparse.linalg.LinearOperator``
for NumPy points and a ``cupyx.scipy.sparse.linalg.LinearOperator`` for CuPy points (imported
lazily: cupyx fails to import without a GPU), so iterative solvers (CG, MINRES, Lanczos
eigenvalue estimates) apply directly:

    >>> op = as_operator(obj.at(theta), "ggn")
    >>> scipy.sparse.linalg.eigsh(op, k=1)        # largest GGN eigenvalue

The operators are symmetric; ``rmatvec`` is ``matvec``.
"""
from __future__ import annotations

from typing import Any

from .. import backend
from .objective import Point

KINDS = ("hessian", "ggn", "fisher", "fisher_sampled", "fisher_exact")


def _product(point: Point, kind: str):
    if kind == "hessian":
        return point.hvp
    if kind == "ggn":
        return point.ggn_vp
    if kind == "fisher":
        return lambda v: point.fisher_vp(v, "empirical")
    if kind == "fisher_sampled":
        return lambda v: point.fisher_vp(v, "sampled")
    if kind == "fisher_exact":
        return lambda v: point.fisher_vp(v, "exact")
    raise ValueError(f"unknown operator kind {kind!r}; choose one of {KINDS}")


def as_operator(point: Point, kind: str = "hessian") -> Any:
    """A symmetric LinearOperator of the ``kind`` matrix at ``point`` (n × n)."""
    prod = _product(point, kind)
    n = point.theta.shape[0]
    dtype = point.theta.dtype

    def matvec(v):
        return prod(v.reshape(-1).astype(dtype, copy=False))

    if backend.is_cupy_array(point.theta):
        from cupyx.scipy.sparse.linalg import LinearOperator  # noqa: PLC0415 - GPU only
    else:
        from scipy.sparse.linalg import LinearOperator  # noqa: PLC0415 - light import path
    return LinearOperator((n, n), matvec=matvec, rmatvec=matvec, dtype=dtype)
