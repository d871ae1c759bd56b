"""The optimizer protocol, step information and the :class:`Problem` that draws batches.

Functional, like optax: an optimizer holds hyperparameters only; its state is a dataclass of
arrays and scalars (so it checkpoints), and one step is

    theta, state, info = opt.step(theta, state, problem)

``problem`` hands out :class:`~qnref.curvature.objective.Objective` instances on minibatches,
random samples or the full training set; all share one :class:`PassCounter`, so methods are
compared in gradient-equivalent passes whatever they draw.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy

from .. import backend, validate
from ..curvature.objective import NonFiniteError, Objective, PassCounter
from ..curvature.protocol import ObjectiveProtocol, PointProtocol
from ..nn.losses import Loss, get_loss
from ..nn.model import Sequential
from .costs import CostAssumptions, ModelShapes


@dataclass
class StepInfo:
    """What one step did.

    loss:        f at the iterate the step *returns*, on the batch the step used (NaN if unknown)
    loss_start:  f at the start of the step on that batch
    accepted:    whether θ moved
    step_norm:   ‖θ_new − θ_old‖
    radius:      trust-region radius after the step (trust-region methods)
    step_size:   the step length / learning rate used (line-search and first-order methods)
    skipped:     curvature updates skipped by safeguards this step
    evals:       function/gradient evaluations the step used (objective forward passes)
    nonfinite:   a trial point with NaN/Inf loss or gradient was rejected
    batch_size:  examples in the step's batch
    extra:       method-specific values (ρ, σ, CG iterations, damping, …)
    """

    loss: float = math.nan
    loss_start: float = math.nan
    accepted: bool = True
    step_norm: float = 0.0
    radius: float | None = None
    step_size: float | None = None
    skipped: int = 0
    evals: int = 0
    nonfinite: bool = False
    batch_size: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(d.pop("extra"))
        return d


class Problem:
    """Training data + model + loss; draws the objectives an optimizer asks for.

    batch(size)   next minibatch of a reshuffled pass over the data (sampling without
                  replacement within an epoch); epochs are counted here.
    sample(size)  an independent uniform sample without replacement (curvature batches,
                  progress checks); does not advance the epoch stream.
    full()        the whole training set.
    subset(idx)   given indices.

    It implements :class:`~qnref.curvature.protocol.ProblemProtocol`; the torch and JAX problems
    subclass it and replace only the objectives (``_full`` and :meth:`subset`).
    """

    def __init__(self, model: Sequential, loss: "str | Loss", X: Any, y: Any, l2: float = 0.0, *, seed: int = 0,
                 counter: PassCounter | None = None, train: bool = True):
        seed = validate.integer("seed", seed, lo=0)
        self.model = model
        self.loss = get_loss(loss)
        self.xp = backend.namespace(X, y)
        # validate once, here; the per-batch objectives skip it
        self._full = Objective(model, self.loss, X, y, l2, train=train, counter=counter,
                               rng=backend.default_rng(seed + 1, self.xp))
        self.X, self.y = X, self._full.y
        self.l2 = float(l2)
        self.train = train
        self._start_stream(seed, self._full.rng)

    def _start_stream(self, seed: int, device_rng: Any) -> None:
        """The shared counter, the host index stream from ``seed`` and the device generator."""
        self.counter = self._full.counter
        self.rng = numpy.random.default_rng(seed)
        self.device_rng = device_rng
        self._perm = self.rng.permutation(self.n_samples)
        self._pos = 0
        self.samples_drawn = 0
        self.epoch_passes = 0

    @property
    def layout(self) -> Any:
        """The :class:`~qnref.params.ParamLayout` of θ (``model.layout``)."""
        return self.model.layout

    @property
    def n_samples(self) -> int:
        return int(self.X.shape[0])

    @property
    def epochs(self) -> float:
        """Data passes consumed by :meth:`batch` (the papers' 'epochs')."""
        return self.samples_drawn / self.n_samples

    def _check_size(self, size: int, what: str = "batch size") -> int:
        """The one check of every batch an optimizer draws (``batch_size``, curvature and gradient
        batches): an integer in [1, n_samples], refused by name before any work."""
        return check_size(self.n_samples, size, what)

    def subset(self, idx: Any) -> Objective:
        idx_dev = self.xp.asarray(numpy.asarray(idx, dtype=numpy.int64))
        return Objective(self.model, self.loss, self.X[idx_dev], self.y[idx_dev], self.l2, train=self.train,
                         counter=self.counter, rng=self.device_rng, validate=False)

    def batch(self, size: int) -> Objective:
        size = self._check_size(size, "batch_size")
        if size == self.n_samples:
            return self.full()
        idx = []
        need = size
        while need:
            take = min(need, self.n_samples - self._pos)
            idx.append(self._perm[self._pos : self._pos + take])
            self._pos += take
            need -= take
            if self._pos == self.n_samples:
                self._perm = self.rng.permutation(self.n_samples)
                self._pos = 0
                self.epoch_passes += 1
        self.samples_drawn += size
        return self.subset(numpy.concatenate(idx))

    def sample(self, size: int) -> Objective:
        size = self._check_size(size, "sample size")
        if size == self.n_samples:
            return self._full
        return self.subset(numpy.sort(self.rng.choice(self.n_samples, size=size, replace=False)))

    def full(self) -> Objective:
        """The whole training set; counts as one data pass (an epoch) for the caller's step."""
        self.samples_drawn += self.n_samples
        return self._full

    @property
    def full_objective(self) -> Objective:
        """The whole training set without counting a data pass (for evaluation)."""
        return self._full

    def state(self) -> dict:
        """Stream position and RNG state (for bit-identical resume)."""
        dev = backend.rng_state(self.device_rng) if self.xp.__name__ == "numpy" else None
        return {"rng": backend.rng_state(self.rng), "device_rng": dev, "perm": self._perm.copy(), "pos": self._pos,
                "samples_drawn": self.samples_drawn, "epoch_passes": self.epoch_passes,
                "counter": self.counter.snapshot()}

    def load_state(self, st: dict) -> None:
        backend.set_rng_state(self.rng, st["rng"])
        if st.get("device_rng") is not None:
            backend.set_rng_state(self.device_rng, st["device_rng"])
        self._perm = numpy.asarray(st["perm"], dtype=numpy.int64)
        self._pos = int(st["pos"])
        self.samples_drawn = int(st["samples_drawn"])
        self.epoch_passes = int(st["epoch_passes"])
        self.counter.restore(st["counter"])


class Optimizer:
    """Base class. Subclasses define ``State`` (a dataclass), ``init`` and ``step``.

    Class attributes: ``name`` (registry key), ``family`` (first-order, quasi-newton,
    trust-region, hessian-free, kronecker, smw), ``paper`` (source of the defaults).
    """

    name: ClassVar[str] = "optimizer"
    family: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    #: the leading terms of :meth:`algebra_flops` in words (n parameters, m memory, t line-search trials, …)
    cost_formula: ClassVar[str] = ""

    def init(self, theta: Any) -> Any:
        raise NotImplementedError

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """The cost model of one step's own algebra: multiplications by term, amortized terms
        divided by their period (counting convention: :mod:`qnref.optim.costs`, which rounds
        and sums them)."""
        raise NotImplementedError(f"{type(self).__name__} declares no algebra cost model")

    def step(self, theta: Any, state: Any, problem: Problem) -> tuple[Any, Any, StepInfo]:
        raise NotImplementedError

    def hyperparameters(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


# -- validation helpers (all delegate to the one shared validator, :mod:`qnref.validate`) --------
def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """A finite number > 0 (≥ 0 with ``allow_zero``): bools, strings, NaN, ±inf, negatives refused
    with a :class:`~qnref.validate.ValidationError` naming the hyperparameter."""
    return validate.number(name, value, lo=0.0, lo_open=not allow_zero)


def check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite number in [lo, hi] (or the open variants); infinite ends only bound by finiteness."""
    return validate.number(name, value, None if math.isinf(lo) else lo, None if math.isinf(hi) else hi,
                           lo_open=lo_open, hi_open=hi_open)


def check_bool(name: str, value: Any) -> bool:
    """True or False only (``numpy.bool_`` too): 1, 'yes', None refused by name."""
    return validate.boolean(name, value)


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    """``value`` when it is one of ``choices``, else a ValueError naming the argument, the choices and
    the value."""
    if value not in choices:
        opts = [repr(c) for c in choices]
        raise ValueError(f"{name} must be {' or '.join(opts) if len(opts) < 3 else ', '.join(opts[:-1]) + ' or ' + opts[-1]}, "
                         f"got {value!r}")
    return value


def check_above(name: str, value: float, bound: float) -> float:
    """Reject values that are not finite and > ``bound`` (radius growth factors, boosts)."""
    return validate.number(name, value, lo=bound, lo_open=True)


def checked(name: str, value: Any, rule: Any) -> Any:
    """``value`` checked by a declarative ``rule`` (the validated value, as the check_* helpers
    return it): ``"> 0"`` / ``"≥ 0"`` (:func:`check_positive`), ``"finite"``, ``"int"`` /
    ``"int ≥ 0"`` / ``"int ≥ -1"`` (:func:`check_int`), ``"bool"`` (:func:`check_bool`), ``"> 1"`` (:func:`check_above`), an interval
    such as ``"(0, 1)"``, ``"[0, 1)"``, ``"[1, inf]"`` (:func:`check_range`; ``inf`` ends allow any
    finite value), or a tuple of choices (:func:`check_choice`)."""
    if isinstance(rule, tuple):
        return check_choice(name, value, rule)
    if rule in ("> 0", "≥ 0"):
        return check_positive(name, value, allow_zero=rule == "≥ 0")
    if rule.startswith("int"):
        return check_int(name, value, int(rule[5:]) if len(rule) > 3 else 1)
    if rule.startswith(">"):
        return check_above(name, value, float(rule[1:]))
    if rule == "finite":
        return validate.number(name, value)
    if rule == "bool":
        return check_bool(name, value)
    lo, hi = (float(x) for x in rule[1:-1].split(","))
    return check_range(name, value, lo, hi, lo_open=rule[0] == "(", hi_open=rule[-1] == ")")


def set_checked(obj: Any, **specs: tuple[Any, Any]) -> None:
    """Check and set hyperparameters declaratively, in the order given:
    ``set_checked(self, c1=(c1, "(0, 1)"), max_evals=(max_evals, "int"))`` (rules: :func:`checked`)."""
    for name, (value, rule) in specs.items():
        setattr(obj, name, checked(name, value, rule))


def check_int(name: str, value: int, minimum: int = 1) -> int:
    """An integer ≥ ``minimum`` (5.0 counts), checked before any conversion: NaN, 2.5, True, '5'
    are refused by name."""
    return validate.integer(name, value, lo=minimum)


def check_size(n: int, size: int, what: str = "batch size") -> int:
    """``size`` as an int in [1, n] (a batch drawn from ``n`` examples), else an error naming ``what``."""
    size = validate.integer(what, size, lo=1)
    if size > n:
        raise ValueError(f"{what} {size} exceeds the {n} training examples of the problem; "
                         f"use at most {n} (or None for the full set where the optimizer allows it)")
    return size


def draw_size(opt: Any, problem: "Problem", size: int | None, what: str = "batch_size") -> int | None:
    """The size of a batch an optimizer draws from its hyperparameter ``what`` (None stays None):
    the paper default is capped at the problem's examples (the thesis' full-batch runs on sets
    smaller than the default), a value the user chose above them is refused by name
    (:meth:`Problem._check_size`) at the first step."""
    return None if size is None else capped_size(opt, problem.n_samples, size, what)


def capped_size(opt: Any, n: int, size: int, what: str) -> int:
    """:func:`draw_size` for a set of ``n`` examples."""
    if size > n and size != _paper_default(type(opt), what):
        check_size(n, size, what)
    return min(size, n)


@functools.lru_cache(maxsize=None)
def _paper_default(cls: type, what: str) -> Any:
    param = inspect.signature(cls.__init__).parameters.get(what)
    return None if param is None else param.default


def evaluate(obj: "ObjectiveProtocol", theta: Any) -> "tuple[PointProtocol | None, float]":
    """(point, f) at θ with ``Point.value`` read once (one host sync), or ``(None, nan)`` when θ or
    the loss there are not finite. Optimizers use this for trial points: a non-finite trial is
    rejected, never accepted."""
    try:
        p = obj.at(theta)
    except NonFiniteError:
        return None, math.nan
    f = p.value
    return (p, f) if math.isfinite(f) else (None, math.nan)


def try_point(obj: "ObjectiveProtocol", theta: Any) -> "PointProtocol | None":
    """The point of :func:`evaluate` (``None`` when θ or the loss there are not finite)."""
    return evaluate(obj, theta)[0]


# -- state (de)serialisation for checkpoints -------------------------------------------------------
def state_to_host(state: Any) -> dict:
    """A dict of NumPy arrays / Python scalars / nested dicts from a state dataclass."""
    if dataclasses.is_dataclass(state):
        return {"__class__": type(state).__qualname__, **{f.name: state_to_host(getattr(state, f.name)) for f in dataclasses.fields(state)}}
    if isinstance(state, dict):
        return {k: state_to_host(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(state_to_host(v) for v in state)
    if hasattr(state, "shape") and hasattr(state, "dtype"):
        return backend.to_numpy(state).copy()
    return state


def state_from_host(cls: Any, data: dict, device: backend.Device = "cpu") -> Any:
    """Inverse of :func:`state_to_host` for dataclass ``cls`` (arrays moved to ``device``)."""
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name in hints:
        if name not in data:
            f = hints[name]
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue  # a field added later with a default: older checkpoints stay loadable
            raise ValueError(f"checkpointed state of {cls.__qualname__} lacks field {name!r}")
        kwargs[name] = _restore(data[name], device)
    return cls(**kwargs)


def _restore(v: Any, device: backend.Device) -> Any:
    if isinstance(v, numpy.ndarray):
        return backend.to_device(v, device) if v.dtype.kind in "fiub" and v.ndim > 0 else v
    if isinstance(v, dict):
        return {k: _restore(x, device) for k, x in v.items() if k != "__class__"}
    if isinstance(v, list):
        return [_restore(x, device) for x in v]
    return v
