"""load_dataset: the shipped / generated sets, names, options, sizes and seeds."""
from __future__ import annotations

import numpy as np
import pytest

from qnref.data import DATASETS, Dataset, canonical_name, load_dataset, make_imbalanced, register_dataset
from qnref.data import registry


def test_registry_lists_all_sets_with_descriptions():
    assert set(DATASETS) >= {"digits", "mnist1d", "toy2class", "imbalanced", "mnist", "fashion-mnist", "cifar10"}
    assert all(isinstance(v, str) and len(v) > 20 and "\n" not in v for v in DATASETS.values())


@pytest.mark.parametrize(
    "typo, suggestion",
    [("mnsit", "mnist"), ("digit", "digits"), ("cifar1000", "cifar100"), ("cifar-1O", "cifar10"), ("fashion-mnst", "fashion-mnist"),
     ("toy2clas", "toy2class"), ("imbalance", "imbalanced")],
)
def test_unknown_name_suggests_closest(typo, suggestion):
    with pytest.raises(ValueError, match=rf"Did you mean '{suggestion}'\?"):
        load_dataset(typo)


def test_unknown_name_without_close_match_lists_valid_names():
    with pytest.raises(ValueError, match="Valid names: cifar10, cifar100, curves, digits, faces") as e:
        load_dataset("imagenet-21k")
    assert "Did you mean" not in str(e.value)


def test_aliases_and_case():
    assert canonical_name("Fashion_MNIST") == "fashion-mnist"
    assert canonical_name(" CIFAR-10 ") == "cifar10"
    assert canonical_name("mnist-1d") == "mnist1d"


def test_unknown_option_is_rejected_with_accepted_list():
    with pytest.raises(TypeError, match=r"accepts \['flat', 'standardize', 'test_size'\]"):
        load_dataset("digits", flatten=True)


# ------------------------------------------------------------------ digits
def test_digits_shapes_dtypes_range_and_split():
    ds = load_dataset("digits")
    assert isinstance(ds, Dataset)
    assert ds.X_train.shape == (1437, 1, 8, 8) and ds.X_test.shape == (360, 1, 8, 8)
    assert ds.input_shape == (1, 8, 8) and ds.n_classes == 10
    assert ds.task == "classification" and ds.loss == "softmax_ce"
    assert ds.X_train.dtype == np.float64 and ds.y_train.dtype == np.int64
    assert ds.X_train.min() == 0.0 and ds.X_train.max() == 1.0
    assert set(np.unique(ds.y_train)) == set(range(10))
    # stratified: each class's share of the test set matches its share of the whole set (±1)
    from sklearn.datasets import load_digits

    total = np.bincount(load_digits().target)
    expected = total * 360 / total.sum()
    assert np.all(np.abs(np.bincount(ds.y_test) - expected) < 1.0)
    assert np.array_equal(np.bincount(ds.y_train) + np.bincount(ds.y_test), total)


def test_digits_flat_and_determinism():
    a = load_dataset("digits", seed=1)
    b = load_dataset("digits", seed=1)
    c = load_dataset("digits", seed=2)
    assert np.array_equal(a.X_train, b.X_train) and np.array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_test, c.y_test)
    f = load_dataset("digits", seed=1, flat=True)
    assert f.input_shape == (64,) and f.X_train.shape == (1437, 64)
    assert np.array_equal(f.X_train, a.X_train.reshape(1437, 64))


def test_n_train_n_test_subsets_are_seeded_and_stratified():
    a = load_dataset("digits", n_train=200, n_test=50, seed=3)
    b = load_dataset("digits", n_train=200, n_test=50, seed=3)
    assert a.n_train == 200 and a.n_test == 50
    assert np.array_equal(a.X_train, b.X_train)
    assert np.bincount(a.y_train).tolist() == [20] * 10
    with pytest.raises(ValueError, match="n_train"):
        load_dataset("digits", n_train=5000)


# ------------------------------------------------------------------ toy2class (sampled quasi-Newton poster)
def test_toy2class_is_the_papers_sin_problem():
    ds = load_dataset("toy2class")
    assert ds.X_train.shape == (100, 2) and ds.input_shape == (2,) and ds.n_classes == 2
    assert np.bincount(ds.y_train).tolist() == [50, 50]
    t = np.arange(50) / 50
    upper, lower = ds.X_train[ds.y_train == 1], ds.X_train[ds.y_train == 0]
    assert np.allclose(upper, np.stack([t, np.sin(8 * t) + 0.8], 1))
    assert np.allclose(lower, np.stack([t, np.sin(8 * t) - 0.8], 1))
    # test split: the same curves at the midpoints, disjoint from the training points
    assert np.allclose(ds.X_test[:50, 0], t + 0.01)
    # noise-free: the seed does not matter; with noise it does, deterministically
    assert np.array_equal(load_dataset("toy2class", seed=5).X_train, ds.X_train)
    n1 = load_dataset("toy2class", noise=0.1, seed=5)
    assert np.array_equal(n1.X_train, load_dataset("toy2class", noise=0.1, seed=5).X_train)
    assert not np.allclose(n1.X_train, ds.X_train)
    assert np.array_equal(n1.X_train[:, 0], ds.X_train[:, 0])


# ------------------------------------------------------------------ imbalanced (MB-LSR1)
@pytest.mark.parametrize("ratio", [0.1, 0.05, 0.3])
def test_imbalanced_ratio_sizes_and_targets(ratio):
    ds = load_dataset("imbalanced", positive_ratio=ratio, n_train=800, n_test=200, n_features=5)
    assert ds.task == "binary" and ds.loss == "sigmoid_ce" and ds.n_classes == 2 and ds.n_outputs == 1
    assert ds.X_train.shape == (800, 5) and ds.y_train.shape == (800, 1) and ds.y_train.dtype == np.float64
    assert set(np.unique(ds.y_train)) == {0.0, 1.0}
    n_pos = round(ratio * 1000)
    assert ds.y_train.sum() + ds.y_test.sum() == n_pos
    assert abs(ds.y_test.sum() - ratio * 200) <= 1  # stratified split keeps the ratio


def test_imbalanced_deterministic_and_learnable():
    a = load_dataset("imbalanced", seed=11)
    b = load_dataset("imbalanced", seed=11)
    c = load_dataset("imbalanced", seed=12)
    assert np.array_equal(a.X_train, b.X_train) and np.array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.X_train, c.X_train)
    # the positives are not pure noise: their mean differs from the negatives' mean
    pos = a.X_train[a.y_train[:, 0] == 1].mean(0)
    neg = a.X_train[a.y_train[:, 0] == 0].mean(0)
    assert np.linalg.norm(pos - neg) > 0.5


def test_make_imbalanced_argument_errors():
    with pytest.raises(ValueError, match="positive_ratio"):
        make_imbalanced(100, positive_ratio=1.2)
    with pytest.raises(ValueError, match="at least 2"):
        make_imbalanced(100, positive_ratio=0.001)


# ------------------------------------------------------------------ file-based sets need a folder
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_file_sets_without_data_dir_explain_how(name, monkeypatch):
    monkeypatch.delenv("QNREF_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_dataset(name)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_missing_data_dir_is_named(name, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist"):
        load_dataset(name, data_dir=missing)


def test_register_custom_loader():
    def loader(*, seed=0, scale=1.0):
        X = np.arange(20.0)[:, None] * scale
        return Dataset.from_arrays("line", X, X * 2, task="regression", n_test=5, seed=seed)

    register_dataset("line-test", loader, "a line, for tests")
    try:
        ds = load_dataset("line-test", scale=2.0, n_train=10)
        assert ds.n_train == 10 and ds.task == "regression" and ds.loss == "mse"
        with pytest.raises(ValueError, match="already registered"):
            register_dataset("line-test", loader, "again")
    finally:
        registry._LOADERS.pop("line-test")
        registry.DATASETS.pop("line-test")
