"""RMSprop's warm start of Ren's thesis §2.8 (L832-840): "we estimate the following curvature
information using the entire training set before we start updating parameters ... ∇f ⊙ ∇f for
RMSprop" (issue 20). v₀ = ∇f(θ₀)⊙∇f(θ₀) with ∇f the full-batch gradient, then the lecture's
v ← ρv + (1 − ρ)g⊙g. The oracle gradient is the hand-written MLP gradient of test_soc_methods.py
(dense, full batch, no qnref forward or backward)."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from qnref.optim import make_optimizer
from qnref.optim.base import state_from_host, state_to_host
from qnref.optim.first_order import RMSpropState
from test_soc_methods import mlp_loss_grad, peek_batch, setup

RTOL = 1e-12


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("beta1", [0.0, 0.9])
@pytest.mark.parametrize("batch_size", [64, None])
def test_first_step_uses_the_full_batch_gradient_squared(beta1, batch_size):
    _, theta, prob = setup(n=300)
    X, y = np.asarray(prob.X), np.asarray(prob.y)
    lr, rho, eps = 1e-2, 0.9, 1e-8
    opt = make_optimizer("rmsprop", lr=lr, rho=rho, eps=eps, beta1=beta1, batch_size=batch_size, warm_start=True)
    g_full = mlp_loss_grad(theta, X, y)[1]                     # ∇f on all 300 examples
    b = peek_batch(prob, batch_size or 300)
    g1 = mlp_loss_grad(theta, np.asarray(b.X), np.asarray(b.y))[1]
    state = opt.init(theta)
    assert not state.warm_started
    new, st, info = opt.step(theta, state, prob)
    v1 = rho * g_full * g_full + (1 - rho) * g1 * g1
    m1 = (1 - beta1) * g1 if beta1 else g1                     # m starts at 0 (thesis: ∇̂f "initialized as zero")
    assert info.accepted and st.warm_started and st.t == 1
    assert rel(st.v, v1) <= RTOL
    assert rel(new - theta, -lr * m1 / (np.sqrt(v1) + eps)) <= RTOL
    # the warm start reads the training set but is not training data: epochs count the batch only
    assert prob.epochs == pytest.approx((batch_size or 300) / 300)
    # later steps: the usual recursion (no second warm start)
    b2 = peek_batch(prob, batch_size or 300)
    g2 = mlp_loss_grad(new, np.asarray(b2.X), np.asarray(b2.y))[1]
    _, st2, _ = opt.step(new, st, prob)
    assert rel(st2.v, rho * v1 + (1 - rho) * g2 * g2) <= RTOL


def test_default_is_the_lecture_v0_zero():
    _, theta, prob = setup(n=300)
    opt = make_optimizer("rmsprop", batch_size=50)
    b = peek_batch(prob, 50)
    g1 = mlp_loss_grad(theta, np.asarray(b.X), np.asarray(b.y))[1]
    _, st, _ = opt.step(theta, opt.init(theta), prob)
    assert rel(st.v, 0.1 * g1 * g1) <= RTOL and not st.warm_started
    # and the warm start changes the step (the test above would catch a warm start left out)
    warm = make_optimizer("rmsprop", batch_size=50, warm_start=True)
    _, _, prob2 = setup(n=300)
    _, st_w, _ = warm.step(theta, warm.init(theta), prob2)
    assert rel(st_w.v, st.v) > 1e-2


def test_warm_start_passes_are_counted_and_the_state_checkpoints():
    _, theta, prob = setup(n=300)
    opt = make_optimizer("rmsprop", batch_size=100, warm_start=True)
    before = prob.counter.snapshot()
    _, st, _ = opt.step(theta, opt.init(theta), prob)
    assert prob.counter.snapshot() != before
    back = state_from_host(RMSpropState, state_to_host(st))
    assert back.warm_started is True and np.array_equal(back.v, st.v) and back.t == 1


def test_the_update_rule_alone_refuses_an_unwarmed_state():
    """Adapters that feed their own gradient to ``_update`` cannot warm-start: refused, not ignored."""
    _, theta, _ = setup(n=300)
    opt = make_optimizer("rmsprop", warm_start=True)
    with pytest.raises(ValueError, match="warm_start"):
        opt._update(theta, theta * 0 + 1.0, opt.init(theta))
    make_optimizer("rmsprop")._update(theta, theta * 0 + 1.0, make_optimizer("rmsprop").init(theta))


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_warm_start_takes_bools_only(bad):
    with pytest.raises(ValueError, match="warm_start"):
        make_optimizer("rmsprop", warm_start=bad)
