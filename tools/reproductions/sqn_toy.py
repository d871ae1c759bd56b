"""[SQN] toy classification: S-LSR1 and S-LBFGS vs LSR1, LBFGS, GD and Adam on the small, medium and large
sigmoid nets (poster "Numerical Results"; its claim L17–20: first-order methods are slow and "sometimes even
fail to achieve 100% accuracy"; sampling new curvature pairs each iteration captures better curvature).

Setting (presets ``sqn-toy-small/medium/large``): the text's two classes × 50 points, full batch, θ₀ ~ N(0, I),
50 iterations, seeds 0–2; qnref's defaults for the memory (10) and sampling radius (0.01, option II).

    OMP_NUM_THREADS=1 python tools/reproductions/sqn_toy.py --out docs/img/repro_sqn_toy.png
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Setting, emit, first_reaching, fmt_ms, markdown_table, parser, plot_panels, run  # noqa: E402

RUNS = (("S-LSR1", "s-lsr1", {}), ("S-LBFGS", "s-lbfgs", {}), ("LSR1", "lsr1-tr", {"batch_size": None}),
        ("LBFGS", "lbfgs", {"batch_size": None}), ("GD", "gd-ls", {"batch_size": None}),
        ("Adam", "adam", {"batch_size": None, "lr": 0.01}))


def main(argv=None) -> int:
    a = parser(__doc__.splitlines()[0]).parse_args(argv)
    seeds = tuple(range(a.seeds or (1 if a.tiny else 3)))
    sizes = ("medium",) if a.tiny else ("small", "medium", "large")
    epochs = 5 if a.tiny else 50
    results = {}
    for size in sizes:
        st = Setting("toy2class", f"toy-{size}", epochs=epochs, init="gaussian", init_std=1.0, eval_every=1)
        for label, name, hyper in RUNS:
            results[(size, label)] = [run(st, label, name, hyper, s) for s in seeds]
        # the classical methods given about the sampled methods' gradient-equivalent passes (≈ 8×)
        for label, name, hyper in RUNS[2:4]:
            lab = f"{label}, {8 * epochs} its (≈ equal passes)"
            results[(size, lab)] = [run(st, lab, name, hyper, s, epochs=8 * epochs) for s in seeds]
    head = ["net", "method", "final train loss", "final train acc", "iterations to 100 % train acc",
            "passes to it", "reached", "passes", "time [s]"]
    rows = []
    for (size, label), rs in results.items():
        hit = [first_reaching(r.history, "train_acc", 1.0, "max", x="step") for r in rs]
        rows.append([size, label, fmt_ms([r.final["train_loss"] for r in rs]), fmt_ms([r.final.get("train_acc") for r in rs]),
                     fmt_ms(hit, ".3g"), fmt_ms([first_reaching(r.history, "train_acc", 1.0, "max", x="passes") for r in rs]),
                     f"{sum(h is not None for h in hit)} of {len(rs)}",
                     fmt_ms([r.final["passes"] for r in rs]), fmt_ms([r.final["time"] for r in rs])])
    emit(f"[SQN] toy problem: full batch, {epochs} iterations, seeds {list(seeds)}; mean ± half-range\n\n")
    emit(markdown_table(head, rows))
    if a.out:
        plot_panels([{"title": f"toy-{size}", "key": "train_loss", "ylabel": "training loss", "x": "step",
                      "curves": {lbl: results[(size, lbl)] for lbl, _, _ in RUNS}} for size in sizes],
                    a.out, "[SQN] toy classification: training loss vs iterations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
