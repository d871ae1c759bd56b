"""Fixtures shared by the layer tests."""
import pytest

import qnref.nn.conv as conv_mod


@pytest.fixture(params=["auto", "xp"])
def kernels(request):
    """Run a test with the numba CPU kernels ("auto") and with the pure NumPy path ("xp")."""
    old = conv_mod.KERNELS
    conv_mod.KERNELS = request.param
    yield request.param
    conv_mod.KERNELS = old
