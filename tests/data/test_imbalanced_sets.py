"""The reader of the 27 imbalanced-learn benchmark sets ([MB] §5.1): ``x{ID}data.npz`` files with arrays ``data``
(N, F) and ``label`` (N,) in {−1, 1}, written here with ``np.savez`` (the published format) into tmp_path.

Oracles: the rows and labels written (each row carries its own index in column 0, so the split is checked row by
row against the file), the label map −1 → 0 / 1 → 1 counted by hand, the stratified 80/20 sizes computed here
from the class counts, and imbalanced-learn's own table (ID order, file names).
"""
import numpy as np
import pytest

from qnref.data import load_dataset
from qnref.data.imbalanced_sets import BENCHMARK, NAMES, file_name, find_file, read_benchmark_npz, split_sizes


def _write(folder, problem, n_maj=40, n_min=6, n_features=None, rng=None, **extra):
    """A file in the published format: features (index in column 0), labels −1 (majority) / 1 (minority)."""
    rng = rng or np.random.default_rng(0)
    f = BENCHMARK[problem][2] if n_features is None else n_features
    n = n_maj + n_min
    X = rng.standard_normal((n, f))
    X[:, 0] = np.arange(n)
    label = np.array([-1] * n_maj + [1] * n_min)
    perm = rng.permutation(n)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"x{BENCHMARK[problem][0]}data.npz"
    np.savez(path, data=X[perm], label=label[perm], **extra)
    return path, X[perm], label[perm]


def test_table_is_imbalanced_learns():
    assert NAMES[:5] == ("ecoli", "optical_digits", "satimage", "pen_digits", "abalone")
    assert len(NAMES) == 27 and NAMES[-1] == "abalone_19"
    assert [BENCHMARK[n][0] for n in NAMES] == list(range(1, 28))
    assert file_name("ecoli") == "x1data.npz" and file_name("abalone_19") == "x27data.npz"
    assert BENCHMARK["protein_homo"] == (26, 145751, 74, 111) and BENCHMARK["ecoli"][1:3] == (336, 7)


def test_reads_labels_and_split(tmp_path):
    path, X, label = _write(tmp_path, "ecoli")
    Xr, yr = read_benchmark_npz(path)
    np.testing.assert_array_equal(Xr, X)
    np.testing.assert_array_equal(yr, (label == 1).astype(np.int64))
    assert yr.sum() == 6 and yr.dtype == np.int64
    ds = load_dataset("imbalanced-benchmark", data_dir=tmp_path, problem="ecoli", seed=3)
    assert (ds.task, ds.loss, ds.n_classes, ds.input_shape) == ("binary", "sigmoid_ce", 2, (7,))
    assert ds.y_train.shape == (len(ds.X_train), 1)
    # stratified 80/20: 46 rows → 9 test (round(9.2)); per class 40·0.2 = 8, 6·0.2 = 1.2 → 8 + 1
    assert (len(ds.X_train), len(ds.X_test)) == split_sizes(46) == (37, 9)
    assert ds.y_test.sum() == 1 and ds.y_train.sum() == 5
    # every row lands once, with its own label (column 0 = row index in the written order)
    rows = np.concatenate([ds.X_train[:, 0], ds.X_test[:, 0]]).astype(int)
    labs = np.concatenate([ds.y_train[:, 0], ds.y_test[:, 0]])
    assert sorted(rows) == list(range(46))
    by_index = {int(X[i, 0]): int(label[i] == 1) for i in range(46)}
    assert all(by_index[r] == int(v) for r, v in zip(rows, labs))
    # seeded: the same seed, the same split; another seed, another split
    again = load_dataset("imbalanced-benchmark", data_dir=tmp_path, problem="ecoli", seed=3)
    np.testing.assert_array_equal(again.X_test, ds.X_test)
    other = load_dataset("imbalanced-benchmark", data_dir=tmp_path, problem="ecoli", seed=4)
    assert not np.array_equal(np.sort(other.X_test[:, 0]), np.sort(ds.X_test[:, 0]))


def test_zenodo_subfolder_and_standardize(tmp_path):
    _write(tmp_path / "zenodo", "yeast_me2", rng=np.random.default_rng(1))
    assert find_file(tmp_path, "yeast_me2") == tmp_path / "zenodo" / "x22data.npz"
    ds = load_dataset("imbalanced-benchmark", data_dir=tmp_path, problem="yeast_me2", standardize=True)
    np.testing.assert_allclose(ds.X_train.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(ds.X_train.std(0), 1, rtol=1e-10)


@pytest.mark.parametrize("problem", ["ECOLI", "nope", None, 3])
def test_bad_problem(tmp_path, problem):
    _write(tmp_path, "ecoli")
    if problem == "ECOLI":  # names are case-insensitive
        assert load_dataset("imbalanced-benchmark", data_dir=tmp_path, problem=problem).info["problem"] == "ecoli"
        return
    with pytest.raises(ValueError, match="problem"):
        load_dataset("imbalanced-benchmark", data_dir=tmp_path, problem=problem)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="x13data.npz"):
        load_dataset("imbalanced-benchmark", data_dir=tmp_path, problem="libras_move")


def test_refuses_pickle_corrupt_and_malformed(tmp_path):
    path, X, _ = _write(tmp_path, "ecoli")
    obj = np.empty(46, dtype=object)
    obj[:] = [1] * 46
    np.savez(path, data=X, label=obj)  # object array: needs pickle
    with pytest.raises(ValueError, match=r"x1data\.npz.*pickle"):
        read_benchmark_npz(path)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=r"x1data\.npz"):
        read_benchmark_npz(path)
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match=r"x1data\.npz"):
        load_dataset("imbalanced-benchmark", data_dir=tmp_path, problem="ecoli")
    bad = {
        "missing": dict(data=X),
        "labels": dict(data=X, label=np.r_[np.zeros(40), np.ones(6)]),  # 0/1 is not the published −1/1
        "one class": dict(data=X, label=-np.ones(46)),
        "length": dict(data=X, label=np.r_[-np.ones(40), np.ones(5)]),
        "shape": dict(data=X[:, 0], label=np.r_[-np.ones(40), np.ones(6)]),
        "nan": dict(data=np.where(X > 2, np.nan, X), label=np.r_[-np.ones(40), np.ones(6)]),
        "text": dict(data=X.astype(str), label=np.r_[-np.ones(40), np.ones(6)]),
    }
    for why, arrays in bad.items():
        np.savez(path, **arrays)
        with pytest.raises(ValueError, match=r"x1data\.npz") as exc:
            read_benchmark_npz(path)
        assert str(path) in str(exc.value), why


def test_feature_count_mismatch_warns(tmp_path):
    _write(tmp_path, "ecoli", n_features=5)
    with pytest.warns(UserWarning, match="lists 7"):
        load_dataset("imbalanced-benchmark", data_dir=tmp_path, problem="ecoli")
