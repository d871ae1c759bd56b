"""Data-parallel training over processes: MPI (mpi4py, NumPy buffers) and NCCL (CuPy), see
``docs/distributed.md``.

    mpiexec -n 4 qnref train --model mlp --optimizer lsr1-tr --dataset digits-flat --batch-size 512

:func:`get_comm` picks the communicator (serial unless launched by an MPI process manager);
:class:`DistributedProblem` draws the same global batches on every rank and evaluates each rank's
shard; every product an optimizer asks for is reduced so that P ranks with global batch B equal one
process with batch B up to summation order.
"""
from .comm import Communicator, DistributedError, MPIComm, NCCLComm, SerialComm, get_comm, launched_under_mpi, reset_comm
from .problem import (DistributedObjective, DistributedPoint, DistributedProblem, DistributedTap,
                      shard_bounds, shard_counts)

__all__ = [
    "Communicator", "DistributedError", "SerialComm", "MPIComm", "NCCLComm", "get_comm", "launched_under_mpi", "reset_comm",
    "DistributedProblem", "DistributedObjective", "DistributedPoint", "DistributedTap",
    "shard_counts", "shard_bounds", "fingerprint_check",
]


def fingerprint_check(comm: Communicator, fingerprint: dict, what: str = "configuration") -> None:
    """Allgather ``fingerprint`` and raise :class:`DistributedError` on every rank when any rank differs
    (all ranks see the same gathered list, so all raise together: no rank is left waiting)."""
    if comm.size == 1:
        return
    prints = comm.allgather(fingerprint)
    ref = prints[0]
    bad = {}
    for r, fp in enumerate(prints[1:], start=1):
        keys = sorted(set(ref) | set(fp))
        diff = {k: (ref.get(k), fp.get(k)) for k in keys if ref.get(k) != fp.get(k)}
        if diff:
            bad[r] = diff
    if bad:
        lines = "; ".join(f"rank {r} vs rank 0: " + ", ".join(f"{k}: {b!r} != {a!r}" for k, (a, b) in d.items())
                          for r, d in bad.items())
        raise DistributedError(f"ranks were started with different {what}s: {lines}")
