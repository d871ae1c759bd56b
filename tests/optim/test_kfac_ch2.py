"""KFAC ``version="ch2"``: thesis Algorithm 7 (L810-824) against a dense NumPy replay written from the text.

Alg. 7 per step k: p_l = H_g ĝ_l H_a, W_l ← W_l − α p_l (l. 5-6); another pass over M_k at the new θ with y
sampled from the model (l. 8); A ← βA + (1−β) āāᵀ, G ← βG + (1−β) ggᵀ (l. 9); if k ≤ T or k ≡ 0 (mod T):
H_a = (A + √λ I)⁻¹, H_g = (G + √λ I)⁻¹ (l. 10-11, π = 1). ĝ is ch. 2's moving average of the gradient,
ĝ ← βĝ + (1−β)∇f (§2.5.2 item 1, L592), initialised to 0 (L836); A, G are warm-started on the whole
training set (L832-840). BatchNorm blocks move along ĝ (the Alg. 12 convention; ch. 2 has no BatchNorm).

The replay below takes from qnref only what the text takes as given (minibatch gradients and the layer
taps ā, g of the public ``Point`` API) and does the rest in plain NumPy: it does not import
``qnref.optim`` helpers or ``qnref.curvature.kron``. It draws its batches and sampled targets from a twin
problem (same data and seeds) in the order Alg. 7 needs them. Statistics every T₁ = 1 (Alg. 7) and
T₁ = 2 (this code's generalisation), inverses T = 3, 6 steps (k = 1, 2, 3 re-invert by k ≤ T; k = 6 by
k ≡ 0; k = 4, 5 keep the inverses), asserted to 1e-12 relative after every step.

What a wrong implementation would do here: ĝ ← μĝ + ∇f (Alg. 12's momentum, a 10× larger step),
inverting only at k ≡ 0 (mod T) (steps 1-2 use the warm-start inverses), the π split (differs when
tr A/dim A ≠ tr G/dim G, which holds here), statistics at the old θ — each changes θ after ≤ 2 steps
by far more than 1e-12 (``test_each_alg7_ingredient_is_seen`` shows it for the first three).
"""
from __future__ import annotations

import math

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

load_all()
TOL = 1e-12
STEPS = 6
HP = dict(lr=0.05, damping=0.3, momentum=0.9, beta=0.9)


def build(kind, seed=0):
    r = np.random.default_rng(seed)
    if kind == "mlp":   # BatchNorm γ/β: non-Kronecker blocks moved along ĝ
        X, y = r.standard_normal((24, 5)), r.integers(0, 3, 24)
        m = Sequential([Dense(6), Tanh(), BatchNorm(), Dense(4), Tanh(), Dense(3)], input_shape=(5,))
    else:               # KFC taps: 36 and 9 locations
        X, y = r.standard_normal((24, 1, 6, 6)), r.integers(0, 3, 24)
        m = Sequential([Conv2d(3, 3, padding=1), Tanh(), Conv2d(4, 2, stride=2), Tanh(), Flatten(), Dense(3)],
                       input_shape=(1, 6, 6))
    th = m.init(seed) + 0.05 * r.standard_normal(m.layout.size)
    return m, th, Problem(m, "softmax_ce", X, y, seed=seed)


def _blocks(model):
    out, start = {}, 0
    for b in model.layout.blocks:
        size = int(np.prod(b.shape)) if len(b.shape) else 1
        out[b.name] = (start, tuple(b.shape))
        start += size
    return out


class Alg7Replay:
    """Thesis Algorithm 7 in dense NumPy (see the module docstring)."""

    def __init__(self, twin, model, theta, *, lr, damping, momentum, beta, T, T1, batch, fisher="sampled",
                 pi_split=False, mom_form="ch2", early_inverses=True):
        self.twin, self.lr, self.lam, self.mu, self.beta = twin, lr, damping, momentum, beta
        self.T, self.T1, self.batch, self.fisher = T, T1, batch, fisher
        self.pi_split, self.mom_form, self.early = pi_split, mom_form, early_inverses   # deliberate mutations
        self.k, self.mom = 0, np.zeros_like(theta)
        self.blocks = _blocks(model)
        self.names = [layer.name for layer in model.kron_layers]
        sA, sG, count = {}, {}, 0
        n = twin.n_samples
        for start in range(0, n, batch):   # warm start: the whole training set (L832-840)
            obj = twin.subset(np.arange(start, min(n, start + batch)))
            for name, (A, G) in self.factors(obj.at(theta).layer_stats(fisher)).items():
                sA[name] = sA.get(name, 0) + obj.n_samples * A
                sG[name] = sG.get(name, 0) + obj.n_samples * G
            count += obj.n_samples
        self.A = {k: v / count for k, v in sA.items()}
        self.G = {k: v / count for k, v in sG.items()}
        self.HA, self.HG, self.pi = {}, {}, {}
        self.invert()

    @staticmethod
    def factors(taps):
        """(3.9): A = (1/N) Σᵢ Σₜ āāᵀ, G = (1/(N L)) Σᵢ Σₜ ggᵀ (dense: L = 1)."""
        out = {}
        for name, t in taps.items():
            a, g = t["a"], t["g"]
            N, L = a.shape[0], (a.shape[1] if a.ndim == 3 else 1)
            a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
            out[name] = (a2.T @ a2 / N, g2.T @ g2 / (N * L))
        return out

    def invert(self):
        r = math.sqrt(self.lam)
        for n in self.A:
            A, G = self.A[n], self.G[n]
            pi = math.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G))) if self.pi_split else 1.0
            self.pi[n] = pi
            self.HA[n] = np.linalg.inv(A + pi * r * np.eye(len(A)))
            self.HG[n] = np.linalg.inv(G + r / pi * np.eye(len(G)))

    def view(self, flat, name):
        start, shape = self.blocks[f"{name}.W"]
        return flat[start:start + int(np.prod(shape))].reshape(shape)

    def step(self, theta):
        obj = self.twin.batch(self.batch)
        grad = obj.at(theta).grad
        self.k += 1
        if self.mom_form == "ch2":
            self.mom = self.mu * self.mom + (1 - self.mu) * grad
        else:
            self.mom = self.mu * self.mom + grad
        P = self.mom.copy()                                    # BatchNorm γ/β: ĝ
        for n in self.names:
            self.view(P, n)[...] = self.HG[n] @ self.view(self.mom, n) @ self.HA[n]     # l. 5
        new = theta - self.lr * P                                                       # l. 6
        if self.k % self.T1 == 0:                                                       # l. 8-9
            for n, (A, G) in self.factors(obj.at(new).layer_stats(self.fisher)).items():
                self.A[n] = self.beta * self.A[n] + (1 - self.beta) * A
                self.G[n] = self.beta * self.G[n] + (1 - self.beta) * G
        if (self.early and self.k <= self.T) or self.k % self.T == 0:                   # l. 10-11
            self.invert()
        return new


def _close(tag, got, ref):
    got, ref = np.asarray(got, float), np.asarray(ref, float)
    assert got.shape == ref.shape, tag
    dev = float(np.abs(got - ref).max()) / max(1.0, float(np.abs(ref).max()))
    assert dev <= TOL, f"{tag}: relative deviation {dev:.3e}"


def _run(kind, T1, fisher="sampled", steps=STEPS):
    m, th, prob = build(kind)
    m2, _, twin = build(kind)
    opt = OPTIMIZERS["kfac"](stat_freq=T1, inv_freq=3, batch_size=8, fisher=fisher, version="ch2", **HP)
    rp = Alg7Replay(twin, m2, th, T=3, T1=T1, batch=8, fisher=fisher, **HP)
    st, th_o, th_r = opt.init(th), th.copy(), th.copy()
    for k in range(1, steps + 1):
        th_o, st, info = opt.step(th_o, st, prob)
        th_r = rp.step(th_r)
        assert info.accepted and not info.skipped, (kind, k, info)
        _close(f"{kind} theta@{k}", th_o, th_r)
        _close(f"{kind} mom@{k}", st.mom, rp.mom)
        for n in rp.names:
            for attr in ("A", "G", "HA", "HG"):
                _close(f"{kind} {attr}[{n}]@{k}", getattr(st, attr)[n], getattr(rp, attr)[n])
            assert st.pi[n] == 1.0 and info.extra["pi"][n] == 1.0
    return st


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("T1", [1, 2])
def test_alg7_replay(kind, T1):
    _run(kind, T1)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_alg7_replay_empirical_fisher(kind):
    _run(kind, 2, fisher="empirical", steps=4)


def test_each_alg7_ingredient_is_seen():
    """The replay with one ingredient of Alg. 7 replaced (Alg. 12's momentum, no re-inversion for k ≤ T,
    the π split) leaves the optimizer's θ after two steps by ≫ 1e-12: the replay test can fail."""
    for mutation in (dict(mom_form="ch3"), dict(early_inverses=False), dict(pi_split=True)):
        m, th, prob = build("mlp")
        m2, _, twin = build("mlp")
        opt = OPTIMIZERS["kfac"](stat_freq=1, inv_freq=3, batch_size=8, version="ch2", **HP)
        rp = Alg7Replay(twin, m2, th, T=3, T1=1, batch=8, **HP, **mutation)
        st, th_o, th_r = opt.init(th), th.copy(), th.copy()
        for _ in range(2):
            th_o, st, _info = opt.step(th_o, st, prob)
            th_r = rp.step(th_r)
        assert np.abs(th_o - th_r).max() > 1e-6, mutation


def test_ch3_default_unchanged_and_ch2_differs():
    """version="ch3" is the default (Alg. 12; the reference trajectories pin it bit for bit) and
    ``version="ch2"`` is a different method on the same problem."""
    m, th, prob = build("mlp")
    a = OPTIMIZERS["kfac"](batch_size=8, **HP)
    b = OPTIMIZERS["kfac"](batch_size=8, version="ch3", **HP)
    assert a.version == "ch3"
    ta, _, _ = a.step(th.copy(), a.init(th), prob)
    _, _, prob2 = build("mlp")
    tb, _, _ = b.step(th.copy(), b.init(th), prob2)
    assert np.array_equal(ta, tb)
    _, _, prob3 = build("mlp")
    c = OPTIMIZERS["kfac"](batch_size=8, version="ch2", **HP)
    tc, _, _ = c.step(th.copy(), c.init(th), prob3)
    assert np.abs(tc - ta).max() > 1e-6


@pytest.mark.parametrize("bad", ["ch1", "", None, 2, "CH2"])
def test_version_refused_by_name(bad):
    with pytest.raises(ValueError, match="version must be 'ch3' or 'ch2'"):
        OPTIMIZERS["kfac"](version=bad)


def test_ch2_cost_model():
    """ch2's momentum μĝ + (1−μ)∇f costs 2n (ch3's μĝ + ∇f: n); the other terms are the same per-step
    averages (the k ≤ T re-inversions are T inversions once, at the start, not a per-step term)."""
    from qnref.optim.costs import algebra_flops

    m = Sequential([Dense(3)], input_shape=(2,), name="tiny")      # W̄ 3 × 3, n = 9
    t2 = algebra_flops(OPTIMIZERS["kfac"](stat_freq=1, inv_freq=1, batch_size=4, version="ch2"), m)["terms"]
    t3 = algebra_flops(OPTIMIZERS["kfac"](stat_freq=1, inv_freq=1, batch_size=4), m)["terms"]
    assert t2["momentum"] == 18 and t3["momentum"] == 9
    assert {k: v for k, v in t2.items() if k != "momentum"} == {k: v for k, v in t3.items() if k != "momentum"}


def test_step_floor_hand_computed():
    """One dense layer 2 → 3 (o = a = 3, n = 9), N = 4, T₁ = T₂ = 1: gradient 3·N·o·a = 108, curvature
    pass 2·N·o·a = 72, statistics (symmetric products) N(a(a+1) + o(o+1))/2 = 48, inverses a³ + o³ = 54,
    preconditioning o²a + oa² = 54, vectors 3n = 27: floor = 363/108."""
    m = Sequential([Dense(3)], input_shape=(2,), name="tiny")
    f = OPTIMIZERS["kfac"](stat_freq=1, inv_freq=1, batch_size=4).step_floor(m)
    assert (f["gradient"], f["curvature_pass"], f["factor_statistics"], f["inverses"], f["precondition"],
            f["vector"]) == (108, 72, 48, 54, 54, 27)
    assert f["floor"] == pytest.approx(363 / 108, rel=1e-15) and f["passes"] == pytest.approx(5 / 3)
    f10 = OPTIMIZERS["kfac"](stat_freq=10, inv_freq=100, batch_size=4).step_floor(m)
    assert f10["passes"] == pytest.approx(1 + 2 / 30)


def test_step_floor_counts_conv_locations():
    """A conv layer 1 → 2 channels, 3×3 kernel, padding 1 on 4×4 inputs: L = 16 locations, a = 10, o = 2."""
    m = Sequential([Conv2d(2, 3, padding=1), Flatten(), Dense(3)], input_shape=(1, 4, 4))
    f = OPTIMIZERS["kfac"](stat_freq=1, inv_freq=1, batch_size=5).step_floor(m)
    assert f["gradient"] == 3 * 5 * (16 * 2 * 10 + 3 * 33)
    assert f["factor_statistics"] == 5 * (16 * (55 + 3) + (561 + 6))


@pytest.mark.parametrize("version", ["ch3", "ch2"])
def test_steps_do_only_what_they_need(version):
    """Issue 21: a step with k ≢ 0 (mod T₁) runs one forward and one plain gradient backward (no taps, no
    sampled targets); a statistics step adds one forward at θ⁺ and one "layer_stats" backward."""
    m, th, prob = build("conv")
    opt = OPTIMIZERS["kfac"](stat_freq=3, inv_freq=5, batch_size=8, version=version, **HP)
    st = opt.init(th)
    th, st, _ = opt.step(th, st, prob)                          # k = 1: the warm start happens here
    for k in (2, 3):
        c = prob.counter
        f0, b0, calls0 = c.forward, c.backward, dict(c.calls)
        th, st, _ = opt.step(th, st, prob)
        calls = {key: v - calls0.get(key, 0) for key, v in c.calls.items() if v != calls0.get(key, 0)}
        if k % 3:
            assert (c.forward - f0, c.backward - b0) == (8, 8) and calls == {"forward": 1, "grad": 1}, calls
        else:
            assert (c.forward - f0, c.backward - b0) == (16, 16), calls
            assert calls == {"forward": 2, "grad": 1, "layer_stats": 1}, calls
