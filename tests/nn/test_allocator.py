"""glibc malloc tuning (qnref/nn/allocator.py): freed activation buffers are reused, not faulted in again."""
import os
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qnref.curvature.objective import Objective
from qnref.nn import allocator
from qnref.nn.zoo import build_model

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# 20 live 4 MiB arrays freed together: glibc's default trims the heap top afterwards, so every
# round faults the pages in again (≈ 10 000 faults measured); with the thresholds fixed, none.
PATTERN = textwrap.dedent(
    """
    import resource, numpy as np
    from qnref.nn.allocator import tune_malloc
    tuned = tune_malloc()
    def once():
        arrs = [np.ones(1 << 20, np.float32) for _ in range(20)]
        del arrs
    once(); once()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    once()
    print(int(tuned), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    """
)


def _faults(setting: str) -> tuple[int, int]:
    env = dict(os.environ, QNREF_MALLOC_TUNING=setting)
    out = subprocess.run([sys.executable, "-c", PATTERN], env=env, capture_output=True, text=True, check=True).stdout
    tuned, faults = out.split()
    return int(tuned), int(faults)


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning is glibc-only (a documented no-op elsewhere)")
def test_tuning_removes_refaulting_of_freed_buffers():
    tuned, faults = _faults("1")
    untuned, faults_default = _faults("0")
    assert (tuned, untuned) == (1, 0)
    assert faults_default > 5000  # 20 × 4 MiB = 20 480 pages come back from the kernel
    assert faults < 200


def test_opt_out_and_idempotence(monkeypatch):
    allocator.tune_malloc.cache_clear()
    monkeypatch.setenv("QNREF_MALLOC_TUNING", "off")
    assert allocator.tune_malloc() is False
    monkeypatch.setenv("QNREF_MALLOC_TUNING", "1")
    assert allocator.tune_malloc() is False  # decided once per process
    allocator.tune_malloc.cache_clear()
    assert allocator.tune_malloc() is GLIBC


def test_model_forward_applies_it():
    allocator.tune_malloc.cache_clear()
    model = build_model("lenet5-mnist")
    X = np.zeros((2, 1, 28, 28))
    Objective(model, "softmax_ce", X, np.zeros(2, dtype=int)).grad(model.init(0))
    info = allocator.tune_malloc.cache_info()
    assert info.currsize == 1 and info.misses == 1  # the forward pass made the one real call
    assert allocator.tune_malloc() is GLIBC
