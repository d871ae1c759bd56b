"""The optimizer registry: names, class access as in DESIGN.md, suggestions, protocol shape."""
import dataclasses

import numpy as np
import pytest

import qnref
from qnref.optim import OPTIMIZERS, Optimizer, load_all, make_optimizer


def test_classes_by_name_and_registry_agree():
    reg = load_all()
    assert set(reg) == {  # every algorithm of the five texts and their baselines (docs/optimizers.md)
        "adadelta", "adagrad", "adam", "gd", "gd-ls", "hf", "kbfgs", "kbfgs-l", "kfac", "lbfgs", "lsr1-ls",
        "lsr1-tr", "lssr1-tr", "mb-lsr1", "momentum", "nag", "rmsprop", "s-lbfgs", "s-lsr1", "sgd", "shampoo",
        "shg", "smw-gn", "smw-ng", "smw-ng-bd", "soc-sr1", "sqn", "svrg", "tnt", "tnt-ideal"}
    for name, cls in reg.items():
        assert getattr(qnref.optim, cls.__name__) is cls
        assert issubclass(cls, Optimizer) and cls.name == name and cls.family
    assert qnref.optim.LSR1TrustRegion(memory=5).memory == 5
    with pytest.raises(AttributeError):
        qnref.optim.NoSuchOptimizer


def test_unknown_names_suggest_the_closest():
    with pytest.raises(ValueError, match="did you mean 'kfac'"):
        make_optimizer("kfca")


@pytest.mark.parametrize("name", sorted(load_all()))
def test_state_is_a_dataclass_of_plain_values(name):
    """Optimizer states checkpoint: dataclasses whose leaves are arrays, numbers, strings, None."""
    theta = np.zeros(7)
    state = OPTIMIZERS[name]().init(theta)
    assert dataclasses.is_dataclass(state)

    def leaves(v):
        if dataclasses.is_dataclass(v):
            for f in dataclasses.fields(v):
                yield from leaves(getattr(v, f.name))
        elif isinstance(v, dict):
            for x in v.values():
                yield from leaves(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                yield from leaves(x)
        else:
            yield v

    for leaf in leaves(state):
        assert leaf is None or isinstance(leaf, (np.ndarray, np.generic, int, float, bool, str)), (name, type(leaf))
