"""TOML configs: the writer round-trips through tomllib bit for bit; presets are configs."""
import math

import pytest

from qnref import config as C
from qnref.presets import PRESETS


def test_dumps_round_trips_every_value_kind():
    d = {"a": 0.1, "b": 1e-300, "c": 5e-324, "i": -3, "s": 'quote " back \\ tab\t line\nü', "t": True, "f": False,
         "inf": math.inf, "ninf": -math.inf, "list": [1.5, 2.25], "none": None, "strs": ["x", "y"],
         "tab": {"x": 1, "deep": {"y": 2.5, "z": None}}, "rows": [{"k": 1, "h": {"lr": 0.3}}, {"k": 2, "h": {}}]}
    back = C.loads(C.dumps(d, "a comment\nover two lines"))
    assert back == d
    assert math.isnan(C.loads(C.dumps({"n": math.nan}))["n"])
    for x in (0.1 + 0.2, 1 / 3, 2.0 ** -1074, 1.7976931348623157e308):
        assert C.loads(C.dumps({"x": x}))["x"].hex() == x.hex()


def test_unwritable_values_are_named():
    with pytest.raises(TypeError, match="a.b"):
        C.dumps({"a": {"b": object()}})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_config(name):
    p = PRESETS[name]
    assert C.preset_from_dict(C.loads(C.dumps(C.preset_to_dict(p)))) == p


def test_preset_config_errors_name_the_key():
    d = C.preset_to_dict(PRESETS["quickstart"])
    with pytest.raises(C.ConfigError, match="unknown key 'epoch'; did you mean 'epochs'"):
        C.preset_from_dict({**d, "epoch": 3})
    with pytest.raises(C.ConfigError, match="runs\\[0\\] has unknown key"):
        C.preset_from_dict({**d, "runs": [{**d["runs"][0], "lrr": 1}]})
    with pytest.raises(C.ConfigError, match="not a compare config"):
        C.preset_from_dict({**d, "command": "train"})


def test_train_config_checks(tmp_path):
    cfg = C.train_config({"model": "mlp", "optimizer": "sgd", "dataset": "digits", "epochs": 2.0,
                          "hyperparameters": {"lr": 0.1, "batch_size": None}, "lr_schedule": None})
    assert "lr_schedule" not in cfg and cfg["hyperparameters"] == {"lr": 0.1, "batch_size": None}
    assert C.check_train_config(C.loads(C.dumps(cfg)), "x") == cfg
    with pytest.raises(C.ConfigError, match="epochs must be float or int"):
        C.check_train_config({**cfg, "epochs": "2"}, "x")
    with pytest.raises(C.ConfigError, match="unknown key 'seeds'"):
        C.check_train_config({**cfg, "seeds": 1}, "x")
    with pytest.raises(C.ConfigError, match="lacks model"):
        C.check_train_config({k: v for k, v in cfg.items() if k != "model"}, "x")
    bad = tmp_path / "bad.toml"
    bad.write_text("model = \n")
    with pytest.raises(C.ConfigError, match="bad.toml: not valid TOML"):
        C.load(bad)
    with pytest.raises(C.ConfigError, match="cannot read"):
        C.load(tmp_path / "missing.toml")


def test_the_documented_train_config_is_valid():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    block = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    cfg = C.check_train_config(C.loads(block), "docs/training.md")
    assert cfg["lr_schedule"] == "multistep:3,6:0.1" and cfg["hyperparameters"]["lr"] == 0.5


def test_preset_schedules_parse_and_apply():
    from qnref.optim import make_optimizer
    from qnref.schedules import Scheduled, parse

    seen = 0
    for p in PRESETS.values():
        for r in p.runs:
            spec = r.schedule if r.schedule is not None else p.schedule
            if spec is not None:
                s = Scheduled(make_optimizer(r.optimizer, **r.hyperparameters), parse(spec))
                assert s.param == "lr" and s.at(p.epochs - 0.5, 0)[1] < 1.0
                seen += 1
    assert seen >= 5  # ren-ch4-cnn-digits: the thesis rule on all five runs
