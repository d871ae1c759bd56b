"""qnref's objective protocol over a pure JAX model, and an optax-style wrapper of qnref optimizers.

``JaxObjective(apply_fn, loss, params, X, y, l2)`` — f(θ) = loss(apply_fn(unravel(θ), X), y) +
(λ/2)‖θ‖² where θ = ``jax.flatten_util.ravel_pytree(params)[0]`` (the pytree's leaves in
``jax.tree_util`` order, each flattened row-major). ``loss`` is a qnref name (qnref's exact
conventions, :func:`qnref_jax.compare.jax_loss`) or any ``loss(z, y) -> scalar``.
``obj.at(θ)`` returns a :class:`JaxPoint` implementing the point protocol of
:mod:`qnref.curvature.protocol`: primitives ``value``, ``grad``, ``z``, ``hvp(v)`` (jvp of grad),
``local_jvp``, ``local_vjp``, ``local_loss_hvp``/``local_output_grads`` (``vmap`` over examples of
the loss on a batch of one, ℓᵢ = loss(zᵢ[None], yᵢ[None])), ``per_example_grads``,
``sampled_targets`` (``jax.random`` draws); derived products inherited from
:class:`~qnref.curvature.derived.PointProducts` (``jvp``, ``vjp``, ``ggn_vp``, ``fisher_vp`` kinds
"empirical", "sampled" (own draws or explicit targets), "exact" = GGN without L2, ``gram``), the
Gauss-Newton data term overridden by one fused jitted function (faster: one XLA call instead of
three). ``layer_stats`` raises :class:`~qnref.curvature.protocol.UnsupportedProductError` (an
``apply_fn`` has no Kronecker layer structure). :class:`JaxProblem` is qnref's
:class:`~qnref.optim.base.Problem` over it (same batch stream for the same seed). Value, gradient
and products are ``jax.jit``-compiled per batch shape.

float64: when a leaf of ``params`` is float64, every JAX call of the objective and its points runs
inside ``jax.enable_x64(True)`` (``jax.experimental.enable_x64`` in older JAX) — scoped, the
process-wide ``jax_enable_x64`` flag is left alone; float32 params compute in float32.

Copies: θ and v enter JAX with ``jnp.asarray`` (host NumPy → a JAX CPU buffer; one copy unless JAX
can alias the host memory) or ``jax.dlpack.from_dlpack`` for CuPy arrays (zero-copy on the GPU).
Results leave as *writable* NumPy/CuPy arrays — one copy, because JAX buffers are immutable and
qnref optimizers may update arrays in place.

``as_gradient_transformation(opt, problem_fn)`` — an optax-style ``(init, update)`` pair:

* first-order methods whose step is a pure function of the gradient at θ (qnref's
  ``FirstOrderOptimizer`` subclasses with ``_update(theta, g, state)`` and no look-ahead point:
  SGD, momentum, Adam, RMSprop, AdaGrad, AdaDelta) use the gradient optax passes in: ``update(grads,
  state, params)`` returns ``unravel(Δθ)``; ``params`` is required;
* every other method (line search, trust region, quasi-Newton, HF, NAG's look-ahead, SVRG) needs to
  re-evaluate f and draw batches, so it needs ``problem_fn`` — a :class:`JaxProblem` (or a
  zero-argument callable returning it); ``update`` then runs one full qnref step on that problem
  and returns ``unravel(θ_new − θ)``; the incoming gradients are ignored.

Limits: ``update`` runs host-side NumPy code, so it cannot be called inside ``jax.jit`` /
``jax.lax.scan``; the state is a Python object (not a JAX pytree) and does not go through
``optax.chain`` transformations that map over state leaves.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy

from qnref import backend
from qnref.curvature.derived import PointProducts, is_empirical
from qnref.curvature.objective import NonFiniteError, PassCounter, PointMethods
from qnref.curvature.structure import ConvertedModel, OpaqueModel, layout_of, no_layer_structure, positions
from qnref.optim.base import Problem

from .compare import jax_loss

__all__ = ["JaxObjective", "JaxPoint", "JaxProblem", "as_gradient_transformation", "GradientTransformation"]


def _to_jax(a: Any):
    import jax.numpy as jnp

    if backend.is_cupy_array(a):
        import jax.dlpack

        return jax.dlpack.from_dlpack(a)
    return jnp.asarray(a)


def _from_jax(a: Any, like: Any = None) -> Any:
    if like is not None and backend.is_cupy_array(like):
        cp = backend.xp_for_device("gpu")
        return cp.array(cp.from_dlpack(a))  # copy: JAX buffers are immutable
    return numpy.array(a)  # writable host copy


def x64_scope(on: bool = True) -> Any:
    """``jax.enable_x64(True)`` as a context (``jax.experimental.enable_x64`` in older JAX), or a no-op."""
    if not on:
        return contextlib.nullcontext()
    import jax

    cm = getattr(jax, "enable_x64", None)
    if cm is None:  # pragma: no cover - older JAX
        from jax.experimental import enable_x64 as cm
    return cm(True)


def has_float64(params: Any) -> bool:
    """True when a leaf of the pytree ``params`` is float64 (then JAX calls run in :func:`x64_scope`)."""
    import jax

    return any(numpy.dtype(getattr(a, "dtype", numpy.float64)) == numpy.float64 for a in jax.tree_util.tree_leaves(params))


def _scoped(fn: Callable) -> Callable:
    """Run a method of a JAX objective (``self``) or point (``self.obj``) inside its x64 scope."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        obj = getattr(self, "obj", self)
        with x64_scope(obj.float64):
            return fn(self, *args, **kwargs)

    return wrapper


class _Funcs:
    """The jitted functions of one (apply_fn, loss, unravel, l2)."""

    def __init__(self, apply_fn: Callable, loss_fn: Callable, unravel: Callable, l2: float):
        import jax

        self.apply_fn, self.loss_fn, self.unravel, self.l2 = apply_fn, loss_fn, unravel, l2

        def net(t, X):
            return apply_fn(unravel(t), X)

        def f(t, X, y):
            v = loss_fn(net(t, X), y)
            return v + 0.5 * l2 * (t @ t) if l2 else v

        def hvp(t, v, X, y):
            return jax.jvp(lambda s: jax.grad(f)(s, X, y), (t,), (v,))[1]

        def ggn0(t, v, X, y):
            z, jv = jax.jvp(lambda s: net(s, X), (t,), (v,))
            hjv = jax.jvp(jax.grad(lambda zz: loss_fn(zz, y)), (z,), (jv,))[1]
            return jax.vjp(lambda s: net(s, X), t)[1](hjv)[0]

        def jvp(t, v, X):
            return jax.jvp(lambda s: net(s, X), (t,), (v,))[1]

        def vjp(t, u, X):
            return jax.vjp(lambda s: net(s, X), t)[1](u)[0]

        def pex(t, X, y):
            return jax.vmap(jax.grad(lambda s, x, yy: loss_fn(net(s, x[None]), yy[None])), in_axes=(None, 0, 0))(t, X, y)

        def example_loss(zi, yi):
            return loss_fn(zi[None], yi[None])

        def out_grads(z, y):
            return jax.vmap(jax.grad(example_loss))(z, y)

        def loss_hvp(z, u, y):
            return jax.vmap(lambda zi, yi, ui: jax.jvp(lambda s: jax.grad(example_loss)(s, yi), (zi,), (ui,))[1])(z, y, u)

        self.net = jax.jit(net)
        self.value = jax.jit(f)
        self.value_and_grad = jax.jit(jax.value_and_grad(f))
        self.hvp, self.ggn0, self.jvp, self.vjp, self.pex, self.out_grads, self.loss_hvp = (
            jax.jit(g) for g in (hvp, ggn0, jvp, vjp, pex, out_grads, loss_hvp))


class JaxObjective(PointMethods):
    """f(θ) on a fixed batch over a pure JAX model; see the module docstring."""

    def __init__(self, apply_fn: Callable, loss: Any, params: Any, X: Any, y: Any, l2: float = 0.0, *,
                 counter: PassCounter | None = None, rng: Any = None, _funcs: _Funcs | None = None,
                 _model: Any = None):
        import jax
        from jax.flatten_util import ravel_pytree

        if not (l2 >= 0) or l2 != l2:
            raise ValueError(f"l2 must be a finite non-negative number, got {l2}")
        self.apply_fn, self.loss, self.params = apply_fn, loss, params
        self.l2 = float(l2)
        self.float64 = has_float64(params)
        with x64_scope(self.float64):
            flat, self.unravel = ravel_pytree(params)
            self.X, self.y = _to_jax(X), _to_jax(y)
        self.n_params = int(flat.shape[0])
        self.param_dtype = numpy.dtype(flat.dtype)
        loss_fn = jax_loss(loss) if isinstance(loss, str) else loss
        if not callable(loss_fn):
            raise TypeError("loss must be a qnref loss name or a callable loss(z, y)")
        self._f = _funcs if _funcs is not None else _Funcs(apply_fn, loss_fn, self.unravel, self.l2)
        if self.X.shape[0] != self.y.shape[0]:
            raise ValueError(f"X has {self.X.shape[0]} examples but y has {self.y.shape[0]}")
        self.counter = counter if counter is not None else PassCounter()
        if _model is None:
            leaves = jax.tree_util.tree_flatten_with_path(params)[0]  # ravel_pytree's order
            blocks = [(jax.tree_util.keystr(path) or "theta", numpy.shape(leaf)) for path, leaf in leaves]
            _model = OpaqueModel(apply_fn, layout_of(blocks), "jax")
        self.model = _model
        #: generator of the engine twin's sampled targets (a spec problem's device_rng)
        self.rng = rng if rng is not None else backend.default_rng(0)
        self._twin = None

    def engine_objective(self) -> Any:
        """For a spec model (:meth:`JaxProblem.from_spec`): qnref's own objective on the converted model
        and this batch (the Kronecker taps and sampled targets come from it)."""
        if not isinstance(self.model, ConvertedModel):
            raise no_layer_structure("the qnref engine twin (layer taps)", "jax")
        if self._twin is None:
            if not isinstance(self.loss, str):
                raise ValueError(f"a spec problem's layer taps need a qnref loss name, got {self.loss!r}")
            name = {"ce": "softmax_ce", "bce": "sigmoid_ce"}.get(self.loss, self.loss)
            self._twin = self.model.twin(name, numpy.asarray(self.X), numpy.asarray(self.y), self.l2, self.rng)
        return self._twin

    xp = numpy  # θ and results are NumPy arrays (CuPy θ are accepted and answered in CuPy)

    @property
    def n_samples(self) -> int:
        return int(self.X.shape[0])

    @property
    def layout(self) -> Any:
        """θ's blocks: the pytree's leaves in ``jax.tree_util`` order, row-major."""
        return self.model.layout

    @property
    def dtype(self):
        return self.param_dtype

    @_scoped
    def ravel(self, params: Any) -> numpy.ndarray:
        """Flat writable NumPy θ of a params pytree."""
        from jax.flatten_util import ravel_pytree

        return numpy.array(ravel_pytree(params)[0])

    def at(self, theta: Any) -> "JaxPoint":
        if getattr(theta, "ndim", None) != 1 or theta.shape[0] != self.n_params:
            raise ValueError(f"theta must be a flat vector of length {self.n_params}, got shape {getattr(theta, 'shape', None)}")
        if not backend.all_finite(theta):
            raise NonFiniteError("theta contains NaN or Inf")
        return JaxPoint(self, theta)

    @_scoped
    def subset(self, idx: Any) -> "JaxObjective":
        import jax.numpy as jnp

        i = jnp.asarray(positions(idx, self.n_samples))
        return JaxObjective(self.apply_fn, self.loss, self.params, self.X[i], self.y[i], self.l2, counter=self.counter,
                            rng=self.rng, _funcs=self._f, _model=self.model)


class JaxPoint(PointProducts):
    """f linearised at one θ over a JAX model (primitives jitted; see the module docstring)."""

    def __init__(self, obj: JaxObjective, theta: Any):
        self.obj, self.theta = obj, theta
        with x64_scope(obj.float64):
            self._t = _to_jax(theta)
        self._value = None
        self._grad = None
        self._z = self._zj = self._e = None
        self._sampled = None
        self._twin = None
        obj.counter.add("forward", obj.n_samples, "forward")

    def check_independent(self, what: str) -> None:
        if self.obj.model.couples_examples:
            raise ValueError(f"{what} needs independent examples, but the model has batch normalization in training "
                             "mode (examples interact); build the problem with train=False")

    def engine_point(self) -> Any:
        """Spec models: qnref's own point at this θ on the converted model (cached)."""
        if self._twin is None:
            self._twin = self.obj.engine_objective().at(self.theta)
        return self._twin

    @property
    def xp(self) -> Any:
        return backend.namespace(self.theta)

    def _out(self, a):
        return _from_jax(a, self.theta)

    @property
    @_scoped
    def value(self) -> float:
        if self._value is None:
            self._value = float(self.obj._f.value(self._t, self.obj.X, self.obj.y))
        return self._value

    @property
    @_scoped
    def grad(self) -> Any:
        if self._grad is None:
            val, g = self.obj._f.value_and_grad(self._t, self.obj.X, self.obj.y)
            self._value = float(val)
            self.obj.counter.add("backward", self.N, "grad")
            self._grad = self._out(g)
        return self._grad

    @property
    @_scoped
    def _z_jax(self) -> Any:
        if self._zj is None:
            self._zj = self.obj._f.net(self._t, self.obj.X)
        return self._zj

    @property
    def z(self) -> Any:
        """Network outputs (N, *output_shape) as a NumPy/CuPy array."""
        if self._z is None:
            self._z = self._out(self._z_jax)
        return self._z

    # -- primitives (PointPrimitives) -------------------------------------------------------
    @_scoped
    def hvp(self, v: Any) -> Any:
        """∇²f v by forward-over-reverse autodiff of f (λ v included)."""
        self.check_direction(v)
        c = self.obj.counter
        c.add("rforward", self.N), c.add("backward", self.N, "hvp"), c.add("rbackward", self.N)
        return self._out(self.obj._f.hvp(self._t, _to_jax(v), self.obj.X, self.obj.y))

    @_scoped
    def _gauss_newton(self, v: Any, call: str) -> Any:
        """Override (faster): (1/N) Jᵀ H_L J v as one fused jitted function instead of three calls."""
        self.check_direction(v)
        self.obj.counter.add("rforward", self.N), self.obj.counter.add("backward", self.N, call)
        return self._out(self.obj._f.ggn0(self._t, _to_jax(v), self.obj.X, self.obj.y))

    @_scoped
    def local_jvp(self, v: Any) -> Any:
        self.obj.counter.add("rforward", self.N)
        return self._out(self.obj._f.jvp(self._t, _to_jax(v), self.obj.X))

    @_scoped
    def local_vjp(self, u: Any, call: str) -> Any:
        self.obj.counter.add("backward", self.N, call)
        return self._out(self.obj._f.vjp(self._t, _to_jax(u), self.obj.X))

    @_scoped
    def local_loss_hvp(self, u: Any) -> Any:
        return self._out(self.obj._f.loss_hvp(self._z_jax, _to_jax(u), self.obj.y))

    def _native_targets(self, targets: Any) -> Any:
        return self.select_targets(targets, self.obj.y, _to_jax)

    @_scoped
    def local_output_grads(self, targets: Any) -> Any:
        empirical = is_empirical(targets)
        if empirical and self._e is not None:
            return self._e
        e = self._out(self.obj._f.out_grads(self._z_jax, self._native_targets(targets)))
        if empirical:
            self._e = e
        return e

    @_scoped
    def per_example_grads(self, targets: Any = "empirical") -> Any:
        """(N, n) rows ∇ℓᵢ (data term); ``targets`` "empirical" (or ``None``), "sampled" or an array replacing y."""
        self.obj.counter.add("backward", self.N, "per_example_grads")
        return self._out(self.obj._f.pex(self._t, self.obj.X, self._native_targets(targets)))

    def layer_stats(self, targets: Any = "empirical", reduce: Any = None) -> dict:
        """Spec models: the engine twin's taps (keyed by qnref layer name); an ``apply_fn`` raises."""
        if not isinstance(self.obj.model, ConvertedModel):
            raise no_layer_structure("layer_stats (the Kronecker layer taps)", "jax")
        return self.engine_point().layer_stats(targets if isinstance(targets, str) or targets is None
                                               else numpy.asarray(targets), reduce)

    @_scoped
    def sampled_targets(self, key: Any = None) -> Any:
        """Targets ỹ ~ p(y | z) from the model's predictive distribution, drawn once per point.

        softmax_ce → Categorical(softmax(z)) labels, mse → N(z, I), sigmoid_ce → Bernoulli(σ(z));
        ``loss`` must be a qnref name (for a callable loss pass explicit targets to :meth:`fisher_vp`).
        ``key`` is a ``jax.random`` key or an integer seed (0 when ``None``). The draws differ from
        qnref's ``Point.sampled_targets()`` (different generators): pass those as ``targets=`` to
        reproduce qnref's sampled Fisher.
        """
        if self._sampled is None and key is None and isinstance(self.obj.model, ConvertedModel):
            # spec models: the engine twin's draws (the problem's device_rng), as qnref's engine draws them
            self._sampled = _to_jax(self.engine_point().sampled_targets())
        if self._sampled is None:
            import jax

            loss = self.obj.loss
            name = {"ce": "softmax_ce", "bce": "sigmoid_ce"}.get(loss, loss) if isinstance(loss, str) else None
            if name not in ("softmax_ce", "mse", "sigmoid_ce"):
                raise ValueError(f"cannot sample targets for the loss {loss!r} (no known predictive distribution); "
                                 "pass targets= to fisher_vp(v, 'sampled', targets=...)")
            k = jax.random.PRNGKey(0 if key is None else key) if key is None or isinstance(key, int) else key
            z = self._z_jax
            if name == "softmax_ce":
                self._sampled = jax.random.categorical(k, z, axis=1)
            elif name == "mse":
                self._sampled = z + jax.random.normal(k, z.shape, dtype=z.dtype)
            else:
                self._sampled = (jax.random.uniform(k, z.shape, dtype=z.dtype) < jax.nn.sigmoid(z)).astype(z.dtype)
        return self._sampled

    def fisher_vp(self, v: Any, kind: str = "empirical", *, targets: Any = None, key: Any = None) -> Any:
        """F v (data term, no L2): :meth:`PointProducts.fisher_vp` plus ``key`` for the point's own
        draws of ỹ (kind "sampled" without ``targets``). See :meth:`qnref_torch.TorchPoint.fisher_vp`."""
        if kind == "sampled" and targets is None and key is not None:
            targets = self.sampled_targets(key)
        return super().fisher_vp(v, kind, targets=targets)


class JaxProblem(Problem):
    """qnref's :class:`~qnref.optim.base.Problem` over a :class:`JaxObjective` (same batch stream per seed).

    ``model`` is the :class:`~qnref.curvature.structure.OpaqueModel` (layout, no Kronecker layers);
    the apply function is ``apply_fn``.
    """

    def __init__(self, apply_fn: Callable, loss: Any, params: Any, X: Any, y: Any, l2: float = 0.0, *, seed: int = 0,
                 counter: PassCounter | None = None, _model: Any = None):
        rng = backend.default_rng(seed + 1)
        self._full = JaxObjective(apply_fn, loss, params, X, y, l2, counter=counter, rng=rng, _model=_model)
        self.apply_fn = apply_fn
        self.model = self._full.model
        self.loss = loss
        self.X, self.y = self._full.X, self._full.y
        self.xp = numpy
        self.l2 = float(l2)
        self.train = True
        self.spec_structure: Any = None
        self._start_stream(seed, rng)

    @classmethod
    def from_spec(cls, spec: Any, loss: Any, X: Any, y: Any, l2: float = 0.0, *, seed: int = 0, train: bool = True,
                  counter: PassCounter | None = None) -> "JaxProblem":
        """A problem over a spec model (:mod:`qnref_jax.convert`) with θ in the converted qnref model's
        layout: JAX computes every product of ``apply(structure, theta_to_params(θ), X, train=train)``,
        the Kronecker layer taps and sampled targets come from qnref's engine twin on the converted
        model (:class:`~qnref.curvature.structure.ConvertedModel`), so every registered optimizer runs
        and follows qnref's engine trajectory. ``get_theta(params)`` / ``unravel(θ)`` map the spec's
        params pytree (``split(spec)[1]``) to and from θ."""
        from .convert import apply, from_spec, split, theta_to_params  # noqa: PLC0415

        qmodel, theta0 = from_spec(spec, tuple(numpy.shape(X)[1:]))
        structure, _ = split(spec)

        def apply_fn(theta, Xb):
            return apply(structure, theta_to_params(qmodel, structure, theta), Xb, train=train)

        model = ConvertedModel(qmodel, lambda: train and qmodel.couples_examples, native=structure)
        prob = cls(apply_fn, loss, theta0, X, y, l2, seed=seed, counter=counter, _model=model)
        prob.train = train
        prob.spec_structure = structure
        return prob

    @property
    def converted(self) -> bool:
        """True for a spec problem (θ in qnref's layout, Kronecker layers available)."""
        return self.spec_structure is not None

    def subset(self, idx: Any) -> JaxObjective:
        return self._full.subset(idx)

    def get_theta(self, params: Any = None) -> numpy.ndarray:
        """Flat θ of a params pytree (the problem's initial params when ``None``)."""
        if self.converted and params is not None:
            from .convert import params_to_theta  # noqa: PLC0415

            return params_to_theta(self.model.qmodel, self.spec_structure, params).astype(self._full.param_dtype)
        return self._full.ravel(self._full.params if params is None else params)

    def unravel(self, theta: Any) -> Any:
        """The params pytree of θ (a spec problem: the spec's params list)."""
        with x64_scope(self._full.float64):
            if self.converted:
                from .convert import theta_to_params  # noqa: PLC0415

                return theta_to_params(self.model.qmodel, self.spec_structure, _to_jax(theta))
            return self._full.unravel(_to_jax(theta))


class GradientTransformation(NamedTuple):
    """optax's ``GradientTransformation`` shape: ``init(params) -> state``, ``update(updates, state, params) -> (updates, state)``."""

    init: Callable
    update: Callable


@dataclass
class QNRefTransformState:
    inner: Any
    step: int = 0


def _pure_first_order(opt: Any) -> bool:
    """True when a step is Δθ = _update(θ, ∇f(θ), state) (qnref's FirstOrderOptimizer driver, unchanged)."""
    cls = type(opt)
    if not hasattr(cls, "_update"):
        return False
    bases = [c for c in cls.__mro__ if "_update" in vars(c)]
    root = bases[-1]  # the driver class that introduced the _update protocol
    if "step" not in vars(root) or cls.step is not root.step:
        return False
    return "_gradient_point" not in vars(root) or cls._gradient_point is root._gradient_point


def as_gradient_transformation(qnref_optimizer: Any, problem_fn: Any = None) -> GradientTransformation:
    """An optax-style (init, update) pair running ``qnref_optimizer`` (see the module docstring for the limits)."""
    from jax.flatten_util import ravel_pytree

    pure = _pure_first_order(qnref_optimizer) and problem_fn is None
    if not pure and problem_fn is None:
        raise ValueError(f"{type(qnref_optimizer).__name__} re-evaluates the objective or draws its own batches; "
                         "pass problem_fn (a JaxProblem or a callable returning one)")

    def _problem():
        return problem_fn() if callable(problem_fn) and not isinstance(problem_fn, Problem) else problem_fn

    def init(params: Any) -> QNRefTransformState:
        with x64_scope(has_float64(params)):
            flat, _ = ravel_pytree(params)
        return QNRefTransformState(qnref_optimizer.init(numpy.array(flat)))

    def update(updates: Any, state: QNRefTransformState, params: Any = None):
        if params is None:
            raise ValueError("qnref transformations need params: call update(grads, state, params)")
        with x64_scope(has_float64(params)):
            return _update(updates, state, params)

    def _update(updates: Any, state: QNRefTransformState, params: Any):
        flat, unravel = ravel_pytree(params)
        theta = numpy.array(flat)
        if pure:
            g = numpy.array(ravel_pytree(updates)[0])
            delta, inner = qnref_optimizer._update(theta, g, state.inner)
        else:
            new_theta, inner, _info = qnref_optimizer.step(theta, state.inner, _problem())
            delta = new_theta - theta
        return unravel(_to_jax(numpy.asarray(delta, dtype=theta.dtype))), QNRefTransformState(inner, state.step + 1)

    return GradientTransformation(init, update)
