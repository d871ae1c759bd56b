"""PairStore: rows oldest first, Grams kept equal to fresh products, checkpoint round trip."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import numpy as np
import pytest

from qnref.optim.base import state_from_host, state_to_host
from qnref.optim.operators import lsr1_prune_count
from qnref.optim.pairs import PairStore


def assert_grams_fresh(store, tol=1e-14):
    S, Y = store.S, store.Y
    for G, F in ((store.SY, S @ Y.T), (store.SS, S @ S.T), (store.YY, Y @ Y.T)):
        assert G.shape == (store.count, store.count)
        scale = max(np.abs(F).max(), 1e-300) if F.size else 1.0
        assert np.abs(G - F).max(initial=0.0) <= tol * scale


@pytest.mark.parametrize("seed", range(5))
def test_grams_equal_fresh_products_after_random_sequences(seed):
    rng = np.random.default_rng(seed)
    n, cap = 40, 6
    store = PairStore.empty(np.zeros(n), cap)
    rows = []  # the oracle: a plain list of pairs, oldest first
    for _ in range(60):
        op = rng.choice(["append", "append", "append", "drop", "prune", "clear"], p=[.3, .2, .2, .15, .1, .05])
        if op == "append":
            s, y = rng.standard_normal(n), rng.standard_normal(n)
            store.append(s, y)
            rows = (rows + [(s, y)])[-cap:]
        elif op == "drop":
            k = int(rng.integers(0, 3))
            store.drop_oldest(k)
            rows = rows[k:]
        elif op == "prune":
            k = int(rng.integers(0, 3))
            d = store.prune(lambda SY, SS, YY: k)
            assert d == min(k, len(rows))
            rows = rows[d:]
        else:
            store.clear()
            rows = []
        assert store.count == len(rows)
        if rows:
            np.testing.assert_array_equal(store.S, np.array([r[0] for r in rows]))
            np.testing.assert_array_equal(store.Y, np.array([r[1] for r in rows]))
        assert_grams_fresh(store)


def test_append_drops_oldest_when_full_and_views():
    store = PairStore.empty(np.zeros(3), 2, grams=False)
    assert not store.has_grams and store.capacity == 2 and store.n == 3 and len(store) == 0
    for i in range(3):
        store.append(np.full(3, float(i)), np.full(3, 10.0 + i))
    assert store.full and store.count == 2
    np.testing.assert_array_equal(store.S[:, 0], [1.0, 2.0])
    s, y = store.newest()
    assert s[0] == 2.0 and y[0] == 12.0
    store.clear()
    with pytest.raises(IndexError):
        store.newest()


def test_lsr1_prune_through_the_store():
    """prune(lsr1_prune_count) drops the oldest pair that makes M⁻¹ singular (s₀ = s₁, y₀ = y₁)."""
    rng = np.random.default_rng(0)
    n = 8
    s, y = rng.standard_normal(n), rng.standard_normal(n)
    for grams in (True, False):
        store = PairStore.empty(np.zeros(n), 4, grams=grams)
        store.append(s, y)
        store.append(s, y)
        store.append(rng.standard_normal(n), rng.standard_normal(n))
        assert store.prune(partial(lsr1_prune_count, gamma=1.0)) == 1
        assert store.count == 2 and store.has_grams == grams
        if grams:
            assert_grams_fresh(store)


def test_ensure_and_drop_grams():
    rng = np.random.default_rng(1)
    store = PairStore.from_rows(rng.standard_normal((3, 5)), rng.standard_normal((3, 5)), capacity=4, grams=False)
    assert not store.has_grams
    SY, SS, YY = store.fresh_grams()
    assert not store.has_grams  # fresh_grams does not keep them
    store.ensure_grams()
    np.testing.assert_array_equal(store.SY, SY)
    store.append(rng.standard_normal(5), rng.standard_normal(5))
    assert_grams_fresh(store)
    store.drop_grams()
    assert store.SY is None and store.SS is None and store.YY is None


@dataclass
class _State:
    pairs: PairStore
    k: int = 0

    def __post_init__(self):
        self.pairs = PairStore.coerce(self.pairs)


@pytest.mark.parametrize("grams", [True, False])
def test_checkpoint_round_trip_and_deepcopy(grams):
    rng = np.random.default_rng(2)
    store = PairStore.empty(np.zeros(7), 3, grams=grams)
    for _ in range(4):
        store.append(rng.standard_normal(7), rng.standard_normal(7))
    st = _State(store, 5)
    back = state_from_host(_State, state_to_host(st))
    assert isinstance(back.pairs, PairStore) and back.k == 5
    for f in ("Sbuf", "Ybuf", "SY", "SS", "YY"):
        a, b = getattr(store, f), getattr(back.pairs, f)
        assert (a is None and b is None) or np.array_equal(a, b)
    assert back.pairs.count == store.count
    # the restored store keeps working like the original
    s, y = rng.standard_normal(7), rng.standard_normal(7)
    twin = copy.deepcopy(store)
    store.append(s, y)
    back.pairs.append(s, y)
    np.testing.assert_array_equal(store.S, back.pairs.S)
    assert twin.count == 3 and not np.array_equal(twin.S[-1], s)  # the deep copy is independent


def test_bad_input_is_rejected_with_clear_messages():
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        PairStore.empty(np.zeros(3), 0)
    with pytest.raises(ValueError, match="like must be a 1-D array"):
        PairStore.empty(np.zeros((3, 2)), 2)
    store = PairStore.empty(np.zeros(3), 2)
    with pytest.raises(ValueError, match=r"s and y must have shape \(3,\)"):
        store.append(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="k must be >= 0"):
        store.drop_oldest(-1)
    with pytest.raises(ValueError, match="count must lie in"):
        PairStore(np.zeros((2, 3)), np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="Sbuf and Ybuf"):
        PairStore(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="all None"):
        PairStore(np.zeros((2, 3)), np.zeros((2, 3)), 1, np.zeros((1, 1)))
    with pytest.raises(TypeError, match="expected a PairStore"):
        PairStore.coerce([1, 2])
    with pytest.raises(ValueError, match="capacity 1 is smaller"):
        PairStore.from_rows(np.zeros((2, 3)), np.zeros((2, 3)), capacity=1)


def test_ring_semantics_like_the_old_pair_memory():
    mem = PairStore.empty(np.zeros(4), 3)
    assert mem.count == 0 and mem.S.shape == (0, 4)
    for i in range(5):
        mem.append(np.full(4, float(i)), np.full(4, 10.0 + i))
    assert mem.count == 3 and len(mem) == 3
    assert mem.S[:, 0].tolist() == [2.0, 3.0, 4.0]
    assert mem.Y[:, 0].tolist() == [12.0, 13.0, 14.0]
    snap = copy.deepcopy(mem)
    mem.drop_oldest()
    assert mem.S[:, 0].tolist() == [3.0, 4.0]
    mem.append(np.full(4, 5.0), np.full(4, 15.0))
    assert mem.S[:, 0].tolist() == [3.0, 4.0, 5.0]
    mem.drop_oldest(2)
    assert mem.S[:, 0].tolist() == [5.0] and mem.Y[:, 0].tolist() == [15.0]
    mem.drop_oldest(10)
    assert mem.count == 0
    assert snap.S[:, 0].tolist() == [2.0, 3.0, 4.0]  # a deep copy is independent
    assert_grams_fresh(snap)


def test_like_dtype():
    mem = PairStore.empty(np.zeros(5, dtype=np.float32), 2)
    assert mem.Sbuf.dtype == np.float32 and mem.SY.dtype == np.float32 and mem.n == 5 and mem.capacity == 2
    mem.append(np.ones(5, dtype=np.float32), np.ones(5, dtype=np.float32))
    assert mem.SY.dtype == np.float32


# -- layout (issue 21): drops move no row; a ring's appends move none either and its ordered views rotate
# in place when wrapped; a store without the ring never wraps (its ordered views never copy) -----------
def _oracle_step(rng, store, rows, n, cap):
    """One random mutation of ``store`` and of the oracle list ``rows`` (oldest first)."""
    op = rng.choice(["append", "append", "append", "drop", "clear"], p=[.35, .25, .2, .15, .05])
    if op == "append":
        s, y = rng.standard_normal(n), rng.standard_normal(n)
        store.append(s, y)
        return (rows + [(s, y)])[-cap:]
    if op == "drop":
        k = int(rng.integers(0, 3))
        store.drop_oldest(k)
        return rows[k:]
    store.clear()
    return []


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("grams", [True, False])
@pytest.mark.parametrize("ring", [True, False])
def test_ring_rows_against_a_list_of_pairs(seed, grams, ring):
    """rows(), newest(), the kept curvatures and (sometimes read) ordered views equal a plain list of
    pairs through random appends, drops and clears — with the ring left wrapped between reads."""
    rng = np.random.default_rng(seed)
    n, cap = 9, 5
    store = PairStore.empty(np.zeros(n), cap, grams=grams, ring=ring)
    store.curvatures()  # kept from now on
    rows, wrapped_seen, offset_seen = [], 0, 0
    for _ in range(120):
        rows = _oracle_step(rng, store, rows, n, cap)
        assert store.count == len(rows) and store.rows() == [(store.start + i) % cap for i in range(len(rows))]
        wrapped_seen += store.wrapped
        offset_seen += store.start > 0
        for r, (s, y) in zip(store.rows(), rows):  # the ring read in place, no reordering
            np.testing.assert_array_equal(store.Sbuf[r], s)
            np.testing.assert_array_equal(store.Ybuf[r], y)
            assert store.sy[r] == (s * y).sum()  # the bits of (S * Y).sum(axis=1)
        if rows:
            np.testing.assert_array_equal(store.newest()[0], rows[-1][0])
            np.testing.assert_array_equal(store.newest()[1], rows[-1][1])
        if rng.random() < 0.3:  # an ordered read: rotates a wrapped ring, contents unchanged
            was_wrapped = store.wrapped
            np.testing.assert_array_equal(store.S, np.array([s for s, _ in rows]).reshape(-1, n))
            np.testing.assert_array_equal(store.Y, np.array([y for _, y in rows]).reshape(-1, n))
            assert not store.wrapped and (store.start == 0 or not was_wrapped)
            if grams:
                assert_grams_fresh(store)
    assert offset_seen > (10 if ring else 0)  # drops advanced start
    assert wrapped_seen > 10 if ring else wrapped_seen == 0  # the sequences exercised the ring


@pytest.mark.parametrize("cap", [1, 2, 3, 5])
def test_linearize_every_start_and_count(cap):
    """linearize() rotates every (start, count) ring to start = 0 with the rows, curvatures and
    Grams of the oracle (each row moved once; the wrapped head saved)."""
    rng = np.random.default_rng(cap)
    n = 4
    for start in range(cap):
        for count in range(cap + 1):
            S, Y = rng.standard_normal((cap, n)), rng.standard_normal((cap, n))
            store = PairStore(S.copy(), Y.copy(), count, start=start)
            store.curvatures()
            order = [(start + i) % cap for i in range(count)]
            sy = store.sy.copy()
            store.linearize()
            assert store.start == 0 and store.rows() == list(range(count))
            np.testing.assert_array_equal(store.Sbuf[:count], S[order])
            np.testing.assert_array_equal(store.Ybuf[:count], Y[order])
            np.testing.assert_array_equal(store.sy[:count], sy[order])


def test_full_ring_append_moves_no_row():
    """Appending to a full store writes one row of each buffer and advances ``start``: the other
    rows are untouched (same memory, same values) — no per-step copies of S and Y."""
    rng = np.random.default_rng(3)
    store = PairStore.empty(np.zeros(6), 4, grams=False, ring=True)
    for _ in range(4):
        store.append(rng.standard_normal(6), rng.standard_normal(6))
    S0, Sbuf = store.Sbuf.copy(), store.Sbuf
    s, y = rng.standard_normal(6), rng.standard_normal(6)
    store.append(s, y)
    assert store.Sbuf is Sbuf and store.start == 1 and store.wrapped
    np.testing.assert_array_equal(store.Sbuf[1:], S0[1:])
    np.testing.assert_array_equal(store.Sbuf[0], s)
    np.testing.assert_array_equal(store.newest()[1], y)
    # without the ring the pairs shift down once instead, and the ordered view is a plain slice
    flat = PairStore.from_rows(S0, S0, grams=False)
    flat.append(s, y)
    assert flat.start == 0 and not flat.wrapped and not flat.ring
    np.testing.assert_array_equal(flat.Sbuf, np.vstack([S0[1:], s]))
    assert np.shares_memory(flat.S, flat.Sbuf)


def test_ring_checkpoint_round_trip_and_old_format():
    """A wrapped ring with kept curvatures round-trips through a checkpoint and continues bit for
    bit; a dict written before the ring (no ``start``, no ``sy``) loads with its rows from 0."""
    rng = np.random.default_rng(4)
    store = PairStore.empty(np.zeros(5), 3, grams=False, ring=True)
    store.curvatures()
    for _ in range(5):
        store.append(rng.standard_normal(5), rng.standard_normal(5))
    assert store.wrapped and store.sy is not None
    back = state_from_host(_State, state_to_host(_State(store))).pairs
    assert back.start == store.start and np.array_equal(back.sy, store.sy) and back.rows() == store.rows()
    assert back.ring
    s, y = rng.standard_normal(5), rng.standard_normal(5)
    store.append(s, y)
    back.append(s, y)
    for a, b in ((store.Sbuf, back.Sbuf), (store.sy, back.sy)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(store.S, back.S)
    # the old form: rows 0..count−1 oldest first, no start, no curvatures
    S, Y = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    old = {"__class__": "PairStore", "Sbuf": S, "Ybuf": Y, "count": 2, "SY": None, "SS": None, "YY": None}
    saved = state_to_host(_State(PairStore.empty(np.zeros(5), 3, grams=False))) | {"pairs": old}
    st = state_from_host(_State, saved).pairs
    assert st.start == 0 and st.sy is None and st.rows() == [0, 1] and not st.ring
    np.testing.assert_array_equal(st.curvatures()[:2], (S[:2] * Y[:2]).sum(axis=1))
    np.testing.assert_array_equal(st.S, S[:2])


def test_bad_ring_fields_are_rejected():
    with pytest.raises(ValueError, match="start must lie in"):
        PairStore(np.zeros((2, 3)), np.zeros((2, 3)), 1, start=2)
    with pytest.raises(ValueError, match="sy must have shape"):
        PairStore(np.zeros((2, 3)), np.zeros((2, 3)), 1, sy=np.zeros(3))
