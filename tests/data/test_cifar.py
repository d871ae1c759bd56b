"""CIFAR-10 python batches written in the true format (Python 2 style pickles) and the loader."""
from __future__ import annotations

import os
import pickle
import tarfile

import numpy as np
import pytest

from qnref.data import load_dataset, read_cifar_batch

NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _body(obj) -> bytes:
    """Pickle opcodes of ``obj`` without the PROTO header and STOP."""
    raw = pickle.dumps(obj, protocol=2)
    assert raw[:2] == b"\x80\x02" and raw[-1:] == b"."
    return raw[2:-1]


def py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle wrote it: str keys as SHORT_BINSTRING, NumPy 1.x module names."""
    arr = _body(data).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    def sbs(text: bytes) -> bytes:  # SHORT_BINSTRING: Python 2 str
        return b"U" + bytes([len(text)]) + text

    return (
        b"\x80\x02}("
        + sbs(b"batch_label") + sbs(b"testing batch 1 of 5")
        + sbs(b"labels") + _body(list(labels))
        + sbs(b"data") + arr
        + b"u."
    )


def make_batches(folder, per_batch=4, seed=0, py2=True):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, name in enumerate(NAMES):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(k + i) % 10 for i in range(per_batch)]
        raw = py2_batch(data, labels) if py2 else pickle.dumps({b"data": data, b"labels": labels}, protocol=2)
        (folder / name).write_bytes(raw)
        out[name] = (data, labels)
    return out


def test_python2_style_batch_parses(tmp_path):
    data = np.arange(2 * 3072, dtype=np.uint64).astype(np.uint8).reshape(2, 3072)
    p = tmp_path / "data_batch_1"
    p.write_bytes(py2_batch(data, [3, 9]))
    X, y = read_cifar_batch(p)
    assert X.shape == (2, 3, 32, 32) and X.dtype == np.uint8
    assert y.tolist() == [3, 9] and y.dtype == np.int64
    # rows are 1024 red, 1024 green, 1024 blue values, each 32×32 row-major → (C, H, W)
    assert X[0, 1, 0, 0] == data[0, 1024] and X[0, 2, 31, 31] == data[0, 3071] and X[1, 0, 1, 0] == data[1, 32]


@pytest.mark.parametrize("layout", ["parent", "batches-dir", "tarball"])
def test_load_cifar10(tmp_path, layout):
    src = tmp_path / "cifar-10-batches-py"
    batches = make_batches(src, py2=(layout != "batches-dir"))
    data_dir = {"parent": tmp_path, "batches-dir": src}.get(layout)
    if layout == "tarball":
        data_dir = tmp_path / "tar"
        data_dir.mkdir()
        with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(src, arcname="cifar-10-batches-py")
    ds = load_dataset("cifar10", data_dir=data_dir)
    assert ds.X_train.shape == (20, 3, 32, 32) and ds.X_test.shape == (4, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32) and ds.n_classes == 10 and ds.X_train.dtype == np.float32
    train = np.concatenate([batches[n][0] for n in NAMES[:5]]).reshape(20, 3, 32, 32)
    assert np.allclose(ds.X_train * 255, train)
    assert ds.y_test.tolist() == batches["test_batch"][1]
    flat = load_dataset("cifar10", data_dir=data_dir, flat=True)
    assert flat.input_shape == (3072,)
    std = ds.standardized(per="channel")
    assert std.info["input_scaler"].shift.shape == (3, 1, 1)


def test_missing_batch_is_named(tmp_path):
    make_batches(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_empty_folder_explains_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*data_batch_1.*test_batch"):
        load_dataset("cifar10", data_dir=tmp_path)


_BAD = [
        (b"not a pickle at all", "bad pickle"),
        (py2_batch(np.zeros((2, 3072), np.uint8), [1, 2])[:-40], "bad pickle"),
        (pickle.dumps([1, 2, 3], protocol=2), "is a dict"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2), "lacks the key b'labels'"),
        (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}, protocol=2), r"\(N, 3072\)"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, protocol=2), "2 integers"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 12]}, protocol=2), "0 … 9"),
]


@pytest.mark.parametrize("raw, message", _BAD, ids=[f"bad{i}" for i in range(len(_BAD))])
def test_bad_batches_raise_value_error(tmp_path, raw, message):
    make_batches(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(raw)
    with pytest.raises(ValueError, match=message) as e:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "data_batch_2" in str(e.value)


class _Evil:
    def __reduce__(self):
        return (os.remove, ("/nonexistent-qnref-test-file",))


def test_pickle_with_foreign_globals_is_refused(tmp_path):
    p = tmp_path / "test_batch"
    p.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load global posix.remove|refusing to load global os.remove"):
        read_cifar_batch(p)


def test_corrupt_tarball(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="tar.gz"):
        load_dataset("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize("link", ["sym", "hard", "dangling"])
def test_link_members_in_the_tarball_are_refused(tmp_path, link):
    """A symlink (even to a real batch, or dangling) or a hard link member is never followed."""
    src = tmp_path / "cifar-10-batches-py"
    make_batches(src)
    data_dir = tmp_path / "tar"
    data_dir.mkdir()
    with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        for n in NAMES:
            if n == "data_batch_3":
                info = tarfile.TarInfo(f"cifar-10-batches-py/{n}")
                info.type = tarfile.SYMTYPE if link != "hard" else tarfile.LNKTYPE
                info.linkname = "/etc/passwd" if link == "dangling" else "cifar-10-batches-py/data_batch_1"
                tar.addfile(info)
            else:
                tar.add(src / n, arcname=f"cifar-10-batches-py/{n}")
    with pytest.raises(ValueError, match=r"data_batch_3 is (a symbolic link|a link); a CIFAR-10 archive holds regular files only"):
        load_dataset("cifar10", data_dir=data_dir)
