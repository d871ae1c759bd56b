"""Presets against their texts: the audit's named errors fixed, every small preset runs, and every paper-scale
preset's ``qnref compare --preset NAME --data-dir D --dry-run`` passes on small files written here in the
published formats (IDX, CIFAR-10 python batches, CIFAR-100 binary, MATLAB level-5, LIBSVM text).

A preset naming an optimizer that is not registered fails one test that lists every such (preset, run, name).
"""
import pickle

import numpy as np
import pytest
import scipy.io as sio

from qnref.cli import build_data, build_model, main, make_optimizer
from qnref.optim.base import Problem
from qnref.optim.registry import OPTIMIZERS, get_optimizer_class
from qnref.presets import ALIASES, PRESETS, SCALES, canonical
from qnref.train import METRICS

CURRENT = {n: p for n, p in PRESETS.items() if n not in ALIASES}
SMALL = sorted(n for n, p in CURRENT.items() if p.scale == "small")
SHIPPED = {"digits", "mnist1d", "toy2class", "imbalanced"}
PAPER_FILES = sorted(n for n, p in CURRENT.items() if p.scale == "paper" and p.dataset not in SHIPPED)
PAPER_SHIPPED = sorted(n for n, p in CURRENT.items() if p.scale == "paper" and p.dataset in SHIPPED)


def test_every_optimizer_named_by_a_preset_is_registered():
    get_optimizer_class("sgd")  # loads the registry
    missing = sorted({(n, r.label, r.optimizer) for n, p in CURRENT.items() for r in p.runs if r.optimizer not in OPTIMIZERS})
    assert not missing, "presets name optimizers that are not registered (yet): " + "; ".join(
        f"{n}: run {label!r} needs {opt!r}" for n, label, opt in missing)


def test_preset_fields_are_consistent():
    assert "quickstart" in SMALL and len(PAPER_FILES) >= 40
    for n, p in CURRENT.items():
        assert p.name == n and p.scale in SCALES and p.metric in METRICS and p.paper and p.description, n
        assert p.runs and len({r.label for r in p.runs}) == len(p.runs), n
        if p.replica is not None:
            assert p.scale == "paper" and CURRENT[p.replica].scale == "small", n
        if p.scale == "paper" and p.dataset not in SHIPPED:
            assert p.replica is not None, f"{n}: a paper-scale preset on files needs a small replica"
        if p.scale == "small":
            assert p.dataset in SHIPPED, n
    for old, new in ALIASES.items():
        assert PRESETS[old] is PRESETS[new] and canonical(old) == new and new not in ALIASES
    for old in ("lsr1-fig1-digits", "lsr1-fig3-batch1000", "mblsr1-large-batch-digits", "sqn-poster-toy",
                "soc-lenet-digits", "ren-ch2-autoencoder-digits", "ren-ch4-cnn-digits", "ren-ch5-smw-autoencoder-digits"):
        assert old in PRESETS  # the names of earlier versions keep working


def _runs(name):
    return {r.label: r for r in PRESETS[name].runs}


def test_audit_named_errors_are_fixed():
    # [RD] §4.1.1 + Appendix (MNIST): L2 1e-4, lr 0.003, momentum 0.9, error count, BN case, an SGD-m run
    for name in ("lsr1-fig1", "lsr1-fig1-small", "lsr1-fig1-bn", "lsr1-fig1-bn-small"):
        p, runs = PRESETS[name], _runs(name)
        assert p.l2 == 1e-4 and p.metric == "test_errors" and p.epochs == 20
        assert runs["NAG"].hyperparameters["lr"] == runs["SGD"].hyperparameters["lr"] == 0.003
        assert runs["SGD-m"].optimizer == "momentum" and runs["SGD-m"].hyperparameters == {"batch_size": 20, "lr": 0.003,
                                                                                           "momentum": 0.9}
        assert runs["L-SR1-TR"].hyperparameters == {"batch_size": 400, "memory": 5}
        assert runs["L-BFGS (forget 5)"].hyperparameters["forget_every"] == 5
    assert PRESETS["lsr1-fig1"].model == "lenet5-mnist" and PRESETS["lsr1-fig1-bn"].model == "lenet5-mnist-bn"
    assert PRESETS["lsr1-fig1-bn-small"].model_kwargs == {"batchnorm": True}
    assert (PRESETS["lsr1-fig1"].init, PRESETS["lsr1-fig1"].init_std, len(PRESETS["lsr1-fig1"].seeds)) == ("gaussian", 0.1, 10)
    assert PRESETS["lsr1-fig2"].l2 == 1e-3 and _runs("lsr1-fig2")["NAG"].hyperparameters == {"batch_size": 96, "lr": 0.01,
                                                                                              "momentum": 0.9}
    # [REN] ch. 2: the ch. 2 algorithms, ReLU, RMSprop (β₂ = 0.9)
    for name in ("ren-ch2-mnist-small", "ren-ch2-mnist", "ren-ch2-faces-b100"):
        runs = _runs(name)
        assert PRESETS[name].model_kwargs == {"activation": "relu"}
        assert runs["K-BFGS"].hyperparameters["version"] == runs["K-BFGS(L)"].hyperparameters["version"] == "ch2"
        assert runs["KFAC"].hyperparameters["version"] == "ch2" and runs["KFAC"].hyperparameters["inv_freq"] == 20
        assert runs["RMSprop"].optimizer == "rmsprop" and runs["RMSprop"].hyperparameters["rho"] == 0.9
        assert runs["Adam"].hyperparameters["beta2"] == 0.9
    assert _runs("ren-ch2-mnist")["KFAC"].hyperparameters["lr"] == 1.0  # Table 2.5, MNIST: (1, 3)
    assert _runs("ren-ch2-mnist")["KFAC"].hyperparameters["damping"] == 3.0 and PRESETS["ren-ch2-mnist"].l2 == 1e-5
    # [REN] ch. 5: the classification MLPs with KFAC and SMW-NG-BD
    shapes = {"ren-ch5-mnist": ("mnist", (500,)), "ren-ch5-cifar10": ("cifar10", (400, 400)),
              "ren-ch5-webspam": ("webspam", (400, 400))}
    for name, (ds, hidden) in shapes.items():
        p, runs = PRESETS[name], _runs(name)
        assert p.dataset == ds and p.model == "mlp" and not p.autoencoder
        assert p.model_kwargs == {"hidden": hidden, "activation": "sigmoid"} and p.dataset_kwargs["standardize"] is True
        assert {"SMW-GN", "SMW-NG", "SMW-NG-BD", "KFAC", "HF", "HF (SMW rules)", "SGD"} == set(runs)
        assert runs["HF (SMW rules)"].hyperparameters["boost"] == 1.01 and runs["HF (SMW rules)"].hyperparameters["step_rule"] == "fixed"
        assert runs["SMW-NG-BD"].optimizer == "smw-ng-bd" and runs["KFAC"].hyperparameters["momentum"] == 0.0
    assert _runs("ren-ch5-cifar10")["SMW-GN"].hyperparameters == {"batch_size": 100, "curvature_batch": 50, "lr": 0.01}
    assert _runs("ren-ch5-webspam")["SGD"].hyperparameters["lr"] == 0.4 and PRESETS["ren-ch5-webspam"].epochs == 1
    # [REN] ch. 4 CNNs: T₁ = 10, T₂ = 100
    for name in ("ren-ch4-cnn-small", "ren-ch4-cifar10-vgg16"):
        for label in ("TNT", "KFAC", "Shampoo"):
            hp = _runs(name)[label].hyperparameters
            assert (hp["stat_freq"], hp["inv_freq"]) == (10, 100), (name, label)
    # [SOC]: its own SHG, SR1 with line search c = 0.1, GD fixed-lr on 20 %
    runs = _runs("soc-cifar10-lenet")
    assert [r.optimizer for r in runs.values()] == ["sgd", "shg", "gd", "soc-sr1", "sqn"]
    assert PRESETS["soc-cifar10-drn"].model == "resnet18" and PRESETS["mblsr1-fig2-mnist"].model == "netdnn"


@pytest.mark.parametrize("name", SMALL + PAPER_SHIPPED)
def test_small_presets_take_two_steps(name):
    """Every run of every preset on shipped data builds and takes two steps (finite θ)."""
    pre = PRESETS[name]
    ds, data = build_data(pre.dataset, data_dir=None, seed=0, n_train=None, n_test=None, device="cpu", dtype="float64",
                          autoencoder=pre.autoencoder, **pre.dataset_kwargs)
    model = build_model(pre.model, ds, **pre.model_kwargs)
    theta0 = model.init(0, scheme=pre.init, std=pre.init_std)
    get_optimizer_class("sgd")  # loads the registry
    missing = [r.optimizer for r in pre.runs if r.optimizer not in OPTIMIZERS]
    assert not missing, f"{name}: optimizers not registered: {missing}"
    for run in pre.runs:
        opt = make_optimizer(run.optimizer, dict(run.hyperparameters))
        prob = Problem(model, data.loss, data.X_train, data.y_train, pre.l2, seed=0)
        theta, state = theta0, opt.init(theta0)
        for _ in range(2):
            theta, state, _info = opt.step(theta, state, prob)
        assert np.all(np.isfinite(theta)), (name, run.label)


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL + PAPER_SHIPPED)
def test_small_presets_run_whole(name, tmp_path, request):
    """The whole small preset through the CLI (5 s to 2 min each on 2 cores, ~15 min in all): run only when
    asked for, ``pytest -m slow tests/test_presets_texts.py`` (the fast test above covers every run)."""
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("whole preset runs take ~15 min: select them with -m slow")
    assert main(["compare", "--preset", name, "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert (tmp_path / "r" / "summary.md").is_file()


# ------------------------------------------------------------------ format-true small files for the dry runs
def _mnist(d, r, n_train=10_000, n_test=50):
    from qnref.data.idx import write_idx  # the IDX writer (format tested in tests/data/test_idx.py)

    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(d / f"{prefix}-images-idx3-ubyte", r.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(d / f"{prefix}-labels-idx1-ubyte", r.integers(0, 10, n).astype(np.uint8))


def _cifar10(d, r, per_batch=2_000, n_test=50):
    b = d / "cifar-10-batches-py"
    b.mkdir()
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        obj = {b"data": r.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [int(v) for v in r.integers(0, 10, n)]}
        (b / name).write_bytes(pickle.dumps(obj, protocol=2))


def _cifar100(d, r, n_train=300, n_test=40):
    b = d / "cifar-100-binary"
    b.mkdir()
    for name, n in (("train.bin", n_train), ("test.bin", n_test)):
        rec = np.empty((n, 3074), np.uint8)
        rec[:, 0], rec[:, 1] = r.integers(0, 20, n), r.integers(0, 100, n)
        rec[:, 2:] = r.integers(0, 256, (n, 3072))
        (b / name).write_bytes(rec.tobytes())


def _faces(d, r, n=1_700):
    sio.savemat(str(d / "newfaces_rot_single.mat"), {"newfaces_single": r.standard_normal((625, n)).astype(np.float32)},
                format="5")


def _curves(d, r, n_train=1_000, n_test=40):
    sio.savemat(str(d / "digs3pts_1.mat"), {"bdata": r.random((n_train, 784)), "bdatatest": r.random((n_test, 784))},
                format="5")


def _webspam(d, r, n=420):
    lines = []
    for i in range(n):
        idx = np.flatnonzero(r.random(254) < 0.2) + 1
        lines.append(("+1" if i % 3 else "-1") + "".join(f" {j}:{r.random():.6f}" for j in idx))
    (d / "webspam_wc_normalized_unigram.svm").write_text("\n".join(lines) + "\n")


def _imbalanced_benchmark(d, r):
    """imbalanced-learn's x{ID}data.npz ('data' (N, F), 'label' in {−1, 1}) for the 27 sets, with the table's #F and
    enough rows for the real set's N/4 batch (qnref.data.imbalanced_sets)."""
    from qnref.data.imbalanced_sets import BENCHMARK

    for ident, n_s, n_f, ratio in BENCHMARK.values():
        rows = n_s if n_s <= 3000 else -(-n_s // 3) + 10
        n_min = max(4, round(rows / (ratio + 1)))
        label = np.r_[-np.ones(rows - n_min, np.int64), np.ones(n_min, np.int64)]
        np.savez(d / f"x{ident}data.npz", data=r.standard_normal((rows, n_f)).astype(np.float32), label=r.permutation(label))


_WRITERS = {"mnist": _mnist, "cifar10": _cifar10, "cifar100": _cifar100, "faces": _faces, "curves": _curves,
            "webspam": _webspam, "imbalanced-benchmark": _imbalanced_benchmark}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("published-formats")
    r = np.random.default_rng(0)
    for write in _WRITERS.values():
        write(d, r)
    return d


def test_every_paper_dataset_has_a_writer():
    assert {PRESETS[n].dataset for n in PAPER_FILES} <= set(_WRITERS)


@pytest.mark.parametrize("name", PAPER_FILES)
def test_paper_preset_dry_run(name, data_dir, capsys):
    code = main(["compare", "--preset", name, "--data-dir", str(data_dir), "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "dry run OK" in out and f"dry run of {name} (paper scale)" in out and PRESETS[name].paper in out
    for r in PRESETS[name].runs:
        assert r.label in out


def test_dry_run_refuses_bad_data(tmp_path, capsys):
    (tmp_path / "cifar-100-binary").mkdir()
    (tmp_path / "cifar-100-binary" / "train.bin").write_bytes(bytes(3074 * 3 + 5))
    (tmp_path / "cifar-100-binary" / "test.bin").write_bytes(bytes(3074))
    assert main(["compare", "--preset", "ren-ch3-cifar100-vgg16", "--data-dir", str(tmp_path), "--dry-run"]) == 2
    assert "truncated" in capsys.readouterr().err
    assert main(["compare", "--preset", "ren-ch5-webspam", "--data-dir", str(tmp_path), "--dry-run"]) == 2
    assert "webspam_wc_normalized_unigram.svm" in capsys.readouterr().err


def test_list_presets_shows_source_and_scale(capsys):
    assert main(["list", "presets"]) == 0
    out = capsys.readouterr().out
    for name in ("lsr1-fig1", "lsr1-fig1-small", "ren-ch5-webspam", "soc-cifar10-drn"):
        p = PRESETS[name]
        line = next(ln for ln in out.splitlines() if ln.split() and ln.split()[0] == name)
        assert p.scale in line and p.paper in line and p.metric in line
    assert "lsr1-fig1-digits" in out and "= lsr1-fig1-small" in out


def test_mb_small_replicas_carry_the_zeta_ablation_run():
    """docs/reproductions.md: ζ decides MB-LSR1 vs L-SSR1-TR at small scale; the replicas run both ζ."""
    from qnref.presets import PRESETS

    for name in ("mblsr1-fig2-mnist-small", "mblsr1-fig2-cifar10-small"):
        runs = {r.label: r for r in PRESETS[name].runs}
        assert runs["MB-LSR1 (ζ = 0)"].hyperparameters == {"batch_size": 32, "zeta": 0.0}
        assert "zeta" not in runs["MB-LSR1"].hyperparameters
    assert all(r.hyperparameters.get("zeta") is None for r in PRESETS["mblsr1-fig2-mnist"].runs)
