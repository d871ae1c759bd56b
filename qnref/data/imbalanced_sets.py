"""The 27 imbalanced benchmark sets of [MB] §5.1 (Griffin et al., MB-LSR1), read from their published files.

[MB] §5.1 (L411-414): "A set of 27 different problems, mostly used in benchmarking the imbalanced data set
scenarios, were chosen from [7]" — [7] = Z. Ding, PhD thesis (Georgia State University, 2011). These are the
27 sets of imbalanced-learn's :func:`imblearn.datasets.fetch_datasets`, published on Zenodo as one archive,
https://zenodo.org/record/61452/files/benchmark-imbalanced-learn.tar.gz (:data:`BENCHMARK_URL`).

Published format (imbalanced-learn ``imblearn/datasets/_zenodo.py``): the archive unpacks to one NumPy
``.npz`` per set, ``x{ID}data.npz`` with ID 1…27 in the order of :data:`BENCHMARK`, holding two arrays:
``data`` (N, F) (the features) and ``label`` (N,) with values −1 (majority) and 1 (minority; e.g. ecoli
has 301 × −1 and 35 × 1). imbalanced-learn returns ``label`` as it is stored; here −1 → 0 and 1 → 1, so
the minority class is the positive class of one sigmoid output (targets (N, 1), as qnref's ``imbalanced``
and ``webspam`` sets).

Nothing is downloaded: unpack the archive yourself and pass its folder as ``data_dir`` (the files may lie
in ``data_dir`` or in ``data_dir/zenodo``, imbalanced-learn's own cache layout). Files are read with
``np.load(..., allow_pickle=False)``: a file that needs pickle (object arrays) is refused, as is a missing,
truncated or malformed one, with a ValueError / FileNotFoundError naming the file.

The text gives no split: ours is a seeded, class-stratified 80/20 train/test split
(:data:`TEST_FRACTION`, :func:`split_sizes`); the features are used as stored unless ``standardize=True``
(train-split statistics per feature).
"""
from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import Dataset, train_test_split

BENCHMARK_URL = "https://zenodo.org/record/61452/files/benchmark-imbalanced-learn.tar.gz"
TEST_FRACTION = 0.2  # n/g by [MB]: our stratified 80/20 split

#: name → (ID, #S samples, #F features, imbalance ratio majority:minority), imbalanced-learn's table
#: (``fetch_datasets`` docstring, the version with abalone's 10 one-hot features and protein_homo 111:1)
BENCHMARK: dict[str, tuple[int, int, int, float]] = {
    "ecoli": (1, 336, 7, 8.6),
    "optical_digits": (2, 5620, 64, 9.1),
    "satimage": (3, 6435, 36, 9.3),
    "pen_digits": (4, 10992, 16, 9.4),
    "abalone": (5, 4177, 10, 9.7),
    "sick_euthyroid": (6, 3163, 42, 9.8),
    "spectrometer": (7, 531, 93, 11),
    "car_eval_34": (8, 1728, 21, 12),
    "isolet": (9, 7797, 617, 12),
    "us_crime": (10, 1994, 100, 12),
    "yeast_ml8": (11, 2417, 103, 13),
    "scene": (12, 2407, 294, 13),
    "libras_move": (13, 360, 90, 14),
    "thyroid_sick": (14, 3772, 52, 15),
    "coil_2000": (15, 9822, 85, 16),
    "arrhythmia": (16, 452, 278, 17),
    "solar_flare_m0": (17, 1389, 32, 19),
    "oil": (18, 937, 49, 22),
    "car_eval_4": (19, 1728, 21, 26),
    "wine_quality": (20, 4898, 11, 26),
    "letter_img": (21, 20000, 16, 26),
    "yeast_me2": (22, 1484, 8, 28),
    "webpage": (23, 34780, 300, 33),
    "ozone_level": (24, 2536, 72, 34),
    "mammography": (25, 11183, 6, 42),
    "protein_homo": (26, 145751, 74, 111),
    "abalone_19": (27, 4177, 10, 130),
}
NAMES: tuple[str, ...] = tuple(BENCHMARK)


def _check_name(problem: Any) -> str:
    if not isinstance(problem, str) or problem.strip().lower() not in BENCHMARK:
        raise ValueError(f"problem must name one of the 27 imbalanced benchmark sets {list(NAMES)}, got {problem!r}")
    return problem.strip().lower()


def file_name(problem: str) -> str:
    """The published file of a set: ``x{ID}data.npz`` (imbalanced-learn's PRE_FILENAME + ID + POST_FILENAME)."""
    return f"x{BENCHMARK[_check_name(problem)][0]}data.npz"


def split_sizes(n: int, test_fraction: float = TEST_FRACTION) -> tuple[int, int]:
    """(n_train, n_test) of our split of ``n`` rows: n_test = round(test_fraction · n), as
    :func:`qnref.data.dataset.train_test_split` rounds it."""
    n_test = int(round(float(test_fraction) * int(n)))
    return int(n) - n_test, n_test


def find_file(data_dir: str | os.PathLike, problem: str) -> Path:
    """``data_dir/x{ID}data.npz`` or ``data_dir/zenodo/x{ID}data.npz``; FileNotFoundError naming both."""
    d = Path(data_dir).expanduser()
    name = file_name(problem)
    for cand in (d / name, d / "zenodo" / name):
        if cand.is_file():
            return cand
    raise FileNotFoundError(
        f"imbalanced benchmark set {problem!r}: {name} not found in {d} or {d / 'zenodo'} (nothing is downloaded: "
        f"unpack {BENCHMARK_URL} there; see docs/data.md)")


def read_benchmark_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """X (N, F) float64 and y (N,) int64 in {0, 1} (stored −1 → 0, 1 → 1 = minority) from one published file.

    Refused with a ValueError naming the file: not a readable .npz (truncated, corrupted), arrays that need
    pickle (object dtype), a missing ``data`` / ``label`` array, wrong shapes, non-finite or non-numeric
    features, labels other than −1 / 1, or a single class."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            missing = sorted({"data", "label"} - keys)
            if missing:
                raise ValueError(f"{p}: missing array(s) {missing} (the published files hold 'data' and 'label'; "
                                 f"found {sorted(keys)})")
            X, labels = np.array(z["data"]), np.array(z["label"])
    except FileNotFoundError:
        raise
    except ValueError as exc:
        if str(exc).startswith(str(p)):
            raise
        # np.load raises ValueError for object arrays under allow_pickle=False and for non-npz contents
        raise ValueError(f"{p}: cannot be read as a NumPy .npz without pickle ({exc}); files that need pickle "
                         "are refused") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"{p}: not a readable .npz file (truncated or corrupted?): {exc}") from None
    if X.ndim != 2 or X.shape[0] < 2 or X.shape[1] < 1:
        raise ValueError(f"{p}: 'data' must be a 2-D array (N ≥ 2 rows, F ≥ 1 features), got shape {X.shape}")
    if labels.ndim != 1 or len(labels) != len(X):
        raise ValueError(f"{p}: 'label' must be 1-D with one entry per row of 'data' ({len(X)}), got shape {labels.shape}")
    if not (np.issubdtype(X.dtype, np.number) or X.dtype == np.bool_) or np.iscomplexobj(X):
        raise ValueError(f"{p}: 'data' must be real numeric, got dtype {X.dtype}")
    if not np.issubdtype(labels.dtype, np.number) or np.iscomplexobj(labels):
        raise ValueError(f"{p}: 'label' must be numeric (−1 / 1), got dtype {labels.dtype}")
    X = X.astype(np.float64)
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{p}: 'data' holds {int(np.size(X) - np.isfinite(X).sum())} non-finite value(s)")
    values = set(np.unique(labels).tolist())
    if not values <= {-1, 1}:
        raise ValueError(f"{p}: 'label' must hold −1 (majority) and 1 (minority) only, got values {sorted(values)}")
    if values != {-1, 1}:
        raise ValueError(f"{p}: 'label' holds one class only ({sorted(values)}); a benchmark set has both")
    return X, (labels == 1).astype(np.int64)


def load_imbalanced_benchmark(
    *,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    problem: str | None = None,
    test_fraction: float = TEST_FRACTION,
    standardize: bool = False,
) -> Dataset:
    """The benchmark set ``problem`` (one of :data:`NAMES`) from ``data_dir``: task "binary", loss
    sigmoid_ce, targets (N, 1) in {0, 1} (1 = minority), a seeded stratified split (default 80/20)."""
    from .registry import resolve_data_dir  # noqa: PLC0415 - the registry imports this module

    if problem is None:
        raise ValueError(f"imbalanced-benchmark needs problem=NAME, one of {list(NAMES)}")
    key = _check_name(problem)
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    path = find_file(resolve_data_dir(data_dir, "imbalanced-benchmark"), key)
    X, y = read_benchmark_npz(path)
    ident, n_s, n_f, ratio = BENCHMARK[key]
    if X.shape[1] != n_f:
        warnings.warn(f"{path}: {X.shape[1]} features, imbalanced-learn's table lists {n_f} for {key}", stacklevel=2)
    n_pos = int(y.sum())
    if n_pos > len(y) - n_pos:
        warnings.warn(f"{path}: label 1 is the majority ({n_pos} of {len(y)}); the published sets mark the minority 1",
                      stacklevel=2)
    Xtr, ytr, Xte, yte = train_test_split(X, y, test_fraction=float(test_fraction), seed=seed, stratify=True)
    ds = Dataset(
        "imbalanced-benchmark", Xtr, ytr[:, None].astype(np.float64), Xte, yte[:, None].astype(np.float64),
        input_shape=(X.shape[1],), n_classes=2, task="binary", loss="sigmoid_ce",
        info={"source": f"{path} (imbalanced-learn benchmark, Zenodo record 61452; Ding 2011), set {ident} {key!r}",
              "problem": key, "labels": "−1 → 0 (majority), 1 → 1 (minority)",
              "class_counts": {"0": len(y) - n_pos, "1": n_pos},
              "table": {"samples": n_s, "features": n_f, "ratio": f"{ratio:g}:1"},
              "split": f"seeded stratified {1 - float(test_fraction):g}/{float(test_fraction):g}: {len(Xtr)} train / "
                       f"{len(Xte)} test (n/g by [MB] §5.1)",
              "scaling": "as stored"},
    )
    if standardize:
        ds = ds.standardized(per="feature")
        ds.info["scaling"] = "as stored, then standardized per feature (train statistics)"
    return ds
