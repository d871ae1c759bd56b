"""Training loop: metrics, reproducibility, bit-identical resume, checkpoint errors, NaN handling."""
import os
import pickle

import numpy as np
import pytest
from sklearn.datasets import load_digits

from qnref.nn.activations import Tanh
from qnref.nn.dense import Dense
from qnref.nn.model import Sequential
from qnref.optim import make_optimizer
from qnref.checkpoint import CheckpointError
from qnref.train import Data, TrainingError, evaluate, load_checkpoint, train


def data(n=600):
    d = load_digits()
    X, y = d.data / 16.0, d.target
    return Data(X[:n], y[:n], X[n:n + 200], y[n:n + 200], "softmax_ce", "digits")


def model():
    return Sequential([Dense(16), Tanh(), Dense(10)], input_shape=(64,))


def test_history_metrics_are_consistent():
    m, dd = model(), data()
    res = train(m, make_optimizer("adam", lr=0.01, batch_size=50), dd, epochs=2, seed=0, eval_every=0.5, l2=1e-3)
    epochs = [r["epoch"] for r in res.history]
    assert epochs[0] == 0 and epochs == sorted(epochs) and len(res.history) == 5
    last = res.final
    ev = evaluate(m, "softmax_ce", dd.X_test, dd.y_test, res.theta)
    assert last["test_loss"] == pytest.approx(ev["loss"], rel=1e-15)
    pred = (dd.X_test @ m.layout.views(res.theta)[0][:, :-1].T + m.layout.views(res.theta)[0][:, -1])
    assert last["test_errors"] == 200 - last["test_acc"] * 200
    assert last["train_loss"] > 0 and last["passes"] == pytest.approx(2.0)
    assert pred.shape == (200, 16)


@pytest.mark.parametrize("name,kw", [("lsr1-tr", {"batch_size": 100}), ("adam", {"batch_size": 50}), ("kfac", {"batch_size": 100})])
def test_resume_is_bit_identical(tmp_path, name, kw):
    m, dd = model(), data()
    full = train(m, make_optimizer(name, **kw), dd, epochs=3, seed=4)
    ck = str(tmp_path / "run.ckpt")
    part = train(m, make_optimizer(name, **kw), dd, epochs=3, seed=4, checkpoint=ck, stop_after_steps=7)
    assert part.stopped == "interrupted" and os.path.exists(ck)
    rest = train(m, make_optimizer(name, **kw), dd, epochs=3, seed=4, checkpoint=ck, resume=True)
    np.testing.assert_array_equal(rest.theta, full.theta)
    assert [h["train_loss"] for h in rest.history] == [h["train_loss"] for h in full.history]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".ckpt-")]  # no temporary left


def test_seeded_runs_reproduce():
    m, dd = model(), data()
    a = train(m, make_optimizer("lsr1-tr", batch_size=100), dd, epochs=2, seed=1)
    b = train(m, make_optimizer("lsr1-tr", batch_size=100), dd, epochs=2, seed=1)
    c = train(m, make_optimizer("lsr1-tr", batch_size=100), dd, epochs=2, seed=2)
    np.testing.assert_array_equal(a.theta, b.theta)
    assert not np.array_equal(a.theta, c.theta)


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    m, dd = model(), data()
    ck = tmp_path / "bad.ckpt"
    ck.write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="is not a qnref checkpoint"):
        train(m, make_optimizer("sgd"), dd, epochs=1, checkpoint=str(ck), resume=True)
    ck.write_bytes(pickle.dumps({"something": 1}))
    with pytest.raises(CheckpointError, match="old pickle checkpoint"):
        load_checkpoint(str(ck))
    good = str(tmp_path / "good.ckpt")
    train(m, make_optimizer("sgd", batch_size=100), dd, epochs=1, checkpoint=good, stop_after_steps=2)
    with pytest.raises(CheckpointError, match=r"another configuration: optimizer\.hyperparameters"):
        train(m, make_optimizer("sgd", batch_size=100, lr=0.5), dd, epochs=1, checkpoint=good, resume=True)
    with pytest.raises(CheckpointError, match=r"another configuration: run\.seed: 0 in the file, 1 in this run"):
        train(m, make_optimizer("sgd", batch_size=100), dd, epochs=1, seed=1, checkpoint=good, resume=True)
    other = Data(dd.X_train + 1e-3, dd.y_train, dd.X_test, dd.y_test, "softmax_ce", "digits")
    with pytest.raises(CheckpointError, match=r"data\.sha256"):
        train(m, make_optimizer("sgd", batch_size=100), other, epochs=1, checkpoint=good, resume=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the run overflows on purpose
def test_divergence_stops_with_clear_message():
    dd = data()
    reg = Data(dd.X_train, np.eye(10)[dd.y_train], None, None, "mse", "digits-regression")
    m = Sequential([Dense(10)], input_shape=(64,))
    with pytest.raises(TrainingError, match="consecutive steps hit non-finite"):
        train(m, make_optimizer("sgd", lr=1e3, batch_size=100), reg, epochs=50, seed=0, max_nonfinite=5, diverge_factor=None)


def test_invalid_arguments(tmp_path):
    m, dd = model(), data()
    with pytest.raises(ValueError, match="epochs must be a finite number > 0, got 0"):
        train(m, make_optimizer("sgd"), dd, epochs=0)
    assert train(m, make_optimizer("sgd", batch_size=600), dd, epochs=np.int64(1)).stopped == "completed"
    with pytest.raises(ValueError, match="resume=True needs a checkpoint"):
        train(m, make_optimizer("sgd"), dd, resume=True)
    bad = [({"epochs": float("inf")}, "epochs must be a finite number > 0, got inf"),
           ({"checkpoint_every": 0}, "checkpoint_every must be a finite number > 0, got 0"),
           ({"checkpoint_every": float("nan")}, "checkpoint_every must be a finite number > 0, got nan"),
           ({"l2": float("inf")}, "l2 must be a finite number ≥ 0, got inf"),
           ({"seed": -1}, "seed must be an integer ≥ 0, got -1"),
           ({"seed": float("nan")}, "seed must be an integer ≥ 0, got nan"),
           ({"max_nonfinite": 0}, "max_nonfinite must be an integer ≥ 1, got 0"),
           ({"resume": "yes", "checkpoint": str(tmp_path / "c")}, "resume must be True or False, got 'yes'"),
           ({"diverge_factor": 0.5}, "diverge_factor must be a finite number > 1, got 0.5"),
           ({"checkpoint": str(tmp_path)}, f"checkpoint {tmp_path}: is a folder")]
    for kw, msg in bad:
        with pytest.raises(ValueError) as exc:
            train(m, make_optimizer("sgd"), dd, **kw)
        assert msg in str(exc.value), (kw, str(exc.value))


def test_divergence_above_the_factor_is_marked(tmp_path):
    """A run whose loss grows past diverge_factor × the starting loss (finite, here ~1e2 ×) stops
    with DivergenceError; its last record says why; diverge_factor=None lets it run."""
    from qnref.report import RunLog
    from qnref.train import DivergenceError

    m, dd = model(), data()
    log = RunLog(str(tmp_path / "runs.jsonl"), "sgd", 0)
    with pytest.raises(DivergenceError, match=r"exceeds 3 × the starting loss") as exc:
        train(m, make_optimizer("sgd", lr=30.0, batch_size=600), dd, epochs=5, diverge_factor=3.0, log=log)
    hist = exc.value.history
    assert "diverged" in hist[-1] and hist[-1]["train_loss"] > 3 * hist[0]["train_loss"]
    assert [r["train_loss"] for r in log.rows()] == [r["train_loss"] for r in hist]  # written as it went
    res = train(m, make_optimizer("sgd", lr=30.0, batch_size=600), dd, epochs=5, diverge_factor=None)
    assert res.stopped == "completed" and "diverged" not in res.final


def test_evaluate_binary_sigmoid_accuracy():
    r = np.random.default_rng(0)
    m = Sequential([Dense(1)], input_shape=(3,))
    X = r.standard_normal((50, 3))
    y = (r.random((50, 1)) < 0.3).astype(float)
    th = m.init(1)
    ev = evaluate(m, "sigmoid_ce", X, y, th)
    z = X @ m.layout.views(th)[0][:, :-1].T + m.layout.views(th)[0][:, -1]
    acc = float(((z > 0) == (y == 1)).mean())
    assert ev["acc"] == pytest.approx(acc) and ev["errors"] == round(50 * (1 - acc))
    assert "acc" not in evaluate(m, "sigmoid_ce", X, r.random((50, 1)), th)  # soft targets: no accuracy


def test_nan_in_training_data_is_a_clear_error():
    dd = data()
    X = dd.X_train.copy()
    X[7, 3] = np.nan
    bad = Data(X, dd.y_train, dd.X_test, dd.y_test, "softmax_ce", "digits")
    with pytest.raises(ValueError, match=r"input data X contains 1 non-finite value.*\(7, 3\)"):
        train(model(), make_optimizer("sgd"), bad, epochs=1)


def test_batchnorm_models_are_evaluated_with_current_statistics(tmp_path):
    """Eval-mode metrics of a BN net use running statistics re-estimated at the current θ (the
    steps never update them), so the recorded loss equals an explicit re-estimate + evaluate, and
    resume stays bit-identical."""
    from qnref.nn.norm import estimate_batchnorm_stats
    from qnref.nn.zoo import build_model
    from qnref.train import BN_STATS_BATCH

    d = load_digits()
    X, y = (d.data / 16.0).reshape(-1, 1, 8, 8), d.target
    dd = Data(X[:400], y[:400], X[400:500], y[400:500], "softmax_ce", "digits")
    m = build_model("lenet-digits", batchnorm=True)
    res = train(m, make_optimizer("adam", lr=0.01, batch_size=100), dd, epochs=2, seed=0)
    fresh = build_model("lenet-digits", batchnorm=True)
    estimate_batchnorm_stats(fresh, res.theta, dd.X_train, batch_size=BN_STATS_BATCH)
    assert res.final["train_loss"] == evaluate(fresh, "softmax_ce", dd.X_train, dd.y_train, res.theta)["loss"]
    untouched = build_model("lenet-digits", batchnorm=True)  # initial running stats (0, 1)
    assert res.final["train_loss"] != evaluate(untouched, "softmax_ce", dd.X_train, dd.y_train, res.theta)["loss"]
    ck = str(tmp_path / "bn.ckpt")
    train(build_model("lenet-digits", batchnorm=True), make_optimizer("adam", lr=0.01, batch_size=100), dd, epochs=2,
          seed=0, checkpoint=ck, stop_after_steps=5)
    rest = train(build_model("lenet-digits", batchnorm=True), make_optimizer("adam", lr=0.01, batch_size=100), dd,
                 epochs=2, seed=0, checkpoint=ck, resume=True)
    np.testing.assert_array_equal(rest.theta, res.theta)
    assert [h["train_loss"] for h in rest.history] == [h["train_loss"] for h in res.history]


# -- schedules, validation split, early stopping, budgets, targets (issue 23) ----------------------
from qnref.train import EarlyStopping, Target, validation_split  # noqa: E402


def test_schedule_scales_the_step_size_in_the_records():
    m, dd = model(), data()
    res = train(m, make_optimizer("sgd", lr=0.4, batch_size=60), dd, epochs=5, seed=0, schedule="multistep:2,4:0.1")
    got = {round(r["epoch"]): r["lr"] for r in res.history[1:]}
    # a record carries the step size in effect from its position on
    assert got == pytest.approx({1: 0.4, 2: 0.04, 3: 0.04, 4: 0.004, 5: 0.004})
    plain = train(m, make_optimizer("sgd", lr=0.4, batch_size=60), dd, epochs=5, seed=0)
    two = train(m, make_optimizer("sgd", lr=0.4, batch_size=60), dd, epochs=2, seed=0, schedule="multistep:2,4:0.1")
    np.testing.assert_array_equal(two.theta, train(m, make_optimizer("sgd", lr=0.4, batch_size=60), dd, epochs=2, seed=0).theta)
    assert not np.array_equal(res.theta, plain.theta)


def test_schedule_on_an_optimizer_without_a_step_size_is_refused():
    with pytest.raises(ValueError, match="lsr1-tr has none a schedule can scale"):
        train(model(), make_optimizer("lsr1-tr", batch_size=100), data(), epochs=1, schedule="step:1:0.5")


def test_resume_with_a_schedule_is_bit_identical(tmp_path):
    m, dd = model(), data()
    kw = dict(epochs=4, seed=2, schedule="warmup:1*cosine:4", val_fraction=0.25)
    full = train(m, make_optimizer("adam", lr=0.02, batch_size=50), dd, **kw)
    ck = str(tmp_path / "s.ckpt")
    train(m, make_optimizer("adam", lr=0.02, batch_size=50), dd, checkpoint=ck, stop_after_steps=13, **kw)
    with pytest.raises(CheckpointError, match="run.schedule"):
        train(m, make_optimizer("adam", lr=0.02, batch_size=50), dd, checkpoint=ck, resume=True,
              **{**kw, "schedule": "cosine:4"})
    rest = train(m, make_optimizer("adam", lr=0.02, batch_size=50), dd, checkpoint=ck, resume=True, **kw)
    np.testing.assert_array_equal(rest.theta, full.theta)
    assert [h["val_loss"] for h in rest.history] == [h["val_loss"] for h in full.history]


def test_validation_split_is_seeded_stratified_and_disjoint():
    y = np.repeat(np.arange(4), [50, 30, 15, 5])
    tr, va = validation_split(y, 0.2, seed=3)
    tr2, va2 = validation_split(y, 0.2, seed=3)
    _, va3 = validation_split(y, 0.2, seed=4)
    np.testing.assert_array_equal(va, va2)
    np.testing.assert_array_equal(tr, tr2)
    assert not np.array_equal(va, va3)
    assert len(va) == 20 and len(tr) == 80 and not set(tr) & set(va) and sorted(np.r_[tr, va]) == list(range(100))
    assert np.bincount(y[va]).tolist() == [10, 6, 3, 1]  # each class in proportion
    yb = (np.arange(40) < 10).astype(float)[:, None]          # one binary column (sigmoid_ce): stratified too
    _, vb = validation_split(yb, 0.5, seed=0, loss="sigmoid_ce")
    assert int(yb[vb].sum()) == 5
    # regression targets: uniform split of the requested size
    tr, va = validation_split(np.linspace(0, 1, 30)[:, None] * np.ones((1, 2)), 0.1, seed=0, loss="mse")
    assert len(va) == 3
    for bad in (0.0, 1.0, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="val_fraction"):
            validation_split(y, bad)


def test_val_metrics_are_recorded_on_the_held_out_rows():
    m, dd = model(), data()
    res = train(m, make_optimizer("adam", lr=0.01, batch_size=50), dd, epochs=1, seed=0, val_fraction=0.25)
    split = dd.split_validation(0.25, 0)
    assert split.X_train.shape[0] == 450 and split.X_val.shape[0] == 150
    ev = evaluate(m, "softmax_ce", split.X_val, split.y_val, res.theta)
    f = res.final
    assert f["val_loss"] == ev["loss"] and f["val_errors"] == ev["errors"] and f["val_acc"] == ev["acc"]
    assert {"train_acc", "train_errors", "test_acc", "test_errors"} <= set(f)


def test_early_stopping_stops_after_patience_and_keeps_the_best_checkpoint(tmp_path):
    m, dd = model(), data()
    best = str(tmp_path / "best.ckpt")
    es = EarlyStopping("val_loss", patience=2, min_delta=0.05)
    res = train(m, make_optimizer("adam", lr=0.05, batch_size=50), dd, epochs=30, seed=0, val_fraction=0.2,
                early_stopping=es, best_checkpoint=best, eval_every=0.5)
    assert res.stopped == "early_stopping" and res.final["stopped"] == "early_stopping"
    assert res.final["epoch"] < 30
    vals = [h["val_loss"] for h in res.history]
    b = es.best(res.history)
    assert len(vals) - 1 - b == 2  # stopped exactly `patience` evaluations after the best
    assert all(v > vals[b] - 0.05 for v in vals[b + 1:])
    payload, _ = load_checkpoint(best, type(make_optimizer("adam").init(m.init(0))))
    assert payload["best"]["index"] == b and payload["best"]["value"] == vals[b]
    assert payload["history"][-1]["val_loss"] == vals[b]
    got = evaluate(m, "softmax_ce", dd.split_validation(0.2, 0).X_val, dd.split_validation(0.2, 0).y_val, payload["theta"])
    assert got["loss"] == vals[b]


def test_early_stopping_metric_must_exist():
    with pytest.raises(ValueError, match="no validation split"):
        train(model(), make_optimizer("sgd"), data(), epochs=1, early_stopping=EarlyStopping("val_loss"))
    with pytest.raises(ValueError, match="early_stopping metric must be one of"):
        EarlyStopping("val_los")
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping("train_loss", patience=0)


def test_cpu_time_budget_stops_within_two_percent():
    import time

    m, dd = model(), data()
    budget = 1.5
    t0 = time.process_time()
    res = train(m, make_optimizer("adam", lr=0.01, batch_size=20), dd, epochs=10_000, seed=0, max_cpu_time=budget)
    spent = time.process_time() - t0
    assert res.stopped == "cpu_time" and res.final["stopped"] == "cpu_time"
    assert budget <= res.final["cpu_time"] <= 1.02 * budget, res.final["cpu_time"]
    assert spent <= 1.02 * budget + 0.5  # the final evaluation is all that runs after the budget


def test_wall_and_step_budgets():
    m, dd = model(), data()
    res = train(m, make_optimizer("adam", lr=0.01, batch_size=20), dd, epochs=10_000, seed=0, max_wall_time=0.5)
    assert res.stopped == "wall_time" and 0.5 <= res.final["wall_time"] <= 0.6
    res = train(m, make_optimizer("adam", lr=0.01, batch_size=20), dd, epochs=10, seed=0, max_steps=7)
    assert res.stopped == "max_steps" and res.steps == 7
    for kw in ({"max_cpu_time": 0}, {"max_wall_time": -1.0}, {"max_cpu_time": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            train(m, make_optimizer("sgd"), dd, **kw)


def test_target_records_when_it_was_first_reached():
    m, dd = model(), data()
    res = train(m, make_optimizer("adam", lr=0.02, batch_size=50), dd, epochs=4, seed=0, eval_every=0.5,
                target="test_acc>=0.8")
    first = next(i for i, h in enumerate(res.history) if h["test_acc"] >= 0.8)
    hit = res.history[first]
    for h in res.history[first:]:
        assert (h["target_epoch"], h["target_step"], h["target_time"], h["target_passes"]) == \
            (hit["epoch"], hit["step"], hit["time"], hit["passes"])
    assert all("target_epoch" not in h for h in res.history[:first])
    stop = train(m, make_optimizer("adam", lr=0.02, batch_size=50), dd, epochs=4, seed=0, eval_every=0.5,
                 target=Target("test_acc", 0.8, "max"), stop_at_target=True)
    assert stop.stopped == "target" and len(stop.history) == first + 1
    with pytest.raises(ValueError, match="target"):
        Target.parse("test_acc=0.8")


def test_progress_bar_ends_at_100_percent_and_lines_mode_prints_one_line_per_evaluation(capsys):
    import warnings

    m, dd = model(), data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a TqdmWarning (n > total) would fail the run
        train(m, make_optimizer("adam", lr=0.01, batch_size=70), dd, epochs=2.5, seed=0, progress=True)
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in final and "2.50/2.50" in final and "-" not in final.split("<")[-1].split(",")[0], final
    res = train(m, make_optimizer("adam", lr=0.01, batch_size=70), dd, epochs=2, seed=0, eval_every=0.5,
                progress="lines", val_fraction=0.1)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == len(res.history) and lines[-1].startswith("epoch 2.") and "val_loss" in lines[-1]
    with pytest.raises(ValueError, match="progress"):
        train(m, make_optimizer("sgd"), dd, progress="fancy")
