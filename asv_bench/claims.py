"""Claims checker: each paper claim of docs/benchmarks.md, checked against asv's saved results.

    python -m asv_bench.claims                       # newest results of this machine: print the table
    python -m asv_bench.claims --commit HEAD --write-docs   # … and rewrite docs/benchmarks.md's tables
    python -m asv_bench.claims --strict              # exit 1 if a claim fails

It reads the results JSON file(s) that ``asv run`` saved for one machine, commit and environment
(``asv_bench/results/<machine>/<hash>-<env>.json``, loaded with asv's own
:class:`asv.results.Results`) and prints, for every claim, the benchmark, the measured value, the
target and the verdict. ``--write-docs`` replaces the text between each
``<!-- claims:SECTION -->`` / ``<!-- /claims -->`` marker pair of docs/benchmarks.md with the
table of that section, so no number in those tables is typed by hand.

Each claim says whether it holds with ``--quick`` (``quick``: counts, flop formulas, ratios and
exponents measured side by side in one process, peak memory) or needs a full-statistics run
(``full``: absolute times and ratios of two separately timed benchmarks). A ``full`` claim whose
result has fewer than :data:`MIN_SAMPLES` samples (a ``--quick`` run) gets the verdict
``needs full run`` instead of pass/fail. Verdicts: ``pass``, ``FAIL``, ``needs full run``,
``missing`` (no result: benchmark not run or failed, e.g. torch absent).

Targets are the papers' claims where they give a number (Pearlmutter's Hv ≈ 2–4 gradients, read
as ≤ 3; the issue-3 goal ≤ 1.5 × torch; O(mn) read as a fitted exponent ≤ 1.1–1.2) and otherwise
this project's budget on its 2-core reference machine (times, memory: the recorded value plus
about 15–20 %; those targets say "budget").
"""
from __future__ import annotations

import argparse
import ast
import itertools
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOCS = os.path.join(ROOT, "docs", "benchmarks.md")
RESULTS = os.path.join(HERE, "results")
MIN_SAMPLES = 5  # a full-statistics time result has at least this many samples (SlowTiming: 10–20)

PASS, FAIL, NEEDS_FULL, MISSING = "pass", "FAIL", "needs full run", "missing"


# -- reading asv's results ----------------------------------------------------------------------
class Measured:
    """One machine/commit/environment's saved results, indexed by benchmark name and parameters."""

    def __init__(self, results, benchmarks=None):
        self.results = results  # list of asv.results.Results, newest first (one env)
        self.benchmarks = benchmarks or {}

    @classmethod
    def load(cls, paths, benchmarks_json=None):
        from asv.results import Results

        res = sorted((Results.load(p) for p in paths), key=lambda r: r.date or 0, reverse=True)
        bm = {}
        if benchmarks_json and os.path.exists(benchmarks_json):
            with open(benchmarks_json) as f:
                bm = json.load(f)
        return cls(res, bm)

    def _param_names(self, key, n):
        names = self.benchmarks.get(key, {}).get("param_names")
        return list(names) if names and len(names) == n else [f"p{i}" for i in range(n)]

    def entries(self, key):
        """[(params dict, value, stats dict or None), …] for benchmark ``key`` (newest file wins)."""
        for r in self.results:
            if key not in r.get_all_result_keys():
                continue
            params = r.get_result_params(key)
            values = r.get_result_value(key, params)
            stats = r.get_result_stats(key, params)
            names = self._param_names(key, len(params))
            out = []
            for combo, v, s in zip(itertools.product(*params), values, stats):
                out.append(({n: _unrepr(c) for n, c in zip(names, combo)}, v, s))
            return out
        return []

    def get(self, key, **sel):
        """(value, stats) of the one parameter combination matching ``sel``, or (None, None)."""
        for p, v, s in self.entries(key):
            if all(p.get(k) == want for k, want in sel.items()):
                return v, s
        return None, None


def _unrepr(s):
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return s


def samples_of(stats):
    """Number of samples behind a time result (asv's ``repeat`` stat; 1 for ``--quick``)."""
    if not stats:
        return 1
    return int(stats.get("repeat") or 1)


# -- claims -------------------------------------------------------------------------------------
@dataclass
class Outcome:
    measured: str
    verdict: str
    value: float | None = None


@dataclass
class Claim:
    section: str
    text: str
    benchmark: str  # shown in the table
    target: str  # shown in the table
    check: Callable[[Measured], Outcome]
    full: bool = False  # needs a full-statistics run

    def evaluate(self, m: Measured) -> Outcome:
        try:
            return self.check(m)
        except _Missing as e:
            return Outcome(f"— ({e})", MISSING)


class _Missing(Exception):
    pass


def _need(meas, key, sel):
    v, s = meas.get(key, **sel)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        what = ", ".join(f"{k}={v}" for k, v in sel.items())
        raise _Missing(f"no result{' for ' + what if what else ''}")
    return v, s


def _fmt(v, unit):
    if unit == "ms":
        return f"{v * 1e3:.3g} ms" if v * 1e3 < 100 else f"{v * 1e3:.0f} ms"
    if unit == "MB":
        return f"{v / 1e6:.0f} MB"
    if unit == "int":
        return f"{v:,.0f}"
    if unit == "exact":
        return f"{v:g}"
    return f"{v:.2f}"


def _verdict(ok, full, stats_list):
    if full and any(samples_of(s) < MIN_SAMPLES for s in stats_list):
        return NEEDS_FULL
    return PASS if ok else FAIL


def _cmp(v, op, target):
    lo, hi = (target if isinstance(target, tuple) else (None, None))
    return {
        "<=": lambda: v <= target,
        ">=": lambda: v >= target,
        "==": lambda: abs(v - target) <= 1e-9 * max(1.0, abs(target)),
        "in": lambda: lo <= v <= hi,
    }[op]()


def _target_text(op, target, unit):
    if op == "in":
        return f"{_fmt(target[0], unit)} … {_fmt(target[1], unit)}"
    sym = {"<=": "≤", ">=": "≥", "==": "="}[op]
    return f"{sym} {_fmt(target, unit)}"


def _short(key):
    return key.split(".", 1)[1] if key.startswith("bench_") else key


def value_claim(section, text, key, op, target, unit="ratio", full=False, budget=False, label=None, **sel):
    """Claim on one benchmark result (one parameter combination ``sel``)."""

    def check(m):
        v, s = _need(m, key, sel)
        return Outcome(_fmt(v, unit), _verdict(_cmp(v, op, target), full, [s]), v)

    where = ", ".join(f"{v}" for v in sel.values())
    bench = f"`{_short(key)}`" + (f" ({where})" if where else "")
    return Claim(section, text, label or bench, _target_text(op, target, unit) + (" (budget)" if budget else ""),
                 check, full)


def ratio_claim(section, text, num, den, op, target, full=True, label=None, unit="ratio"):
    """Claim on the ratio of two results: ``num`` / ``den`` are (key, {params})."""

    def check(m):
        a, sa = _need(m, num[0], num[1])
        b, sb = _need(m, den[0], den[1])
        r = a / b
        return Outcome(f"{r:.2f}", _verdict(_cmp(r, op, target), full, [sa, sb]), r)

    def name(k, sel):
        where = ", ".join(str(v) for v in sel.values())
        return f"`{_short(k)}`" + (f" ({where})" if where else "")

    return Claim(section, text, label or f"{name(*num)} / {name(*den)}", _target_text(op, target, unit), check, full)


def formula_claim(section, text, key, formula, target_text, example=None):
    """Exact count at every parameter combination: value == formula(**params)."""

    def check(m):
        ents = m.entries(key)
        if not ents:
            raise _Missing("no result")
        bad = [(p, v) for p, v, _ in ents if v is None or v != formula(**p)]
        ok = len(ents) - len(bad)
        p, v, _ = ents[-1] if example is None else next(e for e in ents if all(e[0].get(k) == x for k, x in example.items()))
        eg = ", ".join(f"{k} = {x:,}" for k, x in p.items())
        msg = f"{ok}/{len(ents)} exact (e.g. {eg}: {v:,.0f})"
        if bad:
            bp, bv = bad[0]
            msg += f"; {bp}: {bv} ≠ {formula(**bp)}"
        return Outcome(msg, PASS if not bad else FAIL)

    return Claim(section, text, f"`{_short(key)}`", target_text, check, False)


def affine_in_n_claim(section, text, key, slope, target_text):
    """value(n, m) = slope(m)·n + r(m) with the remainder r independent of n (an O(f(m)) term),
    checked at every (n, m) saved."""

    def check(m):
        ents = m.entries(key)
        if not ents:
            raise _Missing("no result")
        rem = {}
        for p, v, _ in ents:
            rem.setdefault(p["m"], set()).add(round(v - slope(p["m"]) * p["n"], 6))
        ok = all(len(r) == 1 for r in rem.values()) and all(min(r) >= 0 for r in rem.values())
        parts = "; ".join(f"m = {mm}: r = {next(iter(r)):,.0f}" if len(r) == 1 else f"m = {mm}: r varies with n"
                          for mm, r in sorted(rem.items()))
        return Outcome(f"{len(ents)} points, {parts}", PASS if ok else FAIL)

    return Claim(section, text, f"`{_short(key)}`", target_text, check, False)


E, C, L, S, K, M, P = "engine", "cnn", "lsr1", "stochastic", "kronecker", "smw", "process"
SP = "speed"
ENG = "bench_engine."
CNN = "bench_cnn."
LS = "bench_lsr1_scaling."
FAM = "bench_families."
OPT = "bench_optimizers."
CPU32 = dict(dtype="float32", device="cpu")
CPU64 = dict(dtype="float64", device="cpu")

CLAIMS = [
    # engine (issue 2)
    value_claim(E, "Pearlmutter: Hv costs a small constant (≈ 2–4) × a gradient", ENG + "ProductRatios.track_hvp_over_grad", "<=", 3.0, **CPU32),
    value_claim(E, "… in float64", ENG + "ProductRatios.track_hvp_over_grad", "<=", 3.0, **CPU64),
    value_claim(E, "Gv needs no second-order terms (≈ 1.5 gradients)", ENG + "ProductRatios.track_ggn_over_grad", "<=", 2.0, **CPU32),
    value_claim(E, "… in float64", ENG + "ProductRatios.track_ggn_over_grad", "<=", 2.0, **CPU64),
    value_claim(E, "gradient = 1 gradient-equivalent pass", ENG + "ProductPasses.track_passes_grad", "==", 1.0, unit="exact"),
    value_claim(E, "Hv = 2 gradient-equivalent passes", ENG + "ProductPasses.track_passes_hvp", "==", 2.0, unit="exact"),
    value_claim(E, "Gv = 1.5 gradient-equivalent passes", ENG + "ProductPasses.track_passes_ggn", "==", 1.5, unit="exact"),
    value_claim(E, "gradient cost linear in the batch (MLP 256-512-512-10, batch 256…4096)", ENG + "EngineScaling.track_grad_exponent_in_batch", "in", (0.8, 1.2)),
    value_claim(E, "Hv cost linear in the batch", ENG + "EngineScaling.track_hvp_exponent_in_batch", "in", (0.8, 1.2)),
    value_claim(E, "gradient cost linear in n (widths 256…1024, batch 1024)", ENG + "EngineScaling.track_grad_exponent_in_n", "in", (0.8, 1.2)),
    value_claim(E, "autoencoder 784-…-784, batch 1000, float32: gradient", ENG + "AutoencoderProducts.time_forward_backward", "<=", 0.120, unit="ms", full=True, budget=True, **CPU32),
    value_claim(E, "… Gv", ENG + "AutoencoderProducts.time_ggn_vp", "<=", 0.220, unit="ms", full=True, budget=True, **CPU32),
    value_claim(E, "… Hv", ENG + "AutoencoderProducts.time_hvp", "<=", 0.300, unit="ms", full=True, budget=True, **CPU32),
    ratio_claim(E, "Hv / gradient from the two time benchmarks (separate processes)",
                (ENG + "AutoencoderProducts.time_hvp", CPU32), (ENG + "AutoencoderProducts.time_forward_backward", CPU32), "<=", 3.0),
    value_claim(E, "process peak memory, gradient", ENG + "AutoencoderPeakMemory.peakmem_forward_backward", "<=", 160e6, unit="MB", budget=True, **CPU32),
    value_claim(E, "process peak memory, Hv", ENG + "AutoencoderPeakMemory.peakmem_hvp", "<=", 250e6, unit="MB", budget=True, **CPU32),
    # CNNs (issue 3)
    value_claim(C, "goal: qnref ≤ 1.5 × torch, LeNet-5 (CPU, same threads, one process)", CNN + "CNNTorchRatio.track_ratio_to_torch", "<=", 1.5, model="lenet5-mnist"),
    value_claim(C, "goal: qnref ≤ 1.5 × torch, ResNet-20", CNN + "CNNTorchRatio.track_ratio_to_torch", "<=", 1.5, model="resnet20"),
    value_claim(C, "LeNet-5 forward+backward, batch 128", CNN + "CNNForwardBackward.time_forward_backward", "<=", 0.040, unit="ms", full=True, budget=True, model="lenet5-mnist"),
    value_claim(C, "ResNet-20 forward+backward, batch 128", CNN + "CNNForwardBackward.time_forward_backward", "<=", 0.540, unit="ms", full=True, budget=True, model="resnet20"),
    value_claim(C, "LeNet-5 peak memory", CNN + "CNNForwardBackward.peakmem_forward_backward", "<=", 256e6, unit="MB", budget=True, model="lenet5-mnist"),
    value_claim(C, "ResNet-20 peak memory (conv cache holds the input, not 9× patches)", CNN + "CNNForwardBackward.peakmem_forward_backward", "<=", 600e6, unit="MB", budget=True, model="resnet20"),
    value_claim(C, "no page faults in a warm loop: LeNet-5", CNN + "CNNPageFaults.track_minor_faults_per_grad", "<=", 1.0, model="lenet5-mnist"),
    value_claim(C, "no page faults in a warm loop: ResNet-20 (≈ 35 000 without the malloc thresholds)", CNN + "CNNPageFaults.track_minor_faults_per_grad", "<=", 1.0, model="resnet20"),
    # L-SR1 / L-BFGS (issue 4)
    formula_claim(L, "B v costs (4m+1)n + O(m²) multiplications ([RD16] §3)", LS + "LSR1Overhead.track_lsr1_matvec_flops",
                  lambda n, m: (4 * m + 1) * n + m * m, "= (4m+1)n + m² at every (n, m)"),
    formula_claim(L, "L-BFGS two-loop ≈ 4mn + n", LS + "LSR1Overhead.track_lbfgs_two_loop_flops",
                  lambda n, m: 4 * m * n + n, "= 4mn + n at every (n, m)"),
    affine_in_n_claim(L, "default (cached Grams) step: (14m+10)n + O(m³)", LS + "LSR1Overhead.track_lsr1_cached_step_flops",
                      lambda m: 14 * m + 10, "(14m+10)n + r(m), r ≥ 0 independent of n"),
    affine_in_n_claim(L, "exact-QR reference step (gram_cache=False): (7m²+9m+12)n + O(m³)", LS + "LSR1Overhead.track_lsr1_step_flops",
                      lambda m: 7 * m * m + 9 * m + 12, "(7m²+9m+12)n + r(m), r ≥ 0 independent of n"),
    value_claim(L, "per-iteration time O(mn): exponent in n (default step, m = 8, n = 0.8…3.2·10⁶)", LS + "LSR1Exponents.track_lsr1_cached_iteration_exponent_in_n", "<=", 1.2),
    value_claim(L, "… exponent in m (m = 8…64, n = 8·10⁵)", LS + "LSR1Exponents.track_lsr1_cached_iteration_exponent_in_m", "<=", 1.1),
    value_claim(L, "exact-QR route is O(m²n): exponent in m above 1", LS + "LSR1Exponents.track_lsr1_iteration_exponent_in_m", "in", (1.2, 2.1)),
    value_claim(L, "B v alone: exponent in n", LS + "LSR1Exponents.track_lsr1_matvec_exponent_in_n", "<=", 1.2),
    value_claim(L, "two-loop: exponent in n", LS + "LSR1Exponents.track_lbfgs_two_loop_exponent_in_n", "<=", 1.2),
    value_claim(L, "two-loop: exponent in m", LS + "LSR1Exponents.track_lbfgs_two_loop_exponent_in_m", "<=", 1.1),
    ratio_claim(L, "cached step faster than the QR route (n = 320 000, m = 20)",
                (LS + "LSR1Overhead.time_lsr1_iteration", dict(n=320_000, m=20)),
                (LS + "LSR1Overhead.time_lsr1_iteration_cached", dict(n=320_000, m=20)), ">=", 1.0),
    value_claim(L, "lsr1-tr: 2 passes per step (f, ∇f at x and x+s)", OPT + "OptimizerCounts.track_passes_per_step", "==", 2.0, unit="exact", optimizer="lsr1-tr"),
    value_claim(L, "lbfgs: 2 passes per step", OPT + "OptimizerCounts.track_passes_per_step", "==", 2.0, unit="exact", optimizer="lbfgs"),
    value_claim(L, "lsr1-tr step / SGD step (batch 256)", OPT + "OptimizerRatios.track_time_ratio_to_sgd", "<=", 3.0, budget=True, optimizer="lsr1-tr"),
    # stochastic, sampled, Hessian-free (issue 5)
    value_claim(S, "HF: one CG iteration ≈ one GGN product ≈ 1.5 gradients", FAM + "HessianFreeCG.track_cg_iteration_over_gradient", "<=", 2.0),
    ratio_claim(S, "classical L-BFGS step flat in m (m = 20 vs 2)",
                (FAM + "SampledVsClassical.track_step_over_gradient", dict(m=20, optimizer="lbfgs")),
                (FAM + "SampledVsClassical.track_step_over_gradient", dict(m=2, optimizer="lbfgs")), "<=", 1.5, full=False),
    ratio_claim(S, "sampled L-BFGS adds m products per step: grows with m (m = 20 vs 2)",
                (FAM + "SampledVsClassical.track_step_over_gradient", dict(m=20, optimizer="s-lbfgs")),
                (FAM + "SampledVsClassical.track_step_over_gradient", dict(m=2, optimizer="s-lbfgs")), ">=", 2.0, full=False),
    ratio_claim(S, "sampled L-SR1 grows with m (m = 20 vs 2)",
                (FAM + "SampledVsClassical.track_step_over_gradient", dict(m=20, optimizer="s-lsr1")),
                (FAM + "SampledVsClassical.track_step_over_gradient", dict(m=2, optimizer="s-lsr1")), ">=", 2.0, full=False),
    value_claim(S, "MB-LSR1 objective evaluations per step (trial, Armijo, progress checks)", FAM + "MBLSR1Evaluations.track_evals_per_step", "<=", 4.0, budget=True),
    # Kronecker (issue 6)
    value_claim(K, "TNT only slightly above first order (step / SGD step, batch 256)", OPT + "OptimizerRatios.track_time_ratio_to_sgd", "<=", 1.5, optimizer="tnt"),
    ratio_claim(K, "K-BFGS cheaper per step than K-FAC (no periodic inversions)",
                (OPT + "OptimizerRatios.track_time_ratio_to_sgd", dict(optimizer="kbfgs")),
                (OPT + "OptimizerRatios.track_time_ratio_to_sgd", dict(optimizer="kfac")), "<=", 1.0, full=False),
    value_claim(K, "K-BFGS step / SGD step (autoencoder, batch 256)", OPT + "OptimizerRatios.track_time_ratio_to_sgd", "<=", 3.0, budget=True, optimizer="kbfgs"),
    value_claim(K, "K-BFGS(L) step / SGD step", OPT + "OptimizerRatios.track_time_ratio_to_sgd", "<=", 3.0, budget=True, optimizer="kbfgs-l"),
    value_claim(K, "K-FAC step / SGD step", OPT + "OptimizerRatios.track_time_ratio_to_sgd", "<=", 3.0, budget=True, optimizer="kfac"),
    value_claim(K, "thesis autoencoder 784-1000-…-784, batch 1000, float64: K-BFGS step / SGD step",
                FAM + "KroneckerThesisAutoencoder.track_step_over_sgd", "<=", 4.0, budget=True, optimizer="kbfgs"),
    value_claim(K, "… K-BFGS(L) step / SGD step", FAM + "KroneckerThesisAutoencoder.track_step_over_sgd", "<=", 4.0,
                budget=True, optimizer="kbfgs-l"),
    ratio_claim(K, "… K-BFGS cheaper per step than K-FAC at the thesis settings",
                (FAM + "KroneckerThesisAutoencoder.track_step_over_sgd", dict(optimizer="kbfgs")),
                (FAM + "KroneckerThesisAutoencoder.track_step_over_sgd", dict(optimizer="kfac")), "<=", 1.0, full=False),
] + [
    ratio_claim(K, f"memory comparable to first order: {name}", (FAM + "KroneckerVsMomentum.peakmem_steps", dict(model="autoencoder", optimizer=name)),
                (OPT + "OptimizerStep.peakmem_step", dict(optimizer="sgd")), "<=", 1.1, full=False)
    for name in ("kfac", "kbfgs", "kbfgs-l", "shampoo", "tnt")
] + [
    # SMW (issue 7)
    ratio_claim(M, "SMW-GN: forming D is O(m_L² N₂² Σ mₗ), step grows with N₂ (30 vs 5)",
                (FAM + "SMWScaling.time_smw_gn_step", dict(curvature_batch=30)), (FAM + "SMWScaling.time_smw_gn_step", dict(curvature_batch=5)), ">=", 2.0),
    ratio_claim(M, "SMW-NG forms only an N₂ × N₂ matrix: step flat in N₂ (30 vs 5)",
                (FAM + "SMWScaling.time_smw_ng_step", dict(curvature_batch=30)), (FAM + "SMWScaling.time_smw_ng_step", dict(curvature_batch=5)), "<=", 1.5),
    # speed where users feel it (issue 21): ratios measured side by side in one process
    value_claim(SP, "K-FAC (T₁ = 10, T₂ = 100) step / SGD-m step, ResNet-20, batch 128, float32",
                "bench_kfac.KFACvsMomentum.track_step_over_sgdm", "<=", 1.35, model="resnet20"),
    value_claim(SP, "… digits LeNet", "bench_kfac.KFACvsMomentum.track_step_over_sgdm", "<=", 2.0, model="lenet-digits"),
    value_claim(SP, "… K-FAC's floor (passes + GEMMs, in SGD-m steps), ResNet-20", "bench_kfac.KFACvsMomentum.track_floor",
                "<=", 1.35, model="resnet20"),
] + [
    value_claim(SP, f"{label} (T = 20) step / SGD-m step, {mname}, float32", "bench_kbfgs.KBFGSStepOverMomentum.track_step_over_momentum",
                "<=", target, model=model, optimizer=opt, dtype="float32")
    for opt, label in (("kbfgs", "K-BFGS"), ("kbfgs-l", "K-BFGS(L)"))
    for model, mname, target in (("resnet20", "ResNet-20", 1.35), ("lenet-digits", "digits LeNet", 2.0))
] + [
    value_claim(SP, "K-BFGS (T = 20) no dearer than K-FAC (T₁ = 10, T₂ = 100) on ResNet-20 (thesis §3.7.2), side by side",
                "bench_kbfgs.KBFGSOverKFAC.track_kbfgs_over_kfac", "<=", 1.0),
    value_claim(SP, "TNT (T₁ = 10, T₂ = 100) step / SGD-m step, ResNet-20", "bench_smw_tnt.TNTOverMomentumCNN.track_tnt_step_over_momentum",
                "<=", 1.35, model="resnet20"),
    value_claim(SP, "… digits LeNet", "bench_smw_tnt.TNTOverMomentumCNN.track_tnt_step_over_momentum", "<=", 2.0, model="lenet-digits"),
    value_claim(SP, "TNT measured / floor, MNIST autoencoder, T₁ = T₂ = 1", "bench_smw_tnt.TNTFloorAutoencoder.track_tnt_over_floor",
                "<=", 1.1, inv_freq=1),
    value_claim(SP, "TNT measured / floor, MNIST autoencoder, T₁ = 1, T₂ = 20 (thesis)", "bench_smw_tnt.TNTFloorAutoencoder.track_tnt_over_floor",
                "<=", 1.1, inv_freq=20),
] + [
    value_claim(SP, f"{label} measured / floor, MNIST autoencoder, {when}", "bench_smw_tnt.KroneckerFloorAutoencoder.track_step_over_floor",
                "<=", 1.1, optimizer=opt, inv_freq=t2)
    for opt, label, t2, when in (("kbfgs", "K-BFGS", 1, "T = 1"), ("kbfgs-l", "K-BFGS(L)", 1, "T = 1"),
                                 ("kfac", "K-FAC", 20, "T₁ = 1, T₂ = 20 (thesis)"), ("kfac", "K-FAC", 1, "T₁ = T₂ = 1"),
                                 ("shampoo", "Shampoo", 20, "T₁ = 1, T₂ = 20 (thesis)"), ("shampoo", "Shampoo", 1, "T₁ = T₂ = 1"))
] + [
    # the same steps without their inverse / root recomputation (LAPACK potrf + potri, syevd), over the floor without it
    value_claim(SP, f"… {label} without its {what}, T₁ = T₂ = 1", bench, "<=", 1.1, inv_freq=1, **kw)
    for label, what, bench, kw in (
        ("TNT", "Cholesky inverses", "bench_smw_tnt.TNTFloorAutoencoder.track_rest_over_floor", {}),
        ("K-FAC", "Cholesky inverses", "bench_smw_tnt.KroneckerRestAutoencoder.track_rest_over_floor", {"optimizer": "kfac"}),
        ("Shampoo", "eigh roots", "bench_smw_tnt.KroneckerRestAutoencoder.track_rest_over_floor", {"optimizer": "shampoo"}))
] + [
    value_claim(SP, "SMW-NG-BD measured / floor, 784-500-10", "bench_smw_tnt.SMWBlockDiagonal.track_bd_over_floor", "<=", 1.1),
    value_claim(SP, "ResNet-20 forward+backward / torch (batch 128, same threads)", "bench_speed_ratios.CNNTorchRatios.track_forward_backward_ratio",
                "<=", 1.5, model="resnet20"),
    value_claim(SP, "LeNet-5 forward+backward / torch", "bench_speed_ratios.CNNTorchRatios.track_forward_backward_ratio",
                "<=", 1.2, model="lenet5-mnist"),
    value_claim(SP, "qnref Shampoo / pytorch_optimizer.Shampoo per step (autoencoder; needs pytorch_optimizer)",
                "bench_speed_ratios.ShampooPeerRatio.track_step_ratio", "<=", 1.0),
    value_claim(SP, "qnref L-BFGS / torch.optim.LBFGS per step (autoencoder, same evaluations)",
                "bench_speed_ratios.LBFGSPeerRatio.track_step_ratio", "<=", 1.1),
] + [
    value_claim(SP, f"peak memory of a {name} step / SGD-m step, ResNet-20", "bench_speed_ratios.KroneckerPeakMemory.track_peak_ratio_to_momentum",
                "<=", 1.3, optimizer=name)
    for name in ("kfac", "kbfgs", "shampoo", "tnt")
] + [
    # the benchmark process (hygiene)
    value_claim(P, "BLAS threads pinned per process", "bench_process.BenchmarkProcess.track_blas_threads", "==", 2, unit="exact"),
    value_claim(P, "qnref chunk threads pinned per process", "bench_process.BenchmarkProcess.track_qnref_chunk_threads", "==", 2, unit="exact"),
]

SECTIONS = {E: "Engine (issue 2)", C: "CNNs (issue 3)", L: "L-SR1 and L-BFGS (issue 4)",
            S: "Stochastic, sampled, Hessian-free (issue 5)", K: "Kronecker methods (issue 6)", M: "SMW (issue 7)",
            SP: "Speed where users feel it (issue 21)", P: "Benchmark process"}


# -- record tables (no target: every optimizer's measured costs) ---------------------------------
def algebra_formula(name: str) -> str:
    """The optimizer's own ``cost_formula`` (one source: the class that counts its flops); '?' if unknown."""
    try:
        from qnref.optim import load_all

        cls = load_all().get(name)
    except Exception:  # the results may name an optimizer this tree no longer has
        cls = None
    return getattr(cls, "cost_formula", None) or "?"


def _per_optimizer(m, key):
    return {p.get("optimizer"): (v, s) for p, v, s in m.entries(key)}


def _cell(vs, unit):
    if vs is None or vs[0] is None or (isinstance(vs[0], float) and math.isnan(vs[0])):
        return "—"
    v, s = vs
    txt = _fmt(v, unit)
    if unit == "ms" and samples_of(s) < MIN_SAMPLES:
        txt += " (quick)"
    return txt


def optimizers_table(m):
    """Every registered optimizer: passes per example drawn, step / SGD step, step time, peak memory."""
    cols = [(OPT + "OptimizerCounts.track_passes_per_step", "passes per example drawn", "ratio"),
            (OPT + "OptimizerRatios.track_time_ratio_to_sgd", "step / SGD step", "ratio"),
            (OPT + "OptimizerStep.time_step", "step time", "ms"),
            (OPT + "OptimizerStep.peakmem_step", "process peak memory", "MB")]
    data = [_per_optimizer(m, k) for k, _, _ in cols]
    names = sorted(set().union(*[d.keys() for d in data]) - {None})
    lines = ["| optimizer | " + " | ".join(h for _, h, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for n in names:
        lines.append(f"| `{n}` | " + " | ".join(_cell(d.get(n), u) for d, (_, _, u) in zip(data, cols)) + " |")
    return "\n".join(lines) if names else "(no results for bench_optimizers)"


def algebra_table(m):
    """Flops of each optimizer's own algebra per step (bench_algebra), with its formula."""
    per = _per_optimizer(m, "bench_algebra.AlgebraFlops.track_algebra_flops")
    pern = _per_optimizer(m, "bench_algebra.AlgebraFlopsPerN.track_algebra_flops_per_n")
    names = sorted(set(per) | set(pern) - {None})
    lines = ["| optimizer | formula (multiplications per step) | per step | per n |", "|---|---|---|---|"]
    for n in names:
        lines.append(f"| `{n}` | {algebra_formula(n)} | {_cell(per.get(n), 'int')} | "
                     f"{'—' if pern.get(n) is None else f'{pern[n][0]:.1f}'} |")
    return "\n".join(lines) if names else "(no results for bench_algebra)"


RECORDS = {"optimizers": optimizers_table, "algebra": algebra_table}


# -- choosing the results -----------------------------------------------------------------------
def _machine(results_dir, machine):
    if machine:
        return machine
    ms = [d for d in sorted(os.listdir(results_dir)) if os.path.isdir(os.path.join(results_dir, d))]
    if not ms:
        raise SystemExit(f"no results under {results_dir}: run asv first (docs/benchmarks.md)")
    try:
        from asv.machine import Machine

        mine = Machine.get_unique_machine_name()
        if mine in ms:
            return mine
    except Exception:
        pass
    return ms[0]


def _resolve(commit):
    if commit is None or re.fullmatch(r"[0-9a-f]{7,40}", commit):
        return commit
    r = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"unknown commit {commit!r}")
    return r.stdout.strip()


def select(results_dir=RESULTS, machine=None, commit=None, env=None):
    """Result files of one machine, commit and environment: the newest file unless ``commit``
    (a hash prefix or a git revision) and/or ``env`` (a substring of the env name) narrow it."""
    machine = _machine(results_dir, machine)
    mdir = os.path.join(results_dir, machine)
    commit = _resolve(commit)
    files = []
    for f in os.listdir(mdir):
        if not f.endswith(".json") or f == "machine.json":
            continue
        with open(os.path.join(mdir, f)) as fh:
            d = json.load(fh)
        if commit and not d.get("commit_hash", "").startswith(commit[:8]):
            continue
        if env and env not in d.get("env_name", ""):
            continue
        files.append((d.get("date") or 0, max([v[3] for v in d.get("results", {}).values() if len(v) > 3 and v[3]] or [0]),
                      d["commit_hash"], d.get("env_name", ""), os.path.join(mdir, f)))
    if not files:
        raise SystemExit(f"no results in {mdir} for commit={commit} env={env}")
    files.sort(reverse=True)
    _, _, chash, ename, path = max(files, key=lambda t: t[1])  # the most recently run file
    return machine, chash, ename, [path]


# -- output ---------------------------------------------------------------------------------------
def evaluate(m):
    return [(c, c.evaluate(m)) for c in CLAIMS]


def table(rows, section=None):
    lines = ["| claim | benchmark | measured | target | run | result |", "|---|---|---|---|---|---|"]
    for c, o in rows:
        if section and c.section != section:
            continue
        verdict = {PASS: "pass", FAIL: "**FAIL**"}.get(o.verdict, o.verdict)
        lines.append(f"| {c.text} | {c.benchmark} | {o.measured} | {c.target} | {'full' if c.full else 'quick'} | {verdict} |")
    return "\n".join(lines)


def source_line(machine, chash, ename, paths, m):
    import datetime

    def utc(ms):
        return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    starts = [t for r in m.results[:1] for t in r.started_at.values() if t]
    ran = f"run {utc(min(starts))} – {utc(max(starts))}" if starts else "run time unknown"
    when = f"commit of {utc(max((r.date or 0) for r in m.results))}, {ran}"
    full = quick = 0
    for r in m.results[:1]:
        for key in r.get_all_result_keys():
            if ".time_" not in key:
                continue
            for s in r.get_result_stats(key, r.get_result_params(key)):
                if s is not None:
                    full, quick = (full + 1, quick) if samples_of(s) >= MIN_SAMPLES else (full, quick + 1)
    line = (f"From `python -m asv_bench.claims`: machine `{machine}`, commit `{chash[:8]}`, environment "
            f"`{ename}`, {when} (`{os.path.relpath(paths[0], ROOT)}`); time results with "
            f"full statistics: {full}, one-sample (`--quick`): {quick}.")
    if len(m.results) > 1:  # merged files: say where every other row comes from
        parts = []
        for r in m.results[1:]:
            st = [t for t in r.started_at.values() if t]
            parts.append(f"commit `{r.commit_hash[:8]}` ({len(r.get_all_result_keys())} benchmarks"
                         + (f", run {utc(min(st))} – {utc(max(st))}" if st else "") + ")")
        line += (f" Merged with older results for the benchmarks the first file lacks: {'; '.join(parts)}"
                 f" (a benchmark in several files is read from the newest).")
    return line


MARK = re.compile(r"(<!-- claims:(\w+) -->\n)(.*?)(<!-- /claims -->)", re.S)


def write_docs(rows, src, path=DOCS, m=None):
    with open(path) as f:
        text = f.read()
    seen = []

    def repl(mo):
        sec = mo.group(2)
        seen.append(sec)
        if sec == "source":
            body = src + "\n"
        elif sec in RECORDS:
            body = (RECORDS[sec](m) if m is not None else "") + "\n"
        else:
            body = table(rows, sec) + "\n"
        return mo.group(1) + body + mo.group(4)

    new = MARK.sub(repl, text)
    with open(path, "w") as f:
        f.write(new)
    return seen


def summary(rows):
    n = {}
    for _, o in rows:
        n[o.verdict] = n.get(o.verdict, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(n.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m asv_bench.claims", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results-dir", default=RESULTS, help="asv's results_dir (default asv_bench/results)")
    ap.add_argument("--machine", help="machine name (default: this machine's, else the first)")
    ap.add_argument("--commit", help="commit hash or git revision (default: the most recently run results)")
    ap.add_argument("--env", help="substring of the environment name (e.g. virtualenv, existing)")
    ap.add_argument("--file", action="append", help="read these result files instead (repeatable)")
    ap.add_argument("--write-docs", action="store_true", help="rewrite docs/benchmarks.md's claims tables")
    ap.add_argument("--docs", default=DOCS, help=argparse.SUPPRESS)
    ap.add_argument("--strict", action="store_true", help="exit 1 if any claim fails")
    a = ap.parse_args(argv)
    if a.file:
        with open(a.file[0]) as f:
            d = json.load(f)
        machine, chash, ename, paths = d.get("params", {}).get("machine", "?"), d["commit_hash"], d.get("env_name", ""), a.file
        bjson = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(a.file[0]))), "benchmarks.json")
    else:
        machine, chash, ename, paths = select(a.results_dir, a.machine, a.commit, a.env)
        bjson = os.path.join(a.results_dir, "benchmarks.json")
    m = Measured.load(paths, bjson)
    rows = evaluate(m)
    src = source_line(machine, chash, ename, paths, m)
    print(src)
    print()
    for sec, title in SECTIONS.items():
        print(f"## {title}")
        print(table(rows, sec))
        print()
    for sec, fn in RECORDS.items():
        print(f"## record: {sec}")
        print(fn(m))
        print()
    print(summary(rows))
    if a.write_docs:
        seen = write_docs(rows, src, a.docs, m)
        print(f"wrote {len(seen)} marked blocks of {os.path.relpath(a.docs, ROOT)}: {', '.join(seen)}")
    if a.strict and any(o.verdict == FAIL for _, o in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
