"""Explicit n × n curvature matrices for small models: the oracles the tests trust.

Two independent routes are offered for each matrix:

- *finite differences* (``method="fd"``): central differences of the gradient (Hessian) or of the
  network outputs (Jacobian), with the output-space Hessian of the loss written out explicitly
  (:meth:`~qnref.nn.losses.Loss.hessian`). They share no code with the R-op products.
- *products* (``method="products"``): n matrix-vector products with the unit vectors, for larger
  models where finite differences are too slow or too noisy.

All conventions match :class:`~qnref.curvature.objective.Objective`: mean over the batch, the L2
term in H and G but not in F.
"""
from __future__ import annotations

from typing import Any

from .. import backend
from .objective import Objective


def _unit_columns(obj: Objective, theta: Any, product) -> Any:
    xp = backend.namespace(theta)
    n = theta.shape[0]
    eye = xp.eye(n, dtype=theta.dtype)
    return xp.stack([product(eye[i]) for i in range(n)], axis=1)


def jacobian_fd(obj: Objective, theta: Any, eps: float = 1e-6) -> Any:
    """Per-example output Jacobians ∂zᵢ/∂θ by central differences, shape (N, C, n)."""
    xp = backend.namespace(theta)
    n = theta.shape[0]
    cols = []
    for i in range(n):
        e = xp.zeros_like(theta)
        e[i] = eps
        zp, _ = obj.model.forward(theta + e, obj.X, train=obj.train)
        zm, _ = obj.model.forward(theta - e, obj.X, train=obj.train)
        cols.append(((zp - zm) / (2 * eps)).reshape(zp.shape[0], -1))
    return xp.stack(cols, axis=2)


def gradient_fd(obj: Objective, theta: Any, eps: float = 1e-6) -> Any:
    """∇f by central differences of f."""
    xp = backend.namespace(theta)
    g = xp.empty_like(theta)
    for i in range(theta.shape[0]):
        e = xp.zeros_like(theta)
        e[i] = eps
        g[i] = (obj.value(theta + e) - obj.value(theta - e)) / (2 * eps)
    return g


def hessian(obj: Objective, theta: Any, method: str = "fd", eps: float = 1e-5) -> Any:
    """The n × n Hessian of f: central differences of the analytic gradient, or n exact H eᵢ."""
    if method == "products":
        return _unit_columns(obj, theta, lambda v: obj.hvp(theta, v))
    if method != "fd":
        raise ValueError(f"method must be 'fd' or 'products', got {method!r}")
    xp = backend.namespace(theta)
    n = theta.shape[0]
    H = xp.empty((n, n), dtype=theta.dtype)
    for i in range(n):
        e = xp.zeros_like(theta)
        e[i] = eps
        H[:, i] = (obj.grad(theta + e) - obj.grad(theta - e)) / (2 * eps)
    return H


def output_hessians(obj: Objective, theta: Any) -> Any:
    """Explicit per-example loss Hessians H_{L,i} w.r.t. the outputs, (N, C, C)."""
    z, _ = obj.model.forward(theta, obj.X, train=obj.train)
    return obj.loss.hessian(z, obj.y)


def ggn(obj: Objective, theta: Any, method: str = "fd", eps: float = 1e-6) -> Any:
    """G = (1/N) Σᵢ Jᵢᵀ H_{L,i} Jᵢ + λI with explicit Jacobians (``fd``) or n products."""
    if method == "products":
        return _unit_columns(obj, theta, lambda v: obj.ggn_vp(theta, v))
    xp = backend.namespace(theta)
    J = jacobian_fd(obj, theta, eps)
    HL = output_hessians(obj, theta)
    G = xp.einsum("ica,icd,idb->ab", J, HL, J) / J.shape[0]
    return G + obj.l2 * xp.eye(theta.shape[0], dtype=theta.dtype)


def per_example_grads_fd(obj: Objective, theta: Any, eps: float = 1e-6, targets: Any = None) -> Any:
    """Rows ∇ℓᵢ = Jᵢᵀ ∂ℓ/∂zᵢ with finite-difference Jacobians, (N, n)."""
    xp = backend.namespace(theta)
    J = jacobian_fd(obj, theta, eps)
    z, _ = obj.model.forward(theta, obj.X, train=obj.train)
    dz = obj.loss.dz(z, obj.y if targets is None else targets).reshape(z.shape[0], -1)
    return xp.einsum("icn,ic->in", J, dz)


def fisher(obj: Objective, theta: Any, kind: str = "empirical", method: str = "fd", eps: float = 1e-6, targets: Any = None) -> Any:
    """F = (1/N) Σᵢ gᵢ gᵢᵀ (empirical: true targets, or the given ``targets``), or the exact
    expectation (1/N) Σᵢ Jᵢᵀ H_{L,i} Jᵢ for ``kind="exact"``. No L2 term."""
    xp = backend.namespace(theta)
    if kind == "exact":
        J = jacobian_fd(obj, theta, eps)
        return xp.einsum("ica,icd,idb->ab", J, output_hessians(obj, theta), J) / J.shape[0]
    if kind != "empirical":
        raise ValueError("dense fisher: kind must be 'empirical' or 'exact' (pass sampled targets via targets=)")
    if method == "products":
        return _unit_columns(obj, theta, lambda v: obj.fisher_vp(theta, v, "empirical"))
    P = per_example_grads_fd(obj, theta, eps, targets)
    return P.T @ P / P.shape[0]
