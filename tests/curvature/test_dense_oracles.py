"""qnref.curvature.dense: the exact route is the default of hessian/ggn; finite differences are
``method="fd"``. The exact matrices equal the fd ones to ~1e-7 and fully independent dense
computations (jax.hessian / jax.jacobian on the same network written in JAX, and
torch.autograd.functional.hessian on the torch module) to ≤ 1e-12 in float64."""
from __future__ import annotations

import numpy as np
import pytest

from qnref.curvature import dense
from qnref.curvature.objective import Objective
from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential

L2 = 1e-3


def _setup(loss="softmax_ce"):
    rng = np.random.default_rng(0)
    model = Sequential([Dense(5), Tanh(), Dense(3)], input_shape=(4,))
    theta = model.init(0, scheme="gaussian", std=0.7)
    X = rng.standard_normal((7, 4))
    y = rng.integers(0, 3, 7) if loss == "softmax_ce" else rng.standard_normal((7, 3))
    return model, theta, X, y, Objective(model, loss, X, y, l2=L2)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("loss", ["softmax_ce", "mse"])
def test_default_is_exact_and_fd_is_explicit(loss):
    model, theta, X, y, obj = _setup(loss)
    n = theta.size
    H, G = dense.hessian(obj, theta), dense.ggn(obj, theta)
    eye = np.eye(n)
    np.testing.assert_array_equal(H, np.stack([obj.hvp(theta, eye[i]) for i in range(n)], axis=1))
    np.testing.assert_array_equal(G, np.stack([obj.ggn_vp(theta, eye[i]) for i in range(n)], axis=1))
    np.testing.assert_array_equal(H, dense.hessian(obj, theta, method="exact"))
    np.testing.assert_array_equal(H, dense.hessian(obj, theta, method="products"))     # the old name
    assert rel(dense.hessian(obj, theta, method="fd"), H) < 1e-7
    assert rel(dense.ggn(obj, theta, method="fd"), G) < 1e-7
    assert rel(H, H.T) < 1e-13 and rel(G, G.T) < 1e-13
    with pytest.raises(ValueError, match="'exact'"):
        dense.hessian(obj, theta, method="autodiff")
    with pytest.raises(ValueError, match="'fd'"):
        dense.ggn(obj, theta, method=None)


def test_exact_equals_jax_hessian_and_ggn():
    import jax
    import jax.numpy as jnp
    import qnref_jax as qj

    model, theta, X, y, obj = _setup()
    spec = qj.to_spec(model, theta)
    structure, _ = qj.split(spec)
    ce = qj.jax_loss("softmax_ce")
    with qj.x64_scope():
        Xj, yj = jnp.asarray(X), jnp.asarray(y)

        def out(t):
            return qj.apply(structure, qj.theta_to_params(model, structure, t), Xj)

        def f(t):
            return ce(out(t), yj) + 0.5 * L2 * jnp.sum(t * t)

        t = jnp.asarray(theta)
        Hj = np.asarray(jax.hessian(f)(t))
        J = np.asarray(jax.jacobian(out)(t))                       # (N, C, n)
        z = out(t)
        HL = np.stack([np.asarray(jax.hessian(lambda zi: ce(zi[None], yj[i:i + 1]))(z[i])) for i in range(X.shape[0])])
    Gj = np.einsum("ica,icd,idb->ab", J, HL, J) / X.shape[0] + L2 * np.eye(theta.size)
    assert Hj.dtype == np.float64
    assert rel(dense.hessian(obj, theta), Hj) <= 1e-12
    assert rel(dense.ggn(obj, theta), Gj) <= 1e-12


def test_exact_equals_torch_autograd_hessian():
    import torch
    import qnref_torch as qt

    model, theta, X, y, obj = _setup()
    net = qt.to_torch(model, theta)
    conv = qt.convert(net, (4,))
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def f(t):
        p = qt.theta_to_torch_params(conv, t)
        z = torch.func.functional_call(net, p, (Xt,))
        return torch.nn.functional.cross_entropy(z, yt) + 0.5 * L2 * (t * t).sum()

    t0 = torch.from_numpy(qt.from_torch(net, (4,))[1].copy())
    np.testing.assert_array_equal(t0.numpy(), theta)
    Ht = torch.autograd.functional.hessian(f, t0).numpy()
    assert rel(dense.hessian(obj, theta), Ht) <= 1e-12
