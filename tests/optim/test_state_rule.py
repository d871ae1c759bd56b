"""The state rule of docs/optimizers.md, for every registered optimizer.

*A step consumes the state it is given* (like JAX buffer donation): ``step`` may reuse the state's
buffers and returns the new state, and the caller must not use the old state object again. So:

* a ``copy.deepcopy`` of the state taken before a step (with the problem's stream state) resumes
  to bit-identical θ and step infos — nothing the step depends on lives outside the state;
* the optimizer object keeps no per-run values: its attributes are equal before and after steps;
* θ handed to ``step`` is never written to (it belongs to the caller).
"""
import copy
import json

import numpy as np
import pytest

import reference_trajectories as ref
from qnref.optim import load_all, make_optimizer

MODELS = ("mlp", "cnn-bn")
#: refused configurations (SMW and the idealized TNT need independent examples: no BatchNorm in
#: training mode): those recorded as refusals, which the reference-trajectory test checks
_REFUSED = {tuple(k.split("|")) for k, v in json.loads((ref.HERE / "reference_infos.json").read_text()).items()
            if isinstance(v, dict)}


def _attrs(opt):
    return copy.deepcopy(vars(opt))


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "shape"):
        return hasattr(b, "shape") and a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return a == b


def _steps(opt, theta, state, problem, k):
    out = []
    for _ in range(k):
        theta, state, info = opt.step(theta, state, problem)
        out.append((theta.copy(), ref._plain(info.as_dict())))
    return theta, state, out


@pytest.mark.parametrize(("name", "model_key"),
                         [(n, m) for n in sorted(load_all()) for m in MODELS if (n, m) not in _REFUSED])
def test_deepcopied_state_resumes_bit_identically(name, model_key):
    _, theta, problem = ref.build_problem(model_key)
    opt = make_optimizer(name)
    attrs0 = _attrs(opt)
    state = opt.init(theta)
    theta, state, _ = _steps(opt, theta, state, problem, 3)
    saved_state, saved_problem, saved_theta = copy.deepcopy(state), copy.deepcopy(problem.state()), theta.copy()
    # θ is the caller's: a step never writes into the array it is given
    theta_arg = theta.copy()
    theta, state, first = _steps(opt, theta_arg, state, problem, 4)
    assert np.array_equal(theta_arg, saved_theta), f"{name} wrote into the θ it was given"
    # resume from the deep copies: the same θ and infos, bit for bit
    problem.load_state(saved_problem)
    _, _, second = _steps(opt, saved_theta.copy(), saved_state, problem, 4)
    for i, ((t1, i1), (t2, i2)) in enumerate(zip(first, second)):
        assert np.array_equal(t1, t2), f"{name}: θ differs {i + 1} steps after resuming from a deep copy"
        assert _same(i1, i2), f"{name}: step info differs {i + 1} steps after resuming: {i1} vs {i2}"
    assert _same(_attrs(opt), attrs0), f"{name} changed its own attributes while stepping (per-run values belong in the state)"
