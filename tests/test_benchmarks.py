"""The benchmark suite cannot rot: every registered optimizer has a benchmark, and the asv
benchmark modules import and their set-ups run."""
import importlib
import os
import sys

import pytest

from qnref.optim import load_all

ROOT = os.path.join(os.path.dirname(__file__), "..", "asv_bench")


@pytest.fixture(scope="module")
def benchmarks():
    sys.path.insert(0, ROOT)
    try:
        yield importlib.import_module("benchmarks.bench_optimizers")
    finally:
        sys.path.remove(ROOT)


def test_every_registered_optimizer_has_a_benchmark(benchmarks):
    registered = set(load_all())
    for cls in (benchmarks.OptimizerStep, benchmarks.OptimizerCounts, benchmarks.OptimizerRatios):
        assert set(cls.params[0]) == registered


def test_optimizer_benchmarks_run_one_step_each(benchmarks):
    for name in sorted(load_all()):
        b = benchmarks.OptimizerStep()
        b.setup(name)
        b.time_step(name)
        passes = benchmarks.OptimizerCounts().track_passes_per_step(name)
        assert passes > 0


def test_asv_configuration_is_valid():
    import json

    conf = json.load(open(os.path.join(ROOT, "asv.conf.json")))
    assert conf["environment_type"] == "existing" and conf["repo"] == ".."


def test_asv_check_discovers_every_benchmark():
    """`asv check` imports every benchmark module and validates names/params (CI keeps them alive)."""
    import shutil
    import subprocess

    asv = shutil.which("asv")
    assert asv is not None, "asv is a test dependency (pip install -e '.[test]')"
    r = subprocess.run([asv, "check", "--python=same"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "No problems found" in r.stdout, r.stdout + r.stderr


def test_quick_subset_of_family_benchmarks_runs():
    sys.path.insert(0, ROOT)
    try:
        fam = importlib.import_module("benchmarks.bench_families")
        eng = importlib.import_module("benchmarks.bench_engine")
        scal = importlib.import_module("benchmarks.bench_lsr1_scaling")
    finally:
        sys.path.remove(ROOT)
    assert fam.MBLSR1Evaluations().track_evals_per_step() >= 1
    counts = eng.ProductPasses()
    counts.setup()
    assert counts.track_passes_grad() == 1.0 and counts.track_passes_hvp() == 2.0 and counts.track_passes_ggn() == 1.5
    b = scal.LSR1Overhead()
    b.setup(20_000, 5)
    b.time_lsr1_iteration(20_000, 5)
    assert b.track_lsr1_matvec_flops(20_000, 5) == (4 * 5 + 1) * 20_000 + 25
