"""Backend selection, dtype policy, RNG, DLPack and input validation of the engine."""
import numpy as np
import pytest
import scipy.sparse.linalg as spla

from qnref import backend
from qnref.curvature.objective import NonFiniteError, Objective
from qnref.curvature.operators import as_operator
from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.params import ParamLayout


class FakeDeviceArray:
    """Stands in for a cupy.ndarray (only its module name matters for the dispatch check)."""

    __module__ = "cupy._core.core"


def model():
    return Sequential([Dense(4), Tanh(), Dense(3)], input_shape=(5,))


def test_namespace_numpy_and_scalars():
    a = np.zeros(3)
    assert backend.namespace(a, 1.0, None) is np


def test_mixed_backends_raise_clear_error():
    with pytest.raises(backend.BackendError, match="mixed backends"):
        backend.namespace(np.zeros(2), FakeDeviceArray())
    with pytest.raises(backend.BackendError, match="expected a numpy or cupy array"):
        backend.namespace([1, 2])


def test_gpu_request_without_gpu_is_clear():
    if backend.gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(backend.BackendError, match="no usable CUDA device"):
        backend.xp_for_device("gpu")
    with pytest.raises(ValueError, match="'cpu' or 'gpu'"):
        backend.xp_for_device("tpu")


@pytest.mark.parametrize("dt", ["float16", "int32", "complex128"])
def test_unsupported_dtypes(dt):
    with pytest.raises(backend.BackendError, match="unsupported dtype"):
        backend.check_dtype(dt)


def test_rng_is_seeded_and_restorable():
    r1, r2 = backend.default_rng(7), backend.default_rng(7)
    np.testing.assert_array_equal(r1.standard_normal(4), r2.standard_normal(4))
    st = backend.rng_state(r1)
    a = r1.standard_normal(3)
    backend.set_rng_state(r1, st)
    np.testing.assert_array_equal(a, r1.standard_normal(3))


def test_dlpack_roundtrip_is_zero_copy():
    a = np.arange(6.0)
    b = backend.from_dlpack(a)
    b[0] = 42
    assert a[0] == 42


def test_param_views_are_zero_copy_and_init_schemes():
    m = model()
    th = m.init(0, scheme="he")
    views = m.layout.views(th)
    assert views[0].shape == (4, 6) and views[1].shape == (3, 5)
    views[0][1, -1] = 9.0
    assert th[m.layout.blocks[0].offset + 1 * 6 + 5] == 9.0
    th2 = m.init(0, scheme="glorot")
    w = m.layout.views(th2)[0]
    assert np.all(w[:, -1] == 0) and np.abs(w[:, :-1]).max() <= np.sqrt(6 / 9)
    np.testing.assert_array_equal(m.init(3), m.init(3))
    sp = m.layout.views(m.init(1, scheme="sparse"))[0]
    assert (sp[:, :-1] != 0).sum(axis=1).tolist() == [5, 5, 5, 5]
    assert m.init(0, dtype="float32").dtype == np.float32
    with pytest.raises(ValueError, match="unknown init scheme"):
        m.init(0, scheme="orthogonal")


def test_objective_rejects_bad_inputs():
    m = model()
    X = np.ones((4, 5))
    y = np.array([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"input must have shape \(N, 5\)"):
        Objective(m, "softmax_ce", np.ones((4, 6)), y)
    bad = X.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match=r"input data X contains 1 non-finite value.*\(2, 3\)"):
        Objective(m, "softmax_ce", bad, y)
    with pytest.raises(backend.BackendError, match="unsupported dtype"):
        Objective(m, "softmax_ce", X.astype(np.float16), y)
    with pytest.raises(ValueError, match="4 examples but y has 3"):
        Objective(m, "softmax_ce", X, y[:3])
    with pytest.raises(ValueError, match="l2 must be"):
        Objective(m, "softmax_ce", X, y, l2=-1)
    obj = Objective(m, "softmax_ce", X, y)
    th = m.init(0)
    with pytest.raises(ValueError, match="has length 5, the model has 39"):
        obj.value(th[:5])
    with pytest.raises(ValueError, match="flat 1-D"):
        obj.value(th.reshape(3, 13))
    with pytest.raises(TypeError, match="float32 but the data are float64"):
        obj.value(th.astype(np.float32))
    nan_th = th.copy()
    nan_th[0] = np.inf
    with pytest.raises(NonFiniteError, match="theta contains NaN or Inf"):
        obj.value(nan_th)
    with pytest.raises(ValueError, match="v has length"):
        obj.hvp(th, th[:-1])
    with pytest.raises(ValueError, match="output shape"):
        obj.vjp(th, np.ones((4, 2)))


def test_layout_check_errors():
    lay = model().layout
    assert isinstance(lay, ParamLayout)
    with pytest.raises(KeyError, match="no parameter block"):
        lay.index("nope")


def test_scipy_operator_matches_products(rng):
    m = model()
    X = rng.standard_normal((6, 5))
    y = rng.integers(0, 3, 6)
    obj = Objective(m, "softmax_ce", X, y, l2=0.1)
    th = m.init(2)
    p = obj.at(th)
    v = rng.standard_normal(th.size)
    for kind, prod in [("hessian", p.hvp), ("ggn", p.ggn_vp), ("fisher", lambda u: p.fisher_vp(u, "empirical"))]:
        op = as_operator(p, kind)
        np.testing.assert_allclose(op @ v, prod(v), rtol=1e-14)
    # CG on (G) solves to tolerance through scipy
    op = as_operator(p, "ggn")
    sol, info = spla.cg(op, v, rtol=1e-12, maxiter=500)
    assert info == 0
    np.testing.assert_allclose(p.ggn_vp(sol), v, rtol=1e-8, atol=1e-9)
    with pytest.raises(ValueError, match="unknown operator kind"):
        as_operator(p, "hess")
