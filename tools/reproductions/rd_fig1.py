"""[RD] Fig. 1 at small scale: L-SR1-TR vs L-BFGS (forgetting every 5) and the first-order methods, and a short
ablation of why the old preset found L-BFGS ahead (memory 5, forgetting, batch 20 vs 400, BN or not).

Setting (preset ``lsr1-fig1-small`` / ``lsr1-fig1-bn-small``): digits 8×8 (1437 train / 360 test), the reduced
LeNet (conv 8 → pool → conv 16 → pool → FC 10, ReLU, 1,898 parameters; +48 with BN), θ₀ ~ N(0, 0.1²)
(Appendix), L2 10⁻⁴, memory 5, batch 400 for L-SR1/L-BFGS and 20 for NAG / SGD-m (lr 0.003, momentum 0.9,
Appendix MNIST), metric: test errors (the text's "test loss measured as multi-class error count"). The old
preset ``lsr1-fig1-digits`` (L2 10⁻³, Glorot θ₀, train loss) is rerun for comparison.

    OMP_NUM_THREADS=1 python tools/reproductions/rd_fig1.py --out docs/img/repro_rd_fig1.png
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Setting, emit, fmt_ms, markdown_table, parser, plot_panels, run  # noqa: E402

EPOCHS = 20  # §4.1.1


def setting(bn: bool, old: bool = False) -> Setting:
    kw = Setting.kw({"batchnorm": True} if bn else {})
    if old:  # the preset lsr1-fig1-digits: CIFAR's L2, Glorot θ₀
        return Setting("digits", "lenet-digits", epochs=EPOCHS, model_kwargs=kw, l2=1e-3)
    return Setting("digits", "lenet-digits", epochs=EPOCHS, model_kwargs=kw, l2=1e-4, init="gaussian", init_std=0.1)


def plan() -> list[tuple[str, str, str, dict, bool]]:
    """(label, BN?, optimizer, hyperparameters, old preset?)."""
    out = []
    for bn in (False, True):
        t = " +BN" if bn else ""
        out += [
            (f"L-SR1-TR b400{t}", bn, "lsr1-tr", {"batch_size": 400, "memory": 5}, False),
            (f"L-BFGS forget 5 b400{t}", bn, "lbfgs", {"batch_size": 400, "memory": 5, "forget_every": 5}, False),
            (f"L-BFGS no forgetting b400{t}", bn, "lbfgs", {"batch_size": 400, "memory": 5}, False),
            (f"L-SR1-TR b400 m=10{t}", bn, "lsr1-tr", {"batch_size": 400, "memory": 10}, False),
            (f"L-BFGS no forgetting b400 m=10{t}", bn, "lbfgs", {"batch_size": 400, "memory": 10}, False),
            (f"L-SR1-TR b20{t}", bn, "lsr1-tr", {"batch_size": 20, "memory": 5}, False),
            (f"L-BFGS forget 5 b20{t}", bn, "lbfgs", {"batch_size": 20, "memory": 5, "forget_every": 5}, False),
            (f"NAG b20{t}", bn, "nag", {"batch_size": 20, "lr": 0.003, "momentum": 0.9}, False),
            (f"SGD-m b20{t}", bn, "momentum", {"batch_size": 20, "lr": 0.003, "momentum": 0.9}, False),
        ]
    out += [("old preset, 10 epochs: L-SR1-TR b400", False, "lsr1-tr", {"batch_size": 400, "memory": 5}, True),
            ("old preset, 10 epochs: L-BFGS forget 5 b400", False, "lbfgs", {"batch_size": 400, "memory": 5, "forget_every": 5}, True)]
    return out


def main(argv=None) -> int:
    a = parser(__doc__.splitlines()[0]).parse_args(argv)
    seeds = tuple(range(a.seeds or (1 if a.tiny else 2)))
    runs = plan()
    epochs = EPOCHS
    if a.tiny:
        epochs = 1
        runs = [r for r in runs if r[0] in ("L-SR1-TR b400", "L-BFGS forget 5 b400")]
    results = {}
    for label, bn, name, hyper, old in runs:
        st = replace(setting(bn, old), epochs=min(epochs, 10) if old else epochs)
        results[label] = [run(st, label, name, hyper, s) for s in seeds]
    head = ["run", "final test errors (of 360)", "best test errors", "final train loss", "steps", "time [s]"]
    rows = []
    for label, *_ in runs:
        rs = results[label]
        rows.append([label, fmt_ms([r.final.get("test_errors") for r in rs]),
                     fmt_ms([min(h.get("test_errors", 1e9) for h in r.history) for r in rs]),
                     fmt_ms([r.final["train_loss"] for r in rs]),
                     fmt_ms([r.final["step"] for r in rs], ".4g"), fmt_ms([r.final["time"] for r in rs])])
    emit(f"[RD] Fig. 1 small: digits, reduced LeNet, {epochs} epochs, seeds {list(seeds)}; mean ± half-range\n\n")
    emit(markdown_table(head, rows))
    if a.out:
        def pick(bn: bool) -> dict:
            t = " +BN" if bn else ""
            names = [f"L-SR1-TR b400{t}", f"L-BFGS forget 5 b400{t}", f"L-BFGS no forgetting b400{t}",
                     f"L-SR1-TR b20{t}", f"NAG b20{t}", f"SGD-m b20{t}"]
            return {k: results[k] for k in names if k in results}

        plot_panels([
            {"title": "test errors, no BN", "key": "test_errors", "ylabel": "test errors (of 360)", "curves": pick(False)},
            {"title": "test errors, with BN", "key": "test_errors", "ylabel": "test errors (of 360)", "curves": pick(True)},
        ], a.out, "[RD] Fig. 1 on digits (reduced LeNet)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
