"""[REN] ch. 5: SMW-GN vs HF (thesis L2832: "SMW-GN is always faster than HF in terms of both epochs and
clock-time") at the small analogue of the thesis's MNIST setting, and an ablation of what separates them.

Setting (preset ``ren-ch5-mnist-small``): standardized digits (64 inputs, 1437 train / 360 test), MLP
64-500-10 logistic (the analogue of 784-500-10), softmax CE, Glorot θ₀ per seed, N₁ = 60 (gradient and ρ),
N₂ = 30 (curvature), λ_LM₀ = 1, boost 1.01, drop 0.99, ε = ¼, τ = 10⁻³ (L2816), α = 0.1 (L2820: "Initial
learning rates for other methods were also set to be 0.1"). qnref's ``hf`` runs Martens 2010: CG up to 250
iterations, λ₀ = 1 with drop 2/3 / boost 3/2, Armijo backtracking from α = 1.

Ablation: SMW-GN's N₂ (and N₁), λ₀, τ, the LM factors and α; HF's CG budget, the thesis's LM factors and
its α = 0.1 fixed step. Columns: final training loss and test errors, epochs and optimizer seconds to the
target loss, seconds and gradient-equivalent passes per epoch.

    OMP_NUM_THREADS=1 python tools/reproductions/smw_vs_hf.py --out docs/img/repro_smw_hf.png
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (Setting, count_reached, emit, first_reaching, fmt_ms, markdown_table, parser, per_epoch,  # noqa: E402
                      plot_panels, rescaled_factor, run, cpu_seconds_per_epoch)

SETTING = Setting("digits", "mlp", epochs=4, dataset_kwargs=Setting.kw({"flat": True, "standardize": True}),
                  model_kwargs=Setting.kw({"hidden": (500,), "activation": "sigmoid"}), eval_every=0.25)
TARGET = 0.3  # training loss (our choice: what SMW-GN with α = 0.1 has not reached after 4 epochs)
HF = {"grad_fraction": None, "grad_batch": 60, "curvature_batch": 30}
THESIS_LM = {"boost": 1.01, "drop": 0.99}
# the thesis's λ_LM rule per epoch: MNIST has 60000/60 = 1000 steps per epoch, digits 1437/60 ≈ 23.95
STEPS_TEXT, STEPS_HERE = 60000 / 60, 1437 / 60
PER_EPOCH_LM = {"boost": rescaled_factor(1.01, STEPS_TEXT, STEPS_HERE), "drop": rescaled_factor(0.99, STEPS_TEXT, STEPS_HERE)}


def plan() -> list[tuple[str, str, str, dict]]:
    return [
        ("preset", "SMW-GN (N₁/N₂ 60/30, α 0.1)", "smw-gn", {}),
        ("preset", "HF (qnref: Martens, CG ≤ 250, line search)", "hf", dict(HF)),
        ("preset", "SGD (lr 0.1, batch 60)", "sgd", {"lr": 0.1, "batch_size": 60}),
        ("smw", "SMW-GN N₂ = 5", "smw-gn", {"curvature_batch": 5}),
        ("smw", "SMW-GN N₂ = 15", "smw-gn", {"curvature_batch": 15}),
        ("smw", "SMW-GN N₂ = 60", "smw-gn", {"curvature_batch": 60}),
        ("smw", "SMW-GN N₁/N₂ = 100/50", "smw-gn", {"batch_size": 100, "curvature_batch": 50}),
        ("smw", "SMW-GN λ₀ = 0.1", "smw-gn", {"lambda_lm": 0.1}),
        ("smw", "SMW-GN λ₀ = 10", "smw-gn", {"lambda_lm": 10.0}),
        ("smw", "SMW-GN τ = 0.1", "smw-gn", {"tau": 0.1}),
        ("smw", "SMW-GN Martens' factors 3/2, 2/3", "smw-gn", {"boost": 1.5, "drop": 2.0 / 3.0}),
        ("smw", "SMW-GN, thesis rule per epoch (1.515/0.657)", "smw-gn", dict(PER_EPOCH_LM)),
        ("smw", "SMW-GN α = 0.5", "smw-gn", {"lr": 0.5}),
        ("smw", "SMW-GN α = 1", "smw-gn", {"lr": 1.0}),
        ("hf", "HF CG ≤ 5", "hf", {**HF, "max_cg_iters": 5}),
        ("hf", "HF CG ≤ 20", "hf", {**HF, "max_cg_iters": 20}),
        ("hf", "HF CG ≤ 50", "hf", {**HF, "max_cg_iters": 50}),
        ("hf", "HF, thesis LM factors 1.01/0.99", "hf", {**HF, **THESIS_LM}),
        ("hf", "HF, fixed α = 0.1, Martens' factors", "hf", {**HF, "step_rule": "fixed", "lr": 0.1}),
        ("hf", "HF, fixed α = 0.1, 1.01/0.99 (thesis)", "hf", {**HF, **THESIS_LM, "step_rule": "fixed", "lr": 0.1}),
        ("hf", "HF, fixed α = 0.1, thesis rule per epoch", "hf", {**HF, **PER_EPOCH_LM, "step_rule": "fixed", "lr": 0.1}),
        ("hf", "HF, fixed α = 1, 1.01/0.99", "hf", {**HF, **THESIS_LM, "step_rule": "fixed", "lr": 1.0}),
        ("hf", "HF N₁/N₂ = 100/50", "hf", {**HF, "grad_batch": 100, "curvature_batch": 50}),
    ]


def main(argv=None) -> int:
    a = parser(__doc__.splitlines()[0]).parse_args(argv)
    seeds = tuple(range(a.seeds or (1 if a.tiny else 2)))
    setting = SETTING
    runs = plan()
    if a.tiny:
        from dataclasses import replace  # noqa: PLC0415

        setting = replace(SETTING, epochs=0.25, eval_every=0.125)
        runs = [r for r in runs if r[0] == "preset"][:2]
        runs[1] = (runs[1][0], runs[1][1], "hf", {**HF, "max_cg_iters": 5})
    results = {label: [run(setting, label, name, hyper, s) for s in seeds] for _, label, name, hyper in runs}
    head = ["group", "run", "final train loss", "test errors (of 360)", f"epochs to loss ≤ {TARGET:g}",
            "seconds to it", "reached", "s / epoch", "passes / epoch"]
    rows = []
    for group, label, _, _ in runs:
        rs = results[label]
        rows.append([group, label, fmt_ms([r.final["train_loss"] for r in rs]),
                     fmt_ms([r.final.get("test_errors") for r in rs]),
                     fmt_ms([first_reaching(r.history, "train_loss", TARGET) for r in rs]),
                     fmt_ms([first_reaching(r.history, "train_loss", TARGET, x="time") for r in rs]),
                     count_reached(rs, "train_loss", TARGET),
                     fmt_ms([per_epoch(r.history, "time") for r in rs]),
                     fmt_ms([per_epoch(r.history, "passes") for r in rs])])
    emit(f"SMW-GN vs HF: standardized digits, MLP 64-500-10 sigmoid, {setting.epochs:g} epochs, seeds {list(seeds)}; "
         "mean ± half-range over seeds; time = optimizer wall time on one core (evaluations excluded)\n\n")
    emit(markdown_table(head, rows))
    timed = ["SMW-GN (N₁/N₂ 60/30, α 0.1)", "SMW-GN, thesis rule per epoch (1.515/0.657)",
             "HF (qnref: Martens, CG ≤ 250, line search)", "HF, fixed α = 0.1, 1.01/0.99 (thesis)",
             "HF, fixed α = 0.1, thesis rule per epoch", "HF CG ≤ 5", "SGD (lr 0.1, batch 60)"]
    spec = {label: (name, hyper) for _, label, name, hyper in runs}
    trows = []
    for label in (timed[:2] if a.tiny else timed):
        if label not in spec:
            continue
        name, hyper = spec[label]
        cpu = cpu_seconds_per_epoch(setting, name, hyper, 0, repeats=1 if a.tiny else 3,
                                    epochs=min(1.0, setting.epochs))
        ep = [first_reaching(r.history, "train_loss", TARGET) for r in results[label]]
        trows.append([label, f"{cpu:.3g}", fmt_ms([e * cpu if e is not None else None for e in ep])])
    emit("\nCPU time per epoch (process time of the steps over the first epoch, seed 0, min of 3 runs) and the "
         f"CPU seconds to loss ≤ {TARGET:g} it implies (epochs to it × CPU s / epoch):\n\n")
    emit(markdown_table(["run", "CPU s / epoch", f"CPU s to loss ≤ {TARGET:g}"], trows))
    if a.out:
        keep = [lbl for _, lbl, _, _ in runs if lbl.startswith(("SMW-GN (", "HF (", "SGD", "HF, fixed α = 0.1, 1.01",
                                                             "SMW-GN, thesis rule", "HF, fixed α = 0.1, thesis"))]
        curves = {k: results[k] for k in keep}
        plot_panels([
            {"title": "training loss vs epochs", "key": "train_loss", "ylabel": "training loss", "curves": curves},
            {"title": "training loss vs time", "key": "train_loss", "ylabel": "training loss", "curves": curves,
             "x": "time"},
            {"title": "test errors (of 360)", "key": "test_errors", "ylabel": "test errors", "curves": curves},
        ], a.out, "[REN] ch. 5 on digits: SMW-GN vs HF")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
