"""Comparison reports: JSONL logs, a markdown summary table and loss curves (like the papers' figures).

A report folder holds
- ``runs.jsonl``: one JSON object per evaluation record, with ``run`` (optimizer label) and ``seed``;
- ``summary.md``: per run the final training loss, test loss/accuracy/errors, epochs, gradient-
  equivalent passes and optimizer wall time, averaged over seeds (min–max in brackets);
- ``loss_vs_epochs.png``, ``loss_vs_time.png``, ``loss_vs_passes.png`` and ``comparison.png``
  (the three side by side): mean training loss over seeds, with the min–max band.
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
from typing import Iterable

X_AXES = (("epoch", "epochs (data passes drawn)"), ("time", "optimizer wall time [s]"), ("passes", "gradient-equivalent passes"))


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r, default=_json_default) + "\n")


class RunLog:
    """Incremental ``runs.jsonl``: every record of a run (``run`` and ``seed`` added) is appended and
    flushed as soon as it exists. :meth:`restart` (called by :func:`qnref.train.train` when the
    history is known: empty, or the one a resumed checkpoint holds) rewrites the file atomically
    with the other runs' rows kept and this run's rows replaced by ``rows``."""

    def __init__(self, path: str, run: str, seed: int):
        self.path, self.run, self.seed = path, run, seed

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

    def rows(self) -> list[dict]:
        return read_jsonl(self.path) if os.path.exists(self.path) else []


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
    """Markdown table of the final record of each (run, seed), averaged over seeds."""
    out = [f"# {title}\n" if title else "", "| run | seeds | train loss | test loss | test acc | test errors | epochs | passes | time [s] | diverged |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name, seeds in _group(rows).items():
        finals = [recs[-1] for recs in seeds.values()]
        col = lambda k: [f.get(k) for f in finals]  # noqa: E731
        out.append(
            f"| {name} | {len(finals)} | {_fmt(col('train_loss'))} | {_fmt(col('test_loss'))} | {_fmt(col('test_acc'), '.4f')} | "
            f"{_fmt(col('test_errors'), '.0f')} | {_fmt(col('epoch'), '.2f')} | {_fmt(col('passes'), '.1f')} | {_fmt(col('time'), '.2f')} | "
            f"{sum('diverged' in f for f in finals)} of {len(finals)} |"
        )
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
    """Mean curve over seeds at the shared record indices, with the min–max band."""
    curves = list(seeds.values())
    n = min(len(c) for c in curves)
    xs = [sum(c[i][key] for c in curves) / len(curves) for i in range(n)]
    ys = [[c[i]["train_loss"] for c in curves] for i in range(n)]
    mean = [sum(v) / len(v) for v in ys]
    line, = ax.plot(xs, mean, marker="o", ms=2.5, label=name)
    if len(curves) > 1:
        ax.fill_between(xs, [min(v) for v in ys], [max(v) for v in ys], color=line.get_color(), alpha=0.2)


def write_report(folder: str, rows: list[dict], title: str = "", extra_md: str = "") -> list[str]:
    """Write the whole report atomically into ``folder`` (created; existing files replaced)."""
    parent = os.path.dirname(os.path.abspath(folder)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".report-", dir=parent)
    try:
        write_jsonl(os.path.join(tmp, "runs.jsonl"), rows)
        with open(os.path.join(tmp, "summary.md"), "w") as fh:
            fh.write(summary_table(rows, title))
            if extra_md:
                fh.write("\n" + extra_md)
        files = ["runs.jsonl", "summary.md"] + plot_curves(rows, tmp, title)
        os.makedirs(folder, exist_ok=True)
        for f in files:
            os.replace(os.path.join(tmp, f), os.path.join(folder, f))
        return [os.path.join(folder, f) for f in files]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
