"""The training loop: epochs, evaluation, metrics, callbacks, checkpoints, bit-identical resume.

    result = train(model, optimizer, data, epochs=5, seed=0)

Each record of ``result.history`` holds: step, epoch (data passes drawn by the optimizer),
passes (gradient-equivalent passes / N: forward+backward units, so Hessian products and line
searches count), time (optimizer wall time, evaluation excluded), train_loss (full training set),
test_loss, test_acc and test_errors (the L-SR1 paper's error count) when a test split exists, and
the last step's info (radius, step size, skipped updates, …). Models with batch normalization
are evaluated in eval mode with running statistics re-estimated from the training set at the
current θ (:func:`~qnref.nn.norm.estimate_batchnorm_stats`, batches of ``BN_STATS_BATCH``).

Also (docs/training.md): step-size schedules (:mod:`qnref.schedules`; records carry ``lr`` and
``lr_factor``), a seeded stratified validation split (``val_*`` metrics; ``train_acc`` and
``train_errors`` for classification too), early stopping on a named metric with the best checkpoint
kept (:class:`EarlyStopping`), budgets in steps, wall-clock and process CPU time (records carry
``wall_time`` and ``cpu_time``), a target whose first hit is recorded (:class:`Target`, the
``target_*`` fields) and ``stopped`` on the last record of a run that ended early.

Checkpoints (:mod:`qnref.checkpoint`: an ``.npz`` of arrays + a JSON manifest with SHA-256 hashes,
never a pickle) hold θ, the optimizer state, the Problem's stream position and RNG states, the
history and fingerprints of the model, optimizer, data and run; they are written atomically.
Resuming from one reproduces the uninterrupted run bit for bit on the CPU; a checkpoint that is
corrupt, truncated, written for another configuration, or whose θ has the wrong length, dtype or
non-finite entries is refused with one :class:`~qnref.checkpoint.CheckpointError` line.

Divergence: a run whose training loss turns non-finite, or exceeds ``diverge_factor`` (default
:data:`DIVERGE_FACTOR`) times its starting loss, stops with :class:`DivergenceError`; its last
record carries ``"diverged": <reason>``. Interrupts (``KeyboardInterrupt`` / :class:`Interrupted`)
become :class:`RunInterrupted`, which names the last checkpoint written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy

from . import backend, checkpoint as ckpt
from . import schedules as sched
from . import validate as check
from .checkpoint import CheckpointError
from .nn.losses import get_loss
from .nn.model import Sequential
from .nn.norm import batchnorm_layers, estimate_batchnorm_stats
from .optim.base import Optimizer, Problem

CHECKPOINT_VERSION = ckpt.FORMAT_VERSION
#: default of ``train(diverge_factor=…)`` / ``qnref train --diverge-factor``: a training loss above
#: this multiple of the starting loss marks the run as diverged
DIVERGE_FACTOR = 1e3
#: keys every checkpoint payload holds
PAYLOAD_KEYS = ("theta", "state", "problem", "history", "step", "time", "next_eval", "next_ckpt")
#: batch size of the training-mode passes that re-estimate BatchNorm running statistics before
#: each evaluation (deterministic, so resumed runs stay bit-identical)
BN_STATS_BATCH = 256


class TrainingError(RuntimeError):
    """Training stopped: non-finite loss, a failing optimizer, or a bad checkpoint.

    ``history`` holds the records made before a diverging run stopped (empty otherwise)."""

    def __init__(self, message: str, history: list | None = None):
        super().__init__(message)
        self.history = list(history or [])


class DivergenceError(TrainingError):
    """The training loss turned non-finite or exceeded ``diverge_factor`` × its starting loss; the
    last record of ``history`` carries ``"diverged"``."""


class Interrupted(KeyboardInterrupt):
    """A signal asked the run to stop (raised by the CLI's SIGINT/SIGTERM handlers);
    ``signum`` is the signal number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)


class RunInterrupted(Interrupted):
    """A :func:`train` run was interrupted: ``history`` holds its records so far and ``checkpoint``
    / ``checkpoint_step`` / ``checkpoint_epoch`` name the last checkpoint written or loaded (None
    when there is none)."""

    def __init__(self, signum: int, history: list, checkpoint: str | None, step: int | None, epoch: float | None):
        super().__init__(signum)
        self.history, self.checkpoint, self.checkpoint_step, self.checkpoint_epoch = history, checkpoint, step, epoch


@dataclass
class TrainResult:
    theta: Any
    state: Any
    history: list[dict]
    stopped: str = "completed"
    steps: int = 0

    @property
    def final(self) -> dict:
        return self.history[-1]


@dataclass
class Data:
    """Arrays for one run (already on the run's device and dtype)."""

    X_train: Any
    y_train: Any
    X_test: Any = None
    y_test: Any = None
    loss: str = "softmax_ce"
    name: str = "data"
    X_val: Any = None
    y_val: Any = None

    @classmethod
    def from_dataset(cls, ds: Any, device: backend.Device = "cpu", dtype: Any = "float64") -> "Data":
        d = ds.to(device, dtype)
        return cls(d.X_train, d.y_train, d.X_test, d.y_test, d.loss, d.name)

    def split_validation(self, fraction: float, seed: int = 0) -> "Data":
        """Hold out ``fraction`` of the training rows as a validation split (:func:`validation_split`:
        seeded, stratified for classification); the remaining training rows keep their order."""
        if self.X_val is not None:
            raise ValueError("val_fraction: the data already hold a validation split")
        tr, va = validation_split(self.y_train, fraction, seed, self.loss)
        take = lambda a, i: a[backend.to_device(i, backend.device_of(a))]  # noqa: E731
        return dataclasses.replace(self, X_train=take(self.X_train, tr), y_train=take(self.y_train, tr),
                                   X_val=take(self.X_train, va), y_val=take(self.y_train, va))


def validation_split(y: Any, fraction: float, seed: int = 0, loss: str = "softmax_ce") -> tuple[Any, Any]:
    """Row indices ``(train, val)`` (sorted, host int64) holding out ``fraction`` of the rows.

    Deterministic in ``seed``. For classification targets (integer labels with softmax_ce, or one
    binary column) every class gives round(fraction × its size) rows (largest remainders, so the
    total is round(fraction × n)); other targets are split uniformly at random. Both parts are
    non-empty."""
    fraction = check.number("val_fraction", fraction, 0, 1, lo_open=True, hi_open=True)
    check.integer("seed", seed, 0)
    yh = backend.to_numpy(y)
    n = int(yh.shape[0])
    n_val = int(round(fraction * n))
    if n_val < 1 or n_val > n - 1:
        raise check.ValidationError("val_fraction", fraction, f"a fraction leaving ≥ 1 row on each side of {n} training rows")
    rng = numpy.random.default_rng([int(seed), 0x5EED, 23])
    lname = getattr(loss, "name", loss)
    if (lname == "softmax_ce" and yh.ndim == 1 and yh.dtype.kind in "iu") or (
            lname == "sigmoid_ce" and yh.ndim == 2 and yh.shape[1] == 1 and bool(numpy.all((yh == 0) | (yh == 1)))):
        labels = yh.reshape(n)
        classes = numpy.unique(labels)
        groups = [numpy.flatnonzero(labels == c) for c in classes]
        exact = numpy.array([fraction * len(g) for g in groups])
        counts = numpy.floor(exact).astype(int)
        order = numpy.argsort(-(exact - counts), kind="stable")
        counts[order[: n_val - int(counts.sum())]] += 1
        val = numpy.concatenate([rng.permutation(g)[:k] for g, k in zip(groups, counts)])
    else:
        val = rng.permutation(n)[:n_val]
    mask = numpy.zeros(n, bool)
    mask[val] = True
    return numpy.flatnonzero(~mask), numpy.flatnonzero(mask)


#: metrics a record can hold (for early stopping, targets and the best checkpoint)
METRICS = tuple(f"{split}_{m}" for split in ("train", "val", "test") for m in ("loss", "acc", "errors"))


def _mode(metric: str, mode: str | None, option: str) -> str:
    if mode is None:
        return "max" if metric.endswith("_acc") else "min"
    if mode not in ("min", "max"):
        raise check.ValidationError(f"{option} mode", mode, "'min' or 'max'")
    return mode


@dataclass(frozen=True)
class EarlyStopping:
    """Stop when ``metric`` (one of :data:`METRICS`, e.g. ``val_loss``) has not improved by more than
    ``min_delta`` for ``patience`` evaluations; ``mode`` min/max (default: max for ``*_acc``).

    Stateless: the best evaluation and the count since it are read from the history, so resumed
    runs stop exactly where the uninterrupted run does."""

    metric: str = "val_loss"
    patience: int = 5
    min_delta: float = 0.0
    mode: str | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise check.ValidationError("early_stopping metric", self.metric, f"one of {', '.join(METRICS)}")
        object.__setattr__(self, "patience", check.integer("early_stopping patience", self.patience, 1))
        object.__setattr__(self, "min_delta", check.number("early_stopping min_delta", self.min_delta, 0))
        object.__setattr__(self, "mode", _mode(self.metric, self.mode, "early_stopping"))

    def best(self, history: list[dict]) -> int | None:
        """Index of the best record so far (the first of equals; improvements must beat min_delta)."""
        best_i, best_v = None, None
        for i, r in enumerate(history):
            v = r.get(self.metric)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            if best_v is None or (v < best_v - self.min_delta if self.mode == "min" else v > best_v + self.min_delta):
                best_i, best_v = i, v
        return best_i

    def should_stop(self, history: list[dict]) -> bool:
        b = self.best(history)
        return b is not None and len(history) - 1 - b >= self.patience


@dataclass(frozen=True)
class Target:
    """A target value of a metric (``Target.parse("test_acc>=0.95")``); the first record reaching it
    gives the run's ``target_*`` fields (step, epoch, passes, time, wall and CPU time)."""

    metric: str
    value: float
    mode: str = "min"  # min: reached when metric ≤ value; max: when ≥ value

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise check.ValidationError("target metric", self.metric, f"one of {', '.join(METRICS)}")
        object.__setattr__(self, "value", check.number("target value", self.value))
        object.__setattr__(self, "mode", _mode(self.metric, self.mode, "target"))

    @classmethod
    def parse(cls, text: "str | Target", option: str = "--target") -> "Target":
        if isinstance(text, Target):
            return text
        m = re.fullmatch(r"\s*([a-z_]+)\s*(<=|>=)\s*(\S+)\s*", str(text))
        if not m:
            raise check.ValidationError(option, text, f"METRIC<=VALUE or METRIC>=VALUE with METRIC one of {', '.join(METRICS)}")
        if m.group(1) not in METRICS:
            raise check.ValidationError(f"{option} metric", m.group(1), f"one of {', '.join(METRICS)}")
        return cls(m.group(1), check.parse_number(f"{option} value", m.group(3)), "min" if m.group(2) == "<=" else "max")

    def spec(self) -> str:
        return f"{self.metric}{'<=' if self.mode == 'min' else '>='}{self.value!r}"

    def reached(self, rec: dict) -> bool:
        v = rec.get(self.metric)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return v <= self.value if self.mode == "min" else v >= self.value


def evaluate(model: Sequential, loss: Any, X: Any, y: Any, theta: Any, chunk: int = 2048, comm: Any = None) -> dict:
    """Mean loss on (X, y) in eval mode, in chunks (uncounted passes); for classification
    (integer labels with softmax_ce, or one binary output with sigmoid_ce) also accuracy and
    the number of errors. With a communicator of several ranks, each rank evaluates its shard
    of the rows and the sums are allreduced."""
    loss = get_loss(loss)
    classify = (loss.name == "softmax_ce" and y.ndim == 1) or (
        loss.name == "sigmoid_ce" and y.ndim == 2 and y.shape[1] == 1 and _binary(y))
    n = int(X.shape[0])
    lo, hi = 0, n
    if comm is not None and comm.size > 1:
        from .distributed.problem import shard_bounds  # noqa: PLC0415 - MPI runs only

        lo, hi = shard_bounds(n, comm.size, comm.rank) if n >= comm.size else (0, n if comm.rank == 0 else 0)
    total, correct = 0.0, 0
    for start in range(lo, hi, chunk):
        stop = min(hi, start + chunk)
        Xc, yc = X[start:stop], y[start:stop]
        z, _ = model.forward(theta, Xc, train=False)
        total += float(loss.per_example(z, yc).sum())
        if classify:
            correct += int((loss.predict(z) == yc).sum())
    if comm is not None and comm.size > 1:
        total, correct = (float(v) for v in comm.allreduce_sum(numpy.array([total, float(correct)])))
    out = {"loss": total / n}
    if classify:
        c = int(round(correct))
        out["acc"] = c / n
        out["errors"] = n - c
    return out


def _binary(y: Any) -> bool:
    """True when every target is exactly 0 or 1."""
    xp = backend.namespace(y)
    return bool(xp.all((y == 0) | (y == 1)))


def fingerprints(model: Sequential, optimizer: Optimizer, data: Data, l2: float, seed: int) -> dict:
    """What a resumed run must share with the checkpoint: model, optimizer (class and every
    hyperparameter), data (name, size, dtype, SHA-256 of the arrays) and run (λ, seed)."""
    return {
        "model": {"name": model.name, "n_params": int(model.n_params)},
        "optimizer": {"class": type(optimizer).__name__,
                      "hyperparameters": repr(sorted(optimizer.hyperparameters().items()))},
        "data": {"name": data.name, "n_train": int(data.X_train.shape[0]), "dtype": str(data.X_train.dtype),
                 "sha256": _data_sha256(data)},
        "run": {"l2": float(l2), "seed": int(seed)},
    }


def _data_sha256(data: Data) -> str:
    h = hashlib.sha256()
    for a in (data.X_train, data.y_train, data.X_test, data.y_test):
        if a is not None:
            host = numpy.ascontiguousarray(backend.to_numpy(a))
            h.update(f"{host.dtype.str}{host.shape}".encode())
            h.update(host.view(numpy.uint8).reshape(-1).data)
    return h.hexdigest()


def save_checkpoint(path: str, payload: dict, fingerprint: dict, state_class: Any = Any) -> None:
    """Write a training checkpoint (:func:`qnref.checkpoint.save`, atomic; the optimizer state is
    encoded through the fields of ``state_class``)."""
    ckpt.save(path, payload, fingerprint, {"state": state_class})


def load_checkpoint(path: str, state_class: Any = Any, device: backend.Device = "cpu") -> tuple[dict, dict]:
    """Read and verify a checkpoint: ``(payload, manifest)`` (:class:`CheckpointError` otherwise)."""
    payload, manifest = ckpt.load(path, {"state": state_class}, device=device)
    missing = [k for k in PAYLOAD_KEYS if k not in payload]
    if missing:
        raise CheckpointError(path, f"lacks the field(s) {', '.join(missing)} of a training checkpoint")
    return payload, manifest


def _check_payload(path: str, ck: dict, model: Sequential, data: Data, problem: Problem, state_class: type) -> None:
    """Everything a resumed run relies on, checked before any of it is used."""
    theta = ck["theta"]
    n = int(model.n_params)
    if not hasattr(theta, "shape") or tuple(theta.shape) != (n,):
        raise CheckpointError(path, f"θ has shape {getattr(theta, 'shape', type(theta).__name__)}, the model has {n} parameters")
    if numpy.dtype(theta.dtype) != numpy.dtype(data.X_train.dtype):
        raise CheckpointError(path, f"θ is {theta.dtype} but the data are {data.X_train.dtype}")
    if not backend.all_finite(theta):
        raise CheckpointError(path, f"θ holds {int((~numpy.isfinite(backend.to_numpy(theta))).sum())} non-finite value(s)")
    if type(ck["state"]) is not state_class:
        raise CheckpointError(path, f"optimizer state is not a {state_class.__qualname__}")
    for key, kind in (("step", int), ("time", float), ("next_eval", float), ("next_ckpt", float), ("history", list),
                      ("problem", dict)):
        v = ck[key]
        if not isinstance(v, kind) or isinstance(v, bool) or (kind is float and not math.isfinite(v)) or \
                (kind in (int, float) and v < 0):
            raise CheckpointError(path, f"{key} is {v!r}, expected a non-negative finite {kind.__name__}")
    if not ck["history"] or not all(isinstance(r, dict) and isinstance(r.get("train_loss"), float) for r in ck["history"]):
        raise CheckpointError(path, "history is empty or its records lack train_loss")
    st = ck["problem"]
    need = ("rng", "perm", "pos", "samples_drawn", "epoch_passes", "counter")
    missing = [k for k in need if k not in st]
    if missing:
        raise CheckpointError(path, f"problem state lacks {', '.join(missing)}")
    N = problem.n_samples
    perm = st["perm"]
    if not (isinstance(perm, numpy.ndarray) and perm.shape == (N,) and perm.dtype.kind in "iu"
            and numpy.array_equal(numpy.sort(perm), numpy.arange(N))):
        raise CheckpointError(path, f"problem state's permutation is not a permutation of the {N} training examples")
    for key, hi in (("pos", N), ("samples_drawn", None), ("epoch_passes", None)):
        v = st[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (hi is not None and v > hi):
            raise CheckpointError(path, f"problem state's {key} is {v!r}")
    try:
        problem.load_state(st)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"problem state cannot be restored ({type(exc).__name__}: {exc})") from None


def train(
    model: Sequential,
    optimizer: Optimizer,
    data: Data,
    *,
    epochs: float = 1.0,
    seed: int = 0,
    l2: float = 0.0,
    theta0: Any = None,
    init_scheme: str = "glorot",
    max_steps: int | None = None,
    eval_every: float = 1.0,
    callbacks: Sequence[Callable[[dict], Any]] = (),
    checkpoint: str | None = None,
    checkpoint_every: float = 1.0,
    resume: bool = False,
    stop_after_steps: int | None = None,
    progress: bool | str = False,
    max_nonfinite: int = 20,
    diverge_factor: float | None = DIVERGE_FACTOR,
    log: Any = None,
    comm: Any = None,
    schedule: "sched.Schedule | str | None" = None,
    schedule_param: str | None = None,
    val_fraction: float = 0.0,
    early_stopping: EarlyStopping | None = None,
    best_checkpoint: str | None = None,
    max_wall_time: float | None = None,
    max_cpu_time: float | None = None,
    target: "Target | str | None" = None,
    stop_at_target: bool = False,
) -> TrainResult:
    """Train ``model`` with ``optimizer`` on ``data`` for ``epochs`` data passes.

    ``eval_every`` and ``checkpoint_every`` are in epochs. ``stop_after_steps`` ends the run early
    (with a checkpoint when one is configured) — used to test resumption. ``callbacks`` are called
    with every evaluation record (a dict, see the module docstring) after it is logged; one
    returning True stops the run (``stopped="callback"``). Training stops with
    :class:`TrainingError` when ``max_nonfinite`` consecutive steps were rejected as non-finite,
    and with :class:`DivergenceError` when the training loss becomes non-finite or exceeds
    ``diverge_factor`` × the starting loss (``None``: no limit). ``log`` (e.g.
    :class:`qnref.report.RunLog`) gets ``restart(history)`` once the history is known (empty, or
    the resumed one) and ``append(record)`` for every new record, so a report survives a crash.
    ``KeyboardInterrupt`` (Ctrl-C, or :class:`Interrupted` from a signal handler) ends the run with
    :class:`RunInterrupted`, naming the last checkpoint written or loaded.

    Schedules (:mod:`qnref.schedules`): ``schedule`` (an object or its text, e.g.
    ``"multistep:60,120:0.1"``) multiplies the optimizer's step size (``lr``/``alpha0``, or the
    hyperparameter ``schedule_param``) by its factor at each step's position (epoch, step); the
    step is taken by a new optimizer with that hyperparameter changed. Records carry
    ``lr_factor`` and ``lr``: the factor and scheduled value (whatever the hyperparameter's name)
    in effect from the record's position on.

    Validation: ``val_fraction`` holds out that share of the training rows
    (:func:`validation_split`, seeded by ``seed``, stratified for classification); records then
    carry ``val_loss``/``val_acc``/``val_errors`` besides ``train_*`` and ``test_*``.
    ``early_stopping`` (:class:`EarlyStopping`) stops the run when its metric stopped improving
    (``stopped="early_stopping"``); ``best_checkpoint`` keeps a checkpoint of the best θ by the
    early-stopping metric (``val_loss`` if there is a validation split, else ``train_loss``, when
    no early stopping is given), rewritten whenever it improves (same format as ``checkpoint``).

    Budgets: besides ``epochs`` and ``max_steps``, ``max_wall_time`` and ``max_cpu_time`` (seconds
    of wall-clock and of process CPU time, :func:`time.process_time`, since the run started,
    evaluations included; resumed runs continue the counts) stop the run after the step that
    reaches them (``stopped="wall_time"`` / ``"cpu_time"``). ``target`` (:class:`Target` or
    ``"test_loss<=0.3"``) records the first evaluation that reaches it as ``target_step``,
    ``target_epoch``, ``target_passes``, ``target_time``, ``target_wall_time`` and
    ``target_cpu_time`` on every later record; ``stop_at_target`` then ends the run
    (``stopped="target"``). Records carry ``wall_time`` and ``cpu_time``; the last one carries
    ``stopped`` when the run ended for any reason but completing its epochs.

    ``progress``: False, True/``"bar"`` (a tqdm bar in epochs, ending at 100 %) or ``"lines"``
    (one line on stderr per evaluation).

    Every numeric argument is checked first (:mod:`qnref.validate`), the checkpoint path too
    (:func:`qnref.validate.output_file`), before any work.

    Data parallel (``docs/distributed.md``): ``comm`` is a :class:`qnref.distributed.Communicator`;
    by default :func:`qnref.distributed.get_comm` (serial unless launched by ``mpiexec`` with more
    than one process). With more than one rank the batches are sharded over the ranks
    (:class:`~qnref.distributed.DistributedProblem`), the configuration is compared across ranks at
    start, only rank 0 writes checkpoints and shows progress, and an exception on any rank aborts
    the whole job (MPI_Abort) instead of leaving the others waiting.
    """
    opts = dict(epochs=epochs, seed=seed, l2=l2, theta0=theta0, init_scheme=init_scheme, max_steps=max_steps,
                eval_every=eval_every, callbacks=callbacks, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                resume=resume, stop_after_steps=stop_after_steps, progress=progress, max_nonfinite=max_nonfinite,
                diverge_factor=diverge_factor, log=log, schedule=schedule, schedule_param=schedule_param,
                val_fraction=val_fraction, early_stopping=early_stopping, best_checkpoint=best_checkpoint,
                max_wall_time=max_wall_time, max_cpu_time=max_cpu_time, target=target, stop_at_target=stop_at_target)
    _check_arguments(opts)
    if opts["val_fraction"]:
        data = data.split_validation(opts["val_fraction"], seed)
    _check_metrics(opts, data)
    if comm is None:
        from .distributed import get_comm  # noqa: PLC0415

        comm = get_comm(backend.device_of(data.X_train))
    if comm.size > 1:
        with comm.abort_on_error("qnref train"):
            return _train(model, optimizer, data, comm=comm, **opts)
    return _train(model, optimizer, data, comm=None, **opts)


def _check_arguments(o: dict) -> None:
    """The numeric and flag arguments of :func:`train`, by name (ValueError/TypeError)."""
    check.number("epochs", o["epochs"], 0, lo_open=True)
    check.integer("seed", o["seed"], 0)
    check.number("l2", o["l2"], 0)
    check.number("eval_every", o["eval_every"], 0, lo_open=True)
    check.number("checkpoint_every", o["checkpoint_every"], 0, lo_open=True)
    check.integer("max_nonfinite", o["max_nonfinite"], 1)
    for key in ("max_steps", "stop_after_steps"):
        if o[key] is not None:
            check.integer(key, o[key], 0)
    if o["diverge_factor"] is not None:
        check.number("diverge_factor", o["diverge_factor"], 1, lo_open=True)
    check.boolean("resume", o["resume"])
    check.boolean("stop_at_target", o["stop_at_target"])
    if o["resume"] and o["checkpoint"] is None:
        raise ValueError("resume=True needs a checkpoint path")
    if o["checkpoint"] is not None:
        check.output_file("checkpoint", o["checkpoint"])
    if o["best_checkpoint"] is not None:
        check.output_file("best_checkpoint", o["best_checkpoint"])
        if o["checkpoint"] is not None and os.path.abspath(o["checkpoint"]) == os.path.abspath(o["best_checkpoint"]):
            raise check.PathError(f"best_checkpoint {o['best_checkpoint']} and checkpoint are the same file")
    for key in ("max_wall_time", "max_cpu_time"):
        if o[key] is not None:
            o[key] = check.number(key, o[key], 0, lo_open=True)
    vf = o["val_fraction"]
    o["val_fraction"] = 0.0 if vf is None else check.number("val_fraction", vf, 0, 1, hi_open=True)
    if o["progress"] not in (True, False, "bar", "lines", "none"):
        raise check.ValidationError("progress", o["progress"], "True, False, 'bar', 'lines' or 'none'")
    if o["early_stopping"] is not None and not isinstance(o["early_stopping"], EarlyStopping):
        raise check.ValidationError("early_stopping", o["early_stopping"], "an EarlyStopping or None")
    if o["target"] is not None:
        o["target"] = Target.parse(o["target"], "target")
    if o["stop_at_target"] and o["target"] is None:
        raise ValueError("stop_at_target=True needs a target")
    if o["schedule"] is not None:
        o["schedule"] = sched.parse(o["schedule"], "schedule")
    elif o["schedule_param"] is not None:
        raise ValueError("schedule_param needs a schedule")


def _check_metrics(o: dict, data: Data) -> None:
    """Metrics named by early stopping and the target exist for these data."""
    have = {"train_loss"}
    classify = _classifies(data)
    for split, X in (("train", data.X_train), ("val", data.X_val), ("test", data.X_test)):
        if X is not None:
            have |= {f"{split}_loss"} | ({f"{split}_acc", f"{split}_errors"} if classify else set())
    for label, obj in (("early_stopping metric", o["early_stopping"]), ("target metric", o["target"])):
        if obj is not None and obj.metric not in have:
            why = "no validation split (set val_fraction)" if obj.metric.startswith("val_") else \
                "no test split" if obj.metric.startswith("test_") and data.X_test is None else "a regression loss"
            raise check.ValidationError(label, obj.metric, f"one of {', '.join(sorted(have))} ({why})")


def _classifies(data: Data) -> bool:
    loss = get_loss(data.loss)
    y = data.y_train
    return (loss.name == "softmax_ce" and y.ndim == 1) or (
        loss.name == "sigmoid_ce" and y.ndim == 2 and y.shape[1] == 1 and _binary(y))


def _train(model, optimizer, data, *, epochs, seed, l2, theta0, init_scheme, max_steps, eval_every, callbacks, checkpoint,
           checkpoint_every, resume, stop_after_steps, progress, max_nonfinite, diverge_factor, log, comm, schedule,
           schedule_param, val_fraction, early_stopping, best_checkpoint, max_wall_time, max_cpu_time, target,
           stop_at_target) -> TrainResult:
    """The loop of :func:`train`; ``comm`` is None for one process."""
    xp = backend.namespace(data.X_train)
    fp = fingerprints(model, optimizer, data, l2, seed)
    scheduled = sched.Scheduled(optimizer, schedule, schedule_param) if schedule is not None else None
    if scheduled is not None:
        fp["run"]["schedule"] = f"{scheduled.param}: {scheduled.schedule.spec()}"
    if val_fraction:
        fp["run"]["val_fraction"] = float(val_fraction)
    monitor = early_stopping
    if monitor is None and best_checkpoint is not None:
        monitor = EarlyStopping("val_loss" if data.X_val is not None else "train_loss", patience=1)
    root = comm is None or comm.is_root
    eval_fn = evaluate
    bn_layers = batchnorm_layers(model)
    if comm is None:
        problem = Problem(model, data.loss, data.X_train, data.y_train, l2, seed=seed)
    else:
        from . import distributed  # noqa: PLC0415

        problem = distributed.DistributedProblem(model, data.loss, data.X_train, data.y_train, l2, seed=seed, comm=comm)
        eval_fn = lambda *a: evaluate(*a, comm=comm)  # noqa: E731
        progress = progress if root else False
    device = backend.device_of(data.X_train)
    if theta0 is None:
        theta = model.init(seed, scheme=init_scheme, device=device, dtype=data.X_train.dtype)
    else:
        model.layout.check(theta0, "theta0")
        theta = xp.array(theta0, dtype=data.X_train.dtype, copy=True)
    if comm is not None:
        from .distributed import fingerprint_check  # noqa: PLC0415

        flat = {f"{g}.{k}": v for g, d in fp.items() for k, v in d.items() if k not in ("hyperparameters", "sha256")}
        hyper = {f"optimizer.{k}": repr(v) for k, v in sorted(optimizer.hyperparameters().items())}
        fingerprint_check(comm, {**flat, **hyper,
                                 "data_hash": _data_hash(data), "theta0_hash": _array_hash(theta),
                                 "epochs": float(epochs), "checkpoint": checkpoint, "resume": bool(resume)})
    state = optimizer.init(theta)
    state_class = type(state)
    history: list[dict] = []
    step, opt_time, next_eval, next_ckpt = 0, 0.0, 0.0, checkpoint_every
    clock = {"wall": 0.0, "cpu": 0.0}  # totals of earlier (resumed-from) segments
    last_ckpt: dict = {"step": None, "epoch": None}
    if resume:
        if comm is None:
            got = _try_load(checkpoint, state_class, device)
        else:  # rank 0 reads, everyone gets the same payload (no shared file system needed)
            got = comm.bcast(_try_load(checkpoint, state_class, "cpu") if root else None)
            if got is not None and not isinstance(got, BaseException):
                got = ({**got[0], "state": _state_to(got[0]["state"], device)}, got[1])
        if isinstance(got, BaseException):
            raise got
        ck = got[0] if got is not None else None
        if ck is not None:
            ckpt.compare_fingerprints(checkpoint, got[1], fp)
            _check_payload(checkpoint, ck, model, data, problem, state_class)
            theta = backend.to_device(ck["theta"], device)
            state = ck["state"]
            history, step, opt_time = ck["history"], ck["step"], ck["time"]
            next_eval, next_ckpt = ck["next_eval"], ck["next_ckpt"]
            saved = ck.get("clock")
            if isinstance(saved, dict):
                clock = {k: float(saved.get(k, 0.0)) for k in ("wall", "cpu")}
            last_ckpt = {"step": step, "epoch": problem.epochs}
    wall0, cpu0 = time.perf_counter(), time.process_time()

    def clocks() -> tuple[float, float]:
        return clock["wall"] + time.perf_counter() - wall0, clock["cpu"] + time.process_time() - cpu0

    reached: dict = next(({k: v for k, v in r.items() if k.startswith("target_")} for r in history
                          if "target_step" in r), {}) if target is not None else {}

    def metrics(prefix: str, X: Any, y: Any, rec: dict) -> dict:
        out = eval_fn(model, data.loss, X, y, theta)
        rec[f"{prefix}_loss"] = out["loss"]
        if "acc" in out:
            rec[f"{prefix}_acc"], rec[f"{prefix}_errors"] = out["acc"], out["errors"]
        return out

    def record(info: dict | None) -> dict:
        wall, cpu = clocks()
        rec = {"step": step, "epoch": problem.epochs, "passes": problem.counter.grad_equivalents / problem.n_samples,
               "time": opt_time, "wall_time": wall, "cpu_time": cpu}
        if bn_layers:  # eval mode needs running statistics of the current θ (not tracked during steps)
            estimate_batchnorm_stats(model, theta, data.X_train, batch_size=BN_STATS_BATCH)
        metrics("train", data.X_train, data.y_train, rec)
        if l2:
            rec["train_loss"] += 0.5 * l2 * float(theta @ theta)
        if data.X_val is not None:
            metrics("val", data.X_val, data.y_val, rec)
        if data.X_test is not None:
            metrics("test", data.X_test, data.y_test, rec)
        if scheduled is not None:  # the step size in effect from this point on
            f = scheduled.factor(problem.epochs, step)
            rec["lr_factor"] = f
            rec["lr"] = scheduled.base_value * f
        if info:
            rec.update({k: v for k, v in info.items() if (isinstance(v, (int, float, bool, str)) or v is None)
                        and k not in rec})
        if target is not None:
            rec["target"] = target.spec()
            if not reached and target.reached(rec):
                reached.update(target_step=rec["step"], target_epoch=rec["epoch"], target_passes=rec["passes"],
                               target_time=rec["time"], target_wall_time=rec["wall_time"],
                               target_cpu_time=rec["cpu_time"])
            rec.update(reached)
        reason = _diverged(rec, history, diverge_factor)
        if reason:
            rec["diverged"] = reason
        history.append(rec)
        if reason:
            if log is not None and root:
                log.append(rec)
            raise DivergenceError(reason, history)
        return rec

    def payload() -> dict:
        wall, cpu = clocks()
        return {"theta": theta, "state": state, "problem": problem.state(), "history": history, "step": step,
                "time": opt_time, "next_eval": float(next_eval), "next_ckpt": float(next_ckpt),
                "clock": {"wall": wall, "cpu": cpu}}

    def write_checkpoint() -> None:
        with _signals_deferred():  # the file and the record of it change together
            if checkpoint and root:
                save_checkpoint(checkpoint, payload(), fp, state_class)
            last_ckpt.update(step=step, epoch=problem.epochs)

    def after_record(rec: dict, forced: str | None = None) -> str | None:
        """Log, best checkpoint, early stopping, target; the reason to stop (None: go on)."""
        why = forced
        if why is None and early_stopping is not None and early_stopping.should_stop(history):
            why = "early_stopping"
        elif why is None and stop_at_target and "target_step" in rec:
            why = "target"
        if why:
            rec["stopped"] = why
        if log is not None and root:
            log.append(rec)
        if best_checkpoint is not None and root and monitor.best(history) == len(history) - 1:
            with _signals_deferred():
                save_checkpoint(best_checkpoint, {**payload(), "best": {"metric": monitor.metric, "index": len(history) - 1,
                                                                        "value": float(rec[monitor.metric])}},
                                fp, state_class)
        return why

    def log_only(rec: dict, why: str | None = None) -> None:
        if why:
            rec["stopped"] = why
        if log is not None and root:
            log.append(rec)

    stopped, nonfinite_run, last_info = "completed", 0, None
    bar = None
    lines = progress == "lines"
    try:
        if log is not None and root:
            log.restart(history)
        if not history:
            rec = record(None)
            next_eval = eval_every
            after_record(rec)
            if lines:
                _print_line(rec, epochs)
        bar = _progress(progress in (True, "bar"), epochs, problem.epochs)
        while problem.epochs < epochs - 1e-12:
            if max_steps is not None and step >= max_steps:
                stopped = "max_steps"
                break
            if stop_after_steps is not None and step >= stop_after_steps:
                write_checkpoint()
                stopped = "interrupted"
                break
            opt = optimizer
            if scheduled is not None:
                opt, _ = scheduled.at(problem.epochs, step)
            t0 = time.perf_counter()
            new_theta, state, info = opt.step(theta, state, problem)
            opt_time += time.perf_counter() - t0
            if not backend.all_finite(new_theta):
                raise TrainingError(f"{type(optimizer).__name__} returned a non-finite θ at step {step} (this is a bug in the optimizer)", history)
            theta, step, last_info = new_theta, step + 1, info.as_dict()
            nonfinite_run = nonfinite_run + 1 if info.nonfinite else 0
            if nonfinite_run >= max_nonfinite:
                record(last_info)
                msg = (f"{nonfinite_run} consecutive steps hit non-finite losses or gradients; "
                       "lower the learning rate / initial radius or check the data")
                history[-1]["diverged"] = msg
                log_only(history[-1])
                raise DivergenceError(msg, history)
            if bar is not None:
                bar.update(min(problem.epochs, epochs) - bar.n)  # the last batch may overshoot
            budget = None
            if max_wall_time is not None or max_cpu_time is not None:
                wall, cpu = clocks()
                if max_cpu_time is not None and cpu >= max_cpu_time:
                    budget = "cpu_time"
                elif max_wall_time is not None and wall >= max_wall_time:
                    budget = "wall_time"
                if comm is not None:  # clocks differ between ranks: rank 0 decides for all
                    budget = comm.bcast(budget)
            if budget is not None:
                rec = record(last_info)
                after_record(rec, budget)
                if lines:
                    _print_line(rec, epochs)
                stopped = budget
                break
            if problem.epochs >= next_eval - 1e-12 or problem.epochs >= epochs - 1e-12:
                rec = record(last_info)
                next_eval = (math.floor(problem.epochs / eval_every + 1e-9) + 1) * eval_every
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['train_loss']:.4g}")
                if comm is not None:  # θ must be bit-identical on every rank; callbacks decide on rank 0
                    _check_same_theta(comm, theta, step)
                why = after_record(rec)
                if lines:
                    _print_line(rec, epochs)
                if why is None and _stop(comm, callbacks, rec):
                    why = rec["stopped"] = "callback"
                if why is not None:
                    stopped = why
                    break
            if checkpoint and problem.epochs >= next_ckpt - 1e-12:
                next_ckpt = (math.floor(problem.epochs / checkpoint_every + 1e-9) + 1) * checkpoint_every
                write_checkpoint()
        if stopped == "completed" and history[-1]["step"] != step:
            rec = record(last_info)
            after_record(rec)
            if lines:
                _print_line(rec, epochs)
        if stopped in ("completed", "cpu_time", "wall_time", "early_stopping", "target"):
            write_checkpoint()
        if bar is not None and stopped == "completed":
            bar.update(epochs - bar.n)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else 2
        raise RunInterrupted(signum, history, checkpoint if last_ckpt["step"] is not None else None,
                             last_ckpt["step"], last_ckpt["epoch"]) from None
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(theta, state, history, stopped, step)


def _print_line(rec: dict, epochs: float) -> None:
    """One progress line per evaluation (``progress="lines"``)."""
    import sys  # noqa: PLC0415

    parts = [f"epoch {rec['epoch']:.2f}/{epochs:g}", f"step {rec['step']}", f"train_loss {rec['train_loss']:.5g}"]
    for k in ("val_loss", "val_acc", "test_loss", "test_acc", "lr"):
        if k in rec:
            parts.append(f"{k} {rec[k]:.4g}")
    parts.append(f"{rec['time']:.2f} s")
    if "stopped" in rec:
        parts.append(f"stopped: {rec['stopped']}")
    print("  ".join(parts), file=sys.stderr, flush=True)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM arriving inside the block are handled when it ends (main thread only), so an
    interrupt never separates a written checkpoint from the record of which one it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in old:
        signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if held:
            handler = old[held[0]]
            if callable(handler):
                handler(held[0], None)
            elif handler in (signal.SIG_DFL, None):
                os.kill(os.getpid(), held[0])


def _diverged(rec: dict, history: list[dict], factor: float | None) -> str | None:
    """Why ``rec`` marks a diverged run (None when it does not)."""
    loss = rec["train_loss"]
    where = f"at epoch {rec['epoch']:.3f}, step {rec['step']}"
    if not math.isfinite(loss):
        return f"training loss became non-finite ({loss}) {where}"
    start = history[0]["train_loss"] if history else loss
    if factor is not None and start > 0 and loss > factor * start:
        return f"training loss {loss:.6g} exceeds {factor:g} × the starting loss {start:.6g} {where}"
    return None


def _state_to(state: Any, device: backend.Device) -> Any:
    """A broadcast host state's arrays moved to ``device`` (MPI: rank 0 read them on the host)."""
    if device == "cpu":
        return state
    node, arrays = ckpt.encode(state, type(state))
    return ckpt.decode(node, arrays, type(state), device=device)


def _progress(enabled: bool, total: float, start: float):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415 - only for interactive runs

    return tqdm(total=total, initial=start, unit="epoch", bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} [{elapsed}<{remaining}{postfix}]")


def _stop(comm: Any, callbacks: Sequence[Callable[[dict], Any]], rec: dict) -> bool:
    stop = any(cb(rec) is True for cb in callbacks) if comm is None or comm.is_root else False
    return stop if comm is None else bool(comm.bcast(stop))


def _array_hash(x: Any) -> str:
    import hashlib  # noqa: PLC0415

    a = numpy.ascontiguousarray(backend.to_numpy(x))
    return hashlib.sha1(a.view(numpy.uint8).reshape(-1)).hexdigest() + f":{a.dtype}:{a.shape}"


def _data_hash(data: Data) -> str:
    return ";".join(_array_hash(a) for a in (data.X_train, data.y_train, data.X_test, data.y_test) if a is not None)


def _check_same_theta(comm: Any, theta: Any, step: int) -> None:
    hashes = comm.allgather(_array_hash(theta))
    if len(set(hashes)) > 1:
        from .distributed import DistributedError  # noqa: PLC0415

        raise DistributedError(f"θ differs between ranks after step {step} (a reduction returned different bits on "
                            "different ranks); rerun with QNREF_MPI_DETERMINISTIC=1")


def _try_load(path: str, state_class: Any, device: backend.Device) -> Any:
    """A checkpoint's ``(payload, fingerprints)``, None when there is no file, or the exception
    (so that MPI's rank 0 can broadcast it and every rank raises it)."""
    try:
        if not os.path.lexists(path):
            return None
        payload, manifest = load_checkpoint(path, state_class, device)
        return payload, manifest["fingerprints"]
    except Exception as exc:  # noqa: BLE001 - re-raised on every rank after the broadcast
        return exc
