"""Every registered optimizer × {torch problem mode, torch closure mode, JAX} on a small MLP and a
small BatchNorm CNN, 5 steps in float64: each trajectory equals qnref's own engine on the converted
model to 1e-10 relative, or the mode refuses with one clear error at construction.

Order of θ: problem mode and JAX run in qnref's layout (``TorchProblem(..., layout="qnref")``,
``JaxProblem`` on a spec, whose layout is qnref's), so methods that draw random directions in θ's
order (s-lbfgs, s-lsr1) draw the same ones as the engine. Closure mode reads θ in torch's order
(the parameters as the closure sees them); the methods it runs draw nothing in θ's order, and
the comparison maps the engine's θ to torch's parameters.

``python -m pytest tests/adapters/test_matrix.py -s`` prints the matrix.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

import qnref_torch as qt
from qnref.optim import load_all
from qnref.optim.base import Problem
from qnref.optim.registry import OPTIMIZERS, make_optimizer
from adapter_fixtures import FullBatchProblem, small_batches

load_all()
NAMES = sorted(OPTIMIZERS)
STEPS = 5
RTOL = 1e-10
L2 = 1e-2
RESULTS: dict[tuple[str, str, str], str] = {}


def hyper(name: str) -> dict:
    """Small batches for the 24-example problems (the paper defaults assume thousands of examples)."""
    hp = small_batches(name)
    if name == "hf":
        # CG would otherwise converge to machine precision on these tiny problems, and Martens'
        # backtracking over CG iterates (keep going back while f decreases) then compares f values
        # equal to roundoff: a knife edge (iterate 5 vs 14 on the BN CNN under XLA -O0), not a
        # difference of implementations. Ten iterations keep the compared iterates distinct.
        hp["max_cg_iters"] = 10
    return hp


def make_model(kind: str) -> tuple[nn.Module, np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        X = rng.standard_normal((24, 4))
    else:
        # BatchNorm after the activation: a conv layer feeding BatchNorm directly has Σᵢ ∂ℓ/∂hᵢ = 0 per
        # channel, so K-BFGS's mean pre-activation gradient there is pure roundoff (any two correct
        # implementations then differ at O(1) after one step; the engine itself is not reproducible there)
        net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.BatchNorm2d(2), nn.MaxPool2d(2),
                            nn.Flatten(), nn.Linear(18, 3))
        X = rng.standard_normal((24, 1, 6, 6))
    net = net.double()
    with torch.no_grad():  # non-zero biases
        for n_, p in net.named_parameters():
            if n_.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    y = rng.integers(0, 3, 24)
    return net, X, y


def engine_run(name: str, model, theta0, X, y, *, full_batch: bool) -> list[np.ndarray]:
    opt = make_optimizer(name, **hyper(name))
    cls = FullBatchProblem if full_batch else Problem
    prob = cls(model, "softmax_ce", X, y, L2, seed=0, train=True)
    th, st, out = theta0.copy(), opt.init(theta0.copy()), []
    for _ in range(STEPS):
        th, st, _ = opt.step(th, st, prob)
        out.append(th.copy())
    return out


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def check_traj(got: list[np.ndarray], ref: list[np.ndarray], theta0: np.ndarray) -> None:
    for k, (a, b) in enumerate(zip(got, ref)):
        assert rel(a, b) <= RTOL, f"step {k}: relative difference {rel(a, b):.3e}"


def _run_cell(name, kind, mode):
    net, X, y = make_model(kind)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    conv = qt.convert(net, X.shape[1:])
    theta0 = conv.theta.copy()
    if mode == "torch-problem":
        prob = qt.TorchProblem(net, "softmax_ce", Xt, yt, L2, seed=0, layout="qnref")
        np.testing.assert_array_equal(prob.get_theta(), theta0)
        opt = qt.QNRefOptimizer(net.parameters(), name, problem=prob, **hyper(name))
        ref = engine_run(name, conv.model, theta0, X, y, full_batch=False)
        got = []
        for _ in range(STEPS):
            opt.step()
            got.append(prob.get_theta())
        return got, ref, theta0
    # closure mode: θ in torch's order; compare in qnref's layout (a read-back through the conversion)
    opt = qt.QNRefOptimizer(net.parameters(), name, n_samples=len(y), **hyper(name))
    reader = qt.TorchProblem(net, "softmax_ce", Xt, yt, L2, layout="qnref")
    loss_fn = qt.qnref_loss_torch("softmax_ce")

    def closure():
        opt.zero_grad()
        loss = loss_fn(net(Xt), yt) + 0.5 * L2 * sum((p * p).sum() for p in net.parameters())
        loss.backward()
        return loss

    ref = engine_run(name, conv.model, theta0, X, y, full_batch=True)
    got = []
    for _ in range(STEPS):
        opt.step(closure)
        got.append(reader.get_theta())
    return got, ref, theta0


TORCH_MODES = ("torch-problem", "torch-closure")


@pytest.mark.parametrize("kind", ["mlp", "bn-cnn"])
@pytest.mark.parametrize("mode", TORCH_MODES)
@pytest.mark.parametrize("name", NAMES)
def test_torch_matrix(name, mode, kind):
    need = qt.requirement(make_optimizer(name))
    if mode == "torch-closure" and need != "grad":
        net, _, _ = make_model(kind)
        with pytest.raises(ValueError, match="closure mode .* use problem mode"):
            qt.QNRefOptimizer(net.parameters(), name, **hyper(name))
        RESULTS[(name, mode, kind)] = "refused"
        return
    try:
        got, ref, theta0 = _run_cell(name, kind, mode)
    except ValueError as e:
        # the engine refuses the same way (per-example quantities of a BatchNorm net in training mode)
        assert "independent examples" in str(e), e
        net, X, y = make_model(kind)
        conv = qt.convert(net, X.shape[1:])
        with pytest.raises(ValueError, match="independent examples"):
            engine_run(name, conv.model, conv.theta.copy(), X, y, full_batch=mode == "torch-closure")
        RESULTS[(name, mode, kind)] = "refused (BN train; engine too)"
        return
    check_traj(got, ref, theta0)
    moved = rel(ref[-1], theta0) > 0
    RESULTS[(name, mode, kind)] = "ok" if moved else "ok (θ unmoved)"


def _jax_cell(name, kind):
    import jax

    import qnref_jax as qj

    net, X, y = make_model(kind)
    conv = qt.convert(net, X.shape[1:])
    theta0 = conv.theta.copy()
    spec = qj.to_spec(conv.model, theta0)
    prob = qj.JaxProblem.from_spec(spec, "softmax_ce", X, y, L2, seed=0, train=True)
    params = qj.split(spec)[1]
    np.testing.assert_array_equal(prob.get_theta(params), theta0)
    tx = qj.transformation(name, problem=prob, **hyper(name))
    ref = engine_run(name, conv.model, theta0, X, y, full_batch=False)
    with qj.x64_scope():
        state = tx.init(params)
        got = []
        for _ in range(STEPS):
            updates, state = tx.update(None, state, params)
            params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
            got.append(prob.get_theta(params))
    return got, ref, theta0


@pytest.mark.parametrize("kind", ["mlp", "bn-cnn"])
@pytest.mark.parametrize("name", NAMES)
def test_jax_matrix(name, kind):
    try:
        got, ref, theta0 = _jax_cell(name, kind)
    except ValueError as e:
        assert "independent examples" in str(e), e
        net, X, y = make_model(kind)
        conv = qt.convert(net, X.shape[1:])
        with pytest.raises(ValueError, match="independent examples"):
            engine_run(name, conv.model, conv.theta.copy(), X, y, full_batch=False)
        RESULTS[(name, "jax", kind)] = "refused (BN train; engine too)"
        return
    check_traj(got, ref, theta0)
    RESULTS[(name, "jax", kind)] = "ok" if rel(ref[-1], theta0) > 0 else "ok (θ unmoved)"


def test_requirements_cover_every_optimizer():
    assert set(qt.NEEDS) == set(OPTIMIZERS)


@pytest.fixture(scope="module", autouse=True)
def _print_matrix():
    yield
    if not RESULTS:
        return
    cols = sorted({(m, k) for (_, m, k) in RESULTS})
    w = max(len(f"{m}/{k}") for m, k in cols) + 2
    lines = ["optimizer   " + "".join(f"{m}/{k}".ljust(w) for m, k in cols)]
    for n in NAMES:
        lines.append(n.ljust(12) + "".join(RESULTS.get((n, m, k), "-").ljust(w) for m, k in cols))
    print("\n" + "\n".join(lines))
