"""Reader for the CIFAR-10 "python version" (Krizhevsky, 2009).

The archive ``cifar-10-python.tar.gz`` unpacks to ``cifar-10-batches-py/`` with five training
batches ``data_batch_1`` … ``data_batch_5`` and ``test_batch``. Each is a pickled dict (written by
Python 2, so it is loaded with ``encoding="bytes"``) with keys ``b"data"`` — a uint8 array
(N, 3072) whose rows hold the 1024 red, then green, then blue values of a 32×32 image in row-major
order, i.e. exactly (3, 32, 32) channel-first — and ``b"labels"`` — N integers in 0 … 9.

Pickles can run arbitrary code, so a restricted unpickler accepts only what these files contain
(NumPy array reconstruction, ``_codecs.encode``); anything else is rejected as not a CIFAR batch.
``data_dir`` may be the ``cifar-10-batches-py`` folder, its parent, or a folder holding the
unextracted ``cifar-10-python.tar.gz`` (read in place, nothing is written).
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
TARBALL = "cifar-10-python.tar.gz"
IMAGE_SHAPE = (3, 32, 32)
LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # files written with NumPy 1.x name numpy.core; NumPy 2 moved it to numpy._core
        legacy = module == "numpy.core" or module.startswith("numpy.core.")
        mod = "numpy._core" + module[len("numpy.core"):] if legacy else module
        if (mod, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if mod.startswith("numpy._core") and not hasattr(np, "_core"):  # NumPy < 2
            mod = "numpy.core" + mod[len("numpy._core"):]
        return super().find_class(mod, name)


def parse_batch(raw: bytes, source: str = "<bytes>") -> tuple[np.ndarray, np.ndarray]:
    """Decode one pickled batch: images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    try:
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, … from broken bytes
        raise ValueError(f"{source}: not a CIFAR-10 python batch (bad pickle: {type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: a CIFAR-10 batch is a dict, got {type(obj).__name__}")

    def get(key: str) -> Any:
        for k in (key.encode(), key):
            if k in obj:
                return obj[k]
        raise ValueError(f"{source}: CIFAR-10 batch lacks the key b{key!r} (keys: {sorted(map(repr, obj))})")

    data = np.asarray(get("data"))
    labels = np.asarray(get("labels"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{source}: b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.ndim != 1 or len(labels) != len(data) or (labels.size and labels.dtype.kind not in "iu"):
        raise ValueError(
            f"{source}: b'labels' must be {len(data)} integers, got {labels.dtype} {labels.shape}"
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{source}: labels must be 0 … 9, found [{labels.min()}, {labels.max()}]")
    return data.reshape((len(data),) + IMAGE_SHAPE), labels


def read_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file (``data_batch_i`` / ``test_batch``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch not found: {path}")
    return parse_batch(path.read_bytes(), str(path))


def _expected() -> str:
    return ", ".join(TRAIN_BATCHES + (TEST_BATCH,))


def _locate(data_dir: Path) -> tuple[str, Path]:
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"cifar10: data directory {data_dir} does not exist; it must contain {BATCH_DIR}/ "
            f"({_expected()}) or {TARBALL}"
        )
    for d in (data_dir / BATCH_DIR, data_dir):
        if (d / TRAIN_BATCHES[0]).is_file() or (d / TEST_BATCH).is_file():
            missing = [n for n in TRAIN_BATCHES + (TEST_BATCH,) if not (d / n).is_file()]
            if missing:
                raise FileNotFoundError(f"cifar10: {d} lacks {', '.join(missing)} (expected {_expected()})")
            return "dir", d
    if (data_dir / TARBALL).is_file():
        return "tar", data_dir / TARBALL
    raise FileNotFoundError(
        f"cifar10: no CIFAR-10 python batches in {data_dir}: expected {data_dir / BATCH_DIR}/ "
        f"holding {_expected()}, the same files directly in {data_dir}, or {TARBALL}. "
        f"Pass --data-dir / data_dir pointing at that folder."
    )



def read_tar_members(where: Path, folder: str, names: tuple[str, ...], tag: str, title: str) -> dict[str, tuple[bytes, str]]:
    """The bytes of ``folder/name`` for each name in the tar archive ``where`` (with "file:member" for
    error messages). Only regular members are read: a link or device member is refused, never
    followed; a missing member is a FileNotFoundError, an unreadable archive a ValueError (``tag``
    prefixes the messages, ``title`` names the data set)."""
    raws: dict[str, tuple[bytes, str]] = {}
    try:
        with tarfile.open(where, "r:*") as tar:
            for n in names:
                try:
                    member = tar.getmember(f"{folder}/{n}")
                except KeyError:
                    raise FileNotFoundError(f"{tag}: {where} lacks {folder}/{n}") from None
                if not member.isfile():  # a symlink/hard link/device member is never followed
                    kind = "a symbolic link" if member.issym() else "a link" if member.islnk() else "not a regular file"
                    raise ValueError(f"{tag}: {where}:{folder}/{n} is {kind}; a {title} archive holds "
                                     "regular files only")
                f = tar.extractfile(member)
                if f is None:
                    raise ValueError(f"{tag}: {where}:{folder}/{n} is not a regular file")
                raws[n] = (f.read(), f"{where}:{folder}/{n}")
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{tag}: {where} is not a readable tar.gz archive ({exc})") from exc
    return raws

def load_cifar10_arrays(data_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All of CIFAR-10: ``X_train`` (N, 3, 32, 32) uint8, ``y_train`` int64, ``X_test``, ``y_test``."""
    kind, where = _locate(Path(data_dir).expanduser())
    raws: dict[str, tuple[bytes, str]] = {}
    if kind == "dir":
        for n in TRAIN_BATCHES + (TEST_BATCH,):
            raws[n] = ((where / n).read_bytes(), str(where / n))
    else:
        raws = read_tar_members(where, BATCH_DIR, TRAIN_BATCHES + (TEST_BATCH,), "cifar10", "CIFAR-10")
    train = [parse_batch(*raws[n]) for n in TRAIN_BATCHES]
    X_test, y_test = parse_batch(*raws[TEST_BATCH])
    return {
        "X_train": np.concatenate([x for x, _ in train]),
        "y_train": np.concatenate([y for _, y in train]),
        "X_test": X_test,
        "y_test": y_test,
    }
