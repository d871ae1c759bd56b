"""[MB] MB-LSR1 vs its special case L-SSR1-TR: the preset's result and an ablation of the differences.

Setting (the issue's preset ``mblsr1-large-batch-digits``): digits 8×8 (1437 train / 360 test),
MLP 64-32-10 tanh, softmax CE, Glorot θ₀ per seed, no L2, 15 epochs, initial batch 512.

[MB] §3 (L218): L-SSR1-TR = Alg. 1 with m̂ = −1, γ₂ = η = ζ = 0 and the progress check on all N
examples. The ablation runs ``mb-lsr1`` with one of these switched to L-SSR1-TR's value at a time
("toward"), then ``mb-lsr1`` with all of L-SSR1-TR's values (must equal ``lssr1-tr``: the check of
the equivalence) and one MB-LSR1 value switched back at a time ("back"); Alg. 6 off (K larger than the
run), the initial batch of Table 2's grid, and the full-batch/large-batch end are added.

    OMP_NUM_THREADS=1 python tools/reproductions/mb_lsr1_ablation.py --out docs/img/repro_mb_lsr1.png
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Setting, build, emit, fmt_ms, markdown_table, mean_spread, parser, plot_panels, run  # noqa: E402
from qnref.optim import make_optimizer  # noqa: E402
from qnref.optim.base import Problem  # noqa: E402

SETTING = Setting("digits", "mlp", epochs=15, dataset_kwargs=Setting.kw({"flat": True}),
                  model_kwargs=Setting.kw({"hidden": (32,), "activation": "tanh"}))
#: mb-lsr1 with L-SSR1-TR's values of the five parameters of [MB] §3 (γ₁ = 10⁻³ as lssr1-tr's default;
#: progress_factor 10⁶: min(⌈10⁶ n_b⌉, 5000, N) = N here, the full-set check)
LSSR1 = {"restart_memory": -1, "gamma2": 0.0, "eta": 0.0, "zeta": 0.0, "gamma1": 1e-3, "progress_factor": 1e6}
OFF = {"K": 10 ** 9}  # Alg. 6 off: the only progress check is at k = 0, which never doubles (f̂_K = ∞)


def settings(batch: int) -> list[tuple[str, str, str, dict]]:
    """(group, label, optimizer, hyperparameters)."""
    b = {"batch_size": batch}
    return [
        ("preset", "MB-LSR1 (defaults)", "mb-lsr1", b),
        ("preset", "L-SSR1-TR (defaults)", "lssr1-tr", b),
        ("toward", "MB-LSR1, ζ = 0 (no radius averaging)", "mb-lsr1", {**b, "zeta": 0.0}),
        ("toward", "MB-LSR1, ζ = 0.5", "mb-lsr1", {**b, "zeta": 0.5}),
        ("toward", "MB-LSR1, ζ = 0.9", "mb-lsr1", {**b, "zeta": 0.9}),
        ("toward", "MB-LSR1, m̂ = −1 (no restarts)", "mb-lsr1", {**b, "restart_memory": -1}),
        ("toward", "MB-LSR1, η = 0 (no SGD hybrid)", "mb-lsr1", {**b, "eta": 0.0}),
        ("toward", "MB-LSR1, γ₁ = 10⁻³, γ₂ = 0 (strict decrease rule)", "mb-lsr1", {**b, "gamma1": 1e-3, "gamma2": 0.0}),
        ("toward", "MB-LSR1, progress check on all N", "mb-lsr1", {**b, "progress_factor": 1e6}),
        ("toward", "MB-LSR1, Alg. 6 off (batch fixed)", "mb-lsr1", {**b, **OFF}),
        ("toward", "MB-LSR1, m̂ = m (warm start, [SQN])", "mb-lsr1", {**b, "restart_memory": 16}),
        ("equal", "mb-lsr1 with all L-SSR1-TR values", "mb-lsr1", {**b, **LSSR1}),
        ("back", "L-SSR1-TR + ζ = 1", "mb-lsr1", {**b, **LSSR1, "zeta": 1.0}),
        ("back", "L-SSR1-TR + m̂ = 0 (restarts)", "mb-lsr1", {**b, **LSSR1, "restart_memory": 0}),
        ("back", "L-SSR1-TR + η = 0.1", "mb-lsr1", {**b, **LSSR1, "eta": 0.1}),
        ("back", "L-SSR1-TR + γ₁ = 0, γ₂ = 0.1", "mb-lsr1", {**b, **LSSR1, "gamma1": 0.0, "gamma2": 0.1}),
        ("back", "L-SSR1-TR + sampled check (1.1 n_b)", "mb-lsr1", {**b, **LSSR1, "progress_factor": 1.1}),
        ("back", "L-SSR1-TR, Alg. 6 off", "mb-lsr1", {**b, **LSSR1, **OFF}),
        ("mechanism", "MB-LSR1, ζ = 0, m̂ = −1", "mb-lsr1", {**b, "zeta": 0.0, "restart_memory": -1}),
        ("mechanism", "MB-LSR1, ρ floor −100 (qnref's safeguard −1 relaxed)", "mb-lsr1", {**b, "rho_floor": -100.0}),
    ]


def batches_block(batches: tuple[int, ...]) -> list[tuple[str, str, str, dict]]:
    out = []
    for nb in batches:
        out += [("batch", f"MB-LSR1 n_b = {nb}", "mb-lsr1", {"batch_size": nb}),
                ("batch", f"MB-LSR1 ζ = 0, n_b = {nb}", "mb-lsr1", {"batch_size": nb, "zeta": 0.0}),
                ("batch", f"L-SSR1-TR n_b = {nb}", "lssr1-tr", {"batch_size": nb})]
    return out


def describe(results) -> dict:
    """Mechanism counters from the final states and step records of each seed."""
    restarts = [r.state.restarts if r.state is not None else float("nan") for r in results]
    n_b = [r.state.n_b if r.state is not None else float("nan") for r in results]
    delta = [r.state.delta if r.state is not None else float("nan") for r in results]
    steps = [r.final["step"] for r in results]
    return {"restarts": restarts, "n_b": n_b, "delta": delta, "steps": steps}


def trace(setting: Setting, name: str, hyper: dict, seed: int, epochs: float | None = None) -> dict:
    """Step-by-step counters of one run (the same steps as :func:`run`, taken one by one): ρ < 0, ρ̂ < 0.1
    (the only case in which Alg. 5 shrinks δ), restarts, mean number of stored pairs, largest δ, mean α."""
    model, data, theta = build(setting, seed)
    problem = Problem(model, data.loss, data.X_train, data.y_train, setting.l2, seed=seed)
    opt = make_optimizer(name, **hyper)
    state = opt.init(theta)
    infos = []
    while problem.epochs < (setting.epochs if epochs is None else epochs) - 1e-12:
        theta, state, info = opt.step(theta, state, problem)
        infos.append(info.as_dict())
    rho = [d["rho"] for d in infos]
    return {"steps": len(infos), "rho<0": sum(r < 0 for r in rho), "rho_hat<0.1": sum(d["rho_hat"] < 0.1 for d in infos),
            "restarts": sum(d["sy_action"] == "restart" for d in infos),
            "pairs": sum(d["pairs"] for d in infos) / len(infos), "delta_max": max(d["radius"] for d in infos),
            "alpha": sum(d["step_size"] for d in infos) / len(infos),
            "rho_hat_last": infos[-1]["rho_hat"]}


def main(argv=None) -> int:
    a = parser(__doc__.splitlines()[0]).parse_args(argv)
    n_seeds = a.seeds or (1 if a.tiny else 3)
    seeds = tuple(range(n_seeds))
    setting = SETTING
    plan = settings(512)
    if a.tiny:
        from dataclasses import replace  # noqa: PLC0415

        setting = replace(SETTING, epochs=1.0)
        plan = [p for p in plan if p[0] in ("preset", "equal")]
    else:
        plan += batches_block((32, 128, 1437))
    results: dict[str, list] = {}
    for group, label, name, hyper in plan:
        results[label] = [run(setting, label, name, hyper, s) for s in seeds]
    def ref(group: str, hyper: dict) -> float:  # L-SSR1-TR at the same initial batch
        key = f"L-SSR1-TR n_b = {hyper['batch_size']}" if group == "batch" else "L-SSR1-TR (defaults)"
        return mean_spread(r.final["train_loss"] for r in results[key])[0]

    head = ["group", "setting", "final train loss", "test errors (of 360)", "passes", "steps", "restarts",
            "final n_b", "final δ", "below L-SSR1-TR (same n_b)?"]
    rows = []
    for group, label, name, hyper in plan:
        rs = results[label]
        d = describe(rs)
        m = mean_spread(r.final["train_loss"] for r in rs)[0]
        rows.append([group, label, fmt_ms([r.final["train_loss"] for r in rs]),
                     fmt_ms([r.final.get("test_errors") for r in rs], ".3g"),
                     fmt_ms([r.final["passes"] for r in rs], ".3g"), fmt_ms(d["steps"], ".3g"),
                     fmt_ms(d["restarts"], ".3g"), fmt_ms(d["n_b"], ".4g"), fmt_ms(d["delta"], ".3g"),
                     "–" if name == "lssr1-tr" else "yes" if m < ref(group, hyper) else "no"])
    emit(f"MB-LSR1 ablation: digits, MLP 64-32-10 tanh, {setting.epochs:g} epochs, seeds {list(seeds)}; "
         f"initial batch 512 unless named; mean ± half-range over seeds\n\n")
    emit(markdown_table(head, rows))
    eq = [abs(x.final["train_loss"] - y.final["train_loss"]) for x, y in
          zip(results["mb-lsr1 with all L-SSR1-TR values"], results["L-SSR1-TR (defaults)"])]
    emit(f"\nmb-lsr1 with L-SSR1-TR's values vs lssr1-tr: max |Δ final loss| = {max(eq):.3g}\n")
    mech = [("MB-LSR1 (defaults)", "mb-lsr1", {"batch_size": 512}, None),
            ("MB-LSR1, ζ = 0", "mb-lsr1", {"batch_size": 512, "zeta": 0.0}, None),
            ("L-SSR1-TR (defaults)", "lssr1-tr", {"batch_size": 512}, None),
            ("L-SSR1-TR + ζ = 1", "mb-lsr1", {"batch_size": 512, **LSSR1, "zeta": 1.0}, None),
            ("MB-LSR1 (defaults), 60 epochs", "mb-lsr1", {"batch_size": 512}, 60.0),
            ("MB-LSR1 (defaults), n_b = 128", "mb-lsr1", {"batch_size": 128}, None)]
    if a.tiny:
        mech = mech[:1]
    mrows = []
    for label, name, hyper, ep in mech:
        t = [trace(setting, name, hyper, s, ep) for s in seeds]
        mrows.append([label] + [fmt_ms([x[k] for x in t], ".3g") for k in
                                ("steps", "rho<0", "rho_hat<0.1", "restarts", "pairs", "delta_max", "alpha", "rho_hat_last")])
    emit("\nMechanism (per-step counters over the whole run, same seeds):\n\n")
    emit(markdown_table(["setting", "steps", "steps with ρ < 0", "steps with ρ̂ < 0.1 (δ may shrink)", "memory wiped",
                         "mean stored pairs", "largest δ", "mean α (line search)", "final ρ̂"], mrows))
    if a.out:
        keep = ["MB-LSR1 (defaults)", "L-SSR1-TR (defaults)", "MB-LSR1, ζ = 0 (no radius averaging)",
                "MB-LSR1, m̂ = −1 (no restarts)", "L-SSR1-TR + ζ = 1", "MB-LSR1, ζ = 0, m̂ = −1"]
        curves = {k: results[k] for k in keep if k in results}
        plot_panels([
            {"title": "training loss (batch 512)", "key": "train_loss", "ylabel": "training loss", "curves": curves},
            {"title": "test errors (of 360)", "key": "test_errors", "ylabel": "test errors", "curves": curves},
        ], a.out, "[MB] MB-LSR1 vs L-SSR1-TR on digits: ablation")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
