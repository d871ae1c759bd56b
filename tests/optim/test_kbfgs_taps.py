"""K-BFGS builds the layer taps only on curvature steps (issue 21), and its cost floor.

Thesis §3.4.3: "when k ≢ 0 (mod T), only from Line 5 to Line 11 of Algorithm 9 is incurred" — a
forward/backward for the minibatch gradient and the preconditioned step. The taps (ā, per-example g;
conv: the patch matrices) are needed only for the curvature update, at θ and at θ⁺, every T steps.
These tests count the engine's passes by kind (``PassCounter.calls``), check that the non-curvature
path is the objective's own gradient (bit for bit) and that the curvature steps are unchanged, and
check :meth:`KBFGS.step_floor` by hand.
"""
from __future__ import annotations

import numpy as np
import pytest

from qnref.nn.activations import Tanh
from qnref.nn.conv import Conv2d
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.nn.norm import BatchNorm
from qnref.nn.reshape import Flatten
from qnref.nn.zoo import build_model
from qnref.optim.base import Problem
from qnref.optim.costs import algebra_flops
from qnref.optim.kbfgs import KBFGS, KBFGSL


def problem(kind, seed=0):
    r = np.random.default_rng(seed)
    if kind == "mlp":
        m = Sequential([Dense(6), Tanh(), Dense(4), Tanh(), Dense(3)], input_shape=(5,))
        X = r.standard_normal((40, 5))
    elif kind == "mlp-bn":
        m = Sequential([Dense(6), Tanh(), BatchNorm(), Dense(4), Tanh(), Dense(3)], input_shape=(5,))
        X = r.standard_normal((40, 5))
    else:
        m = Sequential([Conv2d(3, 3, padding=1), Tanh(), Conv2d(4, 2, stride=2), Tanh(), Flatten(), Dense(3)],
                       input_shape=(1, 6, 6))
        X = r.standard_normal((40, 1, 6, 6))
    return m, m.init(seed), Problem(m, "softmax_ce", X, r.integers(0, 3, 40), seed=seed)


def calls(prob):
    c = prob.counter.calls
    return c.get("layer_stats", 0), c.get("grad", 0)


@pytest.mark.parametrize("kind", ["mlp", "mlp-bn", "conv"])
@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_taps_only_on_curvature_steps(kind, cls):
    """T = 3: steps 1, 2, 4, 5 make one backward pass (the plain gradient, no taps); steps 3 and 6 make
    the taps at θ and at θ⁺ (2 layer_stats passes) and, with BatchNorm blocks, the gradient too."""
    m, th, prob = problem(kind)
    opt = cls(lr=0.05, batch_size=8, curvature_freq=3)
    st = opt.init(th)
    for k in range(1, 7):
        before = calls(prob)
        th, st, info = opt.step(th, st, prob)
        if k == 1:
            continue                              # the warm start's taps over the whole training set
        d_taps, d_grad = (x - y for x, y in zip(calls(prob), before))
        if k % 3:
            assert (d_taps, d_grad) == (0, 1), (k, d_taps, d_grad)
            assert info.evals == 1
        else:
            assert (d_taps, d_grad) == (2, 1 if kind == "mlp-bn" else 0), (k, d_taps, d_grad)
            assert info.evals == 2


def test_non_curvature_step_is_the_objectives_gradient_step():
    """A non-curvature step of ch3 K-BFGS moves θ by exactly −α (H_G (βĝ + ∇f) H_A) with ∇f the objective's
    own ``Point.grad`` (the engine's gradient path, bit for bit), and leaves H_A, H_G, s_G, y_G alone."""
    m, th, prob = problem("mlp")
    opt = KBFGS(lr=0.05, batch_size=8, curvature_freq=5)
    st = opt.init(th)
    th, st, _ = opt.step(th, st, prob)
    saved = prob.state()
    import copy
    HA = copy.deepcopy(st.HA)
    HG = copy.deepcopy(st.HG)
    mom0 = st.mom.copy()
    th2, st2, _ = opt.step(th, st, prob)
    prob.load_state(saved)
    g = prob.batch(8).at(th).grad
    mom = 0.9 * mom0 + g
    np.testing.assert_array_equal(st2.mom, mom)
    views = m.layout.views(mom)
    P = mom / opt.damping
    pv = m.layout.views(P)
    for layer in m.kron_layers:
        b = m.layout.blocks.index(m.layout.index(f"{layer.name}.W"))
        pv[b][...] = HG[layer.name] @ (views[b] @ HA[layer.name])
    np.testing.assert_array_equal(th2, th - 0.05 * P)
    for name in HA:
        np.testing.assert_array_equal(st2.HA[name], HA[name])
        np.testing.assert_array_equal(st2.HG[name], HG[name])


def test_curvature_steps_form_the_gradient_from_the_taps():
    """On a curvature step of a net without other blocks the gradient is still gᵀā/N from the taps
    (one backward for gradient and statistics): T = 1 keeps every recorded trajectory bit for bit."""
    m, th, prob = problem("mlp")
    opt = KBFGS(lr=0.05, batch_size=8, curvature_freq=1)
    st = opt.init(th)
    for _ in range(3):
        before = calls(prob)
        th, st, _ = opt.step(th, st, prob)
    assert tuple(x - y for x, y in zip(calls(prob), before)) == (2, 0)


def test_algebra_flops_amortize_grad_from_taps():
    m, _, _ = problem("mlp")
    t1 = algebra_flops(KBFGS(curvature_freq=1), m, 8)["terms"]
    t4 = algebra_flops(KBFGS(curvature_freq=4), m, 8)["terms"]
    assert t1["grad_from_taps"] == sum(9 * o * a for o, a in [(6, 6), (4, 7), (3, 5)])
    assert abs(t1["grad_from_taps"] - 4 * t4["grad_from_taps"]) <= 2
    assert t1["precondition"] == t4["precondition"]


def test_step_floor_by_hand():
    """Dense 5-6-4-3 net, batch 8, T = 4, K-BFGS (BFGS): layers (o, a) = (6, 6), (4, 7), (3, 5)."""
    m, _, _ = problem("mlp")
    fl = KBFGS(curvature_freq=4).step_floor(m, 8)
    lay = [(6, 6), (4, 7), (3, 5)]
    G = sum(3 * 8 * o * a for o, a in lay)
    pre = sum(o * a * a + o * o * a for o, a in lay)
    curv = sum(2 * 8 * a + 7 * a * a + 2 * o * a + 8 * o * o for o, a in lay) / 4
    assert fl["gradient"] == G and fl["precondition"] == pre and fl["curvature"] == pytest.approx(curv)
    assert fl["extra_passes"] == 0.25 and fl["second_pass"] == pytest.approx(2 * G / 12)
    assert fl["floor"] == pytest.approx(1 + (2 * G / 12 + pre + curv) / G)
    assert fl["passes"] == pytest.approx(1 + 2 / 12)
    flL = KBFGSL(curvature_freq=4, memory=10).step_floor(m, 8)
    assert flL["precondition"] == sum(o * a * a + 40 * o * a for o, a in lay)


def test_step_floor_resnet20_is_near_one_plus_two_thirds_over_T():
    """ResNet-20, batch 128, T = 20: the preconditioning and curvature algebra are small next to the
    gradient's GEMMs (|T| = 1024, 256, 64 locations), so the floor is ≈ 1 + (2/3)/20 + a few percent."""
    m = build_model("resnet20")
    fl = KBFGS(curvature_freq=20).step_floor(m, 128)
    assert 1 + 2 / 60 < fl["floor"] < 1.06, fl
    conv = [L for L in m.kron_layers if not getattr(L, "kron_dense", False)]
    assert len(conv) >= 19


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_kbfgs_l_builds_each_layers_compact_operator_once_per_step(kind, monkeypatch):
    """K-BFGS(L): the preconditioning and the H_G update's products of a step see the same pairs, so
    the compact operator (its O(p²o + p³) middle) is built once per layer and step, and the steps are
    bit for bit those that build it for every product."""
    import qnref.optim.kbfgs as kb

    built = []

    class Counting(kb.LBFGSOperator):
        def __init__(self, *a, **k):
            built.append(1)
            super().__init__(*a, **k)

    def run():
        m, th, prob = problem(kind)
        opt = KBFGSL(lr=0.05, batch_size=8, memory=4)
        st = opt.init(th)
        th, st, _ = opt.step(th, st, prob)      # the warm start
        counts = []
        for _ in range(6):
            built.clear()
            th, st, _ = opt.step(th, st, prob)
            counts.append(len(built))
        return th, counts

    monkeypatch.setattr(kb, "LBFGSOperator", Counting)
    th_shared, counts = run()
    with monkeypatch.context() as mp:       # every product builds its own operator
        plain = KBFGSL._apply_HG
        mp.setattr(KBFGSL, "_apply_HG", lambda self, st, name, X, ops=None: plain(self, st, name, X))
        th_each, counts_each = run()
    layers = len(kb.kc.kron_structure(problem(kind)[0])[0])
    assert counts == [layers] * 6                     # one operator per layer and step
    assert all(c >= 2 * layers for c in counts_each)  # the preconditioning and H_G y each built one
    np.testing.assert_array_equal(th_shared, th_each)
