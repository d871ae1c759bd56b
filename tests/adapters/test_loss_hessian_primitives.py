"""local_loss_sqrt_hessian / local_loss_hessian (the primitives SMW-GN reads): the engine's closed
forms, the generic default derived from local_loss_hvp, and the torch/JAX points agree (float64)."""
import numpy
import pytest
import torch

from qnref.curvature.derived import PointProducts
from qnref.curvature.objective import Objective
from qnref.nn import activations as A
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref_torch import TorchObjective, to_torch


def _full(m, C):
    return m if m.ndim == 3 else numpy.einsum("ic,cd->icd", m, numpy.eye(C))


def _data(loss, rng, N=7, C=3):
    if loss == "softmax_ce":
        return rng.integers(0, C, N)
    if loss == "sigmoid_ce":
        return (rng.random((N, C)) > 0.5).astype(float)
    return rng.standard_normal((N, C))


@pytest.mark.parametrize("loss", ["softmax_ce", "mse", "sigmoid_ce"])
def test_loss_hessian_factors(loss):
    rng = numpy.random.default_rng(0)
    m = Sequential([Dense(5), A.Tanh(), Dense(3)], (4,))
    th = rng.standard_normal(m.n_params)
    X, y = rng.standard_normal((7, 4)), _data(loss, rng)
    pt = Objective(m, loss, X, y).at(th)
    S, H = pt.loss_sqrt_hessian(), pt.loss_hessian()
    assert S.ndim == (3 if loss == "softmax_ce" else 2) and S.ndim == H.ndim
    Sf = _full(S, 3)
    Hf = _full(H, 3)
    numpy.testing.assert_allclose(Sf @ Sf.transpose(0, 2, 1), Hf, atol=1e-15)
    # the generic default (C local_loss_hvp calls, eigen square root) gives the same H and a valid factor
    Hg = PointProducts.local_loss_hessian(pt)
    numpy.testing.assert_allclose(Hg, Hf, atol=1e-15)
    # torch point (generic default through torch.func) agrees with the engine
    net = to_torch(m, th)
    tp = TorchObjective(net, loss, torch.from_numpy(X), torch.from_numpy(numpy.asarray(y)), 0.0).at(
        torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy())
    Ht, St = tp.loss_hessian(), tp.loss_sqrt_hessian()
    numpy.testing.assert_allclose(_full(Ht, 3), Hf, atol=1e-14)
    St = _full(St, 3)
    numpy.testing.assert_allclose(St @ St.transpose(0, 2, 1), Hf, atol=1e-14)
