"""Point.release frees the forward caches; what was computed stays, a new pass is refused clearly."""
import numpy as np
import pytest

from qnref.curvature.objective import Objective
from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential


def test_release_keeps_value_and_gradient_and_refuses_new_passes():
    r = np.random.default_rng(0)
    m = Sequential([Dense(4), Tanh(), Dense(3)], input_shape=(5,))
    obj = Objective(m, "softmax_ce", r.standard_normal((7, 5)), r.integers(0, 3, 7))
    th = m.init(0)
    p = obj.at(th)
    f, g = p.value, p.grad.copy()
    p.release()
    assert p.value == f and np.array_equal(p.grad, g)
    with pytest.raises(RuntimeError, match="forward caches were released"):
        p.hvp(np.ones_like(th))
    with pytest.raises(RuntimeError, match="forward caches were released"):
        p.layer_stats("empirical")
    q = obj.at(th)                     # a new point at the same θ works
    np.testing.assert_array_equal(q.grad, g)


@pytest.mark.parametrize("name", ["kfac", "kbfgs"])
def test_kronecker_steps_release_the_point_before_their_curvature_pass(name, monkeypatch):
    """KFAC / K-BFGS hold one point's activations at a time: the θ point is released before θ⁺."""
    from qnref.curvature import objective
    from qnref.optim import make_optimizer
    from qnref.optim.base import Problem

    live, peak = set(), [0]
    orig_init, orig_release = objective.Point.__init__, objective.Point.release

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        live.add(id(self))
        peak[0] = max(peak[0], len(live))

    def release(self):
        live.discard(id(self))
        orig_release(self)

    monkeypatch.setattr(objective.Point, "__init__", init)
    monkeypatch.setattr(objective.Point, "release", release)
    r = np.random.default_rng(1)
    m = Sequential([Dense(4), Tanh(), Dense(3)], input_shape=(5,))
    prob = Problem(m, "softmax_ce", r.standard_normal((40, 5)), r.integers(0, 3, 40), seed=0)
    opt = make_optimizer(name, batch_size=20, warm_start=False)
    th, st = m.init(0), opt.init(m.init(0))
    th, st, _ = opt.step(th, st, prob)        # the warm start's points
    live.clear()
    peak[0] = 0
    for _ in range(2):
        th, st, info = opt.step(th, st, prob)
        assert info.accepted
        live.clear()                           # points of a finished step are garbage
    assert peak[0] == 1
