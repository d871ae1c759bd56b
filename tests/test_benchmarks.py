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
