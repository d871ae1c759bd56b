"""The ``qnref`` command: train, compare, list, check.

    qnref train --model mlp --optimizer lsr1-tr --dataset digits-flat --epochs 5
    qnref train --model mlp --optimizer sgd --dataset digits --lr-schedule multistep:3,6:0.1
        --val-fraction 0.2 --early-stopping val_loss --out rep
    qnref train --config rep/config.toml --out rep2          # the same run, bit for bit (CPU)
    qnref compare --preset quickstart --out reports/quickstart
    qnref compare --model mlp --dataset digits --optimizers "kfac(lr=0.01,damping=0.3),adam(lr=1e-3)"
    qnref list [models|optimizers|datasets|presets]
    qnref check [--device gpu]
    qnref convert-checkpoint --trust OLD.ckpt NEW.ckpt

Errors print one line ``qnref: error: …`` (no traceback) and exit with a documented status
(docs/training.md, "Errors and exit codes"):

====  ==========================================================================================
0     success (also a diverged run with ``--allow-divergence``: it is marked in the report)
1     training failed (an optimizer returned non-finite θ, too many non-finite steps, …)
2     bad input: unknown names, a number out of range, an unusable ``--out``/``--checkpoint``
      path, bad data folders, impossible batch sizes, NaN in data
3     a checkpoint was refused (corrupt, truncated, another configuration, old pickle format)
4     the run diverged (loss non-finite or above ``--diverge-factor`` × the starting loss)
5     MPI: a rank waited longer than ``--mpi-timeout`` at a collective
130   interrupted by SIGINT (Ctrl-C); 143: by SIGTERM. One line names the last checkpoint and
      the command that resumes the run; the report holds what finished.
====  ==========================================================================================

Every numeric option is checked when the command line is parsed (:mod:`qnref.validate`); output
paths are checked before any data are loaded, and nothing is created when the input is bad.

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
import shlex
import signal
import sys
from typing import Any, Callable, Sequence

from . import backend
from . import validate as check

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CHECKPOINT, EXIT_DIVERGED, EXIT_MPI_TIMEOUT = 0, 1, 2, 3, 4, 5
#: report files that a --checkpoint path must not collide with
REPORT_FILES = ("runs.jsonl", "runs.csv", "summary.md", "config.toml", "loss_vs_epochs.png", "loss_vs_time.png",
                "loss_vs_passes.png", "comparison.png", "lr_vs_epochs.png", "tensorboard")


class CLIError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``qnref: error: <message> (see qnref … --help)``, status 2."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"qnref: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(EXIT_USAGE)


def _arg(kind: str, **bounds: Any) -> Callable[[str], Any]:
    """An argparse ``type=`` that checks a number through :mod:`qnref.validate` (argparse prefixes
    the option name: ``argument --epochs: must be a finite number > 0, got 'inf'``)."""
    parse = {"number": check.parse_number, "integer": check.parse_integer, "integers": check.parse_integers}[kind]

    def convert(text: str) -> Any:
        try:
            return parse("", text, **bounds)
        except check.ValidationError as exc:
            raise argparse.ArgumentTypeError(str(exc).strip()) from None

    convert.__name__ = kind
    return convert


_POSITIVE = _arg("number", lo=0, lo_open=True)
_NONNEG = _arg("number", lo=0)
_COUNT = _arg("integer", lo=1)
_SEED = _arg("integer", lo=0, hi=2**32 - 1)
_SEEDS = _arg("integers", lo=0, hi=2**32 - 1)
_FACTOR = _arg("number", lo=1, lo_open=True)
_FRACTION = _arg("number", lo=0, hi=1, hi_open=True)
_STEPS = _arg("integer", lo=0)


def _schedule_arg(text: str) -> str:
    """--lr-schedule: parsed here (errors at parse time, naming the option), kept as its text."""
    from .schedules import parse

    try:
        return parse(text, "").spec()
    except check.ValidationError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None


def _target_arg(text: str) -> str:
    from .train import Target

    try:
        return Target.parse(text, "").spec()
    except check.ValidationError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None


def _metric_arg(text: str) -> str:
    from .train import METRICS

    if text not in METRICS:
        raise argparse.ArgumentTypeError(str(check.ValidationError("", text, f"one of {', '.join(METRICS)}")).strip())
    return text


# -- building blocks ------------------------------------------------------------------------------
def _parse_kv(items: Sequence[str], given: dict | None = None) -> dict:
    """``--opt KEY=VALUE`` items as a dict (values read as Python literals, else kept as text).
    A key given twice, or also given by a dedicated option (``given``: --batch-size, --lr), is an error."""
    out: dict = {}
    for item in items or ():
        if "=" not in item:
            raise CLIError(f"--opt expects KEY=VALUE, got {item!r}")
        k, v = (t.strip() for t in item.split("=", 1))
        if not k.isidentifier():
            raise CLIError(f"--opt {item!r}: {k!r} is not a hyperparameter name")
        try:
            val = ast.literal_eval(v)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            val = v
        if k in out:
            raise CLIError(f"--opt {k} is given twice ({out[k]!r} and {val!r}); give it once")
        out[k] = val
    for k, (option, v) in (given or {}).items():
        if v is None:
            continue
        if k in out:
            raise CLIError(f"{option} {v} and --opt {k}={out[k]!r} both set {k}; give it once")
        out[k] = v
    return out


def _check_hyper_types(name: str, hyper: dict, params: Any) -> dict:
    """Command-line values against the type of each hyperparameter's default: numbers for numeric
    defaults (text such as 'abc' or 'nan' refused by name), True/False for flags."""
    out = dict(hyper)
    for k, v in hyper.items():
        p = params.get(k)
        default = None if p is None else p.default
        if p is None or default is inspect.Parameter.empty or default is None or isinstance(v, type(default)) and \
                not (isinstance(v, bool) and not isinstance(default, bool)):
            continue
        label = f"--opt {k}"
        if isinstance(default, bool):
            if isinstance(v, str) and v.lower() in ("true", "false"):
                out[k] = v.lower() == "true"
            else:
                raise CLIError(str(check.ValidationError(label, v, f"True or False (hyperparameter of {name})")))
        elif isinstance(default, int):
            if isinstance(v, str):
                out[k] = check.parse_integer(label, v)
            elif isinstance(v, float):
                check.integer(label, v)
            elif v is not None:  # bool, lists, … (None may mean 'the full batch': the optimizer decides)
                raise CLIError(str(check.ValidationError(label, v, f"an integer (hyperparameter of {name})")))
        elif isinstance(default, float):
            if isinstance(v, str):
                out[k] = check.parse_number(label, v, finite=math.isfinite(default))
            elif isinstance(v, bool) or not isinstance(v, (int, float)):
                raise CLIError(str(check.ValidationError(label, v, f"a number (hyperparameter of {name})")))
            elif isinstance(v, float) and (math.isnan(v) or (math.isinf(v) and math.isfinite(default))):
                raise CLIError(str(check.ValidationError(label, v, f"a finite number (hyperparameter of {name})")))
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
    hyper = _check_hyper_types(name, hyper, params)
    try:
        return cls(**hyper)
    except (ValueError, TypeError) as exc:
        if any(k in str(exc) for k in hyper):
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in hyper.items())
        raise CLIError(f"{name} refused the hyperparameters {given}: {exc}") from None


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
    p.add_argument("--n-train", type=_COUNT, default=None, help="use only this many training examples (≥ 1)")
    p.add_argument("--n-test", type=_COUNT, default=None, help="use only this many test examples (≥ 1)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or tables; errors only")
    p.add_argument("--mpi-timeout", type=_POSITIVE, default=None, metavar="SECONDS",
                   help="under mpiexec: abort the job when a rank waits longer than this at a collective "
                        "(default $QNREF_MPI_TIMEOUT or 600 s)")


def _divergence(p: argparse.ArgumentParser) -> None:
    p.add_argument("--diverge-factor", type=_FACTOR, default=None, metavar="X",
                   help="a training loss above X × the starting loss marks the run diverged (default 1000)")
    p.add_argument("--allow-divergence", action="store_true",
                   help="a diverged run still exits 0 (it is marked in the report either way)")


def _training(p: argparse.ArgumentParser, compare: bool = False) -> None:
    """Options shared by train and compare: schedules, validation, early stopping, budgets, target, logs."""
    which = " (every run without its own schedule=)" if compare else ""
    p.add_argument("--lr-schedule", type=_schedule_arg, default=None, metavar="SPEC",
                   help=f"step-size schedule{which}: {SCHEDULE_HELP_TEXT}")
    p.add_argument("--val-fraction", type=_FRACTION, default=None, metavar="F",
                   help="hold out this fraction of the training rows as a validation split (seeded, stratified; in [0, 1))")
    p.add_argument("--early-stopping", type=_metric_arg, default=None, metavar="METRIC",
                   help="stop when METRIC (e.g. val_loss, val_acc, train_loss) has not improved for --patience evaluations")
    p.add_argument("--patience", type=_COUNT, default=None, help="evaluations without improvement before an early stop (≥ 1; default 5)")
    p.add_argument("--min-delta", type=_NONNEG, default=None, help="smallest change that counts as an improvement (≥ 0; default 0)")
    p.add_argument("--max-steps", type=_STEPS, default=None, help="stop after this many optimizer steps (≥ 0)")
    p.add_argument("--max-time", type=_POSITIVE, default=None, metavar="SECONDS", help="wall-clock budget of a run (> 0)")
    p.add_argument("--max-cpu-time", type=_POSITIVE, default=None, metavar="SECONDS",
                   help="process CPU-time budget of a run (time.process_time, evaluations included; > 0)")
    p.add_argument("--target", type=_target_arg, default=None, metavar="METRIC<=X",
                   help="record steps/epochs/passes/time to reach e.g. test_acc>=0.9 or val_loss<=0.2 (a summary column)")
    auto = "one line per run" if compare else "bar on a terminal, else lines"
    p.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto",
                   help=f"bar: a progress bar per run; lines: one line per evaluation; auto (default): {auto}")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="write TensorBoard event files in the report (default: when the tensorboard package is installed)")
    p.add_argument("--write-config", default=None, metavar="FILE.toml", help="write the run's config to FILE and exit without running")


SCHEDULE_HELP_TEXT = ("constant | step:EVERY:GAMMA | multistep:M1,M2,…:GAMMA | exp:GAMMA | cosine:TOTAL[:MIN] | "
                      "warmup:LENGTH | thesis[:SCALE], joined with '*'; '@step' counts steps (e.g. multistep:60,120,160:0.1)")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="qnref", description="Reference engine for second-order and quasi-Newton optimization of neural networks.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    tr = sub.add_parser("train", help="train one model with one optimizer", description="Train a model from the zoo on a data set with one optimizer.")
    tr.add_argument("--config", default=None, metavar="FILE.toml",
                    help="replay the run a config.toml describes (options given here override its entries)")
    tr.add_argument("--model", default=None, help="model name (see `qnref list models`); required without --config")
    tr.add_argument("--optimizer", default=None, help="optimizer name (see `qnref list optimizers`); required without --config")
    tr.add_argument("--dataset", default=None, help="data set name (see `qnref list datasets`); required without --config")
    tr.add_argument("--epochs", type=_POSITIVE, default=5.0, help="data passes drawn by the optimizer (finite, > 0; default 5)")
    tr.add_argument("--batch-size", type=_COUNT, default=None, help="minibatch size, passed to the optimizer as batch_size")
    tr.add_argument("--lr", type=_POSITIVE, default=None, help="learning rate, passed to the optimizer as lr")
    tr.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="any optimizer hyperparameter (repeatable), e.g. --opt memory=10")
    tr.add_argument("--l2", type=_NONNEG, default=0.0, help="L2 coefficient λ of (λ/2)‖θ‖² (finite, ≥ 0; default 0)")
    tr.add_argument("--seed", type=_SEED, default=0, help="seed of θ₀, batches and sampling (≥ 0; default 0)")
    tr.add_argument("--init", default="glorot", help="initialiser: glorot, glorot_normal, he, gaussian, sparse")
    tr.add_argument("--eval-every", type=_POSITIVE, default=1.0, help="evaluate every this many epochs (> 0; default 1)")
    tr.add_argument("--out", default=None, help="write a report folder (runs.jsonl, appended per evaluation; summary.md, plots) here")
    tr.add_argument("--checkpoint", default=None, help="checkpoint file (.npz + manifest, written atomically every --checkpoint-every epochs)")
    tr.add_argument("--checkpoint-every", type=_POSITIVE, default=1.0, help="epochs between checkpoints (> 0; default 1)")
    tr.add_argument("--resume", action="store_true", help="resume from --checkpoint if it exists (verified; bit-identical on CPU)")
    tr.add_argument("--best-checkpoint", default=None, metavar="FILE",
                    help="keep a checkpoint of the best θ by the --early-stopping metric (val_loss with a split, else train_loss)")
    _training(tr)
    tr.add_argument("--lr-schedule-param", default=None, metavar="NAME",
                    help="the hyperparameter --lr-schedule scales (default lr, else alpha0)")
    tr.add_argument("--stop-at-target", action="store_true", help="end the run when --target is reached")
    _divergence(tr)
    _common(tr)

    cp = sub.add_parser("compare", help="compare optimizers over seeds from the same start",
                        description="Run several optimizers over several seeds (same θ₀ per seed) and write a report folder.")
    cp.add_argument("--preset", default=None, help="a named experiment (see `qnref list presets`)")
    cp.add_argument("--config", default=None, metavar="FILE.toml", help="a compare config (a preset as TOML; every report holds one)")
    cp.add_argument("--model", default=None, help="model (without --preset)")
    cp.add_argument("--dataset", default=None, help="data set (without --preset)")
    cp.add_argument("--optimizers", default=None,
                    help="comma-separated optimizers, each with optional settings: "
                         "\"kfac(lr=0.01,damping=0.3),adam(lr=1e-3),sgd(lr=0.1,schedule='step:2:0.5')\" (without --preset)")
    cp.add_argument("--epochs", type=_POSITIVE, default=None, help="override the preset's epochs (finite, > 0)")
    cp.add_argument("--seeds", type=_SEEDS, default=None, help="comma-separated seeds ≥ 0 (override the preset's)")
    cp.add_argument("--batch-size", type=_COUNT, default=None, help="batch size for --optimizers runs")
    cp.add_argument("--l2", type=_NONNEG, default=None, help="L2 coefficient (override; finite, ≥ 0)")
    cp.add_argument("--out", default=None, help="report folder (default reports/<preset or 'compare'>)")
    cp.add_argument("--dry-run", action="store_true",
                    help="check the experiment in seconds and exit: load and validate the data (--data-dir), build the "
                         "model, construct every optimizer with its hyperparameters and schedule, run one forward pass "
                         "on a probe batch (≤ 8 examples), print the plan; nothing is trained or written")
    cp.add_argument("--diverge-factor", type=_FACTOR, default=None, metavar="X",
                    help="a training loss above X × the starting loss marks a run diverged (default 1000)")
    _training(cp, compare=True)
    _common(cp)

    ls = sub.add_parser("list", help="list models, optimizers, data sets or presets")
    ls.add_argument("what", nargs="?", choices=("models", "optimizers", "datasets", "presets", "all"), default="all")

    ck = sub.add_parser("check", help="verify the engine's products against finite differences on a tiny net")
    ck.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="also compare the GPU against the CPU")

    cv = sub.add_parser("convert-checkpoint", help="convert an old pickle checkpoint (RUNS the pickle: trusted files only)",
                        description="Convert a format-1 (pickle) checkpoint of qnref ≤ 0.1 to the current .npz format. "
                                    "This UNPICKLES the old file, which can execute arbitrary code: use it only on files "
                                    "you wrote yourself, and say so with --trust.")
    cv.add_argument("--trust", action="store_true", help="required: I wrote OLD myself and accept that it is unpickled")
    cv.add_argument("old", help="the old pickle checkpoint")
    cv.add_argument("new", help="the new checkpoint file (must differ from OLD)")
    return ap


# -- commands -------------------------------------------------------------------------------------
def _check_paths(a: argparse.Namespace) -> None:
    """--out and --checkpoint, before anything is loaded or created (the user's path in errors)."""
    out, ck = getattr(a, "out", None), getattr(a, "checkpoint", None)
    if out:
        check.output_dir("--out", out)
    best = getattr(a, "best_checkpoint", None)
    if best:
        check.output_file("--best-checkpoint", best)
        if ck and os.path.abspath(best) == os.path.abspath(ck):
            raise check.PathError(f"--best-checkpoint {best} and --checkpoint {ck} are the same file")
        if out and os.path.dirname(os.path.abspath(best)) == os.path.abspath(out) and os.path.basename(best) in REPORT_FILES:
            raise check.PathError(f"--best-checkpoint {best} would be overwritten by the report's {os.path.basename(best)}")
    if getattr(a, "write_config", None):
        check.output_file("--write-config", a.write_config)
    if getattr(a, "config", None) and not os.path.isfile(a.config):
        raise check.PathError(f"--config {a.config}: {'is a folder' if os.path.isdir(a.config) else 'no such file'}")
    if ck:
        check.output_file("--checkpoint", ck)
        if out:
            if os.path.abspath(ck) == os.path.abspath(out):
                raise check.PathError(f"--checkpoint {ck} and --out {out} are the same path")
            if os.path.dirname(os.path.abspath(ck)) == os.path.abspath(out) and os.path.basename(ck) in REPORT_FILES:
                raise check.PathError(f"--checkpoint {ck} would be overwritten by the report's {os.path.basename(ck)}")


def _command_line(a: argparse.Namespace, *, resume: bool) -> str:
    argv = list(a._argv)
    if resume and "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(["qnref", *argv])


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _interrupted_line(a: argparse.Namespace, exc: Any, report: str | None) -> str:
    """The one line printed for an interrupted run."""
    what = f"qnref: interrupted by {_signal_name(exc.signum)}"
    ck = getattr(exc, "checkpoint", None)
    if a.command == "train" and ck:
        where = f"last checkpoint {ck} (step {exc.checkpoint_step}, epoch {exc.checkpoint_epoch:.3f})"
        tail = f"resume with: {_command_line(a, resume=True)}"
    elif a.command == "train" and getattr(a, "checkpoint", None):
        where, tail = f"no checkpoint written yet to {a.checkpoint}", f"restart with: {_command_line(a, resume=False)}"
    elif a.command == "train":
        where, tail = "no checkpoint (pass --checkpoint FILE to make runs resumable)", f"restart with: {_command_line(a, resume=False)}"
    else:
        where, tail = "compare runs are not checkpointed", f"rerun with: {_command_line(a, resume=False)}"
    rep = f"; report of what finished in {report}" if report else ""
    return f"{what}; {where}{rep}; {tail}"


def _install_signal_handlers() -> None:
    """SIGINT and SIGTERM raise :class:`qnref.train.Interrupted` in the main thread."""
    from .train import Interrupted

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the clean exit
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted(signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


#: bounds of the numeric entries of a train config (checked by name before anything is loaded)
_CONFIG_BOUNDS: dict[str, dict] = {
    "epochs": dict(lo=0, lo_open=True), "l2": dict(lo=0), "eval_every": dict(lo=0, lo_open=True),
    "val_fraction": dict(lo=0, hi=1, hi_open=True), "min_delta": dict(lo=0), "max_time": dict(lo=0, lo_open=True),
    "max_cpu_time": dict(lo=0, lo_open=True), "diverge_factor": dict(lo=1, lo_open=True),
    "checkpoint_every": dict(lo=0, lo_open=True),
}
_CONFIG_INTS: dict[str, dict] = {"seed": dict(lo=0, hi=2**32 - 1), "patience": dict(lo=1), "max_steps": dict(lo=0),
                                 "n_train": dict(lo=1), "n_test": dict(lo=1)}
_CONFIG_CHOICES = {"device": ("cpu", "gpu"), "dtype": ("float32", "float64")}


def _train_settings(a: argparse.Namespace) -> dict:
    """The settings of a train run: the command line, or ``--config`` with the options given on
    the command line overriding its entries (checked by name either way)."""
    from .config import TRAIN_KEYS, check_train_config, load

    explicit = getattr(a, "_explicit", set())
    cli_hyper = _parse_kv(a.opt, {"batch_size": ("--batch-size", a.batch_size), "lr": ("--lr", a.lr)})
    values = {k: getattr(a, k) for k in TRAIN_KEYS if k not in ("format", "command", "hyperparameters") and hasattr(a, k)}
    values["hyperparameters"] = cli_hyper
    if a.config:
        source = f"--config {a.config}"
        cfg = check_train_config(load(a.config), source)
        for k, v in cfg.items():
            if k in ("format", "command"):
                continue
            if k == "hyperparameters":
                values[k] = {**v, **cli_hyper}
            elif k not in explicit:
                values[k] = v
        for k, bounds in _CONFIG_BOUNDS.items():
            if k in cfg and k not in explicit:
                check.number(f"{source}: {k}", cfg[k], **bounds)
        for k, bounds in _CONFIG_INTS.items():
            if k in cfg and k not in explicit:
                check.integer(f"{source}: {k}", cfg[k], **bounds)
        for k, choices in _CONFIG_CHOICES.items():
            if k in cfg and cfg[k] not in choices and k not in explicit:
                raise check.ValidationError(f"{source}: {k}", cfg[k], " or ".join(choices))
        for k, parse in (("lr_schedule", _schedule_arg), ("target", _target_arg), ("early_stopping", _metric_arg)):
            if k in cfg and k not in explicit:
                try:
                    values[k] = parse(cfg[k])
                except argparse.ArgumentTypeError as exc:
                    raise CLIError(f"{source}: {k}: {exc}") from None
    missing = [f"--{k}" for k in ("model", "optimizer", "dataset") if not values.get(k)]
    if missing:
        raise CLIError(f"train needs {', '.join(missing)} (or --config FILE.toml)")
    return values


def _progress_mode(a: argparse.Namespace, quiet: bool, default_auto: str) -> str:
    if quiet:
        return "none"
    if a.progress != "auto":
        return a.progress
    if default_auto == "tty":
        return "bar" if sys.stderr.isatty() else "lines"
    return default_auto


def _early(metric: str | None, patience: int | None, min_delta: float | None) -> Any:
    from .train import EarlyStopping

    if metric is None:
        if patience is not None or min_delta is not None:
            raise CLIError("--patience and --min-delta need --early-stopping METRIC")
        return None
    return EarlyStopping(metric, 5 if patience is None else patience, 0.0 if min_delta is None else min_delta)


def cmd_train(a: argparse.Namespace) -> int:
    from .config import dumps, train_config
    from .distributed import get_comm
    from .report import RunLog, write_report
    from .train import DIVERGE_FACTOR, DivergenceError, RunInterrupted, _signals_deferred, train

    _check_paths(a)
    _tensorboard_check(a)
    S = _train_settings(a)
    toml = dumps(train_config(S), "qnref train config: replay with `qnref train --config FILE` (add --out/--checkpoint)")
    if _write_config_only(a, toml):
        return EXIT_OK
    comm = get_comm(S["device"])  # first: NCCL picks this rank's GPU before any array exists
    quiet = a.quiet or not comm.is_root

    hyper = dict(S["hyperparameters"])
    opt = make_optimizer(S["optimizer"], hyper)
    early = _early(S.get("early_stopping"), S.get("patience"), S.get("min_delta"))
    ds, data = build_data(S["dataset"], data_dir=S.get("data_dir"), seed=S["seed"], n_train=S.get("n_train"),
                          n_test=S.get("n_test"), device=S["device"], dtype=S["dtype"])
    model = build_model(S["model"], ds)
    _check_batch(hyper.get("batch_size"), data, S.get("val_fraction"))
    title = f"{S['model']} on {S['dataset']}: {S['optimizer']}"
    label = S["optimizer"]
    log = None
    if a.out and comm.is_root:
        check.make_dir("--out", a.out)
        log = RunLog(os.path.join(a.out, "runs.jsonl"), label, S["seed"])
    factor = DIVERGE_FACTOR if S.get("diverge_factor") is None else S["diverge_factor"]

    def report(history: list[dict]) -> str | None:
        if a.out and comm.is_root:
            write_report(a.out, [{"run": label, "seed": S["seed"], **r} for r in history], title,
                         tensorboard=a.tensorboard, config=toml)
            return a.out
        return None

    try:
        res = train(model, opt, data, epochs=S["epochs"], seed=S["seed"], l2=S["l2"], init_scheme=S["init"],
                    eval_every=S["eval_every"], checkpoint=a.checkpoint, checkpoint_every=S["checkpoint_every"],
                    resume=a.resume, progress=_progress_mode(a, quiet, "tty"), diverge_factor=factor, log=log, comm=comm,
                    schedule=S.get("lr_schedule"), schedule_param=S.get("lr_schedule_param"),
                    val_fraction=S.get("val_fraction") or 0.0, early_stopping=early, best_checkpoint=a.best_checkpoint,
                    max_steps=S.get("max_steps"), max_wall_time=S.get("max_time"), max_cpu_time=S.get("max_cpu_time"),
                    target=S.get("target"), stop_at_target=bool(S.get("stop_at_target")))
    except RunInterrupted as exc:
        print(_interrupted_line(a, exc, report(exc.history)), file=sys.stderr, flush=True)
        return 128 + exc.signum
    except DivergenceError as exc:
        written = report(exc.history)
        rep = f"; report in {written}" if written else ""
        if a.allow_divergence:
            if not quiet:
                print(f"qnref: warning: run diverged: {exc}{rep} (--allow-divergence: exit 0)", file=sys.stderr)
            return EXIT_OK
        print(f"qnref: error: run diverged: {exc}{rep} (exit {EXIT_DIVERGED}; --allow-divergence accepts it)", file=sys.stderr)
        return EXIT_DIVERGED
    try:
        with _signals_deferred():  # a finished run's report is written whole; the interrupt comes after
            report(res.history)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        done = RunInterrupted(signum, res.history, a.checkpoint, res.steps if a.checkpoint else None,
                              res.final["epoch"] if a.checkpoint else None)
        print(_interrupted_line(a, done, a.out if a.out and comm.is_root else None), file=sys.stderr, flush=True)
        return 128 + signum
    if not quiet:
        f = res.final
        extra = f", test acc {f['test_acc']:.4f}" if "test_acc" in f else ""
        extra += f", val loss {f['val_loss']:.6g}" if "val_loss" in f else ""
        ranks = f" on {comm.size} ranks" if comm.size > 1 else ""
        why = f" (stopped: {res.stopped})" if res.stopped != "completed" else ""
        hit = f"; {f['target']} reached at epoch {f['target_epoch']:.2f} ({f['target_time']:.2f} s)" if "target_epoch" in f else ""
        print(f"{label}: {res.steps} steps, {f['epoch']:.2f} epochs, train loss {f['train_loss']:.6g}{extra}, "
              f"{f['time']:.2f} s{ranks}{why}{hit}")
        if a.out:
            print(f"report written to {a.out}")
    return EXIT_OK


def _tensorboard_check(a: argparse.Namespace) -> None:
    from .report import tensorboard_available

    if a.tensorboard and not tensorboard_available():
        raise CLIError("--tensorboard needs the tensorboard package (pip install 'qnref[tensorboard]'); "
                       "without it the report has runs.jsonl and runs.csv")


def _write_config_only(a: argparse.Namespace, toml: str) -> bool:
    """``--write-config FILE``: write the run's TOML config without running (True when written)."""
    if not a.write_config:
        return False
    check.output_file("--write-config", a.write_config)
    _write_text(a.write_config, toml)
    if not a.quiet:
        print(f"config written to {a.write_config}")
    return True


def _write_text(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check_batch(bs: Any, data: Any, val_fraction: float | None = None) -> None:
    n = int(data.X_train.shape[0])
    if val_fraction:
        n -= int(round(val_fraction * n))
    if bs is not None and (bs < 1 or bs > n):
        raise CLIError(f"batch size {bs} is impossible for {n} training examples (use 1..{n})")


def _split_top(text: str, option: str) -> list[str]:
    """``text`` split at commas outside parentheses and quotes (unbalanced ones refused)."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise CLIError(f"{option} {text!r}: unbalanced ')'")
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if depth or quote:
        raise CLIError(f"{option} {text!r}: unclosed {'quote' if quote else '('}")
    parts.append("".join(cur).strip())
    return parts


def parse_optimizers(text: str, batch_size: int | None = None, option: str = "--optimizers") -> list:
    """``"kfac(lr=0.01,damping=0.3),adam(lr=1e-3)"`` → :class:`qnref.presets.Run` list, labelled with each
    item's own text; ``schedule=`` inside the parentheses is the run's step-size schedule (quote it when
    it holds commas: ``sgd(lr=0.1,schedule='multistep:2,4:0.1')``); ``batch_size`` applies to runs that
    set none."""
    from .presets import Run

    runs, seen = [], set()
    for item in _split_top(text, option):
        if not item:
            raise CLIError(f"{option} must be comma-separated optimizers such as adam or kfac(lr=0.01), got {text!r}")
        if "(" in item:
            if not item.endswith(")"):
                raise CLIError(f"{option} {item!r}: expected NAME(KEY=VALUE,...)")
            name, inner = item[:-1].split("(", 1)
            name = name.strip()
            pairs = [p for p in _split_top(inner, option) if p] if inner.strip() else []
            hyper = _parse_kv(pairs)
        else:
            name, hyper = item, {}
        if not name:
            raise CLIError(f"{option} {item!r}: no optimizer name")
        schedule = hyper.pop("schedule", None)
        if schedule is not None:
            try:
                schedule = _schedule_arg(str(schedule))
            except argparse.ArgumentTypeError as exc:
                raise CLIError(f"{option} {item}: schedule {exc}") from None
        if batch_size is not None and "batch_size" not in hyper:
            hyper["batch_size"] = batch_size
        label = item.replace(" ", "")
        if label in seen:
            raise CLIError(f"{option} lists {label} twice")
        seen.add(label)
        runs.append(Run(label, name, hyper, schedule))
    return runs


def _compare_preset(a: argparse.Namespace) -> Any:
    """The experiment of a compare command: --preset, --config, or --model/--dataset/--optimizers,
    with the command line's overrides applied."""
    import dataclasses

    from .config import load, preset_from_dict
    from .presets import PRESETS, Preset
    from .optim.registry import suggest

    given = sum(x is not None for x in (a.preset, a.config, a.optimizers))
    if given > 1:
        raise CLIError("give one of --preset, --config and --optimizers")
    if a.preset:
        if a.preset not in PRESETS:
            raise CLIError(suggest(a.preset, list(PRESETS), "preset"))
        pre = PRESETS[a.preset]
    elif a.config:
        pre = preset_from_dict(load(a.config), f"--config {a.config}")
    else:
        if not (a.model and a.dataset and a.optimizers):
            raise CLIError("compare needs --preset, --config, or --model, --dataset and --optimizers")
        pre = Preset("compare", "ad hoc comparison", "", a.dataset, a.model, tuple(parse_optimizers(a.optimizers, a.batch_size)))
    over = {"epochs": a.epochs, "seeds": a.seeds, "l2": a.l2, "schedule": a.lr_schedule, "val_fraction": a.val_fraction,
            "early_stopping": a.early_stopping, "patience": a.patience, "min_delta": a.min_delta, "target": a.target,
            "max_cpu_time": a.max_cpu_time, "max_time": a.max_time, "max_steps": a.max_steps}
    return dataclasses.replace(pre, **{k: v for k, v in over.items() if v is not None})


def cmd_compare(a: argparse.Namespace) -> int:
    from .config import dumps, preset_to_dict
    from .distributed import get_comm
    from .report import RunLog, write_report
    from .train import DIVERGE_FACTOR, EarlyStopping, RunInterrupted, TrainingError, train

    _tensorboard_check(a)
    pre = _compare_preset(a)
    for opt, v in (("--patience", a.patience), ("--min-delta", a.min_delta)):
        if v is not None and pre.early_stopping is None:
            raise CLIError(f"{opt} needs --early-stopping METRIC")
    toml = dumps(preset_to_dict(pre), f"qnref compare config ({pre.name}): rerun with `qnref compare --config FILE`")
    if _write_config_only(a, toml):
        return EXIT_OK
    if getattr(a, "dry_run", False):
        return _dry_run(a, pre)
    epochs, seeds, l2 = pre.epochs, pre.seeds, pre.l2
    out = a.out or os.path.join("reports", pre.name)
    check.output_dir("--out", out)
    factor = DIVERGE_FACTOR if a.diverge_factor is None else a.diverge_factor
    comm = get_comm(a.device)
    quiet = a.quiet or not comm.is_root
    early = EarlyStopping(pre.early_stopping, pre.patience, pre.min_delta) if pre.early_stopping else None
    opts = [(r, make_optimizer(r.optimizer, dict(r.hyperparameters))) for r in pre.runs]  # fail fast on names
    from .schedules import Scheduled, parse

    for r, opt in opts:  # schedules: text and step-size hyperparameter checked before any run
        spec = r.schedule if r.schedule is not None else pre.schedule
        if spec is not None:
            try:
                Scheduled(opt, parse(spec, f"schedule of {r.label}"))
            except check.ValidationError as exc:
                raise CLIError(f"{r.label}: {exc}") from None
    progress = _progress_mode(a, quiet, "none")
    title = f"{pre.name}: {pre.model} on {pre.dataset}" + (f" ({pre.paper})" if pre.paper else "")
    rows: list[dict] = []
    made = False
    try:
        for seed in seeds:
            ds, data = build_data(pre.dataset, data_dir=a.data_dir, seed=seed, n_train=a.n_train, n_test=a.n_test,
                                  device=a.device, dtype=a.dtype, autoencoder=pre.autoencoder, **pre.dataset_kwargs)
            model = build_model(pre.model, ds, **pre.model_kwargs)
            theta0 = model.init(seed, scheme=pre.init, std=pre.init_std, device=a.device, dtype=a.dtype)
            for run, opt in opts:
                _check_batch(run.hyperparameters.get("batch_size"), data, pre.val_fraction)
                if comm.is_root and not made:
                    check.make_dir("--out", out)
                    made = True
                log = RunLog(os.path.join(out, "runs.jsonl"), run.label, seed) if comm.is_root else None
                try:
                    history = train(model, opt, data, epochs=epochs, seed=seed, l2=l2, theta0=theta0,
                                    eval_every=pre.eval_every, diverge_factor=factor, log=log, comm=comm,
                                    schedule=run.schedule if run.schedule is not None else pre.schedule,
                                    val_fraction=pre.val_fraction, early_stopping=early, target=pre.target,
                                    max_cpu_time=pre.max_cpu_time, max_wall_time=pre.max_time, max_steps=pre.max_steps,
                                    progress=progress).history
                except RunInterrupted as exc:
                    rows += [{"run": run.label, "seed": seed, **r} for r in exc.history]
                    raise
                except TrainingError as exc:  # one diverging run is a result, not a reason to lose the others
                    history = [h for h in exc.history if math.isfinite(h["train_loss"])] or exc.history[:1]
                    history[-1] = {**history[-1], "diverged": str(exc)}
                    if not quiet:
                        print(f"seed {seed}  {run.label:<12} DIVERGED: {exc}", flush=True)
                rows += [{"run": run.label, "seed": seed, **r} for r in history]
                if not quiet and "diverged" not in history[-1]:
                    f = history[-1]
                    acc = f" acc {f['test_acc']:.4f}" if "test_acc" in f else ""
                    hit = f"  {f['target']} at epoch {f['target_epoch']:.2f}" if "target_epoch" in f else ""
                    why = f"  (stopped: {f['stopped']})" if "stopped" in f else ""
                    print(f"seed {seed}  {run.label:<12} train loss {f['train_loss']:.5g}{acc}  {f['time']:.2f} s{hit}{why}", flush=True)
    except KeyboardInterrupt as exc:  # in a run (RunInterrupted) or between runs (loading the next seed's data)
        exc.signum = getattr(exc, "signum", signal.SIGINT)
        written = None
        if comm.is_root and rows:
            write_report(out, rows, title, extra_md=f"{pre.description}\n(interrupted)\n", tensorboard=a.tensorboard, config=toml)
            written = out
        print(_interrupted_line(a, exc, written), file=sys.stderr, flush=True)
        return 128 + exc.signum
    if not comm.is_root:
        return EXIT_OK
    files = write_report(out, rows, title, extra_md=f"{pre.description}\n\n{_legend(pre)}", tensorboard=a.tensorboard, config=toml)
    if not quiet:
        print(f"report written to {out}: {', '.join(os.path.basename(f) for f in files)}")
    return EXIT_OK


def _dry_run(a: argparse.Namespace, pre: Any) -> int:
    """``compare --dry-run``: everything a run needs, checked in seconds, and the plan printed.

    Loads and validates the data of the first seed (the files of ``--data-dir`` for paper-scale presets), builds the
    model and θ₀, constructs every optimizer with its hyperparameters and checks its schedule and batch size, and
    evaluates the loss once on one batch (finite). Nothing is trained, no folder is created."""
    from .curvature.objective import Objective
    from .schedules import Scheduled, parse

    opts = []
    for r in pre.runs:
        opt = make_optimizer(r.optimizer, dict(r.hyperparameters))
        spec = r.schedule if r.schedule is not None else pre.schedule
        if spec is not None:
            try:
                Scheduled(opt, parse(spec, f"schedule of {r.label}"))
            except check.ValidationError as exc:
                raise CLIError(f"{r.label}: {exc}") from None
        opts.append((r, opt, spec))
    seed = pre.seeds[0]
    ds, data = build_data(pre.dataset, data_dir=a.data_dir, seed=seed, n_train=a.n_train, n_test=a.n_test,
                          device=a.device, dtype=a.dtype, autoencoder=pre.autoencoder, **pre.dataset_kwargs)
    model = build_model(pre.model, ds, **pre.model_kwargs)
    theta0 = model.init(seed, scheme=pre.init, std=pre.init_std, device=a.device, dtype=a.dtype)
    n = int(data.X_train.shape[0])
    for r, _, _ in opts:
        _check_batch(r.hyperparameters.get("batch_size"), data, pre.val_fraction)
    sizes = [r.hyperparameters.get("batch_size") for r, _, _ in opts]
    b = min(n, 8, min([s for s in sizes if isinstance(s, int)] or [8]))  # a probe batch: seconds even for VGG16
    value = float(Objective(model, data.loss, data.X_train[:b], data.y_train[:b], train=False).value(theta0))
    if not math.isfinite(value):
        raise CLIError(f"{pre.name}: the loss at θ₀ on the first {b} training examples is {value} (not finite)")
    budget = [f"{pre.epochs:g} epoch{'' if pre.epochs == 1 else 's'}"] + [f"{k} {v:g} s" for k, v in (("wall-clock", pre.max_time),
                                                                       ("CPU", pre.max_cpu_time)) if v is not None]
    if pre.max_steps is not None:
        budget.append(f"{pre.max_steps} steps")
    lines = [
        f"dry run of {pre.name} ({getattr(pre, 'scale', 'small')} scale): {pre.description}",
        f"  source:  {pre.paper}",
        f"  data:    {ds.name} ({ds.task}, loss {ds.loss}): train {tuple(ds.X_train.shape)}, test {tuple(ds.X_test.shape)}"
        f" — {ds.info.get('source', '')}",
        f"  model:   {pre.model} {dict(pre.model_kwargs) or ''} — {model.n_params:,} parameters, input {model.input_shape} → "
        f"output {model.output_shape}; init {pre.init}" + (f" (std {pre.init_std:g})" if pre.init == "gaussian" else ""),
        f"  budget:  {', '.join(budget)}; seeds {', '.join(map(str, pre.seeds))}; L2 {pre.l2:g}; metric "
        f"{getattr(pre, 'metric', 'train_loss')}" + (f"; target {pre.target}" if pre.target else ""),
        f"  check:   loss at θ₀ on {b} training examples = {value:.6g}",
        "  runs:",
    ]
    for r, opt, spec in opts:
        has = "batch_size" in r.hyperparameters or hasattr(opt, "batch_size")
        bs = r.hyperparameters.get("batch_size", getattr(opt, "batch_size", None))
        steps = f"{-(-n // bs)} steps/epoch" if isinstance(bs, int) and bs > 0 else "full batch" if has and bs is None else ""
        hp = ", ".join(f"{k}={v!r}" for k, v in r.hyperparameters.items()) or "defaults"
        lines.append(f"    {r.label:<24} {r.optimizer:<10} {hp}" + (f"; schedule {spec}" if spec else "") +
                     (f"  [{steps}]" if steps else ""))
    if getattr(pre, "notes", ""):
        lines.append(f"  notes:   {pre.notes}")
    lines.append("dry run OK: data, model and every optimizer checked; nothing trained, nothing written")
    print("\n".join(lines), flush=True)
    return EXIT_OK


def _legend(pre: Any) -> str:
    """The runs' settings under the summary table (what each legend label means)."""
    lines = ["| run | optimizer | hyperparameters | schedule |", "|---|---|---|---|"]
    for r in pre.runs:
        hp = ", ".join(f"{k}={v!r}" for k, v in r.hyperparameters.items()) or "defaults"
        spec = r.schedule if r.schedule is not None else pre.schedule
        lines.append(f"| {r.label} | {r.optimizer} | {hp} | {spec or '–'} |")
    return "\n".join(lines) + "\n"


def cmd_convert(a: argparse.Namespace) -> int:
    from .checkpoint import convert_pickle

    if not a.trust:
        raise CLIError("convert-checkpoint unpickles OLD, which can execute arbitrary code; "
                       "pass --trust if you wrote it yourself")
    check.output_file("NEW", a.new)
    convert_pickle(a.old, a.new, trust=True)
    print(f"converted {a.old} to {a.new}")
    return EXIT_OK


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
        _list_presets()
    return 0


def _list_presets() -> None:
    """Each preset with its scale, source (text, figure/table) and metric; the small replica of a paper-scale
    preset; the old names last."""
    from .presets import ALIASES, PRESETS

    print("presets (scale: small = shipped data, minutes on 2 cores; paper = the text's data from --data-dir):")
    for name, p in PRESETS.items():
        if name in ALIASES:
            continue
        replica = f"; small replica: {p.replica}" if p.replica else ""
        print(f"  {name:<30} {p.scale:<5}  {p.paper}  [metric {p.metric}{replica}]")
        print(f"  {'':<30} {'':<5}  {p.description}")
    if ALIASES:
        print("old preset names (aliases):")
        for old, new in ALIASES.items():
            print(f"  {old:<30} = {new}")


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
        "Hv vs finite-difference Hessian": rel(p.hvp(v), dense.hessian(obj, theta, method="fd") @ v),
        "Gv vs explicit JᵀH_LJ": rel(p.ggn_vp(v), dense.ggn(obj, theta, method="fd") @ v),
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
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = _parser()
    try:
        a = ap.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    a._argv = argv
    a._explicit = _explicit(ap, a.command, argv)
    if a.command is None:
        ap.print_help()
        return EXIT_USAGE
    handlers = {"train": cmd_train, "compare": cmd_compare, "list": cmd_list, "check": cmd_check,
                "convert-checkpoint": cmd_convert}
    previous = None
    if a.command in ("train", "compare"):
        if getattr(a, "mpi_timeout", None) is not None:
            os.environ["QNREF_MPI_TIMEOUT"] = repr(a.mpi_timeout)
        if _in_main_thread():
            previous = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
            _install_signal_handlers()
    try:
        return _run(a, handlers)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGTERM, previous[1])


def _run(a: argparse.Namespace, handlers: dict) -> int:
    from .checkpoint import CheckpointError
    from .train import Interrupted

    try:
        comm = _parallel_comm(a)
    except (ValueError, RuntimeError) as exc:
        return _fail(None, f"qnref: error: {exc}", EXIT_USAGE)
    try:
        return handlers[a.command](a)
    except KeyboardInterrupt as exc:  # outside a training run (loading data, building the model, …)
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        rerun = f"; rerun with: {_command_line(a, resume=False)}" if hasattr(a, "_argv") else ""
        print(f"qnref: interrupted by {_signal_name(signum)} outside a training run{rerun}", file=sys.stderr)
        return 128 + signum
    except CheckpointError as exc:
        return _fail(comm, f"qnref: error: {exc}", EXIT_CHECKPOINT)
    except (CLIError, ValueError, TypeError, FileNotFoundError, ImportError, backend.BackendError) as exc:
        return _fail(comm, f"qnref: error: {_one_line(exc)}", EXIT_USAGE)
    except RuntimeError as exc:  # TrainingError and friends
        return _fail(comm, f"qnref: error: {_one_line(exc)}", EXIT_FAILED)
    except Exception as exc:  # noqa: BLE001 - under MPI every failure must end the whole job
        if comm is None:
            raise
        import traceback

        return _fail(comm, f"{traceback.format_exc()}qnref: error: {type(exc).__name__}: {exc}", EXIT_FAILED)


def _explicit(ap: argparse.ArgumentParser, command: str | None, argv: Sequence[str]) -> set[str]:
    """Destinations of the options given on the command line (they override --config entries)."""
    sub = next((act.choices.get(command) for act in ap._actions if isinstance(act, argparse._SubParsersAction)), None)
    if sub is None:
        return set()
    given = set()
    for act in sub._actions:
        for opt in act.option_strings:
            if any(t == opt or t.startswith(opt + "=") for t in argv):
                given.add(act.dest)
    return given


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split("\n"))


def _in_main_thread() -> bool:
    """Signal handlers can only be installed from the main thread."""
    import threading  # noqa: PLC0415

    return threading.current_thread() is threading.main_thread()


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
