"""The (K, N·L) patch layout of the Conv2d cache: numba and NumPy paths agree with im2col/col2im."""
import numpy as np
import pytest

from qnref.nn import conv


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("k,s,p", [((3, 3), (1, 1), (1, 1)), ((3, 2), (2, 1), (1, 0)), ((5, 5), (1, 1), (0, 0)), ((3, 3), (2, 2), (1, 1))])
def test_im2col_t_col2im_t_match_reference(dt, k, s, p):
    r = np.random.default_rng(0)
    x = r.standard_normal((3, 2, 7, 6)).astype(dt)
    n, c = x.shape[:2]
    ref = conv.im2col(x, *k, *s, *p)  # (N, K, L)
    K, L = ref.shape[1:]
    u = r.standard_normal((K, n * L)).astype(dt)
    ref_adj = conv.col2im(np.ascontiguousarray(u.reshape(K, n, L).transpose(1, 0, 2)), x.shape, *k, *s, *p)
    saved = conv.KERNELS
    try:
        for mode in ("auto", "xp"):
            conv.KERNELS = mode
            ct = conv.im2col_t(x, *k, *s, *p)
            assert ct.shape == (K, n * L) and ct.dtype == dt
            np.testing.assert_array_equal(ct.reshape(K, n, L).transpose(1, 0, 2), ref)
            adj = conv.col2im_t(u, x.shape, *k, *s, *p)
            assert adj.dtype == dt
            np.testing.assert_allclose(adj, ref_adj, rtol=1e-5 if dt == np.float32 else 1e-12, atol=1e-5 if dt == np.float32 else 1e-12)
    finally:
        conv.KERNELS = saved


def test_patch_kernels_refuse_non_contiguous_arrays():
    """The numba patch kernels index flat views, so a strided array would be written through a
    copy and the result lost: they refuse it instead (the layer always passes fresh C arrays)."""
    k = pytest.importorskip("qnref.nn._numba_kernels")
    x = np.zeros((2, 3, 5, 5))
    cols = np.zeros((3, 3, 3, 2, 5, 5))
    with pytest.raises(ValueError, match="C-contiguous"):
        k.im2col_t(x, cols.transpose(0, 1, 2, 3, 5, 4), 1, 1, 1, 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        k.im2col_t(x.transpose(0, 1, 3, 2), cols, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        k.col2im_t(cols.transpose(0, 1, 2, 3, 5, 4), np.zeros((2, 3, 5, 5)), 1, 1, 1, 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        k.col2im(np.zeros((2, 3, 3, 3, 5, 5)), np.zeros((2, 3, 5, 5)).transpose(0, 1, 3, 2), 1, 1, 1, 1)
