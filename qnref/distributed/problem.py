"""Data parallelism: every rank draws the same global batch and evaluates only its shard of it.

:class:`DistributedProblem` is a :class:`~qnref.optim.base.Problem` (same seed, same host RNG
``rng``, same device RNG ``device_rng``, same epoch stream, same ``state()``), so every rank draws
the **same global indices** in the same order. The objectives it hands out
(:class:`DistributedObjective`) split each global batch of B examples into P contiguous shards
(rank r gets rows ``[lo_r, hi_r)``, sizes ⌈B/P⌉ for the first B mod P ranks and ⌊B/P⌋ for the
others, like ``numpy.array_split``), run the network on their shard only, and combine:

===================================  ===============================================  =====================
quantity                             how                                              communicated per call
===================================  ===============================================  =====================
``value``                            Σ_r Σ_{i∈shard} ℓᵢ / B (+ λ/2 ‖θ‖²)               allreduce 1 float
``grad``                             Σ_r J_rᵀ dz_r / B (+ λθ)                         allreduce n
``hvp(v)``                           Σ_r of the shard's R-op backward with 1/B        allreduce n (2n with
                                                                                      the gradient)
``ggn_vp(v)``, ``fisher_vp(v, k)``   Σ_r J_rᵀ (H_L J v)_r / B,  Σ_r J_rᵀ (e ⊙ c)_r / B  allreduce n
``vjp(u)``                           u global (B, C): rank r applies its rows         allreduce n
``jvp(v)``, ``z``, ``dz``, ``losses``  shard rows gathered in rank order (global rows)  allgather B·C
``per_example_grads``                shard rows gathered                              allgather B·n
``layer_stats`` → ``kron.factors``   A = Σ_r Σ āāᵀ / B, G = Σ_r Σ ggᵀ / B (sums of     allreduce
                                     outer products are reduced, rows are not          Σₗ (d_in+1)² + d_out²
                                     gathered); tap["a"], tap["g"] gather rows on      (rows on demand:
                                     demand (K-BFGS means, Gram matrices)              B Σₗ (d_in+1+d_out))
``gram("grad")``                     gathered taps, Σₗ (ĀĀᵀ) ⊙ (ΓΓᵀ) on every rank    allgather
                                                                                      B Σₗ (d_in+1+d_out)
``gram("jacobian")``                 gathered taps per class                          allgather
                                                                                      B Σₗ (d_in+1+C d_out)
===================================  ===============================================  =====================

(non-dense nets fall back to gathering per-example gradients: B·n, resp. B·C·n for the Jacobian
Gram.) Every rank ends a collective with the same bits, so every rank holds the same θ and the same
optimizer state, and an optimizer's control flow (accept/reject, line-search trials, damping
updates) is identical on all ranks. A P-process run with global batch B therefore reproduces the
one-process run with batch B up to the order of summation (relative differences ~1e-15 in float64).

Sampled targets (true Fisher, KFAC's ``fisher="sampled"``, TNT): the outputs z of the global batch
are gathered (B·C numbers) and ỹ is drawn **on the whole batch** from the shared ``device_rng``
(same state on every rank, same number of draws as one process), then each rank uses its slice.
This equals the one-process draw except where a uniform variate falls within rounding of a CDF
boundary (z differs from the one-process z in the last bits), i.e. with probability ~1e-16 per
example.

Limits: every rank holds the whole data set (indices are global); a global batch must have at
least P examples; batch normalization in training mode couples the examples of a batch and is
refused (its batch statistics would be per shard).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy

from .. import backend
from ..curvature import kron
from ..curvature.derived import PointProducts
from ..curvature.protocol import reduce_taps
from ..curvature.objective import Objective, PassCounter, Point, PointMethods, gram_matrix
from ..curvature.structure import positions
from ..optim.base import Problem
from .comm import Communicator, get_comm

__all__ = ["DistributedProblem", "DistributedObjective", "DistributedPoint", "DistributedTap", "shard_counts",
           "shard_bounds"]

_KINDS = ("forward", "backward", "rforward", "rbackward")


def shard_counts(n: int, size: int) -> list[int]:
    """Rows per rank of a contiguous split of ``n`` rows (``numpy.array_split`` sizes)."""
    q, r = divmod(int(n), int(size))
    return [q + (1 if k < r else 0) for k in range(size)]


def shard_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    c = shard_counts(n, size)
    lo = sum(c[:rank])
    return lo, lo + c[rank]


class _NoRNG:
    """Stands in for the shard objective's generator: sampling must happen on the global batch."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("internal error: a shard objective tried to draw random numbers; sampled targets are "
                           "drawn on the global batch by DistributedPoint.sampled_targets")


def _synced(fn):
    """Add the passes the shard objective counted (scaled to the global batch) to the global counter."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        finally:
            self.obj._sync_counter()

    return wrapper


class DistributedObjective(PointMethods):
    """f on a global batch (indices ``idx`` into the training set) evaluated shard-wise.

    Same interface as :class:`~qnref.curvature.objective.Objective` (``at``, ``n_samples``,
    ``subset``, the convenience products); ``X``/``y`` are the global batch (built on demand),
    ``local`` is the shard's ordinary Objective.
    """

    def __init__(self, problem: "DistributedProblem", idx: Any):
        idx = numpy.asarray(backend.to_numpy(idx) if backend.is_cupy_array(idx) else idx)
        if idx.dtype == bool:
            idx = numpy.flatnonzero(idx)
        self.idx = idx.astype(numpy.int64, copy=False).reshape(-1)
        self.problem = problem
        self.comm: Communicator = problem.comm
        self.model, self.loss, self.l2, self.train = problem.model, problem.loss, problem.l2, problem.train
        self.xp = problem.xp
        self.counter = problem.counter
        self.rng = problem.device_rng
        N, P = int(self.idx.shape[0]), self.comm.size
        if N < P:
            raise ValueError(f"a batch of {N} examples cannot be split over {P} ranks (every rank needs at least one "
                             "example); use a larger batch or fewer processes")
        self.counts = shard_counts(N, P)
        self.lo, self.hi = shard_bounds(N, P, self.comm.rank)
        self._local_counter = PassCounter()
        self._seen = {k: 0 for k in _KINDS}
        self._seen_calls: dict = {}
        sel = self.xp.asarray(self.idx[self.lo : self.hi])
        self.local = Objective(self.model, self.loss, problem.X[sel], problem.y[sel], self.l2, train=self.train,
                               counter=self._local_counter, rng=_NoRNG(), validate=False)
        self._X = self._y = None

    # -- bookkeeping ---------------------------------------------------------------------------
    def _sync_counter(self) -> None:
        n_local, N = self.hi - self.lo, self.n_samples
        lc = self._local_counter
        for k in _KINDS:
            d = getattr(lc, k) - self._seen[k]
            if d:
                self.counter.add(k, (d // n_local) * N)
                self._seen[k] = getattr(lc, k)
        for name, c in lc.calls.items():
            d = c - self._seen_calls.get(name, 0)
            if d:
                self.counter.calls[name] = self.counter.calls.get(name, 0) + d
                self._seen_calls[name] = c

    @property
    def n_samples(self) -> int:
        return int(self.idx.shape[0])

    @property
    def n_local(self) -> int:
        return self.hi - self.lo

    @property
    def dtype(self):
        return self.problem.X.dtype

    @property
    def layout(self) -> Any:
        return self.model.layout

    @property
    def X(self) -> Any:
        if self._X is None:
            self._X = self.problem.X[self.xp.asarray(self.idx)]
        return self._X

    @property
    def y(self) -> Any:
        if self._y is None:
            self._y = self.problem.y[self.xp.asarray(self.idx)]
        return self._y

    def at(self, theta: Any) -> "DistributedPoint":
        return DistributedPoint(self, theta)

    def subset(self, idx: Any) -> "DistributedObjective":
        """The objective on positions ``idx`` *of this batch* (global positions, as for Objective)."""
        return DistributedObjective(self.problem, self.idx[positions(idx, self.n_samples)])


class DistributedTap(dict):
    """One layer's taps of a distributed point: ``"kind"`` plus the shard's rows.

    ``tap["a"]`` / ``tap["g"]`` gather the rows of all ranks (global batch order) on first use.
    :meth:`reduced_factors` returns the Kronecker factors (A, G) of the *global* batch by one
    allreduce of the shards' sums of outer products, without gathering rows;
    :func:`qnref.curvature.kron.factors` uses it when present.
    """

    def __init__(self, point: "DistributedPoint", tap: Any):
        super().__init__({k: tap[k] for k in tap if k not in ("a", "g")})
        self._point = point
        self.local = tap                 # the shard's taps (a conv tap streams its rows: never gathered)

    def __missing__(self, key: str) -> Any:
        if key in ("a", "g"):
            local = self._point.xp.ascontiguousarray(self.local[key])
            val = self._point.obj.comm.allgather_rows(local, self._point.obj.counts)
            self[key] = val
            return val
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in ("a", "g") or dict.__contains__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def reduced_factors(self) -> tuple[Any, Any]:
        """(A, G) of the global batch; same reductions as :func:`qnref.curvature.kron.factors`."""
        kind = self.get("kind")
        if kind not in ("dense", "conv"):
            raise ValueError(f"no Kronecker factors for a tap of kind {kind!r}")
        xp, N = self._point.xp, self._point.N
        sa, sg = kron.factor_sums(self.local)
        both = self._point.obj.comm.allreduce_sum(xp.concatenate([sa.reshape(-1), sg.reshape(-1)]))
        k = sa.size
        return both[:k].reshape(sa.shape) / N, both[k:].reshape(sg.shape) / (N * kron.locations(self.local))


class DistributedPoint(PointProducts):
    """The distributed objective linearised at θ (same interface as
    :class:`~qnref.curvature.objective.Point`; row-space quantities are global).

    Implements the primitives on the shard point ``local`` with ``reduce_sum`` = allreduce,
    ``gather_rows`` = allgather of rows in rank order and ``local_rows`` = this rank's slice;
    the derived products (``jvp``, ``vjp``, ``ggn_vp``, ``fisher_vp``, ``output_grads``) are
    inherited from :class:`~qnref.curvature.derived.PointProducts`. Overrides: ``hvp`` (one
    allreduce of [grad, Hv] when the gradient is not known yet) and ``gram`` (gathered taps,
    Kronecker trick).
    """

    def __init__(self, obj: DistributedObjective, theta: Any):
        self.obj = obj
        self.theta = theta
        self.xp = obj.xp
        try:
            self.local = obj.local.at(theta)
        finally:
            obj._sync_counter()
        self._value = None
        self._grad = None
        self._z = self._dz = self._losses = None
        self._sampled = None
        self._pred = None     # Point._loss_call without a cached p: the gathered z's σ/softmax is used once

    @property
    def comm(self) -> Communicator:
        return self.obj.comm

    # -- primitives (PointPrimitives) -------------------------------------------------------
    def reduce_sum(self, x: Any) -> Any:
        return self.comm.allreduce_sum(x)

    def gather_rows(self, x: Any) -> Any:
        return self.comm.allgather_rows(x, self.obj.counts)

    def local_rows(self, u: Any) -> Any:
        return u[self.obj.lo : self.obj.hi]

    def check_independent(self, what: str) -> None:
        self.local.check_independent(what)

    @_synced
    def local_jvp(self, v: Any) -> Any:
        return self.local.local_jvp(v)

    @_synced
    def local_vjp(self, u: Any, call: str) -> Any:
        return self.local.local_vjp(u, call)

    def local_loss_hvp(self, u: Any) -> Any:
        return self.local.local_loss_hvp(u)

    def local_output_grads(self, targets: Any) -> Any:
        if isinstance(targets, str):
            self._prepare(targets)
            return self.local.local_output_grads(targets)
        return self.local.local_output_grads(self.local_rows(targets))

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self.N,) + tuple(self.local.z.shape[1:])

    # -- values -----------------------------------------------------------------------------
    @property
    def value(self) -> float:
        if self._value is None:
            s = self.reduce_sum(float(self.local.losses.sum()))
            v = s / self.N
            if self.obj.l2:
                v = v + 0.5 * self.obj.l2 * float(self.theta @ self.theta)
            self._value = float(v)
        return self._value

    def _gathered(self, name: str) -> Any:
        """The shard point's row array ``name`` gathered over ranks once (cached in ``_<name>``)."""
        if getattr(self, "_" + name) is None:
            setattr(self, "_" + name, self.gather_rows(getattr(self.local, name)))
        return getattr(self, "_" + name)

    @property
    def losses(self) -> Any:
        return self._gathered("losses")

    @property
    def z(self) -> Any:
        """Network outputs of the global batch (gathered)."""
        return self._gathered("z")

    @property
    def dz(self) -> Any:
        return self._gathered("dz")

    @property
    @_synced
    def grad(self) -> Any:
        if self._grad is None:
            g = self.reduce_sum(self.local._backward(self.local.dz / self.N, "grad"))
            if self.obj.l2:
                g += self.obj.l2 * self.theta
            self._grad = g
        return self._grad

    # -- curvature products -------------------------------------------------------------------
    @_synced
    def hvp(self, v: Any) -> Any:
        """Exact ∇²f v: the shard's R-op with the global 1/N, summed over ranks (the gradient
        rides along in the same allreduce when it is not known yet)."""
        g_loc, hv_loc = self.local.rop(v, self.N, want_grad=self._grad is None)
        if self._grad is None:
            nn = g_loc.shape[0]
            both = self.reduce_sum(self.xp.concatenate([g_loc, hv_loc]))
            return self.close_hvp(both[:nn].copy(), both[nn:].copy(), v)
        return self.close_hvp(None, self.reduce_sum(hv_loc), v)

    #: ỹ ~ p(y | z) for the global batch (gathered z), drawn once per point from the shared device
    #: RNG — the same draw as :meth:`Point.sampled_targets` on the whole batch.
    sampled_targets = Point.sampled_targets
    _loss_call = Point._loss_call

    def _prepare(self, kind: Any) -> None:
        """Give the shard point its slice of the globally drawn targets (before any local use)."""
        if isinstance(kind, str) and kind == "sampled" and self.local._sampled is None:
            self.local._sampled = self.sampled_targets()[self.obj.lo : self.obj.hi]

    # -- per-example quantities ---------------------------------------------------------------
    @_synced
    def per_example_grads(self, targets: Any = "empirical") -> Any:
        self._prepare(targets)
        if not isinstance(targets, str):
            targets = self.local_rows(targets)
        return self.gather_rows(self.local.per_example_grads(targets))

    @_synced
    def layer_stats(self, targets: Any = "empirical", reduce: Any = None) -> dict:
        """Per Kronecker layer a :class:`DistributedTap` (factors by allreduce, rows on demand)."""
        self._prepare(targets)
        if not isinstance(targets, str):
            targets = self.local_rows(targets)
        return reduce_taps({name: DistributedTap(self, t) for name, t in self.local.layer_stats(targets).items()}, reduce)

    @_synced
    def gram(self, kind: str = "grad") -> Any:
        """The Gram matrix of the global batch (B × B or BC × BC), identical on every rank.

        Rows are gathered (see the module table for the volume) and the Gram is formed on every
        rank with the Kronecker trick (dense nets) or from gathered per-example rows.
        """
        return gram_matrix(self.local, kind, rows=self.gather_rows)


class DistributedProblem(Problem):
    """A :class:`~qnref.optim.base.Problem` whose objectives are evaluated data-parallel on ``comm``.

    Every rank must be given the same data, model, loss, l2, seed (checked by the training loop's
    fingerprint). The stream of indices, the RNG states and the counters are global, so
    ``state()``/``load_state()`` (and checkpoints) do not depend on the number of ranks.
    """

    def __init__(self, model: Any, loss: Any, X: Any, y: Any, l2: float = 0.0, *, seed: int = 0,
                 counter: PassCounter | None = None, train: bool = True, comm: Communicator | None = None):
        super().__init__(model, loss, X, y, l2, seed=seed, counter=counter, train=train)
        self.comm = comm if comm is not None else get_comm(backend.device_of(X))
        if model.couples_examples and train and self.comm.size > 1:
            raise ValueError("the model has batch normalization in training mode: its batch statistics couple the "
                             "examples of a batch, so a sharded batch would not equal the one-process batch; "
                             "data-parallel runs need models without BatchNorm (or train=False)")
        if self.n_samples < self.comm.size:
            raise ValueError(f"{self.n_samples} training examples cannot be split over {self.comm.size} ranks")
        self._dfull: DistributedObjective | None = None

    def subset(self, idx: Any) -> DistributedObjective:
        return DistributedObjective(self, numpy.asarray(idx, dtype=numpy.int64))

    def _distributed_full(self) -> DistributedObjective:
        if self._dfull is None:
            self._dfull = DistributedObjective(self, numpy.arange(self.n_samples, dtype=numpy.int64))
        return self._dfull

    def sample(self, size: int) -> DistributedObjective:
        size = self._check_size(size)
        if size == self.n_samples:
            return self._distributed_full()
        return self.subset(numpy.sort(self.rng.choice(self.n_samples, size=size, replace=False)))

    def full(self) -> DistributedObjective:
        self.samples_drawn += self.n_samples
        return self._distributed_full()

    @property
    def full_objective(self) -> DistributedObjective:
        return self._distributed_full()
