"""Minibatch index streams and random subsets."""
from __future__ import annotations

import numpy as np
import pytest

from qnref.data import BatchIterator, SubsetSampler, check_batch_size, epoch_batches, sample_indices


@pytest.mark.parametrize("n, b", [(10, 3), (10, 5), (10, 10), (7, 1), (1, 1)])
def test_epoch_covers_every_index_once(n, b):
    batches = epoch_batches(n, b, rng=0)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(n))
    assert all(len(x) == b for x in batches[:-1]) and 1 <= len(batches[-1]) <= b
    assert flat.dtype == np.int64


def test_drop_last():
    batches = epoch_batches(10, 3, rng=0, drop_last=True)
    assert [len(x) for x in batches] == [3, 3, 3]
    flat = np.concatenate(batches)
    assert len(np.unique(flat)) == 9


def test_no_shuffle_is_in_order():
    assert [x.tolist() for x in epoch_batches(5, 2, shuffle=False)] == [[0, 1], [2, 3], [4]]


def test_deterministic_by_seed_and_shuffled():
    a = np.concatenate(epoch_batches(50, 8, rng=3))
    b = np.concatenate(epoch_batches(50, 8, rng=3))
    c = np.concatenate(epoch_batches(50, 8, rng=4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, np.arange(50))


@pytest.mark.parametrize("b", [0, -1, 11])
def test_batch_size_validation(b):
    with pytest.raises(ValueError, match="batch size"):
        epoch_batches(10, b)
    with pytest.raises(ValueError, match="batch size"):
        BatchIterator(10, b)


def test_batch_size_type_and_empty_set():
    with pytest.raises(TypeError):
        check_batch_size(2.5, 10)
    with pytest.raises(ValueError, match="empty"):
        check_batch_size(1, 0)


def test_iterator_epochs_reshuffle_and_cover():
    it = BatchIterator(23, 5, seed=1)
    assert it.batches_per_epoch == 5
    e1 = list(it.epoch())
    e2 = list(it.epoch())
    assert it.epochs_done == 2 and len(e1) == len(e2) == 5
    for e in (e1, e2):
        assert sorted(np.concatenate(e).tolist()) == list(range(23))
    assert not np.array_equal(np.concatenate(e1), np.concatenate(e2))
    # the iterator protocol crosses epoch boundaries; a fresh iterator with the same seed repeats
    it2 = BatchIterator(23, 5, seed=1)
    stream = [next(it2) for _ in range(10)]
    assert all(np.array_equal(x, y) for x, y in zip(stream, e1 + e2))


def test_iterator_drop_last_epochs():
    it = BatchIterator(10, 4, seed=0, drop_last=True)
    assert it.batches_per_epoch == 2
    sizes = [len(next(it)) for _ in range(6)]
    assert sizes == [4] * 6 and it.epochs_done == 3


def test_iterator_state_dict_resumes_exactly():
    it = BatchIterator(17, 4, seed=5)
    for _ in range(7):
        next(it)
    state = it.state_dict()
    ahead = [next(it).copy() for _ in range(9)]
    other = BatchIterator(17, 4, seed=99)
    other.load_state_dict(state)
    again = [next(other) for _ in range(9)]
    assert all(np.array_equal(x, y) for x, y in zip(ahead, again))
    assert other.epochs_done == it.epochs_done


def test_subset_sampler():
    s = SubsetSampler(100, seed=2)
    a = s.sample(30)
    assert len(a) == 30 and len(np.unique(a)) == 30 and a.min() >= 0 and a.max() < 100
    b = s(30)
    assert not np.array_equal(a, b)  # fresh draw each call
    assert sorted(s.sample(100).tolist()) == list(range(100))
    t = SubsetSampler(100, seed=2)
    assert np.array_equal(t.sample(30), a)
    state = s.state_dict()
    x = s.sample(7)
    s.load_state_dict(state)
    assert np.array_equal(s.sample(7), x)
    for bad in (0, 101):
        with pytest.raises(ValueError, match="batch size"):
            s.sample(bad)


def test_sample_indices_seeded():
    assert np.array_equal(sample_indices(10, 4, rng=1), sample_indices(10, 4, rng=1))
    assert len(set(sample_indices(10, 10, rng=0).tolist())) == 10
