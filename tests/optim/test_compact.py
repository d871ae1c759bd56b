"""Dense quasi-Newton updates (qnref.optim.compact): BFGS/SR1 direct and inverse updates agree
with each other and with the secant equations."""
from __future__ import annotations

import numpy as np
import pytest

from qnref.optim.compact import bfgs_update, sr1_inverse_update, sr1_update
from qnref.optim.operators import bfgs_inverse_update


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfgs_direct_and_inverse_updates_are_inverses(seed):
    rng = np.random.default_rng(seed)
    n = 8
    A = rng.standard_normal((n, n))
    A = A @ A.T / n + np.eye(n)
    B, H = np.eye(n), np.eye(n)
    for _ in range(5):
        s = rng.standard_normal(n)
        y = A @ s
        B, H = bfgs_update(B, s, y), bfgs_inverse_update(H, s, y)
        assert np.linalg.norm(B @ s - y) <= 1e-12 * np.linalg.norm(y)
        assert np.linalg.norm(H @ y - s) <= 1e-12 * np.linalg.norm(s)
    assert np.linalg.norm(B @ H - np.eye(n)) < 1e-10


@pytest.mark.parametrize("seed", [0, 1])
def test_sr1_direct_and_inverse_updates_are_inverses(seed):
    rng = np.random.default_rng(seed)
    n = 6
    A = rng.standard_normal((n, n))
    A = A + A.T
    B, H = 2.0 * np.eye(n), 0.5 * np.eye(n)
    for _ in range(4):
        s = rng.standard_normal(n)
        y = A @ s
        B, sk = sr1_update(B, s, y)
        H, skh = sr1_inverse_update(H, s, y)
        assert not sk and not skh
        assert np.linalg.norm(B @ s - y) <= 1e-10 * np.linalg.norm(y)
    assert np.linalg.norm(B @ H - np.eye(n)) < 1e-8
