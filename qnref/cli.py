"""The ``qnref`` command: train, compare, list, check.

    qnref train --model mlp --optimizer lsr1-tr --dataset digits-flat --epochs 5
    qnref compare --preset quickstart --out reports/quickstart
    qnref list [models|optimizers|datasets|presets]
    qnref check [--device gpu]

Errors (unknown names, bad data folders, impossible batch sizes, NaN in data, …) print one line
``qnref: error: …`` and exit with status 2; nothing half-written is left behind.

Data parallel: ``mpiexec -n P qnref train …`` (and ``compare``) shards every batch over P ranks
(docs/distributed.md); rank 0 prints, writes reports and checkpoints. Under MPI any error on any
rank ends the whole job through MPI_Abort with the message, so no rank waits forever.
"""
from __future__ import annotations

import argparse
import ast
import math
import inspect
import os
import sys
from typing import Any, Sequence

from . import backend

EXIT_USAGE = 2


class CLIError(Exception):
    pass


# -- building blocks ------------------------------------------------------------------------------
def _parse_kv(items: Sequence[str]) -> dict:
    out = {}
    for item in items or ():
        if "=" not in item:
            raise CLIError(f"--opt expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k.strip()] = v
    return out


def make_optimizer(name: str, hyper: dict) -> Any:
    from .optim.registry import get_optimizer_class, suggest

    cls = get_optimizer_class(name)
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if not accepts_any:
        for k in hyper:
            if k not in params:
                raise CLIError(suggest(k, [p for p in params if p != "self"], f"hyperparameter of {name}"))
    return cls(**hyper)


def build_data(dataset: str, *, data_dir: str | None, seed: int, n_train: int | None, n_test: int | None, device: str, dtype: str,
               autoencoder: bool = False, **kw):
    from .data import load_dataset
    from .train import Data

    ds = load_dataset(dataset, data_dir=data_dir, seed=seed, n_train=n_train, n_test=n_test, **kw)
    if autoencoder:
        ds = ds.as_autoencoder()
    return ds, Data.from_dataset(ds, device=device, dtype=dtype)


def build_model(name: str, ds: Any, **kw):
    from .nn.zoo import build_model as zoo_build

    return zoo_build(name, input_shape=tuple(ds.input_shape), n_outputs=ds.n_outputs, **kw)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="cpu (NumPy) or gpu (CuPy); default cpu")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64", help="floating-point precision (default float64)")
    p.add_argument("--data-dir", default=None, help="folder with MNIST/Fashion-MNIST IDX files or cifar-10-batches-py (for those data sets)")
    p.add_argument("--n-train", type=int, default=None, help="use only this many training examples")
    p.add_argument("--n-test", type=int, default=None, help="use only this many test examples")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or tables; errors only")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qnref", description="Reference engine for second-order and quasi-Newton optimization of neural networks.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    tr = sub.add_parser("train", help="train one model with one optimizer", description="Train a model from the zoo on a data set with one optimizer.")
    tr.add_argument("--model", required=True, help="model name (see `qnref list models`)")
    tr.add_argument("--optimizer", required=True, help="optimizer name (see `qnref list optimizers`)")
    tr.add_argument("--dataset", required=True, help="data set name (see `qnref list datasets`)")
    tr.add_argument("--epochs", type=float, default=5.0, help="data passes drawn by the optimizer (default 5)")
    tr.add_argument("--batch-size", type=int, default=None, help="minibatch size, passed to the optimizer as batch_size")
    tr.add_argument("--lr", type=float, default=None, help="learning rate, passed to the optimizer as lr")
    tr.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="any optimizer hyperparameter (repeatable), e.g. --opt memory=10")
    tr.add_argument("--l2", type=float, default=0.0, help="L2 coefficient λ of (λ/2)‖θ‖² (default 0)")
    tr.add_argument("--seed", type=int, default=0, help="seed of θ₀, batches and sampling (default 0)")
    tr.add_argument("--init", default="glorot", help="initialiser: glorot, glorot_normal, he, gaussian, sparse")
    tr.add_argument("--eval-every", type=float, default=1.0, help="evaluate every this many epochs (default 1)")
    tr.add_argument("--out", default=None, help="write a report folder (runs.jsonl, summary.md, plots) here")
    tr.add_argument("--checkpoint", default=None, help="checkpoint file (written atomically every --checkpoint-every epochs)")
    tr.add_argument("--checkpoint-every", type=float, default=1.0, help="epochs between checkpoints (default 1)")
    tr.add_argument("--resume", action="store_true", help="resume from --checkpoint if it exists (bit-identical on CPU)")
    _common(tr)

    cp = sub.add_parser("compare", help="compare optimizers over seeds from the same start",
                        description="Run several optimizers over several seeds (same θ₀ per seed) and write a report folder.")
    cp.add_argument("--preset", default=None, help="a named experiment (see `qnref list presets`)")
    cp.add_argument("--model", default=None, help="model (without --preset)")
    cp.add_argument("--dataset", default=None, help="data set (without --preset)")
    cp.add_argument("--optimizers", default=None, help="comma-separated optimizer names (without --preset)")
    cp.add_argument("--epochs", type=float, default=None, help="override the preset's epochs")
    cp.add_argument("--seeds", default=None, help="comma-separated seeds (override the preset's)")
    cp.add_argument("--batch-size", type=int, default=None, help="batch size for --optimizers runs")
    cp.add_argument("--l2", type=float, default=None, help="L2 coefficient (override)")
    cp.add_argument("--out", default=None, help="report folder (default reports/<preset or 'compare'>)")
    _common(cp)

    ls = sub.add_parser("list", help="list models, optimizers, data sets or presets")
    ls.add_argument("what", nargs="?", choices=("models", "optimizers", "datasets", "presets", "all"), default="all")

    ck = sub.add_parser("check", help="verify the engine's products against finite differences on a tiny net")
    ck.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="also compare the GPU against the CPU")
    return ap


# -- commands -------------------------------------------------------------------------------------
def cmd_train(a: argparse.Namespace) -> int:
    from .distributed import get_comm
    from .report import write_report
    from .train import train

    comm = get_comm(a.device)  # first: NCCL picks this rank's GPU before any array exists
    quiet = a.quiet or not comm.is_root

    hyper = _parse_kv(a.opt)
    if a.batch_size is not None:
        hyper["batch_size"] = a.batch_size
    if a.lr is not None:
        hyper["lr"] = a.lr
    opt = make_optimizer(a.optimizer, hyper)
    ds, data = build_data(a.dataset, data_dir=a.data_dir, seed=a.seed, n_train=a.n_train, n_test=a.n_test, device=a.device, dtype=a.dtype)
    model = build_model(a.model, ds)
    _check_batch(hyper.get("batch_size"), data)
    res = train(model, opt, data, epochs=a.epochs, seed=a.seed, l2=a.l2, init_scheme=a.init, eval_every=a.eval_every,
                checkpoint=a.checkpoint, checkpoint_every=a.checkpoint_every, resume=a.resume, progress=not quiet, comm=comm)
    rows = [{"run": a.optimizer, "seed": a.seed, **r} for r in res.history]
    if a.out and comm.is_root:
        write_report(a.out, rows, f"{a.model} on {a.dataset}: {a.optimizer}")
    if not quiet:
        f = res.final
        extra = f", test acc {f['test_acc']:.4f}" if "test_acc" in f else ""
        ranks = f" on {comm.size} ranks" if comm.size > 1 else ""
        print(f"{a.optimizer}: {res.steps} steps, {f['epoch']:.2f} epochs, train loss {f['train_loss']:.6g}{extra}, {f['time']:.2f} s{ranks}")
        if a.out:
            print(f"report written to {a.out}")
    return 0


def _check_batch(bs: Any, data: Any) -> None:
    n = int(data.X_train.shape[0])
    if bs is not None and (bs < 1 or bs > n):
        raise CLIError(f"batch size {bs} is impossible for {n} training examples (use 1..{n})")


def cmd_compare(a: argparse.Namespace) -> int:
    from .distributed import get_comm
    from .presets import PRESETS, Preset, Run
    from .optim.registry import suggest
    from .report import write_report
    from .train import TrainingError, train

    if a.preset:
        if a.preset not in PRESETS:
            raise CLIError(suggest(a.preset, list(PRESETS), "preset"))
        pre = PRESETS[a.preset]
    else:
        if not (a.model and a.dataset and a.optimizers):
            raise CLIError("compare needs --preset, or --model, --dataset and --optimizers")
        bs = {"batch_size": a.batch_size} if a.batch_size else {}
        pre = Preset("compare", "ad hoc comparison", "", a.dataset, a.model,
                     tuple(Run(o, o, dict(bs)) for o in a.optimizers.split(",")))
    epochs = a.epochs if a.epochs is not None else pre.epochs
    seeds = tuple(int(s) for s in a.seeds.split(",")) if a.seeds else pre.seeds
    l2 = a.l2 if a.l2 is not None else pre.l2
    out = a.out or os.path.join("reports", pre.name)
    comm = get_comm(a.device)
    quiet = a.quiet or not comm.is_root
    opts = [(r, make_optimizer(r.optimizer, dict(r.hyperparameters))) for r in pre.runs]  # fail fast on names
    rows = []
    for seed in seeds:
        ds, data = build_data(pre.dataset, data_dir=a.data_dir, seed=seed, n_train=a.n_train, n_test=a.n_test,
                              device=a.device, dtype=a.dtype, autoencoder=pre.autoencoder, **pre.dataset_kwargs)
        model = build_model(pre.model, ds, **pre.model_kwargs)
        theta0 = model.init(seed, scheme=pre.init, std=pre.init_std, device=a.device, dtype=a.dtype)
        for run, opt in opts:
            _check_batch(run.hyperparameters.get("batch_size"), data)
            try:
                history = train(model, opt, data, epochs=epochs, seed=seed, l2=l2, theta0=theta0,
                                eval_every=pre.eval_every, comm=comm).history
            except TrainingError as exc:  # one diverging run is a result, not a reason to lose the others
                history = [h for h in exc.history if math.isfinite(h["train_loss"])] or exc.history[:1]
                history[-1] = {**history[-1], "diverged": str(exc)}
                if not quiet:
                    print(f"seed {seed}  {run.label:<12} DIVERGED: {exc}", flush=True)
            rows += [{"run": run.label, "seed": seed, **r} for r in history]
            if not quiet and "diverged" not in history[-1]:
                f = history[-1]
                acc = f" acc {f['test_acc']:.4f}" if "test_acc" in f else ""
                print(f"seed {seed}  {run.label:<12} train loss {f['train_loss']:.5g}{acc}  {f['time']:.2f} s", flush=True)
    title = f"{pre.name}: {pre.model} on {pre.dataset}" + (f" ({pre.paper})" if pre.paper else "")
    if not comm.is_root:
        return 0
    files = write_report(out, rows, title, extra_md=f"{pre.description}\n")
    if not quiet:
        print(f"report written to {out}: {', '.join(os.path.basename(f) for f in files)}")
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    what = a.what
    if what in ("models", "all"):
        from .nn.zoo import MODELS, build_model as zoo_build

        print("models:")
        for name, entry in MODELS.items():
            try:
                n = zoo_build(name).n_params
                size = f"{n:>11,}"
            except Exception:  # needs explicit shapes
                size = f"{'':>11}"
            print(f"  {name:<24}{size}  {entry.description if hasattr(entry, 'description') else entry[1]}")
    if what in ("optimizers", "all"):
        from .optim import load_all

        print("optimizers:")
        for name, cls in sorted(load_all().items()):
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            print(f"  {name:<14} {getattr(cls, 'family', ''):<14} {doc}")
    if what in ("datasets", "all"):
        from .data import DATASETS

        print("datasets:")
        for name, desc in DATASETS.items():
            print(f"  {name:<16} {desc}")
    if what in ("presets", "all"):
        from .presets import PRESETS

        print("presets:")
        for name, p in PRESETS.items():
            print(f"  {name:<24} {p.description}  [{p.paper}]")
    return 0


def cmd_check(a: argparse.Namespace) -> int:
    import numpy

    from .curvature import dense
    from .curvature.objective import Objective
    from .nn.activations import Tanh
    from .nn.dense import Dense
    from .nn.model import Sequential

    r = numpy.random.default_rng(0)
    model = Sequential([Dense(4), Tanh(), Dense(3)], input_shape=(5,))
    X, y = r.standard_normal((6, 5)), r.integers(0, 3, 6)
    theta, v = model.init(0, scheme="gaussian", std=0.7), r.standard_normal(model.n_params)
    obj = Objective(model, "softmax_ce", X, y, l2=1e-2)
    p = obj.at(theta)
    rel = lambda a_, b_: float(numpy.abs(a_ - b_).max() / numpy.abs(b_).max())  # noqa: E731
    checks = {
        "gradient vs finite differences": rel(p.grad, dense.gradient_fd(obj, theta)),
        "Hv vs finite-difference Hessian": rel(p.hvp(v), dense.hessian(obj, theta) @ v),
        "Gv vs explicit JᵀH_LJ": rel(p.ggn_vp(v), dense.ggn(obj, theta) @ v),
        "Fv vs explicit per-example grads": rel(p.fisher_vp(v), dense.fisher(obj, theta) @ v),
    }
    if a.device == "gpu":
        gobj = Objective(model, "softmax_ce", backend.to_device(X, "gpu"), backend.to_device(y, "gpu"), l2=1e-2)
        gp = gobj.at(backend.to_device(theta, "gpu"))
        checks["GPU Hv vs CPU Hv"] = rel(backend.to_numpy(gp.hvp(backend.to_device(v, "gpu"))), p.hvp(v))
    ok = True
    for name, err in checks.items():
        good = err < 1e-7
        ok &= good
        print(f"  {'ok ' if good else 'BAD'} {name:<36} max rel. error {err:.2e}")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    if a.command is None:
        ap.print_help()
        return EXIT_USAGE
    handlers = {"train": cmd_train, "compare": cmd_compare, "list": cmd_list, "check": cmd_check}
    comm = _parallel_comm(a)
    try:
        return handlers[a.command](a)
    except (CLIError, ValueError, TypeError, FileNotFoundError, backend.BackendError) as exc:
        return _fail(comm, f"qnref: error: {exc}", EXIT_USAGE)
    except RuntimeError as exc:  # TrainingError and friends
        return _fail(comm, f"qnref: error: {exc}", 1)
    except Exception as exc:  # noqa: BLE001 - under MPI every failure must end the whole job
        if comm is None:
            raise
        import traceback

        return _fail(comm, f"{traceback.format_exc()}qnref: error: {type(exc).__name__}: {exc}", 1)


def _parallel_comm(a: argparse.Namespace) -> Any:
    """The communicator when this is a train/compare run launched by mpiexec with > 1 process."""
    if a.command not in ("train", "compare"):
        return None
    from .distributed import get_comm, launched_under_mpi

    if launched_under_mpi() <= 1 and os.environ.get("QNREF_COMM", "auto") in ("", "auto", "serial"):
        return None
    comm = get_comm(a.device)
    return comm if comm.size > 1 else None


def _fail(comm: Any, msg: str, code: int) -> int:
    """Print the error; under MPI end every rank (MPI_Abort), since the others may be waiting."""
    if comm is None:
        print(msg, file=sys.stderr)
        return code
    comm.abort(f"{msg}\nqnref: error on rank {comm.rank} of {comm.size}; aborting all ranks (MPI_Abort)", code)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
