"""End-to-end tests of the `qnref` command (in-process and as a console script)."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qnref.cli import main, make_optimizer


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qnref.cli", *args], capture_output=True, text=True, timeout=300)


def test_compare_quickstart_writes_report(tmp_path):
    out = tmp_path / "qs"
    r = run_cli("compare", "--preset", "quickstart", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    files = sorted(os.listdir(out))
    want = ["comparison.png", "config.toml", "loss_vs_epochs.png", "loss_vs_passes.png", "loss_vs_time.png", "runs.csv",
            "runs.jsonl", "summary.md"]
    assert [f for f in files if f != "tensorboard"] == want
    rows = [json.loads(line) for line in open(out / "runs.jsonl")]
    runs = {(r["run"], r["seed"]) for r in rows}
    assert len(runs) == 12  # 6 optimizers × 2 seeds
    for (name, seed) in runs:
        recs = [r for r in rows if r["run"] == name and r["seed"] == seed]
        assert recs[0]["epoch"] == 0 and recs[-1]["epoch"] >= 6 - 1e-9
        assert recs[-1]["train_loss"] < recs[0]["train_loss"]
    # same start: every run of one seed begins at the same loss
    for seed in (0, 1):
        starts = {r["train_loss"] for r in rows if r["seed"] == seed and r["epoch"] == 0}
        assert len(starts) == 1
    table = (out / "summary.md").read_text()
    assert "| L-SR1-TR | 2 |" in table
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_command_and_resume(tmp_path):
    ck = tmp_path / "ck.pkl"
    args = ["train", "--model", "mlp", "--optimizer", "lsr1-tr", "--dataset", "digits", "--epochs", "2",
            "--batch-size", "200", "--seed", "3", "--quiet", "--checkpoint", str(ck), "--out", str(tmp_path / "rep")]
    assert main(args) == 0
    assert ck.exists() and (tmp_path / "rep" / "summary.md").exists()
    assert main(args + ["--resume"]) == 0  # resuming a finished run is a no-op that succeeds


@pytest.mark.parametrize("args,msg", [
    (["train", "--model", "mlp", "--optimizer", "lsr1", "--dataset", "digits"], "did you mean 'lsr1-ls' or 'lsr1-tr'"),
    (["train", "--model", "lenett", "--optimizer", "sgd", "--dataset", "digits"], "lenet"),
    (["train", "--model", "mlp", "--optimizer", "sgd", "--dataset", "digts"], "digits"),
    (["train", "--model", "mlp", "--optimizer", "sgd", "--dataset", "digits", "--batch-size", "100000"], "batch size"),
    (["train", "--model", "mlp", "--optimizer", "sgd", "--dataset", "digits", "--opt", "momentun=0.9"], "hyperparameter"),
    (["train", "--model", "lenet5-mnist", "--optimizer", "sgd", "--dataset", "mnist", "--data-dir", "/nonexistent/dir"], "nonexistent"),
    (["compare", "--preset", "quickstrat"], "did you mean 'quickstart'"),
])
def test_bad_input_gives_clear_error_and_exit_code(tmp_path, capsys, args, msg):
    out = tmp_path / "never"
    code = main(args + ["--quiet", "--out", str(out)] if args[0] == "train" else args + ["--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("qnref: error:") and msg in err
    assert not out.exists()  # nothing half-written


def test_wrong_file_format_and_nan_data(tmp_path, capsys):
    d = tmp_path / "mnist"
    d.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (d / name).write_bytes(b"\x00\x00\x08\x03garbage")
    code = main(["train", "--model", "lenet5-mnist", "--optimizer", "sgd", "--dataset", "mnist", "--data-dir", str(d), "--quiet"])
    assert code == 2 and "qnref: error:" in capsys.readouterr().err


def test_list_and_check(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("lsr1-tr", "kfac", "smw-gn", "digits", "mnist1d", "quickstart", "resnet20"):
        assert word in out
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok ") == 4 and "BAD" not in out


def test_help_explains_every_option():
    r = run_cli("train", "--help")
    assert r.returncode == 0
    for opt in ("--model", "--optimizer", "--dataset", "--epochs", "--batch-size", "--device", "--seed", "--checkpoint", "--resume", "--quiet"):
        assert opt in r.stdout


@pytest.mark.parametrize("name", sorted(n for n, p in __import__("qnref.presets", fromlist=["PRESETS"]).PRESETS.items()
                                         if p.scale == "small" or p.dataset in {"digits", "mnist1d", "toy2class", "imbalanced"}))
def test_every_preset_builds(name):
    """Every preset on shipped data: optimizers, hyperparameters, data set and model are valid, and
    one step of each run works. Paper-scale presets read --data-dir: their --dry-run is tested on
    format-true files (tests/test_presets_texts.py)."""
    from qnref.cli import build_data, build_model, make_optimizer
    from qnref.optim.base import Problem
    from qnref.presets import PRESETS

    pre = PRESETS[name]
    ds, data = build_data(pre.dataset, data_dir=None, seed=0, n_train=None, n_test=None, device="cpu", dtype="float64",
                          autoencoder=pre.autoencoder, **pre.dataset_kwargs)
    model = build_model(pre.model, ds, **pre.model_kwargs)
    theta = model.init(0, scheme=pre.init)
    for run in pre.runs:
        opt = make_optimizer(run.optimizer, dict(run.hyperparameters))
        prob = Problem(model, data.loss, data.X_train, data.y_train, pre.l2, seed=0)
        th, _, info = opt.step(theta, opt.init(theta), prob)
        assert np.all(np.isfinite(th)), run.label


def test_float_idx_with_nan_is_rejected(tmp_path, capsys):
    """MNIST files must be uint8 IDX: a float32 file (here even holding a NaN pixel) is a clear
    format error, exit code 2, no report. NaN in arrays given through the Python API is refused by
    the data validation and by Objective (tests/data, tests/test_train.py)."""
    from qnref.data.idx import write_idx

    r = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        img = r.random((n, 28, 28)).astype(np.float32)
        if prefix == "train":
            img[3, 5, 7] = np.nan
        write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte"), img)
        write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte"), r.integers(0, 10, n).astype(np.uint8))
    out = tmp_path / "report"
    code = main(["train", "--model", "mlp", "--optimizer", "sgd", "--dataset", "mnist", "--data-dir", str(tmp_path),
                 "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("qnref: error:") and "expected uint8 images" in err
    assert not out.exists()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the diverging run overflows on purpose
def test_compare_keeps_going_after_a_diverging_run(tmp_path, monkeypatch):
    from qnref.presets import PRESETS, Preset, Run

    pre = Preset("diverge-test", "one run diverges", "", "digits", "mlp",
                 (Run("SGD-huge", "sgd", {"lr": 1e200, "batch_size": 50}), Run("Adam", "adam", {"batch_size": 200})),
                 epochs=3, dataset_kwargs={"flat": True}, model_kwargs={"hidden": (16,), "activation": "relu"}, eval_every=0.5)
    monkeypatch.setitem(PRESETS, "diverge-test", pre)
    out = tmp_path / "rep"
    assert main(["compare", "--preset", "diverge-test", "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in open(out / "runs.jsonl")]
    bad = [r for r in rows if r["run"] == "SGD-huge"]
    good = [r for r in rows if r["run"] == "Adam"]
    assert "diverged" in bad[-1] and "non-finite" in bad[-1]["diverged"]
    assert all(np.isfinite(r["train_loss"]) for r in bad)  # records up to the failure, finite ones only
    assert good[-1]["epoch"] >= 3 - 1e-9 and "diverged" not in good[-1]
    table = (out / "summary.md").read_text()
    assert "| SGD-huge | 1 |" in table and "1 of 1 |" in table


TRAIN = ["train", "--model", "mlp", "--optimizer", "sgd", "--dataset", "digits", "--quiet"]


@pytest.mark.parametrize("extra,option,value", [
    (["--epochs", "inf"], "--epochs", "'inf'"), (["--epochs", "nan"], "--epochs", "'nan'"),
    (["--epochs", "0"], "--epochs", "'0'"), (["--checkpoint-every", "0"], "--checkpoint-every", "'0'"),
    (["--checkpoint-every", "-1"], "--checkpoint-every", "'-1'"), (["--checkpoint-every", "nan"], "--checkpoint-every", "'nan'"),
    (["--l2", "inf"], "--l2", "'inf'"), (["--l2=-1e-3"], "--l2", "'-1e-3'"), (["--seed", "1.5"], "--seed", "'1.5'"),
    (["--seed", "-2"], "--seed", "'-2'"), (["--seed", "4294967296"], "--seed", "'4294967296'"), (["--batch-size", "0"], "--batch-size", "'0'"), (["--lr", "abc"], "--lr", "'abc'"),
    (["--n-train", "nan"], "--n-train", "'nan'"), (["--eval-every=-0.5"], "--eval-every", "'-0.5'"),
    (["--diverge-factor", "1"], "--diverge-factor", "'1'"), (["--mpi-timeout", "0"], "--mpi-timeout", "'0'"),
])
def test_numeric_options_are_checked_at_parse_time(capsys, extra, option, value):
    code = main(TRAIN + extra)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("qnref: error: argument " + option + ": must be "), err
    assert f"got {value}" in err


@pytest.mark.parametrize("opts,msg", [
    (["--opt", "lr=0.1", "--opt", "lr=0.2"], "--opt lr is given twice (0.1 and 0.2)"),
    (["--opt", "batch_size=abc"], "--opt batch_size must be an integer, got 'abc'"),
    (["--opt", "lr=nan"], "--opt lr must be a finite number, got 'nan'"),
    (["--opt", "warm_start=yes"], "--opt warm_start must be True or False (hyperparameter of kfac), got 'yes'"),
    (["--opt", "lr=1e400"], "lr must be a finite number"),
    (["--batch-size", "10", "--opt", "batch_size=20"], "both set batch_size"),
])
def test_opt_values_are_checked_by_name(capsys, opts, msg):
    args = ["train", "--model", "mlp", "--optimizer", "kfac" if "warm_start" in opts[-1] else "sgd", "--dataset",
            "digits", "--quiet", *opts]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and msg in err, err


def test_memory_opt_of_a_quasi_newton_method(capsys):
    code = main(["train", "--model", "mlp", "--optimizer", "lbfgs", "--dataset", "digits", "--quiet",
                 "--opt", "memory=5", "--opt", "memory=7"])
    assert code == 2 and "--opt memory is given twice (5 and 7)" in capsys.readouterr().err
    code = main(["train", "--model", "mlp", "--optimizer", "lbfgs", "--dataset", "digits", "--quiet", "--opt", "memory=abc"])
    assert code == 2 and "--opt memory must be an integer, got 'abc'" in capsys.readouterr().err


@pytest.mark.parametrize("seeds", ["1,x", "1,,2", "", "-1", "1.5", "nan"])
def test_compare_seeds_are_checked(capsys, seeds):
    code = main(["compare", "--preset", "quickstart", "--seeds", seeds])
    err = capsys.readouterr().err
    assert code == 2 and "argument --seeds: must be comma-separated integers in [0, 4294967295]" in err and err.count("\n") == 1, err


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    d = tmp_path / "adir"
    d.mkdir()
    cases = [(["--out", str(f)], f"--out {f}: is a file, not a folder"),
             (["--out", str(f / "sub")], f"--out {f / 'sub'}: {f} is a file, not a folder"),
             (["--checkpoint", str(d)], f"--checkpoint {d}: is a folder"),
             (["--checkpoint", str(f / "c.ckpt")], f"--checkpoint {f / 'c.ckpt'}: {f} is a file, not a folder"),
             (["--checkpoint", "/proc/qnref-test/c.ckpt"], "--checkpoint /proc/qnref-test/c.ckpt: cannot write in /proc"),
             (["--out", str(d), "--checkpoint", str(d / "runs.jsonl")], "would be overwritten by the report"),
             (["--out", str(d), "--checkpoint", str(d)], "is a folder")]
    for extra, msg in cases:
        t0 = __import__("time").monotonic()
        code = main(["train", "--model", "mlp", "--optimizer", "nosuch", "--dataset", "digits", "--quiet", *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and msg in err, (extra, err)
    assert sorted(os.listdir(tmp_path)) == ["adir", "afile"] and not os.listdir(d)


def test_report_is_written_incrementally(tmp_path, monkeypatch, capsys):
    """A crash late in a run keeps every evaluation made before it in runs.jsonl."""
    import qnref.train as tr

    out = tmp_path / "rep"
    calls = {"n": 0}
    orig = tr.evaluate

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] > 9:  # train + test evaluation per record: the 5th record fails
            raise RuntimeError("disk on fire")
        return orig(*a, **k)

    monkeypatch.setattr(tr, "evaluate", failing)
    code = main(["train", "--model", "mlp", "--optimizer", "adam", "--dataset", "digits", "--epochs", "3", "--eval-every", "0.5",
                 "--batch-size", "100", "--quiet", "--out", str(out)])
    assert code == 1 and "disk on fire" in capsys.readouterr().err
    rows = [json.loads(line) for line in open(out / "runs.jsonl")]
    assert len(rows) == 4 and rows[0]["epoch"] == 0 and rows[-1]["epoch"] < 3


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_exit_code_and_allow_option(tmp_path, capsys):
    args = ["train", "--model", "mlp", "--optimizer", "sgd", "--dataset", "digits", "--epochs", "3", "--lr", "1e200",
            "--batch-size", "100", "--quiet", "--out", str(tmp_path / "rep")]
    assert main(args) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run diverged" in err
    rows = [json.loads(line) for line in open(tmp_path / "rep" / "runs.jsonl")]
    assert "diverged" in rows[-1]
    assert "1 of 1 |" in (tmp_path / "rep" / "summary.md").read_text()
    assert main(args + ["--allow-divergence"]) == 0
    assert main(args + ["--diverge-factor", "1e300", "--allow-divergence"]) == 0


# -- schedules, validation, early stopping, budgets, targets, logs and configs (issue 23) ----------
SHOW = ["train", "--model", "mlp", "--optimizer", "sgd", "--dataset", "digits", "--lr", "0.5", "--batch-size", "64",
        "--epochs", "30", "--lr-schedule", "multistep:3,6:0.1", "--val-fraction", "0.2", "--early-stopping", "val_loss",
        "--patience", "2", "--min-delta", "1e-3", "--target", "val_acc>=0.9", "--quiet"]
CLOCKS = ("time", "wall_time", "cpu_time", "target_time", "target_wall_time", "target_cpu_time")


def _rows(folder):
    return [json.loads(line) for line in open(folder / "runs.jsonl")]


def _no_clocks(rows):
    return [{k: v for k, v in r.items() if k not in CLOCKS} for r in rows]


def test_schedule_validation_early_stop_report_and_bit_identical_replay(tmp_path):
    from qnref.checkpoint import load as ck_load
    from qnref.train import load_checkpoint

    out, ck, best = tmp_path / "rep", tmp_path / "run.ckpt", tmp_path / "best.ckpt"
    assert main(SHOW + ["--out", str(out), "--checkpoint", str(ck), "--best-checkpoint", str(best)]) == 0
    rows = _rows(out)
    lrs = [r["lr"] for r in rows]
    assert lrs[0] == 0.5 and min(lrs) == pytest.approx(0.005) and sorted(set(lrs), reverse=True) == \
        pytest.approx([0.5, 0.05, 0.005])  # the two decays
    assert rows[-1]["stopped"] == "early_stopping" and rows[-1]["epoch"] < 30
    assert all("val_loss" in r and "val_errors" in r for r in rows)
    files = set(os.listdir(out))
    assert {"runs.csv", "config.toml", "lr_vs_epochs.png", "loss_vs_epochs.png", "summary.md"} <= files
    import csv

    table = list(csv.DictReader(open(out / "runs.csv")))
    assert [float(t["lr"]) for t in table] == lrs and table[-1]["stopped"] == "early_stopping"
    assert float(table[-1]["train_loss"]) == rows[-1]["train_loss"]  # repr: every bit
    summary = (out / "summary.md").read_text()
    assert "val loss" in summary and "to val_acc>=0.9: epochs" in summary and "early_stopping" in summary
    if importlib.util.find_spec("tensorboard"):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(out / "tensorboard" / "sgd-seed0"))
        acc.Reload()
        assert [e.value for e in acc.Scalars("lr")] == pytest.approx(lrs)
        assert len(acc.Scalars("val_loss")) == len(rows)
    # replay: the config alone gives the same run, bit for bit
    out2, ck2 = tmp_path / "rep2", tmp_path / "run2.ckpt"
    assert main(["train", "--config", str(out / "config.toml"), "--out", str(out2), "--checkpoint", str(ck2), "--quiet"]) == 0
    assert _no_clocks(_rows(out2)) == _no_clocks(rows)
    state = type(make_optimizer("sgd", {}).init(np.zeros(1)))
    a, _ = load_checkpoint(str(ck), state)
    b, _ = load_checkpoint(str(ck2), state)
    np.testing.assert_array_equal(a["theta"], b["theta"])
    assert (out2 / "config.toml").read_text() == (out / "config.toml").read_text()
    # the best checkpoint holds θ of the best val_loss (improvements count when they beat --min-delta)
    from qnref.train import EarlyStopping

    payload, _ = ck_load(str(best), {"state": state})
    i = EarlyStopping("val_loss", 2, 1e-3).best(rows)
    assert payload["best"]["index"] == i and payload["best"]["value"] == rows[i]["val_loss"]
    assert len(rows) - 1 - i == 2


def test_config_entries_are_overridden_by_given_options_and_checked(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    assert main(SHOW + ["--write-config", str(cfg)]) == 0
    assert not (tmp_path / "rep").exists()
    out = tmp_path / "short"
    assert main(["train", "--config", str(cfg), "--epochs", "2", "--out", str(out), "--quiet"]) == 0
    assert _rows(out)[-1]["epoch"] == pytest.approx(2, abs=0.1)
    assert "epochs = 2.0" in (out / "config.toml").read_text()
    capsys.readouterr()
    text = cfg.read_text()
    for bad, msg in [(text.replace("epochs = 30.0", "epochs = -1.0"), "epochs must be a finite number > 0, got -1.0"),
                     (text.replace('lr_schedule = "multistep:3,6:0.1"', 'lr_schedule = "multistep:6,3"'), "lr_schedule"),
                     ("bogus = 1\n" + text, "unknown key 'bogus'"),
                     (text.replace('optimizer = "sgd"', 'optimizer = "sgdd"'), "unknown optimizer 'sgdd'")]:
        cfg.write_text(bad)
        code = main(["train", "--config", str(cfg), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and msg in err, err
    code = main(["train", "--config", str(tmp_path / "nope.toml"), "--quiet"])
    assert code == 2 and "--config" in capsys.readouterr().err


@pytest.mark.parametrize("extra,msg", [
    (["--lr-schedule", "multistep:60,120:x"], "argument --lr-schedule: 'multistep:60,120:x': multistep's gamma must be"),
    (["--lr-schedule", "cosin:10"], "argument --lr-schedule:"),
    (["--val-fraction", "1"], "argument --val-fraction: must be a finite number in [0, 1), got '1'"),
    (["--early-stopping", "val_los"], "argument --early-stopping: must be one of train_loss"),
    (["--target", "test_acc=0.9"], "argument --target:"),
    (["--max-cpu-time", "0"], "argument --max-cpu-time: must be a finite number > 0"),
    (["--patience", "0"], "argument --patience: must be an integer ≥ 1"),
])
def test_new_options_are_checked_at_parse_time(capsys, extra, msg):
    code = main(TRAIN + extra)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and msg in err, err


def test_schedule_needs_a_step_size_and_early_stopping_a_split(capsys):
    assert main(["train", "--model", "mlp", "--optimizer", "lsr1-tr", "--dataset", "digits", "--quiet",
                 "--lr-schedule", "step:1"]) == 2
    assert "lsr1-tr has none a schedule can scale" in capsys.readouterr().err
    assert main(TRAIN + ["--early-stopping", "val_loss"]) == 2
    assert "no validation split" in capsys.readouterr().err


def test_compare_per_optimizer_settings_and_time_to_target(tmp_path):
    out = tmp_path / "cmp"
    code = main(["compare", "--model", "mlp", "--dataset", "digits", "--optimizers",
                 "sgd(lr=0.3,schedule='multistep:2:0.1'),adam(lr=0.01),adam(lr=0.001)", "--batch-size", "64",
                 "--epochs", "3", "--target", "test_acc>=0.85", "--out", str(out), "--quiet"])
    assert code == 0
    rows = _rows(out)
    assert {r["run"] for r in rows} == {"sgd(lr=0.3,schedule='multistep:2:0.1')", "adam(lr=0.01)", "adam(lr=0.001)"}
    assert sorted({r["lr"] for r in rows if r["run"].startswith("sgd")}) == pytest.approx([0.03, 0.3])
    summary = (out / "summary.md").read_text()
    assert "to test_acc>=0.85: epochs" in summary and "| adam(lr=0.01) | adam | lr=0.01, batch_size=64 | – |" in summary
    fast = next(r for r in rows if r["run"] == "adam(lr=0.01)" and "target_epoch" in r)
    line = next(t for t in summary.splitlines() if t.startswith("| adam(lr=0.01) | 1 |"))
    assert f"| {fast['target_epoch']:.2f} |" in line and "| 1 of 1 |" in line
    # the report's config reruns the comparison
    out2 = tmp_path / "cmp2"
    assert main(["compare", "--config", str(out / "config.toml"), "--out", str(out2), "--quiet"]) == 0
    assert _no_clocks(_rows(out2)) == _no_clocks(rows)


@pytest.mark.parametrize("spec,msg", [("kfac(lr=0.01", "unclosed ("), ("adam,adam", "lists adam twice"),
                                      ("kfac(lrr=0.1)", "unknown hyperparameter of kfac 'lrr'"),
                                      ("adam(lr)", "--opt expects KEY=VALUE"), ("sgd(schedule='x:1')", "schedule")])
def test_compare_optimizer_specs_are_checked(capsys, spec, msg):
    code = main(["compare", "--model", "mlp", "--dataset", "digits", "--optimizers", spec, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and msg in err, err


def test_presets_write_their_config(tmp_path):
    from qnref.config import load, preset_from_dict
    from qnref.presets import PRESETS

    f = tmp_path / "qs.toml"
    assert main(["compare", "--preset", "quickstart", "--write-config", str(f), "--quiet"]) == 0
    assert preset_from_dict(load(f)) == PRESETS["quickstart"]
