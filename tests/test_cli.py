"""End-to-end tests of the `qnref` command (in-process and as a console script)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qnref.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qnref.cli", *args], capture_output=True, text=True, timeout=300)


def test_compare_quickstart_writes_report(tmp_path):
    out = tmp_path / "qs"
    r = run_cli("compare", "--preset", "quickstart", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    files = sorted(os.listdir(out))
    assert files == ["comparison.png", "loss_vs_epochs.png", "loss_vs_passes.png", "loss_vs_time.png", "runs.jsonl", "summary.md"]
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


@pytest.mark.parametrize("name", sorted(__import__("qnref.presets", fromlist=["PRESETS"]).PRESETS))
def test_every_preset_builds(name):
    """Every preset's optimizers, hyperparameters, data set and model are valid, and one step of
    each run works (the full presets are run by hand; their numbers are in docs/benchmarks.md)."""
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
