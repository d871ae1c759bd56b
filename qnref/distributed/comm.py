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

Collective timeout: a rank that waits longer than ``timeout`` seconds (default
:data:`DEFAULT_TIMEOUT` = 600 s; env ``QNREF_MPI_TIMEOUT``, ``qnref train/compare --mpi-timeout``;
``inf`` or ``0`` switches it off) at any collective of :class:`MPIComm` ends the job with one line
naming the collective and the rank(s) that never arrived, exit status :data:`EXIT_TIMEOUT`. The
collectives are posted non-blocking (``Iallreduce``, ``Iallgatherv``, ``Ibcast``, ``Ibarrier``) and
polled; a rank that times out asks the others, on a duplicated communicator, which collective they
are waiting in — a rank that does not answer is the stalled one — and the lowest waiting rank prints
the line and calls MPI_Abort. NCCL's own GPU collectives are not covered (see NCCL's
``NCCL_TIMEOUT``/watchdog); their MPI parts are.

Refusals that every rank meets alike (a ValueError on bad input, a TrainingError, a refused
checkpoint, a diverged run) print one line, from rank 0, before the job is aborted.

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
import math
import os
import pickle
import sys
import time
import traceback
from typing import Any, Iterator, Sequence

import numpy

from .. import backend

__all__ = ["DistributedError", "Communicator", "SerialComm", "MPIComm", "NCCLComm", "get_comm", "launched_under_mpi", "reset_comm",
           "DEFAULT_TIMEOUT", "EXIT_TIMEOUT", "collective_timeout"]

#: seconds a rank may wait at one collective before the job is aborted (env QNREF_MPI_TIMEOUT)
DEFAULT_TIMEOUT = 600.0
#: exit status of a job aborted by the collective timeout (the CLI's EXIT_MPI_TIMEOUT)
EXIT_TIMEOUT = 5
#: seconds the other ranks wait for rank 0 to print a refusal every rank meets alike
REFUSAL_GRACE = 5.0
#: seconds a rank waits between flushing its last message and MPI_Abort, so that the launcher forwards it
ABORT_FORWARD_GRACE = 0.5
_TAG_PROBE, _TAG_REPLY, _TAG_REFUSE = 71, 72, 73

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
            if _expected(exc):  # the same clear refusal on every rank: one line, printed by rank 0
                text = " ".join(str(exc).split("\n"))
                self.refuse(f"{what}: error: {text}", _exit_code(exc))
            tb = traceback.format_exc()
            self.abort(f"{tb}{what}: error on rank {self.rank} of {self.size}: {type(exc).__name__}: {exc}\n"
                       f"{what}: aborting all {self.size} ranks (MPI_Abort)", code=1)

    def refuse(self, line: str, code: int) -> None:
        """End the job after a refusal that every rank normally meets alike: rank 0 prints ``line``;
        another rank prints it (naming itself) only when rank 0 has not refused within
        :data:`REFUSAL_GRACE` seconds."""
        if self.rank != 0:
            time.sleep(REFUSAL_GRACE)
            line += f" (rank {self.rank} of {self.size})"
        self.abort(f"{line}; aborting all {self.size} ranks", code)

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


_EXPECTED = ("TrainingError", "DivergenceError", "CheckpointError", "CLIError", "ValidationError", "PathError",
             "BackendError", "NonFiniteError")


def _expected(exc: BaseException) -> bool:
    """Refusals with a complete one-line message of their own, met alike by every rank (bad input,
    a diverged run, a refused checkpoint): no traceback needed."""
    if isinstance(exc, (DistributedError, ValueError, TypeError)):
        return True
    return any(c.__name__ in _EXPECTED for c in type(exc).__mro__)


def _exit_code(exc: BaseException) -> int:
    """The CLI's documented status for a refusal (2 bad input, 3 checkpoint, 4 diverged, 1 other)."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "CheckpointError" in names:
        return 3
    if "DivergenceError" in names:
        return 4
    if names & {"ValueError", "TypeError", "CLIError"}:
        return 2
    return 1


def collective_timeout(value: Any = None) -> float:
    """The collective timeout in seconds: ``value``, else env ``QNREF_MPI_TIMEOUT``, else
    :data:`DEFAULT_TIMEOUT`; ``inf``, ``0``, ``off`` or ``none`` mean no timeout (``math.inf``)."""
    from .. import validate  # noqa: PLC0415

    if value is None:
        value = os.environ.get("QNREF_MPI_TIMEOUT", "").strip() or DEFAULT_TIMEOUT
    if isinstance(value, str):
        if value.lower() in ("off", "none", "0", "inf"):
            return math.inf
        return validate.parse_number("QNREF_MPI_TIMEOUT", value, 0, lo_open=True)
    if value == 0 or value == math.inf:
        return math.inf
    return validate.number("timeout", value, 0, lo_open=True)


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

    def __init__(self, comm: Any = None, deterministic: bool | None = None, timeout: float | None = None):
        MPI = _mpi()
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = int(self.comm.Get_rank())
        self.size = int(self.comm.Get_size())
        if deterministic is None:
            deterministic = os.environ.get("QNREF_MPI_DETERMINISTIC", "0") not in ("", "0", "false", "no")
        self.deterministic = bool(deterministic)
        self.timeout = collective_timeout(timeout)
        self._side = self.comm.Dup()  # the timeout's probes and refusal notices travel here
        self._seq, self._what, self._sends = 0, "", []

    def refuse(self, line: str, code: int) -> None:
        """Rank 0 tells the others (side communicator) that it refuses, prints ``line`` and aborts with
        ``code``; the others abort silently with the same code once told (the job's exit status is
        then ``code`` whichever abort lands first), or print the line themselves after
        :data:`REFUSAL_GRACE` seconds without word from rank 0."""
        if self.rank == 0:
            reqs = [self._side.isend(code, dest=r, tag=_TAG_REFUSE) for r in range(1, self.size)]
            sys.stderr.write(f"{line}; aborting all {self.size} ranks\n")
            sys.stderr.flush()
            t0 = time.monotonic()
            while not all(r.Test() for r in reqs) and time.monotonic() - t0 < 1.0:
                time.sleep(1e-3)
            time.sleep(0.2)  # let the others abort with the same code
            self._abort(code)
        t0 = time.monotonic()
        while time.monotonic() - t0 < REFUSAL_GRACE:
            if self._side.Iprobe(source=0, tag=_TAG_REFUSE):
                self._abort(int(self._side.recv(source=0, tag=_TAG_REFUSE)))
            time.sleep(1e-3)
        self.abort(f"{line} (rank {self.rank} of {self.size}); aborting all {self.size} ranks", code)

    # -- waiting with a timeout ------------------------------------------------------------------
    def _run(self, what: str, post: Any) -> None:
        """Post one non-blocking collective (``post()`` returns its request) and wait for it, at
        most ``self.timeout`` seconds; without a timeout the blocking twin runs instead."""
        self._seq += 1
        self._what = what
        req = post()
        t0 = time.monotonic()
        spins, pause = 0, 1e-5
        while not req.Test():
            spins += 1
            if spins < 2000:
                if spins % 64 == 0:
                    self._answer_probes()
                continue
            self._answer_probes()
            waited = time.monotonic() - t0
            if waited > self.timeout:
                self._stalled(waited)
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        self._what = ""

    def _answer_probes(self) -> None:
        MPI = self.MPI
        status = MPI.Status()
        while self._side.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_PROBE, status=status):
            src = status.Get_source()
            self._side.recv(source=src, tag=_TAG_PROBE)
            self._sends.append(self._side.isend((self.rank, self._seq, self._what), dest=src, tag=_TAG_REPLY))
        self._sends = [r for r in self._sends if not r.Test()]

    def _stalled(self, waited: float) -> None:
        """Ask every other rank where it waits; the lowest waiting rank prints one line and aborts."""
        MPI = self.MPI
        seq, what = self._seq, self._what
        for r in range(self.size):
            if r != self.rank:
                self._sends.append(self._side.isend(seq, dest=r, tag=_TAG_PROBE))
        replies: dict[int, tuple] = {}
        grace = min(2.0, max(0.2, self.timeout / 10))
        t0 = time.monotonic()
        status = MPI.Status()
        while time.monotonic() - t0 < grace and len(replies) < self.size - 1:
            self._answer_probes()
            while self._side.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_REPLY, status=status):
                src = status.Get_source()
                replies[src] = self._side.recv(source=src, tag=_TAG_REPLY)
            time.sleep(1e-3)
        here = sorted([self.rank] + [r for r, (_, s_, _) in replies.items() if s_ == seq])
        elsewhere = {r: (s_, w) for r, (_, s_, w) in replies.items() if s_ != seq}
        missing = [r for r in range(self.size) if r not in here and r not in elsewhere]
        if self.rank == here[0]:
            parts = []
            if missing:
                parts.append(f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} never arrived")
            for r, (s_, w) in sorted(elsewhere.items()):
                parts.append(f"rank {r} waits in {w or 'no collective'} (#{s_})")
            waiting = ", ".join(map(str, here))
            sys.stdout.flush()
            sys.stderr.write(f"qnref: MPI collective timeout: {'; '.join(parts)} — rank{'s' if len(here) > 1 else ''} "
                             f"{waiting} waited {waited:.1f} s in {what} (collective #{seq}); limit {self.timeout:g} s "
                             f"(QNREF_MPI_TIMEOUT / --mpi-timeout); aborting all {self.size} ranks\n")
            self._abort(EXIT_TIMEOUT)
        t1 = time.monotonic()
        while time.monotonic() - t1 < 4 * grace:  # the lowest waiting rank is aborting the job
            self._answer_probes()
            time.sleep(1e-3)
        self._abort(EXIT_TIMEOUT)

    def _timed(self) -> bool:
        return math.isfinite(self.timeout)

    def _dtype(self, dt: numpy.dtype):
        from mpi4py.util import dtlib  # noqa: PLC0415

        return dtlib.from_numpy_dtype(dt)

    def _sum_inplace(self, buf: numpy.ndarray) -> None:
        MPI, c = self.MPI, self.comm
        if not self._timed():
            if self.deterministic:
                if self.rank == 0:
                    c.Reduce(MPI.IN_PLACE, buf, op=MPI.SUM, root=0)
                else:
                    c.Reduce(buf, None, op=MPI.SUM, root=0)
                c.Bcast(buf, root=0)
            else:
                c.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            return
        if self.deterministic:
            self._run("allreduce_sum (reduce)", lambda: c.Ireduce(MPI.IN_PLACE, buf, op=MPI.SUM, root=0) if self.rank == 0
                      else c.Ireduce(buf, None, op=MPI.SUM, root=0))
            self._run("allreduce_sum (bcast)", lambda: c.Ibcast(buf, root=0))
        else:
            self._run("allreduce_sum", lambda: c.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM))

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
        if self._timed():
            self._run("allgather_rows", lambda: self.comm.Iallgatherv([send, sizes[self.rank], dt], [out, (sizes, displs), dt]))
        else:
            self.comm.Allgatherv([send, sizes[self.rank], dt], [out, (sizes, displs), dt])
        return backend.to_device(out, "gpu") if on_gpu else out

    def allgather(self, obj: Any) -> list:
        if not self._timed():
            return self.comm.allgather(obj)
        raw = numpy.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=numpy.uint8)
        sizes = numpy.zeros(self.size, dtype=numpy.int64)
        mine = numpy.array([raw.size], dtype=numpy.int64)
        self._run("allgather (sizes)", lambda: self.comm.Iallgather(mine, sizes))
        out = numpy.empty(int(sizes.sum()), dtype=numpy.uint8)
        displs = numpy.concatenate([[0], numpy.cumsum(sizes)[:-1]]).astype(int).tolist()
        counts = sizes.astype(int).tolist()
        self._run("allgather", lambda: self.comm.Iallgatherv([raw, self.MPI.BYTE], [out, (counts, displs), self.MPI.BYTE]))
        return [pickle.loads(out[d:d + n].tobytes()) for d, n in zip(displs, counts)]  # noqa: S301 - our own ranks

    def bcast(self, obj: Any, root: int = 0) -> Any:
        if not self._timed():
            return self.comm.bcast(obj, root=root)
        raw = numpy.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=numpy.uint8) \
            if self.rank == root else None
        size = numpy.array([raw.size if raw is not None else 0], dtype=numpy.int64)
        self._run("bcast (size)", lambda: self.comm.Ibcast(size, root=root))
        buf = raw.copy() if raw is not None else numpy.empty(int(size[0]), dtype=numpy.uint8)
        self._run("bcast", lambda: self.comm.Ibcast([buf, self.MPI.BYTE], root=root))
        return obj if self.rank == root else pickle.loads(buf.tobytes())  # noqa: S301 - our own ranks

    def barrier(self) -> None:
        if self._timed():
            self._run("barrier", self.comm.Ibarrier)
        else:
            self.comm.Barrier()

    def abort(self, msg: str = "", code: int = 1) -> None:
        if msg:
            sys.stderr.write(msg if msg.endswith("\n") else msg + "\n")
        self._abort(int(code) or 1)

    def _abort(self, code: int) -> None:
        """MPI_Abort without MPICH's own 'Abort(…) on node …' line (our message was printed)."""
        sys.stderr.flush()
        sys.stdout.flush()
        # The launcher forwards our pipes asynchronously and kills every process on MPI_Abort; on a
        # loaded machine a message flushed just before the abort was lost (CI: empty stderr).
        time.sleep(ABORT_FORWARD_GRACE)
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        except OSError:
            pass
        self.comm.Abort(code)


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
