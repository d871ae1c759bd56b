"""torch adapter: conversion, products vs torch.func (float64, rtol 1e-10), TorchObjective, optimizer wrapper."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import qnref_torch as qt
from qnref.curvature.objective import Objective
from qnref.optim.base import Problem
from qnref.optim.lbfgs import LBFGS
from qnref.optim.lsr1 import LSR1TrustRegion

RTOL = 1e-10


def _targets(loss, n, c, rng):
    if loss == "softmax_ce":
        return rng.integers(0, c, n)
    if loss == "mse":
        return rng.standard_normal((n, c))
    return rng.random((n, c))


def _mlp(sizes, act, seed):
    torch.manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(act())
    return nn.Sequential(*mods).double()


def _cnn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2, stride=1), nn.Sigmoid(), nn.AvgPool2d(2, stride=1, padding=1),
        nn.Flatten(), nn.Linear(36, 3),
    ).double()


# -- conversion ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "cnn", "bn"])
def test_conversion_roundtrip_outputs(kind):
    rng = np.random.default_rng(0)
    if kind == "mlp":
        m, shape = _mlp([5, 8, 6, 3], nn.Softplus, 0), (5,)
    elif kind == "cnn":
        m, shape = _cnn(0), (2, 6, 6)
    else:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
        with torch.no_grad():  # non-trivial running statistics
            m(torch.randn(8, 2, 6, 6, dtype=torch.float64) * 2 + 1)
        m.eval()
        shape = (2, 6, 6)
    X = rng.standard_normal((4,) + shape)
    model, theta = qt.from_torch(m, shape)
    z_q, _ = model.forward(theta, X, train=False)
    with torch.no_grad():
        z_t = m(torch.from_numpy(X)).numpy()
    assert np.abs(z_q - z_t).max() <= 1e-13 * max(1.0, np.abs(z_t).max())
    back = qt.to_torch(model, theta).eval()
    with torch.no_grad():
        z_b = back(torch.from_numpy(X)).numpy()
    np.testing.assert_array_equal(z_b, z_t) if kind == "mlp" else np.testing.assert_allclose(z_b, z_t, rtol=0, atol=1e-13)
    model2, theta2 = qt.from_torch(back, shape)
    np.testing.assert_array_equal(theta2, theta)


def test_conversion_theta_layout_is_wbar():
    m = _mlp([3, 2], nn.ReLU, 1)
    _, theta = qt.from_torch(m, (3,))
    wb = theta.reshape(2, 4)
    np.testing.assert_array_equal(wb[:, :3], m[0].weight.detach().numpy())
    np.testing.assert_array_equal(wb[:, 3], m[0].bias.detach().numpy())


@pytest.mark.parametrize("module, where, typename", [
    (nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.1), nn.Linear(3, 2)), "'1'", "Dropout"),
    (nn.Sequential(nn.Linear(4, 3), nn.Sequential(nn.ReLU(), nn.GELU()), nn.Linear(3, 2)), "'1.1'", "GELU"),
    (nn.Sequential(nn.Linear(4, 3, bias=False)), "'0'", "Linear"),
    (nn.Sequential(nn.Linear(4, 3), nn.Softplus(beta=2.0)), "'1'", "Softplus"),
    (nn.Sequential(nn.LayerNorm(4)), "'0'", "LayerNorm"),
])
def test_unsupported_layers_name_type_and_position(module, where, typename):
    with pytest.raises(qt.UnsupportedLayerError) as exc:
        qt.from_torch(module, (4,))
    msg = str(exc.value)
    assert typename in msg and where in msg


def test_unsupported_conv_options():
    with pytest.raises(qt.UnsupportedLayerError, match="Conv2d at position '0'.*dilation"):
        qt.from_torch(nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2)), (1, 8, 8))


# -- products vs torch.func (MLPs) -------------------------------------------------------------------
MLP_CASES = [
    ([5, 7, 4], nn.Tanh, 9),
    ([6, 8, 5, 3], nn.Sigmoid, 7),
    ([4, 6, 6, 6, 2], nn.Softplus, 5),
    ([3, 10, 4], nn.ReLU, 6),
]


@pytest.mark.parametrize("loss", ["softmax_ce", "mse", "sigmoid_ce"])
@pytest.mark.parametrize("case", range(len(MLP_CASES)))
@pytest.mark.parametrize("seed", [0, 1])
def test_mlp_products_agree_with_torch_func(loss, case, seed):
    sizes, act, n = MLP_CASES[case]
    rng = np.random.default_rng(100 * seed + case)
    m = _mlp(sizes, act, seed)
    X = rng.standard_normal((n, sizes[0]))
    y = _targets(loss, n, sizes[-1], rng)
    res = qt.assert_agree(m, loss, X, y, what=qt.ALL_WHAT, seed=seed, l2=0.01 * seed, rtol=RTOL)
    assert set(res) == set(qt.ALL_WHAT)


@pytest.mark.parametrize("torch_loss, name", [
    (nn.CrossEntropyLoss(), "softmax_ce"),
    (nn.CrossEntropyLoss(reduction="sum"), "softmax_ce"),
    (nn.MSELoss(), "mse"),
    (nn.MSELoss(reduction="sum"), "mse"),
    (nn.BCEWithLogitsLoss(), "sigmoid_ce"),
    (nn.BCEWithLogitsLoss(reduction="sum"), "sigmoid_ce"),
])
def test_torch_loss_modules_map_to_qnref_conventions(torch_loss, name):
    rng = np.random.default_rng(3)
    m = _mlp([4, 6, 3], nn.Tanh, 3)
    X = rng.standard_normal((8, 4))
    y = _targets(name, 8, 3, rng)
    qt.assert_agree(m, torch_loss, X, y, what=qt.ALL_WHAT, rtol=RTOL)
    # the documented constant: torch_loss = c · f_qnref
    _, _, cfun = qt.resolve_loss(torch_loss)
    model, theta = qt.from_torch(m, (4,))
    fq = Objective(model, name, X, y).value(theta)
    yt = torch.from_numpy(y)
    with torch.no_grad():
        ft = float(torch_loss(m(torch.from_numpy(X)), yt))
    assert abs(ft - cfun(8, 3) * fq) <= 1e-12 * abs(ft)


def test_soft_label_cross_entropy():
    rng = np.random.default_rng(4)
    m = _mlp([4, 5, 3], nn.Tanh, 4)
    y = rng.random((6, 3))
    y /= y.sum(1, keepdims=True)
    qt.assert_agree(m, nn.CrossEntropyLoss(), rng.standard_normal((6, 4)), y, what=qt.ALL_WHAT, rtol=RTOL)


# -- CNNs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["softmax_ce", "mse", "sigmoid_ce"])
def test_cnn_products_agree_with_torch_func(loss):
    rng = np.random.default_rng(5)
    m = _cnn(1)
    X = rng.standard_normal((4, 2, 6, 6))
    qt.assert_agree(m, loss, X, _targets(loss, 4, 3, rng), what=qt.ALL_WHAT, l2=0.05, rtol=RTOL)


def test_cnn_relu_strided():
    rng = np.random.default_rng(6)
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 2), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).double()
    qt.assert_agree(m, "softmax_ce", rng.standard_normal((5, 1, 7, 7)), rng.integers(0, 2, 5), what=qt.ALL_WHAT, rtol=RTOL)


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_products(train):
    rng = np.random.default_rng(7)
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        m(torch.randn(6, 2, 5, 5, dtype=torch.float64))
    m.train(train)
    what = ("grad", "jvp", "vjp", "hvp", "ggn", "kfac_factors") if train else qt.ALL_WHAT
    before = m[1].running_mean.clone()
    qt.assert_agree(m, "mse", rng.standard_normal((5, 2, 5, 5)), rng.standard_normal((5, 2)), what=what, rtol=RTOL)
    assert torch.equal(m[1].running_mean, before)  # the caller's module is untouched


# -- TorchObjective over a torch model ------------------------------------------------------------------
def _torch_to_qnref_perm(module, conv):
    """Index map: qnref θ[perm] = torch-layout θ (named_parameters order)."""
    n = sum(p.numel() for p in module.parameters())
    probe = np.arange(n, dtype=np.float64)
    d, off = {}, 0
    for name, p in module.named_parameters():
        d[name] = torch.from_numpy(probe[off:off + p.numel()].reshape(p.shape))
        off += p.numel()
    return qt.torch_to_theta(conv, d).astype(np.int64)  # qnref[i] = torch[perm[i]]


@pytest.mark.parametrize("loss", ["softmax_ce", "mse", "sigmoid_ce"])
def test_torch_objective_matches_qnref_objective(loss):
    rng = np.random.default_rng(8)
    m = _mlp([5, 6, 4], nn.Tanh, 8)
    X = rng.standard_normal((10, 5))
    y = _targets(loss, 10, 4, rng)
    conv = qt.convert(m, (5,))
    perm = _torch_to_qnref_perm(m, conv)
    prob = qt.TorchProblem(m, loss, X, y, l2=0.1)
    theta_t = prob.get_theta()
    assert isinstance(theta_t, np.ndarray) and theta_t.dtype == np.float64
    np.testing.assert_array_equal(theta_t[perm], conv.theta)
    pt = prob.full().at(theta_t)
    pq = Objective(conv.model, loss, X, y, 0.1).at(conv.theta)
    v = rng.standard_normal(theta_t.size)
    vq = v[perm]
    assert abs(pt.value - pq.value) <= 1e-14 * abs(pq.value)
    for a, b in [(pt.grad[perm], pq.grad), (pt.hvp(v)[perm], pq.hvp(vq)), (pt.ggn_vp(v)[perm], pq.ggn_vp(vq)),
                 (pt.fisher_vp(v)[perm], pq.fisher_vp(vq)), (pt.jvp(v), pq.jvp(vq)),
                 (pt.per_example_grads()[:, perm], pq.per_example_grads())]:
        assert qt.rel_diff(a, b) <= RTOL
    u = rng.standard_normal(pq.z.shape)
    assert qt.rel_diff(pt.vjp(u)[perm], pq.vjp(u)) <= RTOL


def test_torch_objective_dlpack_zero_copy_and_errors():
    m = _mlp([3, 2], nn.Tanh, 0)
    prob = qt.TorchProblem(m, "mse", np.zeros((4, 3)), np.zeros((4, 2)))
    theta = prob.get_theta()
    t = qt.to_torch_tensor(theta, torch.device("cpu"))
    assert t.data_ptr() == theta.ctypes.data  # zero-copy in
    g = prob.full().at(theta).grad
    assert g.flags.writeable
    back = qt.from_torch_tensor(t)
    assert back.ctypes.data == theta.ctypes.data  # zero-copy out
    bad = theta.copy()
    bad[0] = np.nan
    from qnref.curvature.objective import NonFiniteError
    with pytest.raises(NonFiniteError):
        prob.full().at(bad)
    with pytest.raises(TypeError, match="float32"):
        prob.full().at(theta.astype(np.float32))


# -- optimizer wrapper ------------------------------------------------------------------------------------
def _data(seed=11, n=32):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 4))
    y = rng.integers(0, 3, n)
    return X, y


def _run_qnref(opt, m, X, y, steps, seed=0):
    model, theta = qt.from_torch(m, (4,))
    problem = Problem(model, "softmax_ce", X, y, 1e-3, seed=seed)
    state = opt.init(theta)
    out = []
    for _ in range(steps):
        theta, state, info = opt.step(theta, state, problem)
        out.append(info.loss)
    return np.array(out), theta


@pytest.mark.parametrize("make_opt", [lambda: LBFGS(memory=5, batch_size=None), lambda: LBFGS(memory=4, batch_size=8),
                                      lambda: LSR1TrustRegion(memory=4, batch_size=None)])
def test_wrapper_problem_mode_matches_qnref_engine(make_opt):
    X, y = _data()
    m = _mlp([4, 6, 3], nn.Tanh, 12)
    ref, theta_ref = _run_qnref(make_opt(), m, X, y, 6)
    problem = qt.TorchProblem(m, "softmax_ce", X, y, l2=1e-3, seed=0)
    opt = qt.QNRefOptimizer(m.parameters(), make_opt(), problem=problem)
    got = np.array([(opt.step(), opt.last_info.loss)[1] for _ in range(6)])
    assert np.all(np.isfinite(ref)) and ref[-1] < ref[0]
    assert np.abs(got - ref).max() <= 1e-10 * np.abs(ref).max()
    _, theta_t = qt.from_torch(m, (4,))  # the module's parameters hold the final θ
    assert np.abs(theta_t - theta_ref).max() <= 1e-9 * np.abs(theta_ref).max()


def test_wrapper_closure_mode_matches_qnref_engine():
    X, y = _data()
    m = _mlp([4, 6, 3], nn.Tanh, 13)
    ref, _ = _run_qnref(LBFGS(memory=5, batch_size=None), m, X, y, 5)
    opt = qt.QNRefOptimizer(m.parameters(), LBFGS(memory=5, batch_size=None), n_samples=len(X))
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    calls = []

    def closure():
        opt.zero_grad()
        params = torch.cat([p.reshape(-1) for p in m.parameters()])
        loss = nn.functional.cross_entropy(m(Xt), yt) + 0.5e-3 * (params @ params)
        loss.backward()
        calls.append(1)
        return loss

    got = np.array([(opt.step(closure), opt.last_info.loss)[1] for _ in range(5)])
    assert len(calls) >= 5  # the line search re-evaluated through the closure
    assert np.abs(got - ref).max() <= 1e-10 * np.abs(ref).max()


def test_wrapper_closure_mode_has_no_curvature_and_checks_params():
    m = _mlp([4, 3], nn.Tanh, 0)
    X, y = _data()
    problem = qt.TorchProblem(m, "softmax_ce", X, y)
    other = _mlp([4, 3], nn.Tanh, 1)
    with pytest.raises(ValueError, match="trainable parameters"):
        qt.QNRefOptimizer(other.parameters(), LBFGS(), problem=problem)
    cp = qt.ClosureProblem(list(m.parameters()), lambda: torch.tensor(0.0))
    theta = np.zeros(sum(p.numel() for p in m.parameters()))
    with pytest.raises(NotImplementedError, match="TorchProblem"):
        cp.full().at(theta).hvp(theta)
    with pytest.raises(ValueError, match="closure"):
        qt.QNRefOptimizer(m.parameters(), LBFGS()).step()


# -- residual blocks ----------------------------------------------------------------------------------------
def _resnet_tiny(seed):
    """conv → BN → ReLU → 3 residual blocks (identity, projection 1×1 conv + BN, option-A pad) → GAP → FC."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        qt.ResidualBlock(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
                                       nn.Conv2d(3, 3, 3, padding=1))),  # identity shortcut, ReLU after the sum
        qt.ResidualBlock(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                       nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)),
                         nn.Sequential(nn.Conv2d(3, 4, 1, stride=2), nn.BatchNorm2d(4)), nn.Tanh()),
        qt.ResidualBlock(nn.Sequential(nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.Sigmoid()), qt.PadShortcut(5, 2), None),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    ).double()
    with torch.no_grad():  # non-trivial running statistics
        m(torch.randn(8, 1, 6, 6, dtype=torch.float64) * 2 + 0.5)
    return m


def test_residual_blocks_convert_both_ways():
    from qnref.nn.residual import PadShortcut, Residual
    rng = np.random.default_rng(20)
    m = _resnet_tiny(0).eval()
    X = rng.standard_normal((4, 1, 6, 6))
    conv = qt.convert(m, (1, 6, 6))
    model, theta = conv.model, conv.theta
    res = [l for l in model.layers if isinstance(l, Residual)]
    assert [len(r.shortcut) for r in res] == [0, 2, 1] and isinstance(res[2].shortcut[0], PadShortcut)
    assert res[2].act is None and conv.layer_paths[res[1].shortcut[0].name] == "4.shortcut.0"
    for train in (False, True):
        z_q, _ = model.forward(theta, X, train=train)
        mm = copy.deepcopy(m).train(train)
        qt.drop_running_stats(mm)
        with torch.no_grad():
            z_t = mm(torch.from_numpy(X)).numpy()
        assert np.abs(z_q - z_t).max() <= 1e-13 * np.abs(z_t).max()
    back = qt.to_torch(model, theta).eval()
    assert isinstance(back[3], qt.ResidualBlock) and back[3].shortcut is None
    assert isinstance(back[5].shortcut, qt.PadShortcut) and back[5].activation is None
    with torch.no_grad():
        np.testing.assert_array_equal(back(torch.from_numpy(X)).numpy(), m(torch.from_numpy(X)).numpy())
    model2, theta2 = qt.from_torch(back, (1, 6, 6))
    np.testing.assert_array_equal(theta2, theta)
    np.testing.assert_array_equal(model2.forward(theta2, X, train=False)[0], model.forward(theta, X, train=False)[0])


@pytest.mark.parametrize("train", [True, False])
def test_residual_products_agree_with_torch_func(train):
    rng = np.random.default_rng(21)
    m = _resnet_tiny(1).train(train)
    what = ("grad", "jvp", "vjp", "hvp", "ggn", "kfac_factors") if train else qt.ALL_WHAT
    res = qt.assert_agree(m, "softmax_ce", rng.standard_normal((5, 1, 6, 6)), rng.integers(0, 3, 5), what=what, l2=0.01,
                          rtol=RTOL)
    assert set(what) <= set(res)


@pytest.mark.parametrize("shortcut", ["projection", "pad"])
def test_zoo_resnet_digits_converts_both_ways(shortcut):
    from qnref.nn.zoo import build_model
    rng = np.random.default_rng(22)
    model = build_model("resnet-digits", shortcut=shortcut, width=0.5)
    theta = model.init(3)
    X, y = rng.standard_normal((6, 1, 8, 8)), rng.integers(0, 10, 6)
    net = qt.to_torch(model, theta)
    for train in (True, False):
        mm = copy.deepcopy(net).train(train)
        qt.drop_running_stats(mm)
        with torch.no_grad():
            z_t = mm(torch.from_numpy(X)).numpy()
        z_q = model.forward(theta, X, train=train)[0]
        assert np.abs(z_q - z_t).max() <= 1e-13 * np.abs(z_t).max()
    model2, theta2 = qt.from_torch(net, (1, 8, 8))
    np.testing.assert_array_equal(theta2, theta)
    assert model2.n_params == model.n_params
    what = ("grad", "hvp", "ggn", "kfac_factors") if shortcut == "projection" else ("grad", "hvp", "fisher")
    qt.assert_agree(net.train(shortcut == "projection"), "softmax_ce", X, y, what=what, rtol=RTOL)


def test_unsupported_layer_inside_residual_block_is_named():
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1),
                      qt.ResidualBlock(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.GELU())))
    with pytest.raises(qt.UnsupportedLayerError, match=r"GELU at position '1\.body\.1'"):
        qt.from_torch(m, (1, 5, 5))
    m = nn.Sequential(qt.ResidualBlock(nn.Sequential(nn.Linear(3, 3)), activation=nn.LeakyReLU()))
    with pytest.raises(qt.UnsupportedLayerError, match=r"LeakyReLU at position '0\.activation'"):
        qt.from_torch(m, (3,))


# -- Fisher kinds ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["softmax_ce", "mse", "sigmoid_ce"])
def test_torch_point_fisher_kinds_match_qnref(loss):
    rng = np.random.default_rng(23)
    m = _mlp([4, 5, 3], nn.Tanh, 23)
    X, y = rng.standard_normal((7, 4)), _targets(loss, 7, 3, rng)
    conv = qt.convert(m, (4,))
    perm = _torch_to_qnref_perm(m, conv)
    pt = qt.TorchProblem(m, loss, X, y, l2=0.3).full().at(qt.TorchProblem(m, loss, X, y).get_theta())
    pq = Objective(conv.model, loss, X, y, 0.3, rng=np.random.default_rng(5)).at(conv.theta)
    v = rng.standard_normal(conv.theta.size)
    vq = v[perm]
    ytil = pq.sampled_targets()  # the same targets on both sides → the same matrix
    assert qt.rel_diff(pt.fisher_vp(v, "sampled", targets=ytil)[perm], pq.fisher_vp(vq, "sampled")) <= RTOL
    assert qt.rel_diff(pt.fisher_vp(v, "exact")[perm], pq.fisher_vp(vq, "exact")) <= RTOL
    assert qt.rel_diff(pt.fisher_vp(v, "empirical")[perm], pq.fisher_vp(vq, "empirical")) <= RTOL
    # own draws: reproducible per generator seed, fixed per point, shaped like y
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    p1, p2 = (qt.TorchProblem(m, loss, X, y).full().at(pt.theta) for _ in range(2))
    np.testing.assert_array_equal(p1.fisher_vp(v, "sampled", generator=g()), p2.fisher_vp(v, "sampled", generator=g()))
    assert p1.sampled_targets() is p1.sampled_targets() and tuple(p1.sampled_targets().shape) == y.shape
    with pytest.raises(ValueError, match="kind"):
        pt.fisher_vp(v, "true")
    other = qt.TorchObjective(m, lambda z, t: ((z - t) ** 2).mean(), X, rng.standard_normal((7, 3))).at(pt.theta)
    with pytest.raises(ValueError, match="targets="):
        other.fisher_vp(v, "sampled")
