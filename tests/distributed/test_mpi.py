"""Data-parallel runs under ``mpiexec -n 2`` equal one-process runs on the same global batches.

The MPI side runs ``mpi_script.py`` in subprocesses (with a timeout); the reference is computed
here with the ordinary :class:`~qnref.optim.base.Problem`. Without ``mpiexec``/mpi4py these tests
fail with a message saying what to install (they are marked ``mpi``; deselect with ``-m "not mpi"``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import mpi_script as ms  # noqa: E402

from qnref.optim.base import Problem  # noqa: E402

RTOL = 1e-10
TIMEOUT = 60


def _mpiexec() -> str:
    cand = [os.path.join(os.path.dirname(sys.executable), "mpiexec"), shutil.which("mpiexec") or ""]
    for c in cand:
        if c and os.path.exists(c):
            return c
    pytest.fail("mpiexec not found: the distributed tests need an MPI launcher and mpi4py "
                "(pip install mpi4py mpich — part of the test extra)", pytrace=False)


def _env() -> dict:
    env = dict(os.environ)
    env.pop("QNREF_COMM", None)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1",
               PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]))
    return env


def launch(args: list[str], n: int = 2, cwd: str | None = None, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.fail("mpi4py is not installed: pip install mpi4py mpich (part of the test extra)", pytrace=False)
    cmd = [_mpiexec(), "-n", str(n), sys.executable] + args
    t0 = time.monotonic()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env={**_env(), **(env or {})},
                             cwd=cwd or HERE)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} did not finish within {TIMEOUT} s (a rank hangs):\n{exc.stderr}")
    return res, time.monotonic() - t0


def _ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, f"exit status {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    both_nan = np.isnan(a) & np.isnan(b)
    a, b = np.where(both_nan, 0, a), np.where(both_nan, 0, b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# -- products and single steps ------------------------------------------------------------------
@pytest.fixture(scope="module")
def products(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mpi") / "products.npz")
    res, _ = launch([os.path.join(HERE, "mpi_script.py"), "products", out])
    _ok(res)
    ref = ms.products(lambda m, loss, X, y, l2, seed: Problem(m, loss, X, y, l2, seed=seed))
    return dict(np.load(out)), ref


@pytest.mark.mpi
def test_conv_kfc_factors_and_kfac_step_equal_single_process(products):
    dist, _ = products
    ref = ms.conv_products(lambda m, loss, X, y, l2, seed: Problem(m, loss, X, y, l2, seed=seed))
    assert any("conv" in k for k in ref)
    for k, v in ref.items():
        assert rel(dist[f"conv_{k}"], v) <= RTOL, k


PRODUCT_KEYS = ["value", "grad", "hvp", "ggn", "fisher_empirical", "fisher_sampled", "fisher_exact", "jvp", "vjp",
                "per_example", "gram_grad", "gram_jac", "sampled_targets", "hvp_first", "grad_after_hvp", "subset_grad",
                "counter_ge"]


@pytest.mark.mpi
@pytest.mark.parametrize("key", PRODUCT_KEYS)
def test_products_equal_single_process(products, key):
    dist, ref = products
    assert dist["ranks_identical"], "the two ranks ended with different bits"
    assert rel(dist[key], ref[key]) <= RTOL, key


@pytest.mark.mpi
def test_kronecker_factors_equal_single_process(products):
    dist, ref = products
    keys = [k for k in ref if k.startswith(("A_", "G_", "mean_a_"))]
    assert len(keys) == 12
    for k in keys:
        assert rel(dist[k], ref[k]) <= RTOL, k


@pytest.mark.mpi
@pytest.mark.parametrize("name", [n for n, _ in ms.OPT_STEPS])
def test_optimizer_steps_equal_single_process(products, name):
    dist, ref = products
    _, X, _, theta0, _, _ = ms.product_setup()
    assert not np.allclose(ref[f"step_{name}_theta"], theta0), "the reference did not move"
    assert rel(dist[f"step_{name}_theta"], ref[f"step_{name}_theta"]) <= RTOL
    for k in range(ms.N_STEPS):
        assert rel(dist[f"step_{name}_{k}_loss"], ref[f"step_{name}_{k}_loss"]) <= RTOL
    assert dist[f"step_{name}_state"] == ref[f"step_{name}_state"]


# -- training, checkpoints ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def training(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mpi") / "train.npz")
    res, _ = launch([os.path.join(HERE, "mpi_script.py"), "train", out])
    _ok(res)
    return out, dict(np.load(out))


@pytest.mark.mpi
@pytest.mark.parametrize("name,kw", ms.TRAIN_RUNS)
def test_training_curve_equals_single_process(training, name, kw):
    _, dist = training
    r = ms.run_training(name, kw)
    assert len(dist[f"{name}_loss"]) == len(r.history) == 5
    assert rel(dist[f"{name}_loss"], [h["train_loss"] for h in r.history]) <= RTOL
    assert rel(dist[f"{name}_test"], [h["test_loss"] for h in r.history]) <= RTOL
    np.testing.assert_array_equal(dist[f"{name}_passes"], [h["passes"] for h in r.history])
    assert rel(dist[f"{name}_theta"], r.theta) <= RTOL


@pytest.mark.mpi
@pytest.mark.parametrize("name,kw", ms.TRAIN_RUNS)
def test_checkpoint_of_two_ranks_resumes_on_one(training, name, kw):
    out, _ = training
    ck = f"{out}.{name}.ckpt"
    assert os.path.exists(ck)
    full = ms.run_training(name, kw)
    rest = ms.run_training(name, kw, checkpoint=ck, resume=True)
    assert rest.steps == full.steps
    assert rel([h["train_loss"] for h in rest.history], [h["train_loss"] for h in full.history]) <= RTOL
    assert rel(rest.theta, full.theta) <= RTOL


# -- failures -------------------------------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.parametrize("how", ["raise", "exit", "kill"])
def test_failing_rank_ends_the_job(tmp_path, how):
    res, elapsed = launch([os.path.join(HERE, "mpi_script.py"), how, str(tmp_path / "x")])
    assert res.returncode != 0
    assert elapsed < TIMEOUT
    if how == "raise":
        assert "injected failure on rank 1" in res.stderr, (res.returncode, res.stdout, res.stderr)
        assert "error on rank 1 of 2" in res.stderr and "aborting all 2 ranks" in res.stderr
    if how == "kill":
        assert "BAD TERMINATION" in res.stdout + res.stderr or res.returncode in (9, 137, -9)


@pytest.mark.mpi
def test_a_rank_that_sleeps_forever_ends_the_job_within_the_timeout(tmp_path):
    """Rank 1 sleeps at step 3 (alive, not in MPI); rank 0 waits at its next collective. With
    QNREF_MPI_TIMEOUT=4 the job ends a few seconds after the timeout, with one line naming rank 1
    and the collective, exit status 5."""
    from qnref.distributed.comm import EXIT_TIMEOUT

    t0 = time.monotonic()
    res_start, _ = launch(["-c", "pass"])  # the launcher's own start-up, to subtract
    startup = time.monotonic() - t0
    res, elapsed = launch([os.path.join(HERE, "mpi_script.py"), "stall", str(tmp_path / "x")],
                          env={"QNREF_MPI_TIMEOUT": "4"})
    err = res.stderr.strip()
    assert res.returncode == EXIT_TIMEOUT, (res.returncode, res.stderr)
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert "qnref: MPI collective timeout: rank 1 never arrived" in err and "rank 0 waited" in err
    assert "allreduce_sum" in err and "limit 4 s" in err
    assert elapsed - startup < 4 + 15, (elapsed, startup)  # timeout + start-up of qnref + a few seconds


@pytest.mark.mpi
@pytest.mark.parametrize("mode,msg", [
    ("refuse-bn", "the model has batch normalization in training mode"),
    ("refuse-batch", "a batch of 1 examples cannot be split over 2 ranks"),
])
def test_refusals_print_one_line_on_rank_0(tmp_path, mode, msg):
    res, _ = launch([os.path.join(HERE, "mpi_script.py"), mode, str(tmp_path / "x")])
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert err.count("\n") == 0 and msg in err and "Traceback" not in err, err
    assert err.startswith("qnref train: error: ") and "(rank" not in err  # printed by rank 0


# -- the command line -----------------------------------------------------------------------------
CLI = ["--model", "mlp", "--optimizer", "lsr1-tr", "--dataset", "digits", "--n-train", "400", "--n-test", "100",
       "--epochs", "1", "--batch-size", "100", "--eval-every", "0.5", "-q"]


@pytest.mark.mpi
def test_cli_train_under_mpiexec_equals_one_process(tmp_path):
    from qnref.cli import main

    res, _ = launch(["-m", "qnref.cli", "train", *CLI, "--out", str(tmp_path / "two")], cwd=str(tmp_path))
    _ok(res)
    assert main(["train", *CLI, "--out", str(tmp_path / "one")]) == 0
    rows = [[json.loads(line) for line in open(tmp_path / d / "runs.jsonl")] for d in ("two", "one")]
    assert len(rows[0]) == len(rows[1]) == 3
    assert rel([r["train_loss"] for r in rows[0]], [r["train_loss"] for r in rows[1]]) <= RTOL


@pytest.mark.mpi
def test_cli_mismatched_ranks_are_detected(tmp_path):
    mpiexec = _mpiexec()
    cmd = [mpiexec, "-n", "1", sys.executable, "-m", "qnref.cli", "train", *CLI, ":",
           "-n", "1", sys.executable, "-m", "qnref.cli", "train", *CLI, "--opt", "memory=7"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=str(tmp_path))
    assert res.returncode != 0
    assert "ranks were started with different configurations" in res.stderr
    assert "optimizer.memory: '7' != '5'" in res.stderr
