"""The array-API twins of the numba kernels, run by CuPy, equal the numba kernels on the CPU."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "nn"))
import test_kernel_twins as tk  # noqa: E402 - the one definition of each comparison

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("case", range(tk.N_CASES))
@pytest.mark.parametrize("name", sorted(tk.CASES))
def test_twin_on_cupy_matches_numba_kernel(name, case):
    import cupy

    from qnref import backend

    ref, got = tk.run_case(name, case, cupy, lambda a: backend.to_device(a, "gpu"), backend.to_numpy)
    tk.assert_close(ref, got, f"{name}[{case}] on CuPy")
