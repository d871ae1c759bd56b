"""Checks of qnref.optim.costs.algebra_flops (issue 10: flops of each optimizer's own algebra).

Independent check: the real ``opt.step`` runs on a small quadratic whose objective passes are
computed on plain arrays, while the gradient, θ and the pair memory are a counting ndarray
subclass: every elementwise multiply/divide and every matmul (m·k·p) the optimizer does is
counted; dense LAPACK calls are charged the module's nominal costs. The objective's own
arithmetic is therefore not counted (nothing to subtract), and the formula must match exactly.
"""
import math

import numpy as np
import pytest

from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim import load_all, make_optimizer
from qnref.optim.operators import LBFGSOperator, LSR1Operator
from qnref.optim.pairs import PairStore
from qnref.optim.base import Optimizer
from qnref.optim.costs import algebra_flops
from qnref.optim.registry import OPTIMIZERS

#: rounding slack of a summed formula: each term is rounded separately (at most ½ each)
ROUNDING = 24


# -- a counting array -------------------------------------------------------------------------------
class Counting(np.ndarray):
    """ndarray that counts multiplications of the operations it takes part in."""

    total = 0

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        args = [x.view(np.ndarray) if isinstance(x, Counting) else x for x in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, Counting) else o for o in kwargs["out"])
        res = getattr(ufunc, method)(*args, **kwargs)
        if method == "__call__":
            r = np.asarray(res)
            if ufunc in (np.multiply, np.true_divide, np.divide) and r.ndim >= 1:
                Counting.total += r.size
            elif ufunc is np.matmul:
                a = np.asarray(args[0])
                Counting.total += (r.size if r.ndim else 1) * a.shape[-1]  # empty products: 0
        if isinstance(res, np.ndarray) and res.ndim > 0:
            return res.view(Counting)
        return res

    def __array_function__(self, func, types, args, kwargs):
        a = args[0]
        la = np.linalg
        if func is la.inv:
            Counting.total += a.shape[0] ** 3
        elif func is la.solve:
            b = args[1]
            d = a.shape[0]
            Counting.total += d ** 3 / 3 + d * d * (b.shape[1] if b.ndim == 2 else 1)
        elif func is la.eigvalsh:
            Counting.total += 2 * a.shape[0] ** 3 / 3
        elif func is la.eigh:
            Counting.total += 3 * a.shape[0] ** 3
        elif func is la.svd:
            Counting.total += 6 * a.shape[0] ** 3
        elif func is la.qr:
            n, k = a.shape
            Counting.total += 2 * n * k * k - 2 * k ** 3 / 3
        elif func is la.norm and a.ndim == 1:
            Counting.total += a.size
        res = super().__array_function__(func, types, args, kwargs)
        if func in (la.solve, la.inv) and type(res) is np.ndarray:
            res = res.view(Counting)  # (NumPy wraps these with the right-hand side's type)
        return res


def plain(x):
    return np.asarray(x).view(np.ndarray)


class _Point:
    def __init__(self, obj, theta):
        th = plain(theta)
        self.obj, self.theta, self.xp, self.N = obj, theta, np, obj.n_samples
        Ath = obj.A @ th
        self.value = float(0.5 * th @ Ath - obj.b @ th)
        self.grad = (Ath - obj.b).view(Counting)

    def hvp(self, v):
        return (self.obj.A @ plain(v)).view(Counting)

    ggn_vp = hvp


class _Objective:
    def __init__(self, A, b, n_samples=50):
        self.A, self.b, self.n_samples, self.l2 = A, b, n_samples, 0.0

    def at(self, theta):
        return _Point(self, theta)

    def subset(self, idx):
        return self


class _Problem:
    """The optimizer-facing surface of qnref.optim.base.Problem for a quadratic."""

    def __init__(self, n, seed=0):
        r = np.random.default_rng(seed)
        Q = r.standard_normal((n, n))
        self.obj = _Objective(Q @ Q.T / n + np.eye(n), r.standard_normal(n))
        self.n_samples = 50
        self.rng = self.device_rng = np.random.default_rng(seed + 1)
        self.xp = np

    def batch(self, size=None):
        return self.obj

    full = sample = batch


def _counting_run(opt, n=40, steps=8, memory_key=None):
    """Yield (counted multiplications, info, pairs before the step) for each step."""
    prob = _Problem(n)
    theta = np.random.default_rng(3).standard_normal(n).view(Counting)
    state = opt.init(theta)
    mem = getattr(state, "memory", None)
    if isinstance(mem, PairStore):  # pair buffers take part in the count too, and the kept Grams
        mem.Sbuf, mem.Ybuf = mem.Sbuf.view(Counting), mem.Ybuf.view(Counting)
        if mem.has_grams:
            mem.SY, mem.SS, mem.YY = mem.SY.view(Counting), mem.SS.view(Counting), mem.YY.view(Counting)
    out = []
    for _ in range(steps):
        pairs = state.memory.count if isinstance(getattr(state, "memory", None), PairStore) else None
        Counting.total = 0
        theta, state, info = opt.step(theta, state, prob)
        out.append((Counting.total, info, pairs))
    return out


def _vector_layout(n):
    class L:
        size = n
        blocks = []
    return L()


FIRST_ORDER = ["sgd", "momentum", "nag", "adam", "rmsprop", "adagrad", "adadelta", "svrg"]


@pytest.mark.parametrize("name", FIRST_ORDER)
def test_first_order_counts_match_the_code(name):
    opt = make_optimizer(name, **({"inner_steps": 3} if name == "svrg" else {}))
    expected = algebra_flops(opt, _vector_layout(40))["per_step"]
    for counted, info, _ in _counting_run(opt, steps=5):
        assert counted == expected, (name, counted, expected)


def test_rmsprop_with_first_moment():
    opt = make_optimizer("rmsprop", beta1=0.9)
    expected = algebra_flops(opt, _vector_layout(40))["per_step"]
    assert expected == 8 * 40
    assert all(c == expected for c, _, _ in _counting_run(opt, steps=3))


def test_gd_ls_counts_with_trials():
    opt = make_optimizer("gd-ls")
    for counted, info, _ in _counting_run(opt, steps=5):
        if info.accepted:
            t = info.evals - 1
            assert counted == algebra_flops(opt, _vector_layout(40), trials=t)["per_step"]


@pytest.mark.parametrize("name,kw", [("lbfgs", {"memory": 3}), ("lsr1-tr", {"memory": 3}),
                                     ("lsr1-tr", {"memory": 3, "gram_cache": False}),
                                     ("lsr1-ls", {"memory": 3})])
def test_quasi_newton_counts_match_the_code(name, kw):
    opt = make_optimizer(name, **kw)
    checked = 0
    for counted, info, pairs in _counting_run(opt, steps=8):
        if not info.accepted or info.skipped or info.extra.get("fallback") or info.extra.get("gram_fallback"):
            continue
        if name == "lsr1-tr" and info.extra["pairs"] < min(pairs + 1, 3):
            continue  # a pair was pruned: the formula assumes the newest memory is kept
        t = max(info.evals - 1, 1)
        expected = algebra_flops(opt, _vector_layout(40), trials=t, pairs=pairs)["per_step"]
        assert counted == pytest.approx(expected, abs=ROUNDING), (name, pairs, counted, expected)
        checked += 1
    assert checked >= 3


def test_sqn_window_counts_match_the_code():
    L = 2
    opt = make_optimizer("sqn", L=L, memory=3, curvature_batch=10)
    runs = _counting_run(opt, steps=12)
    # steady state (k > 2L, memory filled): the counts of one window equal L × per_step
    for start in (8, 10):
        window = runs[start:start + L]
        counted = sum(c for c, _, _ in window)
        expected = sum(
            algebra_flops(opt, _vector_layout(40), trials=info.evals - 1, pairs=pairs)["per_step"]
            for _, info, pairs in window)
        assert counted == pytest.approx(expected, abs=2), (counted, expected)


# -- structure, scaling, hand-computed values ----------------------------------------------------------
def _autoencoder():
    layers = []
    for s in (32, 16, 8, 16, 32):
        layers += [Dense(s)]
    layers.append(Dense(64))
    return Sequential(layers, input_shape=(64,), name="ae")


def test_every_registered_optimizer_has_a_formula():
    names = sorted(load_all())
    for name in names:  # each class declares its own cost model and its formula in words
        cls = OPTIMIZERS[name]
        assert cls.algebra_flops is not Optimizer.algebra_flops, name
        assert cls.cost_formula, name
    model = _autoencoder()
    for name in names:
        res = algebra_flops(name, model, batch_size=256)
        assert res["per_step"] == sum(res["terms"].values())
        assert res["per_step"] > 0 and all(v >= 0 for v in res["terms"].values()), name


def test_unknown_optimizer_raises():
    class Fake:
        name = "nope"
    with pytest.raises(ValueError):
        algebra_flops(Fake(), _vector_layout(10))


@pytest.mark.parametrize("name,c", [("sgd", 2), ("momentum", 3), ("nag", 4), ("adam", 10), ("rmsprop", 6),
                                    ("adagrad", 6), ("adadelta", 10), ("svrg", 2), ("gd-ls", 2)])
def test_first_order_linear_in_n(name, c):
    for n in (10, 1000, 12345):
        assert algebra_flops(name, _vector_layout(n))["per_step"] == c * n


def test_spd_inverse_count_follows_the_route():
    from qnref.curvature.kron import CHOLESKY_MIN_DIM
    from qnref.optim.costs import flops_spd_inv

    d = CHOLESKY_MIN_DIM
    assert flops_spd_inv(d - 1) == (d - 1) ** 3 and flops_spd_inv(d) == d ** 3 / 2


def test_lbfgs_two_loop_term_uses_the_operators_count():
    n, m = 1000, 7
    t = algebra_flops(make_optimizer("lbfgs", memory=m), _vector_layout(n))["terms"]
    assert t["two_loop"] == LBFGSOperator.two_loop_flops(n, m) == 4 * m * n + n
    # ρᵢ = 1/sᵢᵀyᵢ from the kept curvatures (k, not kn + k), n per appended pair for its sᵢᵀyᵢ
    assert algebra_flops(make_optimizer("lbfgs", memory=m), _vector_layout(n))["per_step"] == (4 * m + 11) * n + m


def test_lsr1_matvec_term_and_leading_coefficient():
    m = 5
    opt = make_optimizer("lsr1-tr", memory=m, gram_cache=False)  # the exact-QR reference route
    a, b = (algebra_flops(opt, _vector_layout(n)) for n in (10_000, 20_000))
    # the B s product is exactly the operator's (2m+1)n + m² (Ψ stored; the paper's (4m+1)n recomputes it)
    assert a["terms"]["Bs"] == LSR1Operator.matvec_flops(10_000, m) == (2 * m + 1) * 10_000 + m * m
    assert LSR1Operator.matvec_flops(10_000, m, psi_formed=False) - a["terms"]["Bs"] == 2 * m * 10_000
    # linear in n at fixed m; coefficient 7m² + 9m + 12 (SᵀY, SᵀS re-formed twice, QR of Ψ)
    assert b["per_step"] - a["per_step"] == (7 * m * m + 9 * m + 12) * 10_000


def test_lsr1_cached_formula_leading_coefficient():
    m = 5
    opt = make_optimizer("lsr1-tr", memory=m)
    assert opt.gram_cache  # the default
    a, b = (algebra_flops(opt, _vector_layout(n)) for n in (10_000, 20_000))
    assert "Bs" not in a["terms"]  # the solver's Bp serves the SR1 test
    # steady state (memory full): (14m + 10)n; while the memory fills: (14k + 14)n
    assert b["per_step"] - a["per_step"] == (14 * m + 10) * 10_000
    a, b = (algebra_flops(opt, _vector_layout(n), pairs=3) for n in (10_000, 20_000))
    assert b["per_step"] - a["per_step"] == (14 * 3 + 14) * 10_000


# -- L-SR1 with cached Grams: independent counts of the step ---------------------------------------
def _lsr1_counts_by_pairs(n, memory, gram_cache, steps=None):
    """{k: multiplications counted in a step that started with k pairs}, from generic steps only
    (pair stored, none pruned, no Gram fallback); every such step with the same k must count
    the same (the count is a function of n and k)."""
    opt = make_optimizer("lsr1-tr", memory=memory, gram_cache=gram_cache)
    counts = {}
    for counted, info, pairs in _counting_run(opt, n=n, steps=steps or memory + 4)[1:]:  # [0]: Δ₀ = ‖g₀‖
        if info.skipped or info.extra.get("gram_fallback") or info.extra["pairs"] < min(pairs + 1, memory):
            continue
        assert counts.setdefault(pairs, counted) == counted, (pairs, counted, counts[pairs])
    return counts


@pytest.mark.parametrize("m", [3, 6])
def test_lsr1_cached_step_counts_match_formula(m):
    """The counted multiplications of the default (cached) step equal algebra_flops, and their
    n-dependent part, measured from two vector lengths, is (14k + 14)n while k < m pairs are
    stored and (14m + 10)n with the memory full (the oldest pair is dropped before the Gram
    border): (14m + 14)n + O(m³) at most, no O(m²n) term."""
    n1, n2 = 60, 120
    c1, c2 = _lsr1_counts_by_pairs(n1, m, True), _lsr1_counts_by_pairs(n2, m, True)
    opt = make_optimizer("lsr1-tr", memory=m)
    assert m in c1 and m in c2 and len(set(c1) & set(c2)) >= 3
    for n, counts in ((n1, c1), (n2, c2)):
        for k, counted in counts.items():
            expected = algebra_flops(opt, _vector_layout(n), pairs=k)["per_step"]
            assert counted == pytest.approx(expected, abs=ROUNDING), (n, k, counted, expected)
    for k in set(c1) & set(c2):
        coef = (c2[k] - c1[k]) / (n2 - n1)
        assert coef == pytest.approx(14 * k + 14 if k < m else 14 * m + 10, abs=1e-9), (k, coef)
        small = c1[k] - coef * n1  # the n-independent part: O(k³)
        assert 0 <= small <= 20 * (k + 1) ** 3, (k, small)


def test_lsr1_cached_step_n_coefficient_linear_in_m():
    """flops(2m) − flops(m) per unit of n grows like m for the cached step and like m² for the QR
    route: measured coefficients of n (two vector lengths, memory full) are 14m + 10 for
    m = 2, 3, 4, 6, so doubling m adds 14m·n; the QR route's 7m² + 9m + 12 adds (21m² + 9m)n.
    (m ≤ 6: on this well-conditioned quadratic the pairs of later steps make κ(Ψ) > 10³ and
    the step takes the Gram fallback.)"""
    n1, n2 = 60, 120
    coef = {}
    for cached in (True, False):
        for m in (2, 3, 4, 6):
            c1 = _lsr1_counts_by_pairs(n1, m, cached, steps=m + 3)
            c2 = _lsr1_counts_by_pairs(n2, m, cached, steps=m + 3)
            coef[cached, m] = (c2[m] - c1[m]) / (n2 - n1)
    assert [coef[True, m] for m in (2, 3, 4, 6)] == pytest.approx([14 * m + 10 for m in (2, 3, 4, 6)], abs=1e-9)
    for m in (2, 3):
        assert coef[True, 2 * m] - coef[True, m] == pytest.approx(14 * m, abs=1e-9)
        assert coef[False, 2 * m] - coef[False, m] == pytest.approx(21 * m * m + 9 * m, abs=1e-9)
    # second differences over m = 2, 4, 6: zero for the cached step, 7·(6² − 2·4² + 2²) = 56 for QR
    assert coef[True, 6] - 2 * coef[True, 4] + coef[True, 2] == pytest.approx(0.0, abs=1e-9)
    assert coef[False, 6] - 2 * coef[False, 4] + coef[False, 2] == pytest.approx(7 * 8, abs=1e-9)


def test_kfac_hand_computed_tiny_case():
    # one dense layer 2 → 3: W̄ is 3 × 3 (o = 3, a = d_in + 1 = 3), n = 9; batch N = 4, T₁ = T₂ = 1
    model = Sequential([Dense(3)], input_shape=(2,), name="tiny")
    opt = make_optimizer("kfac", stat_freq=1, inv_freq=1, batch_size=4)
    t = algebra_flops(opt, model)["terms"]
    # inverses: two damped 3 × 3 factors, each an LU inverse (d³ = 27, below kron.CHOLESKY_MIN_DIM) + 3d²
    assert t == {"momentum": 9, "precondition": 54, "step": 18, "factor_statistics": 90, "factor_ema": 36,
                 "inverses": 108}


def test_kfac_scaling_terms():
    model = _autoencoder()
    lay = [(32, 65), (16, 33), (8, 17), (16, 9), (32, 17), (64, 33)]
    opt = make_optimizer("kfac", inv_freq=20, batch_size=256)
    t = algebra_flops(opt, model)["terms"]
    assert t["precondition"] == sum(o * a * (o + a) for o, a in lay)
    assert t["inverses"] == round(sum(a ** 3 + o ** 3 + 3 * (a * a + o * o) for o, a in lay) / 20)   # all d < 128: LU
    opt40 = make_optimizer("kfac", inv_freq=40, batch_size=256)
    assert abs(2 * algebra_flops(opt40, model)["terms"]["inverses"] - t["inverses"]) <= 1


def test_shampoo_and_tnt_hand_computed():
    model = Sequential([Dense(3)], input_shape=(2,), name="tiny")  # W (3, 2), b (3,)
    tnt = algebra_flops(make_optimizer("tnt", stat_freq=1, inv_freq=1, batch_size=4), model)["terms"]
    # contractions (symmetric, a syrk): W mode 0: (3·4/2)·2 = 12, mode 1: (2·3/2)·3 = 9; b: 3·4/2 = 6 → 27;
    # the mode products are GEMMs: W 3²·2 + 2²·3 = 30, b 3² = 9 → 39
    assert tnt["statistics"] == 27 and tnt["precondition"] == 39
    assert tnt["statistics_ema"] == 2 * (9 + 4 + 9)
    assert tnt["inverses"] == (27 + 36) + (8 + 16) + (27 + 36)    # LU d³ (d < 128) + 4d²
    assert tnt["sampled_grad_scale"] == 4 * 3
    sh = algebra_flops(make_optimizer("shampoo", inv_freq=1, root="newton", newton_iters=2), model)["terms"]
    # coupled Newton, p = 2k: per iteration (p + 1)d³ + 2d², setup 6d²
    assert sh["roots"] == (6 * 9 + 2 * (5 * 27 + 18)) + (6 * 4 + 2 * (5 * 8 + 8)) + (6 * 9 + 2 * (3 * 27 + 18))


def test_hf_linear_in_cg_iterations():
    n = 5544
    opt = make_optimizer("hf")
    f = [algebra_flops(opt, _vector_layout(n), cg_iters=i)["per_step"] for i in (0, 10, 20)]
    assert f[1] - f[0] == f[2] - f[1] == 60 * n
    assert f[0] == 9 * n


def test_smw_gn_dominated_by_the_small_solve():
    model = _autoencoder()
    opt = make_optimizer("smw-gn", batch_size=64, curvature_batch=8)
    t = algebra_flops(opt, model)["terms"]
    NC = 8 * 64
    assert t["scaled_gram"] == 4 * NC * NC and t["solve"] == round(NC ** 3 / 3 + NC * NC)


def test_amortized_terms_divide_by_period():
    model = _autoencoder()
    a = algebra_flops(make_optimizer("tnt", stat_freq=1, inv_freq=10), model)["terms"]
    b = algebra_flops(make_optimizer("tnt", stat_freq=1, inv_freq=20), model)["terms"]
    assert abs(a["inverses"] - 2 * b["inverses"]) <= 1
    assert a["precondition"] == b["precondition"]
