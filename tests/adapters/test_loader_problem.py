"""LoaderProblem: batches from a DataLoader, extra samples from a declared in-memory subset;
BatchNorm running statistics and parameters follow a plain torch loop over the same loader."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qnref_torch as qt


def _data():
    rng = np.random.default_rng(0)
    X = torch.from_numpy(rng.standard_normal((40, 4)))
    y = torch.from_numpy(rng.integers(0, 3, 40))
    return X, y


def test_dataloader_sgd_with_batchnorm_matches_a_plain_torch_loop():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    ref = copy.deepcopy(net)
    X, y = _data()
    loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=False)
    prob = qt.LoaderProblem(net, "softmax_ce", loader, extra=(X[:16], y[:16]), seed=0)
    opt = qt.QNRefOptimizer(net.parameters(), "sgd", problem=prob, lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for epoch in range(2):
        for xb, yb in loader:              # the plain torch loop
            ref_opt.zero_grad()
            nn.functional.cross_entropy(ref(xb), yb).backward()
            ref_opt.step()
        for _ in range(len(loader)):
            opt.step()
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for buf in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(net[1], buf), getattr(ref[1], buf), rtol=1e-12, atol=1e-14)
    assert prob.epochs == pytest.approx(2.0)


@pytest.mark.parametrize("name", ["kfac", "hf", "mb-lsr1"])
def test_dataloader_feeds_methods_that_need_extra_samples(name):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = _data()
    loader = DataLoader(TensorDataset(X, y), batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(0))
    prob = qt.LoaderProblem(net, "softmax_ce", loader, extra=(X[:20], y[:20]), l2=1e-3, layout="qnref")
    hp = {"curvature_batch": 8} if name == "hf" else {}
    opt = qt.QNRefOptimizer(net.parameters(), name, problem=prob, **hp)
    th0 = prob.get_theta()
    losses = []
    for _ in range(6):
        losses.append(float(opt.step()))
        assert all(o.n_samples == 10 for o in prob.drawn_batches)     # minibatches come from the loader
    assert all(np.isfinite(losses))
    assert np.abs(prob.get_theta() - th0).max() > 0


def test_loader_problem_errors():
    net = nn.Sequential(nn.Linear(4, 3)).double()
    with pytest.raises(TypeError, match="extra must be"):
        qt.LoaderProblem(net, "softmax_ce", [], extra=None)
    with pytest.raises(ValueError, match="n_samples"):
        qt.LoaderProblem(net, "softmax_ce", iter([]), extra=_data())


def _loader(X, y, seed=0):
    return DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,at", [("sgd", 3), ("sgd", 5), ("hf", 7), ("kfac", 4)])
def test_state_dict_resumes_the_loader_position_bit_identically(name, at):
    """Save after ``at`` steps (5 batches per pass: mid-pass, at the pass end, in the second pass),
    load into a fresh optimizer over a fresh DataLoader seeded the same way: the next steps (crossing
    a pass boundary) are bit-identical, the subset sampler's draws (HF's curvature batches) too."""
    import io

    X, y = _data()
    hp = {"curvature_batch": 8} if name == "hf" else {"lr": 0.05}

    def build(net, seed=0):
        prob = qt.LoaderProblem(net, "softmax_ce", _loader(X, y, seed), extra=(X[:20], y[:20]), l2=1e-3,
                                layout="qnref" if name == "kfac" else "torch")
        return prob, qt.QNRefOptimizer(net.parameters(), name, problem=prob, **hp)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    if name == "kfac":
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    prob, opt = build(net)
    for _ in range(at):
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    net2 = copy.deepcopy(net)
    for _ in range(8):
        opt.step()
    prob2, opt2 = build(net2)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(8):
        opt2.step()
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert prob.epoch_passes == prob2.epoch_passes and prob.samples_drawn == prob2.samples_drawn
    assert torch.equal(prob.loader.generator.get_state(), prob2.loader.generator.get_state())


def test_loader_state_refuses_a_different_loader():
    X, y = _data()
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    prob = qt.LoaderProblem(net, "softmax_ce", _loader(X, y), extra=(X[:20], y[:20]))
    prob.batch(8)
    st = prob.state()
    plain = qt.LoaderProblem(net, "softmax_ce", DataLoader(TensorDataset(X, y), batch_size=8), extra=(X[:20], y[:20]))
    with pytest.raises(ValueError, match="torch.Generator"):
        plain.load_state(st)
    short = qt.LoaderProblem(net, "softmax_ce", [(X[:8], y[:8])], extra=(X[:20], y[:20]), n_samples=40)
    st["loader"]["generators"], st["loader"]["pos"] = [], 3
    with pytest.raises(ValueError, match="fewer than 3 batches"):
        short.load_state(st)
