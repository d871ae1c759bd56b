"""Comparison reports: JSONL logs, a markdown summary table and loss curves (like the papers' figures).

A report folder holds
- ``runs.jsonl``: one JSON object per evaluation record, with ``run`` (optimizer label) and ``seed``;
- ``runs.csv``: the same rows as a table (one column per field that any row has; empty cells where
  a row lacks it), for spreadsheets and pandas;
- ``summary.md``: per run the final training loss, validation and test loss/accuracy/errors, epochs,
  gradient-equivalent passes, optimizer wall time, time/epochs/passes to the target (when the run
  had one), how runs stopped and how many diverged, averaged over seeds (min–max in brackets);
- ``loss_vs_epochs.png``, ``loss_vs_time.png``, ``loss_vs_passes.png`` and ``comparison.png``
  (the three side by side): mean training loss over seeds, with the min–max band (validation loss
  dashed when there is a split; a cross marks where a run stopped early);
- ``lr_vs_epochs.png`` when a run had a schedule: the scheduled step size against epochs;
- ``tensorboard/<run>-seed<seed>/events.out.tfevents.*`` when the ``tensorboard`` package is
  installed (``pip install qnref[tensorboard]``): every numeric field of every record as a scalar,
  against the step (``tensorboard --logdir <report>/tensorboard``).
Files are written to a temporary folder first and moved into place, so a failed run leaves
nothing half-written. While a run is going, :class:`RunLog` appends each evaluation record to
``runs.jsonl`` as it is made (flushed line by line), so a crash or an interrupt late in a run keeps
everything done up to then; the final :func:`write_report` replaces the file with the same rows.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Iterable

X_AXES = (("epoch", "epochs (data passes drawn)"), ("time", "optimizer wall time [s]"), ("passes", "gradient-equivalent passes"))


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r, default=_json_default) + "\n")


class RunLog:
    """Incremental ``runs.jsonl``: every record of a run (``run`` and ``seed`` added) is appended and
    flushed as soon as it exists (``runs.csv`` beside it rewritten to match; with ``tensorboard=True``
    also a live TensorBoard event file). :meth:`restart` (called by :func:`qnref.train.train` when the
    history is known: empty, or the one a resumed checkpoint holds) rewrites the file atomically
    with the other runs' rows kept and this run's rows replaced by ``rows``."""

    def __init__(self, path: str, run: str, seed: int, tensorboard: bool = False):
        self.path, self.run, self.seed = path, run, seed
        self.tensorboard = bool(tensorboard)  # live event files (the final report writes them anyway)
        self._tb = None

    def _tag(self, row: dict) -> dict:
        return {"run": self.run, "seed": self.seed, **row}

    def restart(self, rows: list[dict]) -> None:
        old = read_jsonl(self.path) if os.path.exists(self.path) else []
        keep = [r for r in old if (r.get("run"), r.get("seed")) != (self.run, self.seed)]
        tmp = f"{self.path}.tmp-{os.getpid()}"  # created by open(): the mode follows the umask
        try:
            write_jsonl(tmp, keep + [self._tag(r) for r in rows])
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def append(self, row: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(self._tag(row), default=_json_default) + "\n")
            fh.flush()
        write_csv(os.path.join(os.path.dirname(self.path), "runs.csv"), self.rows())
        if self.tensorboard:
            if self._tb is None:
                self._tb = TensorBoardWriter(os.path.join(os.path.dirname(self.path), "tensorboard", _tb_name(self.run, self.seed)))
            self._tb.add(row)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def rows(self) -> list[dict]:
        return read_jsonl(self.path) if os.path.exists(self.path) else []


def write_csv(path: str, rows: list[dict]) -> None:
    """``rows`` as CSV (columns: the fields in order of first appearance), written atomically."""
    import csv  # noqa: PLC0415

    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(cols), restval="", extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def tensorboard_available() -> bool:
    """True when the ``tensorboard`` package (its event-file writer) can be imported."""
    import importlib.util  # noqa: PLC0415

    return importlib.util.find_spec("tensorboard") is not None


def _tb_name(run: str, seed: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_.=," else "_" for c in str(run))
    return f"{safe}-seed{seed}"


class TensorBoardWriter:
    """TensorBoard event files through tensorboard's own maintained writer
    (``tensorboard.summary.writer.event_file_writer``, the one ``torch.utils.tensorboard`` uses,
    without importing torch): every numeric field of a record as a scalar at its ``step``."""

    SKIP = ("step", "seed")

    def __init__(self, logdir: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: PLC0415

        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        self._w = EventFileWriter(logdir)

    def add(self, row: dict) -> None:
        from tensorboard.compat.proto.event_pb2 import Event  # noqa: PLC0415
        from tensorboard.compat.proto.summary_pb2 import Summary  # noqa: PLC0415

        values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in row.items()
                  if k not in self.SKIP and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        self._w.add_event(Event(wall_time=time.time(), step=int(row.get("step", 0)), summary=Summary(value=values)))
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def write_tensorboard(folder: str, rows: list[dict]) -> list[str]:
    """One event-file folder per (run, seed) under ``folder``/tensorboard (replacing earlier ones)."""
    written = []
    for name, seeds in _group(rows).items():
        for seed, recs in seeds.items():
            d = os.path.join(folder, "tensorboard", _tb_name(name, seed))
            if os.path.isdir(d):
                shutil.rmtree(d)
            w = TensorBoardWriter(d)
            for r in recs:
                w.add(r)
            w.close()
            written.append(d)
    return written


def read_jsonl(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _json_default(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def _group(rows: list[dict]) -> dict[str, dict[int, list[dict]]]:
    runs: dict[str, dict[int, list[dict]]] = {}
    for r in rows:
        runs.setdefault(r["run"], {}).setdefault(r["seed"], []).append(r)
    return runs


def _fmt(vals: list[float], spec: str = ".4g") -> str:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return format(mean, spec)
    return f"{format(mean, spec)} [{format(min(vals), spec)}–{format(max(vals), spec)}]"


def summary_table(rows: list[dict], title: str = "") -> str:
    """Markdown table of the final record of each (run, seed), averaged over seeds. Columns for
    the validation split, the target (epochs / optimizer seconds / passes to reach it, and how many
    seeds did) and early stops appear only when some run has them."""
    groups = _group(rows)
    finals_all = [recs[-1] for seeds in groups.values() for recs in seeds.values()]
    has = lambda k: any(k in f for f in finals_all)  # noqa: E731
    cols = [("train loss", "train_loss", ".4g")]
    if has("val_loss"):
        cols += [("val loss", "val_loss", ".4g")]
    if has("val_acc"):
        cols += [("val acc", "val_acc", ".4f")]
    cols += [("test loss", "test_loss", ".4g"), ("test acc", "test_acc", ".4f"), ("test errors", "test_errors", ".0f"),
             ("epochs", "epoch", ".2f"), ("passes", "passes", ".1f"), ("time [s]", "time", ".2f")]
    target = next((f.get("target") for f in finals_all if f.get("target")), None)
    head = [c[0] for c in cols]
    if target:
        head += [f"to {target}: epochs", "time [s]", "passes", "reached"]
    if has("stopped"):
        head += ["stopped"]
    head += ["diverged"]
    out = [f"# {title}\n" if title else "", "| run | seeds | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 2)]
    for name, seeds in groups.items():
        finals = [recs[-1] for recs in seeds.values()]
        col = lambda k: [f.get(k) for f in finals]  # noqa: E731
        cells = [_fmt(col(k), spec) for _, k, spec in cols]
        if target:
            cells += [_fmt(col("target_epoch"), ".2f"), _fmt(col("target_time"), ".2f"), _fmt(col("target_passes"), ".1f"),
                      f"{sum('target_step' in f for f in finals)} of {len(finals)}"]
        if has("stopped"):
            why = sorted({f["stopped"] for f in finals if "stopped" in f})
            cells += [", ".join(why) or "–"]
        cells += [f"{sum('diverged' in f for f in finals)} of {len(finals)}"]
        out.append(f"| {name} | {len(finals)} | " + " | ".join(cells) + " |")
    return "\n".join(line for line in out if line) + "\n"


def plot_curves(rows: list[dict], folder: str, title: str = "", log_y: bool = True) -> list[str]:
    """Training loss against epochs, time and passes; returns the written file names."""
    import matplotlib  # noqa: PLC0415 - plotting is optional at import time

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    runs = _group(rows)
    written = []
    fig_all, axes_all = plt.subplots(1, 3, figsize=(15, 4.2))
    for (key, label), ax_all in zip(X_AXES, axes_all):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for name, seeds in runs.items():
            for target in (ax, ax_all):
                _band(target, seeds, key, name)
        for target in (ax, ax_all):
            target.set_xlabel(label)
            target.set_ylabel("training loss")
            if log_y:
                target.set_yscale("log")
            target.grid(alpha=0.3)
        ax.set_title(title or "training loss")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fname = f"loss_vs_{'epochs' if key == 'epoch' else key}.png"
        fig.savefig(os.path.join(folder, fname), dpi=110)
        plt.close(fig)
        written.append(fname)
    axes_all[0].legend(fontsize=8)
    fig_all.suptitle(title)
    fig_all.tight_layout()
    fig_all.savefig(os.path.join(folder, "comparison.png"), dpi=100)
    plt.close(fig_all)
    return written + ["comparison.png"]


def _band(ax, seeds: dict[int, list[dict]], key: str, name: str) -> None:
    """Mean curve over seeds at the shared record indices, with the min–max band; the validation
    loss dashed in the same colour when every record has one; a cross where a seed stopped early."""
    curves = list(seeds.values())
    n = min(len(c) for c in curves)
    xs = [sum(c[i][key] for c in curves) / len(curves) for i in range(n)]
    ys = [[c[i]["train_loss"] for c in curves] for i in range(n)]
    mean = [sum(v) / len(v) for v in ys]
    line, = ax.plot(xs, mean, marker="o", ms=2.5, label=name)
    if len(curves) > 1:
        ax.fill_between(xs, [min(v) for v in ys], [max(v) for v in ys], color=line.get_color(), alpha=0.2)
    if all("val_loss" in c[i] for c in curves for i in range(n)):
        val = [sum(c[i]["val_loss"] for c in curves) / len(curves) for i in range(n)]
        ax.plot(xs, val, ls="--", color=line.get_color(), label=f"{name} (val)")
    for c in curves:
        if c and c[-1].get("stopped"):
            ax.plot([c[-1][key]], [c[-1]["train_loss"]], marker="X", ms=9, color=line.get_color(), ls="none")
            ax.annotate(str(c[-1]["stopped"]), (c[-1][key], c[-1]["train_loss"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points", color=line.get_color())


def plot_schedule(rows: list[dict], folder: str, title: str = "") -> list[str]:
    """``lr_vs_epochs.png``: the scheduled step size of each run (first seed) against epochs, log
    scale, a cross where a run stopped early; nothing when no run had a schedule."""
    runs = {name: next(iter(seeds.values())) for name, seeds in _group(rows).items()}
    runs = {k: v for k, v in runs.items() if any("lr" in r for r in v)}
    if not runs:
        return []
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, recs in runs.items():
        pts = [(r["epoch"], r["lr"]) for r in recs if "lr" in r]
        line, = ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", marker="o", ms=2.5, label=name)
        if recs[-1].get("stopped"):
            ax.plot([pts[-1][0]], [pts[-1][1]], marker="X", ms=9, color=line.get_color(), ls="none")
            ax.annotate(str(recs[-1]["stopped"]), pts[-1], fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("epochs (data passes drawn)")
    ax.set_ylabel("scheduled step size")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(title or "schedule")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "lr_vs_epochs.png"), dpi=110)
    plt.close(fig)
    return ["lr_vs_epochs.png"]


def write_report(folder: str, rows: list[dict], title: str = "", extra_md: str = "",
                 tensorboard: bool | None = None, config: str | None = None) -> list[str]:
    """Write the whole report atomically into ``folder`` (created; existing files replaced):
    runs.jsonl, runs.csv, summary.md, the plots, ``config.toml`` when ``config`` (its text) is
    given, and the TensorBoard folder when ``tensorboard`` (default: when the package is installed)."""
    parent = os.path.dirname(os.path.abspath(folder)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".report-", dir=parent)
    try:
        write_jsonl(os.path.join(tmp, "runs.jsonl"), rows)
        write_csv(os.path.join(tmp, "runs.csv"), rows)
        with open(os.path.join(tmp, "summary.md"), "w") as fh:
            fh.write(summary_table(rows, title))
            if extra_md:
                fh.write("\n" + extra_md)
        files = ["runs.jsonl", "runs.csv", "summary.md"] + plot_curves(rows, tmp, title) + plot_schedule(rows, tmp, title)
        if config is not None:
            with open(os.path.join(tmp, "config.toml"), "w") as fh:
                fh.write(config)
            files.append("config.toml")
        if tensorboard_available() if tensorboard is None else tensorboard:
            write_tensorboard(tmp, rows)
            files.append("tensorboard")
        os.makedirs(folder, exist_ok=True)
        for f in files:
            dst = os.path.join(folder, f)
            if os.path.isdir(dst) and not os.path.islink(dst):
                shutil.rmtree(dst)
            os.replace(os.path.join(tmp, f), dst)
        return [os.path.join(folder, f) for f in files]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
