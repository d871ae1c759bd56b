"""Type-2 (exact-expectation) Kronecker taps through the torch adapter: ``point.layer_stats("exact",
keys="torch")`` on a torch model equals label enumeration done in torch autograd —
Σ_c g[i, c] g[i, c]ᵀ = Σ_y p(y | xᵢ) ∇ₕℓ(xᵢ, y) ∇ₕℓ(xᵢ, y)ᵀ for each example and layer (float64, 1e-12)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

import qnref_torch as qt


def test_exact_taps_equal_torch_label_enumeration():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    prob = qt.TorchProblem(net, "softmax_ce", X, y, layout="qnref")
    taps = prob.full_objective.at(prob.get_theta()).layer_stats("exact", keys="torch")
    assert list(taps) == ["0", "2"]
    for i in range(X.shape[0]):
        pre = {}
        hooks = [net[k].register_forward_hook(lambda m, inp, out, k=k: pre.__setitem__(str(k), out)) for k in (0, 2)]
        logits = net(X[i:i + 1])
        for h in hooks:
            h.remove()
        p = torch.softmax(logits, -1)[0].detach()
        want = {k: 0.0 for k in pre}
        for c in range(3):
            loss = nn.functional.cross_entropy(logits, torch.tensor([c]))
            grads = torch.autograd.grad(loss, [pre["0"], pre["2"]], retain_graph=True)
            for k, g in zip(("0", "2"), grads):
                want[k] = want[k] + p[c] * torch.outer(g[0], g[0])
        for k in ("0", "2"):
            g = np.asarray(taps[k]["g"][i])                       # (C, out): the class axis of the exact taps
            np.testing.assert_allclose(g.T @ g, want[k].numpy(), rtol=1e-12, atol=1e-14)
            a = np.asarray(taps[k]["a"][i])                       # layer input with the bias column
            x_in = X[i] if k == "0" else torch.tanh(pre["0"][0]).detach()
            np.testing.assert_allclose(a[:-1], x_in.numpy(), rtol=1e-13)
            assert a[-1] == 1.0
