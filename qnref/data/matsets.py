"""Readers for the FACES and CURVES autoencoder sets (Hinton & Salakhutdinov 2006) in their published MATLAB files.

Both files are distributed by James Martens with his Hessian-free code (www.cs.toronto.edu/~jmartens/) and are
read by the reference code of the texts (K-FAC, K-BFGS, TNT) with ``scipy.io.loadmat``, i.e. they are MATLAB
level-5 MAT-files (not v7.3/HDF5, which ``loadmat`` cannot read):

- **CURVES** ``digs3pts_1.mat`` (Salakhutdinov): ``bdata`` (20000, 784) training images and ``bdatatest``
  (10000, 784) test images, one 28×28 curve image per **row**, intensities in [0, 1] (the thesis' Table 2.3:
  20,000 / 10,000; sigmoid + binary cross-entropy). The file also holds ``tdata``/``tdatatest``; they are not read.
- **FACES** ``newfaces_rot_single.mat``: ``newfaces_single`` (625, 165600) single precision, one 25×25 face per
  **column** (the K-BFGS/K-FAC code transposes it). The split is Martens' and the thesis's: the first
  ``N·25/40`` columns (103,500) are the training set; the thesis (Table 2.3) takes the remaining 62,100 as its test
  set (Martens' MATLAB demo used only the last ``N·10/40`` = 41,400 of them). Real-valued: squared error.

Safety: ``scipy.io.loadmat`` parses data only (MATLAB objects, function handles and opaque classes come back as
inert arrays, no code runs); qnref asks it for the named variables only and accepts nothing but a real numeric
2-D array of the published orientation. Refused with a :class:`ValueError` naming the file: not a MAT-file,
a v7.3 (HDF5) file, a truncated or corrupt file, a missing variable, a wrong shape or dtype, NaN/Inf values, and
CURVES values outside [0, 1].
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

CURVES_FILE = "digs3pts_1.mat"
FACES_FILE = "newfaces_rot_single.mat"
CURVES_DIM, FACES_DIM = 784, 625
FACES_VAR = "newfaces_single"
CURVES_VARS = ("bdata", "bdatatest")
#: sub-folders searched below data_dir (the reference codes keep each set in its own folder)
_SUBDIRS = {"curves": ("", "CURVES", "curves"), "faces": ("", "FACES", "faces")}


def _find(data_dir: str | os.PathLike, kind: str, filename: str) -> Path:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{kind}: data directory {root} does not exist; it must contain {filename}")
    for sub in _SUBDIRS[kind]:
        p = (root / sub / filename) if sub else root / filename
        if p.is_file():
            return p
    where = ", ".join(str(root / s) if s else str(root) for s in _SUBDIRS[kind])
    raise FileNotFoundError(
        f"{kind}: {filename} not found in {where}. It is the published file of www.cs.toronto.edu/~jmartens/; "
        "pass --data-dir / data_dir pointing at its folder (nothing is downloaded)."
    )


def read_mat_arrays(path: str | os.PathLike, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named variables of a MATLAB v4/v5/v7 MAT-file as real numeric 2-D arrays (strictly checked)."""
    from scipy.io import loadmat  # noqa: PLC0415 - scipy is a dependency; keep it off the import path
    from scipy.io.matlab import matfile_version  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MAT-file not found: {path}")
    try:
        major, _minor = matfile_version(str(path))
    except Exception as exc:  # ValueError "Unknown mat file type", OSError "could not read bytes", …
        raise ValueError(f"{path}: not a MATLAB MAT-file ({type(exc).__name__}: {exc})") from exc
    if major == 2:
        raise ValueError(
            f"{path}: a MATLAB v7.3 (HDF5) MAT-file; the published file is a level-5 MAT-file (readable by "
            "scipy.io.loadmat). Re-save it in MATLAB with save(..., '-v7') or use the original download."
        )
    try:
        got = loadmat(str(path), variable_names=list(names), squeeze_me=False, mat_dtype=False)
    except Exception as exc:  # truncated streams raise IndexError/OSError/ValueError/zlib errors
        raise ValueError(f"{path}: corrupt or truncated MAT-file ({type(exc).__name__}: {exc})") from exc
    out: dict[str, np.ndarray] = {}
    for n in names:
        if n not in got:
            present = sorted(k for k in got if not k.startswith("__"))
            raise ValueError(f"{path}: lacks the variable {n!r} (asked for {list(names)}, found {present or 'none'})")
        a = got[n]
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiu" or a.ndim != 2:
            desc = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"{path}: variable {n!r} must be a real numeric 2-D matrix, got {desc}")
        if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
            raise ValueError(f"{path}: variable {n!r} holds {int((~np.isfinite(a)).sum())} NaN/Inf value(s)")
        out[n] = a
    return out


def load_curves_arrays(data_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """CURVES: ``X_train`` (N, 784) and ``X_test`` (M, 784) float32 in [0, 1] from ``digs3pts_1.mat``."""
    path = _find(data_dir, "curves", CURVES_FILE)
    a = read_mat_arrays(path, CURVES_VARS)
    out = {}
    for var, split in zip(CURVES_VARS, ("train", "test")):
        x = a[var]
        if x.shape[1] != CURVES_DIM or x.shape[0] < 1:
            raise ValueError(f"{path}: {var} must be (N, {CURVES_DIM}) with one 28×28 image per row, got {x.shape}")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"{path}: {var} values span [{lo:g}, {hi:g}]; CURVES intensities lie in [0, 1]")
        out[f"X_{split}"] = x.astype(np.float32)
    return out


def faces_split(n: int) -> int:
    """Training columns of FACES: the first ``n·25/40`` (103,500 of 165,600; Martens' and the thesis's rule)."""
    return (n * 25) // 40


def load_faces_arrays(data_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """FACES: ``X_train`` (⌊N·25/40⌋, 625) and ``X_test`` (the rest) float32 from ``newfaces_rot_single.mat``."""
    path = _find(data_dir, "faces", FACES_FILE)
    x = read_mat_arrays(path, (FACES_VAR,))[FACES_VAR]
    if x.shape[0] != FACES_DIM:
        raise ValueError(
            f"{path}: {FACES_VAR} must be ({FACES_DIM}, N) with one 25×25 face per column (the published layout), "
            f"got {x.shape}"
        )
    n = x.shape[1]
    k = faces_split(n)
    if k < 1 or k >= n:
        raise ValueError(f"{path}: {FACES_VAR} has {n} columns; the 25/40 split needs at least 2")
    x = np.ascontiguousarray(x.T, dtype=np.float32)
    return {"X_train": x[:k], "X_test": x[k:]}
