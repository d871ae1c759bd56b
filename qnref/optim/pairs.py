"""The quasi-Newton pair store: curvature pairs (sᵢ, yᵢ) and their Gram matrices in one place.

Storage convention (the one convention of the package): pairs are **rows** in preallocated
``(capacity, n)`` buffers used as a ring; row i is (sᵢ, yᵢ). The papers' n × k matrices Sₖ, Yₖ are
the transposes, so the papers' SₖᵀYₖ is ``S @ Y.T`` here and (SₖᵀYₖ)ᵢⱼ = sᵢᵀyⱼ.

Layout (issue 21): the oldest pair sits in buffer row ``start``, the i-th oldest in row
``(start + i) % capacity`` (:meth:`PairStore.rows`); dropping old pairs advances ``start`` (no row
moves) and the ordered ``(count, n)`` views :attr:`PairStore.S`, :attr:`PairStore.Y` (oldest first,
what the compact forms and the Grams need) are plain slices of the buffers. Two append policies:

* ``ring=False`` (default; stores read in order every step — L-SR1's Grams and compact forms,
  K-BFGS(L)'s compact H_G): the rows never wrap. An append that would wrap shifts the pairs down
  once (:meth:`PairStore.linearize`; the dropped row needs no saving: count row copies, what every
  drop cost before), so ordered reads never copy.
* ``ring=True`` (L-BFGS, whose two-loop reads the rows in place,
  :meth:`~.operators.LBFGSOperator.from_store`): appending to a full store overwrites the oldest
  row — no pair is ever copied between rows. An ordered read of a wrapped ring rotates it in
  place once (count + wrapped rows copies).

:class:`PairStore` optionally keeps the k × k Grams SY = S Yᵀ, SS = S Sᵀ, YY = Y Yᵀ in step with
the pairs: :meth:`PairStore.append` borders them with the new row and column (4kn + 3n
multiplications: S s, Y s, S y, Y y and sᵀy, sᵀs, yᵀy), dropping old pairs slices them (no
arithmetic). The compact L-SR1 operator, its pruning test and the Gram trust-region solver then
cost O(kn) + O(k³) per step ([RD16] §3: "(4m + 1)n + O(m²)" per product, the Grams updated
incrementally). Methods that never read the Grams (L-BFGS, SQN) keep ``grams=False``.

The row curvatures sᵢᵀyᵢ of the two-loop's ρᵢ = 1/sᵢᵀyᵢ ([NW06] Alg. 7.4) are formed once per pair
(:meth:`PairStore.curvatures`: kept in step by :meth:`~PairStore.append` from their first use on),
as the sum of sᵢ⊙yᵢ — bit for bit the rows of ``(S * Y).sum(axis=1)`` — not recomputed per step.

A PairStore is a dataclass of plain arrays and ints, so it checkpoints as a state field
(:func:`~qnref.optim.base.state_to_host`); a state restored from a checkpoint holds the plain
dict, which :meth:`PairStore.coerce` turns back into a store (the optimizers' state classes do
that in ``__post_init__``; a dict written before the ring has no ``start``, ``sy`` or ``ring``: its
rows start at 0, the curvatures are formed again on first use, with the same bits, and the append
policy is the default).

State rule (docs/optimizers.md): the store is updated in place; a step consumes the state that
holds it. ``copy.deepcopy`` of the state before a step resumes bit-identically.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from .. import backend

__all__ = ["PairStore"]


@dataclass
class PairStore:
    """Curvature pairs in ``(capacity, n)`` row buffers plus (optionally) their Grams.

    Sbuf, Ybuf: the buffers; the i-th oldest pair is row ``(start + i) % capacity``, i < count.
    count: pairs stored.
    SY, SS, YY: ``(count, count)`` Grams S Yᵀ, S Sᵀ, Y Yᵀ of the stored pairs (oldest first), or
    ``None`` when the store does not keep them (``grams=False``) or they were invalidated
    (:meth:`drop_grams`); :meth:`ensure_grams` rebuilds them once (O(k²n)).
    start: buffer row of the oldest pair (0 for a checkpoint written before the ring).
    sy: ``(capacity,)`` row curvatures sᵢᵀyᵢ = Σ sᵢ⊙yᵢ by buffer row (valid at :meth:`rows`), or
    ``None`` until :meth:`curvatures` first forms them; :meth:`append` then keeps them.
    ring: the append policy (module docstring): True overwrites the oldest row of a full store,
    False keeps the rows unwrapped. A layout choice only: the pairs and their order are the same.
    """

    Sbuf: Any
    Ybuf: Any
    count: int = 0
    SY: Any = None
    SS: Any = None
    YY: Any = None
    start: int = 0
    sy: Any = None
    ring: bool = False

    def __post_init__(self) -> None:
        self.count, self.start, self.ring = int(self.count), int(self.start), bool(self.ring)
        if self.Sbuf.ndim != 2 or self.Sbuf.shape != self.Ybuf.shape:
            raise ValueError(f"Sbuf and Ybuf must both have shape (capacity, n); got {self.Sbuf.shape} and "
                             f"{self.Ybuf.shape}")
        if not 0 <= self.count <= self.capacity:
            raise ValueError(f"count must lie in [0, {self.capacity}], got {self.count}")
        if not 0 <= self.start < max(self.capacity, 1):
            raise ValueError(f"start must lie in [0, {max(self.capacity, 1) - 1}], got {self.start}")
        if self.sy is not None and self.sy.shape != (self.capacity,):
            raise ValueError(f"sy must have shape ({self.capacity},) or be None, got {self.sy.shape}")
        grams = (self.SY, self.SS, self.YY)
        if any(G is not None for G in grams):
            if any(G is None or G.shape != (self.count, self.count) for G in grams):
                raise ValueError(f"SY, SS, YY must all be ({self.count}, {self.count}) or all None")

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def empty(cls, like: Any, capacity: int, *, grams: bool = True, ring: bool = False) -> "PairStore":
        """An empty store for vectors shaped, typed and placed like the 1-D array ``like``
        (``ring``: the append policy, see the module docstring)."""
        capacity = int(capacity)
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if like.ndim != 1:
            raise ValueError(f"like must be a 1-D array, got shape {like.shape}")
        xp = backend.namespace(like)
        n = int(like.shape[0])
        z = xp.zeros((0, 0), dtype=like.dtype) if grams else None
        try:
            S, Y = xp.zeros((capacity, n), dtype=like.dtype), xp.zeros((capacity, n), dtype=like.dtype)
        except (MemoryError, ValueError, OverflowError):  # numpy's and CuPy's refusals of huge shapes
            raise ValueError(f"memory (pair capacity) {capacity} is too large: two {capacity} × {n} arrays of "
                             f"{like.dtype} cannot be allocated; choose a smaller memory") from None
        return cls(S, Y, 0, z, None if z is None else z.copy(), None if z is None else z.copy(), ring=ring)

    @classmethod
    def from_rows(cls, S: Any, Y: Any, *, capacity: int | None = None, grams: bool = True) -> "PairStore":
        """A store holding the ``(k, n)`` rows S, Y (copied), with fresh Grams when ``grams``."""
        if S.ndim != 2 or S.shape != Y.shape:
            raise ValueError(f"S and Y must both have shape (k, n); got {S.shape} and {Y.shape}")
        xp = backend.namespace(S, Y)
        k, n = int(S.shape[0]), int(S.shape[1])
        cap = max(k, 1) if capacity is None else int(capacity)
        if cap < max(k, 1):
            raise ValueError(f"capacity {capacity} is smaller than the {k} pairs given")
        Sbuf, Ybuf = xp.zeros((cap, n), dtype=S.dtype), xp.zeros((cap, n), dtype=S.dtype)
        Sbuf[:k], Ybuf[:k] = S, Y
        store = cls(Sbuf, Ybuf, k)
        if grams:
            store.ensure_grams()
        return store

    @classmethod
    def coerce(cls, x: "PairStore | dict") -> "PairStore":
        """``x`` itself, or the store a checkpoint dict (:func:`~.base.state_to_host`) describes
        (a dict without ``start``/``sy``/``ring``, written before the ring, has its rows from 0)."""
        if isinstance(x, cls):
            return x
        if isinstance(x, dict):
            return cls(**{f.name: x[f.name] for f in dataclasses.fields(cls) if f.name in x})
        raise TypeError(f"expected a PairStore or its checkpoint dict, got {type(x).__name__}")

    # -- views ----------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return int(self.Sbuf.shape[0])

    @property
    def n(self) -> int:
        return int(self.Sbuf.shape[1])

    @property
    def full(self) -> bool:
        return self.count == self.capacity

    @property
    def has_grams(self) -> bool:
        return self.SY is not None

    @property
    def wrapped(self) -> bool:
        """Whether the occupied rows run past the buffer's end (ordered views need :meth:`linearize`)."""
        return self.start + self.count > self.capacity

    def rows(self) -> list[int]:
        """Buffer rows of the stored pairs, oldest first (read in place by the two-loop)."""
        cap = self.capacity
        return [(self.start + i) % cap for i in range(self.count)]

    @property
    def S(self) -> Any:
        """View ``(count, n)`` of the stored s vectors, oldest first (invalidated by a mutation;
        rotates the ring in place first when it wraps, :meth:`linearize`)."""
        if self.wrapped:
            self.linearize()
        return self.Sbuf[self.start: self.start + self.count]

    @property
    def Y(self) -> Any:
        """View ``(count, n)`` of the stored y vectors, oldest first (as :attr:`S`)."""
        if self.wrapped:
            self.linearize()
        return self.Ybuf[self.start: self.start + self.count]

    def __len__(self) -> int:
        return self.count

    def newest(self) -> tuple[Any, Any]:
        """The newest pair (s, y) as views; ``IndexError`` when empty."""
        if self.count == 0:
            raise IndexError("PairStore is empty")
        r = (self.start + self.count - 1) % self.capacity
        return self.Sbuf[r], self.Ybuf[r]

    def linearize(self) -> None:
        """Rotate the ring in place so the oldest pair is buffer row 0 (``start = 0``): the wrapped
        head rows are saved, the others moved down one row at a time (non-overlapping copies, safe on
        CuPy, whose slice assignment does not guard against overlap), the head written after them;
        count + (wrapped rows) row copies per buffer. Logical contents, Grams and curvatures unchanged."""
        r, k, cap = self.start, self.count, self.capacity
        if r == 0:
            return
        head = max(0, r + k - cap)  # pairs wrapped to buffer rows 0 .. head − 1
        for buf in (self.Sbuf, self.Ybuf):
            saved = buf[:head].copy() if head else None
            for i in range(k - head):  # row r + i → i, ascending: a row is read before it is written
                buf[i] = buf[r + i]
            if head:
                buf[k - head: k] = saved
        if self.sy is not None:
            self.sy = backend.namespace(self.sy).roll(self.sy, -r)
        self.start = 0

    # -- row curvatures -------------------------------------------------------------------------------
    def _curvature(self, row: int) -> Any:
        """sᵀy of one buffer row as Σ s⊙y (NumPy's pairwise sum: the bits of ``(S * Y).sum(axis=1)``)."""
        return (self.Sbuf[row] * self.Ybuf[row]).sum()

    def curvatures(self) -> Any:
        """The ``(capacity,)`` row curvatures :attr:`sy` (index them by :meth:`rows`): formed on the
        first call (count · 2n), kept in step by :meth:`append` afterwards (2n per pair)."""
        if self.sy is None:
            self.sy = backend.namespace(self.Sbuf).zeros(self.capacity, dtype=self.Sbuf.dtype)
            for r in self.rows():
                self.sy[r] = self._curvature(r)
        return self.sy

    # -- Grams ----------------------------------------------------------------------------------------
    def ensure_grams(self) -> "PairStore":
        """Form the Grams from the pairs when they are not kept (O(k²n), once); returns self."""
        if self.SY is None:
            S, Y = self.S, self.Y
            self.SY, self.SS, self.YY = S @ Y.T, S @ S.T, Y @ Y.T
        return self

    def drop_grams(self) -> None:
        """Stop keeping the Grams (a route that changes pairs without maintaining them)."""
        self.SY = self.SS = self.YY = None

    def fresh_grams(self) -> tuple[Any, Any, Any]:
        """(SY, SS, YY) of the stored pairs: the kept ones, else freshly formed (not stored)."""
        if self.SY is not None:
            return self.SY, self.SS, self.YY
        S, Y = self.S, self.Y
        return S @ Y.T, S @ S.T, Y @ Y.T

    # -- mutation -------------------------------------------------------------------------------------
    def append(self, s: Any, y: Any) -> None:
        """Store (s, y) (copied) as the newest pair, dropping the oldest first when full (a ring
        overwrites its row; otherwise a pair that would wrap shifts the rows down once); the kept
        Grams are bordered with the new row/column (4kn + 3n multiplications), the kept row
        curvatures get sᵀy (2n)."""
        backend.namespace(self.Sbuf, s, y)  # raises on a host/device mix
        if s.shape != (self.n,) or y.shape != (self.n,):
            raise ValueError(f"s and y must have shape ({self.n},), got {s.shape} and {y.shape}")
        if self.full:
            self.drop_oldest(1)
        if not self.ring and self.start + self.count == self.capacity:
            self.linearize()  # the new row would wrap: shift down (nothing wrapped yet, nothing saved)
        if self.SY is not None:
            self._border(s, y)
        row = (self.start + self.count) % self.capacity
        self.Sbuf[row] = s
        self.Ybuf[row] = y
        if self.sy is not None:
            self.sy[row] = self._curvature(row)
        self.count += 1

    def _border(self, s: Any, y: Any) -> None:
        xp = backend.namespace(self.Sbuf)
        k = self.count
        S, Y = self.S, self.Y
        Ss, Ys, Sy, Yy = S @ s, Y @ s, S @ y, Y @ y
        sy, ss, yy = s @ y, s @ s, y @ y

        def border(A: Any, col: Any, row: Any, corner: Any) -> Any:
            out = xp.empty_like(A, shape=(k + 1, k + 1))  # A's dtype and array type
            out[:k, :k] = A
            out[:k, k] = col
            out[k, :k] = row
            out[k, k] = corner
            return out

        self.SY = border(self.SY, Sy, Ys, sy)  # (SY)ᵢₖ = sᵢᵀy, (SY)ₖⱼ = sᵀyⱼ
        self.SS = border(self.SS, Ss, Ss, ss)
        self.YY = border(self.YY, Yy, Yy, yy)

    def drop_oldest(self, k: int = 1) -> None:
        """Forget the ``k`` oldest pairs (all of them when ``k >= count``): ``start`` advances, no
        row is copied; Grams sliced."""
        k = int(k)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if k == 0:
            return
        if k >= self.count:
            self.clear()
            return
        self.start = (self.start + k) % self.capacity  # the ring: no row moves
        self.count -= k
        if self.SY is not None:
            self.SY = self.SY[k:, k:].copy()
            self.SS = self.SS[k:, k:].copy()
            self.YY = self.YY[k:, k:].copy()

    def clear(self) -> None:
        """Forget every pair (buffers kept, ``start`` back to 0; kept Grams become 0 × 0)."""
        self.count = self.start = 0
        if self.SY is not None:
            self.SY, self.SS, self.YY = self.SY[:0, :0].copy(), self.SS[:0, :0].copy(), self.YY[:0, :0].copy()

    def prune(self, count: Callable[[Any, Any, Any], int]) -> int:
        """Drop the ``count(SY, SS, YY)`` oldest pairs (a pruning test on the Grams; Grams formed
        freshly when not kept). Returns the number dropped. L-SR1 uses
        :func:`~.operators.lsr1_prune`, which forms only the products its test reads."""
        if self.count == 0:
            return 0
        d = min(int(count(*self.fresh_grams())), self.count)
        self.drop_oldest(d)
        return d
