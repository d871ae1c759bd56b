"""SIGINT / SIGTERM during `qnref train` and `qnref compare`: one line on stderr naming the last
checkpoint and the resume command, exit 130 / 143, the report of what finished, and a resume from
the named checkpoint that is bit-identical to an uninterrupted run."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qnref import checkpoint as ck

CLI = [sys.executable, "-m", "qnref.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "QNREF_COMM": "serial"}


def _args(ckpt, out, epochs="6"):
    return ["train", "--model", "mlp", "--optimizer", "lsr1-tr", "--dataset", "digits", "--epochs", epochs,
            "--batch-size", "100", "--seed", "3", "--checkpoint", str(ckpt), "--checkpoint-every", "0.5",
            "--eval-every", "0.5", "--out", str(out), "--quiet"]


def _interrupt(args, sig, wait_for, timeout=120.0):
    """Start the CLI, wait until ``wait_for`` exists (and a little more), send ``sig``."""
    proc = subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    t0 = time.monotonic()
    while not os.path.exists(wait_for):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended before it could be interrupted: {err}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("no checkpoint appeared")
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def _state_hint():
    from qnref.cli import make_optimizer
    from qnref.nn.zoo import build_model

    m = build_model("mlp", input_shape=(64,), n_outputs=10)
    return type(make_optimizer("lsr1-tr", {"batch_size": 100}).init(m.init(0)))


@pytest.mark.slow
def test_sigint_during_training_resumes_bit_identically(tmp_path):
    ckpt, out = tmp_path / "run.ckpt", tmp_path / "rep"
    code, _, err = _interrupt(_args(ckpt, out), signal.SIGINT, ckpt)
    assert code == 130, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    m = re.search(r"last checkpoint (\S+) \(step (\d+), epoch ([\d.]+)\).*resume with: (.*)$", err.strip())
    assert m and m.group(1) == str(ckpt), err
    assert "report of what finished in " + str(out) in err
    rows = [json.loads(line) for line in open(out / "runs.jsonl")]
    assert rows and (out / "summary.md").exists()
    cmd = shlex.split(m.group(4))
    assert cmd[0] == "qnref" and cmd[-1] == "--resume"
    interrupted_step = int(m.group(2))
    payload, _ = ck.load(ckpt, {"state": _state_hint()})
    assert payload["step"] == interrupted_step
    r = subprocess.run(CLI + cmd[1:], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    # the uninterrupted run
    ref_ck, ref_out = tmp_path / "ref.ckpt", tmp_path / "ref"
    r = subprocess.run(CLI + _args(ref_ck, ref_out), capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    got, _ = ck.load(ckpt, {"state": _state_hint()})
    want, _ = ck.load(ref_ck, {"state": _state_hint()})
    np.testing.assert_array_equal(got["theta"], want["theta"])
    assert [h["train_loss"] for h in got["history"]] == [h["train_loss"] for h in want["history"]]
    final_rows = [json.loads(line) for line in open(out / "runs.jsonl")]
    assert [r["train_loss"] for r in final_rows] == [h["train_loss"] for h in want["history"]]


@pytest.mark.slow
def test_sigterm_exits_143_with_one_line(tmp_path):
    ckpt, out = tmp_path / "run.ckpt", tmp_path / "rep"
    code, _, err = _interrupt(_args(ckpt, out), signal.SIGTERM, ckpt)
    assert code == 143 and err.count("\n") == 1 and "interrupted by SIGTERM" in err and str(ckpt) in err, err


@pytest.mark.slow
def test_sigint_during_compare_writes_the_finished_runs(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--model", "mlp", "--dataset", "digits", "--optimizers", "adam,lsr1-tr,sgd", "--epochs", "40",
            "--batch-size", "100", "--seeds", "0,1", "--out", str(out), "--quiet"]
    code, _, err = _interrupt(args, signal.SIGINT, out / "runs.jsonl")
    assert code == 130 and err.count("\n") == 1, err
    assert "compare runs are not checkpointed" in err and "rerun with: qnref compare" in err
    rows = [json.loads(line) for line in open(out / "runs.jsonl")]
    assert rows and (out / "summary.md").exists()


def test_interrupt_before_training_is_one_line(tmp_path):
    from qnref.cli import main
    from qnref.train import Interrupted

    def boom(*a, **k):
        raise Interrupted(signal.SIGINT)

    import qnref.cli as cli

    orig = cli.build_data
    cli.build_data = boom
    try:
        assert main(["train", "--model", "mlp", "--optimizer", "sgd", "--dataset", "digits", "--quiet"]) == 130
    finally:
        cli.build_data = orig
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_a_signal_during_a_checkpoint_write_is_handled_after_it(tmp_path, monkeypatch):
    """The interrupt waits until the checkpoint is written and recorded: the line then names the
    file that is on disk (no race between the write and the record of it)."""
    import qnref.train as tr
    from qnref.train import Interrupted, RunInterrupted

    def handler(signum, frame):
        raise Interrupted(signum)

    old = signal.signal(signal.SIGINT, handler)
    orig = tr.save_checkpoint
    calls = {"n": 0}

    def slow_save(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the write
        return orig(*a, **k)

    monkeypatch.setattr(tr, "save_checkpoint", slow_save)
    from test_checkpoint import data, model  # noqa: PLC0415 - same tiny problem
    from qnref.optim import make_optimizer

    p = tmp_path / "c.ckpt"
    try:
        with pytest.raises(RunInterrupted) as exc:
            tr.train(model(), make_optimizer("adam", batch_size=50), data(), epochs=5, checkpoint=str(p),
                     checkpoint_every=0.5)
    finally:
        signal.signal(signal.SIGINT, old)
    cls = type(make_optimizer("adam", batch_size=50).init(model().init(0)))
    payload, _ = ck.load(p, {"state": cls})
    assert exc.value.checkpoint == str(p) and payload["step"] == exc.value.checkpoint_step > 0
    assert calls["n"] == 2  # interrupted right after the second write, not during it
