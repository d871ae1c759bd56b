"""L-SR1 (trust region, line search) and L-BFGS against scipy, hand-computed Algorithm 1 steps,
safeguards, and the L-SR1 paper's qualitative claim at small scale."""
import math

import numpy as np
import pytest
import scipy.optimize as so
from sklearn.datasets import load_digits

from qnref.curvature.function import FunctionProblem, rosenbrock_problem
from qnref.curvature.objective import Objective
from qnref.nn.activations import ReLU, Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim import make_optimizer
from qnref.optim.base import Problem, state_from_host, state_to_host
from qnref.optim.operators import LSR1Operator, lsr1_prune_count
from qnref.optim.lbfgs import LBFGS
from qnref.optim.lsr1 import LSR1LineSearch, LSR1TrustRegion
from qnref.optim.pairs import PairStore
from qnref.train import Data, train


def run(opt, problem, theta, steps):
    state = opt.init(theta)
    infos = []
    for _ in range(steps):
        theta, state, info = opt.step(theta, state, problem)
        infos.append(info)
    return theta, state, infos


@pytest.mark.parametrize("name", ["lsr1-tr", "lsr1-ls", "lbfgs"])
@pytest.mark.parametrize("n", [2, 6])
def test_rosenbrock_minimum(name, n):
    prob = rosenbrock_problem(n)
    x0 = np.full(n, -1.2)
    x0[1::2] = 1.0
    ref = so.minimize(prob.objective.fun, x0, jac=prob.objective.grad_fn, method="BFGS", options={"gtol": 1e-10})
    opt = make_optimizer(name, batch_size=None, **({"memory": 10} if name != "lbfgs" else {}))
    x, _, infos = run(opt, prob, x0, 400)
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(x, np.ones(n), atol=1e-6)
    np.testing.assert_allclose(x, ref.x, atol=1e-5)


def logistic(seed=0, n=60, d=5, c=3, l2=1e-2):
    r = np.random.default_rng(seed)
    X = r.standard_normal((n, d))
    y = r.integers(0, c, n)
    model = Sequential([Dense(c)], input_shape=(d,))
    return model, Problem(model, "softmax_ce", X, y, l2=l2, seed=seed)


@pytest.mark.parametrize("name", ["lsr1-tr", "lsr1-ls", "lbfgs"])
def test_logistic_regression_matches_scipy(name):
    model, prob = logistic()
    obj = prob.full_objective
    th0 = model.init(0)
    ref = so.minimize(lambda t: obj.value(t), th0, jac=lambda t: obj.grad(t), method="L-BFGS-B",
                      options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 5000})
    th, _, _ = run(make_optimizer(name, batch_size=None), prob, th0, 300)
    assert np.linalg.norm(obj.grad(th)) < 1e-8
    np.testing.assert_allclose(th, ref.x, atol=1e-6)


def quadratic(n=6, seed=0, indefinite=False):
    r = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(r.standard_normal((n, n)))
    ev = np.linspace(0.5, 4.0, n)
    if indefinite:
        ev[0] = -1.0
    A = Q @ np.diag(ev) @ Q.T
    b = r.standard_normal(n)
    return A, b, FunctionProblem(lambda x: 0.5 * x @ A @ x - b @ x, lambda x: A @ x - b, lambda x, v: A @ v)


@pytest.mark.parametrize("gram_cache", [True, False])
def test_algorithm1_steps_by_hand(gram_cache):
    """Replays Algorithm 1 of Ramamurthy & Duffy with dense SR1 algebra and the paper's constants
    (Gram route, the default, and the exact-QR reference route)."""
    A, b, prob = quadratic()
    x = np.zeros(6)
    opt = LSR1TrustRegion(memory=5, batch_size=None, gram_cache=gram_cache)
    state = opt.init(x)
    f = lambda z: 0.5 * z @ A @ z - b @ z  # noqa: E731
    delta = np.linalg.norm(A @ x - b)  # Δ₀ = ‖∇f(x₀)‖
    for k in range(8):
        g = A @ x - b
        x_new, state, info = opt.step(x, state, prob)
        mem = state.memory
        s = x_new - x if info.accepted else None
        if k == 0:  # s₀ = −∇f(x₀), B₀ = I: pred = ‖g‖² − ½‖g‖²
            np.testing.assert_allclose(x_new - x, -g, rtol=1e-14)
            np.testing.assert_allclose(info.extra["pred"], 0.5 * g @ g, rtol=1e-14)
        rho = info.extra["rho"]
        assert info.accepted == (rho > 1e-4)  # line 13, η = 1e-4
        if s is not None:
            ared = f(x) - f(x_new)
            np.testing.assert_allclose(info.extra["ared"], ared, rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(rho, ared / info.extra["pred"], rtol=1e-14)
            # s recovered as fl(x + s) − x carries up to ε/2·|x + s| per entry: absolute tolerance
            np.testing.assert_allclose(info.extra["trial_norm"], np.linalg.norm(s), rtol=1e-14,
                                       atol=np.finfo(float).eps * np.linalg.norm(x_new))
        # radius rule, lines 18–25, applied to accepted and rejected steps alike
        sn = info.extra["trial_norm"]
        exp = 2 * delta if (rho > 0.75 and sn > 0.8 * delta) else (0.5 * delta if rho < 0.1 else delta)
        np.testing.assert_allclose(info.radius, exp, rtol=1e-14)
        delta = exp
        if s is not None:
            x = x_new
        if mem.count:  # exact pairs of a quadratic: every stored pair satisfies B sᵢ = yᵢ = A sᵢ
            B = LSR1Operator.from_pairs(mem.S, mem.Y, 1.0)
            np.testing.assert_allclose(B.matvec(mem.S.T).T, mem.S @ A, rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(mem.Y, mem.S @ A, rtol=1e-12, atol=1e-12)


def test_trust_region_on_indefinite_quadratic_uses_negative_curvature():
    A, b, prob = quadratic(indefinite=True)
    x, _, infos = run(LSR1TrustRegion(memory=6, batch_size=None), prob, np.zeros(6), 60)
    f = lambda z: 0.5 * z @ A @ z - b @ z  # noqa: E731
    assert f(x) < -5.0  # unbounded below along the negative eigenvector; the radius grows
    assert infos[-1].radius > infos[0].radius


def test_lbfgs_direction_equals_scipy_inverse_hessian_product():
    model, prob = logistic(l2=0.05)
    opt = LBFGS(memory=4, batch_size=None)
    th = model.init(1)
    state = opt.init(th)
    for _ in range(5):
        th, state, info = opt.step(th, state, prob)
    mem = state.memory
    S, Y = mem.S.copy(), mem.Y.copy()
    gamma = (S[-1] @ Y[-1]) / (Y[-1] @ Y[-1])
    g = prob.full_objective.grad(th)
    th2, state, info = opt.step(th, state, prob)
    d = (th2 - th) / info.step_size
    # scipy's product uses H₀ = I; ours H₀ = γI, and H_γ(S, Y) = γ · H_scipy(S, γY)
    ref = -gamma * so.LbfgsInvHessProduct(S, gamma * Y).matvec(g)
    np.testing.assert_allclose(d, ref, rtol=1e-10)


def test_lbfgs_forgetting_clears_history():
    model, prob = logistic()
    opt = LBFGS(memory=10, batch_size=None, forget_every=3)
    th = model.init(0)
    state = opt.init(th)
    counts = []
    for _ in range(7):
        th, state, _ = opt.step(th, state, prob)
        counts.append(state.memory.count)
    assert counts == [1, 2, 3, 1, 2, 3, 1]


def test_nonfinite_trial_is_rejected_and_radius_shrinks():
    # f is finite only inside the ball ‖x‖ < 1.5; the first step (−∇f) leaves it
    prob = FunctionProblem(lambda x: float(x @ x) - 2 * x[0] if x @ x < 2.25 else math.nan,
                           lambda x: 2 * x - np.array([2.0, 0.0]))
    opt = LSR1TrustRegion(batch_size=None)
    x, state, info = opt.step(np.zeros(2), opt.init(np.zeros(2)), prob)
    assert not info.accepted and info.nonfinite and np.all(x == 0)
    np.testing.assert_allclose(info.radius, 1.0)  # Δ₀ = ‖∇f(0)‖ = 2, halved
    x, _, infos = run(LSR1TrustRegion(batch_size=None), prob, np.zeros(2), 30)
    assert np.all(np.isfinite(x)) and np.linalg.norm(x - [1, 0]) < 1e-8
    x, _, infos = run(LSR1LineSearch(batch_size=None), prob, np.zeros(2), 30)
    assert infos[0].nonfinite and infos[0].step_size == 0.5  # the NaN trial α = 1 was rejected
    assert np.all(np.isfinite(x)) and np.linalg.norm(x - [1, 0]) < 1e-8


@pytest.mark.parametrize("cls,kw,msg", [
    (LSR1TrustRegion, {"memory": 0}, "memory"), (LSR1TrustRegion, {"gamma": 0.0}, "gamma"),
    (LSR1TrustRegion, {"r": 1.5}, "r must be"), (LSR1TrustRegion, {"decrease": 1.0}, "decrease"),
    (LSR1TrustRegion, {"increase": 0.9}, "increase"), (LSR1TrustRegion, {"solver": "dogleg"}, "solver"),
    (LSR1TrustRegion, {"batch_size": 0}, "batch_size"), (LSR1LineSearch, {"c1": 0.0}, "c1"),
    (LBFGS, {"c2": 1e-5}, "c2"), (LBFGS, {"forget_every": 0}, "forget_every"),
])
def test_invalid_hyperparameters(cls, kw, msg):
    with pytest.raises(ValueError, match=msg):
        cls(**kw)


def test_state_checkpoint_roundtrip_gives_identical_iterates():
    model, prob = logistic()
    th0 = model.init(0)
    opt = LSR1TrustRegion(batch_size=None)
    th, st, _ = run(opt, prob, th0, 4)
    st2 = state_from_host(type(st), state_to_host(st))
    a, _, _ = opt.step(th, st, prob)
    b, _, _ = opt.step(th, st2, prob)
    np.testing.assert_array_equal(a, b)


def digits_data():
    d = load_digits()
    X, y = d.data / 16.0, d.target
    return Data(X[:1200], y[:1200], X[1200:], y[1200:], "softmax_ce", "digits")


@pytest.mark.parametrize("name,kw", [("lsr1-tr", {}), ("lsr1-tr", {"gram_cache": False}), ("lsr1-tr", {"solver": "steihaug"}),
                                     ("lsr1-ls", {}), ("lbfgs", {})])
def test_digits_mlp_accuracy(name, kw):
    """MLP 64-32-10 tanh on digits, batch 256, 10 epochs, λ = 1e-4: test accuracy ≥ 0.87
    (measured: lsr1-tr 0.889 with the cached Grams (default) and with the QR route, steihaug
    0.923, lsr1-ls 0.903, lbfgs 0.920)."""
    model = Sequential([Dense(32), Tanh(), Dense(10)], input_shape=(64,))
    res = train(model, make_optimizer(name, batch_size=256, **kw), digits_data(), epochs=10, seed=0, l2=1e-4)
    assert res.final["test_acc"] >= 0.87


@pytest.mark.slow
def test_lsr1_paper_claim_lbfgs_trails_lsr1():
    """[RD16] §4.1: 'L-SR1 is substantially better than L-BFGS in all settings, with or without
    forgetting'. Setting of its Fig. 1 at small scale: minibatch 400 for both, memory 5, 20 epochs,
    MLP 64-32-10 ReLU on digits (1200 train), λ = 1e-3, seeds 0–2. Measured mean final training
    loss: L-SR1-TR 0.163, L-BFGS 0.198, L-BFGS with forgetting every 5 steps 0.245. The paper's
    'L-BFGS without forgetting is stuck at its initialization' does NOT reproduce with our strong
    Wolfe L-BFGS: it trains, but trails L-SR1 on average (2 of 3 seeds)."""
    model = Sequential([Dense(32), ReLU(), Dense(10)], input_shape=(64,))
    data = digits_data()
    finals = {}
    for label, name, kw in [("lsr1", "lsr1-tr", {}), ("lbfgs", "lbfgs", {}), ("lbfgs-forget", "lbfgs", {"forget_every": 5})]:
        finals[label] = np.mean([train(model, make_optimizer(name, batch_size=400, memory=5, **kw), data,
                                       epochs=20, seed=s, l2=1e-3).final["train_loss"] for s in range(3)])
    assert finals["lsr1"] < finals["lbfgs"] < finals["lbfgs-forget"]


# ------------------------------------------------------------------------- Gram cache


def test_gram_cache_matches_fresh_grams_after_pushes_and_drops():
    rng = np.random.default_rng(0)
    n, m = 50, 4
    mem = PairStore.empty(np.zeros(n), m)
    for i in range(11):
        s, y = rng.standard_normal(n), rng.standard_normal(n)
        mem.append(s, y)
        if i in (5, 8):
            mem.drop_oldest(2)
        S, Y = mem.S, mem.Y
        for a, b in [(mem.SY, S @ Y.T), (mem.SS, S @ S.T), (mem.YY, Y @ Y.T)]:
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-12)
        for gamma in (1.0, -0.5):
            for inv in (False, True):
                P = Y - gamma * S
                assert (lsr1_prune_count(mem.SY, mem.SS, mem.YY, gamma, inverse=inv)
                        == lsr1_prune_count(S @ Y.T, S @ S.T, Y @ Y.T, gamma, inverse=inv, PtP=P @ P.T))
            a = LSR1Operator.from_store(mem, gamma, check=False)
            b = LSR1Operator.from_pairs(mem.S, mem.Y, gamma, check=False)
            np.testing.assert_allclose(a.Minv, b.Minv, rtol=1e-13, atol=1e-12)
            if not b.singular:
                v = rng.standard_normal(n)
                np.testing.assert_allclose(a.matvec(v), b.matvec(v), rtol=1e-10)
                np.testing.assert_allclose(a.solve(v), b.solve(v), rtol=1e-9)
                np.testing.assert_allclose(a.psi_gram(), b.Psi.T @ b.Psi, rtol=1e-12, atol=1e-10)
    mem.drop_oldest(10)
    assert mem.count == 0 and mem.SY.shape == (0, 0)


def test_gram_cache_same_iterates_logistic():
    model, prob = logistic()
    th0 = model.init(0)
    # 30 steps: |∇f| falls to 1e-7, so f's decrease (≈ |∇f|²) is still far above its rounding (1e-16).
    # Later the accept test compares ared and pred at rounding level and the two routes' last bits
    # decide it (step 39 on an AVX2 AMD EPYC: one route accepts, the other rejects)
    a, _, ia = run(LSR1TrustRegion(batch_size=None, gram_cache=False), prob, th0, 30)
    b, st, ib = run(LSR1TrustRegion(batch_size=None), prob, th0, 30)  # gram_cache=True, the default
    # full batch near the minimizer the pairs become nearly dependent: some steps (15 of 30)
    # have κ(Ψ) > 10³ and take the QR fallback; the others are Gram steps — both routes are exercised
    fallbacks = sum(i.extra["gram_fallback"] for i in ib)
    assert fallbacks >= 10 and len(ib) - fallbacks >= 10
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-10)
    assert [i.accepted for i in ia] == [i.accepted for i in ib]
    mem = st.memory
    np.testing.assert_allclose(mem.SY, mem.S @ mem.Y.T, rtol=1e-12, atol=1e-12)
    # and it converges to the same minimizer
    obj = prob.full_objective
    c, _, _ = run(LSR1TrustRegion(batch_size=None, gram_cache=True), prob, th0, 300)
    assert np.linalg.norm(obj.grad(c)) < 1e-8


@pytest.mark.parametrize("n", [2, 6])
def test_gram_cache_same_iterates_rosenbrock(n):
    prob = rosenbrock_problem(n)
    x0 = np.full(n, -1.2)
    x0[1::2] = 1.0
    # Rosenbrock amplifies rounding differences (accept/reject and pruning decisions), so the
    # iterates are compared over the first steps and the end points at convergence
    a, _, _ = run(LSR1TrustRegion(batch_size=None, memory=10, gram_cache=False), prob, x0, 10)
    b, _, _ = run(LSR1TrustRegion(batch_size=None, memory=10, gram_cache=True), prob, x0, 10)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-10)
    for cached in (True, False):
        x, _, _ = run(LSR1TrustRegion(batch_size=None, memory=10, gram_cache=cached), prob, x0, 400)
        np.testing.assert_allclose(x, np.ones(n), atol=1e-6)


def test_gram_cache_checkpoint_roundtrip():
    model, prob = logistic()
    th0 = model.init(0)
    opt = LSR1TrustRegion(batch_size=None, gram_cache=True)
    th, st, _ = run(opt, prob, th0, 4)
    host = state_to_host(st)
    assert all(host["memory"][k] is not None for k in ("SY", "SS", "YY"))
    st2 = state_from_host(type(st), host)
    st3 = state_from_host(type(st), host)
    a, sa, _ = opt.step(th, st, prob)
    b, sb, _ = opt.step(th, st2, prob)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sa.memory.SY, sb.memory.SY)
    # a checkpoint without grams (an uncached run) rebuilds them
    st3.memory.drop_grams()
    assert not st3.memory.has_grams
    c, _, _ = LSR1TrustRegion(batch_size=None, gram_cache=True).step(th, st3, prob)
    np.testing.assert_allclose(c, a, rtol=0, atol=1e-12)


def test_default_is_gram_cache_and_qr_route_stays_available():
    assert LSR1TrustRegion().gram_cache is True
    assert make_optimizer("lsr1-tr").gram_cache is True
    assert LSR1TrustRegion(gram_cache=False).gram_cache is False
    model, prob = logistic()
    th0 = model.init(0)
    _, st, infos = run(LSR1TrustRegion(batch_size=None, gram_cache=False), prob, th0, 3)
    assert not st.memory.has_grams and all("gram_fallback" not in i.extra for i in infos)


@pytest.mark.parametrize("saved_with,loaded_with", [(True, False), (False, True), (True, True), (False, False)])
def test_checkpoints_load_across_gram_cache_settings(saved_with, loaded_with):
    """A checkpoint of either route resumes under either setting: the QR route ignores (and
    clears) cached Grams, the cached route rebuilds them from the pairs when absent."""
    model, prob = logistic()
    th0 = model.init(0)
    th, st, _ = run(LSR1TrustRegion(batch_size=None, gram_cache=saved_with), prob, th0, 5)
    host = state_to_host(st)
    assert (host["memory"].get("SY") is not None) == saved_with
    opt = LSR1TrustRegion(batch_size=None, gram_cache=loaded_with)
    ref, _, _ = opt.step(th, st, prob)  # the live state (host is a copy)
    a, sa, _ = opt.step(th, state_from_host(type(st), host), prob)
    np.testing.assert_allclose(a, ref, rtol=0, atol=1e-12)
    if loaded_with:
        mem = sa.memory
        np.testing.assert_allclose(mem.SY, mem.S @ mem.Y.T, rtol=1e-12, atol=1e-12)
    else:
        assert not sa.memory.has_grams
    # and the resumed run keeps going
    b, _, _ = run(opt, prob, a, 3)
    assert np.all(np.isfinite(b))
