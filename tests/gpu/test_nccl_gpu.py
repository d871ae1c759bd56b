"""The NCCL communicator under two processes (needs 2 GPUs, mpiexec and mpi4py; otherwise a clear skip)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
HERE = os.path.dirname(os.path.abspath(__file__))


def _n_gpus() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


def test_nccl_allreduce_and_allgather_two_processes():
    if _n_gpus() < 2:
        pytest.skip(f"the NCCL test needs 2 GPUs, this machine has {_n_gpus()}")
    mpiexec = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip("the NCCL test needs mpiexec (pip install mpi4py mpich)")
    pytest.importorskip("mpi4py")
    try:
        from cupy.cuda import nccl  # noqa: F401
    except Exception as e:
        pytest.skip(f"CuPy has no NCCL here ({e}); pip install nvidia-nccl-cu13")
    p = subprocess.run([mpiexec, "-n", "2", sys.executable, os.path.join(HERE, "nccl_script.py")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    res = sorted((json.loads(l[7:]) for l in p.stdout.splitlines() if l.startswith("RESULT ")), key=lambda d: d["rank"])
    assert [d["rank"] for d in res] == [0, 1]
    assert {d["device"] for d in res} == {0, 1}, "each rank must use its own GPU"
    for d in res:
        assert d["on_device"]
        np.testing.assert_array_equal(d["sum"], np.arange(6.0) * 3)
        assert d["gather"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
