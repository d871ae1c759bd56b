"""Every numba kernel has an array-API twin, and both compute the same values on the CPU.

The twins (named in ``KERNEL_TWINS`` of :mod:`qnref.nn._numba_kernels` and :mod:`qnref.nn._numba_fast`)
are the code the layers run on CuPy (and on NumPy without numba): their math is written once with
the array namespace of their inputs. Here each kernel's result is compared with its twin run by
NumPy on random inputs (several shapes, strides, paddings, overlapping and disjoint windows);
``tests/gpu/test_kernel_twins_gpu.py`` runs the same cases with the twins on CuPy.

:func:`run_case` is the one definition of each comparison: ``run_case(kernel, case, xp, to_dev,
to_host)`` returns (numba result, twin result) as host arrays.
"""
from __future__ import annotations

import importlib
import math

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from qnref.nn.conv import out_size  # noqa: E402

MODULES = ("qnref.nn._numba_kernels", "qnref.nn._numba_fast")

#: (kh, kw, sh, sw, ph, pw) and input (N, C, H, W) of the window cases
WINDOW_CASES = [
    ((3, 3, 1, 1, 1, 1), (2, 3, 6, 5)),
    ((3, 3, 2, 2, 1, 1), (3, 2, 7, 7)),
    ((2, 2, 2, 2, 0, 0), (2, 2, 6, 8)),
    ((3, 2, 1, 2, 1, 0), (1, 3, 5, 6)),
    # "same" stride-1 shapes (the im2col plane runs), a kernel wider than the image, no padding,
    # same rows but not columns, a strided 1×1 (ResNet's shortcut), stride only along the width
    ((5, 5, 1, 1, 2, 2), (2, 2, 7, 9)),
    ((5, 5, 1, 1, 2, 2), (1, 2, 3, 3)),
    ((3, 3, 1, 1, 0, 0), (2, 2, 5, 7)),
    ((3, 3, 1, 1, 1, 0), (2, 2, 6, 6)),
    ((1, 1, 2, 2, 0, 0), (2, 3, 5, 5)),
    ((3, 3, 1, 2, 1, 1), (1, 2, 4, 9)),
]
BN_CASES = [(4, 3, 5, 5), (2, 5, 3, 1)]


def kernels(module: str) -> dict:
    """The public numba kernels (dispatchers) of a module."""
    from numba.core.dispatcher import Dispatcher

    mod = importlib.import_module(module)
    return {n: f for n, f in vars(mod).items() if isinstance(f, Dispatcher) and not n.startswith("_")}


def twin(module: str, name: str):
    path, func = importlib.import_module(module).KERNEL_TWINS[name].split(":")
    return getattr(importlib.import_module(path), func)


def _rng(seed: int = 0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------- one comparison per kernel
def _im2col_t(case, xp, to_dev, to_host):
    (kh, kw, sh, sw, ph, pw), shape = WINDOW_CASES[case]
    from qnref.nn import _numba_kernels as k

    x = _rng(case).standard_normal(shape)
    n, c, h, w = shape
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    ref = k.im2col_t(x, np.empty((c, kh, kw, n, ho, wo)), sh, sw, ph, pw).reshape(c * kh * kw, n * ho * wo)
    return ref, to_host(twin(MODULES[0], "im2col_t")(to_dev(x), kh, kw, sh, sw, ph, pw))


def _col2im_t(case, xp, to_dev, to_host):
    (kh, kw, sh, sw, ph, pw), shape = WINDOW_CASES[case]
    from qnref.nn import _numba_kernels as k

    n, c, h, w = shape
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    g = _rng(case).standard_normal((c * kh * kw, n * ho * wo))
    ref = k.col2im_t(g.reshape(c, kh, kw, n, ho, wo), np.zeros(shape), sh, sw, ph, pw)
    return ref, to_host(twin(MODULES[0], "col2im_t")(to_dev(g), shape, kh, kw, sh, sw, ph, pw))


def _col2im(case, xp, to_dev, to_host):
    (kh, kw, sh, sw, ph, pw), shape = WINDOW_CASES[case]
    from qnref.nn import _numba_kernels as k

    n, c, h, w = shape
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    g = _rng(case).standard_normal((n, c * kh * kw, ho * wo))
    ref = k.col2im(g.reshape(n, c, kh, kw, ho, wo), np.zeros(shape), sh, sw, ph, pw)
    return ref, to_host(twin(MODULES[0], "col2im")(to_dev(g), shape, kh, kw, sh, sw, ph, pw))


def _index_add(case, xp, to_dev, to_host):
    from qnref.nn import _numba_kernels as k

    r = _rng(case)
    rows, cols, m = 3, 40, 7 + case
    g, idx = r.standard_normal((rows, cols)), r.integers(0, m, (rows, cols))  # repeated indices
    ref = k.index_add(g, idx, np.zeros((rows, m)))
    flat = (idx + m * np.arange(rows)[:, None]).reshape(-1)
    out = twin(MODULES[0], "index_add")(xp.zeros(rows * m), to_dev(flat), to_dev(g.reshape(-1)))
    return ref, to_host(out).reshape(rows, m)


def _bn_forward(case, xp, to_dev, to_host):
    from qnref.nn import _numba_fast as k

    shape = BN_CASES[case % len(BN_CASES)]
    r = _rng(case)
    x = r.standard_normal(shape) * 3 + 1
    c = shape[1]
    gamma, beta = r.standard_normal(c), r.standard_normal(c)
    x3 = x.reshape(shape[0], c, -1)
    xhat, y = np.empty_like(x3), np.empty_like(x3)
    mu, var, inv = np.empty(c), np.empty(c), np.empty(c)
    k.bn_forward(x3, gamma, beta, 1e-5, xhat, y, mu, var, inv, 0, c)
    b = (1, -1, 1, 1)
    out = twin(MODULES[1], "bn_forward")(to_dev(x), to_dev(gamma.reshape(b)), to_dev(beta.reshape(b)), 1e-5, (0, 2, 3))
    y2, xhat2, mu2, var2, inv2 = (to_host(v) for v in out)
    ref = np.concatenate([y.ravel(), xhat.ravel(), mu, var, inv])
    return ref, np.concatenate([y2.ravel(), xhat2.ravel(), mu2.ravel(), var2.ravel(), inv2.ravel()])


def _bn_sums(case, xp, to_dev, to_host):
    from qnref.nn import _numba_fast as k

    shape = BN_CASES[case % len(BN_CASES)]
    r = _rng(case)
    gy, xhat = r.standard_normal(shape), r.standard_normal(shape)
    c = shape[1]
    sg, sgx = np.empty(c), np.empty(c)
    k.bn_sums(gy.reshape(shape[0], c, -1), xhat.reshape(shape[0], c, -1), sg, sgx, 0, c)
    s_g, s_gx = twin(MODULES[1], "bn_sums")(to_dev(gy), to_dev(xhat), (0, 2, 3))
    return np.concatenate([sg, sgx]), np.concatenate([to_host(s_g), to_host(s_gx)])


def _bn_backward(case, xp, to_dev, to_host):
    from qnref.nn import _numba_fast as k

    shape = BN_CASES[case % len(BN_CASES)]
    r = _rng(case)
    gy, xhat, scale = r.standard_normal(shape), r.standard_normal(shape), r.standard_normal(shape[1])
    c = shape[1]
    gx, sg, sgx = np.empty(shape), np.empty(c), np.empty(c)
    k.bn_backward(gy.reshape(shape[0], c, -1), xhat.reshape(shape[0], c, -1), scale, gx.reshape(shape[0], c, -1), sg, sgx, 0, c)
    out = twin(MODULES[1], "bn_backward")(to_dev(gy), to_dev(xhat), to_dev(scale.reshape(1, -1, 1, 1)), (0, 2, 3))
    return np.concatenate([gx.ravel(), sg, sgx]), np.concatenate([to_host(v).ravel() for v in out])


def _maxpool_forward(case, xp, to_dev, to_host):
    from qnref.nn import _numba_fast as k

    (kh, kw, sh, sw, ph, pw), shape = WINDOW_CASES[case]
    n, c, h, w = shape
    x = _rng(case).standard_normal(shape)
    x[0, 0, 1, :2] = x[0, 0, 1, 2]  # ties: the first in row-major order wins in both
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    y, gidx = np.empty((n * c, ho, wo)), np.empty((n * c, ho, wo), np.int64)
    k.maxpool_forward(x.reshape(n * c, h, w), kh, kw, sh, sw, ph, pw, y, gidx, 0, n * c)
    y2, g2 = twin(MODULES[1], "maxpool_forward")(to_dev(x), (kh, kw), (sh, sw), (ph, pw), (ho, wo))
    return np.concatenate([y.ravel(), gidx.ravel()]), np.concatenate([to_host(y2).ravel(), to_host(g2).ravel()])


def _maxpool_backward(case, xp, to_dev, to_host):
    from qnref.nn import _numba_fast as k

    (kh, kw, sh, sw, ph, pw), shape = WINDOW_CASES[case]
    n, c, h, w = shape
    x = _rng(case).standard_normal(shape)
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    y, gidx = np.empty((n * c, ho, wo)), np.empty((n * c, ho, wo), np.int64)
    k.maxpool_forward(x.reshape(n * c, h, w), kh, kw, sh, sw, ph, pw, y, gidx, 0, n * c)
    g = _rng(case + 1).standard_normal((n * c, ho * wo))
    out = np.empty((n * c, h * w))
    assert k.maxpool_backward(g, gidx.reshape(n * c, -1), out, 0, n * c) == 0
    disjoint = sh >= kh and sw >= kw
    got = twin(MODULES[1], "maxpool_backward")(to_dev(g.reshape(-1)), to_dev(gidx.reshape(-1)), n * c * h * w, disjoint)
    return out.ravel(), to_host(got)


def _relu_forward(case, xp, to_dev, to_host):
    from qnref.nn import _numba_fast as k

    x = _rng(case).standard_normal(50 + 7 * case)
    ref = k.relu_forward(x, np.empty_like(x), 0, x.size)
    return ref, to_host(twin(MODULES[1], "relu_forward")(to_dev(x)))


def _relu_mask_mul(case, xp, to_dev, to_host):
    from qnref.nn import _numba_fast as k

    x, g = _rng(case).standard_normal((2, 50 + 7 * case))
    ref = k.relu_mask_mul(x, g, np.empty_like(g), 0, x.size)
    return ref, to_host(twin(MODULES[1], "relu_mask_mul")(to_dev(x), to_dev(g)))


#: kernel name → comparison; must cover every kernel of :data:`MODULES`
CASES = {
    "im2col_t": _im2col_t, "col2im_t": _col2im_t, "col2im": _col2im, "index_add": _index_add,
    "bn_forward": _bn_forward, "bn_sums": _bn_sums, "bn_backward": _bn_backward,
    "maxpool_forward": _maxpool_forward, "maxpool_backward": _maxpool_backward,
    "relu_forward": _relu_forward, "relu_mask_mul": _relu_mask_mul,
}
N_CASES = len(WINDOW_CASES)


def run_case(name: str, case: int, xp=np, to_dev=np.asarray, to_host=np.asarray):
    """(numba kernel result, twin result on ``xp``) as host arrays for case ``case`` of kernel ``name``."""
    return CASES[name](case, xp, to_dev, to_host)


def assert_close(ref, got, name: str) -> None:
    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    assert ref.shape == got.shape, f"{name}: shape {got.shape} != {ref.shape}"
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    err = float(np.abs(ref - got).max(initial=0.0)) / scale
    assert err <= 1e-12 and math.isfinite(err), f"{name}: twin differs from the numba kernel by {err:.3e} (relative)"


# ---------------------------------------------------------------------- tests
def test_every_numba_kernel_has_a_twin_and_a_case():
    for module in MODULES:
        ks = kernels(module)
        assert ks, f"no kernels found in {module}"
        twins = importlib.import_module(module).KERNEL_TWINS
        assert set(ks) == set(twins), f"{module}: kernels without twin {sorted(set(ks) - set(twins))}, twins without kernel {sorted(set(twins) - set(ks))}"
        for name in ks:
            assert callable(twin(module, name)), name
            assert twins[name].split(":")[0] in ("qnref.nn.conv", "qnref.nn.pool", "qnref.nn.norm", "qnref.nn.activations")
            assert name in CASES, f"{module}.{name} has no comparison case in this test"


def test_twins_do_not_use_numba():
    """A twin is plain array-API code: its module must not import numba (CuPy runs it)."""
    import inspect

    for module in MODULES:
        for name in kernels(module):
            src = inspect.getsource(inspect.getmodule(twin(module, name)))
            assert "import numba" not in src and "from numba" not in src


@pytest.mark.parametrize("case", range(N_CASES))
@pytest.mark.parametrize("name", sorted(CASES))
def test_twin_matches_numba_kernel(name, case):
    ref, got = run_case(name, case)
    assert_close(ref, got, f"{name}[{case}]")


def test_comparison_can_fail():
    """A twin off by one ulp-scale perturbation of 1e-9 is caught."""
    ref, got = run_case("bn_forward", 0)
    with pytest.raises(AssertionError, match="twin differs"):
        assert_close(ref, got * (1 + 1e-9), "bn_forward")
