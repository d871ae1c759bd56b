"""Any nn.Module of supported layers converts (torch.fx): a custom module with a residual block and
functional calls agrees with torch.func on grad/Hv/Gv to ≤ 1e-12 (float64), in train (batch
statistics) and eval mode; unsupported ops are named with their source line; compare tests biases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qnref_torch as qt


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.bn(self.conv1(x)))
        return torch.tanh(x + self.conv2(h))          # residual addition, functional activation


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.block = Block(3)
        self.head = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        x = F.softplus(self.stem(x))
        x = F.max_pool2d(self.block(x), 2)
        x = x.view(x.size(0), -1)
        return self.head(torch.sigmoid(x))


class GapNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.avg_pool2d(self.conv(x).relu(), 2, stride=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _data(shape, n=8, c=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n,) + shape), rng.integers(0, c, n)


@pytest.mark.parametrize("train", [True, False])
def test_custom_module_converts_and_agrees_with_torch_func(train):
    torch.manual_seed(0)
    net = Net().double()
    X, y = _data((1, 6, 6))
    with torch.no_grad():
        net(torch.from_numpy(X))                      # non-trivial running statistics
    net.train(train)
    what = ("grad", "hvp", "ggn", "jvp", "vjp") + (() if train else ("fisher", "kfac_factors"))
    res = qt.assert_agree(net, "softmax_ce", X, y, what=what, rtol=1e-12)
    assert set(what) <= set(res)
    conv = qt.convert(net, (1, 6, 6))
    assert [pm.torch_name for pm in conv.params][:2] == ["stem.weight", "stem.bias"]
    assert "block.conv2.weight" in {pm.torch_name for pm in conv.params}


def test_global_pool_and_methods_convert():
    torch.manual_seed(1)
    net = GapNet().double()
    X, y = _data((2, 6, 6), c=3)
    qt.assert_agree(net, "softmax_ce", X, y, what=("grad", "hvp", "ggn", "fisher", "kfac_factors"), rtol=1e-12)


class Exp(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return torch.exp(self.lin(x))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(self.lin(x))


def test_unsupported_op_is_named_with_its_source_line():
    with pytest.raises(qt.UnsupportedLayerError, match=r"unsupported op torch\.exp at File .*test_fx_conversion\.py.*line"):
        qt.convert(Exp().double(), (4,))
    with pytest.raises(qt.UnsupportedLayerError, match="called twice"):
        qt.convert(Shared().double(), (4,))


def test_compare_default_theta_moves_biases_and_train_mode_per_example_refusal():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    nn.init.zeros_(net[0].bias)
    X, y = _data((4,), c=3)
    res = qt.compare(net, "softmax_ce", X, y, what=("grad",))
    assert res["grad"] <= 1e-12
    same = qt.compare(net, "softmax_ce", X, y, what=("grad",), theta="module")
    assert same["grad"] <= 1e-12
    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match="module.eval"):
        qt.compare(bn, "softmax_ce", X, y, what=("fisher",))


def test_layer_stats_by_torch_path_and_running_stats_getter_setter():
    torch.manual_seed(0)
    net = Net().double()
    X, y = _data((1, 6, 6))
    with torch.no_grad():
        net(torch.from_numpy(X))
    net.eval()
    prob = qt.TorchProblem(net, "softmax_ce", torch.from_numpy(X), torch.from_numpy(y), layout="qnref")
    pt = prob.full_objective.at(prob.get_theta())
    by_path = pt.layer_stats(keys="torch")
    assert list(by_path) == ["stem", "block.conv1", "block.conv2", "head"]      # first to last
    by_name = pt.layer_stats()
    conv = prob.conversion
    for name, path in conv.layer_paths.items():
        if name in by_name:
            np.testing.assert_array_equal(by_path[path]["a"], by_name[name]["a"])
    st = qt.running_stats(net)
    assert list(st) == ["block.bn"] and st["block.bn"]["num_batches_tracked"] == 1
    conv2 = qt.convert(net, (1, 6, 6))
    np.testing.assert_array_equal(qt.running_stats(conv2)["block.bn"]["running_mean"], st["block.bn"]["running_mean"])
    new = {"block.bn": {"running_mean": np.full(3, 0.5), "running_var": np.full(3, 2.0), "num_batches_tracked": 7}}
    qt.set_running_stats(net, new)
    qt.set_running_stats(conv2, new)
    assert int(net.block.bn.num_batches_tracked) == 7
    np.testing.assert_array_equal(qt.running_stats(conv2)["block.bn"]["running_var"], np.full(3, 2.0))
    qt.assert_agree(net, "softmax_ce", X, y, what=("grad", "hvp"), rtol=1e-12)   # eval mode uses the new statistics
    with pytest.raises(KeyError, match="no BatchNorm"):
        qt.set_running_stats(net, {"stem": new["block.bn"]})
