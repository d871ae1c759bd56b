"""The training loop: epochs, evaluation, metrics, callbacks, checkpoints, bit-identical resume.

    result = train(model, optimizer, data, epochs=5, seed=0)

Each record of ``result.history`` holds: step, epoch (data passes drawn by the optimizer),
passes (gradient-equivalent passes / N: forward+backward units, so Hessian products and line
searches count), time (optimizer wall time, evaluation excluded), train_loss (full training set),
test_loss, test_acc and test_errors (the L-SR1 paper's error count) when a test split exists, and
the last step's info (radius, step size, skipped updates, …). Models with batch normalization
are evaluated in eval mode with running statistics re-estimated from the training set at the
current θ (:func:`~qnref.nn.norm.estimate_batchnorm_stats`, batches of ``BN_STATS_BATCH``).

Checkpoints hold θ, the optimizer state, the Problem's stream position and RNG states, the history
and a fingerprint of the configuration; they are written atomically (temporary file + rename).
Resuming from one reproduces the uninterrupted run bit for bit on the CPU.
"""
from __future__ import annotations

import math
import os
import pickle
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy

from . import backend
from .curvature.objective import Objective
from .nn.losses import get_loss
from .nn.model import Sequential
from .nn.norm import batchnorm_layers, estimate_batchnorm_stats
from .optim.base import Optimizer, Problem, state_from_host, state_to_host

CHECKPOINT_VERSION = 1
#: batch size of the training-mode passes that re-estimate BatchNorm running statistics before
#: each evaluation (deterministic, so resumed runs stay bit-identical)
BN_STATS_BATCH = 256


class TrainingError(RuntimeError):
    """Training stopped: non-finite loss, a failing optimizer, or a bad checkpoint.

    ``history`` holds the records made before a diverging run stopped (empty otherwise)."""

    def __init__(self, message: str, history: list | None = None):
        super().__init__(message)
        self.history = list(history or [])


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


def _fingerprint(model: Sequential, optimizer: Optimizer, data: Data, l2: float, seed: int) -> dict:
    return {
        "model": model.name,
        "n_params": model.n_params,
        "optimizer": type(optimizer).__name__,
        "hyperparameters": repr(sorted(optimizer.hyperparameters().items())),
        "data": data.name,
        "n_train": int(data.X_train.shape[0]),
        "l2": float(l2),
        "seed": int(seed),
        "dtype": str(data.X_train.dtype),
    }


def save_checkpoint(path: str, payload: dict) -> None:
    """Write ``payload`` atomically: a temporary file in the same folder, then os.replace."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            pickle.dump({"qnref_checkpoint": CHECKPOINT_VERSION, **payload}, fh, protocol=pickle.HIGHEST_PROTOCOL)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (clear errors when it is not one)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        with open(path, "rb") as fh:
            data = pickle.load(fh)
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, ImportError, IndexError) as exc:
        raise TrainingError(f"checkpoint {path!r} is corrupt or not a qnref checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or data.get("qnref_checkpoint") != CHECKPOINT_VERSION:
        raise TrainingError(f"{path!r} is not a qnref checkpoint of version {CHECKPOINT_VERSION}")
    return data


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
    comm: Any = None,
) -> TrainResult:
    """Train ``model`` with ``optimizer`` on ``data`` for ``epochs`` data passes.

    ``eval_every`` and ``checkpoint_every`` are in epochs. ``stop_after_steps`` ends the run early
    (with a checkpoint when one is configured) — used to test resumption. A callback returning True
    stops the run. Training stops with :class:`TrainingError` when the training loss becomes
    non-finite or ``max_nonfinite`` consecutive steps were rejected as non-finite.

    Data parallel (``docs/distributed.md``): ``comm`` is a :class:`qnref.distributed.Communicator`;
    by default :func:`qnref.distributed.get_comm` (serial unless launched by ``mpiexec`` with more
    than one process). With more than one rank the batches are sharded over the ranks
    (:class:`~qnref.distributed.DistributedProblem`), the configuration is compared across ranks at
    start, only rank 0 writes checkpoints and shows progress, and an exception on any rank aborts
    the whole job (MPI_Abort) instead of leaving the others waiting.
    """
    if comm is None:
        from .distributed import get_comm  # noqa: PLC0415

        comm = get_comm(backend.device_of(data.X_train))
    if comm.size > 1:
        with comm.abort_on_error("qnref train"):
            return _train(model, optimizer, data, epochs=epochs, seed=seed, l2=l2, theta0=theta0, init_scheme=init_scheme,
                          max_steps=max_steps, eval_every=eval_every, callbacks=callbacks, checkpoint=checkpoint,
                          checkpoint_every=checkpoint_every, resume=resume, stop_after_steps=stop_after_steps,
                          progress=progress, max_nonfinite=max_nonfinite, comm=comm)
    return _train(model, optimizer, data, epochs=epochs, seed=seed, l2=l2, theta0=theta0, init_scheme=init_scheme,
                  max_steps=max_steps, eval_every=eval_every, callbacks=callbacks, checkpoint=checkpoint,
                  checkpoint_every=checkpoint_every, resume=resume, stop_after_steps=stop_after_steps,
                  progress=progress, max_nonfinite=max_nonfinite, comm=None)


def _train(model, optimizer, data, *, epochs, seed, l2, theta0, init_scheme, max_steps, eval_every, callbacks, checkpoint,
           checkpoint_every, resume, stop_after_steps, progress, max_nonfinite, comm) -> TrainResult:
    """The loop of :func:`train`; ``comm`` is None for one process."""
    if not epochs > 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if not eval_every > 0:
        raise ValueError(f"eval_every must be positive, got {eval_every}")
    xp = backend.namespace(data.X_train)
    fp = _fingerprint(model, optimizer, data, l2, seed)
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

        hyper = {f"optimizer.{k}": repr(v) for k, v in sorted(optimizer.hyperparameters().items())}
        fingerprint_check(comm, {**{k: v for k, v in fp.items() if k != "hyperparameters"}, **hyper,
                                 "data_hash": _data_hash(data), "theta0_hash": _array_hash(theta),
                                 "epochs": float(epochs), "checkpoint": checkpoint, "resume": bool(resume)})
    state = optimizer.init(theta)
    history: list[dict] = []
    step, opt_time, next_eval, next_ckpt = 0, 0.0, 0.0, checkpoint_every
    if resume:
        if checkpoint is None:
            raise ValueError("resume=True needs a checkpoint path")
        if comm is None:
            ck = load_checkpoint(checkpoint) if os.path.exists(checkpoint) else None
        else:  # rank 0 reads, everyone gets the same payload (no shared file system needed)
            ck = comm.bcast(_try_load(checkpoint) if root else None)
            if isinstance(ck, BaseException):
                raise ck
        if ck is not None:
            if ck["fingerprint"] != fp:
                diff = {k: (ck["fingerprint"].get(k), v) for k, v in fp.items() if ck["fingerprint"].get(k) != v}
                raise TrainingError(f"checkpoint {checkpoint!r} was written for another configuration: {diff}")
            theta = backend.to_device(ck["theta"], device)
            state = state_from_host(type(state), ck["state"], device)
            problem.load_state(ck["problem"])
            history, step, opt_time = ck["history"], ck["step"], ck["time"]
            next_eval, next_ckpt = ck["next_eval"], ck["next_ckpt"]

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
        history.append(rec)
        return rec

    def write_checkpoint() -> None:
        if checkpoint and root:
            save_checkpoint(checkpoint, {
                "fingerprint": fp, "theta": backend.to_numpy(theta).copy(), "state": state_to_host(state),
                "problem": problem.state(), "history": history, "step": step, "time": opt_time,
                "next_eval": next_eval, "next_ckpt": next_ckpt,
            })

    if not history:
        record(None)
        next_eval = eval_every
    bar = _progress(progress, epochs, problem.epochs)
    stopped, nonfinite_run, last_info = "completed", 0, None
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
            raise TrainingError(f"{nonfinite_run} consecutive steps hit non-finite losses or gradients; "
                                "lower the learning rate / initial radius or check the data", history)
        if bar is not None:
            bar.update(problem.epochs - bar.n)
        if problem.epochs >= next_eval - 1e-12 or problem.epochs >= epochs - 1e-12:
            rec = record(last_info)
            next_eval = (math.floor(problem.epochs / eval_every + 1e-9) + 1) * eval_every
            if not math.isfinite(rec["train_loss"]):
                raise TrainingError(f"training loss became non-finite ({rec['train_loss']}) at epoch {rec['epoch']:.3f}, step {step}", history)
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
    if bar is not None:
        bar.close()
    if stopped == "completed" and history[-1]["step"] != step:
        record(last_info)
    if stopped == "completed":
        write_checkpoint()
    return TrainResult(theta, state, history, stopped, step)


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


def _try_load(path: str) -> Any:
    """Rank 0's read of a checkpoint for broadcasting: the payload, None, or the exception."""
    try:
        return load_checkpoint(path) if os.path.exists(path) else None
    except Exception as exc:  # noqa: BLE001 - re-raised on every rank after the broadcast
        return exc
