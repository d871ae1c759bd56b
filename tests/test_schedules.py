"""Step-size schedules: values, composition, parsing (errors name the option), application to
optimizers through new optimizer objects, and the torch/optax lambda form."""
import math

import pytest

from qnref import schedules as S
from qnref.optim import make_optimizer
from qnref.validate import ValidationError


def test_constant_and_step_values():
    assert S.Constant()(3.7, 11) == 1.0 and S.Constant(0.5)(100.0) == 0.5
    s = S.Step(2, 0.5)
    assert [s(e) for e in (0, 1.99, 2, 3.9, 4, 6.5)] == [1, 1, 0.5, 0.5, 0.25, 0.125]


def test_multistep_values_and_the_texts_rule():
    s = S.MultiStep((60, 120, 160), 0.1)
    assert [s(e) for e in (0, 59.9, 60, 119, 120, 161)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001], rel=1e-15)
    first = S.Thesis().resolve(make_optimizer("sgd"))
    second = S.Thesis().resolve(make_optimizer("kfac"))
    assert first.every == 60 and second.every == 50
    assert first(59.9) == 1 and first(60) == pytest.approx(0.1) and first(120) == pytest.approx(0.01)
    assert second(49.9) == 1 and second(50) == pytest.approx(0.1)
    small = S.parse("thesis:0.1")
    assert small.resolve(make_optimizer("sgd")).every == pytest.approx(6)


def test_exponential_cosine_and_warmup_values():
    e = S.Exponential(0.9)
    assert e(0) == 1 and e(2) == pytest.approx(0.81) and e(0.5) == pytest.approx(0.9 ** 0.5)
    c = S.Cosine(10, 0.1)
    assert c(0) == 1 and c(5) == pytest.approx(0.55) and c(10) == pytest.approx(0.1) and c(20) == pytest.approx(0.1)
    w = S.LinearWarmup(4, 0.2)
    assert [w(t) for t in (0, 2, 4, 9)] == pytest.approx([0.2, 0.6, 1, 1])
    ws = S.LinearWarmup(3, unit="step")
    assert ws(0.0, 0) == pytest.approx(0.25) and ws(0.0, 3) == 1 and ws(99.0, 1) == pytest.approx(0.5)


def test_product_composes():
    s = S.LinearWarmup(2, 0.5) * S.Cosine(10)
    assert isinstance(s, S.Product) and len(s.parts) == 2
    assert s(1) == pytest.approx(0.75 * 0.5 * (1 + math.cos(math.pi * 0.1)))
    assert (s * S.Constant(2.0))(12) == pytest.approx(0.0)


@pytest.mark.parametrize("text", ["constant", "constant:0.5", "step:5:0.5", "step:10:0.1@step", "multistep:60,120,160:0.1",
                                  "exp:0.95", "cosine:100", "cosine:100:0.01", "warmup:5", "warmup:100:0.1@step",
                                  "warmup:5*cosine:100", "thesis", "thesis:0.1"])
def test_parse_round_trips(text):
    s = S.parse(text)
    assert S.parse(s.spec()) == s
    assert s.spec() == text


def test_parse_defaults_match_the_objects():
    assert S.parse("multistep:3,6") == S.MultiStep((3, 6), 0.1)
    assert S.parse("step:5") == S.Step(5, 0.1)


@pytest.mark.parametrize("text,words", [
    ("nosuch:1", "one of constant"), ("step", "period"), ("step:0", "period must be a finite number > 0"),
    ("step:1:-2", "gamma"), ("multistep:3,2:0.1", "increasing"), ("multistep:a,2", "milestone"),
    ("cosine:10:2", "min factor"), ("exp:abc", "gamma"), ("step:1:0.1:3", "at most 2"), ("", "a schedule"),
    ("thesis@step", "epochs"),
])
def test_parse_errors_name_the_option_and_value(text, words):
    with pytest.raises(ValidationError) as exc:
        S.parse(text, "--lr-schedule")
    msg = str(exc.value)
    assert msg.startswith("--lr-schedule") and words in msg, msg


def test_step_size_names_and_refusals():
    assert S.step_size_name(make_optimizer("adam")) == "lr"
    assert S.step_size_name(make_optimizer("kfac")) == "lr"
    assert S.step_size_name(make_optimizer("gd-ls")) == "alpha0"
    assert S.step_size_name(make_optimizer("sqn")) == "alpha0"
    with pytest.raises(ValidationError, match="lsr1-tr has none"):
        S.step_size_name(make_optimizer("lsr1-tr"))
    assert S.step_size_name(make_optimizer("lsr1-tr", delta0=1.0), "delta0") == "delta0"
    with pytest.raises(ValidationError, match="schedule_param must be a numeric hyperparameter of adam"):
        S.step_size_name(make_optimizer("adam"), "nosuch")


def test_application_builds_new_optimizers_and_leaves_the_base_alone():
    base = make_optimizer("kfac", lr=0.1, damping=0.3, batch_size=50)
    sch = S.Scheduled(base, S.MultiStep((1, 2), 0.1))
    o0, f0 = sch.at(0.5, 3)
    o1, f1 = sch.at(1.5, 9)
    assert o0 is base and f0 == 1.0
    assert o1 is not base and f1 == pytest.approx(0.1)
    assert o1.lr == pytest.approx(0.01) and base.lr == 0.1
    assert {k: v for k, v in o1.hyperparameters().items() if k != "lr"} == \
        {k: v for k, v in base.hyperparameters().items() if k != "lr"}
    assert sch.at(1.7, 10)[0] is o1  # cached by factor


def test_as_lambda_for_torch_and_optax():
    f = S.as_lambda(S.MultiStep((2, 4), 0.1), steps_per_epoch=10)
    assert [f(c) for c in (0, 19, 20, 40)] == pytest.approx([1, 1, 0.1, 0.01])
    g = S.as_lambda(S.Step(5, 0.5, unit="step"))
    assert g(4) == 1 and g(5) == 0.5
    with pytest.raises(ValidationError, match="steps_per_epoch"):
        S.as_lambda(S.Cosine(3))


def test_as_lambda_drives_torch_lambdalr():
    import torch
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, S.as_lambda(S.MultiStep((1, 2), 0.1), steps_per_epoch=2))
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs == pytest.approx([0.5, 0.5, 0.05, 0.05, 0.005])


def test_a_zero_factor_is_refused_for_a_step():
    sch = S.Scheduled(make_optimizer("sgd", lr=0.1), S.Cosine(2))
    assert sch.factor(2.0, 5) == 0.0  # a record at the end may show it
    with pytest.raises(ValidationError, match="give it a min factor"):
        sch.at(2.5, 6)


def test_as_array_tabulates_the_factors():
    assert S.as_array(S.MultiStep((1, 2), 0.5), 6, steps_per_epoch=2) == [1, 1, 0.5, 0.5, 0.25, 0.25]
    with pytest.raises(ValidationError, match="n_steps"):
        S.as_array(S.Constant(), 0)


def test_as_array_drives_a_jitted_optax_schedule():
    import optax  # in the jax extra (installed in CI): no skip
    import jax
    import jax.numpy as jnp

    table = jnp.asarray(S.as_array(S.MultiStep((1,), 0.1), 8, steps_per_epoch=2))
    lr = jax.jit(lambda c: 0.5 * table[jnp.minimum(c, table.shape[0] - 1)])
    assert float(lr(0)) == pytest.approx(0.5) and float(lr(3)) == pytest.approx(0.05)
    assert callable(optax.sgd(learning_rate=lr).update)
