"""Learning-rate schedules: small composable objects giving the factor by which an optimizer's
step size is multiplied at a point of the run.

    s = MultiStep((60, 120, 160), 0.1)          # ×0.1 at epochs 60, 120 and 160
    s(epoch=130.0)                              # 0.01
    w = LinearWarmup(5) * Cosine(100)           # products compose; parse("warmup:5*cosine:100") too
    parse("multistep:60,120,160:0.1")           # the command line's --lr-schedule text
    s.spec()                                    # text that parse() reads back into an equal schedule

A schedule is a pure function of the position in the run (``epoch``, a float: data passes drawn;
``step``, an int), so resumed runs are bit-identical and nothing is stored in a checkpoint. By
default the position is measured in epochs; ``unit="step"`` measures milestones, periods and
warm-ups in optimizer steps instead.

Which scalar is scaled: :func:`step_size_name` picks each optimizer's step size (``lr`` for the
first-order, Kronecker-factored and SMW methods; ``alpha0``, the initial trial step of the
line-search methods gd-ls, sqn and s-lbfgs). Trust-region methods adapt their radius themselves
and have no step size to scale: a schedule on them is refused unless a hyperparameter is named
explicitly. The scheduled optimizer is a *new* optimizer object with that one hyperparameter
changed (:func:`with_hyperparameter`): optimizer objects hold hyperparameters only (the state
rule of docs/optimizers.md), so nothing per-run is ever written onto them.

The texts' rule (Ren's thesis, CNN experiments): ×0.1 every 60 epochs for first-order methods and
every 50 epochs for second-order ones — :class:`Thesis` (``parse("thesis")``; ``thesis:0.1`` scales
the periods to 6 / 5 epochs for small-scale runs).

Wrappers: ``torch.optim.lr_scheduler.LambdaLR(opt, as_lambda(s, steps_per_epoch))`` takes the
same objects — :func:`as_lambda` turns a schedule into a (host Python) function of the step count
returning the factor. An optax schedule is traced under ``jax.jit``, so it cannot call Python
code on the count: tabulate the factors with :func:`as_array` and index the table
(``lambda c: lr * table[jnp.minimum(c, len(table) - 1)]``).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import validate as check

__all__ = ["Schedule", "Constant", "Step", "MultiStep", "Exponential", "Cosine", "LinearWarmup", "Product", "Thesis",
           "parse", "step_size_name", "with_hyperparameter", "as_lambda", "as_array", "SCHEDULE_HELP"]

SCHEDULE_HELP = ("constant | step:EVERY:GAMMA | multistep:M1,M2,...:GAMMA | exp:GAMMA | cosine:TOTAL[:MIN] | "
                 "warmup:LENGTH | thesis[:SCALE]; join with '*' (warmup:5*cosine:100); append '@step' to count in "
                 "optimizer steps instead of epochs")
_UNITS = ("epoch", "step")


class Schedule:
    """Base class: ``factor(epoch, step)`` → the multiplier of the step size (finite, ≥ 0)."""

    unit: str = "epoch"

    def factor(self, epoch: float, step: int) -> float:
        raise NotImplementedError

    def __call__(self, epoch: float = 0.0, step: int = 0) -> float:
        return self.factor(float(epoch), int(step))

    def __mul__(self, other: "Schedule") -> "Schedule":
        if not isinstance(other, Schedule):
            return NotImplemented
        return Product(tuple(_parts(self)) + tuple(_parts(other)))

    def _t(self, epoch: float, step: int) -> float:
        return float(step) if self.unit == "step" else epoch

    def _spec_unit(self) -> str:
        return "@step" if self.unit == "step" else ""

    def spec(self) -> str:
        """Text that :func:`parse` reads back into an equal schedule."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.spec()


def _parts(s: Schedule) -> Sequence[Schedule]:
    return s.parts if isinstance(s, Product) else (s,)


def _unit(u: str) -> str:
    if u not in _UNITS:
        raise check.ValidationError("unit", u, "'epoch' or 'step'")
    return u


@dataclass(frozen=True)
class Constant(Schedule):
    """Factor ``value`` (1 by default) everywhere."""

    value: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", check.number("Constant value", self.value, 0, lo_open=True))

    def factor(self, epoch: float, step: int) -> float:
        return self.value

    def spec(self) -> str:
        return "constant" if self.value == 1.0 else f"constant:{self.value!r}"


@dataclass(frozen=True)
class Step(Schedule):
    """×``gamma`` every ``every`` epochs (steps): factor gamma^⌊t / every⌋."""

    every: float
    gamma: float = 0.1
    unit: str = "epoch"

    def __post_init__(self) -> None:
        object.__setattr__(self, "every", check.number("Step every", self.every, 0, lo_open=True))
        object.__setattr__(self, "gamma", check.number("Step gamma", self.gamma, 0, lo_open=True))
        _unit(self.unit)

    def factor(self, epoch: float, step: int) -> float:
        return self.gamma ** math.floor(self._t(epoch, step) / self.every + 1e-9)

    def spec(self) -> str:
        return f"step:{_g(self.every)}:{_g(self.gamma)}{self._spec_unit()}"


@dataclass(frozen=True)
class MultiStep(Schedule):
    """×``gamma`` at each milestone: factor gamma^(number of milestones ≤ t)."""

    milestones: tuple[float, ...]
    gamma: float = 0.1
    unit: str = "epoch"

    def __post_init__(self) -> None:
        ms = tuple(check.number("MultiStep milestone", m, 0, lo_open=True) for m in self.milestones)
        if not ms or list(ms) != sorted(set(ms)):
            raise check.ValidationError("MultiStep milestones", self.milestones, "one or more increasing numbers > 0")
        object.__setattr__(self, "milestones", ms)
        object.__setattr__(self, "gamma", check.number("MultiStep gamma", self.gamma, 0, lo_open=True))
        _unit(self.unit)

    def factor(self, epoch: float, step: int) -> float:
        t = self._t(epoch, step)
        return self.gamma ** sum(t >= m - 1e-9 for m in self.milestones)

    def spec(self) -> str:
        return f"multistep:{','.join(_g(m) for m in self.milestones)}:{_g(self.gamma)}{self._spec_unit()}"


@dataclass(frozen=True)
class Exponential(Schedule):
    """Factor gamma^t (continuous decay per epoch or step)."""

    gamma: float
    unit: str = "epoch"

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma", check.number("Exponential gamma", self.gamma, 0, lo_open=True))
        _unit(self.unit)

    def factor(self, epoch: float, step: int) -> float:
        return self.gamma ** self._t(epoch, step)

    def spec(self) -> str:
        return f"exp:{_g(self.gamma)}{self._spec_unit()}"


@dataclass(frozen=True)
class Cosine(Schedule):
    """Cosine decay from 1 to ``min_factor`` over ``total`` epochs (steps), constant after."""

    total: float
    min_factor: float = 0.0
    unit: str = "epoch"

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", check.number("Cosine total", self.total, 0, lo_open=True))
        object.__setattr__(self, "min_factor", check.number("Cosine min_factor", self.min_factor, 0, 1))
        _unit(self.unit)

    def factor(self, epoch: float, step: int) -> float:
        u = min(1.0, self._t(epoch, step) / self.total)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * u))

    def spec(self) -> str:
        tail = f":{_g(self.min_factor)}" if self.min_factor else ""
        return f"cosine:{_g(self.total)}{tail}{self._spec_unit()}"


@dataclass(frozen=True)
class LinearWarmup(Schedule):
    """Linear warm-up from ``start`` to 1 over ``length`` epochs (steps), 1 after.

    The factor at t is start + (1 − start)·t/length; the default start is 1/(length+1) in steps,
    or 0.01 in epochs, so that the first step never has a zero step size."""

    length: float
    start: float | None = None
    unit: str = "epoch"

    def __post_init__(self) -> None:
        object.__setattr__(self, "length", check.number("LinearWarmup length", self.length, 0, lo_open=True))
        if self.start is not None:
            object.__setattr__(self, "start", check.number("LinearWarmup start", self.start, 0, 1, lo_open=True))
        _unit(self.unit)

    def _start(self) -> float:
        if self.start is not None:
            return self.start
        return 1.0 / (self.length + 1.0) if self.unit == "step" else 0.01

    def factor(self, epoch: float, step: int) -> float:
        t = self._t(epoch, step)
        if t >= self.length:
            return 1.0
        s = self._start()
        return s + (1.0 - s) * t / self.length

    def spec(self) -> str:
        tail = f":{_g(self.start)}" if self.start is not None else ""
        return f"warmup:{_g(self.length)}{tail}{self._spec_unit()}"


@dataclass(frozen=True)
class Thesis(Schedule):
    """Ren's thesis CNN rule: ×``gamma`` every ``first_order`` epochs for first-order methods,
    every ``second_order`` epochs for second-order ones (60 / 50 at full scale; ``scale`` multiplies
    both periods for small-scale runs). :meth:`resolve` picks the period from the optimizer's family."""

    scale: float = 1.0
    gamma: float = 0.1
    first_order: float = 60.0
    second_order: float = 50.0
    family: str | None = None  # set by resolve(); None: second-order period

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check.number("thesis scale", self.scale, 0, lo_open=True))

    def resolve(self, optimizer: Any) -> "Thesis":
        fam = "first-order" if getattr(optimizer, "family", "") == "first-order" else "second-order"
        return Thesis(self.scale, self.gamma, self.first_order, self.second_order, fam)

    @property
    def every(self) -> float:
        return self.scale * (self.first_order if self.family == "first-order" else self.second_order)

    def factor(self, epoch: float, step: int) -> float:
        return self.gamma ** math.floor(epoch / self.every + 1e-9)

    def spec(self) -> str:
        return "thesis" if self.scale == 1.0 else f"thesis:{_g(self.scale)}"


@dataclass(frozen=True)
class Product(Schedule):
    """The product of several schedules' factors (``a * b``)."""

    parts: tuple[Schedule, ...] = field(default_factory=tuple)

    def factor(self, epoch: float, step: int) -> float:
        out = 1.0
        for p in self.parts:
            out *= p.factor(epoch, step)
        return out

    def resolve(self, optimizer: Any) -> "Product":
        return Product(tuple(p.resolve(optimizer) if hasattr(p, "resolve") else p for p in self.parts))

    def spec(self) -> str:
        return "*".join(p.spec() for p in self.parts) or "constant"


def _g(v: float) -> str:
    """Shortest text of a number that reads back to the same float."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e16:
        return str(int(v))
    return repr(float(v))


def resolve(schedule: Schedule, optimizer: Any) -> Schedule:
    """A schedule whose optimizer-dependent parts (:class:`Thesis`) are fixed for ``optimizer``."""
    return schedule.resolve(optimizer) if hasattr(schedule, "resolve") else schedule


# -- text ----------------------------------------------------------------------------------------
def parse(text: str, option: str = "--lr-schedule") -> Schedule:
    """A schedule from its text (:data:`SCHEDULE_HELP`); errors name ``option`` and the text."""
    if isinstance(text, Schedule):
        return text
    if not isinstance(text, str) or not text.strip():
        raise check.ValidationError(option, text, f"a schedule ({SCHEDULE_HELP})")
    parts = [_parse_one(p.strip(), option, text) for p in text.split("*")]
    return parts[0] if len(parts) == 1 else Product(tuple(parts))


def _parse_one(item: str, option: str, whole: str) -> Schedule:
    unit = "epoch"
    if item.endswith("@step") or item.endswith("@epoch"):
        item, unit = item.rsplit("@", 1)
    name, *args = [t.strip() for t in item.split(":")]
    label = f"{option} {whole!r}"

    def num(i: int, what: str, lo: float = 0.0, hi: float | None = None, lo_open: bool = True, default: Any = None) -> Any:
        if i >= len(args):
            if default is not None or what.endswith("?"):
                return default
            raise check.ValidationError(f"{label}: {name}'s {what}", "nothing", describe(name))
        return check.parse_number(f"{label}: {name}'s {what.rstrip('?')}", args[i], lo, hi, lo_open=lo_open)

    def describe(n: str) -> str:
        return f"given ({SCHEDULE_HELP})"

    nargs = {"constant": 1, "step": 2, "multistep": 2, "exp": 1, "exponential": 1, "cosine": 2, "warmup": 2, "thesis": 1}
    if name not in nargs:
        from .optim.registry import suggest  # noqa: PLC0415

        raise check.ValidationError(label, item, f"one of constant, step, multistep, exp, cosine, warmup, thesis "
                                                 f"({suggest(name, list(nargs), 'schedule').split(' (')[0]}; {SCHEDULE_HELP})")
    if len(args) > nargs[name]:
        raise check.ValidationError(label, item, f"at most {nargs[name]} ':'-separated value(s) after {name} ({SCHEDULE_HELP})")
    try:
        if name == "constant":
            return Constant(num(0, "value?", default=1.0))
        if name == "step":
            return Step(num(0, "period"), num(1, "gamma?", default=0.1), unit)
        if name == "multistep":
            if not args:
                raise check.ValidationError(f"{label}: multistep's milestones", "nothing", "comma-separated increasing numbers > 0")
            ms = [check.parse_number(f"{label}: multistep milestone", m, 0, lo_open=True) for m in args[0].split(",")]
            if ms != sorted(set(ms)):
                raise check.ValidationError(f"{label}: multistep milestones", args[0], "increasing numbers > 0")
            return MultiStep(tuple(ms), num(1, "gamma?", default=0.1), unit)
        if name in ("exp", "exponential"):
            return Exponential(num(0, "gamma"), unit)
        if name == "cosine":
            return Cosine(num(0, "total"), num(1, "min factor?", hi=1, lo_open=False, default=0.0), unit)
        if name == "warmup":
            return LinearWarmup(num(0, "length"), num(1, "start?", hi=1), unit)
        if unit != "epoch":
            raise check.ValidationError(label, item, "thesis counted in epochs (no @step)")
        return Thesis(num(0, "scale?", default=1.0))
    except check.ValidationError:
        raise
    except ValueError as exc:
        raise check.ValidationError(label, item, str(exc)) from None


# -- applying to optimizers ----------------------------------------------------------------------
#: step-size hyperparameters in order of preference
STEP_SIZE_NAMES = ("lr", "alpha0")


def step_size_name(optimizer: Any, name: str | None = None) -> str:
    """The hyperparameter a schedule scales: ``name`` when given (checked), else ``lr`` or
    ``alpha0``; an optimizer with neither (trust-region methods, L-BFGS, HF) is refused."""
    hyper = optimizer.hyperparameters()
    label = getattr(optimizer, "name", type(optimizer).__name__)
    if name is not None:
        v = hyper.get(name)
        if name not in hyper or isinstance(v, bool) or not isinstance(v, (int, float)):
            numeric = [k for k, x in hyper.items() if isinstance(x, (int, float)) and not isinstance(x, bool)]
            raise check.ValidationError("schedule_param", name, f"a numeric hyperparameter of {label} ({', '.join(numeric)})")
        return name
    for key in STEP_SIZE_NAMES:
        v = hyper.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return key
    raise check.ValidationError(
        "schedule", label, f"an optimizer with a step size (lr or alpha0); {label} has none a schedule can scale "
        "(trust-region radii and line searches adapt themselves) — name a hyperparameter with schedule_param / "
        "--lr-schedule-param to scale it anyway")


def with_hyperparameter(optimizer: Any, name: str, value: float) -> Any:
    """A new optimizer of the same class with hyperparameter ``name`` set to ``value`` (the
    optimizer's own checks apply); ``optimizer`` itself is left untouched."""
    cls = type(optimizer)
    hyper = optimizer.hyperparameters()
    params = inspect.signature(cls.__init__).parameters
    any_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in hyper.items() if any_kw or k in params}
    kwargs[name] = value
    new = cls(**kwargs)
    got = new.hyperparameters()
    fixed = {k: v for k, v in hyper.items() if k != name and k not in kwargs}
    if any(repr(got.get(k)) != repr(v) for k, v in fixed.items()):  # set by the class, not the constructor
        raise check.ValidationError("schedule", cls.__name__, "an optimizer whose hyperparameters its constructor takes")
    return new


class Scheduled:
    """``optimizer`` with ``schedule`` applied to one hyperparameter: :meth:`at` gives the optimizer
    for a position of the run (cached by factor, so constant stretches reuse one object)."""

    def __init__(self, optimizer: Any, schedule: Schedule, param: str | None = None):
        self.base, self.schedule = optimizer, resolve(schedule, optimizer)
        self.param = step_size_name(optimizer, param)
        self.base_value = float(optimizer.hyperparameters()[self.param])
        self._cache: dict[float, Any] = {}

    def factor(self, epoch: float, step: int) -> float:
        f = float(self.schedule(epoch, step))
        if not math.isfinite(f) or f < 0:
            raise check.ValidationError(f"schedule {self.schedule.spec()!r} factor at epoch {epoch:g}, step {step}", f,
                                        "a finite number ≥ 0")
        return f

    def at(self, epoch: float, step: int) -> tuple[Any, float]:
        f = self.factor(epoch, step)
        if f == 0:
            raise check.ValidationError(f"schedule {self.schedule.spec()!r} factor at epoch {epoch:g}, step {step}", f,
                                        "> 0 for a step (a cosine ending at 0 before the run does? give it a min factor)")
        if f == 1.0:
            return self.base, f
        opt = self._cache.get(f)
        if opt is None:
            if len(self._cache) > 64:
                self._cache.clear()
            opt = self._cache[f] = with_hyperparameter(self.base, self.param, self.base_value * f)
        return opt, f


def as_lambda(schedule: Schedule, steps_per_epoch: float | None = None) -> Callable[[int], float]:
    """The schedule as a function of the step count returning the factor — the form of
    ``torch.optim.lr_scheduler.LambdaLR(lr_lambda=…)`` (called once per ``scheduler.step()``) and of
    a host-side schedule. Epoch-based schedules need ``steps_per_epoch`` (epoch = count / steps_per_epoch)."""
    if schedule.unit != "step" and not isinstance(schedule, Constant) and steps_per_epoch is None:
        if not (isinstance(schedule, Product) and all(p.unit == "step" or isinstance(p, Constant) for p in schedule.parts)):
            raise check.ValidationError("steps_per_epoch", None, "a number > 0 for a schedule counted in epochs")
    spe = None if steps_per_epoch is None else check.number("steps_per_epoch", steps_per_epoch, 0, lo_open=True)

    def factor(count: Any) -> float:
        c = int(count)
        return schedule(c / spe if spe else 0.0, c)

    return factor


def as_array(schedule: Schedule, n_steps: int, steps_per_epoch: float | None = None) -> list[float]:
    """The factors of steps 0 … n_steps − 1 (:func:`as_lambda` tabulated): a table a jitted
    schedule (optax) can index with its traced step count."""
    n = check.integer("n_steps", n_steps, 1)
    f = as_lambda(schedule, steps_per_epoch)
    return [f(c) for c in range(n)]
