"""Reader (and writer) for the IDX format of MNIST and Fashion-MNIST.

IDX layout (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte magic number
``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32 dimension sizes, then the
data in C order, big-endian. Dtype codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64. MNIST and Fashion-MNIST use 0x08 for both images (ndim 3) and
labels (ndim 1). Files may be gzip-compressed (detected by the gzip magic bytes, whatever the
file name).

Errors: a missing file raises :class:`FileNotFoundError`; a wrong magic number (including one
declaring the wrong number of dimensions for an image or label file), unknown dtype code,
truncated or over-long payload, or broken gzip stream raises :class:`ValueError` naming the file;
anything but bytes given to :func:`parse_idx` raises :class:`TypeError`.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_OF = {dt.newbyteorder("=").str: code for code, dt in IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_NDIM = 64  # NumPy's limit

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# sub-folders searched below data_dir (the torchvision layouts included)
_SUBDIRS = {
    "mnist": ("", "mnist", "MNIST", "MNIST/raw"),
    "fashion-mnist": ("", "fashion-mnist", "fashion_mnist", "FashionMNIST", "FashionMNIST/raw"),
}


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    return raw


def parse_idx(raw: bytes, source: str = "<bytes>", *, expect_ndim: int | None = None) -> np.ndarray:
    """Decode IDX bytes (already decompressed) into a native-endian, writable array.

    ``expect_ndim`` (3 for image files, 1 for label files) checks the magic number's last byte
    before the dimensions are read, so a file of the wrong kind is named as such."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError(f"parse_idx needs the file's bytes, got {type(raw).__name__}"
                        + ("; use read_idx(path) for a file name" if isinstance(raw, (str, os.PathLike)) else ""))
    raw = bytes(raw)
    if len(raw) >= 2 and (raw[0] != 0 or raw[1] != 0) or len(raw) == 1 and raw[0] != 0:
        raise ValueError(
            f"{source}: not an IDX file (magic number {raw[:4].hex()} should start with 0000)"
        )
    if len(raw) < 4:
        raise ValueError(f"{source}: not an IDX file (only {len(raw)} bytes, the header needs 4)")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"{source}: not an IDX file of a known type (magic number {raw[:4].hex()}: unknown dtype "
                         f"code 0x{code:02X}; known: {known})")
    if ndim == 0:
        raise ValueError(f"{source}: IDX header declares 0 dimensions (magic number {raw[:4].hex()})")
    if ndim > _MAX_NDIM:
        raise ValueError(f"{source}: IDX header declares {ndim} dimensions (magic number {raw[:4].hex()}); "
                         f"arrays have at most {_MAX_NDIM}")
    if expect_ndim is not None and ndim != expect_ndim:
        raise ValueError(f"{source}: wrong IDX magic number {raw[:4].hex()}: it declares {ndim} dimensions, this "
                         f"file must have {expect_ndim} (0000{code:02x}{expect_ndim:02x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{source}: truncated IDX header ({len(raw)} bytes, need {header} for {ndim} dims)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dt = IDX_DTYPES[code]
    count = 1
    for d in dims:  # Python integers: 255 large dimensions must not overflow into a wrong message
        count *= d
    expected = count * dt.itemsize
    got = len(raw) - header
    if got < expected:
        shown = dims if ndim <= 8 else f"({', '.join(map(str, dims[:4]))}, … {ndim} dims)"
        raise ValueError(
            f"{source}: truncated IDX data: dims {shown} of {dt.newbyteorder('=').name} need "
            f"{expected} bytes, file has {got}"
        )
    if got > expected:
        raise ValueError(
            f"{source}: IDX file has {got - expected} unexpected trailing bytes after dims {dims}"
        )
    arr = np.frombuffer(raw, dtype=dt, count=count, offset=header)
    return arr.reshape(dims).astype(dt.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike, *, expect_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a native-endian NumPy array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    return parse_idx(_read_bytes(path), str(path), expect_ndim=expect_ndim)


def write_idx(path: str | os.PathLike, array: Any, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file; gzip it when ``compress`` (default: name ends in .gz)."""
    path = Path(path)
    a = np.asarray(array)
    code = _CODE_OF.get(a.dtype.newbyteorder("=").str)
    if code is None:
        raise ValueError(f"dtype {a.dtype} has no IDX code; use one of uint8, int8, int16, int32, float32, float64")
    if a.ndim < 1 or a.ndim > 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got {a.ndim}")
    data = bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    data += np.ascontiguousarray(a, dtype=IDX_DTYPES[code]).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def _candidates(directory: Path, base: str) -> list[Path]:
    dotted = base.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    names = [base, base + ".gz", dotted, dotted + ".gz"]
    return [directory / n for n in dict.fromkeys(names)]


def find_mnist_files(data_dir: str | os.PathLike, kind: str = "mnist") -> dict[str, Path]:
    """Locate the four IDX files of ``kind`` ("mnist" or "fashion-mnist") below ``data_dir``.

    Searched: ``data_dir`` itself and the sub-folders of :data:`_SUBDIRS` (e.g. ``MNIST/raw``
    as torchvision stores them); each file may be plain or ``.gz``. All four must sit in the same
    folder. Raises :class:`FileNotFoundError` listing the expected files and folders searched.
    """
    if kind not in _SUBDIRS:
        raise ValueError(f"kind must be one of {sorted(_SUBDIRS)}, got {kind!r}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"{kind}: data directory {root} does not exist; it must contain "
            + ", ".join(f"{b}[.gz]" for b in MNIST_FILES.values())
        )
    searched = []
    for sub in _SUBDIRS[kind]:
        d = root / sub if sub else root
        if not d.is_dir():
            continue
        searched.append(d)
        found = {}
        for key, base in MNIST_FILES.items():
            hit = next((p for p in _candidates(d, base) if p.is_file()), None)
            if hit is not None:
                found[key] = hit
        if len(found) == len(MNIST_FILES):
            return found
    expected = ", ".join(f"{b}[.gz]" for b in MNIST_FILES.values())
    where = ", ".join(str(d) for d in searched) or str(root)
    raise FileNotFoundError(
        f"{kind}: IDX files not found. Expected {expected} (all four in one folder) in {where}. "
        f"Download them once and pass --data-dir / data_dir pointing at that folder."
    )


def load_mnist_arrays(data_dir: str | os.PathLike, kind: str = "mnist") -> dict[str, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of both splits, with consistency checks."""
    files = find_mnist_files(data_dir, kind)
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        img_path, lab_path = files[f"{split}_images"], files[f"{split}_labels"]
        images = read_idx(img_path, expect_ndim=3)
        labels = read_idx(lab_path, expect_ndim=1)
        if images.dtype != np.uint8 or images.ndim != 3:
            raise ValueError(
                f"{img_path}: expected uint8 images with 3 dims (dtype code 0x08, idx3), "
                f"got {images.dtype} with shape {images.shape}"
            )
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise ValueError(
                f"{lab_path}: expected uint8 labels with 1 dim (dtype code 0x08, idx1), "
                f"got {labels.dtype} with shape {labels.shape}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{kind}: {img_path.name} has {len(images)} images but {lab_path.name} has {len(labels)} labels")
        if len(labels) and int(labels.max()) > 9:
            raise ValueError(f"{lab_path}: labels must be 0 … 9, found {int(labels.max())}")
        out[f"X_{split}"] = images
        out[f"y_{split}"] = labels.astype(np.int64)
    if out["X_train"].shape[1:] != out["X_test"].shape[1:]:
        raise ValueError(
            f"{kind}: train images are {out['X_train'].shape[1:]} but test images are {out['X_test'].shape[1:]}"
        )
    return out
