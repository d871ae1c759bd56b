"""Reader for the CIFAR-100 "binary version" (Krizhevsky, 2009).

The archive ``cifar-100-binary.tar.gz`` unpacks to ``cifar-100-binary/`` holding ``train.bin``
(50,000 images), ``test.bin`` (10,000), ``coarse_label_names.txt`` and ``fine_label_names.txt``.
A ``.bin`` file is a plain concatenation of fixed-size records, 3074 bytes each::

    <1 byte coarse label 0…19><1 byte fine label 0…99><3072 bytes: 1024 red, 1024 green, 1024 blue>

each colour plane a 32×32 image in row-major order, i.e. the record's pixels are exactly
(3, 32, 32) channel-first (the layout of CIFAR-10's binary version, with one extra label byte).
No pickle is involved: the python version of CIFAR-100 is *not* read (unpickling can run code).

``data_dir`` may be the ``cifar-100-binary`` folder, its parent, or a folder holding the
unextracted ``cifar-100-binary.tar.gz`` (read in place; only regular members, nothing is written).
A file whose size is not a whole number of records, or a label byte out of range, is refused
with a :class:`ValueError` naming the file, the record and the byte offset.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .cifar import read_tar_members

BATCH_DIR = "cifar-100-binary"
TRAIN_FILE = "train.bin"
TEST_FILE = "test.bin"
TARBALL = "cifar-100-binary.tar.gz"
IMAGE_SHAPE = (3, 32, 32)
RECORD_BYTES = 2 + 3 * 32 * 32  # coarse label, fine label, pixels
N_COARSE, N_FINE = 20, 100
#: the official split sizes (checked only when ``strict_counts``)
OFFICIAL_COUNTS = {TRAIN_FILE: 50_000, TEST_FILE: 10_000}


def parse_bin(raw: bytes, source: str = "<bytes>") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode one ``.bin`` file: images (N, 3, 32, 32) uint8, fine (N,) int64, coarse (N,) int64."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError(f"parse_bin needs the file's bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    n, rest = divmod(len(raw), RECORD_BYTES)
    if rest or n == 0:
        raise ValueError(
            f"{source}: not a CIFAR-100 binary file: {len(raw)} bytes is not a positive whole number of "
            f"{RECORD_BYTES}-byte records (1 coarse label byte, 1 fine label byte, 3072 pixel bytes); "
            + (f"the last record is truncated after {rest} bytes" if n else "the file is empty or shorter than one record")
        )
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(n, RECORD_BYTES)
    coarse, fine = rec[:, 0].astype(np.int64), rec[:, 1].astype(np.int64)
    for what, labels, k in (("coarse", coarse, N_COARSE), ("fine", fine, N_FINE)):
        bad = np.flatnonzero(labels >= k)
        if bad.size:
            i = int(bad[0])
            offset = i * RECORD_BYTES + (0 if what == "coarse" else 1)
            raise ValueError(
                f"{source}: record {i} (byte offset {offset}) has {what} label {int(labels[i])}; CIFAR-100 {what} "
                f"labels are 0 … {k - 1} ({bad.size} bad record(s); is this CIFAR-10's binary format, which has one "
                "label byte?)"
            )
    images = np.ascontiguousarray(rec[:, 2:]).reshape((n,) + IMAGE_SHAPE)
    return images, fine, coarse


def read_bin(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read one file (``train.bin`` / ``test.bin``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-100 binary file not found: {path}")
    return parse_bin(path.read_bytes(), str(path))


def write_bin(path: str | os.PathLike, images: np.ndarray, fine: np.ndarray, coarse: np.ndarray) -> Path:
    """Write records in the published layout (for tests and small hand-made sets)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"images must be uint8 (N, 3, 32, 32), got {images.dtype} {images.shape}")
    n = len(images)
    fine, coarse = np.asarray(fine), np.asarray(coarse)
    if fine.shape != (n,) or coarse.shape != (n,):
        raise ValueError(f"fine and coarse labels must have shape ({n},), got {fine.shape}, {coarse.shape}")
    rec = np.empty((n, RECORD_BYTES), np.uint8)
    rec[:, 0], rec[:, 1] = coarse, fine
    rec[:, 2:] = images.reshape(n, -1)
    path = Path(path)
    path.write_bytes(rec.tobytes())
    return path


def _locate(data_dir: Path) -> tuple[str, Path]:
    expected = f"{BATCH_DIR}/{TRAIN_FILE} and {BATCH_DIR}/{TEST_FILE}"
    if not data_dir.is_dir():
        raise FileNotFoundError(f"cifar100: data directory {data_dir} does not exist; it must contain {expected} or {TARBALL}")
    for d in (data_dir / BATCH_DIR, data_dir):
        if (d / TRAIN_FILE).is_file() or (d / TEST_FILE).is_file():
            missing = [n for n in (TRAIN_FILE, TEST_FILE) if not (d / n).is_file()]
            if missing:
                raise FileNotFoundError(f"cifar100: {d} lacks {', '.join(missing)} (expected {TRAIN_FILE} and {TEST_FILE})")
            return "dir", d
    if (data_dir / TARBALL).is_file():
        return "tar", data_dir / TARBALL
    hint = ""
    if (data_dir / "cifar-100-python").is_dir() or (data_dir / "cifar-100-python.tar.gz").is_file():
        hint = " (found the python/pickle version, which qnref does not unpickle: use the binary version)"
    raise FileNotFoundError(
        f"cifar100: no CIFAR-100 binary files in {data_dir}: expected {expected}, the same files directly in "
        f"{data_dir}, or {TARBALL}{hint}. Pass --data-dir / data_dir pointing at that folder."
    )


def load_cifar100_arrays(data_dir: str | os.PathLike, *, strict_counts: bool = False) -> dict[str, np.ndarray]:
    """All of CIFAR-100: ``X_train``/``X_test`` (N, 3, 32, 32) uint8, ``y_*_fine`` and ``y_*_coarse`` int64.

    ``strict_counts=True`` also requires the official 50,000 / 10,000 records.
    """
    kind, where = _locate(Path(data_dir).expanduser())
    if kind == "dir":
        raws = {n: ((where / n).read_bytes(), str(where / n)) for n in (TRAIN_FILE, TEST_FILE)}
    else:
        raws = read_tar_members(where, BATCH_DIR, (TRAIN_FILE, TEST_FILE), "cifar100", "CIFAR-100")
    out: dict[str, np.ndarray] = {}
    for n, split in ((TRAIN_FILE, "train"), (TEST_FILE, "test")):
        X, fine, coarse = parse_bin(*raws[n])
        if strict_counts and len(X) != OFFICIAL_COUNTS[n]:
            raise ValueError(f"cifar100: {raws[n][1]} has {len(X)} records, the official file has {OFFICIAL_COUNTS[n]}")
        out[f"X_{split}"], out[f"y_{split}_fine"], out[f"y_{split}_coarse"] = X, fine, coarse
    return out
