"""The CPU-runnable parts of tools/gpu_check.py: argument parsing, the comparison, the table, a dry
run of the product and trajectory checks on the recording device backend (no GPU needed), and a dry
run of every ``gpu`` test on that backend."""
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import cupy_recording as cr

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import gpu_check as gc  # noqa: E402


def test_parse_args_defaults_and_errors():
    a = gc.parse_args([])
    assert a.steps == 5 and a.tol == 1e-10 and a.repeats == 5 and not a.no_bench
    assert a.optimizers == list(gc.DEFAULT_OPTIMIZERS)
    b = gc.parse_args(["--steps", "3", "--optimizers", "sgd, lbfgs", "--tol", "1e-9", "--no-bench", "--json", "o.json"])
    assert (b.steps, b.optimizers, b.tol, b.no_bench, b.json) == (3, ["sgd", "lbfgs"], 1e-9, True, "o.json")
    for bad in (["--steps", "0"], ["--steps", "x"], ["--tol", "-1"], ["--tol", "nan"], ["--optimizers", " , "]):
        with pytest.raises(SystemExit):
            gc.parse_args(bad)


def test_rel_err_against_hand_values():
    assert gc.rel_err([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert gc.rel_err([1.0, 2.5], [1.0, 2.0]) == pytest.approx(0.25)
    assert gc.rel_err([1e-20], [0.0]) == 1e-20  # absolute when the reference is 0
    assert gc.rel_err(np.zeros(3), np.zeros(4)) == math.inf
    assert math.isnan(gc.rel_err([np.nan, 1.0], [0.0, 1.0]))
    assert gc.rel_err([np.inf, 1.0], [np.inf, 1.0]) == 0.0
    assert gc.rel_err(3.0, 3.0 * (1 + 1e-12)) == pytest.approx(1e-12, rel=1e-3)


def test_compare_and_table():
    rows = [gc.compare("products", "mlp: grad", np.ones(3), np.ones(3), 1e-10),
            gc.compare("products", "mlp: hvp", np.ones(3) * (1 + 1e-8), np.ones(3), 1e-10),
            gc.compare("trajectory", "sgd", (np.ones(2), np.zeros(2)), [np.ones(2), np.zeros(2)], 1e-10),
            gc.Row("bench", "MLP grad", ms=1.25, torch_ms=0.5),
            gc.Row("bench", "ResNet-20", ms=3.0, note="torch n/a")]
    assert [r.ok for r in rows] == [True, False, True, True, True]
    text = gc.format_table(rows)
    lines = text.splitlines()
    assert "rel. diff" in lines[0] and "torch ms" in lines[0]
    assert any("mlp: hvp" in l and "FAIL" in l for l in lines)
    assert any("MLP grad" in l and "1.25" in l and "0.50" in l for l in lines)
    assert lines[-1] == "2/3 comparisons within tolerance; 1 FAILED"


def test_median_ms_calls_sync_each_time():
    calls = []
    ms = gc.median_ms(lambda: calls.append("f"), lambda: calls.append("s"), 3)
    assert ms >= 0 and calls == ["f", "s"] * 4  # warm-up + 3 repeats


def test_dry_run_on_the_recording_device():
    """The product and trajectory checks run end to end on the CuPy code path emulated by NumPy:
    every row passes (the device path computes what NumPy computes)."""
    with cr.recording_backend():
        rows = gc.check_products(1e-10) + gc.check_trajectories(["sgd", "lbfgs", "kfac"], 2, 1e-10)
    assert len(rows) == 5 * 12 + 3  # 12 products × 5 models + 3 trajectories
    bad = [r for r in rows if not r.ok]
    assert not bad, gc.format_table(bad)


def test_bench_dry_run_with_torch_on_the_cpu():
    """The timing code end to end at small sizes: qnref on the recording device, torch on the CPU."""
    pytest.importorskip("torch")
    with cr.recording_backend():
        rows = gc.bench(1, mlp_batch=8, resnet_batch=2, torch_device="cpu")
    assert [r.name for r in rows] == ["MLP grad (batch 8)", "MLP Hv", "MLP Gv", "ResNet-20 fwd+bwd (batch 2)"]
    assert all(r.ms > 0 and r.torch_ms > 0 for r in rows)


def test_torch_products_match_qnref_on_the_cpu():
    """The torch side times the same computations: its grad, Hv and Gv of the benchmark MLP equal
    qnref's (the same weights, float64, small batch)."""
    torch = pytest.importorskip("torch")
    from qnref.curvature.objective import Objective
    from qnref.nn.zoo import build_model

    r = np.random.default_rng(0)
    X, y = r.standard_normal((6, 784)), r.integers(0, 10, 6)
    model = build_model("mlp", input_shape=(784,), n_outputs=10, hidden=(1000, 500), activation="tanh")
    theta = model.init(seed=0)
    v = r.standard_normal(theta.size)
    p = Objective(model, "softmax_ce", X, y).at(theta)
    net = gc._torch_mlp(torch, "cpu")
    ps, vs = gc.torch_params(torch, net, theta), gc.torch_params(torch, net, v)
    np.testing.assert_array_equal(gc.qnref_flat(torch, net, ps), theta)
    grad, hvp, ggn = gc.torch_products(torch, net, X, y)
    for got, want in ((grad(ps), p.grad), (hvp(ps, vs), p.hvp(v)), (ggn(ps, vs), p.ggn_vp(v))):
        assert gc.rel_err(gc.qnref_flat(torch, net, got), want) <= 1e-10


def test_gpu_tests_pass_on_the_recording_device():
    """Every ``gpu`` test, run with the recording backend as its device (``-p cupy_recording``):
    the GPU tests' own code is exercised on every machine (torch-CUDA and 2-GPU tests skip)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": f"{root / 'tests'}"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "cupy_recording", "-p", "no:cacheprovider", "-m", "gpu",
                        str(root / "tests" / "gpu")], capture_output=True, text=True, timeout=600, cwd=root, env=env)
    tail = p.stdout[-3000:] + p.stderr[-2000:]
    assert p.returncode == 0, tail
    assert " passed" in p.stdout and " failed" not in p.stdout, tail


def test_main_without_gpu_says_so():
    p = subprocess.run([sys.executable, gc.__file__, "--no-bench"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no usable CUDA device" in p.stderr


def test_shell_script_parses_and_stops_cleanly_without_a_gpu():
    from qnref import backend

    sh = pathlib.Path(gc.__file__).with_name("gpu_check.sh")
    assert subprocess.run(["bash", "-n", str(sh)]).returncode == 0
    if backend.gpu_available():
        pytest.skip("a GPU is present: the script would run the whole check")
    env = {**__import__("os").environ, "GPU_CHECK_NO_INSTALL": "1", "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(sh)], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and "CuPy cannot use a CUDA device here" in p.stdout, p.stdout + p.stderr
