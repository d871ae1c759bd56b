"""The distributed classes with one process (no MPI): identical to the ordinary Problem."""
import numpy as np
import pytest

from qnref.distributed import DistributedError, SerialComm, fingerprint_check, get_comm, shard_bounds, shard_counts
from qnref.distributed.problem import DistributedProblem
from qnref.optim.base import Problem

import mpi_script as ms  # noqa: E402  (conftest puts tests/distributed on sys.path)


def test_shards():
    assert shard_counts(45, 2) == [23, 22]
    assert shard_counts(7, 3) == [3, 2, 2]
    assert [shard_bounds(7, 3, r) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]


def test_serial_comm():
    c = SerialComm()
    x = np.arange(4.0)
    np.testing.assert_array_equal(c.allreduce_sum(x), x)
    assert c.allreduce_sum(2.5) == 2.5
    assert c.allgather_rows(x, [4]) is x
    assert c.allgather({"a": 1}) == [{"a": 1}] and c.bcast(3) == 3
    fingerprint_check(c, {"a": 1})


def test_get_comm_is_serial_without_mpiexec(monkeypatch):
    from qnref.distributed import comm as cm

    for var in cm._MPI_ENV_SIZE:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("QNREF_COMM", raising=False)
    cm.reset_comm()
    assert isinstance(get_comm(), SerialComm)
    with pytest.raises(ValueError, match="QNREF_COMM"):
        get_comm(kind="bogus")
    cm.reset_comm()


def test_fingerprint_mismatch_message():
    class Two(SerialComm):
        size = 2

        def allgather(self, obj):
            return [obj, {**obj, "seed": 1}]

    with pytest.raises(DistributedError, match="rank 1 vs rank 0: seed: 1 != 0"):
        fingerprint_check(Two(), {"seed": 0, "model": "mlp"})


def test_one_rank_distributed_problem_equals_problem():
    ref = ms.products(lambda m, loss, X, y, l2, seed: Problem(m, loss, X, y, l2, seed=seed))
    got = ms.products(lambda m, loss, X, y, l2, seed: DistributedProblem(m, loss, X, y, l2, seed=seed, comm=SerialComm()))
    assert set(ref) == set(got)
    for k in ref:
        a, b = np.asarray(got[k], float), np.asarray(ref[k], float)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=k)


def test_batchnorm_is_refused():
    from qnref.nn.dense import Dense
    from qnref.nn.model import Sequential
    from qnref.nn.norm import BatchNorm

    class Two(SerialComm):
        size = 2

    m = Sequential([Dense(4), BatchNorm(), Dense(2)], input_shape=(3,))
    X, y = np.zeros((10, 3)), np.zeros(10, dtype=np.int64)
    with pytest.raises(ValueError, match="batch normalization"):
        DistributedProblem(m, "softmax_ce", X, y, comm=Two())
