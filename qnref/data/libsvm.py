"""A strict reader for the LIBSVM sparse text format, and the webspam set of the thesis's ch. 5.

Format (LIBSVM / SVMlight without extensions)::

    <label> <index>:<value> <index>:<value> ...\\n

one example per line; indices are 1-based integers, strictly increasing within a line; omitted indices
are zeros; a line with a label only is an all-zero example. The webspam set of the thesis (§5.8, [22] = Webb,
Caverlee & Pu 2006 via the LIBSVM data page) is ``webspam_wc_normalized_unigram.svm``: 350,000 lines, 254
features (normalised unigram counts), labels ``+1`` / ``-1``. The file may be kept compressed (gzip, bzip2 or
xz, recognised by their magic bytes whatever the name).

The parser is strict where ``sklearn.datasets.load_svmlight_file`` is lenient (it accepts ``#`` comments,
``qid:`` fields, blank lines, NaN/Inf values and any label, and its errors carry no line number): every
refusal is a :class:`ValueError` ``FILE:LINE: what is wrong``. Refused: blank lines, comments or any
character outside ``0-9 + - . e E :`` and white space, a token that is not ``index:value``, indices < 1,
> ``n_features``, repeated or not increasing, values that are not finite numbers, labels that are not ±1
(when ``binary_labels``), and a file with no examples.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
from pathlib import Path

import numpy as np

WEBSPAM_FILE = "webspam_wc_normalized_unigram.svm"
WEBSPAM_FEATURES = 254
#: the thesis's training-set size (§5.8: N = 3·10⁵); the remaining lines are the test set
WEBSPAM_TRAIN = 300_000
_ALLOWED = b"0123456789+-.eE: \t\r"
_MAGIC = ((b"\x1f\x8b", gzip.decompress, "gzip"), (b"BZh", bz2.decompress, "bzip2"),
          (b"\xfd7zXZ\x00", lzma.decompress, "xz"))


def _decompress(raw: bytes, source: str) -> bytes:
    for magic, fn, name in _MAGIC:
        if raw.startswith(magic):
            try:
                return fn(raw)
            except Exception as exc:  # OSError, EOFError, lzma.LZMAError, zlib.error
                raise ValueError(f"{source}: corrupt or truncated {name} stream ({exc})") from exc
    return raw


def _bad_token(source: str, lineno: int, tokens: list[bytes], n_features: int) -> ValueError:
    """The first offending token of a line that failed a vectorised check (error path only)."""
    prev = 0
    for t in tokens:
        if t.count(b":") != 1 or t.startswith(b":") or t.endswith(b":"):
            return ValueError(f"{source}:{lineno}: {t.decode(errors='replace')!r} is not index:value")
        i, v = t.split(b":")
        try:
            idx = int(i)
        except ValueError:
            return ValueError(f"{source}:{lineno}: feature index {i.decode(errors='replace')!r} is not an integer")
        try:
            val = float(v)
        except ValueError:
            return ValueError(f"{source}:{lineno}: value {v.decode(errors='replace')!r} of feature {idx} is not a number")
        if idx < 1 or idx > n_features:
            return ValueError(f"{source}:{lineno}: feature index {idx} outside 1 … {n_features}")
        if idx <= prev:
            return ValueError(f"{source}:{lineno}: feature index {idx} after {prev}: indices must increase strictly")
        if not np.isfinite(val):
            return ValueError(f"{source}:{lineno}: value {v.decode(errors='replace')!r} of feature {idx} is not finite")
        prev = idx
    return ValueError(f"{source}:{lineno}: malformed line")


def parse_libsvm(raw: bytes, n_features: int, source: str = "<bytes>", *, binary_labels: bool = True,
                 dtype: np.dtype | type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Decode LIBSVM text (already decompressed): dense ``X`` (N, n_features) and labels ``y`` (N,) float64."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError(f"parse_libsvm needs the file's bytes, got {type(raw).__name__}")
    if isinstance(n_features, bool) or not isinstance(n_features, (int, np.integer)) or n_features < 1:
        raise ValueError(f"n_features must be an integer >= 1, got {n_features!r}")
    lines = bytes(raw).split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline
    if not lines:
        raise ValueError(f"{source}: no examples (empty file)")
    labels = np.empty(len(lines), np.float64)
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    for k, line in enumerate(lines):
        lineno = k + 1
        junk = line.translate(None, _ALLOWED)
        if junk:
            c = junk[:1].decode("latin-1")
            what = "a comment ('#')" if c == "#" else f"the character {c!r}"
            raise ValueError(f"{source}:{lineno}: {what} is not allowed in a LIBSVM data line")
        tokens = line.split()
        if not tokens:
            raise ValueError(f"{source}:{lineno}: blank line (every line holds one example: <label> <index>:<value> …)")
        if b":" in tokens[0]:
            raise ValueError(f"{source}:{lineno}: the line starts with {tokens[0].decode()!r}, not with a label")
        try:
            lab = float(tokens[0])
        except ValueError:
            raise ValueError(f"{source}:{lineno}: label {tokens[0].decode()!r} is not a number") from None
        if binary_labels and lab not in (1.0, -1.0):
            raise ValueError(f"{source}:{lineno}: label {tokens[0].decode()!r}: the labels of a binary LIBSVM set are +1 and -1")
        if not np.isfinite(lab):
            raise ValueError(f"{source}:{lineno}: label {tokens[0].decode()!r} is not finite")
        labels[k] = lab
        pairs = tokens[1:]
        if not pairs:
            rows.append((np.zeros(0, np.int64), np.zeros(0)))
            continue
        joined = b" ".join(pairs)
        nums = joined.replace(b":", b" ").split()
        if joined.count(b":") != len(pairs) or len(nums) != 2 * len(pairs):
            raise _bad_token(source, lineno, pairs, n_features)
        try:
            idx = np.array(nums[0::2]).astype(np.int64)
            val = np.array(nums[1::2]).astype(np.float64)
        except ValueError:
            raise _bad_token(source, lineno, pairs, n_features) from None
        if idx[0] < 1 or idx[-1] > n_features or (len(idx) > 1 and not (np.diff(idx) > 0).all()) \
                or not np.isfinite(val).all():
            raise _bad_token(source, lineno, pairs, n_features)
        rows.append((idx, val))
    X = np.zeros((len(rows), int(n_features)), dtype=dtype)
    for k, (idx, val) in enumerate(rows):
        X[k, idx - 1] = val
    return X, labels


def read_libsvm(path: str | os.PathLike, n_features: int, *, binary_labels: bool = True,
                dtype: np.dtype | type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Read one LIBSVM file (plain, gzip, bzip2 or xz)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LIBSVM file not found: {path}")
    raw = _decompress(path.read_bytes(), str(path))
    return parse_libsvm(raw, n_features, str(path), binary_labels=binary_labels, dtype=dtype)


def write_libsvm(path: str | os.PathLike, X: np.ndarray, y: np.ndarray) -> Path:
    """Write ``X`` (dense; zeros omitted) and labels ``y`` in LIBSVM text (for tests and small sets)."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    if X.ndim != 2 or y.shape != (len(X),):
        raise ValueError(f"X must be (N, d) and y (N,), got {X.shape} and {y.shape}")
    lines = []
    for row, lab in zip(X, y):
        nz = np.flatnonzero(row)
        lines.append(" ".join([f"{int(lab):+d}"] + [f"{i + 1}:{row[i]!r}" for i in nz]))
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def find_webspam(data_dir: str | os.PathLike) -> Path:
    """``webspam_wc_normalized_unigram.svm`` (or .bz2/.xz/.gz) in ``data_dir`` or ``data_dir/webspam``."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"webspam: data directory {root} does not exist; it must contain {WEBSPAM_FILE}")
    for d in (root, root / "webspam"):
        for suffix in ("", ".bz2", ".xz", ".gz"):
            p = d / (WEBSPAM_FILE + suffix)
            if p.is_file():
                return p
    raise FileNotFoundError(
        f"webspam: {WEBSPAM_FILE}[.bz2|.xz|.gz] not found in {root} or {root / 'webspam'} (the LIBSVM data page's "
        "'webspam, unigram' file); pass --data-dir / data_dir pointing at its folder (nothing is downloaded)."
    )


def webspam_test_size(n: int) -> int:
    """Test lines: everything after the thesis's 300,000 training lines; for smaller files one in seven
    (the same 6:1 ratio as 300,000 : 50,000), at least one."""
    if n < 2:
        raise ValueError(f"webspam needs at least 2 examples to split, the file has {n}")
    return n - WEBSPAM_TRAIN if n > WEBSPAM_TRAIN else min(n - 1, max(1, round(n / 7)))
