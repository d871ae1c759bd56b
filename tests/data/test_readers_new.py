"""Readers of CIFAR-100 (binary version), CURVES / FACES (MATLAB level-5 files) and webspam (LIBSVM text).

Every test writes small files in the published format itself (bytes laid out by hand, scipy.io.savemat for the
MAT-files, text lines for LIBSVM) into tmp_path; nothing is downloaded or committed. The oracles are independent
of the readers: pixel (c, h, w) of a CIFAR-100 record is read back from the byte offset 2 + 1024c + 32h + w, a
LIBSVM file is compared with scikit-learn's own parser, FACES columns with the matrix written.
"""
import bz2
import gzip
import io
import tarfile

import numpy as np
import pytest
import scipy.io as sio

from qnref.data import load_dataset
from qnref.data.cifar100 import RECORD_BYTES, parse_bin
from qnref.data.libsvm import WEBSPAM_FILE, parse_libsvm, webspam_test_size
from qnref.data.matsets import read_mat_arrays


# ----------------------------------------------------------------------------------------------- CIFAR-100
def _cifar100_bytes(rng, n):
    """n records: coarse byte, fine byte, 3072 pixel bytes (R, G, B planes), laid out by hand."""
    coarse = rng.integers(0, 20, n)
    fine = rng.integers(0, 100, n)
    pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    raw = b"".join(bytes([int(c), int(f)]) + pixels[i].tobytes() for i, (c, f) in enumerate(zip(coarse, fine)))
    return raw, coarse, fine


def _write_cifar100(root, rng, n_train=7, n_test=3):
    d = root / "cifar-100-binary"
    d.mkdir(parents=True)
    tr, trc, trf = _cifar100_bytes(rng, n_train)
    te, tec, tef = _cifar100_bytes(rng, n_test)
    (d / "train.bin").write_bytes(tr)
    (d / "test.bin").write_bytes(te)
    return tr, trc, trf, te, tec, tef


def test_cifar100_binary_layout(tmp_path):
    rng = np.random.default_rng(0)
    tr, trc, trf, te, tec, tef = _write_cifar100(tmp_path, rng)
    ds = load_dataset("cifar100", data_dir=tmp_path)
    assert ds.X_train.shape == (7, 3, 32, 32) and ds.X_test.shape == (3, 3, 32, 32) and ds.n_classes == 100
    assert np.array_equal(ds.y_train, trf) and np.array_equal(ds.y_test, tef)
    for i, c, h, w in ((0, 0, 0, 0), (3, 1, 5, 7), (6, 2, 31, 30)):
        byte = tr[i * RECORD_BYTES + 2 + 1024 * c + 32 * h + w]
        assert ds.X_train[i, c, h, w] == np.float32(byte) / np.float32(255.0)
    coarse = load_dataset("cifar100", data_dir=tmp_path / "cifar-100-binary", labels="coarse")
    assert coarse.n_classes == 20 and np.array_equal(coarse.y_train, trc) and np.array_equal(coarse.y_test, tec)
    assert load_dataset("cifar-100", data_dir=tmp_path, flat=True).input_shape == (3072,)


def test_cifar100_tarball_read_in_place(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    tr, _, trf, te, _, tef = _write_cifar100(src, rng, 4, 2)
    with tarfile.open(tmp_path / "cifar-100-binary.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-100-binary", arcname="cifar-100-binary")
    ds = load_dataset("cifar100", data_dir=tmp_path)
    assert np.array_equal(ds.y_train, trf) and np.array_equal(ds.y_test, tef)
    assert list((tmp_path).iterdir()) and not (tmp_path / "cifar-100-binary").exists()  # nothing extracted


def test_cifar100_corrupt_files_refused(tmp_path):
    rng = np.random.default_rng(2)
    raw, _, _ = _cifar100_bytes(rng, 3)
    with pytest.raises(ValueError, match=r"9221 bytes .* truncated after 3073 bytes"):
        parse_bin(raw[:-1], "x.bin")
    with pytest.raises(ValueError, match="empty or shorter than one record"):
        parse_bin(b"", "x.bin")
    bad = bytearray(raw)
    bad[RECORD_BYTES + 1] = 100  # record 1, fine label byte
    with pytest.raises(ValueError, match=r"record 1 \(byte offset 3075\) has fine label 100"):
        parse_bin(bytes(bad), "x.bin")
    bad = bytearray(raw)
    bad[2 * RECORD_BYTES] = 20  # record 2, coarse label byte
    with pytest.raises(ValueError, match=r"record 2 \(byte offset 6148\) has coarse label 20"):
        parse_bin(bytes(bad), "x.bin")
    cifar10_style = b"".join(bytes([3]) + bytes(3072) for _ in range(5))  # CIFAR-10's 3073-byte records
    with pytest.raises(ValueError, match="not a CIFAR-100 binary file"):
        parse_bin(cifar10_style, "x.bin")
    d = tmp_path / "cifar-100-binary"
    d.mkdir()
    (d / "train.bin").write_bytes(raw)
    with pytest.raises(FileNotFoundError, match="lacks test.bin"):
        load_dataset("cifar100", data_dir=tmp_path)
    (d / "test.bin").write_bytes(raw[:100])
    with pytest.raises(ValueError, match="test.bin: not a CIFAR-100 binary file"):
        load_dataset("cifar100", data_dir=tmp_path)
    py = tmp_path / "py"
    (py / "cifar-100-python").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="python/pickle version"):
        load_dataset("cifar100", data_dir=py)
    with pytest.raises(ValueError, match="labels must be 'fine'"):
        load_dataset("cifar100", data_dir=tmp_path, labels="super")


# ----------------------------------------------------------------------------------------------- CURVES / FACES
def _savemat(path, arrays):
    sio.savemat(str(path), arrays, format="5", do_compression=False)


def test_curves_published_layout(tmp_path):
    rng = np.random.default_rng(3)
    train, test = rng.random((9, 784)), rng.random((4, 784))
    _savemat(tmp_path / "digs3pts_1.mat", {"bdata": train, "bdatatest": test, "tdata": rng.random((9, 6))})
    ds = load_dataset("curves", data_dir=tmp_path)
    assert ds.task == "autoencoder" and ds.loss == "sigmoid_ce" and ds.input_shape == (784,)
    assert np.array_equal(ds.X_train, train.astype(np.float32)) and np.array_equal(ds.y_test, test.astype(np.float32))
    sub = tmp_path / "nested"
    (sub / "CURVES").mkdir(parents=True)
    _savemat(sub / "CURVES" / "digs3pts_1.mat", {"bdata": train, "bdatatest": test})
    assert load_dataset("curves", data_dir=sub).n_train == 9  # the reference codes' CURVES/ folder


def test_faces_published_layout_and_split(tmp_path):
    rng = np.random.default_rng(4)
    faces = rng.standard_normal((625, 40)).astype(np.float32)  # one face per column, single precision
    _savemat(tmp_path / "newfaces_rot_single.mat", {"newfaces_single": faces})
    ds = load_dataset("faces", data_dir=tmp_path)
    assert ds.loss == "mse" and ds.n_train == 25 and ds.n_test == 15  # 40·25/40 train, the rest test
    assert np.array_equal(ds.X_train[7], faces[:, 7]) and np.array_equal(ds.X_test[0], faces[:, 25])
    assert (165_600 * 25) // 40 == 103_500 and 165_600 - 103_500 == 62_100  # thesis Table 2.3


def test_mat_files_refused_with_reasons(tmp_path):
    rng = np.random.default_rng(5)
    good = tmp_path / "good.mat"
    _savemat(good, {"bdata": rng.random((5, 784)), "bdatatest": rng.random((2, 784))})
    raw = good.read_bytes()
    cases = {
        "truncated": (raw[: len(raw) // 2], "corrupt or truncated MAT-file"),
        "not a mat file": (b"hello world, definitely not MATLAB" * 10, "not a MATLAB MAT-file"),
        "v7.3": (b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116, b" ") + bytes(8) + b"\x00\x02IM"
                 + bytes(512), "v7.3 \\(HDF5\\)"),
    }
    for name, (content, message) in cases.items():
        p = tmp_path / f"{name}.mat"
        p.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            read_mat_arrays(p, ("bdata",))
    with pytest.raises(ValueError, match="lacks the variable 'bdatatest'"):
        read_mat_arrays(_put(tmp_path, "a.mat", {"bdata": rng.random((2, 784))}), ("bdata", "bdatatest"))
    with pytest.raises(ValueError, match="real numeric 2-D matrix"):
        read_mat_arrays(_put(tmp_path, "b.mat", {"bdata": {"field": 1.0}}), ("bdata",))
    with pytest.raises(ValueError, match="real numeric 2-D matrix"):
        read_mat_arrays(_put(tmp_path, "c.mat", {"bdata": rng.random((2, 2)) + 1j}), ("bdata",))
    nan = rng.random((3, 784))
    nan[1, 5] = np.nan
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        read_mat_arrays(_put(tmp_path, "d.mat", {"bdata": nan}), ("bdata",))
    for arrays, message in (({"bdata": rng.random((3, 783)), "bdatatest": rng.random((2, 784))}, r"\(N, 784\)"),
                            ({"bdata": 2 * rng.random((3, 784)), "bdatatest": rng.random((2, 784))}, r"lie in \[0, 1\]")):
        d = tmp_path / message[:3].strip("\\(")
        d.mkdir()
        _savemat(d / "digs3pts_1.mat", arrays)
        with pytest.raises(ValueError, match=message):
            load_dataset("curves", data_dir=d)
    d = tmp_path / "faces-wrong"
    d.mkdir()
    _savemat(d / "newfaces_rot_single.mat", {"newfaces_single": rng.random((40, 625))})
    with pytest.raises(ValueError, match="one 25×25 face per column"):
        load_dataset("faces", data_dir=d)
    with pytest.raises(FileNotFoundError, match="digs3pts_1.mat not found"):
        load_dataset("curves", data_dir=tmp_path / "faces-wrong")


def _put(root, name, arrays):
    _savemat(root / name, arrays)
    return root / name


# ----------------------------------------------------------------------------------------------- webspam
def _svm_lines(rng, n, d=254):
    X = np.where(rng.random((n, d)) < 0.3, np.round(rng.random((n, d)), 6), 0.0)
    y = np.where(rng.random(n) < 0.6, 1, -1)
    y[:2] = (1, -1)
    lines = []
    for row, lab in zip(X, y):
        nz = np.flatnonzero(row)
        lines.append(("+1" if lab > 0 else "-1") + "".join(f" {i + 1}:{row[i]:.6f}" for i in nz))
    return X, y, "\n".join(lines) + "\n"


def test_libsvm_matches_sklearn_and_webspam_split(tmp_path):
    from sklearn.datasets import load_svmlight_file

    rng = np.random.default_rng(6)
    X, y, text = _svm_lines(rng, 70)
    (tmp_path / WEBSPAM_FILE).write_text(text)
    Xs, ys = load_svmlight_file(io.BytesIO(text.encode()), n_features=254, zero_based=False)
    got, lab = parse_libsvm(text.encode(), 254, "x", dtype=np.float64)
    assert np.array_equal(got, Xs.toarray()) and np.array_equal(lab, ys)
    assert np.allclose(got, X, atol=5e-7, rtol=0)
    ds = load_dataset("webspam", data_dir=tmp_path, seed=0)
    assert ds.task == "binary" and ds.loss == "sigmoid_ce" and ds.input_shape == (254,)
    assert ds.n_test == webspam_test_size(70) == 10 and ds.n_train == 60
    rows = {tuple(r): t for r, t in zip(np.float32(got), (lab > 0).astype(float))}
    for r, t in zip(np.vstack([ds.X_train, ds.X_test]), np.vstack([ds.y_train, ds.y_test])[:, 0]):
        assert rows[tuple(r)] == t  # +1 → 1, −1 → 0, rows intact through the split
    assert webspam_test_size(350_000) == 50_000
    std = load_dataset("webspam", data_dir=tmp_path, standardize=True)
    assert np.allclose(std.X_train.mean(0)[std.X_train.std(0) > 0], 0, atol=1e-5)


@pytest.mark.parametrize("kind", ["bz2", "gz"])
def test_webspam_compressed(tmp_path, kind):
    rng = np.random.default_rng(7)
    _, _, text = _svm_lines(rng, 14)
    data = bz2.compress(text.encode()) if kind == "bz2" else gzip.compress(text.encode())
    (tmp_path / "webspam").mkdir()
    (tmp_path / "webspam" / (WEBSPAM_FILE + "." + kind)).write_bytes(data)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / WEBSPAM_FILE).write_text(text)
    a, b = load_dataset("webspam", data_dir=tmp_path), load_dataset("webspam", data_dir=plain)
    assert np.array_equal(a.X_train, b.X_train) and np.array_equal(a.y_test, b.y_test)
    (tmp_path / "webspam" / (WEBSPAM_FILE + "." + kind)).write_bytes(data[:-9])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_dataset("webspam", data_dir=tmp_path)


@pytest.mark.parametrize("line,message", [
    ("+1 1:0.5 # comment", "a comment"),
    ("", "blank line"),
    ("+1 3:0.5 2:0.1", "feature index 2 after 3"),
    ("+1 2:0.5 2:0.1", "feature index 2 after 2"),
    ("+1 0:0.5", "feature index 0 outside 1 … 254"),
    ("+1 255:0.5", "feature index 255 outside 1 … 254"),
    ("+1 1:0.5e", "value '0.5e' of feature 1 is not a number"),
    ("+1 1.5:0.5", "feature index '1.5' is not an integer"),
    ("2 1:0.5", "labels of a binary LIBSVM set are \\+1 and -1"),
    ("+1 1:nan", "the character 'n'"),
    ("+1 1:", "'1:' is not index:value"),
    ("+1 1:2:3", "'1:2:3' is not index:value"),
    ("+1 qid:3 1:0.5", "the character 'q'"),
    ("1:0.5 2:0.25", "starts with '1:0.5', not with a label"),
    ("+1 1:0.5 2", "'2' is not index:value"),
])
def test_libsvm_bad_lines_named_with_line_numbers(line, message):
    text = "+1 1:0.5 7:1\n-1 2:0.25\n" + line + "\n-1 3:1\n"
    with pytest.raises(ValueError, match=f"spam.svm:3: .*{message}"):
        parse_libsvm(text.encode(), 254, "spam.svm")


def test_libsvm_edge_cases():
    X, y = parse_libsvm(b"-1\r\n+1 254:1e-3\r\n", 254, "x")  # label-only line = all-zero row; CRLF
    assert X.shape == (2, 254) and not X[0].any() and X[1, 253] == np.float32(1e-3) and list(y) == [-1, 1]
    with pytest.raises(ValueError, match="no examples"):
        parse_libsvm(b"", 254, "x")
    with pytest.raises(ValueError, match="n_features"):
        parse_libsvm(b"+1 1:1\n", 0, "x")
    with pytest.raises(FileNotFoundError, match="webspam_wc_normalized_unigram.svm"):
        load_dataset("webspam", data_dir=".")


def test_digits_standardize_uses_train_statistics():
    ds = load_dataset("digits", flat=True, standardize=True)
    raw = load_dataset("digits", flat=True)
    live = raw.X_train.std(0) > 1e-8
    assert np.allclose(ds.X_train.mean(0)[live], 0, atol=1e-12) and np.allclose(ds.X_train.std(0)[live], 1, atol=1e-12)
    mu, sd = raw.X_train.mean(0), np.where(live, raw.X_train.std(0), 1.0)
    assert np.allclose(ds.X_test, (raw.X_test - mu) / sd, atol=1e-12)
