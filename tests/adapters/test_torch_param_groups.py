"""Several param groups with different hyperparameters (QNRefOptimizer, torch.optim's convention).

Elementwise first-order methods (qnref_torch.optimizer.PER_GROUP) run one qnref optimizer and one
state per group on that group's θ slice of the one gradient a step takes: bit-identical to qnref's
own optimizer on each group's parameters alone, equal to torch.optim's own optimizers where the
rules agree, schedulers honoured per group on the next step, weights_only state dicts that resume
bit-identically. Methods that couple parameters refuse differing groups naming the method and
the groups."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

import qnref_torch as qt
from qnref.optim import load_all

load_all()
ELEMENTWISE = ["sgd", "momentum", "nag", "adam", "rmsprop", "adagrad", "adadelta"]
#: group hyperparameters per method (group 0, group 1): every scalar the method has differs
GROUPS = {
    "sgd": ({"lr": 0.1}, {"lr": 0.02}),
    "momentum": ({"lr": 0.1, "momentum": 0.9}, {"lr": 0.03, "momentum": 0.5}),
    "nag": ({"lr": 0.1, "momentum": 0.9}, {"lr": 0.03, "momentum": 0.5}),
    "adam": ({"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
             {"lr": 0.003, "beta1": 0.5, "beta2": 0.9, "eps": 1e-3}),
    "rmsprop": ({"lr": 0.01, "rho": 0.9, "eps": 1e-8}, {"lr": 0.003, "rho": 0.5, "eps": 1e-3}),
    "adagrad": ({"lr": 0.1, "eps": 1e-10}, {"lr": 0.02, "eps": 1e-3}),
    "adadelta": ({"lr": 1.0, "rho": 0.95, "eps": 1e-6}, {"lr": 0.5, "rho": 0.8, "eps": 1e-3}),
}


def _data(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return (torch.from_numpy(rng.standard_normal((n, 4))), torch.from_numpy(rng.integers(0, 3, n)),
            torch.from_numpy(rng.standard_normal((n, 3))), torch.from_numpy(rng.integers(0, 2, n)))


def _two_nets(seed=0):
    torch.manual_seed(seed)
    return (nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double(),
            nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double())


def _closure(opt, parts, data):
    XA, yA, XB, yB = data

    def closure():
        opt.zero_grad()
        loss = 0.0
        if "A" in parts:
            loss = loss + nn.functional.cross_entropy(parts["A"](XA), yA)
        if "B" in parts:
            loss = loss + nn.functional.cross_entropy(parts["B"](XB), yB)
        loss.backward()
        return loss
    return closure


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).numpy().copy()


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_groups_equal_qnref_on_each_groups_parameters_alone(name):
    """A separable loss f_A(θ_A) + f_B(θ_B): two groups with different hyperparameters give, bit for
    bit, what qnref's own optimizer gives on θ_A with group 0's values and on θ_B with group 1's."""
    data = _data()
    hA, hB = GROUPS[name]
    A, B = _two_nets()
    opt = qt.QNRefOptimizer([{"params": A.parameters(), **hA}, {"params": B.parameters(), **hB}], name)
    closure = _closure(opt, {"A": A, "B": B}, data)
    A1, B1 = copy.deepcopy(A), copy.deepcopy(B)
    optA = qt.QNRefOptimizer(A1.parameters(), name, **hA)
    optB = qt.QNRefOptimizer(B1.parameters(), name, **hB)
    cA, cB = _closure(optA, {"A": A1}, data), _closure(optB, {"B": B1}, data)
    for _ in range(4):
        opt.step(closure)
        optA.step(cA)
        optB.step(cB)
        np.testing.assert_array_equal(_flat(A), _flat(A1))
        np.testing.assert_array_equal(_flat(B), _flat(B1))
    assert [q.lr for q in opt._group_qn] == [hA["lr"], hB["lr"]]
    assert opt.last_info.extra["group_lr"] == [hA["lr"], hB["lr"]]


def _problem_opt(name, groups, seed=0, net=None):
    torch.manual_seed(seed)
    if net is None:
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = _data(seed, 24)[:2]
    prob = qt.TorchProblem(net, "softmax_ce", X, y, 1e-2, seed=0, layout="qnref")
    if groups is None:
        return qt.QNRefOptimizer(net.parameters(), name, problem=prob, batch_size=8), prob, net
    ps = [{"params": net[0].parameters(), **groups[0]}, {"params": net[2].parameters(), **groups[1]}]
    return qt.QNRefOptimizer(ps, name, problem=prob, batch_size=8), prob, net


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_problem_mode_groups_bit_identical_to_single_optimizers(name):
    """Problem mode: agreeing groups = one group for every step; with different values the first
    step of group i equals (bit for bit) that slice of one-group qnref with group i's values."""
    hA, hB = GROUPS[name]
    one, p1, _ = _problem_opt(name, None)
    two, p2, _ = _problem_opt(name, ({}, {}))
    for _ in range(4):
        one.step()
        two.step()
        np.testing.assert_array_equal(p1.get_theta(), p2.get_theta())
    assert p1.counter.snapshot() == p2.counter.snapshot()
    diff, pd, net = _problem_opt(name, (hA, hB))
    n0 = sum(p.numel() for p in net[0].parameters())
    th0 = pd.get_theta()
    diff.step()
    got = pd.get_theta() - th0
    for i, h in enumerate((hA, hB)):
        ref, pr, _ = _problem_opt(name, None)
        ref.param_groups[0].update(h)
        ref.step()
        want = pr.get_theta() - th0
        sl = slice(0, n0) if i == 0 else slice(n0, None)
        np.testing.assert_array_equal(got[sl], want[sl])


TORCH = {
    "sgd": lambda ps: torch.optim.SGD(ps),
    "momentum": lambda ps: torch.optim.SGD(ps, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps),
    "adagrad": lambda ps: torch.optim.Adagrad(ps),
    "adadelta": lambda ps: torch.optim.Adadelta(ps),
}


def _torch_groups(name, hA, hB, A, B):
    rename = {"beta1": None, "beta2": None, "rho": "alpha" if name == "rmsprop" else "rho"}
    out = []
    for h, m in ((hA, A), (hB, B)):
        g = {"params": m.parameters()}
        for k, v in h.items():
            if k in ("beta1", "beta2"):
                g["betas"] = (h["beta1"], h["beta2"])
            else:
                g[rename.get(k, k)] = v
        out.append(g)
    return out


@pytest.mark.parametrize("name", sorted(TORCH))
def test_groups_equal_torch_optim(name):
    """Where qnref's rule is torch's (SGD, heavy ball at a constant lr, Adam, RMSprop, AdaGrad,
    AdaDelta) the groups' trajectories equal torch.optim's on the same groups (float64; the rules
    are the same up to the order of the roundings, e.g. Adam's bias corrections)."""
    data = _data()
    hA, hB = GROUPS[name]
    A, B = _two_nets()
    opt = qt.QNRefOptimizer([{"params": A.parameters(), **hA}, {"params": B.parameters(), **hB}], name)
    c = _closure(opt, {"A": A, "B": B}, data)
    A1, B1 = copy.deepcopy(A), copy.deepcopy(B)
    topt = TORCH[name](_torch_groups(name, hA, hB, A1, B1))
    tc = _closure(topt, {"A": A1, "B": B1}, data)
    for _ in range(5):
        opt.step(c)
        topt.step(tc)
    np.testing.assert_allclose(_flat(A), _flat(A1), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(_flat(B), _flat(B1), rtol=1e-12, atol=1e-14)


def test_nag_is_torch_nesterov_in_shifted_variables():
    """qnref's NAG (Sutskever) keeps θ; torch's nesterov keeps θ' = θ + μv (Bengio et al.): per group."""
    data = _data()
    hA, hB = GROUPS["nag"]
    A, B = _two_nets()
    opt = qt.QNRefOptimizer([{"params": A.parameters(), **hA}, {"params": B.parameters(), **hB}], "nag")
    c = _closure(opt, {"A": A, "B": B}, data)
    A1, B1 = copy.deepcopy(A), copy.deepcopy(B)
    topt = torch.optim.SGD([{"params": A1.parameters(), **hA}, {"params": B1.parameters(), **hB}], momentum=0.9, nesterov=True)
    tc = _closure(topt, {"A": A1, "B": B1}, data)
    for _ in range(4):
        opt.step(c)
        topt.step(tc)
    shifted = np.concatenate([_flat(A), _flat(B)]) + np.concatenate(
        [h["momentum"] * np.asarray(s.velocity) for h, s in zip((hA, hB), opt.qn_state)])
    np.testing.assert_allclose(shifted, np.concatenate([_flat(A1), _flat(B1)]), rtol=1e-12, atol=1e-14)


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.2, 0.05], total_steps=6,
                                                                cycle_momentum=False),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, [lambda k: 0.5 ** k, lambda k: 1.0 + k]),
}


@pytest.mark.parametrize("name", ["sgd", "adam"])
@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_schedulers_change_each_groups_lr_on_the_next_step(name, kind):
    data = _data()
    hA, hB = GROUPS[name]
    A, B = _two_nets()
    opt = qt.QNRefOptimizer([{"params": A.parameters(), **hA}, {"params": B.parameters(), **hB}], name)
    c = _closure(opt, {"A": A, "B": B}, data)
    A1, B1 = copy.deepcopy(A), copy.deepcopy(B)
    topt = TORCH[name](_torch_groups(name, hA, hB, A1, B1))
    tc = _closure(topt, {"A": A1, "B": B1}, data)
    s, ts = SCHEDULERS[kind](opt), SCHEDULERS[kind](topt)
    lrs = []
    for _ in range(4):
        opt.step(c)
        topt.step(tc)
        assert [q.lr for q in opt._group_qn] == [g["lr"] for g in opt.param_groups]   # used on this step
        lrs.append([g["lr"] for g in opt.param_groups])
        s.step()
        ts.step()
    assert lrs[1][0] != lrs[0][0] and lrs[1][1] != lrs[0][1]
    if kind == "LambdaLR":                        # per-group lambdas: each group's own factor
        assert lrs[1] == [hA["lr"] * 0.5, hB["lr"] * 2.0]
    np.testing.assert_allclose(_flat(A), _flat(A1), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(_flat(B), _flat(B1), rtol=1e-12, atol=1e-14)


def test_a_changed_group_lr_moves_only_that_groups_next_step():
    data = _data()
    base = []
    for change in (False, True):
        A, B = _two_nets()
        opt = qt.QNRefOptimizer([{"params": A.parameters(), "lr": 0.1}, {"params": B.parameters(), "lr": 0.1}],
                                "sgd")
        c = _closure(opt, {"A": A, "B": B}, data)
        opt.step(c)
        a0, b0 = _flat(A), _flat(B)
        if change:
            opt.param_groups[1]["lr"] = 0.05
        opt.step(c)
        base.append((_flat(A) - a0, _flat(B) - b0))
    np.testing.assert_array_equal(base[1][0], base[0][0])
    np.testing.assert_allclose(base[1][1], 0.5 * base[0][1], rtol=1e-9)


@pytest.mark.parametrize("name", ["lbfgs", "lsr1-ls", "kfac", "hf", "smw-gn", "gd-ls", "svrg"])
def test_coupled_methods_refuse_differing_groups_naming_method_and_groups(name):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    X, y = _data(0, 256)[:2]
    prob = qt.TorchProblem(net, "softmax_ce", X, y % 2, 1e-2, seed=0, layout="qnref")
    key = "lr"
    groups = [{"params": net[0].parameters()}, {"params": net[2].parameters(), key: 0.5},
              {"params": net[4].parameters(), key: 0.25}]
    with pytest.raises(ValueError, match=rf"param group 1 sets lr=0.5 .*optimizer '{name}' couples parameters.*"
                                         r"groups \[1, 2\] differ"):
        qt.QNRefOptimizer(groups, name, problem=prob)
    same = [{"params": net[0].parameters()}, {"params": net[2].parameters()}, {"params": net[4].parameters()}]
    qt.QNRefOptimizer(same, name, problem=prob).step()        # agreeing groups: one θ


def test_per_group_refusals():
    A, B = _two_nets()
    with pytest.raises(ValueError, match="batch_size must agree"):
        qt.QNRefOptimizer([{"params": A.parameters(), "batch_size": 4}, {"params": B.parameters(), "batch_size": 8}],
                          "adam")
    with pytest.raises(ValueError, match="param group 1: .*lr"):
        qt.QNRefOptimizer([{"params": A.parameters()}, {"params": B.parameters(), "lr": -1.0}], "adam")
    opt = qt.QNRefOptimizer([{"params": A.parameters()}, {"params": B.parameters()}], "momentum")
    opt.param_groups[1]["momentum"] = 1.5
    with pytest.raises(ValueError, match="param group 1: .*momentum"):
        opt.step(_closure(opt, {"A": A, "B": B}, _data()))


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_state_dict_several_groups_weights_only_resumes_bit_identically(name):
    hA, hB = GROUPS[name]
    opt, prob, net = _problem_opt(name, (hA, hB))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    for _ in range(2):
        opt.step()
        sched.step()
    sd = _roundtrip(opt.state_dict())
    assert len(sd["qnref_state"]["groups"]) == 2
    opt2, prob2, _ = _problem_opt(name, (hB, hA), net=copy.deepcopy(net))   # other values: the dict sets them
    opt2.load_state_dict(sd)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    for _ in range(3):
        opt.step()
        opt2.step()
        np.testing.assert_array_equal(prob2.get_theta(), prob.get_theta())
    assert prob2.counter.snapshot() == prob.counter.snapshot()


def test_closure_mode_add_param_group_keeps_old_state_and_resumes():
    data = _data()
    A, B = _two_nets()
    opt = qt.QNRefOptimizer(A.parameters(), "adam", lr=0.01)
    parts = {"A": A, "B": B}
    c = _closure(opt, parts, data)
    opt.step(c)
    opt.add_param_group({"params": B.parameters(), "lr": 0.003, "beta1": 0.5})
    assert isinstance(opt.qn_state, list) and opt.qn_state[1] is None
    A1, B1 = copy.deepcopy(A), copy.deepcopy(B)
    ref = qt.QNRefOptimizer(A1.parameters(), "adam", lr=0.01)
    # the reference: A's optimizer after its own first step (same state), B from fresh
    ref.load_state_dict(_roundtrip({**opt.state_dict(), "param_groups": opt.state_dict()["param_groups"][:1],
                                    "qnref_state": opt.state_dict()["qnref_state"]["groups"][0]}))
    refB = qt.QNRefOptimizer(B1.parameters(), "adam", lr=0.003, beta1=0.5)
    cA, cB = _closure(ref, {"A": A1}, data), _closure(refB, {"B": B1}, data)
    opt.step(c)
    sd = _roundtrip(opt.state_dict())
    ref.step(cA)
    refB.step(cB)
    np.testing.assert_array_equal(_flat(A), _flat(A1))
    np.testing.assert_array_equal(_flat(B), _flat(B1))
    A2, B2 = copy.deepcopy(A), copy.deepcopy(B)
    opt2 = qt.QNRefOptimizer([{"params": A2.parameters()}, {"params": B2.parameters()}], "adam")
    opt2.load_state_dict(sd)
    c2 = _closure(opt2, {"A": A2, "B": B2}, data)
    for _ in range(2):
        opt.step(c)
        opt2.step(c2)
    np.testing.assert_array_equal(_flat(A), _flat(A2))
    np.testing.assert_array_equal(_flat(B), _flat(B2))


def test_rmsprop_warm_start_with_groups_equals_one_group_per_slice():
    """RMSprop(warm_start=True) over two groups with different lr: v is warmed from one full-set
    gradient, sliced per group, so group i's first step is bit-identical to that slice of one-group
    qnref with group i's lr (after it the slices see different θ, so they differ)."""
    def make(groups):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        X, y = _data(0, 24)[:2]
        prob = qt.TorchProblem(net, "softmax_ce", X, y, 1e-2, seed=0, layout="qnref")
        ps = (net.parameters() if groups is None else
              [{"params": net[0].parameters(), **groups[0]}, {"params": net[2].parameters(), **groups[1]}])
        return qt.QNRefOptimizer(ps, "rmsprop", problem=prob, batch_size=8, warm_start=True, lr=0.01), prob, net

    two, p2, net = make(({"lr": 0.01}, {"lr": 0.003}))
    n0 = sum(p.numel() for p in net[0].parameters())
    th0 = p2.get_theta()
    two.step()
    assert len(two.qn_state) == 2 and all(s.warm_started for s in two.qn_state)
    d2 = p2.get_theta() - th0
    for lr, sl in ((0.01, slice(0, n0)), (0.003, slice(n0, None))):
        one, p1, _ = make(None)
        one.param_groups[0]["lr"] = lr
        one.step()
        assert one.qn_state.warm_started
        np.testing.assert_array_equal(d2[sl], (p1.get_theta() - th0)[sl])
    two.step()  # a later step does not warm again
    assert all(s.t == 2 for s in two.qn_state)
