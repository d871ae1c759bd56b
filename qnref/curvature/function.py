"""Optimizers on plain functions f: Rⁿ → R (Rosenbrock, logistic regression written by hand, …).

:class:`FunctionProblem` gives any optimizer the protocol of :mod:`qnref.curvature.protocol`:
``batch``/``sample``/``full``/``subset`` all return one :class:`FunctionObjective` whose points
have ``value``, ``grad`` and ``hvp`` from the given callables. Each ``full()``/``batch()`` call
counts one epoch; each evaluation counts passes as for a network with one example.

The output-space products see f as the loss of the **identity network on one example**: z = θ
(outputs of shape (1, n)), J = I, ℓ = f, H_L = ∇²f, so ``jvp(v)`` = v, ``vjp(u)`` = u₀,
``ggn_vp`` = ``hvp`` (J ᵀ H_L J = ∇²f), ``per_example_grads`` = [∇f], the empirical Fisher
∇f ∇fᵀ and ``gram("grad")`` = [‖∇f‖²]. There is no predictive distribution and no layer
structure: ``sampled_targets`` and ``layer_stats`` raise
:class:`~qnref.curvature.protocol.UnsupportedProductError`, as does every curvature product when
no ``hvp`` callable was given.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy

from .. import backend
from .derived import PointProducts, is_empirical
from .objective import NonFiniteError, PassCounter
from .protocol import UnsupportedProductError
from .structure import OpaqueModel, layout_of


class FunctionPoint(PointProducts):
    """f at one θ; the primitives of the identity-network view (see the module docstring)."""

    def __init__(self, obj: "FunctionObjective", theta: Any):
        self.obj, self.theta = obj, theta
        self.value = float(obj.fun(theta))
        obj.counter.add("forward", 1, "forward")
        self._grad = None

    N = 1

    @property
    def xp(self) -> Any:
        return backend.namespace(self.theta)

    @property
    def layout(self) -> Any:
        return layout_of([("theta", (int(self.theta.shape[0]),))])

    @property
    def z(self) -> Any:
        """The outputs of the identity network: θ as one example, (1, n)."""
        return self.theta[None]

    @property
    def grad(self) -> Any:
        if self._grad is None:
            self.obj.counter.add("backward", 1, "grad")
            self._grad = self.obj.grad_fn(self.theta)
        return self._grad

    def _hessian_fn(self) -> Callable:
        if self.obj.hvp_fn is None:
            raise UnsupportedProductError("this FunctionObjective has no Hessian-vector product (pass hvp= to build "
                                          "it); use a first-order or quasi-Newton method")
        return self.obj.hvp_fn

    def hvp(self, v: Any) -> Any:
        """∇²f v from the ``hvp`` callable."""
        hv = self._hessian_fn()
        self.check_direction(v)
        self.obj.counter.add("rforward", 1)
        self.obj.counter.add("rbackward", 1, "hvp")
        return hv(self.theta, v)

    #: Override: J = I, so G = ∇²f and the product is the Hessian's (no detour through jvp/vjp).
    ggn_vp = hvp

    # -- primitives of the identity network ---------------------------------------------------
    def local_jvp(self, v: Any) -> Any:
        self.obj.counter.add("rforward", 1)
        return v[None]

    def local_vjp(self, u: Any, call: str) -> Any:
        self.obj.counter.add("backward", 1, call)
        return u[0].copy()

    def local_loss_hvp(self, u: Any) -> Any:
        hv = self._hessian_fn()
        self.obj.counter.add("rbackward", 1)
        return hv(self.theta, u[0])[None]

    def local_output_grads(self, targets: Any) -> Any:
        if not is_empirical(targets):
            raise self._no_targets()
        return self.grad[None]

    def per_example_grads(self, targets: Any = "empirical") -> Any:
        return self.local_output_grads(targets).copy()

    def _no_targets(self) -> UnsupportedProductError:
        return UnsupportedProductError("a plain function has no predictive distribution to sample targets from; "
                                       "use the empirical Fisher or the Hessian")

    def sampled_targets(self) -> Any:
        raise self._no_targets()

    def layer_stats(self, targets: Any = "empirical", reduce: Any = None) -> dict:
        raise UnsupportedProductError("layer_stats needs a network with Kronecker layers; a plain function has none")


class FunctionObjective:
    """f, ∇f and optionally ∇²f v given as Python callables on 1-D arrays (``n``: θ's length, for ``layout``)."""

    def __init__(self, fun: Callable, grad: Callable, hvp: Callable | None = None, counter: PassCounter | None = None,
                 n: int | None = None):
        self.fun, self.grad_fn, self.hvp_fn = fun, grad, hvp
        self.counter = counter if counter is not None else PassCounter()
        self.n_samples = 1
        self.n = n
        self.l2 = 0.0
        self.xp = numpy

    @property
    def layout(self) -> Any:
        if self.n is None:
            raise UnsupportedProductError("the layout of a FunctionObjective built without n; pass n= (θ's length)")
        return layout_of([("theta", (int(self.n),))])

    @property
    def model(self) -> OpaqueModel:
        """The :class:`~qnref.curvature.protocol.ModelStructure`: one block, no Kronecker layers."""
        return OpaqueModel(self.fun, self.layout, "plain-function")

    def at(self, theta: Any) -> FunctionPoint:
        if not backend.all_finite(theta):
            raise NonFiniteError("theta contains NaN or Inf")
        return FunctionPoint(self, theta)

    def subset(self, idx: Any) -> "FunctionObjective":
        """The one 'example' is every subset."""
        return self

    def value(self, theta: Any) -> float:
        return self.at(theta).value


class FunctionProblem:
    """A deterministic 'data set' of one function: every draw is the same objective."""

    def __init__(self, fun: Callable, grad: Callable, hvp: Callable | None = None, seed: int = 0, n: int | None = None):
        self.objective = FunctionObjective(fun, grad, hvp, n=n)
        self.counter = self.objective.counter
        self.rng = numpy.random.default_rng(seed)
        self.device_rng = self.rng
        self.n_samples = 1
        self.samples_drawn = 0
        self.l2 = 0.0
        self.xp = numpy

    @property
    def model(self) -> OpaqueModel:
        return self.objective.model

    @property
    def layout(self) -> Any:
        return self.objective.layout

    @property
    def epochs(self) -> float:
        return float(self.samples_drawn)

    def full(self) -> FunctionObjective:
        self.samples_drawn += 1
        return self.objective

    def batch(self, size: int | None = None) -> FunctionObjective:
        return self.full()

    def sample(self, size: int | None = None) -> FunctionObjective:
        return self.objective

    def subset(self, idx: Any) -> FunctionObjective:
        return self.objective

    @property
    def full_objective(self) -> FunctionObjective:
        return self.objective

    def state(self) -> dict:
        return {"rng": backend.rng_state(self.rng), "samples_drawn": self.samples_drawn,
                "counter": self.counter.snapshot()}

    def load_state(self, st: dict) -> None:
        backend.set_rng_state(self.rng, st["rng"])
        self.samples_drawn = int(st["samples_drawn"])
        self.counter.restore(st["counter"])


def rosenbrock_problem(n: int = 2) -> FunctionProblem:
    """The extended Rosenbrock function Σ 100 (x_{i+1} − x_i²)² + (1 − x_i)², minimum at x = 1."""
    def f(x):
        return float((100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum())

    def g(x):
        xp = backend.namespace(x)
        out = xp.zeros_like(x)
        d = x[1:] - x[:-1] ** 2
        out[:-1] += -400.0 * x[:-1] * d - 2 * (1 - x[:-1])
        out[1:] += 200.0 * d
        return out

    def hv(x, v):
        xp = backend.namespace(x)
        out = xp.zeros_like(x)
        d = x[1:] - x[:-1] ** 2
        # ∂²/∂x_i² = −400 d + 800 x_i² + 2 ; ∂²/∂x_i∂x_{i+1} = −400 x_i ; ∂²/∂x_{i+1}² += 200
        out[:-1] += (-400.0 * d + 800.0 * x[:-1] ** 2 + 2.0) * v[:-1] - 400.0 * x[:-1] * v[1:]
        out[1:] += 200.0 * v[1:] - 400.0 * x[:-1] * v[:-1]
        return out

    return FunctionProblem(f, g, hv, n=n)
