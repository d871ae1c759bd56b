"""Step-by-step replays of every Kronecker and SMW method against dense NumPy re-computations of the
thesis's algorithms (``tests/optim/replay_dense.py``), and the equalities of the damping helpers.

Each replay runs 4 steps (statistics every 2, inverses / roots every 3: moving averages and
amortized updates are exercised, on top of the warm start on the whole training set) on

* ``mlp``: Dense-BatchNorm-Tanh-Dense-Tanh-Dense, softmax CE (BatchNorm γ/β are non-Kronecker blocks);
* ``conv``: Conv(3×3, pad 1)-Tanh-Conv(2×2, stride 2)-Tanh-Flatten-Dense, softmax CE (KFC taps,
  |T| = 36 and 9 locations, 3-way conv tensors for Shampoo/TNT);

and asserts θ and every state array after every step to 1e-12 (relative to max(1, |ref|)).
SMW-GN/NG refuse BatchNorm in training mode (their Gram matrices need independent examples), so
their MLP problem uses BatchNorm in evaluation mode (``train=False``): γ/β are still plain blocks.
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
from qnref.optim import load_all
from qnref.optim.base import Problem
from qnref.optim.registry import OPTIMIZERS

import replay_dense as rd

load_all()
TOL = 1e-12
STEPS = 4
DEVIATIONS: dict = {}


def problem(kind, train=True, seed=0):
    r = np.random.default_rng(seed)
    if kind == "mlp":
        X, y = r.standard_normal((24, 5)), r.integers(0, 3, 24)
        # BatchNorm after the activation: a Kronecker layer *feeding* BatchNorm has ḡ ≡ 0, which makes
        # its K-BFGS H_G pair rounding noise (see test_kbfgs_pair_of_a_layer_feeding_batchnorm_is_noise)
        m = Sequential([Dense(6), Tanh(), BatchNorm(), Dense(4), Tanh(), Dense(3)], input_shape=(5,))
    else:
        X = r.standard_normal((24, 1, 6, 6))
        y = r.integers(0, 3, 24)
        m = Sequential([Conv2d(3, 3, padding=1), Tanh(), Conv2d(4, 2, stride=2), Tanh(), Flatten(), Dense(3)],
                       input_shape=(1, 6, 6))
    th = m.init(seed)
    # perturb BatchNorm γ/β away from (1, 0) so that their blocks matter
    th = th + 0.05 * r.standard_normal(th.shape)
    return m, th, Problem(m, "softmax_ce", X, y, seed=seed, train=train)


def close(tag, got, ref):
    got, ref = np.asarray(got, dtype=float), np.asarray(ref, dtype=float)
    assert got.shape == ref.shape, (tag, got.shape, ref.shape)
    dev = float(np.abs(got - ref).max()) / max(1.0, float(np.abs(ref).max())) if ref.size else 0.0
    key = tag.split("@")[0]
    DEVIATIONS[key] = max(DEVIATIONS.get(key, 0.0), dev)
    assert dev <= TOL, f"{tag}: relative deviation {dev:.3e}"


def run_pair(opt, replay, th, prob, compare_state, tag):
    st = opt.init(th)
    th_o, th_r = th.copy(), th.copy()
    for k in range(1, STEPS + 1):
        th_o, st, info = opt.step(th_o, st, prob)
        th_r = replay.step(th_r)
        assert info.accepted and not info.skipped, (tag, k, info)
        close(f"{tag}:theta@{k}", th_o, th_r)
        compare_state(st, replay, f"{tag}@{k}")
    return st, info


# -- K-BFGS / K-BFGS(L) ------------------------------------------------------------------------------------------
KB = dict(lr=0.1, damping=0.3, beta=0.9, mu1=0.2, weight_decay=0.01)


def kbfgs_state(st, rp, tag):
    close(f"{tag}:mom", st.mom, rp.mom)
    for name in rp.kron:
        close(f"{tag}:HA[{name}]", st.HA[name], rp.HA[name])
        close(f"{tag}:sG[{name}]", st.sG[name], rp.sG[name])
        close(f"{tag}:yG[{name}]", st.yG[name], rp.yG[name])
        close(f"{tag}:lam[{name}]", st.lam[name], rp.lamAG[name])
        if rp.memory is None:
            close(f"{tag}:HG[{name}]", st.HG[name], rp.HG[name])
        else:
            S = np.array(rp.S[name]).reshape(-1, rp.sG[name].size)
            Y = np.array(rp.Y[name]).reshape(-1, rp.sG[name].size)
            close(f"{tag}:pairs.S[{name}]", st.pairs[name].S, S)
            close(f"{tag}:pairs.Y[{name}]", st.pairs[name].Y, Y)
        if rp.version == "ch2":
            close(f"{tag}:A[{name}]", st.A[name], rp.A[name])
    assert st.k == rp.k


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("version", ["ch3", "ch2"])
@pytest.mark.parametrize("memory", [None, 1, 2])
def test_kbfgs_replay(kind, version, memory):
    """Thesis Alg. 9 (ch3: ĝ ← βĝ + ∇f, H_A by minibatched Hessian action (3.14)-(3.15), D_P D_LM,
    H_G⁽⁰⁾ = I/λ_G) and Alg. 4 (ch2: ĝ ← βĝ + (1−β)∇f, A ← βA + (1−β)Ã, DD, H_G⁽⁰⁾ = I);
    K-BFGS(L) with memory 1 (the oldest pair is dropped) and 2 (both pairs kept, oldest first);
    H₀ = γI, the two-loop recursion as the oracle of the compact form. Curvature every T = 2 steps."""
    m, th, prob = problem(kind)
    m, _, twin = problem(kind)   # the replay's twin: same data, seeds and model
    name = "kbfgs" if memory is None else "kbfgs-l"
    kw = dict(KB, curvature_freq=2, batch_size=8, version=version)
    if memory is not None:
        kw["memory"] = memory
    opt = OPTIMIZERS[name](**kw)
    rp = rd.KBFGSReplay(twin, m, th, lr=KB["lr"], damping=KB["damping"], beta=KB["beta"], mu1=KB["mu1"], T=2,
                        batch=8, version=version, memory=memory, weight_decay=KB["weight_decay"])
    st, _ = run_pair(opt, rp, th, prob, kbfgs_state, f"{name}-{version}/{kind}")
    if memory is not None:
        assert all(st.pairs[n].count == min(memory, 2) for n in rp.kron)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_kbfgs_pair_of_a_layer_feeding_batchnorm_is_noise(kind):
    """For a layer whose output goes straight into BatchNorm (training mode) the batch mean of the
    pre-activation gradients ḡ is 0 in exact arithmetic (BatchNorm's backward removes the batch
    mean; for a conv layer the sums over examples *and locations* vanish), so y_G of (3.13) is 0,
    D_LM makes ỹ = λ_G s̃ = H_G⁻¹ s̃ and the BFGS update leaves H_G = I/λ_G. Computed, ḡ is rounding
    noise; when s̃ was at rounding level as well (‖s̃‖ ~ 1e-18 at step 4 of a Dense-BN-Tanh MLP, and
    on an AVX-512 CPU in this conv case) the update of H_G was O(1) noise, and in float32 on
    ResNet-20 its ρ² overflowed. kbfgs.py now takes components of ḡ⁺ − ḡ below the rounding bound of
    the two means (kron.mean_g_rounding) as 0: y_G is exactly 0 and H_G stays I/λ_G to rounding."""
    r = np.random.default_rng(0)
    if kind == "dense":
        X, y = r.standard_normal((24, 5)), r.integers(0, 3, 24)
        m = Sequential([Dense(6), BatchNorm(), Tanh(), Dense(3)], input_shape=(5,))
    else:
        X, y = r.standard_normal((24, 1, 6, 6)), r.integers(0, 3, 24)
        m = Sequential([Conv2d(6, 3, padding=1), BatchNorm(), Tanh(), Flatten(), Dense(3)], input_shape=(1, 6, 6))
    prob = Problem(m, "softmax_ce", X, y, seed=0)
    th = m.init(0) + 0.05 * r.standard_normal(m.init(0).shape)
    opt = OPTIMIZERS["kbfgs"](lr=0.1, damping=0.3, batch_size=8)
    st = opt.init(th)
    for _ in range(2):
        th, st, info = opt.step(th, st, prob)
        assert info.skipped == 0
    first = m.kron_layers[0].name
    assert np.all(st.yG[first] == 0)
    assert np.abs(st.yG[m.kron_layers[1].name]).max() > 1e-6
    # ỹ = λ_G s̃ and H_G⁽⁰⁾ = I/λ_G already maps it to s̃: the update leaves H_G at its initial value
    # up to rounding (no curvature learned for this layer, ever), on any BLAS
    lamG = st.lam[first][1]
    assert np.abs(st.HG[first] * lamG - np.eye(6)).max() < 1e-13


@pytest.mark.parametrize("memory", [None, 3])
def test_kbfgs_ch2_every_step_replay(memory):
    """Alg. 4 as written (curvature every step, T = 1) on the BatchNorm MLP, 4 steps."""
    m, th, prob = problem("mlp")
    m, _, twin = problem("mlp")
    name = "kbfgs" if memory is None else "kbfgs-l"
    opt = OPTIMIZERS[name](**dict(KB, curvature_freq=1, batch_size=8, version="ch2"),
                           **({} if memory is None else {"memory": memory}))
    rp = rd.KBFGSReplay(twin, m, th, lr=KB["lr"], damping=KB["damping"], beta=KB["beta"], mu1=KB["mu1"], T=1,
                        batch=8, version="ch2", memory=memory, weight_decay=KB["weight_decay"])
    st, _ = run_pair(opt, rp, th, prob, kbfgs_state, f"{name}-ch2-T1/mlp")
    if memory is not None:
        assert all(st.pairs[n].count == 3 for n in rp.kron)


# -- KFAC -------------------------------------------------------------------------------------------------------
KF = dict(lr=0.05, damping=0.3, momentum=0.9, beta=0.9, weight_decay=0.01)


def kfac_state(st, rp, tag):
    close(f"{tag}:mom", st.mom, rp.mom)
    for name in rp.kron:
        for attr in ("A", "G", "HA", "HG"):
            close(f"{tag}:{attr}[{name}]", getattr(st, attr)[name], getattr(rp, attr)[name])
        close(f"{tag}:pi[{name}]", st.pi[name], rp.pi[name])


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
def test_kfac_ch3_replay(kind, fisher):
    """Thesis Alg. 12: momentum without (1−β), statistics at θ⁺ (sampled ỹ) every T₁ = 2, π-split
    inverses every T₂ = 3, BatchNorm along the momentum with lr α (L1531)."""
    m, th, prob = problem(kind)
    m, _, twin = problem(kind)   # the replay's twin: same data, seeds and model
    opt = OPTIMIZERS["kfac"](stat_freq=2, inv_freq=3, batch_size=8, fisher=fisher, **KF)
    rp = rd.KFACReplay(twin, m, th, T1=2, T2=3, batch=8, fisher=fisher, alg=12, **KF)
    run_pair(opt, rp, th, prob, kfac_state, f"kfac-ch3-{fisher}/{kind}")


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_kfac_ch2_documented_convention_replay(kind):
    """docs/kfac.md: "Algorithm 7 in ch. 2 is the same with π = 1" → ``use_pi=False``: Alg. 12 with
    π = 1 (momentum without (1−β), inverses only at k ≡ 0 mod T₂). This replays that documented
    reading; the literal Alg. 7 is the next test."""
    m, th, prob = problem(kind)
    m, _, twin = problem(kind)   # the replay's twin: same data, seeds and model
    opt = OPTIMIZERS["kfac"](stat_freq=2, inv_freq=3, batch_size=8, use_pi=False, **KF)
    rp = rd.KFACReplay(twin, m, th, T1=2, T2=3, batch=8, alg=7.1, **KF)
    run_pair(opt, rp, th, prob, kfac_state, f"kfac-ch2-documented/{kind}")


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_kfac_ch2_alg7_literal_replay(kind):
    """Thesis Alg. 7 literally: statistics every step (l. 8-9), π = 1 (l. 11), inverses when k ≤ T or
    k ≡ 0 (mod T) (l. 10, L823); ĝ ← βĝ + (1−β)∇f — Alg. 7 uses ĝ without defining it, the (1−β) is
    ch. 2's convention (Alg. 4 l. 8, L576) and the reading of issue 20. ``use_pi=False`` keeps Alg. 12's
    momentum and inverts only at k ≡ 0 (mod T₂) (the next test); ``version="ch2"`` is Alg. 7, thesis
    L810-824 (lines 9-11); tests/optim/test_kfac_ch2.py replays it with T₁ > 1 and the empirical Fisher too."""
    m, th, prob = problem(kind)
    m, _, twin = problem(kind)   # the replay's twin: same data, seeds and model
    opt = OPTIMIZERS["kfac"](stat_freq=1, inv_freq=3, batch_size=8, version="ch2", **KF)
    rp = rd.KFACReplay(twin, m, th, T1=1, T2=3, batch=8, alg=7, **KF)
    run_pair(opt, rp, th, prob, kfac_state, f"kfac-ch2-alg7/{kind}")


def test_kfac_alg7_literal_differs_from_use_pi_false():
    """The finding above, shown: use_pi=False and the literal Alg. 7 replay part after step 1."""
    m, th, prob = problem("mlp")
    m, _, twin = problem("mlp")
    opt = OPTIMIZERS["kfac"](stat_freq=1, inv_freq=3, batch_size=8, use_pi=False, **KF)
    rp = rd.KFACReplay(twin, m, th, T1=1, T2=3, batch=8, alg=7, **KF)
    th1, _, _ = opt.step(th.copy(), opt.init(th), prob)
    assert np.abs(th1 - rp.step(th.copy())).max() > 1e-6


# -- Shampoo, TNT ----------------------------------------------------------------------------------------------
TF = dict(momentum=0.9, beta=0.9, weight_decay=0.01)


def tensor_state(st, rp, tag):
    close(f"{tag}:mom", st.mom, rp.mom)
    assert len(st.stats) == len(rp.stats) == len(rp.parts)
    for j, q in enumerate(rp.parts):
        for i in range(len(q[2])):
            close(f"{tag}:stats[{j}][{i}]", st.stats[j][i], rp.stats[j][i])
            close(f"{tag}:precond[{j}][{i}]", st.precond[j][i], rp.precond[j][i])


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("root", ["newton", "eigh"])
def test_shampoo_replay(kind, root):
    """Thesis Alg. 16: EMA of the empirical-gradient contractions every T₁ = 2, (Ĝ + εI)^(−1/(2k)) every
    T₂ = 3 by the coupled Newton iteration (§4.7.2; iteration details as documented) or eigh."""
    m, th, prob = problem(kind)
    m, _, twin = problem(kind)   # the replay's twin: same data, seeds and model
    opt = OPTIMIZERS["shampoo"](lr=0.01, damping=1e-3, stat_freq=2, inv_freq=3, batch_size=8, root=root, **TF)
    rp = rd.TensorReplay(twin, m, th, method="shampoo", lr=0.01, damping=1e-3, T1=2, T2=3, batch=8, root=root, **TF)
    run_pair(opt, rp, th, prob, tensor_state, f"shampoo-{root}/{kind}")


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
def test_tnt_replay(kind, fisher):
    """Thesis Alg. 15: Ḡ = minibatch mean of the sampled-ỹ gradients (l. 7; TNT-EF: the gradient),
    contractions EMA every T₁ = 2, Ũᵢ by (4.10) and (Ũᵢ + εI)⁻¹ every T₂ = 3."""
    m, th, prob = problem(kind)
    m, _, twin = problem(kind)   # the replay's twin: same data, seeds and model
    opt = OPTIMIZERS["tnt"](lr=0.01, damping=0.03, stat_freq=2, inv_freq=3, batch_size=8, fisher=fisher, **TF)
    rp = rd.TensorReplay(twin, m, th, method="tnt", lr=0.01, damping=0.03, T1=2, T2=3, batch=8, fisher=fisher, **TF)
    run_pair(opt, rp, th, prob, tensor_state, f"tnt-{fisher}/{kind}")


# -- SMW-GN / SMW-NG --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("curvature", ["gn", "ng"])
def test_smw_replay(kind, curvature):
    """Thesis Alg. 23 with a dense solve of (B + λI)p = −g, B by (5.2)/(5.3) from explicit Jacobians;
    ρ (5.5) at θ + p on S₁; λ_LM rule §5.2.3 (boost/drop set so that both branches are hit)."""
    m, th, prob = problem(kind, train=(kind != "mlp"))
    m, _, twin = problem(kind, train=(kind != "mlp"))   # the replay's twin: same data, seeds and model
    kw = dict(lr=0.5, batch_size=8, curvature_batch=4, lambda_lm=0.3, tau=1e-3, boost=1.5, drop=0.7, eps=0.25)
    opt = OPTIMIZERS[f"smw-{curvature}"](**kw)
    rp = rd.SMWReplay(twin, curvature=curvature, lr=0.5, N1=8, N2=4, lambda_lm=0.3, tau=1e-3, boost=1.5,
                      drop=0.7, eps=0.25)
    st = opt.init(th)
    th_o, th_r = th.copy(), th.copy()
    for k in range(1, STEPS + 1):
        th_o, st, info = opt.step(th_o, st, prob)
        th_r = rp.step(th_r)
        tag = f"smw-{curvature}/{kind}@{k}"
        close(f"{tag}:theta", th_o, th_r)
        close(f"{tag}:lambda_lm", st.lambda_lm, rp.lam_lm)
        for key in ("rho", "lambda", "model_decrease", "loss_trial"):
            close(f"{tag}:{key}", info.extra[key], rp.last[key])
        assert st.t == rp.t and st.rejected == 0 and info.accepted


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("curvature,form", [("gn", "5.6"), ("gn", "5.7"), ("ng", "5.6")])
def test_smw_direction_and_model_decrease_against_dense(kind, curvature, form):
    """``smw_direction``: p = −(B + λI)⁻¹g with B dense from explicit Jacobians ((5.2)/(5.3)), and the
    quadratic-model pieces pᵀBp and m(0) − m(p) = −gᵀp − ½pᵀBp (eq. (5.5)), also at a scaled step."""
    from qnref.optim.smw import smw_direction

    m, th, prob = problem(kind, train=(kind != "mlp"))
    obj = prob.batch(6)
    pt = obj.at(th)
    g = obj.at(th + 0.1).grad                 # any vector of the layout
    n = len(th)
    J = rd.dense_jacobian(pt, n)
    s = rd.softmax(pt.z)
    if curvature == "gn":
        B = np.einsum("icn,icd,idm->nm", J, np.stack([np.diag(v) - np.outer(v, v) for v in s]), J) / 6
    else:
        e = s.copy()
        e[np.arange(6), obj.y] -= 1.0
        G = np.einsum("ic,icn->in", e, J)
        B = G.T @ G / 6
    lam = 0.2
    d = smw_direction(pt, g, lam, curvature=curvature, form=form)
    p = -np.linalg.solve(B + lam * np.eye(n), g)
    close(f"smw_direction-{curvature}-{form}/{kind}:p", d.p, p)
    np.testing.assert_allclose(d.pBp, p @ B @ p, rtol=1e-10)
    np.testing.assert_allclose(d.model_decrease, -(g @ p) - 0.5 * p @ B @ p, rtol=1e-10)
    np.testing.assert_allclose(d.model_decrease_at(0.3), -0.3 * (g @ p) - 0.045 * p @ B @ p, rtol=1e-10)


# -- damping: the equalities of Alg. 3 and Alg. 8 --------------------------------------------------------------
def _spd(r, d):
    Z = r.standard_normal((d, d + 2))
    return Z @ Z.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("seed", range(6))
def test_damping_equalities_alg3_alg8(seed):
    """When a Powell branch is taken the thesis's θ makes the bound an equality:
    Alg. 3 l. 1-2: s̃ᵀy = μ₁ yᵀHy; Alg. 3 l. 3-4: s̃ᵀỹ = μ₂ s̃ᵀs̃; Alg. 8: ỹ = y + μ₂ s̃, so
    s̃ᵀỹ = μ₁ yᵀHy + μ₂ ‖s̃‖². When a branch is not taken the vector is unchanged. The helpers also
    agree with the dense re-implementation of the algorithms."""
    from qnref.optim import _kron_common as kc

    r = np.random.default_rng(seed)
    d = 7
    H = _spd(r, d)
    mu1 = [0.2, 0.05, 0.5][seed % 3]
    s = r.standard_normal(d)
    y = -0.3 * s + 0.2 * r.standard_normal(d)          # sᵀy < μ₁yᵀHy: Powell branch
    Hy = H @ y
    assert s @ y < mu1 * (y @ Hy)
    st = kc.powell_on_H(s, y, Hy, mu1)
    np.testing.assert_allclose(st @ y, mu1 * (y @ Hy), rtol=1e-12)
    np.testing.assert_allclose(st, rd.powell(s, y, Hy, mu1), rtol=1e-13, atol=1e-14)
    for mu2 in (0.1, 0.6, 1.0):
        st2, yt = kc.double_damping(s, y, Hy, mu1, mu2)
        np.testing.assert_allclose(st2, st, rtol=1e-13, atol=1e-14)
        ref_s, ref_y = rd.dd(s, y, Hy, mu1, mu2)
        np.testing.assert_allclose(yt, ref_y, rtol=1e-12, atol=1e-14)
        if st @ y < mu2 * (st @ st):                    # second Powell branch (B = I)
            np.testing.assert_allclose(st @ yt, mu2 * (st @ st), rtol=1e-12)
        else:
            np.testing.assert_array_equal(yt, y)
    for mu2 in (0.1, 0.6, 3.0):                         # Alg. 8 allows any μ₂ > 0
        st3, yt3 = kc.dp_dlm(s, y, Hy, mu1, mu2)
        np.testing.assert_allclose(st3, st, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(yt3, y + mu2 * st, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(st3 @ yt3, mu1 * (y @ Hy) + mu2 * (st @ st), rtol=1e-12)
    # branch not taken: s̃ = s exactly; DD's second branch taken on a short s̃ with s̃ᵀy small
    y2 = np.linalg.solve(H, s) * 2.0                    # sᵀy = 2 yᵀHy/… ≥ μ₁ yᵀHy
    np.testing.assert_array_equal(kc.powell_on_H(s, y2, H @ y2, mu1), s)
    s3 = 5.0 * s
    y3 = 0.02 * s + 0.01 * r.standard_normal(d)          # s̃ᵀy ≪ ‖s̃‖²
    st4, yt4 = kc.double_damping(s3, y3, 1e-6 * y3, mu1, 0.5)
    assert st4 @ y3 < 0.5 * (st4 @ st4)
    np.testing.assert_allclose(st4 @ yt4, 0.5 * (st4 @ st4), rtol=1e-12)


def test_report_deviations(capsys):
    """Prints the largest relative deviation per replay (run with -s; after the replays above)."""
    with capsys.disabled():
        for key in sorted(DEVIATIONS):
            print(f"  {key:45s} {DEVIATIONS[key]:.2e}")
