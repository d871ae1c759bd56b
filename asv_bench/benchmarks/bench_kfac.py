"""KFAC step time relative to an SGD-momentum step (issue 21) at the thesis's CNN settings (Ren's thesis
§3.7.1, §4.7.1: statistics every T₁ = 10 steps, inverses every T₂ = 100, batch 128), float32, on
ResNet-20 (3×32×32) and the digits LeNet (1×8×8), 256 random training examples (the warm start of the
first step covers them), softmax cross-entropy.

A KFAC step is one of three kinds: plain (k ≢ 0 mod T₁: gradient, preconditioning, update), statistics
(k ≡ 0 mod T₁: + the curvature pass at θ⁺ with sampled targets and the factor EMAs) and statistics +
inverses (k ≡ 0 mod T₂). Each kind is timed from a copy of one warmed-up state with ``k`` set so that the
step is of that kind, and the per-step average over a T₂ cycle is

    t_KFAC = ((T₂ − T₂/T₁) t_plain + (T₂/T₁ − 1) t_stat + t_inv) / T₂.

Policy (as ``KroneckerThesisAutoencoder`` in bench_families.py): one warm-up step of each method (KFAC's
is the warm start), then ``ROUNDS`` interleaved rounds — in each round one SGD-momentum step and one KFAC
step of each kind, in that order — and the best time of each over the rounds; both methods side by side in
one process, so the ratio holds with ``--quick``. ``track_floor`` is :meth:`KFAC.step_floor` (GEMM flops of
the passes and the algebra in gradients): a lower bound of the ratio, not a timing.
"""
import copy
import time

import numpy as np

from ._common import sync

CASES = {"resnet20": (3, 32, 32), "lenet-digits": (1, 8, 8)}
BATCH, T1, T2, ROUNDS, N_TRAIN = 128, 10, 100, 3, 256


def problem(name, dtype="float32", seed=0):
    from qnref.nn.zoo import build_model
    from qnref.optim.base import Problem

    model = build_model(name)
    r = np.random.default_rng(seed)
    X = r.standard_normal((N_TRAIN,) + CASES[name]).astype(dtype)
    y = r.integers(0, 10, N_TRAIN)
    return model, Problem(model, "softmax_ce", X, y, seed=seed), model.init(seed, dtype=dtype)


def _timed(opt, theta, state, prob, k=None):
    st = copy.deepcopy(state)
    if k is not None:
        st.k = k
    t0 = time.perf_counter()
    th, _, info = opt.step(theta, st, prob)
    sync(th)
    dt = time.perf_counter() - t0
    if not info.accepted:
        raise RuntimeError(f"{type(opt).__name__} refused its timed step: {info}")
    return dt


def measure(name, rounds=ROUNDS, **kfac_kw):
    """Best step times {"sgdm", "plain", "stat", "inv"} (seconds) and the T₂-cycle average "kfac"."""
    from qnref.optim import make_optimizer

    model, prob, theta = problem(name)
    sgdm = make_optimizer("momentum", lr=0.01, momentum=0.9, batch_size=BATCH)
    kfac = make_optimizer("kfac", lr=1e-3, damping=0.03, stat_freq=T1, inv_freq=T2, batch_size=BATCH, **kfac_kw)
    s_state = sgdm.init(theta)
    k_state = kfac.init(theta)
    _, s_state, _ = sgdm.step(theta, s_state, prob)          # warm-up
    _, k_state, _ = kfac.step(theta, k_state, prob)          # warm-up: warm start + step k = 1
    best = {"sgdm": float("inf"), "plain": float("inf"), "stat": float("inf"), "inv": float("inf")}
    for _ in range(rounds):
        best["sgdm"] = min(best["sgdm"], _timed(sgdm, theta, s_state, prob))
        best["plain"] = min(best["plain"], _timed(kfac, theta, k_state, prob, k=1))       # k = 2
        best["stat"] = min(best["stat"], _timed(kfac, theta, k_state, prob, k=T1 - 1))    # k = T₁
        best["inv"] = min(best["inv"], _timed(kfac, theta, k_state, prob, k=T2 - 1))      # k = T₂
    n_stat = T2 // T1
    best["kfac"] = ((T2 - n_stat) * best["plain"] + (n_stat - 1) * best["stat"] + best["inv"]) / T2
    return best


class KFACvsMomentum:
    """KFAC / SGD-momentum step-time ratios (module docstring: kinds of steps, the cycle average, policy)."""

    params = (list(CASES),)
    param_names = ["model"]
    unit = "ratio to an SGD-momentum step"
    timeout = 900
    # bump ``version`` when the measured code or a helper it calls (``_common``) changes
    version = "21.1"  # 21.1: statistics reduced while the taps exist (streamed conv taps)

    def setup_cache(self):
        return {name: measure(name) for name in CASES}

    def track_step_over_sgdm(self, times, name):
        """The T₂-cycle average KFAC step / SGD-m step."""
        return times[name]["kfac"] / times[name]["sgdm"]

    def track_plain_step_over_sgdm(self, times, name):
        """A plain KFAC step (no statistics, no inverses) / SGD-m step: the preconditioning's share."""
        return times[name]["plain"] / times[name]["sgdm"]

    def track_statistics_step_over_sgdm(self, times, name):
        """A statistics step (k ≡ 0 mod T₁) / SGD-m step."""
        return times[name]["stat"] / times[name]["sgdm"]

    def track_floor(self, times, name):
        """:meth:`KFAC.step_floor` at T₁ = 10, T₂ = 100, batch 128 (a bound, not a timing)."""
        from qnref.optim import make_optimizer

        model, _, _ = problem(name)
        opt = make_optimizer("kfac", stat_freq=T1, inv_freq=T2, batch_size=BATCH)
        return opt.step_floor(model)["floor"]
