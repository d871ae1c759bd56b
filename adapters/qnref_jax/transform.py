"""qnref optimizers as optax-style ``GradientTransformationExtraArgs`` (``optax.lbfgs``'s calling convention).

::

    tx = qnref_jax.transformation("lbfgs", learning_rate=None)      # or a qnref optimizer instance
    state = tx.init(params)
    for _ in range(steps):
        value, grad = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=loss_fn)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)     # optax.apply_updates

``update(updates, state, params, *, value=None, grad=None, value_fn=None, **extra)``:

* with ``problem=`` (a :class:`~qnref_jax.objective.JaxProblem`, e.g. ``JaxProblem.from_spec``)
  every registered method runs one qnref step on that problem (it draws its own batches; the
  incoming gradients, ``value`` and ``value_fn`` are not used);
* without a problem, ``value_fn(params) -> scalar`` is the objective (optax.lbfgs's convention):
  each evaluation a method asks for (trial points of line searches and trust regions) calls
  ``jax.value_and_grad(value_fn)`` at that θ; ``value``/``grad`` at ``params`` are used as given
  (no re-evaluation there). Methods that need more than f and ∇f
  (:data:`qnref.curvature.protocol.OPTIMIZER_NEEDS`) are refused at construction;
* pure first-order methods (SGD, momentum, Adam, RMSprop, AdaGrad, AdaDelta) need neither: they
  use the incoming gradient.

``learning_rate``: a number or a schedule ``count -> lr`` (optax schedules are such callables); the
step number is the state's ``count``, the schedule evaluated in the params' precision (float64
params: inside the x64 scope). It sets the method's ``lr`` hyperparameter, or, for methods
without one, scales the step the method returns (as :class:`qnref_torch.QNRefOptimizer` does).

State: :class:`QNRefState`, a NamedTuple of arrays (``count``: int32 scalar; ``manifest``: the
qnref state's schema as UTF-8 bytes in a uint8 array; ``arrays``: a dict of the state's arrays by
name), built with qnref's checkpoint encoding, so ``jax.tree_util``, orbax and flax serialization
handle it and a restored state resumes bit-identically. The keys of ``arrays`` may change between
steps (KFAC's factors appear at its first step): restore without a target (orbax/flax raw restore)
or with :func:`state_to_arrays` / :func:`state_from_arrays` (a flat dict for ``numpy.savez``); a
target from ``tx.init(params)`` fits only while the structure is unchanged (L-BFGS, L-SR1, Adam
preallocate theirs). With ``problem=``, the problem's batch stream is not in the state (save
``problem.state()`` alongside and ``problem.load_state`` it).

float64: when a leaf of ``params`` is float64, the JAX calls run inside ``jax.enable_x64(True)``
(scoped; the process-wide flag is left alone). ``update`` runs host-side NumPy code: calling it
inside ``jax.jit`` / ``lax.scan`` raises a ``TypeError`` saying so (no ``pure_callback`` path).

optax (the ``jax`` extra installs it): when optax is importable, :func:`transformation` returns a
genuine ``optax.GradientTransformationExtraArgs``, so it goes into ``optax.chain`` and
``optax.apply_updates``; without optax it returns this module's NamedTuple of the same two fields.

``optax.chain``: a pure first-order method transforms the incoming ``updates`` (e.g.
``optax.chain(optax.clip_by_global_norm(1.0), qnref_jax.transformation("adam"))`` clips the
gradient first). A method that re-evaluates f and ∇f (line search, trust region, quasi-Newton,
problem= methods) takes its gradient at ``params`` from ``grad=`` / ``value_fn`` itself, so a
transformation *before* it cannot act on its step: when ``grad=`` is given and the incoming
``updates`` differ from it, ``update`` raises a ``ValueError`` saying so. Transformations *after*
it (``optax.chain(tx, optax.scale(0.5))``) act on its step as usual.
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, NamedTuple

import numpy

from qnref import checkpoint
from qnref.curvature.objective import NonFiniteError, PassCounter
from qnref.curvature.protocol import optimizer_needs
from qnref.optim.base import Problem
from qnref.optim.registry import make_optimizer

from .objective import _pure_first_order, has_float64, x64_scope

__all__ = ["QNRefState", "GradientTransformationExtraArgs", "transformation", "requirement", "state_to_arrays",
           "state_from_arrays"]


try:  # optax >= 0.2 (the jax extra); the NamedTuple below stands in without it
    from optax import GradientTransformationExtraArgs as _OptaxGTX
except ImportError:  # pragma: no cover - optax is in the jax extra
    _OptaxGTX = None


class GradientTransformationExtraArgs(NamedTuple):
    """optax's ``GradientTransformationExtraArgs`` shape: ``init(params)``, ``update(updates, state, params, **extra)``.

    Used only when optax is not importable; otherwise :func:`transformation` returns optax's own class."""

    init: Callable
    update: Callable


def _same_tree(a: Any, b: Any) -> bool:
    import jax

    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    if ta != tb:
        return False
    return all(x is y or numpy.array_equal(numpy.asarray(x), numpy.asarray(y)) for x, y in zip(la, lb))


class QNRefState(NamedTuple):
    """The transformation's state: a pytree of arrays only (see the module docstring)."""

    count: Any
    manifest: Any
    arrays: dict


def state_to_arrays(state: QNRefState) -> dict:
    """A flat ``{name: numpy array}`` of the state (``numpy.savez(f, **d)``, any array store).

    The keys of ``state.arrays`` can change between steps (KFAC's factors appear at its first step,
    a growing memory adds arrays), so restoring into the structure of ``tx.init(params)`` works only
    while the structure is unchanged; :func:`state_from_arrays` needs no target."""
    out = {"count": numpy.asarray(state.count), "manifest": numpy.asarray(state.manifest)}
    out.update({"arrays/" + k: numpy.asarray(v) for k, v in state.arrays.items()})
    return out


def state_from_arrays(data: Any) -> QNRefState:
    """The :class:`QNRefState` of a :func:`state_to_arrays` dict (or a ``numpy.load`` of its ``savez``)."""
    import jax.numpy as jnp

    keys = list(data.keys())
    missing = {"count", "manifest"} - set(keys)
    if missing:
        raise ValueError(f"not a qnref_jax state: {sorted(missing)} missing")
    arrays = {k[len("arrays/"):]: numpy.array(data[k]) for k in keys if k.startswith("arrays/")}
    return QNRefState(jnp.asarray(numpy.asarray(data["count"]), jnp.int32), numpy.array(data["manifest"]), arrays)


requirement = optimizer_needs  # "grad", "curvature" or "layers" (qnref.curvature.protocol.OPTIMIZER_NEEDS)


def _in_trace(tree: Any) -> bool:
    import jax

    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def _encode(state: Any) -> tuple[Any, dict]:
    node, arrays = checkpoint.encode(state, type(state))
    return numpy.frombuffer(json.dumps(node).encode(), dtype=numpy.uint8).copy(), arrays


def _decode(manifest: Any, arrays: dict, cls: type) -> Any:
    node = json.loads(bytes(numpy.asarray(manifest, dtype=numpy.uint8)).decode())
    return checkpoint.decode(node, {k: numpy.array(v) for k, v in arrays.items()}, cls, path="<QNRefState>")


class _FnPoint:
    """f and ∇f of ``value_fn`` at one θ (``value``/``grad`` given for the current params)."""

    def __init__(self, obj: "_FnObjective", theta: Any, known: tuple | None = None):
        self.obj, self.theta = obj, theta
        if known is not None:
            self.value, self.grad = known
        else:
            v, g = obj.vg(theta)
            self.value, self.grad = v, g
            obj.counter.add("forward", 1, "forward")
            obj.counter.add("backward", 1, "grad")

    def hvp(self, v: Any) -> Any:
        raise NotImplementedError("value_fn gives f and ∇f only; pass problem=JaxProblem(...) for curvature products")

    ggn_vp = hvp


class _FnObjective:
    def __init__(self, vg: Callable, theta0: Any, known: tuple, counter: PassCounter):
        self.vg, self.theta0, self.known, self.counter = vg, theta0, known, counter
        self.l2 = 0.0
        self.n_samples = 1

    def at(self, theta: Any) -> _FnPoint:
        if not numpy.all(numpy.isfinite(theta)):
            raise NonFiniteError("theta contains NaN or Inf")
        if self.known is not None and theta.shape == self.theta0.shape and numpy.array_equal(theta, self.theta0):
            return _FnPoint(self, theta, self.known)
        return _FnPoint(self, theta)


class _FnProblem:
    """Every draw is ``value_fn``'s objective (like torch's closure mode)."""

    def __init__(self, obj: _FnObjective, rng: numpy.random.Generator):
        self._obj, self.rng, self.device_rng, self.counter = obj, rng, rng, obj.counter
        self.l2, self.samples_drawn = 0.0, 0

    n_samples = 1

    @property
    def epochs(self) -> float:
        return float(self.samples_drawn)

    def _check_size(self, size, what="batch size"):
        return int(size)      # value_fn decides the data

    def batch(self, size=None):
        self.samples_drawn += 1
        return self._obj

    def sample(self, size=None):
        return self._obj

    def full(self):
        return self._obj

    @property
    def full_objective(self):
        return self._obj

    def subset(self, idx):
        return self._obj


def transformation(optimizer: Any, *, problem: Any = None, learning_rate: Any = None, seed: int = 0,
                   **hyperparameters: Any) -> GradientTransformationExtraArgs:
    """An optax-style transformation running the qnref ``optimizer`` (instance or registry name)."""
    if isinstance(optimizer, str):
        optimizer = make_optimizer(optimizer, **hyperparameters)
    elif hyperparameters:
        raise TypeError(f"hyperparameters {sorted(hyperparameters)} are for a registry name")
    name = getattr(optimizer, "name", type(optimizer).__name__)
    need = requirement(optimizer)
    pure = _pure_first_order(optimizer)
    if problem is not None and not isinstance(problem, Problem):
        raise TypeError(f"problem must be a JaxProblem (qnref Problem), got {type(problem).__name__}")
    if problem is None and need != "grad":
        raise ValueError(f"optimizer {name!r} needs {'per-layer Kronecker taps' if need == 'layers' else 'curvature products'}"
                         ", which value_fn (f and ∇f only) cannot give: pass problem=JaxProblem.from_spec(spec, loss, X, y)"
                         " (or JaxProblem(apply_fn, ...) for methods that need no layer structure)")
    if problem is not None and need == "layers" and not getattr(problem, "converted", False):
        raise ValueError(f"optimizer {name!r} needs per-layer Kronecker taps, which a JaxProblem over an apply_fn "
                         "cannot give: use JaxProblem.from_spec(spec, loss, X, y)")
    native_lr = "lr" in optimizer.hyperparameters()
    if learning_rate is not None and not callable(learning_rate):
        lr0 = float(learning_rate)
        if not (math.isfinite(lr0) and lr0 > 0):
            raise ValueError(f"learning_rate must be finite and > 0 or a schedule, got {learning_rate!r}")
    rng = numpy.random.default_rng(seed)
    counter = PassCounter()
    cache: dict = {}

    def _opt_at(count: int) -> tuple[Any, float]:
        if learning_rate is None:
            return optimizer, 1.0
        lr = float(learning_rate(count)) if callable(learning_rate) else float(learning_rate)
        if not native_lr:
            return optimizer, lr
        key = lr
        if key not in cache:
            cache.clear()
            cache[key] = type(optimizer)(**{**optimizer.hyperparameters(), "lr": lr})
        return cache[key], 1.0

    def _theta(params: Any) -> numpy.ndarray:
        from jax.flatten_util import ravel_pytree

        if problem is not None:
            return numpy.array(problem.get_theta(params))
        return numpy.array(ravel_pytree(params)[0])

    def _unravel(params: Any, theta: Any) -> Any:
        from jax.flatten_util import ravel_pytree

        if problem is not None:
            return problem.unravel(theta)
        return ravel_pytree(params)[1](theta)

    def init(params: Any) -> QNRefState:
        if _in_trace(params):
            raise TypeError("qnref transformations run host-side NumPy code and cannot be traced: call init/update "
                            "outside jax.jit / lax.scan")
        import jax.numpy as jnp

        with x64_scope(has_float64(params)):
            st = optimizer.init(_theta(params))
            manifest, arrays = _encode(st)
            return QNRefState(jnp.zeros((), jnp.int32), manifest, arrays)

    def update(updates: Any, state: QNRefState, params: Any = None, *, value: Any = None, grad: Any = None,
               value_fn: Callable | None = None, **extra: Any) -> tuple[Any, QNRefState]:
        if params is None:
            raise ValueError("qnref transformations need params: update(grads, state, params, ...)")
        if _in_trace((updates, params, state.arrays)):
            raise TypeError("qnref transformations run host-side NumPy code and cannot be traced: call update "
                            "outside jax.jit / lax.scan (a jitted value_fn is fine)")
        import jax
        import jax.numpy as jnp
        from jax.flatten_util import ravel_pytree

        with x64_scope(has_float64(params)):
            count = int(state.count)
            opt, scale = _opt_at(count)
            theta = _theta(params)
            inner = _decode(state.manifest, state.arrays, type(opt.init(theta)))
            if not pure and grad is not None and not _same_tree(updates, grad):
                raise ValueError(f"optimizer {name!r} evaluates f and ∇f at params itself (value_fn / problem=), so the "
                                 "incoming updates, which differ from grad=, cannot act on its step: a transformation "
                                 "before it in optax.chain is not meaningful. Chain transformations after it "
                                 "(optax.chain(tx, optax.scale(...))) or use a first-order method (sgd, adam, ...) "
                                 "after the gradient transformation")
            if problem is not None:
                new_theta, inner, _ = opt.step(theta, inner, problem)
            elif pure:
                g = numpy.array(ravel_pytree(updates)[0])      # the incoming updates (after any chained transform)
                delta, inner = opt._update(theta, g, inner)
                new_theta = theta + delta
            else:
                if value_fn is None:
                    raise ValueError(f"optimizer {name!r} re-evaluates the objective: pass value_fn=loss_fn to update "
                                     "(optax.lbfgs's convention) or build the transformation with problem=")
                unravel = ravel_pytree(params)[1]
                vg_jax = jax.value_and_grad(lambda t: value_fn(unravel(t)))

                def vg(t):
                    v, g = vg_jax(jnp.asarray(t))
                    return float(v), numpy.array(g)

                g0 = updates if grad is None else grad
                known = None if value is None else (float(value), numpy.array(ravel_pytree(g0)[0]))
                fp = _FnProblem(_FnObjective(vg, theta, known, counter), rng)
                new_theta, inner, _ = opt.step(theta, inner, fp)
            delta = (new_theta - theta) * scale if scale != 1.0 else new_theta - theta
            manifest, arrays = _encode(inner)
            out = _unravel(params, jnp.asarray(delta.astype(theta.dtype)))
            return out, QNRefState(jnp.asarray(count + 1, jnp.int32), manifest, arrays)

    if _OptaxGTX is not None:
        return _OptaxGTX(init, update)
    return GradientTransformationExtraArgs(init, update)
