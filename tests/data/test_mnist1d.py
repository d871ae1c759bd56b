"""MNIST-1D: generated offline by the mnist1d package, cached atomically in QNREF_CACHE."""
from __future__ import annotations

import random

import numpy as np
import pytest

from qnref.data import load_dataset, mnist1d_arrays
from qnref.data import registry


def test_mnist1d_shapes_and_standard_split(mnist1d_env):
    ds = load_dataset("mnist1d")
    assert ds.X_train.shape == (4000, 40) and ds.X_test.shape == (1000, 40)
    assert ds.input_shape == (40,) and ds.n_classes == 10 and ds.loss == "softmax_ce"
    assert ds.X_train.dtype == np.float64 and ds.y_train.dtype == np.int64
    assert set(np.unique(ds.y_train)) == set(range(10))
    both = np.concatenate([ds.X_train, ds.X_test])
    assert abs(both.mean()) < 1e-6 and abs(both.std() - 1) < 1e-6  # the generator standardises
    chan = load_dataset("mnist1d", flat=False)
    assert chan.input_shape == (1, 40) and np.array_equal(chan.X_train[:, 0], ds.X_train)


def test_mnist1d_matches_package_generator_defaults(mnist1d_env):
    """Same arrays as mnist1d.data.make_dataset with its default args (first rows checked)."""
    _, arrays = mnist1d_env
    from mnist1d.data import get_dataset_args

    args = get_dataset_args()
    assert args.num_samples * args.train_split == len(arrays["X_train"]) == 4000
    assert args.final_seq_length == arrays["X_train"].shape[1]


def test_mnist1d_is_read_from_cache(mnist1d_env, monkeypatch):
    root, arrays = mnist1d_env
    files = list(root.glob("mnist1d-*.npz"))
    assert len(files) == 1
    assert not list(root.glob("*.tmp"))  # the atomic write left no temporary file

    def boom(*a, **k):
        raise AssertionError("generator called although a cache exists")

    monkeypatch.setattr("mnist1d.data.make_dataset", boom)
    a = mnist1d_arrays()
    assert np.array_equal(a["X_train"], arrays["X_train"]) and np.array_equal(a["y_test"], arrays["y_test"])


def _fake_generator(calls):
    def make_dataset(args):
        calls.append(1)
        np.random.seed(args.seed)
        random.seed(args.seed)
        x = np.random.randn(10, 40)
        return {"x": x[:8], "x_test": x[8:], "y": np.arange(8) % 10, "y_test": np.arange(2)}

    class Args:
        seed = 42
        final_seq_length = 40

    return lambda: (make_dataset, lambda: Args(), "fake")


def test_cache_written_atomically_and_corrupt_cache_regenerated(empty_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(registry, "_mnist1d_generator", _fake_generator(calls))
    a = mnist1d_arrays()
    (path,) = empty_cache.glob("mnist1d-fake-*.npz")
    assert calls == [1] and not list(empty_cache.glob("*.tmp"))
    b = mnist1d_arrays()
    assert calls == [1] and np.array_equal(a["X_train"], b["X_train"])
    path.write_bytes(b"garbage, not an npz")
    c = mnist1d_arrays()
    assert calls == [1, 1] and np.array_equal(a["X_train"], c["X_train"])
    assert np.load(path)["X_train"].shape == (8, 40)


def test_generation_restores_global_rng_state(empty_cache, monkeypatch):
    monkeypatch.setattr(registry, "_mnist1d_generator", _fake_generator([]))
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    mnist1d_arrays(use_cache=False)
    assert (np.random.random(), random.random()) == expected


def test_failed_write_cleans_up_temp_file(empty_cache, monkeypatch):
    monkeypatch.setattr(registry, "_mnist1d_generator", _fake_generator([]))

    def broken_savez(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(registry.np, "savez", broken_savez)
    with pytest.warns(UserWarning, match="disk full"):
        out = mnist1d_arrays()
    assert out["X_train"].shape == (8, 40)
    assert list(empty_cache.iterdir()) == []


def test_missing_mnist1d_package_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """Without the package (and no cache) the CLI prints one line with the install hint, exit 2."""
    import sys

    from qnref.cli import main

    monkeypatch.setenv("QNREF_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "mnist1d", None)  # import mnist1d → ImportError
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match="pip install mnist1d"):
        load_dataset("mnist1d")
    code = main(["train", "--model", "mlp", "--optimizer", "sgd", "--dataset", "mnist1d", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install mnist1d" in err, err
