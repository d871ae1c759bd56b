"""Deterministic minibatch index streams and random subsets without replacement.

Indices are host ``int64`` NumPy arrays (both NumPy and CuPy arrays accept them for fancy
indexing; move them with :func:`qnref.backend.to_device` to index on the GPU without an implicit
transfer per batch). All randomness comes from a ``numpy.random.Generator`` seeded by an integer,
so the same seed reproduces the same batches; ``state_dict`` / ``load_state_dict`` let a
checkpoint resume the stream exactly.

- :func:`epoch_batches` — the batches of one epoch (every index once, or all but ``n % B``
  with ``drop_last``).
- :class:`BatchIterator` — an endless stream of batches, reshuffled at the start of each epoch.
- :class:`SubsetSampler` / :func:`sample_indices` — ``size`` distinct indices drawn anew each
  call (the size may change between calls, as MB-LSR1's growing batches and curvature
  sub-batches need).
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from .dataset import as_generator


def check_batch_size(batch_size: Any, n: Any) -> int:
    """Validate ``1 <= batch_size <= n`` (integers) and return ``batch_size`` as ``int``."""
    for what, v in (("batch_size", batch_size), ("n", n)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{what} must be an integer, got {v!r}")
    if n < 1:
        raise ValueError(f"cannot draw batches from an empty set (n={n})")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} exceeds the number of examples n={n}")
    return int(batch_size)


def epoch_batches(
    n: int,
    batch_size: int,
    *,
    rng: int | np.random.Generator = 0,
    shuffle: bool = True,
    drop_last: bool = False,
) -> list[np.ndarray]:
    """Index arrays of one epoch over ``range(n)``.

    With ``shuffle`` the order is a permutation drawn from ``rng`` (an int seed or a Generator,
    which advances); without, it is 0 … n−1. The last batch is shorter than ``batch_size`` unless
    ``drop_last`` drops it.
    """
    b = check_batch_size(batch_size, n)
    order = as_generator(rng).permutation(n) if shuffle else np.arange(n)
    order = order.astype(np.int64, copy=False)
    stop = (n // b) * b if drop_last else n
    return [order[i : min(i + b, stop)] for i in range(0, stop, b)]


class BatchIterator:
    """Endless minibatches over ``range(n)``, reshuffled at each epoch start.

    ``next(it)`` gives the next batch; ``it.epoch()`` yields the batches up to the end of the
    current epoch (a whole epoch when called at an epoch boundary); ``it.epochs_done`` counts
    completed epochs and ``it.batches_per_epoch`` is ⌈n/B⌉ (⌊n/B⌋ with ``drop_last``).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int | np.random.Generator = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        self.batch_size = check_batch_size(batch_size, n)
        self.n = int(n)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.rng = as_generator(seed)
        self.epochs_done = 0
        self._order: np.ndarray | None = None  # permutation of the current epoch
        self._pos = 0

    @property
    def batches_per_epoch(self) -> int:
        q, r = divmod(self.n, self.batch_size)
        return q if (self.drop_last or r == 0) else q + 1

    @property
    def _stop(self) -> int:
        return (self.n // self.batch_size) * self.batch_size if self.drop_last else self.n

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> np.ndarray:
        if self._order is None:
            self._order = (self.rng.permutation(self.n) if self.shuffle else np.arange(self.n)).astype(np.int64)
            self._pos = 0
        batch = self._order[self._pos : min(self._pos + self.batch_size, self._stop)]
        self._pos += len(batch)
        if self._pos >= self._stop:
            self._order = None
            self.epochs_done += 1
        return batch

    def epoch(self) -> Iterator[np.ndarray]:
        """Batches until the current epoch ends (a full epoch from a boundary)."""
        target = self.epochs_done + 1
        while self.epochs_done < target:
            yield next(self)

    def state_dict(self) -> dict:
        return {
            "rng": self.rng.bit_generator.state,
            "order": None if self._order is None else self._order.copy(),
            "pos": self._pos,
            "epochs_done": self.epochs_done,
        }

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self._order = None if state["order"] is None else np.asarray(state["order"], dtype=np.int64).copy()
        self._pos = int(state["pos"])
        self.epochs_done = int(state["epochs_done"])


def sample_indices(n: int, size: int, rng: int | np.random.Generator = 0) -> np.ndarray:
    """``size`` distinct indices from ``range(n)`` in random order (without replacement)."""
    size = check_batch_size(size, n)
    return as_generator(rng).choice(n, size=size, replace=False, shuffle=True).astype(np.int64)


class SubsetSampler:
    """Independent random subsets of ``range(n)``: each call draws ``size`` distinct indices.

    Subsets of successive calls may overlap (each is a fresh draw without replacement); ``size``
    may vary between calls. ``size == n`` returns a permutation of all indices.
    """

    def __init__(self, n: int, *, seed: int | np.random.Generator = 0):
        check_batch_size(1, n)
        self.n = int(n)
        self.rng = as_generator(seed)

    def sample(self, size: int) -> np.ndarray:
        return sample_indices(self.n, size, self.rng)

    __call__ = sample

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
