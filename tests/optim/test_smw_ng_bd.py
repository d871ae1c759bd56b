"""SMW-NG-BD (Ren's thesis §5.8, L2816): the block-diagonal SMW-NG direction against a dense
block-diagonal solve built from explicit per-example gradients, the Alg. 23 step, the refusals,
safeguards and the cost model.

Oracle: B_BD = diag_l((1/N₂) Pₗᵀ Pₗ) + l2·I with Pₗ the columns of layer l of the per-example
gradient rows P (the model's per-example backward, checked against finite differences), written
out as an n × n matrix and solved densely with ``numpy.linalg.solve``; the layer blocks are read off
the block names here (not with the implementation's :func:`layer_groups`). Tolerance 1e-10
relative (float64; observed ~1e-15).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from qnref.curvature import dense
from qnref.curvature.objective import Objective
from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.nn.zoo import build_model
from qnref.optim.base import Problem
from qnref.optim.costs import algebra_flops
from qnref.optim.registry import OPTIMIZERS, make_optimizer
from qnref.optim.smw import SMWNG, SMWNGBD, smw_bd_direction, smw_direction, update_lambda_lm

from test_smw import C, D_IN, N, _targets  # noqa: E402  (the SMW tests' small problem, one copy)
from test_smw import _small as _mlp  # noqa: E402


def _cnn(l2=0.0, seed=0):
    r = np.random.default_rng(seed)
    m = build_model("lenet-digits", width=0.5, n_outputs=C, activation="tanh")
    theta = m.init(seed) + 0.1 * r.standard_normal(m.n_params)
    X = r.standard_normal((N, 1, 8, 8))
    return m, theta, Objective(m, "softmax_ce", X, r.integers(0, C, N), l2=l2), r


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _block_diagonal_fisher(model, P, l2):
    """diag_l(Pₗᵀ Pₗ / N) + l2·I, layers = blocks with the same name before the last '.'."""
    n = model.n_params
    B = np.zeros((n, n))
    layers: dict = {}
    for b in model.layout.blocks:
        layers.setdefault(b.name.rsplit(".", 1)[0], []).append(np.arange(b.offset, b.offset + int(np.prod(b.shape))))
    for cols in layers.values():
        c = np.concatenate(cols)
        B[np.ix_(c, c)] = P[:, c].T @ P[:, c] / P.shape[0]
    return B + l2 * np.eye(n), len(layers)


def _dense_bd(model, obj, theta, g, lam):
    P = obj.at(theta).per_example_grads()                 # (N, n) rows ∇ℓᵢ
    B, L = _block_diagonal_fisher(model, P, obj.l2)
    return -np.linalg.solve(B + lam * np.eye(model.n_params), g), B, L, P


# -- the direction equals the dense block-diagonal solve ---------------------------------------------------
@pytest.mark.parametrize("l2", [0.0, 0.05])
@pytest.mark.parametrize("lam", [1e-2, 1.0])
@pytest.mark.parametrize("loss", ["softmax_ce", "mse", "sigmoid_ce"])
def test_bd_direction_matches_dense_block_solve_mlp(loss, lam, l2):
    m, theta, obj, r = _mlp(loss, l2, seed=1)
    g = obj.grad(theta) + 0.1 * r.standard_normal(m.n_params)   # any vector of the layout
    p_dense, B, L, P = _dense_bd(m, obj, theta, g, lam)
    assert L == 3
    d = smw_bd_direction(obj.at(theta), g, lam)               # dense net: the taps route
    assert d.finite and d.d_size == N and d.blocks == 3
    assert _rel(d.p, p_dense) <= 1e-10
    assert abs(d.g_dot_p - g @ p_dense) <= 1e-10 * abs(g @ p_dense)
    assert abs(d.pBp - p_dense @ B @ p_dense) <= 1e-10 * abs(p_dense @ B @ p_dense)
    # the same through smw_direction(curvature="ng-bd"), and it is not SMW-NG's full-Fisher direction
    d2 = smw_direction(obj.at(theta), g, lam, curvature="ng-bd")
    assert _rel(d2.p, p_dense) <= 1e-10
    p_full = -np.linalg.solve(P.T @ P / N + (l2 + lam) * np.eye(m.n_params), g)
    assert _rel(p_full, p_dense) > 1e-3


def test_per_example_rows_of_the_oracle_match_finite_differences():
    m, theta, obj, _ = _mlp("softmax_ce", seed=1)
    P = obj.at(theta).per_example_grads()
    Pfd = dense.per_example_grads_fd(obj, theta, eps=1e-3, order=4)
    assert np.abs(P - Pfd).max() <= 1e-9 * np.abs(P).max()


@pytest.mark.parametrize("lam", [1e-2, 1.0])
def test_bd_direction_matches_dense_block_solve_cnn(lam):
    """Conv layers: the explicit per-example rows split by layer (the taps route is dense-only)."""
    m, theta, obj, r = _cnn(l2=0.01)
    g = r.standard_normal(m.n_params)
    p_dense, B, L, _ = _dense_bd(m, obj, theta, g, lam)
    d = smw_bd_direction(obj.at(theta), g, lam)
    assert d.blocks == L == 3
    assert _rel(d.p, p_dense) <= 1e-10
    assert abs(d.pBp - p_dense @ B @ p_dense) <= 1e-10 * abs(p_dense @ B @ p_dense)
    with pytest.raises(ValueError, match="route 'taps' needs .* dense"):
        smw_bd_direction(obj.at(theta), g, lam, route="taps")


def test_taps_and_rows_routes_agree():
    m, theta, obj, r = _mlp("sigmoid_ce", 0.05, seed=2)
    g = r.standard_normal(m.n_params)
    a = smw_bd_direction(obj.at(theta), g, 0.1, route="taps")
    b = smw_bd_direction(obj.at(theta), g, 0.1, route="rows")
    assert _rel(a.p, b.p) <= 1e-12 and abs(a.pBp - b.pBp) <= 1e-12 * abs(b.pBp)
    with pytest.raises(ValueError, match="route"):
        smw_bd_direction(obj.at(theta), g, 0.1, route="dense")
    with pytest.raises(ValueError, match="λ"):
        smw_bd_direction(obj.at(theta), g, 0.0)


def test_batchnorm_in_training_mode_is_refused():
    m = build_model("lenet-digits", batchnorm=True, width=0.5, n_outputs=C)
    r = np.random.default_rng(0)
    X, y = r.standard_normal((20, 1, 8, 8)), r.integers(0, C, 20)
    theta = m.init(0)
    with pytest.raises(ValueError, match="independent examples"):
        smw_bd_direction(Objective(m, "softmax_ce", X, y).at(theta), np.zeros(m.n_params), 0.1)
    opt = SMWNGBD(batch_size=10, curvature_batch=5)
    with pytest.raises(ValueError, match="independent examples"):
        opt.step(theta, opt.init(theta), Problem(m, "softmax_ce", X, y, seed=0))
    # in evaluation mode BatchNorm's γ, β form one block of their own
    obj = Objective(m, "softmax_ce", X, y, train=False)
    g = r.standard_normal(m.n_params)
    p_dense, _, L, _ = _dense_bd(m, obj, theta, g, 0.1)
    d = smw_bd_direction(obj.at(theta), g, 0.1)
    assert d.blocks == L == 5 and _rel(d.p, p_dense) <= 1e-10


# -- the optimizer: Alg. 23 with the block-diagonal direction --------------------------------------------------
def _full_batch_problem(loss="sigmoid_ce", l2=0.01, n=12):
    r = np.random.default_rng(3)
    m = Sequential([Dense(5), Tanh(), Dense(C)], input_shape=(D_IN,))
    X = r.standard_normal((n, D_IN))
    return m, m.init(3), Problem(m, loss, X, _targets(loss, r, n), l2=l2, seed=0), n


def test_step_follows_algorithm_23():
    """N₁ = N₂ = N: θ₊ = θ + αp, p the dense block-diagonal LM solve, ρ of eq. 5.5, the λ_LM rule."""
    m, theta, prob, n = _full_batch_problem()
    opt = SMWNGBD(lr=0.5, batch_size=n, curvature_batch=n, lambda_lm=0.3, tau=1e-3)
    state = opt.init(theta)
    full = prob.full_objective
    for _ in range(4):
        lam = state.lambda_lm + 1e-3
        g = full.grad(theta)
        p, B, _, _ = _dense_bd(m, full, theta, g, lam)
        rho = (full.value(theta) - full.value(theta + p)) / (-(g @ p) - 0.5 * p @ B @ p)
        new, new_state, info = opt.step(theta, state, prob)
        assert info.accepted and not info.nonfinite
        assert info.extra["lambda"] == pytest.approx(lam, rel=1e-15)
        assert info.extra["rho"] == pytest.approx(rho, rel=1e-9)
        assert info.extra["blocks"] == 2 and info.extra["d_size"] == n
        assert new_state.lambda_lm == pytest.approx(update_lambda_lm(state.lambda_lm, rho), rel=1e-15)
        assert _rel(new - theta, 0.5 * p) <= 1e-10
        theta, state = new, new_state


@pytest.mark.parametrize("l2", [0.0, 0.01])
@pytest.mark.parametrize("loss", ["softmax_ce", "sigmoid_ce"])
@pytest.mark.parametrize("cls", [SMWNG, SMWNGBD])
def test_step_with_a_curvature_subset_matches_the_dense_solve(cls, loss, l2):
    """N₂ < N₁ on a dense net, where S₂'s taps are rows of S₁'s backward pass: every step's θ₊ and ρ
    against the dense (block-diagonal for NG-BD) LM solve on the same S₁ and S₂, drawn by a twin
    problem with the same seed; the step's passes are S₁'s forward and backward and the trial forward
    (no pass on S₂)."""
    m, theta, prob, _ = _full_batch_problem(loss, l2=l2, n=40)
    twin = _full_batch_problem(loss, l2=l2, n=40)[2]
    N1, N2 = 20, 7
    opt = cls(lr=0.5, batch_size=N1, curvature_batch=N2, lambda_lm=0.3)
    state = opt.init(theta)
    for _ in range(3):
        obj1 = twin.batch(N1)
        S2 = np.sort(twin.rng.choice(N1, size=N2, replace=False))
        lam = state.lambda_lm + opt.tau
        g = obj1.grad(theta)
        P = obj1.at(theta).per_example_grads()[S2]               # ∇ℓᵢ, i ∈ S₂ (oracle rows)
        B = _block_diagonal_fisher(m, P, l2)[0] if cls is SMWNGBD else P.T @ P / N2 + l2 * np.eye(m.n_params)
        p = -np.linalg.solve(B + lam * np.eye(m.n_params), g)
        rho = (obj1.value(theta) - obj1.value(theta + p)) / (-(g @ p) - 0.5 * p @ B @ p)
        before = prob.counter.snapshot()
        new, new_state, info = opt.step(theta, state, prob)
        after = prob.counter.snapshot()
        assert info.accepted and info.evals == 2 and info.extra["curvature_batch"] == N2
        assert (after["forward"] - before["forward"], after["backward"] - before["backward"]) == (2 * N1, N1)
        assert after["rforward"] == before["rforward"]
        assert info.extra["rho"] == pytest.approx(rho, rel=1e-9)
        assert _rel(new - theta, 0.5 * p) <= 1e-10
        theta, state = new, new_state


@pytest.mark.parametrize("cls", [SMWNG, SMWNGBD])
def test_gram_right_hand_side_on_a_wide_layer(cls):
    """Without an L2 term, (Jₗgₗ)ᵢ of a layer wider than N₁(a + o)/(o·a) comes from the S₂ × S₁ Gram
    (rhs_by_gram: here the 30 → 40 layer, not the 40 → 3 one): the step against the dense solve on
    the same S₁ and S₂, and the cost model's right-hand side term by term."""
    from qnref.optim.smw import rhs_by_gram

    r = np.random.default_rng(5)
    m = Sequential([Dense(40), Tanh(), Dense(3)], input_shape=(30,))
    X, y = r.standard_normal((36, 30)), r.integers(0, 3, 36)
    prob, twin = (Problem(m, "softmax_ce", X, y, seed=2) for _ in range(2))
    N1, N2 = 12, 5
    assert rhs_by_gram(N1, (40, 31)) and not rhs_by_gram(N1, (3, 41))
    opt = cls(lr=0.5, batch_size=N1, curvature_batch=N2, lambda_lm=0.3)
    theta, state = m.init(2), opt.init(m.init(2))
    for _ in range(2):
        obj1 = twin.batch(N1)
        S2 = np.sort(twin.rng.choice(N1, size=N2, replace=False))
        lam = state.lambda_lm + opt.tau
        g = obj1.grad(theta)
        P = obj1.at(theta).per_example_grads()[S2]
        B = _block_diagonal_fisher(m, P, 0.0)[0] if cls is SMWNGBD else P.T @ P / N2
        p = -np.linalg.solve(B + lam * np.eye(m.n_params), g)
        new, state, info = opt.step(theta, state, prob)
        assert info.accepted and _rel(new - theta, 0.5 * p) <= 1e-10
        theta = new
    t = algebra_flops(opt, m, N1)["terms"]
    assert t["rhs"] == (N2 * N1 * (31 + 40) + N2 * N1) + (N2 * 3 * 41 + N2 * 41)
    assert algebra_flops(opt, m, N1, l2=True)["terms"]["rhs"] == (N2 * 40 * 31 + N2 * 31) + (N2 * 3 * 41 + N2 * 41)


@pytest.mark.parametrize("cls", [SMWNG, SMWNGBD])
def test_nonfinite_gradient_on_the_taps_route_does_not_move(monkeypatch, cls):
    """A finite f with a non-finite ∇f (from the S₁ backward of the taps route): θ stays, the step
    is reported non-finite and counted as rejected, λ_LM unchanged (as open_step's ∇f check)."""
    from qnref.curvature.objective import Point

    m, theta, prob, _ = _full_batch_problem(n=40)
    real = Point.grad_with_taps

    def poisoned(self):
        g, taps = real(self)
        return g * np.nan, taps

    monkeypatch.setattr(Point, "grad_with_taps", poisoned)
    opt = cls(batch_size=20, curvature_batch=7)
    state = opt.init(theta)
    new, st, info = opt.step(theta, state, prob)
    assert new is theta and info.nonfinite and not info.accepted and math.isnan(info.loss)
    assert st.rejected == 1 and st.t == 1 and st.lambda_lm == state.lambda_lm


def test_subset_route_keeps_the_passes_for_other_nets_and_the_semi_stochastic_variant():
    """The taps of S₁ serve only dense nets with S₂ ⊆ S₁: a conv net, BatchNorm blocks and the
    semi-stochastic variant (S₂ its own sample) take S₂'s forward pass as before."""
    from qnref.nn.norm import BatchNorm
    from qnref.optim.smw import dense_layers

    m, theta, prob, _ = _full_batch_problem(n=40)
    assert [L.kind for L in dense_layers(m)] == ["dense", "dense"]
    assert dense_layers(build_model("lenet-digits")) is None
    assert dense_layers(Sequential([Dense(4), BatchNorm(), Dense(C)], input_shape=(D_IN,))) is None
    assert dense_layers(object()) is None
    _, _, info = SMWNG(batch_size=20, curvature_batch=7, full_gradient=True).step(theta, SMWNG().init(theta), prob)
    assert info.evals == 3
    cm, ctheta, cobj, r = _cnn()
    cprob = Problem(cm, "softmax_ce", cobj.X, cobj.y, seed=0)
    _, _, info = SMWNGBD(batch_size=6, curvature_batch=3).step(ctheta, SMWNGBD().init(ctheta), cprob)
    assert info.evals == 3 and info.extra["curvature_batch"] == 3


def test_curvature_batch_is_a_subset_of_the_gradient_batch():
    """S₂ ⊆ S₁ drawn as SMW-NG draws it: the same index stream gives SMW-NG's S₂ (same ρ inputs)."""
    m, theta, prob, n = _full_batch_problem("softmax_ce", n=40)
    opt = SMWNGBD(batch_size=20, curvature_batch=6)
    _, _, info = opt.step(theta, opt.init(theta), prob)
    assert info.batch_size == 20 and info.extra["curvature_batch"] == 6 and info.accepted


def test_nonfinite_solve_is_rejected(monkeypatch):
    import qnref.optim.smw as smw

    m, theta, prob, n = _full_batch_problem()
    monkeypatch.setattr(smw, "_solve", lambda xp, D, u: None)      # a singular / non-finite D solve
    opt = SMWNGBD(batch_size=n, curvature_batch=4)
    new, st, info = opt.step(theta, opt.init(theta), prob)
    assert info.nonfinite and not info.accepted and new is theta
    assert st.rejected == 1 and st.lambda_lm == pytest.approx(1.01) and info.extra["rho"] == -math.inf


def test_defaults_registry_and_validation():
    assert OPTIMIZERS["smw-ng-bd"] is SMWNGBD and make_optimizer("smw-ng-bd").curvature == "ng-bd"
    opt = SMWNGBD()
    assert (opt.lr, opt.batch_size, opt.curvature_batch, opt.lambda_lm, opt.tau, opt.boost, opt.drop, opt.eps) == \
        (0.1, 60, 30, 1.0, 1e-3, 1.01, 0.99, 0.25)
    with pytest.raises(ValueError, match="form.*coincide"):
        SMWNGBD(form="5.7")
    with pytest.raises(ValueError, match="curvature_batch"):
        SMWNGBD(batch_size=10, curvature_batch=20)


def test_cost_model_hand_computed():
    """4-3-2 MLP (layers 3 × 5 and 2 × 4), N₂ = 5: every term from the code, line by line."""
    m = Sequential([Dense(3), Tanh(), Dense(2)], input_shape=(4,))
    n = m.n_params
    assert n == 15 + 8
    t = algebra_flops(SMWNGBD(batch_size=10, curvature_batch=5), m)["terms"]
    N2 = 5
    assert t["gram_scale"] == 2 * 2 * N2 * N2
    assert t["rhs"] == (N2 * 15 + N2 * 5) + (N2 * 8 + N2 * 4)
    assert t["solve"] == round(2 * (N2 ** 3 / 3 + N2 * N2))
    assert t["weights"] == (N2 + N2 * 3) + (N2 + N2 * 2)
    assert t["direction"] == N2 * 15 + N2 * 8 + n
    assert t["model"] == 2 * n + 2 * N2 and t["trial_and_step"] == 3 * n
    # SMW-NG on the same model solves one N₂ × N₂ system, BD one per layer
    ng = algebra_flops(SMWNG(batch_size=10, curvature_batch=5), m)["terms"]
    assert ng["solve"] == round(N2 ** 3 / 3 + N2 * N2) and ng["gram_scale"] * 2 == t["gram_scale"]
    # the same per-layer right-hand sides, weights and Jₗᵀw from S₁'s taps (dense net); one ‖w‖²
    assert all(ng[k] == t[k] for k in ("rhs", "weights", "direction", "trial_and_step"))
    assert ng["model"] == 2 * n + N2
    # the semi-stochastic variant takes the passes on S₂: J g and Jᵀw are passes, the algebra is O(N₂C + n)
    semi = algebra_flops(SMWNG(batch_size=10, curvature_batch=5, full_gradient=True), m)["terms"]
    assert semi == {"jacobian_dot": N2 * 2, "gram_scale": 2 * N2 * N2, "solve": round(N2 ** 3 / 3 + N2 * N2),
                    "weights": N2 + N2 * 2, "direction": n, "model": 2 * n + N2, "trial_and_step": 3 * n}


def test_floor_counts_the_passes_and_the_algebra():
    """Issue 21's floor on a 4-3-2 MLP: pass GEMMs by hand, algebra from algebra_flops, in gradients."""
    from qnref.optim.costs import model_shapes
    from qnref.optim.smw import dense_pass_mults

    m = Sequential([Dense(3), Tanh(), Dense(2)], input_shape=(4,))
    sh = model_shapes(m)
    assert dense_pass_mults(sh, 5) == (5 * (15 + 8), 5 * (15 + 8) + 5 * 2 * 3)   # no γW below layer 1
    F1, B1, F2, B2 = 10 * 23, 10 * 29, 5 * 23, 5 * 29
    gram = 5 * 5 * (5 + 3) + 25 + 5 * 5 * (4 + 2) + 25
    # S₂ ⊆ S₁: S₂'s taps are rows of S₁'s (one taps backward on S₁ and its ∇W̄ GEMMs = F₁ + B₁), so the
    # Gram GEMMs are the only curvature pass terms; the semi-stochastic variant's S₂ is its own sample:
    # its forward, the taps backward (γ only, no ∇W̄ GEMMs) and, for NG, the R-forward and the backward
    for cls, full, extra in ((SMWNGBD, False, 0), (SMWNG, False, 0), (SMWNGBD, True, F2 + (B2 - F2)),
                             (SMWNG, True, F2 + (B2 - F2) + 2 * F2 + B2)):
        opt = cls(batch_size=10, curvature_batch=5, full_gradient=full)
        fl = opt.step_floor(m)
        alg = algebra_flops(opt, m, 10)["per_step"]
        want = (F1 + B1) + F1 + gram + extra
        assert sum(fl["pass_terms"].values()) == want
        assert fl["floor"] == pytest.approx((want + alg) / (F1 + B1), rel=1e-3)   # algebra terms rounded
    with pytest.raises(ValueError, match="dense layers only"):
        SMWNG().step_floor(build_model("lenet-digits"))


def test_layer_direction_rounds_as_the_formula():
    """pₗ = −(gₗ − Jₗᵀwₗ/N₂)/μ written in two passes is bit-equal to the formula."""
    from qnref.optim.smw import _bd_layer_direction

    r = np.random.default_rng(4)
    g, j = r.standard_normal((5, 7)), r.standard_normal((5, 7))
    out = np.empty((5, 7))
    want = -(g - j) / 1.37
    _bd_layer_direction(np, g, j.copy(), 1.37, out)
    assert np.array_equal(out, want)
