"""Explicit n × n curvature matrices for small models: the oracles the tests trust.

Two independent routes are offered for the Hessian and the GGN:

- *exact* (``method="exact"``, the default; ``"products"`` is the same route under its old name):
  n exact matrix-vector products with the unit vectors (``H eᵢ`` through :meth:`Objective.hvp`,
  ``G eᵢ`` through :meth:`Objective.ggn_vp`), exact to rounding (float64: ~1e-15 relative); the
  oracle to compare a framework's dense Hessian/GGN with;
- *finite differences* (``method="fd"``, explicit): central differences of the gradient (Hessian) or of the
  network outputs (Jacobian), with the output-space Hessian of the loss written out explicitly
  (:meth:`~qnref.nn.losses.Loss.hessian`). They share no code with the R-op products. ``order=2``
  is the 3-point stencil (error O(ε²)); ``order=4`` the 5-point stencil (error O(ε⁴), use
  ε ≈ 1e-3 for ~1e-11 relative accuracy in float64). Use them to test the R-op products
  themselves (``H v`` against ``hessian(..., method="fd") @ v``); the default ~1e-10 error is too
  large for an oracle of other exact products.

``fisher`` keeps ``method="fd"`` as its default (``"products"`` for the exact route).

All conventions match :class:`~qnref.curvature.objective.Objective`: mean over the batch, the L2
term in H and G but not in F.
"""
from __future__ import annotations

from typing import Any

from .. import backend
from .objective import Objective


#: central-difference stencils {order: ((k, wₖ), …)}: ∂f/∂θᵢ ≈ Σₖ wₖ (f(θ + kεeᵢ) − f(θ − kεeᵢ)) / ε
_STENCILS = {2: ((1, 0.5),), 4: ((1, 2.0 / 3.0), (2, -1.0 / 12.0))}


def _unit_columns(obj: Objective, theta: Any, product) -> Any:
    xp = backend.namespace(theta)
    n = theta.shape[0]
    eye = xp.eye(n, dtype=theta.dtype)
    return xp.stack([product(eye[i]) for i in range(n)], axis=1)


def central_difference(fun, theta: Any, i: int, eps: float, order: int = 2) -> Any:
    """∂fun/∂θᵢ at θ by the central stencil of ``order`` (2: 3-point, 4: 5-point)."""
    if order not in _STENCILS:
        raise ValueError(f"order must be one of {sorted(_STENCILS)}, got {order!r}")
    xp = backend.namespace(theta)
    total = 0
    for k, w in _STENCILS[order]:
        e = xp.zeros_like(theta)
        e[i] = k * eps
        total = total + w * (fun(theta + e) - fun(theta - e))
    return total / eps


def jacobian_fd(obj: Objective, theta: Any, eps: float = 1e-6, order: int = 2) -> Any:
    """Per-example output Jacobians ∂zᵢ/∂θ by central differences, shape (N, C, n)."""
    xp = backend.namespace(theta)

    def outputs(t):
        z, _ = obj.model.forward(t, obj.X, train=obj.train)
        return z.reshape(z.shape[0], -1)

    return xp.stack([central_difference(outputs, theta, i, eps, order) for i in range(theta.shape[0])], axis=2)


def gradient_fd(obj: Objective, theta: Any, eps: float = 1e-6, order: int = 2) -> Any:
    """∇f by central differences of f."""
    xp = backend.namespace(theta)
    g = xp.empty_like(theta)
    for i in range(theta.shape[0]):
        g[i] = central_difference(obj.value, theta, i, eps, order)
    return g


_METHODS = ("exact", "fd", "products")


def _check_method(method: Any) -> str:
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"method must be 'exact' (n exact products with unit vectors, the default), 'fd' (finite "
                         f"differences) or 'products' (= 'exact'), got {method!r}")
    return "exact" if method == "products" else method


def hessian(obj: Objective, theta: Any, method: str = "exact", eps: float = 1e-5, order: int = 2) -> Any:
    """The n × n Hessian of f: n exact products H eᵢ (``method="exact"``, default) or central
    differences of the analytic gradient (``method="fd"``; ``eps``/``order`` apply to it only)."""
    if _check_method(method) == "exact":
        return _unit_columns(obj, theta, lambda v: obj.hvp(theta, v))
    xp = backend.namespace(theta)
    n = theta.shape[0]
    H = xp.empty((n, n), dtype=theta.dtype)
    for i in range(n):
        H[:, i] = central_difference(obj.grad, theta, i, eps, order)
    return H


def output_hessians(obj: Objective, theta: Any) -> Any:
    """Explicit per-example loss Hessians H_{L,i} w.r.t. the outputs, (N, C, C)."""
    z, _ = obj.model.forward(theta, obj.X, train=obj.train)
    return obj.loss.hessian(z, obj.y)


def ggn(obj: Objective, theta: Any, method: str = "exact", eps: float = 1e-6, order: int = 2) -> Any:
    """G = (1/N) Σᵢ Jᵢᵀ H_{L,i} Jᵢ + λI: n exact products G eᵢ (``method="exact"``, default) or explicit
    finite-difference Jacobians with the loss's explicit output Hessians (``method="fd"``)."""
    if _check_method(method) == "exact":
        return _unit_columns(obj, theta, lambda v: obj.ggn_vp(theta, v))
    xp = backend.namespace(theta)
    J = jacobian_fd(obj, theta, eps, order)
    HL = output_hessians(obj, theta)
    G = xp.einsum("ica,icd,idb->ab", J, HL, J) / J.shape[0]
    return G + obj.l2 * xp.eye(theta.shape[0], dtype=theta.dtype)


def per_example_grads_fd(obj: Objective, theta: Any, eps: float = 1e-6, targets: Any = None, order: int = 2) -> Any:
    """Rows ∇ℓᵢ = Jᵢᵀ ∂ℓ/∂zᵢ with finite-difference Jacobians, (N, n)."""
    xp = backend.namespace(theta)
    J = jacobian_fd(obj, theta, eps, order)
    z, _ = obj.model.forward(theta, obj.X, train=obj.train)
    dz = obj.loss.dz(z, obj.y if targets is None else targets).reshape(z.shape[0], -1)
    return xp.einsum("icn,ic->in", J, dz)


def fisher(obj: Objective, theta: Any, kind: str = "empirical", method: str = "fd", eps: float = 1e-6, targets: Any = None,
           order: int = 2) -> Any:
    """F = (1/N) Σᵢ gᵢ gᵢᵀ (empirical: true targets, or the given ``targets``), or the exact
    expectation (1/N) Σᵢ Jᵢᵀ H_{L,i} Jᵢ for ``kind="exact"``. No L2 term."""
    xp = backend.namespace(theta)
    if kind == "exact":
        J = jacobian_fd(obj, theta, eps, order)
        return xp.einsum("ica,icd,idb->ab", J, output_hessians(obj, theta), J) / J.shape[0]
    if kind != "empirical":
        raise ValueError("dense fisher: kind must be 'empirical' or 'exact' (pass sampled targets via targets=)")
    if method == "products":
        return _unit_columns(obj, theta, lambda v: obj.fisher_vp(theta, v, "empirical"))
    P = per_example_grads_fd(obj, theta, eps, targets, order)
    return P.T @ P / P.shape[0]
