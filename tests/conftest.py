"""Shared fixtures; tests marked ``gpu`` skip cleanly when CuPy or a CUDA device is missing."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np
import pytest

from qnref import backend


def pytest_collection_modifyitems(config, items):
    if backend.gpu_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA device (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
