"""QNRefOptimizer follows torch.optim's conventions: param_groups hyperparameters that schedulers
change (honoured on the next step), several groups, frozen parameters, weights_only state dicts
that resume bit-identically, closures as torch.optim.LBFGS uses them."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

import qnref_torch as qt
from qnref.optim import load_all
from qnref.optim.registry import OPTIMIZERS
from adapter_fixtures import small_batches

load_all()
L2 = 1e-2


def _setup(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    rng = np.random.default_rng(seed)
    X = torch.from_numpy(rng.standard_normal((24, 4)))
    y = torch.from_numpy(rng.integers(0, 3, 24))
    return net, X, y


def _make(name, net, X, y, **extra):
    prob = qt.TorchProblem(net, "softmax_ce", X, y, L2, seed=0, layout="qnref")
    return qt.QNRefOptimizer(net.parameters(), name, problem=prob, **{**small_batches(name), **extra}), prob


def _deltas(name, schedule, steps=3, **extra):
    net, X, y = _setup()
    opt, prob = _make(name, net, X, y, **extra)
    sched = schedule(opt) if schedule is not None else None
    out, lrs = [], []
    for k in range(steps):
        if sched is not None and k:
            sched.step()                          # between steps, as a training loop does
        th = prob.get_theta()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        out.append(prob.get_theta() - th)
    return out, lrs, opt


@pytest.mark.parametrize("name", ["lsr1-ls", "kfac", "adam"])
@pytest.mark.parametrize("kind", ["StepLR", "OneCycleLR"])
def test_scheduler_changes_the_next_step(name, kind):
    def schedule(opt):
        if kind == "StepLR":
            return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2 * opt.param_groups[0]["lr"], total_steps=10,
                                                   cycle_momentum=name == "kfac")

    base, base_lrs, _ = _deltas(name, None)
    got, lrs, opt = _deltas(name, schedule)
    assert lrs[1] != lrs[0]                       # the scheduler wrote lr into param_groups
    assert np.array_equal(got[0], base[0]) if kind == "StepLR" else True
    assert not np.allclose(got[1], base[1], rtol=1e-6, atol=0)   # … and the next step used it
    if name == "lsr1-ls" and kind == "StepLR":    # no native lr: lr scales the method's step
        np.testing.assert_allclose(got[1], lrs[1] * base[1], rtol=1e-12, atol=1e-15)
    if name != "lsr1-ls":                         # native lr: the rebuilt qnref optimizer holds it
        assert opt.qn.lr == opt.param_groups[0]["lr"]
    if name == "kfac" and kind == "OneCycleLR":   # momentum is a param_groups hyperparameter too
        assert opt.qn.momentum == opt.param_groups[0]["momentum"]


def test_native_lr_change_equals_rebuilt_engine_optimizer():
    """Changing param_groups' lr before step k equals running qnref's engine with that lr from step k."""
    from qnref.optim.base import Problem
    from qnref.optim.registry import make_optimizer

    net, X, y = _setup()
    opt, prob = _make("adam", net, X, y)
    conv = prob.conversion
    eng = Problem(conv.model, "softmax_ce", X.numpy(), y.numpy(), L2, seed=0)
    a = make_optimizer("adam", **small_batches("adam"))
    th = prob.get_theta()
    st = a.init(th)
    opt.step()
    th, st, _ = a.step(th, st, eng)
    opt.param_groups[0]["lr"] = 0.01
    opt.step()
    b = make_optimizer("adam", **{**small_batches("adam"), "lr": 0.01})
    th, st, _ = b.step(th, st, eng)
    np.testing.assert_allclose(prob.get_theta(), th, rtol=1e-13, atol=1e-15)


def test_bad_scheduled_value_is_refused_by_the_method():
    net, X, y = _setup()
    opt, _ = _make("kfac", net, X, y)
    opt.param_groups[0]["damping"] = -1.0
    with pytest.raises(ValueError, match="damping"):
        opt.step()


def test_param_groups_closure_mode_several_groups_and_frozen_params():
    net, X, y = _setup()
    lin1, lin2 = net[0], net[2]
    lin2.bias.requires_grad_(False)
    frozen = lin2.bias.detach().clone()
    loss_fn = qt.qnref_loss_torch("softmax_ce")
    opt = qt.QNRefOptimizer([{"params": lin1.parameters()}, {"params": lin2.parameters()}], "lbfgs", n_samples=24)
    assert sum(p.numel() for p in opt._params()) == 4 * 6 + 6 + 6 * 3   # frozen bias excluded from θ

    def closure():
        opt.zero_grad()
        loss = loss_fn(net(X), y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure)) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert torch.equal(lin2.bias, frozen)
    with pytest.raises(ValueError, match="param group 1 sets lr=0.5 but group 0 has lr=1.0"):
        qt.QNRefOptimizer([{"params": lin1.parameters()}, {"params": lin2.parameters(), "lr": 0.5}], "lbfgs")


def test_problem_mode_refusals_name_the_mode():
    net, X, y = _setup()
    with pytest.raises(ValueError, match="layout='qnref'"):
        qt.QNRefOptimizer(net.parameters(), "kfac", problem=qt.TorchProblem(net, "softmax_ce", X, y))
    with pytest.raises(ValueError, match="use problem mode"):
        qt.QNRefOptimizer(net.parameters(), "hf")
    opt, _ = _make("sgd", net, X, y)
    with pytest.raises(ValueError, match="add_param_group"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_weights_only_roundtrip_resumes_bit_identically(name):
    net, X, y = _setup()
    opt, prob = _make(name, net, X, y)
    for _ in range(2):
        opt.step()
    sd = _roundtrip(opt.state_dict())
    net2 = copy.deepcopy(net)
    opt2, prob2 = _make(name, net2, X, y)
    opt2.load_state_dict(sd)
    for _ in range(2):
        opt.step()
        opt2.step()
        np.testing.assert_array_equal(prob2.get_theta(), prob.get_theta())
    assert prob2.counter.snapshot() == prob.counter.snapshot()


def test_batchnorm_running_stats_follow_a_plain_torch_loop():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, momentum=0.3), nn.Tanh(), nn.Linear(5, 3)).double()
    ref = copy.deepcopy(net)
    rng = np.random.default_rng(0)
    X = torch.from_numpy(rng.standard_normal((24, 4)))
    y = torch.from_numpy(rng.integers(0, 3, 24))
    prob = qt.TorchProblem(net, "softmax_ce", X, y, L2, seed=0)
    opt = qt.QNRefOptimizer(net.parameters(), "sgd", problem=prob, lr=0.1, batch_size=8)
    perm = np.random.default_rng(0).permutation(24)          # qnref's stream for seed 0
    for k in range(3):
        opt.step()
        idx = torch.from_numpy(perm[8 * k:8 * k + 8])
        ref.zero_grad()
        loss = nn.functional.cross_entropy(ref(X[idx]), y[idx]) + 0.5 * L2 * sum((p * p).sum() for p in ref.parameters())
        loss.backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.1 * p.grad
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(net[1].running_mean, ref[1].running_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(net[1].running_var, ref[1].running_var, rtol=1e-12, atol=1e-14)
    assert int(net[1].num_batches_tracked) == int(ref[1].num_batches_tracked) == 3
