"""The K-BFGS variants of Ren's thesis (issue 20) against dense NumPy replays written from the text.

Variants (``qnref.optim.kbfgs.VARIANTS``; docs/kbfgs.md):

* Table 3.8 (L1656) "K-BFGS (#1 off)": Alg. 9 with DD (Alg. 3) instead of D_P D_LM (Alg. 8);
  "K-BFGS (#2 off)": Alg. 9 with the moving-average Hessian action of §2.4 instead of (3.14)-(3.15);
* Alg. 5 (L653-680, §2.7): K-BFGS(L) with DD-skip (l. 17), exact H_A = (A(k) + λ_A I)⁻¹ of the moving
  average A(k) (l. 21-23), the minibatch gradient (l. 8), H_g(0) = I, α_k = α k^(−β);
* Alg. 10/11 (L1299-1335, §3.6): K-BFGS(L) with D_P(I) D_LM, exact H_A = (Â + λ_A I)⁻¹ of the batch's Â
  (l. 12), the minibatch gradient (l. 6), H_G(0) = λ_G⁻¹ I, α_k = α k^(−β);
* §2.8.3 (L952-964) "double-grad(-minibatch)": Alg. 4 whose gradient is the average of this batch's
  and the previous batch's second-pass gradient, both at θ_k (the plain gradient on the first step).

The replay (:class:`TextReplay`) takes from qnref only what the text takes as given — the loss, the
minibatch gradient and the layer taps through the public ``Point`` API — and from ``replay_dense``
only its generic dense helpers (layout views, the BFGS formula (2.6), the two-loop recursion); the
damping procedures of Alg. 3, 8 and 11 and the skip test of Alg. 5 l. 17 are written out here from
the text. It is configured from the text (``TEXT``), not from ``VARIANTS``, so a wrong preset fails.
Every step compares θ, α_k, the skipped count and every state array to 1e-12 (float64, relative to
max(1, |ref|)), on the Dense-Tanh-BatchNorm-Dense-Tanh-Dense MLP (BatchNorm γ/β: non-Kronecker
blocks moved along ĝ with rate α_k/λ, §3.4.3) and, for the ch.3 variants, a small CNN; curvature
every T = 1 and every T = 2 steps; BFGS (``kbfgs``) and L-BFGS with memory 2 (``kbfgs-l``).
"""
from __future__ import annotations

import copy
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
from qnref.optim import _kron_common as kc
from qnref.optim.base import Problem, state_from_host, state_to_host
from qnref.optim.kbfgs import KBFGS, KBFGSL, VARIANTS, KBFGSState
from qnref.optim.registry import OPTIMIZERS

import replay_dense as rd

load_all()
TOL = 1e-12
STEPS = 5


def problem(kind, seed=0):
    r = np.random.default_rng(seed)
    if kind == "mlp":
        X, y = r.standard_normal((24, 5)), r.integers(0, 3, 24)
        # BatchNorm after the activation (a Kronecker layer feeding BatchNorm has ḡ ≡ 0, see test_replays)
        m = Sequential([Dense(6), Tanh(), BatchNorm(), Dense(4), Tanh(), Dense(3)], input_shape=(5,))
    else:
        X, y = r.standard_normal((24, 1, 6, 6)), r.integers(0, 3, 24)
        m = Sequential([Conv2d(3, 3, padding=1), Tanh(), Conv2d(4, 2, stride=2), Tanh(), Flatten(), Dense(3)],
                       input_shape=(1, 6, 6))
    th = m.init(seed)
    th = th + 0.05 * r.standard_normal(th.shape)
    return m, th, Problem(m, "softmax_ce", X, y, seed=seed)


# -- the damping procedures and the skip test, from the text -------------------------------------------------
class Branches:
    """Which branches of the damping procedures a replay took (a test must see both sides)."""

    def __init__(self):
        self.powell = self.powell_off = self.b_eq_i = self.b_eq_i_off = self.skips = self.kept = 0


def powell_text(s, y, Hy, mu1, br):
    """Alg. 3 l. 2-3 / Alg. 8 l. 2-7 (Powell's damping on H)."""
    sy, yHy = s @ y, y @ Hy
    if sy < mu1 * yHy:
        th1 = (1 - mu1) * yHy / (yHy - sy)
        br.powell += 1
    else:
        th1 = 1.0
        br.powell_off += 1
    return th1 * s + (1 - th1) * Hy


def dd_text(s, y, Hy, mu1, mu2, br):
    """Alg. 3 (DD): Powell on H, then Powell with B = I."""
    st = powell_text(s, y, Hy, mu1, br)
    ss, sty = st @ st, st @ y
    if sty < mu2 * ss:
        th2 = (1 - mu2) * ss / (ss - sty)
        br.b_eq_i += 1
    else:
        th2 = 1.0
        br.b_eq_i_off += 1
    return st, th2 * y + (1 - th2) * st


def dpdlm_text(s, y, Hy, mu1, mu2, br):
    """Alg. 8 (D_P D_LM): Powell on H, then ỹ = y + μ₂ s̃."""
    st = powell_text(s, y, Hy, mu1, br)
    return st, y + mu2 * st


def dpidlm_text(s, y, mu1, mu2, br):
    """Alg. 11 (D_P(I) D_LM), as printed: the test with yᵀ(μ₂⁻¹I)y, θ₁ = (1−μ₁)(yᵀy/μ₂)/(yᵀy/μ₂ − sᵀy),
    s̃ = θ₁ s + (1 − θ₁) μ₂⁻¹ y, ỹ = y + μ₂ s̃."""
    yy, sy = y @ y, s @ y
    if sy < mu1 * (yy / mu2):
        th1 = (1 - mu1) * (yy / mu2) / (yy / mu2 - sy)
        br.powell += 1
    else:
        th1 = 1.0
        br.powell_off += 1
    st = th1 * s + (1 - th1) * y / mu2
    return st, y + mu2 * st


# -- the replay ---------------------------------------------------------------------------------------------
#: each variant as the text writes it: damping procedure, estimate of A, exact inverse or Hessian-action
#: BFGS, gradient estimate, H_G(0) = γI, the DD-skip, the step-size exponent, double-grad
TEXT = {
    # Table 3.8 rows: Alg. 9 with one improvement off (L1656, L1689)
    "table3.8-#1-off": dict(damping="dd", A="minibatch", exact=False, grad="momentum", h0="1/lamG", skip=False,
                            lr_power=None, double=False),
    "table3.8-#2-off": dict(damping="dpdlm", A="moving-average", exact=False, grad="momentum", h0="1/lamG",
                            skip=False, lr_power=None, double=False),
    # Alg. 5: DD (l. 16) with skip (l. 17), A(k) = βA(k−1) + (1−β) aaᵀ, H_a = (A(k) + λ_A I)⁻¹ (l. 21-23),
    # ∇̂f = ∇̄f (l. 8), H_g(0) = I (l. 3), α_k ∝ k^(−β) (Thm 2), β = 0.9 (l. 1)
    "alg5": dict(damping="dd", A="moving-average", exact=True, grad="minibatch", h0="1", skip=True, lr_power=0.9,
                 double=False),
    # Alg. 10: D_P(I) D_LM (l. 15, Alg. 11), H_A = (Â + λ_A I)⁻¹ of the minibatch (l. 12), ∇̃f (l. 6),
    # H_G = λ_G⁻¹ I (l. 1), α_k ∝ k^(−β) (Thm 4)
    "alg10": dict(damping="dpidlm", A="minibatch", exact=True, grad="minibatch", h0="1/lamG", skip=False,
                  lr_power=0.9, double=False),
    # §2.8.3: Alg. 4 with the gradient averaged with the previous second-pass gradient
    "double-grad": dict(damping="dd", A="moving-average", exact=False, grad="moving-average", h0="1", skip=False,
                        lr_power=None, double=True),
}


class TextReplay:
    """K-BFGS / K-BFGS(L) in dense NumPy, configured by a ``TEXT`` entry (thesis Alg. 4, 5, 9, 10)."""

    def __init__(self, twin, model, theta, cfg, *, lr, damping, beta, mu1, T, batch, memory=None, weight_decay=0.0):
        self.twin, self.model, self.cfg = twin, model, cfg
        self.lr, self.lam, self.beta, self.mu1, self.T, self.batch = lr, damping, beta, mu1, T, batch
        self.memory, self.wd = memory, weight_decay
        self.k = 0
        self.mom = np.zeros_like(theta)
        self.gplus = None
        self.br = Branches()
        self.blocks = rd.blocks(model)
        sums, count, taps0 = {}, 0, None
        for obj in rd.chunk_objectives(twin, batch):           # A on the whole training set (Alg. 5 l. 3, 9 l. 3, 10 l. 1)
            taps0 = obj.at(theta).layer_stats("empirical")
            for name, t in taps0.items():
                a = rd.flat_a(t)
                sums[name] = sums.get(name, 0) + a.T @ a
            count += obj.n_samples
        self.kron, self.others = rd.kron_blocks(model, taps0)
        self.HA, self.HG, self.S, self.Y, self.sG, self.yG, self.A, self.lamAG = {}, {}, {}, {}, {}, {}, {}, {}
        for name, t in taps0.items():
            L = rd.n_loc(t)
            lamA, lamG = math.sqrt(L) * math.sqrt(damping), math.sqrt(damping) / math.sqrt(L)   # §3.3.2
            self.lamAG[name] = (lamA, lamG)
            self.A[name] = sums[name] / count
            self.HA[name] = rd.inv(self.A[name] + lamA * np.eye(len(self.A[name])))
            d_out = t["g"].shape[-1]
            self.HG[name] = np.eye(d_out) * self.gamma0(lamG)
            self.S[name], self.Y[name] = [], []
            self.sG[name], self.yG[name] = np.zeros(d_out), np.zeros(d_out)

    def gamma0(self, lamG):
        return 1.0 / lamG if self.cfg["h0"] == "1/lamG" else 1.0

    def apply_HG(self, name, X):
        if self.memory is None:
            return self.HG[name] @ X
        g0 = self.gamma0(self.lamAG[name][1])
        if X.ndim == 1:
            return rd.lbfgs_two_loop(self.S[name], self.Y[name], g0, X)
        return np.stack([rd.lbfgs_two_loop(self.S[name], self.Y[name], g0, X[:, j]) for j in range(X.shape[1])], axis=1)

    def step(self, theta):
        cfg = self.cfg
        obj = self.twin.batch(self.batch)
        p = obj.at(theta)
        self.k += 1
        grad = p.grad
        if cfg["double"] and self.gplus is not None:
            grad = 0.5 * (grad + self.gplus)                               # §2.8.3: both batches at θ_k
        if cfg["grad"] == "momentum":
            self.mom = self.beta * self.mom + grad                         # Alg. 9 l. 8
        elif cfg["grad"] == "moving-average":
            self.mom = self.beta * self.mom + (1 - self.beta) * grad       # Alg. 4 l. 8
        else:
            self.mom = grad.copy()                                         # Alg. 5 l. 8, Alg. 10 l. 6
        self.alpha = self.lr if cfg["lr_power"] is None else self.lr * self.k ** (-cfg["lr_power"])
        P = np.zeros_like(theta)
        for i in self.others:
            rd.block_view(P, self.blocks[i])[...] = rd.block_view(self.mom, self.blocks[i]) / self.lam
        for name, i in self.kron.items():
            rd.block_view(P, self.blocks[i])[...] = self.apply_HG(name, rd.block_view(self.mom, self.blocks[i]) @ self.HA[name])
        new = theta - self.alpha * (P + self.wd * theta)
        self.gplus = None
        self.skipped = 0
        if self.k % self.T == 0:
            taps = p.layer_stats("empirical")
            pn = obj.at(new)
            tn = pn.layer_stats("empirical")
            if cfg["double"]:
                self.gplus = pn.grad                                       # ∇̄f⁺ of this batch at θ_{k+1}
            for name, i in self.kron.items():
                self._curv(name, taps[name], tn[name], rd.block_view(theta, self.blocks[i]),
                           rd.block_view(new, self.blocks[i]))
        return new

    def _curv(self, name, t, tn, W, Wn):
        cfg, br = self.cfg, self.br
        lamA, lamG = self.lamAG[name]
        a = rd.flat_a(t)
        N = t["a"].shape[0]
        Abatch = a.T @ a / N                                   # E_n[Σ_t a aᵀ] of the batch (3.9)
        if cfg["A"] == "moving-average":
            self.A[name] = self.beta * self.A[name] + (1 - self.beta) * Abatch
            Aest = self.A[name]
        else:
            Aest = Abatch
        if cfg["exact"]:
            self.HA[name] = rd.inv(Aest + lamA * np.eye(len(Aest)))          # Alg. 5 l. 22-23 / Alg. 10 l. 12
        else:
            sA = self.HA[name] @ a.mean(axis=0)                              # s_A = H_A â (3.14)
            yA = Aest @ sA + lamA * sA
            if sA @ yA > 0:
                self.HA[name] = rd.bfgs_H(self.HA[name], sA, yA)
        h, hn = (a @ W.T).mean(axis=0), (rd.flat_a(tn) @ Wn.T).mean(axis=0)
        g, gn = rd.flat_g(t).mean(axis=0), rd.flat_g(tn).mean(axis=0)
        self.sG[name] = self.beta * self.sG[name] + (1 - self.beta) * (hn - h)
        self.yG[name] = self.beta * self.yG[name] + (1 - self.beta) * (gn - g)
        s, y = self.sG[name], self.yG[name]
        if cfg["damping"] == "dpidlm":
            st, yt = dpidlm_text(s, y, self.mu1, lamG, br)
        else:
            Hy = self.apply_HG(name, y)
            st, yt = (dd_text if cfg["damping"] == "dd" else dpdlm_text)(s, y, Hy, self.mu1, lamG, br)
        if not st @ yt > 0:
            self.skipped += 1
            return
        if cfg["skip"]:
            # Alg. 5 l. 17, with the documented rounding margin √ε: after Powell's step with ỹ = y the
            # test is an equality in exact arithmetic (s̃ᵀy = μ₁yᵀHy), which the text keeps
            if not st @ yt >= self.mu1 * (yt @ self.apply_HG(name, yt)) * (1 - math.sqrt(np.finfo(float).eps)):
                br.skips += 1
                self.skipped += 1
                return
            br.kept += 1
        if self.memory is None:
            self.HG[name] = rd.bfgs_H(self.HG[name], st, yt)
        else:
            self.S[name].append(st)
            self.Y[name].append(yt)
            if len(self.S[name]) > self.memory:
                self.S[name].pop(0)
                self.Y[name].pop(0)


def close(tag, got, ref):
    got, ref = np.asarray(got, dtype=float), np.asarray(ref, dtype=float)
    assert got.shape == ref.shape, (tag, got.shape, ref.shape)
    dev = float(np.abs(got - ref).max()) / max(1.0, float(np.abs(ref).max())) if ref.size else 0.0
    assert dev <= TOL, f"{tag}: relative deviation {dev:.3e}"


def compare_state(st, rp, tag):
    assert st.k == rp.k, tag
    close(f"{tag}:mom", st.mom, rp.mom)
    if rp.cfg["double"]:
        assert (st.grad_plus is None) == (rp.gplus is None), tag
        if rp.gplus is not None:
            close(f"{tag}:grad_plus", st.grad_plus, rp.gplus)
    for name in rp.kron:
        close(f"{tag}:HA[{name}]", st.HA[name], rp.HA[name])
        close(f"{tag}:sG[{name}]", st.sG[name], rp.sG[name])
        close(f"{tag}:yG[{name}]", st.yG[name], rp.yG[name])
        close(f"{tag}:lam[{name}]", st.lam[name], rp.lamAG[name])
        if rp.memory is None:
            close(f"{tag}:HG[{name}]", st.HG[name], rp.HG[name])
        else:
            d = rp.sG[name].size
            close(f"{tag}:pairs.S[{name}]", st.pairs[name].S, np.array(rp.S[name]).reshape(-1, d))
            close(f"{tag}:pairs.Y[{name}]", st.pairs[name].Y, np.array(rp.Y[name]).reshape(-1, d))
        if rp.cfg["A"] == "moving-average":
            close(f"{tag}:A[{name}]", st.A[name], rp.A[name])
        else:
            assert name not in st.A, tag


KW = dict(lr=0.1, damping=0.3, beta=0.9, mu1=0.2, weight_decay=0.01)


def run_variant(variant, kind, T, memory, steps=STEPS, **over):
    kw = {**KW, **over}
    m, th, prob = problem(kind)
    m, _, twin = problem(kind)     # the replay's twin: same data, seeds and model
    name = "kbfgs" if memory is None else "kbfgs-l"
    opt = OPTIMIZERS[name](**kw, curvature_freq=T, batch_size=8, **VARIANTS[variant],
                           **({} if memory is None else {"memory": memory}))
    rp = TextReplay(twin, m, th, TEXT[variant], T=T, batch=8, memory=memory, **kw)
    st = opt.init(th)
    th_o, th_r = th.copy(), th.copy()
    tag = f"{name}-{variant}/{kind}/T{T}"
    for k in range(1, steps + 1):
        th_o, st, info = opt.step(th_o, st, prob)
        th_r = rp.step(th_r)
        assert info.accepted and not info.nonfinite, (tag, k, info)
        assert info.skipped == rp.skipped, (tag, k, info.skipped, rp.skipped)
        assert info.step_size == pytest.approx(rp.alpha, rel=1e-15), (tag, k)
        close(f"{tag}:theta@{k}", th_o, th_r)
        compare_state(st, rp, f"{tag}@{k}")
    return opt, st, rp


CASES = [(v, "mlp") for v in TEXT] + [(v, "conv") for v in ("table3.8-#1-off", "table3.8-#2-off", "alg10")]


@pytest.mark.parametrize("variant,kind", CASES)
@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("memory", [None, 2])
def test_variant_replay(variant, kind, T, memory):
    """θ, α_k, skipped updates and every state array after each of 5 steps match the text's algorithm."""
    _, _, rp = run_variant(variant, kind, T, memory)
    br = rp.br
    assert br.powell + br.powell_off > 0
    if TEXT[variant]["damping"] == "dd":     # both sides of DD's second (B = I) step seen at least once overall
        assert br.b_eq_i + br.b_eq_i_off > 0


def test_branches_are_exercised():
    """The replays above go through both sides of every damping test (else a bug in one side would pass):
    Powell's branch on and off (Alg. 3/8/11 l. 2) and DD's second (B = I) branch on and off (Alg. 3 l. 4)."""
    seen = Branches()
    for variant, kind in CASES:
        _, _, rp = run_variant(variant, kind, 1, None)
        for k, v in vars(rp.br).items():
            setattr(seen, k, getattr(seen, k) + v)
    assert seen.powell > 0 and seen.powell_off > 0, vars(seen)
    assert seen.b_eq_i > 0 and seen.b_eq_i_off > 0, vars(seen)


@pytest.mark.parametrize("memory", [None, 2])
def test_alg5_skip_replay_with_frequent_skips(memory):
    """Alg. 5 with μ₁ = 0.5: the DD-skip of l. 17 refuses some pairs and keeps others; 8 steps."""
    _, _, rp = run_variant("alg5", "mlp", 1, memory, steps=8, mu1=0.5)
    assert rp.br.skips > 0 and rp.br.kept > 0, vars(rp.br)


# -- the presets are what docs/kbfgs.md says ----------------------------------------------------------------------
@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_versions_and_variants_are_the_documented_settings(cls):
    """version="ch3"/"ch2" are presets of (damping_scheme, hessian_action, gradient); Table 3.8's rows
    switch one improvement off each; Alg. 5 / Alg. 10 / double-grad as documented."""
    def pieces(o):
        return (o.damping_scheme, o.hessian_action, o.gradient, o.exact_inverse, o.skip, o.lr_power, o.double_grad,
                o._h0(4.0))
    assert pieces(cls()) == ("dpdlm", "minibatch", "momentum", False, False, None, False, 0.25)
    assert pieces(cls(version="ch2")) == ("dd", "moving-average", "moving-average", False, False, None, False, 1.0)
    assert pieces(cls(**VARIANTS["table3.8-#1-off"])) == ("dd", "minibatch", "momentum", False, False, None, False, 0.25)
    assert pieces(cls(**VARIANTS["table3.8-#2-off"])) == ("dpdlm", "moving-average", "momentum", False, False, None,
                                                         False, 0.25)
    assert pieces(cls(**VARIANTS["alg5"])) == ("dd", "moving-average", "minibatch", True, True, 0.9, False, 1.0)
    assert pieces(cls(**VARIANTS["alg10"])) == ("dpidlm", "minibatch", "minibatch", True, False, 0.9, False, 0.25)
    assert pieces(cls(**VARIANTS["double-grad"])) == ("dd", "moving-average", "moving-average", False, False, None,
                                                     True, 1.0)


BAD = [({"damping_scheme": "powell"}, "damping_scheme"), ({"hessian_action": "exact"}, "hessian_action"),
       ({"gradient": "adam"}, "gradient"), ({"lr_power": 0.5}, "lr_power"), ({"lr_power": 1.0}, "lr_power"),
       ({"lr_power": math.nan}, "lr_power"), ({"skip": 1}, "skip"), ({"exact_inverse": "yes"}, "exact_inverse"),
       ({"double_grad": None}, "double_grad"), ({"damping_scheme": "dd", "damping": 2.0}, "damping"),
       ({"version": "alg5"}, "version")]


@pytest.mark.parametrize("kw,param", BAD)
def test_bad_variant_hyperparameters_are_refused_by_name(kw, param):
    with pytest.raises(ValueError, match=param):
        KBFGSL(**kw)


def test_lr_power_schedule_is_alpha_k_to_the_minus_power():
    opt = KBFGSL(lr=0.3, lr_power=0.75)
    assert [opt.step_size(k) for k in (1, 2, 16)] == [0.3, 0.3 * 2 ** -0.75, 0.3 / 8]
    assert KBFGSL(lr=0.3).step_size(16) == 0.3


# -- damping helpers: the equalities of Alg. 3, 8 and 11, Lemma 4, the skip test of Alg. 5 l. 17 ----------------
def _spd(r, d):
    Z = r.standard_normal((d, d + 2))
    return Z @ Z.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("seed", range(6))
def test_dpi_dlm_equalities_alg11_and_lemma4(seed):
    """Alg. 11 with Powell's branch taken makes its bound an equality: s̃ᵀy = (μ₁/μ₂) yᵀy, and ỹ = y + μ₂s̃
    exactly, so s̃ᵀỹ = (μ₁/μ₂)‖y‖² + μ₂‖s̃‖²; not taken: s̃ = s. Lemma 4: s̃ᵀs̃/s̃ᵀỹ ≤ 1/μ₂ and
    ỹᵀỹ/s̃ᵀỹ ≤ 1/μ₃, μ₃ = μ₁/(μ₂(1 + 2μ₁)). Alg. 11 is Alg. 8 with H = μ₂⁻¹I."""
    r = np.random.default_rng(seed)
    d = 7
    mu1 = [0.2, 0.05, 0.5][seed % 3]
    br = Branches()
    for mu2 in (0.1, 0.6, 3.0):
        s = r.standard_normal(d)
        y = -0.3 * s + 0.05 * r.standard_normal(d)           # sᵀy < 0: Powell's branch
        assert s @ y < mu1 / mu2 * (y @ y)
        st, yt = kc.dpi_dlm(s, y, mu1, mu2)
        np.testing.assert_allclose(st @ y, mu1 / mu2 * (y @ y), rtol=1e-12)
        np.testing.assert_allclose(yt, y + mu2 * st, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(st @ yt, mu1 / mu2 * (y @ y) + mu2 * (st @ st), rtol=1e-12)
        ref_s, ref_y = dpidlm_text(s, y, mu1, mu2, br)
        np.testing.assert_allclose(st, ref_s, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(yt, ref_y, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(kc.dp_dlm(s, y, y / mu2, mu1, mu2)[0], st, rtol=0, atol=0)
        mu3 = mu1 / (mu2 * (1 + 2 * mu1))
        assert (st @ st) / (st @ yt) <= 1 / mu2 * (1 + 1e-12)
        assert (yt @ yt) / (st @ yt) <= 1 / mu3 * (1 + 1e-12)
        y2 = mu2 * s                                        # sᵀy = μ₂‖s‖² ≥ (μ₁/μ₂)‖y‖² = μ₁μ₂‖s‖²: not taken
        st2, yt2 = kc.dpi_dlm(s, y2, mu1, mu2)
        np.testing.assert_array_equal(st2, s)
        np.testing.assert_allclose(yt2, y2 + mu2 * s, rtol=1e-15)
    assert br.powell == 3


@pytest.mark.parametrize("seed", range(4))
def test_dd_and_dpdlm_equalities_in_the_ablation_settings(seed):
    """The damping of Table 3.8's "#1 off" (DD, Alg. 3) and of K-BFGS (D_P D_LM, Alg. 8) with μ₂ = λ_G:
    Powell's branch gives s̃ᵀy = μ₁ yᵀHy (equality), DD's B = I branch gives s̃ᵀỹ = μ₂ s̃ᵀs̃ (equality),
    D_P D_LM gives ỹ = y + μ₂ s̃ (identity), each equal to the text's procedure written out here."""
    r = np.random.default_rng(10 + seed)
    d = 6
    H = _spd(r, d)
    mu1, br = 0.2, Branches()
    mu2 = math.sqrt(0.3)                                    # λ_G = √λ, λ = 0.3 (dense layer)
    s = r.standard_normal(d)
    y = -0.5 * s + 0.1 * r.standard_normal(d)
    Hy = H @ y
    st, yt = kc.double_damping(s, y, Hy, mu1, mu2)
    np.testing.assert_allclose(st @ y, mu1 * (y @ Hy), rtol=1e-12)
    if st @ y < mu2 * (st @ st):
        np.testing.assert_allclose(st @ yt, mu2 * (st @ st), rtol=1e-12)
    ref = dd_text(s, y, Hy, mu1, mu2, br)
    np.testing.assert_allclose(st, ref[0], rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(yt, ref[1], rtol=1e-12, atol=1e-14)
    st3, yt3 = kc.dp_dlm(s, y, Hy, mu1, mu2)
    np.testing.assert_allclose(st3 @ yt3, mu1 * (y @ Hy) + mu2 * (st3 @ st3), rtol=1e-12)
    ref3 = dpdlm_text(s, y, Hy, mu1, mu2, br)
    np.testing.assert_allclose(yt3, ref3[1], rtol=1e-13, atol=1e-14)
    assert br.powell == 2


def test_dd_skip_test_is_alg5_line17():
    """Keep the pair iff s̃ᵀỹ ≥ μ₁ ỹᵀHỹ: the boundary (equality) keeps it, 1e-6 below skips; a rounding
    margin √ε (float64: 1.5e-8, float32: 3.5e-4) keeps pairs that sit on the boundary up to rounding."""
    H = np.diag([1.0, 2.0])
    yt = np.array([1.0, 1.0])
    bound = 0.2 * (yt @ H @ yt)                              # 0.6
    st = np.array([bound, 0.0])                              # s̃ᵀỹ = 0.6 exactly
    assert kc.dd_skip_passes(st, yt, H @ yt, 0.2)
    assert kc.dd_skip_passes(st * (1 - 1e-12), yt, H @ yt, 0.2)
    assert not kc.dd_skip_passes(st * (1 - 1e-6), yt, H @ yt, 0.2)
    assert kc.dd_skip_passes(2 * st, yt, H @ yt, 0.2)
    f = np.float32
    assert kc.dd_skip_passes((st * (1 - 1e-5)).astype(f), yt.astype(f), (H @ yt).astype(f), 0.2)
    assert not kc.dd_skip_passes((st * (1 - 1e-2)).astype(f), yt.astype(f), (H @ yt).astype(f), 0.2)


@pytest.mark.parametrize("seed", range(20))
def test_dd_skip_keeps_powell_pairs_on_the_boundary(seed):
    """Powell's step makes s̃ᵀy = μ₁yᵀHy; when DD's B = I step is inactive (ỹ = y) the Alg. 5 test is an
    equality in exact arithmetic and the pair is kept (l. 17 reads ≥), whatever the rounding."""
    r = np.random.default_rng(100 + seed)
    d = 9
    H = _spd(r, d)
    s = r.standard_normal(d)
    y = -0.1 * s + 0.01 * r.standard_normal(d)               # sᵀy < 0: Powell's branch
    mu1, mu2 = 0.2, 1e-3                                     # μ₂ small: the B = I step stays inactive
    st, yt = kc.double_damping(s, y, H @ y, mu1, mu2)
    assert np.array_equal(yt, y) and s @ y < mu1 * (y @ H @ y)
    assert kc.dd_skip_passes(st, yt, H @ yt, mu1)


# -- state: consumed, resumable from a copy and from a checkpoint ----------------------------------------------
@pytest.mark.parametrize("variant", ["alg5", "alg10", "double-grad", "table3.8-#2-off"])
def test_variant_state_resumes_bit_identically(variant):
    m, th, prob = problem("mlp")
    opt = KBFGSL(**KW, curvature_freq=1, batch_size=8, memory=3, **VARIANTS[variant])
    st = opt.init(th)
    for _ in range(2):
        th, st, _ = opt.step(th, st, prob)
    if variant == "double-grad":
        assert st.grad_plus is not None
    saved, saved_problem = copy.deepcopy(st), copy.deepcopy(prob.state())
    restored = state_from_host(KBFGSState, state_to_host(st))
    a, _, _ = opt.step(th.copy(), st, prob)
    for resumed in (saved, restored):
        prob.load_state(copy.deepcopy(saved_problem))
        b, _, _ = opt.step(th.copy(), resumed, prob)
        np.testing.assert_array_equal(a, b)


def test_double_grad_first_step_uses_the_plain_gradient():
    """No second pass before the first step: ∇f is the batch gradient alone (§2.8.3 'except at the very
    first iteration'); with T = 2 only the step after a curvature step is doubled."""
    m, th, prob = problem("mlp")
    opt = KBFGS(**KW, curvature_freq=2, batch_size=8, **VARIANTS["double-grad"])
    st = opt.init(th)
    th1, st, _ = opt.step(th, st, prob)
    assert st.grad_plus is None                               # k = 1: no curvature pass
    th2, st, _ = opt.step(th1, st, prob)
    assert st.grad_plus is not None                           # k = 2: the pass at θ₃ on batch 2
    th3, st, _ = opt.step(th2, st, prob)
    assert st.grad_plus is None
