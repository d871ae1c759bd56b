"""Property-based hyperparameter suite (issue 19, item 7): every registered optimizer, every
hyperparameter of its ``__init__`` signature, given NaN, ±inf, negatives, zero, fractions, huge
integers, strings, bools, None or a list. Each case ends in one of two ways:

* a ``ValueError``/``TypeError`` whose message names the hyperparameter (at construction, or at
  the first step for what only the problem can judge: ``batch_size`` above its examples, a memory
  that cannot be allocated), or
* a working optimizer: one step on a tiny problem returns a finite θ.

Anything else (a bare ``int()``/``float()`` message, an OverflowError, a MemoryError, a NaN θ)
fails the test. The strategies are built from the signatures, so a new hyperparameter is covered
without editing this file.
"""
import inspect
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim import load_all, make_optimizer
from qnref.optim.base import Problem

_R = np.random.default_rng(0)
_MODEL = Sequential([Dense(3), Tanh(), Dense(3)], input_shape=(4,))
_X, _Y = _R.standard_normal((130, 4)), _R.integers(0, 3, 130)  # ≥ every uncapped default batch
_TH0 = _MODEL.init(0)


def _hyperparameters() -> list[tuple[str, str]]:
    out = []
    for name, cls in sorted(load_all().items()):
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                out.append((name, p.name))
    return out


HYPERPARAMETERS = _hyperparameters()

SPECIAL = [math.nan, math.inf, -math.inf, -1, 0, 0.0, -0.0, -1.5, 0.5, 1, 1.5, 3, 10**12, 2**63, 10**30, -(10**30),
           1e308, 5e-324, "abc", "1", "", True, False, None, [1], np.float64(math.nan), np.int64(-2)]
VALUES = st.one_of(
    st.sampled_from(SPECIAL),
    st.floats(min_value=-1e3, max_value=1e3, allow_nan=False),
    st.integers(min_value=-5, max_value=50),
    st.text(max_size=3),
)


def _outcome(name: str, param: str, value) -> str:
    try:
        opt = make_optimizer(name, **{param: value})
    except (ValueError, TypeError) as exc:
        assert param in str(exc), f"{name}({param}={value!r}): the message does not name {param}: {exc}"
        return "refused"
    prob = Problem(_MODEL, "softmax_ce", _X, _Y, 1e-3, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            th, _, info = opt.step(_TH0, opt.init(_TH0), prob)
        except (ValueError, TypeError) as exc:
            assert param in str(exc), f"{name}({param}={value!r}) at the first step: {exc}"
            return "refused at step"
    assert np.all(np.isfinite(th)), f"{name}({param}={value!r}) returned a non-finite θ"
    return "works"


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(HYPERPARAMETERS), value=VALUES)
def test_every_hyperparameter_is_refused_by_name_or_works(which, value):
    _outcome(*which, value)


@pytest.mark.parametrize("name,param", [("kfac", "warm_start"), ("kbfgs", "warm_start"), ("kfac", "use_pi"),
                                        ("lsr1-tr", "gram_cache"), ("smw-gn", "full_gradient"),
                                        ("shampoo", "warm_start")])
@pytest.mark.parametrize("value", ["yes", 1, 0, None, "False"])
def test_bool_hyperparameters_take_bools_only(name, param, value):
    with pytest.raises(ValueError, match=f"^{param} must be True or False"):
        make_optimizer(name, **{param: value})


@pytest.mark.parametrize("name", ["lsr1-tr", "lsr1-ls"])
@pytest.mark.parametrize("gamma", [-1, -1e-300, 0.0, math.nan, math.inf])
def test_lsr1_gamma_must_be_positive(name, gamma):
    with pytest.raises(ValueError, match="gamma"):
        make_optimizer(name, gamma=gamma)


#: what a hyperparameter needs beside it to be used at all
_COMPANIONS = {("hf", "grad_batch"): {"grad_fraction": None}, ("hf", "curvature_batch"): {"curvature_fraction": None},
               ("shg", "grad_batch"): {"grad_fraction": None}, ("shg", "curvature_batch"): {"curvature_fraction": None},
               ("sqn", "curvature_batch"): {"L": 1}}


@pytest.mark.parametrize("name,param", [(n, p) for n, p in HYPERPARAMETERS
                                        if p in ("memory", "max_evals", "max_cg_iters", "stat_freq", "inv_freq",
                                                 "batch_size", "curvature_batch", "grad_batch", "L", "K")
                                        and (n, p) != ("kbfgs", "memory")])  # kbfgs refuses memory (use kbfgs-l)
def test_integer_hyperparameters_name_nan(name, param):
    with pytest.raises(ValueError, match=f"{param}.*got nan"):
        make_optimizer(name, **{param: math.nan}, **_COMPANIONS.get((name, param), {}))


@pytest.mark.parametrize("name,param", [(n, p) for n, p in HYPERPARAMETERS
                                        if p in ("batch_size", "curvature_batch", "grad_batch")])
def test_batch_sizes_above_the_examples_are_refused(name, param):
    """At construction where the optimizer can tell (smw: S₂ ⊆ S₁), else at the step that draws it."""
    prob = Problem(_MODEL, "softmax_ce", _X, _Y, 1e-3, seed=0)
    with pytest.raises(ValueError, match=f"{param}.*1000000000"):
        opt = make_optimizer(name, **{param: 10**9}, **_COMPANIONS.get((name, param), {}))
        th, state = _TH0, opt.init(_TH0)
        for _ in range(4):  # some methods draw their curvature batch on a later step
            th, state, _info = opt.step(th, state, prob)
