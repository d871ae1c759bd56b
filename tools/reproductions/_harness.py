"""Shared pieces of the reproduction studies in tools/reproductions/ (docs/reproductions.md).

Each study builds its runs through qnref's public API — :func:`qnref.data.load_dataset`,
:func:`qnref.nn.zoo.build_model`, :func:`qnref.optim.make_optimizer`, :func:`qnref.train.train` —
exactly as ``qnref compare`` does (per seed: the seed's data split, θ₀ from the seed, every run of
that seed from the same θ₀), and reduces the histories to markdown tables and one PNG.

The arithmetic used in the tables (mean ± half-range over seeds, epochs to a threshold with the
first evaluation that reaches it, per-epoch time) lives here and is checked by
tests/test_reproduction_scripts.py.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable, Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the studies are sized for one core

import numpy  # noqa: E402

from qnref.data import load_dataset  # noqa: E402
from qnref.nn.zoo import build_model  # noqa: E402
from qnref.optim import make_optimizer  # noqa: E402
from qnref.train import Data, TrainingError, train  # noqa: E402


@dataclass(frozen=True)
class Setting:
    """Data, model, initialization and budget shared by the runs of one study (a preset's fields)."""

    dataset: str
    model: str
    epochs: float
    dataset_kwargs: tuple = ()  # sorted (key, value) pairs, hashable for the data cache
    model_kwargs: tuple = ()
    l2: float = 0.0
    init: str = "glorot"
    init_std: float = 0.01
    eval_every: float = 1.0

    @staticmethod
    def kw(d: dict) -> tuple:
        return tuple(sorted(d.items()))


@dataclass
class RunResult:
    label: str
    seed: int
    history: list[dict]
    state: Any = None
    diverged: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def final(self) -> dict:
        return self.history[-1]


@lru_cache(maxsize=16)
def _data(dataset: str, dataset_kwargs: tuple, seed: int) -> tuple[Any, Data]:
    ds = load_dataset(dataset, seed=seed, **dict(dataset_kwargs))
    return ds, Data.from_dataset(ds)


def build(setting: Setting, seed: int) -> tuple[Any, Data, Any]:
    """(model, data, θ₀) of one seed, as ``qnref compare`` builds them."""
    ds, data = _data(setting.dataset, setting.dataset_kwargs, seed)
    model = build_model(setting.model, input_shape=tuple(ds.input_shape), n_outputs=ds.n_outputs,
                        **dict(setting.model_kwargs))
    theta0 = model.init(seed, scheme=setting.init, std=setting.init_std, dtype=data.X_train.dtype)
    return model, data, theta0


def run(setting: Setting, label: str, optimizer: str, hyper: dict, seed: int, *, epochs: float | None = None,
        schedule: str | None = None, callbacks: Sequence[Callable[[dict], Any]] = ()) -> RunResult:
    """One training run; a diverging run is a result (its finite records, ``diverged`` set)."""
    model, data, theta0 = build(setting, seed)
    opt = make_optimizer(optimizer, **hyper)
    try:
        res = train(model, opt, data, epochs=setting.epochs if epochs is None else epochs, seed=seed, l2=setting.l2,
                    theta0=theta0, eval_every=setting.eval_every, schedule=schedule, callbacks=callbacks)
    except TrainingError as exc:
        hist = [h for h in exc.history if math.isfinite(h["train_loss"])] or exc.history[:1]
        return RunResult(label, seed, hist, None, str(exc))
    return RunResult(label, seed, res.history, res.state)


def cpu_seconds_per_epoch(setting: Setting, optimizer: str, hyper: dict, seed: int = 0, repeats: int = 3,
                          epochs: float = 1.0) -> float:
    """Process CPU seconds of the optimizer's steps over ``epochs`` data passes from θ₀ (evaluations
    excluded), per epoch, the minimum over ``repeats`` fresh runs: a cost measure that the other jobs on a
    shared machine disturb far less than wall time (one BLAS thread)."""
    from qnref.optim.base import Problem  # noqa: PLC0415

    best = math.inf
    for _ in range(repeats):
        model, data, theta = build(setting, seed)
        problem = Problem(model, data.loss, data.X_train, data.y_train, setting.l2, seed=seed)
        opt = make_optimizer(optimizer, **hyper)
        state = opt.init(theta)
        spent = 0.0
        while problem.epochs < epochs - 1e-12:
            t0 = time.process_time()
            theta, state, _ = opt.step(theta, state, problem)
            spent += time.process_time() - t0
        best = min(best, spent / problem.epochs)
    return best


# ----------------------------------------------------------------------------------------------
# arithmetic of the tables (tested)
# ----------------------------------------------------------------------------------------------
def mean_spread(values: Iterable[float]) -> tuple[float, float]:
    """(mean, half-range) of the finite values: the table's "mean ± spread"; (nan, nan) if none."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return math.nan, math.nan
    return sum(v) / len(v), (max(v) - min(v)) / 2.0


def fmt_ms(values: Iterable[float], spec: str = ".3g") -> str:
    """"mean ± half-range" (one value: just the value; none: "–")."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return "–"
    m, s = mean_spread(v)
    return format(m, spec) if len(v) == 1 else f"{format(m, spec)} ± {format(s, spec)}"


def first_reaching(history: Sequence[dict], key: str, threshold: float, mode: str = "min",
                   x: str = "epoch") -> float | None:
    """``x`` (epoch, time, passes) of the first record whose ``key`` is ≤ threshold (mode "min") or
    ≥ threshold ("max"); None when no record reaches it."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    for r in history:
        v = r.get(key)
        if v is None or not math.isfinite(v):
            continue
        if (v <= threshold) if mode == "min" else (v >= threshold):
            return float(r[x])
    return None


def per_epoch(history: Sequence[dict], key: str = "time") -> float:
    """``key`` (optimizer seconds, passes) per data epoch over the whole run."""
    last = history[-1]
    return float(last[key]) / float(last["epoch"]) if last["epoch"] > 0 else math.nan


def count_reached(results: Sequence[RunResult], key: str, threshold: float, mode: str = "min") -> str:
    """"k of n" seeds that reached the threshold."""
    k = sum(first_reaching(r.history, key, threshold, mode) is not None for r in results)
    return f"{k} of {len(results)}"


def rescaled_factor(factor: float, steps_per_epoch_text: float, steps_per_epoch_here: float) -> float:
    """The per-step factor that changes a quantity as much per epoch here as ``factor`` per step does in
    the text: factor ** (steps_text / steps_here) (e.g. λ_LM's boost 1.01 at MNIST's 1000 steps/epoch)."""
    if not (factor > 0 and steps_per_epoch_text > 0 and steps_per_epoch_here > 0):
        raise ValueError("factor and steps per epoch must be positive")
    return float(factor) ** (float(steps_per_epoch_text) / float(steps_per_epoch_here))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    if any(len(r) != len(header) for r in rows):
        raise ValueError("every row needs one cell per column")
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def curve_on_grid(history: Sequence[dict], key: str, grid: numpy.ndarray, x: str = "epoch") -> numpy.ndarray:
    """``key`` linearly interpolated at the ``x`` positions of ``grid`` (NaN beyond the run's end)."""
    xs = numpy.array([r[x] for r in history], float)
    ys = numpy.array([r.get(key, math.nan) for r in history], float)
    out = numpy.interp(grid, xs, ys)
    out[grid > xs[-1] + 1e-9] = math.nan
    return out


# ----------------------------------------------------------------------------------------------
# figure
# ----------------------------------------------------------------------------------------------
def plot_panels(panels: Sequence[dict], out: str, title: str = "") -> None:
    """One PNG of several panels. Each panel: {"title", "key", "ylabel", "curves": {label: [RunResult]},
    "x" (default "epoch"), "log" (bool)}; lines are the seed mean on a common grid, bands min–max."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, pan in zip(axes[0], panels):
        x = pan.get("x", "epoch")
        for label, results in pan["curves"].items():
            end = max(r.history[-1][x] for r in results)
            grid = numpy.linspace(0.0, end, 101)
            ys = numpy.array([curve_on_grid(r.history, pan["key"], grid, x) for r in results])
            with numpy.errstate(all="ignore"):
                import warnings  # noqa: PLC0415

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean, lo, hi = numpy.nanmean(ys, 0), numpy.nanmin(ys, 0), numpy.nanmax(ys, 0)
            (line,) = ax.plot(grid, mean, label=label, lw=1.4)
            if len(results) > 1:
                ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        if pan.get("log", True):
            ax.set_yscale("log")
        ax.set_xlabel({"epoch": "epochs", "time": "optimizer time [s]", "passes": "gradient-equivalent passes"}.get(x, x))
        ax.set_ylabel(pan["ylabel"])
        ax.set_title(pan["title"], fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6.5)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke version (fewer runs, epochs, seeds)")
    p.add_argument("--out", default=None, help="write the figure to this PNG")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the study's)")
    return p


def emit(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
