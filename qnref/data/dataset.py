"""The :class:`Dataset` container, deterministic splits and train-statistics scalers.

A :class:`Dataset` holds a train and a test split as arrays (NumPy on the host after loading,
NumPy or CuPy after :meth:`Dataset.to`), the per-example input shape the models expect, and
what kind of targets it carries:

============== =================================== =============== =======================
task           targets ``y``                       ``n_classes``   suggested ``loss``
============== =================================== =============== =======================
classification integer labels (N,), 0 … C−1        C               ``softmax_ce``
binary         floats in {0, 1}, shape (N, 1)      2               ``sigmoid_ce``
autoencoder    the inputs, flattened (N, D)        ``None``        ``sigmoid_ce`` / ``mse``
regression     floats (N, K)                       ``None``        ``mse``
============== =================================== =============== =======================

The ``binary`` layout matches a network with **one** output and ``sigmoid_ce``
(``qnref.nn.losses`` requires targets of the output's shape); :meth:`Dataset.as_classification`
turns it into two-class integer labels for a two-output network with ``softmax_ce``.

All randomness goes through ``numpy.random.Generator`` objects created from integer seeds, so a
seed reproduces the same split / subset on a given NumPy version. Statistics for
standardisation and min–max scaling are always fitted on the **training split only** and then
applied to both splits.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

from .. import backend

TASKS = ("classification", "binary", "autoencoder", "regression")
LOSS_NAMES = ("softmax_ce", "sigmoid_ce", "mse")
_ALLOWED_LOSSES = {
    "classification": ("softmax_ce",),
    "binary": ("sigmoid_ce", "mse"),
    "autoencoder": ("sigmoid_ce", "mse"),
    "regression": ("mse", "sigmoid_ce"),
}

Per = Literal["feature", "channel", "global"]


# --------------------------------------------------------------------------------------------
# randomness helpers
# --------------------------------------------------------------------------------------------
def as_generator(seed: int | np.random.Generator | None) -> np.random.Generator:
    """A ``numpy.random.Generator`` from an integer seed (or pass a Generator through).

    ``None`` is rejected: every split and batch order in qnref must be reproducible.
    """
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        raise ValueError("a seed (int) or numpy.random.Generator is required; qnref data is deterministic")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or numpy.random.Generator, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return np.random.default_rng(int(seed))


def _check_count(n: Any, what: str, low: int, high: int) -> int:
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, got {n!r}")
    n = int(n)
    if n < low or n > high:
        raise ValueError(f"{what} must lie in [{low}, {high}], got {n}")
    return n


def _allocate(counts: np.ndarray, n: int) -> np.ndarray:
    """Split ``n`` over classes proportionally to ``counts`` (largest remainder, exact total)."""
    total = int(counts.sum())
    quota = counts * (n / total)
    alloc = np.floor(quota).astype(np.int64)
    alloc = np.minimum(alloc, counts)
    rest = n - int(alloc.sum())
    if rest > 0:
        # largest fractional remainder first; ties → larger class, then lower label (stable)
        order = np.lexsort((np.arange(len(counts)), -counts, -(quota - np.floor(quota))))
        for c in order:
            if rest == 0:
                break
            if alloc[c] < counts[c]:
                alloc[c] += 1
                rest -= 1
        # (rest > 0 only if every class is exhausted, impossible since n <= total)
    return alloc


def stratified_indices(labels: Any, n: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """``n`` distinct indices into ``labels`` whose class proportions follow the whole set.

    Class shares are allocated by the largest-remainder rule (the total is exactly ``n``), the
    members of each class are drawn uniformly without replacement, and the result is returned in
    a random (seeded) order so classes interleave.
    """
    y = np.asarray(backend.to_numpy(labels)).reshape(len(labels), -1)
    if y.shape[1] != 1:
        raise ValueError(f"stratification needs one label per example, got label shape {y.shape[1:]}")
    y = y[:, 0]
    n = _check_count(n, "n", 0, len(y))
    rng = as_generator(seed)
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    alloc = _allocate(counts, n)
    picked = []
    for c in range(len(classes)):
        members = np.flatnonzero(inverse == c)
        picked.append(members[rng.permutation(len(members))[: alloc[c]]])
    idx = np.concatenate(picked) if picked else np.zeros(0, np.int64)
    return idx[rng.permutation(len(idx))].astype(np.int64)


def train_test_split(
    X: Any,
    y: Any,
    *,
    n_test: int | None = None,
    test_fraction: float | None = None,
    seed: int | np.random.Generator = 0,
    stratify: bool = True,
) -> tuple[Any, Any, Any, Any]:
    """Deterministic split into ``(X_train, y_train, X_test, y_test)``.

    Give exactly one of ``n_test`` (a count) or ``test_fraction`` (rounded to the nearest count).
    With ``stratify=True`` (labels must be one per example) every class keeps its share in both
    splits (largest-remainder allocation); otherwise a plain seeded permutation is used. Both
    splits come back shuffled.
    """
    n = len(X)
    if len(y) != n:
        raise ValueError(f"X has {n} rows but y has {len(y)}")
    if (n_test is None) == (test_fraction is None):
        raise ValueError("give exactly one of n_test or test_fraction")
    if test_fraction is not None:
        if not 0.0 < float(test_fraction) < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        n_test = int(round(float(test_fraction) * n))
    n_test = _check_count(n_test, "n_test", 1, n - 1)
    rng = as_generator(seed)
    if stratify:
        test_idx = stratified_indices(y, n_test, rng)
    else:
        test_idx = rng.permutation(n)[:n_test]
    mask = np.ones(n, dtype=bool)
    mask[test_idx] = False
    train_idx = np.flatnonzero(mask)
    train_idx = train_idx[rng.permutation(len(train_idx))]
    return X[train_idx], y[train_idx], X[test_idx], y[test_idx]


# --------------------------------------------------------------------------------------------
# scalers (statistics from the training split only)
# --------------------------------------------------------------------------------------------
def _reduce_axes(ndim: int, per: Per) -> tuple[int, ...]:
    if per == "feature":
        return (0,)
    if per == "channel":
        if ndim < 3:
            raise ValueError("per='channel' needs inputs (N, C, ...) with a channel axis")
        return (0,) + tuple(range(2, ndim))
    if per == "global":
        return tuple(range(ndim))
    raise ValueError(f"per must be 'feature', 'channel' or 'global', got {per!r}")


@dataclass(eq=False)
class Scaler:
    """An affine map ``x ↦ (x − shift) / scale`` with statistics broadcastable to one example."""

    shift: Any
    scale: Any
    kind: str = "affine"

    def __call__(self, X: Any) -> Any:
        xp = backend.namespace(X)
        dt = X.dtype if X.dtype.kind == "f" else np.float64
        shift = xp.asarray(backend.to_device(self.shift, backend.device_of(X)), dtype=dt)
        scale = xp.asarray(backend.to_device(self.scale, backend.device_of(X)), dtype=dt)
        return (X.astype(dt, copy=False) - shift) / scale

    def inverse(self, Z: Any) -> Any:
        xp = backend.namespace(Z)
        shift = xp.asarray(backend.to_device(self.shift, backend.device_of(Z)), dtype=Z.dtype)
        scale = xp.asarray(backend.to_device(self.scale, backend.device_of(Z)), dtype=Z.dtype)
        return Z * scale + shift


def fit_standardizer(X_train: Any, *, per: Per = "feature", eps: float = 1e-8) -> Scaler:
    """Mean / standard deviation of the training inputs (float64 statistics).

    ``per='feature'`` gives one statistic per input entry, ``'channel'`` one per channel of
    (N, C, H, W)-like inputs, ``'global'`` a single pair. Constant entries (std ≤ eps, e.g. the
    always-black border pixels of ``digits``) get scale 1, so they map to 0 instead of ±inf.
    """
    X = backend.to_numpy(X_train).astype(np.float64, copy=False)
    axes = _reduce_axes(X.ndim, per)
    mean = X.mean(axis=axes, keepdims=True)[0]
    std = X.std(axis=axes, keepdims=True)[0]
    std = np.where(std > eps, std, 1.0)
    return Scaler(mean, std, kind=f"standardize[{per}]")


def fit_minmax(
    X_train: Any, *, per: Per = "global", feature_range: tuple[float, float] = (0.0, 1.0)
) -> Scaler:
    """Min–max scaling of the training inputs to ``feature_range`` (constant entries → low end)."""
    lo_t, hi_t = (float(v) for v in feature_range)
    if not hi_t > lo_t:
        raise ValueError(f"feature_range must be increasing, got {feature_range}")
    X = backend.to_numpy(X_train).astype(np.float64, copy=False)
    axes = _reduce_axes(X.ndim, per)
    lo = X.min(axis=axes, keepdims=True)[0]
    hi = X.max(axis=axes, keepdims=True)[0]
    width = np.where(hi > lo, hi - lo, 1.0)
    scale = width / (hi_t - lo_t)
    shift = lo - lo_t * scale
    return Scaler(shift, scale, kind=f"minmax[{per}]")


# --------------------------------------------------------------------------------------------
# the container
# --------------------------------------------------------------------------------------------
def _shape_summary(a: Any) -> str:
    return f"{tuple(a.shape)} {a.dtype}" + (" [gpu]" if backend.is_cupy_array(a) else "")


@dataclass(eq=False)
class Dataset:
    """A train/test pair of arrays plus what a model and a loss need to know about them.

    Construction checks shapes only (cheap, no data touched); :meth:`validate` checks values
    (finite inputs and targets, label range, ``sigmoid_ce`` targets in [0, 1]) and is run by
    every loader in :mod:`qnref.data.registry`. Methods return new datasets (arrays are shared
    where no change is needed) and never modify ``self``.
    """

    name: str
    X_train: Any = field(repr=False)
    y_train: Any = field(repr=False)
    X_test: Any = field(repr=False)
    y_test: Any = field(repr=False)
    input_shape: tuple[int, ...]
    n_classes: int | None
    task: str
    loss: str
    info: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(d) for d in self.input_shape)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"loss must be one of {LOSS_NAMES}, got {self.loss!r}")
        if self.loss not in _ALLOWED_LOSSES[self.task]:
            raise ValueError(
                f"loss {self.loss!r} does not fit task {self.task!r}; use one of {_ALLOWED_LOSSES[self.task]}"
            )
        backend.namespace(self.X_train, self.y_train, self.X_test, self.y_test)  # one backend
        for split, X, y in (("train", self.X_train, self.y_train), ("test", self.X_test, self.y_test)):
            if tuple(X.shape[1:]) != self.input_shape:
                raise ValueError(
                    f"{self.name}: X_{split} has example shape {tuple(X.shape[1:])}, "
                    f"expected input_shape {self.input_shape}"
                )
            if len(y) != len(X):
                raise ValueError(f"{self.name}: X_{split} has {len(X)} rows but y_{split} has {len(y)}")
            self._check_target_shape(split, y)
        if self.task in ("classification", "binary"):
            if self.n_classes is None or int(self.n_classes) < 2:
                raise ValueError(f"{self.name}: task {self.task!r} needs n_classes >= 2, got {self.n_classes}")
            self.n_classes = int(self.n_classes)
            if self.task == "binary" and self.n_classes != 2:
                raise ValueError(f"{self.name}: a binary task has n_classes=2, got {self.n_classes}")
        elif self.n_classes is not None:
            raise ValueError(f"{self.name}: task {self.task!r} has n_classes=None, got {self.n_classes}")

    def _check_target_shape(self, split: str, y: Any) -> None:
        if self.task == "classification":
            if y.ndim != 1 or y.dtype.kind not in "iu":
                raise ValueError(
                    f"{self.name}: classification targets y_{split} must be integer labels (N,), "
                    f"got {_shape_summary(y)}"
                )
        else:
            if y.dtype.kind != "f":
                raise ValueError(f"{self.name}: {self.task} targets y_{split} must be floating point, got {y.dtype}")
            if self.task == "binary" and tuple(y.shape[1:]) != (1,):
                raise ValueError(f"{self.name}: binary targets y_{split} must have shape (N, 1), got {tuple(y.shape)}")
            if self.task == "autoencoder" and tuple(y.shape[1:]) != (self.input_dim,):
                raise ValueError(
                    f"{self.name}: autoencoder targets y_{split} must be the flattened inputs "
                    f"(N, {self.input_dim}), got {tuple(y.shape)}"
                )
            if self.task == "regression" and y.ndim != 2:
                raise ValueError(f"{self.name}: regression targets y_{split} must be (N, K), got {tuple(y.shape)}")

    # ---------------------------------------------------------------- properties
    @property
    def n_train(self) -> int:
        return int(len(self.X_train))

    @property
    def n_test(self) -> int:
        return int(len(self.X_test))

    @property
    def input_dim(self) -> int:
        """Number of input entries per example, prod(input_shape)."""
        return int(math.prod(self.input_shape))

    @property
    def n_outputs(self) -> int:
        """Width of the network output this data set's targets and loss expect."""
        if self.task == "classification":
            return int(self.n_classes)  # type: ignore[arg-type]
        return int(math.prod(self.y_train.shape[1:]))

    @property
    def device(self) -> str:
        return backend.device_of(self.X_train)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, task={self.task}, loss={self.loss}, input_shape={self.input_shape}, "
            f"n_classes={self.n_classes}, train={_shape_summary(self.X_train)}, test={_shape_summary(self.X_test)})"
        )

    def replace(self, **changes: Any) -> "Dataset":
        """A copy with some fields changed (``info`` is copied, not shared)."""
        changes.setdefault("info", dict(self.info))
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- checks
    def validate(self) -> "Dataset":
        """Check values; raise :class:`ValueError` naming the split and the problem. Returns self."""
        xp = backend.namespace(self.X_train)
        for split, X, y in (("train", self.X_train, self.y_train), ("test", self.X_test, self.y_test)):
            if X.dtype.kind not in "fiub":
                raise ValueError(f"{self.name}: X_{split} has non-numeric dtype {X.dtype}")
            if X.dtype.kind == "f" and X.size and not bool(xp.isfinite(X).all()):
                bad = int((~xp.isfinite(X)).sum())
                raise ValueError(f"{self.name}: X_{split} contains {bad} NaN/Inf value(s)")
            if y.dtype.kind == "f" and y.size and not bool(xp.isfinite(y).all()):
                bad = int((~xp.isfinite(y)).sum())
                raise ValueError(f"{self.name}: y_{split} contains {bad} NaN/Inf value(s)")
            if self.task == "classification" and y.size:
                lo, hi = int(y.min()), int(y.max())
                if lo < 0 or hi >= self.n_classes:  # type: ignore[operator]
                    raise ValueError(
                        f"{self.name}: y_{split} labels span [{lo}, {hi}], expected 0 … {self.n_classes - 1}"  # type: ignore[operator]
                    )
            if self.task == "binary" and y.size and not bool(((y == 0) | (y == 1)).all()):
                raise ValueError(f"{self.name}: binary targets y_{split} must be 0 or 1")
            if self.loss == "sigmoid_ce" and y.size and (bool((y < 0).any()) or bool((y > 1).any())):
                raise ValueError(f"{self.name}: sigmoid_ce targets y_{split} must lie in [0, 1]")
        return self

    # ---------------------------------------------------------------- conversions
    def to(self, device: backend.Device = "cpu", dtype: Any = "float64") -> "Dataset":
        """Arrays on ``device`` ("cpu"/"gpu"): inputs (and float targets) in ``dtype``, labels int64.

        The cast happens on the host before the transfer, so float32 moves half the bytes.
        """
        dt = backend.check_dtype(dtype)

        def move(a: Any, target: Any) -> Any:
            if backend.is_cupy_array(a) and device == "gpu":
                return a.astype(target, copy=False)
            host = backend.to_numpy(a).astype(target, copy=False)
            return backend.to_device(host, device)

        ytype = np.int64 if self.task == "classification" else dt
        return self.replace(
            X_train=move(self.X_train, dt),
            y_train=move(self.y_train, ytype),
            X_test=move(self.X_test, dt),
            y_test=move(self.y_test, ytype),
        )

    def subset(
        self,
        n_train: int | None = None,
        n_test: int | None = None,
        *,
        seed: int | np.random.Generator | None = None,
        stratify: bool = True,
    ) -> "Dataset":
        """Keep ``n_train`` training and ``n_test`` test examples (``None`` keeps a split whole).

        ``seed=None`` keeps the first rows (nested: a smaller subset is a prefix of a larger one);
        an integer seed draws a random subset without replacement, stratified by class for
        classification and binary tasks unless ``stratify=False``.
        """
        rng = None if seed is None else as_generator(seed)
        out = {}
        for split, n in (("train", n_train), ("test", n_test)):
            X, y = getattr(self, f"X_{split}"), getattr(self, f"y_{split}")
            if n is None:
                out[f"X_{split}"], out[f"y_{split}"] = X, y
                continue
            n = _check_count(n, f"n_{split}", 1, len(X))
            if rng is None:
                idx = np.arange(n)
            elif stratify and self.task in ("classification", "binary"):
                idx = stratified_indices(y, n, rng)
            else:
                idx = np.sort(rng.permutation(len(X))[:n])
            if backend.is_cupy_array(X):
                idx = backend.to_device(idx, "gpu")
            out[f"X_{split}"], out[f"y_{split}"] = X[idx], y[idx]
        return self.replace(**out)

    def flatten(self) -> "Dataset":
        """Inputs reshaped to vectors (N, prod(input_shape)) for dense networks."""
        if len(self.input_shape) == 1:
            return self
        return self.replace(
            X_train=self.X_train.reshape(self.n_train, -1),
            X_test=self.X_test.reshape(self.n_test, -1),
            input_shape=(self.input_dim,),
        )

    def as_autoencoder(self, loss: str | None = None) -> "Dataset":
        """Targets = the inputs flattened to (N, D); ``n_classes=None``, task ``autoencoder``.

        The default loss is ``sigmoid_ce`` when all inputs lie in [0, 1] (pixel intensities as
        Bernoulli means, as in the autoencoder benchmarks of the K-FAC / K-BFGS papers) and
        ``mse`` otherwise (e.g. MNIST-1D, whose features are standardised).
        """
        xp = backend.namespace(self.X_train)
        if loss is None:
            lo = min(float(xp.min(self.X_train)), float(xp.min(self.X_test)) if self.n_test else 0.0)
            hi = max(float(xp.max(self.X_train)), float(xp.max(self.X_test)) if self.n_test else 1.0)
            loss = "sigmoid_ce" if (lo >= 0.0 and hi <= 1.0) else "mse"

        def target(X: Any) -> Any:
            t = X.reshape(len(X), -1)
            return t.astype(xp.float64) if t.dtype.kind != "f" else t.copy()

        info = dict(self.info)
        info["autoencoder_of"] = self.task
        return dataclasses.replace(
            self,
            name=f"{self.name}-ae",
            y_train=target(self.X_train),
            y_test=target(self.X_test),
            n_classes=None,
            task="autoencoder",
            loss=loss,
            info=info,
        )

    def as_classification(self) -> "Dataset":
        """A binary set (targets (N, 1) in {0, 1}) as two-class integer labels for ``softmax_ce``."""
        if self.task == "classification":
            return self
        if self.task != "binary":
            raise ValueError(f"{self.name}: as_classification() needs a binary task, got {self.task!r}")
        xp = backend.namespace(self.y_train)
        return self.replace(
            y_train=self.y_train[:, 0].astype(xp.int64),
            y_test=self.y_test[:, 0].astype(xp.int64),
            task="classification",
            loss="softmax_ce",
        )

    def standardized(self, *, per: Per = "feature", eps: float = 1e-8) -> "Dataset":
        """Inputs shifted/scaled by the training split's mean and std (see :func:`fit_standardizer`).

        For autoencoders the targets are left unchanged (they stay e.g. pixel intensities).
        The fitted :class:`Scaler` is kept in ``info["input_scaler"]``.
        """
        return self._scaled(fit_standardizer(self.X_train, per=per, eps=eps))

    def minmax_scaled(
        self, *, per: Per = "global", feature_range: tuple[float, float] = (0.0, 1.0)
    ) -> "Dataset":
        """Inputs mapped to ``feature_range`` by the training split's min and max."""
        return self._scaled(fit_minmax(self.X_train, per=per, feature_range=feature_range))

    def _scaled(self, scaler: Scaler) -> "Dataset":
        new = self.replace(X_train=scaler(self.X_train), X_test=scaler(self.X_test))
        new.info["input_scaler"] = scaler
        return new

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_arrays(
        cls,
        name: str,
        X: Any,
        y: Any,
        *,
        task: str = "classification",
        n_classes: int | None = None,
        loss: str | None = None,
        input_shape: Sequence[int] | None = None,
        n_test: int | None = None,
        test_fraction: float | None = 0.2,
        seed: int | np.random.Generator = 0,
        stratify: bool | None = None,
        info: dict | None = None,
    ) -> "Dataset":
        """Split one labelled array pair deterministically and validate the result.

        ``stratify`` defaults to True for classification/binary tasks; binary labels (N,) become
        float targets (N, 1). ``n_classes`` defaults to
        ``max(label) + 1`` for classification and 2 for binary.
        """
        X = np.asarray(X)
        y = np.asarray(y)
        if input_shape is not None:
            X = X.reshape((len(X),) + tuple(int(d) for d in input_shape))
        if task == "binary" and y.ndim == 1:
            y = y[:, None].astype(np.float64)
        if n_test is not None:
            test_fraction = None
        if stratify is None:
            stratify = task in ("classification", "binary")
        Xtr, ytr, Xte, yte = train_test_split(
            X, y, n_test=n_test, test_fraction=test_fraction, seed=seed, stratify=stratify
        )
        if n_classes is None:
            if task == "classification":
                n_classes = int(y.max()) + 1
            elif task == "binary":
                n_classes = 2
        if loss is None:
            loss = {"classification": "softmax_ce", "binary": "sigmoid_ce"}.get(task, "mse")
        ds = cls(
            name=name,
            X_train=Xtr,
            y_train=ytr,
            X_test=Xte,
            y_test=yte,
            input_shape=tuple(X.shape[1:]),
            n_classes=n_classes,
            task=task,
            loss=loss,
            info=dict(info or {}),
        )
        return ds.validate()
