"""Dataset container, splits, subsets, conversions and train-only scaling."""
from __future__ import annotations

import numpy as np
import pytest

from qnref import backend
from qnref.data import (
    Dataset,
    fit_minmax,
    fit_standardizer,
    stratified_indices,
    train_test_split,
)


def _toy(n=60, d=3, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = np.arange(n) % classes
    return X, y.astype(np.int64)


def _ds(**kw):
    X, y = _toy()
    return Dataset.from_arrays("toy", X, y, n_test=15, seed=0, **kw)


# ------------------------------------------------------------------ splits
def test_train_test_split_exact_sizes_disjoint_and_complete():
    X, y = _toy(n=101, classes=4)
    ids = np.arange(101)
    Xtr, ytr, Xte, yte = train_test_split(ids, y, n_test=20, seed=1)
    assert len(Xte) == 20 and len(Xtr) == 81
    assert sorted(np.concatenate([Xtr, Xte]).tolist()) == list(range(101))
    assert np.array_equal(y[Xtr], ytr) and np.array_equal(y[Xte], yte)


def test_train_test_split_stratified_proportions():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    _, _, _, yte = train_test_split(np.arange(100), y, test_fraction=0.2, seed=3)
    assert np.bincount(yte).tolist() == [10, 6, 4]
    # unequal quotas are rounded by largest remainder, the total stays exact
    y = np.repeat([0, 1, 2], [34, 33, 33])
    _, _, _, yte = train_test_split(np.arange(100), y, n_test=10, seed=0)
    counts = np.bincount(yte, minlength=3)
    assert counts.sum() == 10 and counts.max() - counts.min() <= 1


def test_split_deterministic_by_seed():
    X, y = _toy()
    a = train_test_split(X, y, n_test=10, seed=7)
    b = train_test_split(X, y, n_test=10, seed=7)
    c = train_test_split(X, y, n_test=10, seed=8)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)
    assert not np.array_equal(a[2], c[2])


def test_split_argument_errors():
    X, y = _toy()
    with pytest.raises(ValueError, match="exactly one"):
        train_test_split(X, y, n_test=3, test_fraction=0.1)
    with pytest.raises(ValueError, match="n_test"):
        train_test_split(X, y, n_test=60)
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(X, y, test_fraction=1.5)
    with pytest.raises(ValueError, match="rows"):
        train_test_split(X, y[:-1], n_test=3)
    with pytest.raises(ValueError, match="seed"):
        train_test_split(X, y, n_test=3, seed=None)


def test_stratified_indices_distinct_and_balanced():
    y = np.repeat(np.arange(5), 40)
    idx = stratified_indices(y, 50, seed=2)
    assert len(np.unique(idx)) == 50
    assert np.bincount(y[idx]).tolist() == [10] * 5


# ------------------------------------------------------------------ construction and validation
def test_construction_checks_shapes_and_task():
    X, y = _toy()
    with pytest.raises(ValueError, match="input_shape"):
        Dataset("t", X, y, X, y, input_shape=(4,), n_classes=3, task="classification", loss="softmax_ce")
    with pytest.raises(ValueError, match="rows"):
        Dataset("t", X, y[:-1], X, y, input_shape=(3,), n_classes=3, task="classification", loss="softmax_ce")
    with pytest.raises(ValueError, match="task"):
        Dataset("t", X, y, X, y, input_shape=(3,), n_classes=3, task="ranking", loss="softmax_ce")
    with pytest.raises(ValueError, match="does not fit"):
        Dataset("t", X, y, X, y, input_shape=(3,), n_classes=3, task="classification", loss="mse")
    with pytest.raises(ValueError, match="integer labels"):
        Dataset("t", X, y.astype(float), X, y, input_shape=(3,), n_classes=3, task="classification",
                loss="softmax_ce")
    with pytest.raises(ValueError, match=r"\(N, 1\)"):
        Dataset("t", X, y.astype(float), X, y.astype(float), input_shape=(3,), n_classes=2, task="binary",
                loss="sigmoid_ce")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_validate_rejects_nonfinite_inputs(bad):
    X, y = _toy()
    X[5, 1] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        Dataset.from_arrays("bad", X, y, n_test=10)


def test_validate_rejects_nonfinite_targets_and_bad_labels():
    X, y = _toy()
    t = np.ones((len(X), 2))
    t[3, 0] = np.nan
    ds = Dataset("r", X, t, X, np.ones((len(X), 2)), input_shape=(3,), n_classes=None, task="regression",
                 loss="mse")
    with pytest.raises(ValueError, match="y_train contains 1 NaN/Inf"):
        ds.validate()
    with pytest.raises(ValueError, match="labels span"):
        Dataset("c", X, y, X, y + 1, input_shape=(3,), n_classes=3, task="classification",
                loss="softmax_ce").validate()


# ------------------------------------------------------------------ conversions
def test_to_dtypes_on_cpu():
    ds = _ds()
    f32 = ds.to("cpu", "float32")
    assert f32.X_train.dtype == np.float32 and f32.X_test.dtype == np.float32
    assert f32.y_train.dtype == np.int64
    assert ds.X_train.dtype == np.float64  # the original is unchanged
    b = Dataset.from_arrays("b", *_toy(classes=2), task="binary", n_test=10)  # labels (N,) → (N, 1) floats
    assert b.y_train.shape == (50, 1) and b.y_train.dtype == np.float64 and b.n_classes == 2
    b32 = b.to("cpu", "float32")
    assert b32.y_train.dtype == np.float32 and b32.y_train.shape == (50, 1)
    with pytest.raises(backend.BackendError):
        ds.to("cpu", "int32")


@pytest.mark.gpu
def test_to_gpu_and_back():
    if not backend.gpu_available():
        pytest.skip("no usable CUDA device")
    ds = _ds().to("gpu", "float32")
    assert backend.is_cupy_array(ds.X_train) and ds.device == "gpu"
    assert str(ds.y_train.dtype) == "int64"
    sub = ds.subset(10, 5, seed=0)
    assert sub.n_train == 10
    back = sub.to("cpu", "float64")
    assert isinstance(back.X_train, np.ndarray)


def test_subset_prefix_and_seeded():
    ds = _ds()
    p = ds.subset(10, 5)
    assert np.array_equal(p.X_train, ds.X_train[:10]) and np.array_equal(p.y_test, ds.y_test[:5])
    a, b = ds.subset(12, seed=4), ds.subset(12, seed=4)
    assert np.array_equal(a.X_train, b.X_train) and a.n_test == ds.n_test
    assert np.bincount(a.y_train).tolist() == [4, 4, 4]  # stratified
    assert not np.array_equal(a.X_train, ds.subset(12, seed=5).X_train)
    with pytest.raises(ValueError, match="n_train"):
        ds.subset(0)
    with pytest.raises(ValueError, match="n_test"):
        ds.subset(None, ds.n_test + 1)


def test_flatten_and_autoencoder():
    rng = np.random.default_rng(0)
    X = rng.random((40, 1, 4, 4))
    y = np.arange(40) % 2
    ds = Dataset.from_arrays("img", X, y, n_test=8)
    assert ds.input_shape == (1, 4, 4)
    flat = ds.flatten()
    assert flat.input_shape == (16,) and flat.X_train.shape == (32, 16)
    assert np.array_equal(flat.X_train, ds.X_train.reshape(32, 16))
    ae = ds.as_autoencoder()
    assert ae.task == "autoencoder" and ae.n_classes is None and ae.loss == "sigmoid_ce"
    assert ae.input_shape == (1, 4, 4) and ae.y_train.shape == (32, 16)
    assert np.array_equal(ae.y_train, ds.X_train.reshape(32, 16))
    assert ae.n_outputs == 16
    ae.validate()
    # inputs outside [0, 1] → mse
    assert ds.standardized().as_autoencoder().loss == "mse"


def test_as_classification_from_binary():
    X, y = _toy(classes=2)
    b = Dataset("b", X, y[:, None].astype(float), X[:4], y[:4, None].astype(float), input_shape=(3,),
                n_classes=2, task="binary", loss="sigmoid_ce")
    assert b.n_outputs == 1
    c = b.as_classification()
    assert c.task == "classification" and c.loss == "softmax_ce" and c.n_outputs == 2
    assert c.y_train.dtype == np.int64 and np.array_equal(c.y_train, y)
    with pytest.raises(ValueError, match="binary"):
        c.as_autoencoder().as_classification()


# ------------------------------------------------------------------ scaling from the training split only
def test_standardized_uses_train_statistics_only():
    ds = _ds()
    shifted = ds.replace(X_test=ds.X_test + 100.0)
    s = shifted.standardized()
    assert np.allclose(s.X_train.mean(0), 0, atol=1e-12) and np.allclose(s.X_train.std(0), 1)
    # test inputs are transformed with the train mean/std: the +100 shift survives
    assert np.all(s.X_test.mean(0) > 50)
    sc = s.info["input_scaler"]
    assert np.allclose(sc.inverse(s.X_test), shifted.X_test)


def test_standardizer_constant_feature_and_channels():
    X = np.zeros((10, 3))
    X[:, 1] = np.arange(10)
    sc = fit_standardizer(X)
    Z = sc(X)
    assert np.all(np.isfinite(Z)) and np.allclose(Z[:, 0], 0)
    rng = np.random.default_rng(0)
    imgs = rng.random((8, 3, 4, 4)) * np.array([1.0, 10.0, 100.0])[:, None, None]
    sc = fit_standardizer(imgs, per="channel")
    assert sc.shift.shape == (3, 1, 1)
    Z = sc(imgs)
    assert np.allclose(Z.mean(axis=(0, 2, 3)), 0) and np.allclose(Z.std(axis=(0, 2, 3)), 1)
    with pytest.raises(ValueError, match="channel"):
        fit_standardizer(X, per="channel")


def test_minmax_scaled_range():
    ds = _ds()
    m = ds.minmax_scaled()
    assert m.X_train.min() == pytest.approx(0.0) and m.X_train.max() == pytest.approx(1.0)
    m2 = fit_minmax(ds.X_train, per="feature", feature_range=(-1, 1))(ds.X_train)
    assert np.allclose(m2.min(0), -1) and np.allclose(m2.max(0), 1)
