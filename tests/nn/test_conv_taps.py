"""Streamed conv taps (:class:`qnref.nn.conv.ConvTap`): every reduction of ``qnref.curvature.kron``
on a conv tap, computed chunk by chunk from rebuilt patches, equals the same formula on explicit
patch tensors built here by a loop over windows (an oracle independent of im2col), with one chunk
and with many (``CHUNK_BYTES`` shrunk), on both kernel paths. float64, relative 1e-12."""
import numpy as np
import pytest

import qnref.nn.conv as conv_mod
from qnref.curvature import kron
from qnref.nn.conv import Conv2d, ConvTap
from helpers import conv_pass

RTOL = 1e-12


def loop_patches(x, kh, kw, stride, pad):
    """ā (N, L, K+1) by a loop over output locations: channel-major (c, i, j) windows and a 1."""
    n, c, h, w = x.shape
    (sh, sw), (ph, pw) = stride, pad
    xpad = np.zeros((n, c, h + 2 * ph, w + 2 * pw))
    xpad[:, :, ph:ph + h, pw:pw + w] = x
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    a = np.ones((n, ho * wo, c * kh * kw + 1))
    for r in range(ho):
        for s in range(wo):
            a[:, r * wo + s, :-1] = xpad[:, :, r * sh:r * sh + kh, s * sw:s * sw + kw].reshape(n, -1)
    return a


def rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(params=["one-chunk", "many-chunks"])
def chunking(request, monkeypatch):
    if request.param == "many-chunks":
        monkeypatch.setattr(conv_mod, "CHUNK_BYTES", 1)   # one example per chunk
    return request.param


@pytest.mark.parametrize("kernels", ["xp", "auto"])
def test_streamed_reductions_equal_the_formulas_on_explicit_patches(kernels, chunking, monkeypatch):
    monkeypatch.setattr(conv_mod, "KERNELS", kernels)
    layer = Conv2d(4, 3, stride=2, padding=1)
    wb, x, y, cache, gy = conv_pass(layer, (2, 7, 6), 5, seed=0)
    tap = layer.kron_taps(cache, gy)
    assert isinstance(tap, ConvTap)
    if chunking == "many-chunks":
        assert len(layer._chunks(cache)) == 5
    a = loop_patches(x, 3, 3, (2, 2), (1, 1))                      # (N, L, K+1)
    N, L = a.shape[:2]
    g = gy.reshape(N, 4, L).transpose(0, 2, 1)                     # (N, L, C_out)
    a2, g2 = a.reshape(N * L, -1), g.reshape(N * L, -1)
    s = np.random.default_rng(9).standard_normal(a.shape[-1])
    A, G = kron.factors(tap)
    assert rel(A, a2.T @ a2 / N) <= RTOL and rel(G, g2.T @ g2 / (N * L)) <= RTOL   # thesis (3.9)
    assert rel(kron.factor_A(tap), a2.T @ a2 / N) <= RTOL
    assert rel(kron.mean_a(tap), a2.mean(axis=0)) <= RTOL                            # (3.14)
    assert rel(kron.apply_A(tap, s), a2.T @ (a2 @ s) / N) <= RTOL                    # (3.15)
    assert rel(kron.mean_g(tap), g2.mean(axis=0)) <= RTOL
    assert kron.tap_size(tap) == (N, L) and kron.locations(tap) == L
    # ∂W̄ of Σ gᵢₜāᵢₜᵀ / N is the layer's own weight gradient of the summed loss, divided by N
    gwb = np.zeros_like(wb)
    layer.backward([wb], cache, gy, [gwb])
    assert rel(kron.weight_grad(tap), gwb / N) <= RTOL
    # the full tensors on demand, as before
    assert rel(tap["a"], a) <= RTOL and tap["a"].flags.c_contiguous
    assert rel(tap["g"], g) <= RTOL and tap["kind"] == "conv" and set(tap) == {"kind", "a", "g"}
    with pytest.raises(KeyError):
        tap["b"]


def test_streamed_factors_are_independent_of_the_chunking(monkeypatch):
    """The chunk sums run in chunk order: the same bits for any thread count; and chunked sums
    agree with the one-block sums to rounding."""
    from qnref.nn import chunks

    layer = Conv2d(3, 3, padding=1)
    _, _, _, cache, gy = conv_pass(layer, (2, 6, 6), 6, seed=1)
    one = kron.factors(layer.kron_taps(cache, gy))
    monkeypatch.setattr(conv_mod, "CHUNK_BYTES", 1)
    monkeypatch.setattr(chunks, "_state", dict(chunks._state, threads=1))
    serial = kron.factors(layer.kron_taps(cache, gy))
    monkeypatch.setattr(chunks, "_state", dict(chunks._state, threads=2, pool=None))
    threaded = kron.factors(layer.kron_taps(cache, gy))
    for u, v, w in zip(one, serial, threaded):
        np.testing.assert_array_equal(v, w)
        assert rel(v, u) <= RTOL
