"""The presets of issue 20's last two experiments: [MB] §5.1 Fig. 1 at paper scale (one preset per imbalanced-learn
benchmark set, ``mblsr1-fig1-<set>``) and thesis Table 3.8 (``ren-ch3-table3.8-<set>`` and its ``-small`` replica).

Oracles: the texts' numbers typed here from the texts (thesis Table 3.5 L1549-1559, Table 3.8 L1656-1662,
[MB] §5.1 L411-414's seven batch sizes, imbalanced-learn's sample counts), not read from qnref's tables; the
K-BFGS ablation settings against ``qnref.optim.kbfgs.VARIANTS``; the dry runs on files written in the published
formats (``x{ID}data.npz`` via ``np.savez``; IDX and MAT-files via the writers of tests/test_presets_texts.py).
"""
import math

import numpy as np
import pytest
from test_presets_texts import _curves, _faces, _mnist  # the format-true writers of the other dry runs

from qnref.cli import build_data, build_model, main, make_optimizer
from qnref.optim.base import Problem
from qnref.optim.kbfgs import VARIANTS
from qnref.optim.registry import OPTIMIZERS, get_optimizer_class
from qnref.presets import PRESETS

# imbalanced-learn's table (fetch_datasets): name → (ID, #S, #F, minority share ≈ 1 / (ratio + 1))
IMB = {"ecoli": (1, 336, 7, 8.6), "optical_digits": (2, 5620, 64, 9.1), "satimage": (3, 6435, 36, 9.3),
       "pen_digits": (4, 10992, 16, 9.4), "abalone": (5, 4177, 10, 9.7), "sick_euthyroid": (6, 3163, 42, 9.8),
       "spectrometer": (7, 531, 93, 11), "car_eval_34": (8, 1728, 21, 12), "isolet": (9, 7797, 617, 12),
       "us_crime": (10, 1994, 100, 12), "yeast_ml8": (11, 2417, 103, 13), "scene": (12, 2407, 294, 13),
       "libras_move": (13, 360, 90, 14), "thyroid_sick": (14, 3772, 52, 15), "coil_2000": (15, 9822, 85, 16),
       "arrhythmia": (16, 452, 278, 17), "solar_flare_m0": (17, 1389, 32, 19), "oil": (18, 937, 49, 22),
       "car_eval_4": (19, 1728, 21, 26), "wine_quality": (20, 4898, 11, 26), "letter_img": (21, 20000, 16, 26),
       "yeast_me2": (22, 1484, 8, 28), "webpage": (23, 34780, 300, 33), "ozone_level": (24, 2536, 72, 34),
       "mammography": (25, 11183, 6, 42), "protein_homo": (26, 145751, 74, 111), "abalone_19": (27, 4177, 10, 130)}
FIG1 = {s: f"mblsr1-fig1-{s.replace('_', '-')}" for s in IMB}
T38 = {s: f"ren-ch3-table3.8-{s}" for s in ("mnist", "faces", "curves")}
# Table 3.5 (lr, damping): K-BFGS and K-BFGS-20 per set
TABLE35 = {"mnist": ((0.03, 0.3), (0.01, 0.1)), "faces": ((0.03, 1.0), (0.01, 0.3)), "curves": ((0.03, 0.3), (0.01, 0.03))}
NEW = sorted(FIG1.values()) + sorted(T38.values()) + ["ren-ch3-table3.8-small"]


def _n_train(n):  # our 80/20 split: round(0.2·n) test rows
    return n - int(round(0.2 * n))


def test_every_new_preset_exists_and_is_consistent():
    get_optimizer_class("sgd")  # loads the registry
    for name in NEW:
        p = PRESETS[name]
        assert p.name == name and len({r.label for r in p.runs}) == len(p.runs)
        if p.scale == "paper":
            assert p.replica in PRESETS and PRESETS[p.replica].scale == "small"
        for r in p.runs:  # every optimizer is registered and takes its settings
            assert r.optimizer in OPTIMIZERS, (name, r.label)
            make_optimizer(r.optimizer, dict(r.hyperparameters))


@pytest.mark.parametrize("problem", sorted(IMB))
def test_mb_fig1_runs_are_the_texts(problem):
    p = PRESETS[FIG1[problem]]
    assert (p.dataset, p.dataset_kwargs["problem"], p.scale, p.metric) == ("imbalanced-benchmark", problem, "paper", "test_acc")
    assert p.model == "mlp" and p.model_kwargs == {"hidden": (50,), "activation": "tanh"}
    assert p.replica == "mblsr1-fig1-small"
    n = _n_train(IMB[problem][1])
    batches = [16, 32, 64, 128, n // 10, n // 8, n // 4]
    mb = [r for r in p.runs if r.optimizer == "mb-lsr1"]
    sgd = [r for r in p.runs if r.optimizer == "momentum"]
    assert len(p.runs) == 14 and [r.hyperparameters["batch_size"] for r in mb] == batches
    assert [r.hyperparameters["batch_size"] for r in sgd] == batches
    assert all(r.hyperparameters == {"batch_size": r.hyperparameters["batch_size"]} for r in mb)  # MB-LSR1 defaults
    assert all(r.hyperparameters["momentum"] == 0.9 for r in sgd)


def test_table38_runs_are_the_thesis():
    assert VARIANTS["table3.8-#1-off"] == {"version": "ch3", "damping_scheme": "dd"}
    assert VARIANTS["table3.8-#2-off"] == {"version": "ch3", "hessian_action": "moving-average"}
    for s, name in T38.items():
        p = PRESETS[name]
        assert (p.scale, p.metric, p.l2, len(p.seeds), p.replica) == ("paper", "train_loss", 0.0, 5, "ren-ch3-table3.8-small")
        assert p.max_time == {"mnist": 500.0, "faces": 2000.0, "curves": 500.0}[s] and p.model_kwargs == {"activation": "relu"}
        runs = {r.label: r for r in p.runs}
        assert list(runs) == ["K-BFGS", "K-BFGS (#1 off)", "K-BFGS (#2 off)", "K-BFGS-20"]  # Table 3.8's four rows
        (kl, kd), (tl, td) = TABLE35[s]
        assert runs["K-BFGS"].hyperparameters == {"batch_size": 1000, "lr": kl, "damping": kd}
        assert runs["K-BFGS (#1 off)"].hyperparameters == {"batch_size": 1000, "lr": kl, "damping": kd,
                                                           **VARIANTS["table3.8-#1-off"]}
        assert runs["K-BFGS (#2 off)"].hyperparameters == {"batch_size": 1000, "lr": kl, "damping": kd,
                                                           **VARIANTS["table3.8-#2-off"]}
        assert runs["K-BFGS-20"].hyperparameters == {"batch_size": 1000, "version": "ch2", "lr": tl, "damping": td}
        assert all(r.optimizer == "kbfgs" for r in p.runs)
    small = PRESETS["ren-ch3-table3.8-small"]
    assert small.dataset == "digits" and small.autoencoder and small.scale == "small"
    assert [r.hyperparameters["batch_size"] for r in small.runs] == [100] * 4


def test_table38_ablations_differ_from_kbfgs():
    """The three ablation runs are different algorithms: two steps from one θ₀ give three different θ."""
    pre = PRESETS["ren-ch3-table3.8-small"]
    ds, data = build_data(pre.dataset, data_dir=None, seed=0, n_train=None, n_test=None, device="cpu", dtype="float64",
                          autoencoder=pre.autoencoder, **pre.dataset_kwargs)
    model = build_model(pre.model, ds, **pre.model_kwargs)
    theta0 = model.init(0, scheme=pre.init, std=pre.init_std)
    out = {}
    for run in pre.runs[:3]:  # same (lr, λ): K-BFGS, #1 off, #2 off
        opt = make_optimizer(run.optimizer, dict(run.hyperparameters))
        prob = Problem(model, data.loss, data.X_train, data.y_train, pre.l2, seed=0)
        theta, state = theta0, opt.init(theta0)
        for _ in range(2):
            theta, state, _ = opt.step(theta, state, prob)
        assert np.all(np.isfinite(theta)), run.label
        out[run.label] = np.asarray(theta)
    labels = list(out)
    for i in range(3):
        for j in range(i + 1, 3):
            d = np.linalg.norm(out[labels[i]] - out[labels[j]]) / np.linalg.norm(out[labels[i]] - np.asarray(theta0))
            assert d > 1e-6, (labels[i], labels[j], d)


def _write_imbalanced(d, problem, rng):
    """A file in the published format with the table's #F and enough rows for the N/4 batch of the real set."""
    ident, n_s, n_f, ratio = IMB[problem]
    rows = n_s if n_s <= 3000 else math.ceil(n_s / 3) + 10
    n_min = max(4, round(rows / (ratio + 1)))
    label = np.r_[-np.ones(rows - n_min, np.int64), np.ones(n_min, np.int64)]
    np.savez(d / f"x{ident}data.npz", data=rng.standard_normal((rows, n_f)).astype(np.float32), label=rng.permutation(label))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("published-formats-h")
    r = np.random.default_rng(0)
    for write in (_mnist, _faces, _curves):
        write(d, r)
    for problem in IMB:
        _write_imbalanced(d, problem, r)
    return d


@pytest.mark.parametrize("name", sorted(FIG1.values()) + sorted(T38.values()))
def test_paper_preset_dry_run(name, data_dir, capsys):
    code = main(["compare", "--preset", name, "--data-dir", str(data_dir), "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "dry run OK" in out and f"dry run of {name} (paper scale)" in out
    for r in PRESETS[name].runs:
        assert r.label in out


def test_dry_run_refuses_a_missing_set(tmp_path, capsys):
    assert main(["compare", "--preset", "mblsr1-fig1-ecoli", "--data-dir", str(tmp_path), "--dry-run"]) == 2
    assert "x1data.npz" in capsys.readouterr().err
