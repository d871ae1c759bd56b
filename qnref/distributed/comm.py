"""Communicators for data-parallel runs: one process (:class:`SerialComm`), MPI through mpi4py on
host (NumPy) buffers (:class:`MPIComm`), and NCCL through ``cupy.cuda.nccl`` for CuPy buffers
(:class:`NCCLComm`, bootstrapped over MPI).

All three share one small interface (:class:`Communicator`):

=========================  =========================================================================
``rank``, ``size``         this process and the number of processes; ``is_root`` is ``rank == 0``
``allreduce_sum(x)``       Σ over ranks of an array (NumPy or CuPy, any shape) or a Python float;
                           returns a new array / float of the same kind, identical on every rank
``allgather_rows(x, n)``   the row blocks of every rank stacked in rank order (axis 0); ``n`` is the
                           list of row counts per rank (known to the caller: the shard sizes)
``allgather(obj)``         list of one picklable object per rank (small things: fingerprints)
``bcast(obj, root=0)``     a picklable object from ``root``
``barrier()``              wait for every rank
``abort(msg, code)``       print ``msg`` on stderr and end *every* process of the job (MPI_Abort)
``abort_on_error()``       context manager: any exception → traceback + :meth:`abort` (no rank hangs)
=========================  =========================================================================

:func:`get_comm` picks the communicator: MPI when the process was started by ``mpiexec``/``mpirun``
/``srun`` with more than one process, otherwise the serial one. ``QNREF_COMM=serial|mpi|nccl``
overrides the choice. mpi4py and CuPy are imported only when they are needed.

Determinism: every rank must end a collective with the same bits, or the ranks' θ drift apart.
MPI_Allreduce with MPI_SUM is not required to return identical results on all ranks, but MPICH's and
Open MPI's algorithms do in practice (two-rank exchange: a + b = b + a exactly; larger jobs combine
the same partial sums in commutative pairs or reduce each chunk on one rank and broadcast it). The
training loop checks this: at every evaluation it compares a hash of θ across ranks and stops with
an error if they differ. ``MPIComm(deterministic=True)`` (env ``QNREF_MPI_DETERMINISTIC=1``) uses
Reduce to rank 0 + Bcast instead, which guarantees identical bits at twice the latency.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Any, Iterator, Sequence

import numpy

from .. import backend

__all__ = ["DistributedError", "Communicator", "SerialComm", "MPIComm", "NCCLComm", "get_comm", "launched_under_mpi", "reset_comm"]

#: environment variables that process managers set in every rank (MPICH/Hydra, Intel MPI, Open MPI,
#: Slurm, PMIx)
_MPI_ENV_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE", "SLURM_NTASKS")
_MPI_ENV_LOCAL_RANK = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "PMI_LOCAL_RANK")


class DistributedError(RuntimeError):
    """The ranks disagree (configuration fingerprints, θ after a step); raised on every rank."""


class Communicator:
    """Interface (and the serial implementation of its helpers); see the module docstring."""

    rank: int = 0
    size: int = 1
    name: str = "serial"

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # -- collectives ---------------------------------------------------------------------------
    def allreduce_sum(self, x: Any) -> Any:
        raise NotImplementedError

    def allgather_rows(self, x: Any, counts: Sequence[int]) -> Any:
        raise NotImplementedError

    def allgather(self, obj: Any) -> list:
        raise NotImplementedError

    def bcast(self, obj: Any, root: int = 0) -> Any:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def allreduce_max(self, x: float) -> float:
        return max(self.allgather(float(x)))

    # -- failure handling ----------------------------------------------------------------------
    def abort(self, msg: str = "", code: int = 1) -> None:
        """Print ``msg`` and end the job (every rank); in one process: ``SystemExit(code)``."""
        if msg:
            sys.stderr.write(msg if msg.endswith("\n") else msg + "\n")
            sys.stderr.flush()
        raise SystemExit(code)

    @contextlib.contextmanager
    def abort_on_error(self, what: str = "qnref") -> Iterator["Communicator"]:
        """Run the body; an exception on *any* rank prints its traceback and aborts the whole job,
        so that the other ranks do not wait forever in their next collective. With one process the
        exception propagates unchanged. ``SystemExit(0)`` passes through."""
        if self.size == 1:
            yield self
            return
        try:
            yield self
        except SystemExit as exc:
            if exc.code in (0, None):
                raise
            self.abort(f"{what}: error on rank {self.rank} of {self.size}: exit status {exc.code}; aborting all ranks",
                       code=exc.code if isinstance(exc.code, int) else 1)
        except BaseException as exc:  # noqa: BLE001 - any failure must end the whole job
            tb = "" if _expected(exc) else traceback.format_exc()
            self.abort(f"{tb}{what}: error on rank {self.rank} of {self.size}: {type(exc).__name__}: {exc}\n"
                       f"{what}: aborting all {self.size} ranks (MPI_Abort)", code=1)

    def install_excepthook(self, what: str = "qnref") -> None:
        """Make an uncaught exception on this rank abort the whole job (``sys.excepthook``)."""
        if self.size == 1:
            return
        prev = sys.excepthook

        def hook(etype, value, tb):
            prev(etype, value, tb)
            self.abort(f"{what}: uncaught {etype.__name__} on rank {self.rank} of {self.size}; aborting all ranks")

        sys.excepthook = hook

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


def _expected(exc: BaseException) -> bool:
    """Errors with a complete message of their own (no traceback needed)."""
    if isinstance(exc, DistributedError):
        return True
    return type(exc).__name__ in ("TrainingError", "CLIError")


class SerialComm(Communicator):
    """One process: every collective is the identity."""

    def allreduce_sum(self, x: Any) -> Any:
        if isinstance(x, (int, float, numpy.floating, numpy.integer)):
            return x
        return x.copy()

    def allgather_rows(self, x: Any, counts: Sequence[int]) -> Any:
        if list(counts) != [int(x.shape[0])]:
            raise ValueError(f"row counts {list(counts)} do not match the {x.shape[0]} rows of one process")
        return x

    def allgather(self, obj: Any) -> list:
        return [obj]

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def barrier(self) -> None:
        return None


def _mpi():
    from mpi4py import MPI  # noqa: PLC0415 - optional dependency, imported on demand

    return MPI


class MPIComm(Communicator):
    """MPI through mpi4py. Arrays are reduced with ``Allreduce`` on contiguous host buffers; CuPy
    arrays are staged through host memory (use :class:`NCCLComm` on GPUs)."""

    name = "mpi"

    def __init__(self, comm: Any = None, deterministic: bool | None = None):
        MPI = _mpi()
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = int(self.comm.Get_rank())
        self.size = int(self.comm.Get_size())
        if deterministic is None:
            deterministic = os.environ.get("QNREF_MPI_DETERMINISTIC", "0") not in ("", "0", "false", "no")
        self.deterministic = bool(deterministic)

    def _dtype(self, dt: numpy.dtype):
        from mpi4py.util import dtlib  # noqa: PLC0415

        return dtlib.from_numpy_dtype(dt)

    def _sum_inplace(self, buf: numpy.ndarray) -> None:
        MPI = self.MPI
        if self.deterministic:
            if self.rank == 0:
                self.comm.Reduce(MPI.IN_PLACE, buf, op=MPI.SUM, root=0)
            else:
                self.comm.Reduce(buf, None, op=MPI.SUM, root=0)
            self.comm.Bcast(buf, root=0)
        else:
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

    def allreduce_sum(self, x: Any) -> Any:
        if isinstance(x, (int, float, numpy.floating, numpy.integer)):
            buf = numpy.array([x], dtype=numpy.float64 if isinstance(x, (float, numpy.floating)) else numpy.int64)
            self._sum_inplace(buf)
            return type(x)(buf[0]) if isinstance(x, (int, float)) else buf[0]
        on_gpu = backend.is_cupy_array(x)
        host = numpy.array(backend.to_numpy(x), copy=True, order="C")
        self._sum_inplace(host)
        return backend.to_device(host, "gpu") if on_gpu else host

    def allgather_rows(self, x: Any, counts: Sequence[int]) -> Any:
        counts = [int(c) for c in counts]
        if len(counts) != self.size or counts[self.rank] != int(x.shape[0]):
            raise ValueError(f"rank {self.rank}: row counts {counts} do not match local rows {x.shape[0]}")
        on_gpu = backend.is_cupy_array(x)
        send = numpy.ascontiguousarray(backend.to_numpy(x))
        row = int(numpy.prod(send.shape[1:], dtype=numpy.int64))
        out = numpy.empty((sum(counts),) + tuple(send.shape[1:]), dtype=send.dtype)
        sizes = [c * row for c in counts]
        displs = numpy.concatenate([[0], numpy.cumsum(sizes)[:-1]]).astype(int).tolist()
        dt = self._dtype(send.dtype)
        self.comm.Allgatherv([send, sizes[self.rank], dt], [out, (sizes, displs), dt])
        return backend.to_device(out, "gpu") if on_gpu else out

    def allgather(self, obj: Any) -> list:
        return self.comm.allgather(obj)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root=root)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, msg: str = "", code: int = 1) -> None:
        if msg:
            sys.stderr.write(msg if msg.endswith("\n") else msg + "\n")
        sys.stderr.flush()
        sys.stdout.flush()
        self.comm.Abort(int(code) or 1)


class NCCLComm(MPIComm):
    """NCCL collectives on CuPy arrays (``cupy.cuda.nccl``), bootstrapped and for objects over MPI.

    One GPU per rank: the constructor selects device ``local_rank % device_count`` *before* any
    CuPy array exists (so build the communicator first, then move data to the GPU). Arrays are
    reduced on the current CuPy stream; float scalars and pickled objects travel over MPI.
    NumPy arrays given to it go through MPI as in :class:`MPIComm`.

    **Untested here**: the development machines have no GPU. The code follows the CuPy NCCL API
    (``NcclCommunicator(ndev, uid, rank)``, ``allReduce(send, recv, count, dtype, op, stream)``,
    ``allGather(send, recv, count, dtype, stream)``); ``allGather`` needs equal counts, so row
    blocks are padded to the largest shard and trimmed.
    """

    name = "nccl"

    def __init__(self, comm: Any = None, device_id: int | None = None):
        super().__init__(comm, deterministic=False)
        import cupy  # noqa: PLC0415 - optional
        from cupy.cuda import nccl  # noqa: PLC0415

        self.cp, self.nccl = cupy, nccl
        if device_id is None:
            n_dev = cupy.cuda.runtime.getDeviceCount()
            device_id = local_rank(self.rank) % max(n_dev, 1)
        cupy.cuda.Device(device_id).use()
        self.device_id = device_id
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._types = {numpy.dtype("float32"): nccl.NCCL_FLOAT32, numpy.dtype("float64"): nccl.NCCL_FLOAT64,
                       numpy.dtype("int64"): nccl.NCCL_INT64, numpy.dtype("int32"): nccl.NCCL_INT32}

    def _nccl_type(self, dt) -> int:
        try:
            return self._types[numpy.dtype(dt)]
        except KeyError:
            raise TypeError(f"NCCLComm: no NCCL type for {numpy.dtype(dt)}") from None

    def allreduce_sum(self, x: Any) -> Any:
        if not backend.is_cupy_array(x):
            return super().allreduce_sum(x)
        cp = self.cp
        send = cp.ascontiguousarray(x)
        out = cp.empty_like(send)
        stream = cp.cuda.get_current_stream()
        self.nccl_comm.allReduce(send.data.ptr, out.data.ptr, send.size, self._nccl_type(send.dtype),
                                 self.nccl.NCCL_SUM, stream.ptr)
        return out

    def allgather_rows(self, x: Any, counts: Sequence[int]) -> Any:
        if not backend.is_cupy_array(x):
            return super().allgather_rows(x, counts)
        cp = self.cp
        counts = [int(c) for c in counts]
        m = max(counts)
        send = cp.zeros((m,) + tuple(x.shape[1:]), dtype=x.dtype)
        send[: x.shape[0]] = x
        recv = cp.empty((self.size * m,) + tuple(x.shape[1:]), dtype=x.dtype)
        stream = cp.cuda.get_current_stream()
        self.nccl_comm.allGather(send.data.ptr, recv.data.ptr, send.size, self._nccl_type(x.dtype), stream.ptr)
        parts = [recv[r * m : r * m + c] for r, c in enumerate(counts)]
        return cp.concatenate(parts, axis=0)

    def barrier(self) -> None:
        self.cp.cuda.get_current_stream().synchronize()
        super().barrier()


# -- choosing one --------------------------------------------------------------------------------
def launched_under_mpi() -> int:
    """Number of processes announced by the process manager's environment (0 when none)."""
    for var in _MPI_ENV_SIZE:
        v = os.environ.get(var)
        if v and v.isdigit():
            return int(v)
    return 0


def local_rank(rank: int) -> int:
    for var in _MPI_ENV_LOCAL_RANK:
        v = os.environ.get(var)
        if v and v.isdigit():
            return int(v)
    return rank


_COMM: Communicator | None = None


def get_comm(device: str = "cpu", kind: str | None = None) -> Communicator:
    """The process's communicator (created once, then cached).

    ``kind`` (or env ``QNREF_COMM``): "serial", "mpi", "nccl" or "auto" (default). "auto" gives
    :class:`SerialComm` unless the environment says the process was launched by an MPI process
    manager with more than one process; then :class:`MPIComm` for ``device="cpu"`` and
    :class:`NCCLComm` for ``device="gpu"``. mpi4py is not imported for serial runs.
    """
    global _COMM
    kind = (kind or os.environ.get("QNREF_COMM") or "auto").lower()
    if kind not in ("auto", "serial", "mpi", "nccl"):
        raise ValueError(f"QNREF_COMM / kind must be auto, serial, mpi or nccl, got {kind!r}")
    if _COMM is not None and (kind == "auto" or _COMM.name == kind):
        return _COMM
    if kind == "serial" or (kind == "auto" and launched_under_mpi() <= 1):
        _COMM = SerialComm()
        return _COMM
    try:
        _mpi()
    except ImportError as exc:
        raise RuntimeError("this process was launched by an MPI process manager (or QNREF_COMM asks for MPI) "
                           "but mpi4py cannot be imported; pip install mpi4py mpich") from exc
    if kind == "nccl" or (kind == "auto" and device == "gpu"):
        _COMM = NCCLComm()
    else:
        _COMM = MPIComm()
    if _COMM.size == 1 and kind == "auto":
        _COMM = SerialComm()
    return _COMM


def reset_comm() -> None:
    """Forget the cached communicator (tests)."""
    global _COMM
    _COMM = None
