"""IDX reader on files written byte by byte in the true format, and the MNIST / Fashion-MNIST loaders."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from qnref.data import find_mnist_files, load_dataset, parse_idx, read_idx, write_idx

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(a: np.ndarray, code: int = 0x08, be: str = ">u1") -> bytes:
    """Independent IDX encoder: magic 00 00 <code> <ndim>, big-endian uint32 dims, big-endian data."""
    header = bytes([0, 0, code, a.ndim]) + b"".join(struct.pack(">I", d) for d in a.shape)
    return header + a.astype(be).tobytes()


def write_mnist(folder, n_train=12, n_test=5, rows=28, cols=28, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, rows, cols), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, rows, cols), dtype=np.uint8),
        "test_labels": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    for key, base in FILES.items():
        raw = idx_bytes(arrays[key])
        if gz:
            (folder / (base + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / base).write_bytes(raw)
    return arrays


# ------------------------------------------------------------------ the format
def test_read_handcrafted_uint8_file(tmp_path):
    raw = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 255])
    p = tmp_path / "tiny-idx2-ubyte"
    p.write_bytes(raw)
    a = read_idx(p)
    assert a.dtype == np.uint8 and a.shape == (2, 3)
    assert a.tolist() == [[1, 2, 3], [4, 5, 255]]


@pytest.mark.parametrize(
    "code, be, values",
    [(0x09, ">i1", [-3, 7]), (0x0B, ">i2", [-300, 1000]), (0x0C, ">i4", [-70000, 1 << 20]),
     (0x0D, ">f4", [1.5, -2.25]), (0x0E, ">f8", [np.pi, -1e300])],
)
def test_big_endian_dtypes(tmp_path, code, be, values):
    a = np.array(values)
    p = tmp_path / "x.idx"
    p.write_bytes(idx_bytes(a, code, be))
    out = read_idx(p)
    assert out.dtype.byteorder in "=|<" or out.dtype.isnative
    assert np.array_equal(out, np.array(values, dtype=np.dtype(be).newbyteorder("=")))


def test_gzip_detected_by_content(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "no-gz-suffix"
    p.write_bytes(gzip.compress(idx_bytes(a)))
    assert np.array_equal(read_idx(p), a)


def test_write_idx_roundtrip(tmp_path):
    for dt in (np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64):
        a = (np.arange(30) - 10).astype(dt).reshape(5, 6)
        for name in ("a.idx", "a.idx.gz"):
            p = write_idx(tmp_path / name, a)
            assert np.array_equal(read_idx(p), a) and read_idx(p).dtype == a.dtype
    assert (tmp_path / "a.idx.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert write_idx(tmp_path / "u8", np.zeros((2, 2), np.uint8)).read_bytes()[:4] == bytes([0, 0, 8, 2])
    with pytest.raises(ValueError, match="no IDX code"):
        write_idx(tmp_path / "b", np.zeros(3, bool))


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\x08\x03", "not an IDX file \\(magic number 0803"),
        (b"\x00\x00", "only 2 bytes"),
        (bytes([0x1F, 0x00, 8, 1, 0, 0, 0, 1, 0]), "magic number"),
        (bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 0]), "unknown dtype code 0x07"),
        (bytes([0, 0, 8, 3, 0, 0, 0, 2]), "truncated IDX header"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2, 3]), "truncated IDX data"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2, 3]), "trailing bytes"),
        (bytes([0, 0, 8, 0]), "0 dimensions"),
    ],
)
def test_corrupt_files_raise_value_error(tmp_path, raw, message):
    p = tmp_path / "bad"
    p.write_bytes(raw)
    with pytest.raises(ValueError, match=message) as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_truncated_gzip_raises_value_error(tmp_path):
    p = tmp_path / "bad.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 4), np.uint8)))[:-6])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(p)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope")
    with pytest.raises(ValueError, match="magic"):
        parse_idx(b"\x01\x00\x08\x01\x00\x00\x00\x00")


# ------------------------------------------------------------------ MNIST / Fashion-MNIST loaders
@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_from_folder(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert ds.X_train.shape == (12, 1, 28, 28) and ds.X_test.shape == (5, 1, 28, 28)
    assert ds.X_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.input_shape == (1, 28, 28) and ds.n_classes == 10
    assert np.allclose(ds.X_train[:, 0] * 255, arrays["train_images"])
    assert 0.0 <= ds.X_train.min() and ds.X_train.max() <= 1.0
    assert np.array_equal(ds.y_test, arrays["test_labels"])
    flat = load_dataset("mnist", data_dir=str(tmp_path), flat=True)
    assert flat.input_shape == (784,) and np.array_equal(flat.X_train, ds.X_train.reshape(12, 784))
    f64 = ds.to("cpu", "float64")
    assert f64.X_train.dtype == np.float64 and f64.y_train.dtype == np.int64


def test_fashion_mnist_torchvision_layout_and_env_var(tmp_path, monkeypatch):
    write_mnist(tmp_path / "FashionMNIST" / "raw", gz=True, seed=1)
    write_mnist(tmp_path / "MNIST" / "raw", seed=2)
    monkeypatch.setenv("QNREF_DATA_DIR", str(tmp_path))
    fm = load_dataset("fashion-mnist")
    mn = load_dataset("mnist")
    assert fm.name == "fashion-mnist" and fm.n_train == 12
    assert not np.array_equal(fm.X_train, mn.X_train)  # each from its own folder
    assert find_mnist_files(tmp_path, "fashion-mnist")["train_images"].parent.name == "raw"


def test_subsets_of_mnist(tmp_path):
    write_mnist(tmp_path, n_train=40, n_test=20)
    ds = load_dataset("mnist", data_dir=tmp_path, n_train=20, n_test=10, seed=0)
    assert ds.n_train == 20 and ds.n_test == 10
    assert np.bincount(ds.y_train).tolist() == [2] * 10


def test_missing_files_are_named(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / FILES["test_labels"]).unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(tmp_path) in str(e.value)


def test_inconsistent_files_raise_value_error(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / FILES["train_labels"]).write_bytes(idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(ValueError, match="12 images but .* 11 labels"):
        load_dataset("mnist", data_dir=tmp_path)
    (tmp_path / FILES["train_labels"]).write_bytes(idx_bytes(np.full(12, 10, np.uint8)))
    with pytest.raises(ValueError, match="labels must be 0"):
        load_dataset("mnist", data_dir=tmp_path)
    (tmp_path / FILES["train_labels"]).write_bytes(idx_bytes(np.zeros(12, np.float32), 0x0D, ">f4"))
    with pytest.raises(ValueError, match="expected uint8 labels"):
        load_dataset("mnist", data_dir=tmp_path)


def test_truncated_mnist_file(tmp_path):
    write_mnist(tmp_path)
    p = tmp_path / FILES["train_images"]
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("mnist", data_dir=tmp_path)


def test_many_dimensions_are_not_reported_as_trailing_bytes(tmp_path):
    """255 dims are refused as such; dimension products beyond int64 (64 dims of 2³²−1) are exact
    Python integers, so the file is 'truncated', never 'trailing bytes'."""
    raw = bytes([0, 0, 8, 255]) + b"\xff\xff\xff\xff" * 255 + b"\x00" * 10
    with pytest.raises(ValueError, match=r"declares 255 dimensions .*at most 64"):
        parse_idx(raw, "big")
    raw = bytes([0, 0, 8, 64]) + b"\xff\xff\xff\xff" * 64 + b"\x00" * 10
    with pytest.raises(ValueError, match=r"truncated IDX data: dims \(4294967295, 4294967295, 4294967295, 4294967295, … 64 dims\)") as e:
        parse_idx(raw, "big")
    assert "trailing" not in str(e.value)
    raw = bytes([0, 0, 8, 64]) + b"\x00\x00\x00\x01" * 64 + b"\x07"  # 64 dims of 1: one byte
    assert parse_idx(raw).shape == (1,) * 64


def test_wrong_magic_is_named_as_such(tmp_path):
    """A label file written with the image magic (3 dims) is a wrong magic number, not truncation."""
    raw = idx_bytes(np.zeros(60, np.uint8))
    p = tmp_path / "labels"
    p.write_bytes(bytes([0, 0, 8, 3]) + raw[4:])
    with pytest.raises(ValueError, match=r"wrong IDX magic number 00000803: it declares 3 dimensions, this file must have 1"):
        read_idx(p, expect_ndim=1)
    p.write_bytes(b"\x1f\x00\x08\x01" + raw[4:])
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(p)


@pytest.mark.parametrize("bad", ["train-images-idx3-ubyte", 12, None, [0, 0, 8, 1]])
def test_parse_idx_needs_bytes(bad):
    with pytest.raises(TypeError, match=f"parse_idx needs the file's bytes, got {type(bad).__name__}"):
        parse_idx(bad)
