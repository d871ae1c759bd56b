"""The training loop: epochs, evaluation, metrics, callbacks, checkpoints, bit-identical resume.

    result = train(model, optimizer, data, epochs=5, seed=0)

Each record of ``result.history`` holds: step, epoch (data passes drawn by the optimizer),
passes (gradient-equivalent passes / N: forward+backward units, so Hessian products and line
searches count), time (optimizer wall time, evaluation excluded), train_loss (full training set),
test_loss, test_acc and test_errors (the L-SR1 paper's error count) when a test split exists, and
the last step's info (radius, step size, skipped updates, …). Models with batch normalization
are evaluated in eval mode with running statistics re-estimated from the training set at the
current θ (:func:`~qnref.nn.norm.estimate_batchnorm_stats`, batches of ``BN_STATS_BATCH``).

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
import hashlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy

from . import backend, checkpoint as ckpt
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

    @classmethod
    def from_dataset(cls, ds: Any, device: backend.Device = "cpu", dtype: Any = "float64") -> "Data":
        d = ds.to(device, dtype)
        return cls(d.X_train, d.y_train, d.X_test, d.y_test, d.loss, d.name)


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
    progress: bool = False,
    max_nonfinite: int = 20,
    diverge_factor: float | None = DIVERGE_FACTOR,
    log: Any = None,
    comm: Any = None,
) -> TrainResult:
    """Train ``model`` with ``optimizer`` on ``data`` for ``epochs`` data passes.

    ``eval_every`` and ``checkpoint_every`` are in epochs. ``stop_after_steps`` ends the run early
    (with a checkpoint when one is configured) — used to test resumption. A callback returning True
    stops the run. Training stops with :class:`TrainingError` when ``max_nonfinite`` consecutive
    steps were rejected as non-finite, and with :class:`DivergenceError` when the training loss
    becomes non-finite or exceeds ``diverge_factor`` × the starting loss (``None``: no limit).
    ``log`` (e.g. :class:`qnref.report.RunLog`) gets ``restart(history)`` once the history is known
    (empty, or the resumed one) and ``append(record)`` for every new record, so a report survives
    a crash. ``KeyboardInterrupt`` (Ctrl-C, or :class:`Interrupted` from a signal handler) ends the
    run with :class:`RunInterrupted`, naming the last checkpoint written or loaded.

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
                diverge_factor=diverge_factor, log=log)
    _check_arguments(opts)
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
    if o["resume"] and o["checkpoint"] is None:
        raise ValueError("resume=True needs a checkpoint path")
    if o["checkpoint"] is not None:
        check.output_file("checkpoint", o["checkpoint"])


def _train(model, optimizer, data, *, epochs, seed, l2, theta0, init_scheme, max_steps, eval_every, callbacks, checkpoint,
           checkpoint_every, resume, stop_after_steps, progress, max_nonfinite, diverge_factor, log, comm) -> TrainResult:
    """The loop of :func:`train`; ``comm`` is None for one process."""
    xp = backend.namespace(data.X_train)
    fp = fingerprints(model, optimizer, data, l2, seed)
    root = comm is None or comm.is_root
    eval_fn = evaluate
    bn_layers = batchnorm_layers(model)
    if comm is None:
        problem = Problem(model, data.loss, data.X_train, data.y_train, l2, seed=seed)
    else:
        from . import distributed  # noqa: PLC0415

        problem = distributed.DistributedProblem(model, data.loss, data.X_train, data.y_train, l2, seed=seed, comm=comm)
        eval_fn = lambda *a: evaluate(*a, comm=comm)  # noqa: E731
        progress = progress and root
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
            last_ckpt = {"step": step, "epoch": problem.epochs}

    def record(info: dict | None) -> dict:
        rec = {"step": step, "epoch": problem.epochs, "passes": problem.counter.grad_equivalents / problem.n_samples,
               "time": opt_time}
        if bn_layers:  # eval mode needs running statistics of the current θ (not tracked during steps)
            estimate_batchnorm_stats(model, theta, data.X_train, batch_size=BN_STATS_BATCH)
        tr = eval_fn(model, data.loss, data.X_train, data.y_train, theta)
        rec["train_loss"] = tr["loss"] + (0.5 * l2 * float(theta @ theta) if l2 else 0.0)
        if data.X_test is not None:
            te = eval_fn(model, data.loss, data.X_test, data.y_test, theta)
            rec["test_loss"] = te["loss"]
            if "acc" in te:
                rec["test_acc"], rec["test_errors"] = te["acc"], te["errors"]
        if info:
            rec.update({k: v for k, v in info.items() if isinstance(v, (int, float, bool, str)) or v is None})
        reason = _diverged(rec, history, diverge_factor)
        if reason:
            rec["diverged"] = reason
        history.append(rec)
        if log is not None and root:
            log.append(rec)
        if reason:
            raise DivergenceError(reason, history)
        return rec

    def write_checkpoint() -> None:
        with _signals_deferred():  # the file and the record of it change together
            if checkpoint and root:
                save_checkpoint(checkpoint, {
                    "theta": theta, "state": state, "problem": problem.state(), "history": history, "step": step,
                    "time": opt_time, "next_eval": float(next_eval), "next_ckpt": float(next_ckpt),
                }, fp, state_class)
            last_ckpt.update(step=step, epoch=problem.epochs)

    if log is not None and root:
        log.restart(history)
    stopped, nonfinite_run, last_info = "completed", 0, None
    bar = None
    try:
        if not history:
            record(None)
            next_eval = eval_every
        bar = _progress(progress, epochs, problem.epochs)
        while problem.epochs < epochs - 1e-12:
            if max_steps is not None and step >= max_steps:
                stopped = "max_steps"
                break
            if stop_after_steps is not None and step >= stop_after_steps:
                write_checkpoint()
                stopped = "interrupted"
                break
            t0 = time.perf_counter()
            new_theta, state, info = optimizer.step(theta, state, problem)
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
                raise DivergenceError(msg, history)
            if bar is not None:
                bar.update(min(problem.epochs, epochs) - bar.n)  # the last batch may overshoot
            if problem.epochs >= next_eval - 1e-12 or problem.epochs >= epochs - 1e-12:
                rec = record(last_info)
                next_eval = (math.floor(problem.epochs / eval_every + 1e-9) + 1) * eval_every
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['train_loss']:.4g}")
                if comm is not None:  # θ must be bit-identical on every rank; callbacks decide on rank 0
                    _check_same_theta(comm, theta, step)
                if _stop(comm, callbacks, rec):
                    stopped = "callback"
                    break
            if checkpoint and problem.epochs >= next_ckpt - 1e-12:
                next_ckpt = (math.floor(problem.epochs / checkpoint_every + 1e-9) + 1) * checkpoint_every
                write_checkpoint()
        if stopped == "completed" and history[-1]["step"] != step:
            record(last_info)
        if stopped == "completed":
            write_checkpoint()
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else 2
        raise RunInterrupted(signum, history, checkpoint if last_ckpt["step"] is not None else None,
                             last_ckpt["step"], last_ckpt["epoch"]) from None
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(theta, state, history, stopped, step)


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
