"""Quasi-Newton operators: the algebra of the limited-memory methods, each piece written once.

References
----------
* [BNS94] R. H. Byrd, J. Nocedal, R. B. Schnabel, "Representations of quasi-Newton matrices and
  their use in limited memory methods", Math. Programming 63 (1994) 129–156.
* [NW06] J. Nocedal, S. J. Wright, *Numerical Optimization*, 2nd ed. (2006): inverse BFGS (6.17),
  SR1 skip rule (6.26), two-loop recursion (Alg. 7.4), compact forms §7.2.
* [RD16] V. Ramamurthy, N. Duffy, "L-SR1: a second order optimization method for deep learning",
  §3 and appendix Algorithms 1–2.

Pieces (pairs are rows, oldest first, :mod:`~.pairs`):

* :class:`LBFGSOperator` — L-BFGS with H₀ = γI. :meth:`~LBFGSOperator.solve` (H v) is the
  two-loop recursion [NW06] Alg. 7.4, **the product the optimizers use** for vectors (L-BFGS,
  S-LBFGS, SQN); :meth:`~LBFGSOperator.solve_compact` is the compact inverse form [BNS94] eq.
  (3.1), the oracle of the two-loop in the tests and the form for matrix right-hand sides
  (K-BFGS(L)'s H_G); :meth:`~LBFGSOperator.matvec` is the direct form B v, [BNS94] eq. (3.5).
* :class:`LSR1Operator` — compact L-SR1 B = γI + ΨMΨᵀ, Ψ = Y − γS, M = (D + L + Lᵀ − γSᵀS)⁻¹
  ([BNS94] Thm 5.1) and its inverse form ([BNS94] eq. 5.3, [RD16] Alg. 2); both middle matrices
  come from the Grams (:func:`lsr1_middle_inverse`, :func:`lsr1_inverse_middle`) — the one place
  they are formed — whether the Grams are kept incrementally (:class:`~.pairs.PairStore`) or fresh.
* :func:`lsr1_prune_count` — the pruning loop of [RD16] Alg. 1 lines 30–39 / Alg. 2 lines 24–32
  on the Grams.
* :func:`bfgs_inverse_update` and :class:`DenseInverseBFGS` — the inverse BFGS update [NW06] (6.17)
  (dense factors: K-BFGS's H_A, H_G; oracle of the L-BFGS operator).
* :func:`sr1_skip` — the SR1 skip rule [NW06] (6.26).

Scaling conventions: L-BFGS's ``gamma`` scales the *inverse* (H₀ = γI, [NW06] (7.20) γ = sᵀy/yᵀy
of the newest pair by default; SciPy's ``LbfgsInvHessProduct`` is γ = 1); L-SR1's ``gamma`` scales
the *Hessian* (B₀ = γI, H₀ = I/γ, [RD16] Alg. 1).

Flop counts count **multiplications** (a multiply-add once; [NW06] §7.2, [RD16] §3 convention):
each operator has ``flops_matvec`` / ``flops_solve`` and static count functions of (n, k);
:func:`operator_flops` looks them up by name.
"""
from __future__ import annotations

import math
from typing import Any

import numpy

from .. import backend
from ..host_kernels import kernel as _host_kernel, plain_host as _plain_host
from .costs import flops_eigvalsh, flops_solve

#: Reciprocal-condition threshold below which a small middle matrix counts as singular.
SINGULAR_RTOL = 1e-10

__all__ = ["SINGULAR_RTOL", "sym_rcond", "LBFGSOperator", "LSR1Operator", "lsr1_middle_inverse",
           "lsr1_inverse_middle", "psi_gram", "lsr1_prune_count", "lsr1_prune", "bfgs_inverse_update", "DenseInverseBFGS",
           "sr1_skip", "operator_flops", "lsr1_prune_flops", "axpy_"]


def _check_pairs(S: Any, Y: Any) -> tuple[Any, int, int]:
    xp = backend.namespace(S, Y)
    if S.ndim != 2 or S.shape != Y.shape:
        raise ValueError(f"S and Y must both have shape (k, n); got {S.shape} and {Y.shape}")
    return xp, int(S.shape[0]), int(S.shape[1])


def sym_rcond(A: Any) -> float:
    """min |λ| / max |λ| of a symmetric matrix (1.0 for an empty one, 0.0 for zero or non-finite)."""
    if A.shape[0] == 0:
        return 1.0
    xp = backend.namespace(A)
    ev = xp.abs(xp.linalg.eigvalsh(A))
    big = float(ev.max())
    if not math.isfinite(big):
        return 0.0
    return float(ev.min()) / big if big > 0.0 else 0.0


# --------------------------------------------------------------------------------------------------
# L-BFGS
# --------------------------------------------------------------------------------------------------
def axpy_(q: Any, c: Any, y: Any) -> None:
    """q ← q + c·y in place, bit for bit ``q += c * y`` (the two-loop's update, [NW06] Alg. 7.4).

    On 1-D contiguous NumPy float vectors of one dtype (from ``host_kernels.MIN_SIZE`` entries) with a
    scalar c of that dtype, one numba pass
    (reads y and q, writes q: 3 n-vector transfers against NumPy's 5 and an n-vector temporary;
    10 ms of the 30 ms two-loop at n = 2.8·10⁶, m = 10, issue 21); otherwise (CuPy, matrices,
    mixed dtypes, ndarray subclasses with their own arithmetic, no numba) NumPy's own ``q += c * y``.
    """
    if (_plain_host(q, y) and q.ndim == 1 and y.ndim == 1 and q.dtype == getattr(c, "dtype", None)
            and q.shape == y.shape and q.flags.writeable):
        kernel = _host_kernel("axpy", q.size)
        if kernel is not None:
            kernel(q, c, y)
            return
    q += c * y


def _two_loop_passes(Sb: Any, v: Any = None) -> "_ExpressionPasses | _FusedPasses":
    """The passes of the two-loop recursion over vectors like the rows of the buffer ``Sb`` and the
    right-hand side ``v`` (None: the rows themselves, e.g. for γ = sᵀy/yᵀy; the route then depends
    on Sb alone). Each pass has three forms: ``dot(a, q)`` = aᵀq, ``axpy_dot(q, c, y, z)``:
    q ← q + c·y, then zᵀq, and ``scale_dot(q, g, z)``: q ← g·q, then zᵀq (z None: no dot product,
    None returned).

    * :class:`_FusedPasses` for 1-D contiguous NumPy float vectors of one dtype from
      ``host_kernels.MIN_SIZE`` entries, with numba;
    * :class:`_ExpressionPasses` otherwise (CuPy, 2-D v, small or strided operands, no numba, the
      ``"xp"`` switch)."""
    n = int(Sb.shape[-1])
    if (v is None or (v.ndim == 1 and v.shape[0] == n and _plain_host(v, Sb))) and _plain_host(Sb):
        kernels = {name: _host_kernel(name, n) for name in ("dot", "axpy_dot", "scale_dot")}
        if None not in kernels.values():
            return _FusedPasses(kernels, n, Sb.dtype.type)
    return _ExpressionPasses(v is not None and v.ndim != 1)


class _ExpressionPasses:
    """The two-loop's passes as NumPy's / CuPy's own ``a @ q``, :func:`axpy_` and ``q *= g``, with
    their usual bits (see :func:`_two_loop_passes`)."""

    fused = False

    def __init__(self, matrix_rhs: bool) -> None:
        self._col = (lambda a: a[:, None]) if matrix_rhs else (lambda a: a)

    def dot(self, a: Any, q: Any) -> Any:
        return a @ q

    def axpy_dot(self, q: Any, c: Any, y: Any, z: Any) -> Any:
        axpy_(q, c, self._col(y))
        return None if z is None else z @ q

    def scale_dot(self, q: Any, g: Any, z: Any) -> Any:
        q *= g
        return None if z is None else z @ q


class _FusedPasses:
    """The two-loop's passes as the host kernels (see :func:`_two_loop_passes`): one pass per loop
    step that updates q and forms the next dot product on it — 4 n-vector transfers instead of 5 —
    run over fixed ranges on the layer threads (``host_kernels.split_sum``). The updates have
    NumPy's bits; the dot products accumulate in float64 (not BLAS's bits; more accurate than its
    float32 ``sdot``). Measured at n = 2.8·10⁶, m = 10, float32, 2 threads: 30 ms per two-loop
    against 46–50 ms with BLAS dots and one-thread updates (docs/design.md)."""

    fused = True

    def __init__(self, kernels: dict[str, Any], n: int, scalar_type: Any) -> None:
        from ..host_kernels import split_sum  # noqa: PLC0415 - loads the layer pool module

        self._k, self._n, self._split, self._type = kernels, n, split_sum, scalar_type

    def dot(self, a: Any, q: Any) -> Any:
        kernel = self._k["dot"]
        return numpy.float64(self._split(lambda lo, hi: kernel(a[lo:hi], q[lo:hi]), self._n))

    def axpy_dot(self, q: Any, c: Any, y: Any, z: Any) -> Any:
        return self._update("axpy_dot", q, c, (y,), z)

    def scale_dot(self, q: Any, g: Any, z: Any) -> Any:
        return self._update("scale_dot", q, g, (), z)

    def _update(self, name: str, q: Any, scalar: Any, operands: tuple, z: Any) -> Any:
        """The kernel ``name`` on (q, the scalar rounded to the vectors' dtype, ``operands``, z). With
        z None the sum runs over the first operand's entries, which the pass reads anyway, and is
        dropped. Summing over q instead would alias the vector being written: LLVM's runtime alias
        check then takes the scalar loop, which cost 4–6 ms per L-BFGS step at n = 2.8·10⁶."""
        kernel, c = self._k[name], self._type(scalar)
        vectors = (*operands, z if z is not None else operands[0] if operands else q)
        t = self._split(lambda lo, hi: kernel(q[lo:hi], c, *[a[lo:hi] for a in vectors]), self._n)
        return None if z is None else numpy.float64(t)


class LBFGSOperator:
    """L-BFGS matrices of ``(k, n)`` row pairs with **H₀ = γI, B₀ = (1/γ)I** ([NW06] §7.2, [BNS94]).

    ``gamma`` defaults to sᵀy / yᵀy of the newest pair ([NW06] eq. 7.20; 1 when k = 0). Pairs must
    have sᵢᵀyᵢ > 0 (callers keep only those, so H stays positive definite). ``v`` may be ``(n,)``
    or ``(n, p)``.

    * :meth:`solve` — H v by the two-loop recursion ([NW06] Alg. 7.4), 4kn + n multiplications
      (:meth:`two_loop_flops`; plus kn + k for ρᵢ = 1/sᵢᵀyᵢ). Used by the optimizers.
    * :meth:`solve_compact` — the same H v by the compact inverse form ([BNS94] eq. 3.1)::

          H = γI + [S  γY] [[R⁻ᵀ(D + γYᵀY)R⁻¹, −R⁻ᵀ], [−R⁻¹, 0]] [Sᵀ; γYᵀ]

      (papers' column notation; R = upper triangle of SᵀY, D its diagonal), (4k + 1)n + 4k²
      per column (:meth:`compact_flops`) after O(k²n) set-up.
    * :meth:`matvec` — B v = H⁻¹ v by the direct compact form ([BNS94] eq. 3.5)
      B = δI − [δS  Y] [[δSᵀS, L], [Lᵀ, −D]]⁻¹ [δSᵀ; Yᵀ], δ = 1/γ.
    """

    def __init__(self, S: Any, Y: Any, gamma: Any = None) -> None:
        xp, k, _ = _check_pairs(S, Y)
        self._setup(xp, S, Y, list(range(k)), None, gamma)

    @classmethod
    def from_store(cls, store: Any, gamma: Any = None) -> "LBFGSOperator":
        """The operator of a :class:`~.pairs.PairStore`'s pairs, read **in place**: the two-loop walks
        the store's ring rows (:meth:`~.pairs.PairStore.rows`; no reordering copy) with its kept row
        curvatures (ρᵢ = 1/sᵢᵀyᵢ from sᵢᵀyᵢ formed once per pair, :meth:`~.pairs.PairStore.curvatures`,
        not kn per call). The same bits as ``LBFGSOperator(store.S, store.Y, gamma)``. Invalidated by a
        mutation of the store."""
        op = cls.__new__(cls)
        op._setup(backend.namespace(store.Sbuf), store.Sbuf, store.Ybuf, store.rows(),
                  store.curvatures() if store.count else None, gamma)
        return op

    def _setup(self, xp: Any, Sb: Any, Yb: Any, rows: list[int], sy: Any, gamma: Any) -> None:
        """Sb, Yb: row buffers; rows: the buffer rows of the pairs, oldest first; sy: sᵢᵀyᵢ by buffer
        row (``None``: Σ sᵢ⊙yᵢ formed by each :meth:`solve`)."""
        self._xp, self._Sb, self._Yb, self._rows, self._sy = xp, Sb, Yb, rows, sy
        self.k, self.n = len(rows), int(Sb.shape[1])
        self._S = self._Y = None
        if gamma is None:
            if rows:
                s, y, passes = Sb[rows[-1]], Yb[rows[-1]], _two_loop_passes(Sb)
                gamma = passes.dot(s, y) / passes.dot(y, y)
            else:
                gamma = 1.0
        if not (float(gamma) > 0.0 and math.isfinite(float(gamma))):
            raise ValueError(f"L-BFGS needs gamma > 0 (H0 = gamma*I), got {float(gamma)}")
        self.gamma = gamma  # kept as given (a device scalar stays on the device: no sync)
        self._Wh = self._Wb = None

    def _ordered(self, buf: Any) -> Any:
        """``(k, n)`` rows of ``buf`` oldest first: a slice when the rows are consecutive (always for
        the plain constructor), else one gathered copy (a wrapped ring; compact forms only)."""
        rows, k = self._rows, self.k
        if k == 0:
            return buf[:0]
        if rows[-1] - rows[0] == k - 1:
            return buf[rows[0]: rows[0] + k]
        return buf[self._xp.asarray(rows)]

    @property
    def S(self) -> Any:
        """The s rows ``(k, n)``, oldest first."""
        if self._S is None:
            self._S = self._ordered(self._Sb)
        return self._S

    @property
    def Y(self) -> Any:
        """The y rows ``(k, n)``, oldest first."""
        if self._Y is None:
            self._Y = self._ordered(self._Yb)
        return self._Y

    # -- H v --------------------------------------------------------------------------------------------
    def _row_curvatures(self) -> Any:
        """sᵢᵀyᵢ, oldest first: the store's kept ones, else Σ sᵢ⊙yᵢ of the rows."""
        if self._sy is not None:
            return self._sy[self._xp.asarray(self._rows)]
        # sum(S * Y) builds a (k, n) temporary (22 ms at n = 2.8·10⁶ against 8 ms for einsum's row dots), but a
        # different summation order moves the chaotic s-lbfgs BN-CNN reference run by 1e-8: kept (a PairStore
        # keeps these row sums, one per pair: from_store)
        return self._xp.sum(self.S * self.Y, axis=1)

    def solve(self, v: Any) -> Any:
        """H v by the two-loop recursion ([NW06] Alg. 7.4), over the pairs' buffer rows in place.

        Each loop step is one update of q followed by the next pair's dot product on the new q
        (:func:`_two_loop_passes`): on NumPy/CuPy arrays the expressions ``q += c·y`` and ``zᵀq``, on
        large 1-D host vectors one fused pass of both, split over the layer threads."""
        Sb, Yb, rows, k = self._Sb, self._Yb, self._rows, self.k
        backend.namespace(v, Sb)
        passes = _two_loop_passes(Sb, v)
        rho = 1.0 / self._row_curvatures() if k else None  # stays on the device: no sync in the loops
        q = v.copy()
        alpha = [None] * k
        t = passes.dot(Sb[rows[k - 1]], q) if k else None
        for i in range(k - 1, -1, -1):  # αᵢ = ρᵢ sᵢᵀq, q ← q − αᵢyᵢ, then sᵢ₋₁ᵀq
            alpha[i] = rho[i] * t
            t = passes.axpy_dot(q, -alpha[i], Yb[rows[i]], Sb[rows[i - 1]] if i else None)
        r = q  # q is this call's own copy: scaled and updated in place
        t = passes.scale_dot(r, self.gamma, Yb[rows[0]] if k else None)
        for i in range(k):  # βᵢ = ρᵢ yᵢᵀr, r ← r + (αᵢ − βᵢ)sᵢ, then yᵢ₊₁ᵀr
            beta = rho[i] * t
            t = passes.axpy_dot(r, alpha[i] - beta, Sb[rows[i]], Yb[rows[i + 1]] if i + 1 < k else None)
        return r

    def _inverse_middle(self) -> Any:
        if self._Wh is None:
            xp, S, Y, k = self._xp, self.S, self.Y, self.k
            SY = S @ Y.T
            d = xp.diag(SY)
            if float(d.min()) <= 0.0:
                raise ValueError("L-BFGS compact form needs s_i^T y_i > 0 for every stored pair")
            R = xp.triu(SY)
            Rinv = xp.linalg.inv(R)
            g = float(self.gamma)
            top_left = Rinv.T @ (xp.diag(d) + g * (Y @ Y.T)) @ Rinv
            Mid = xp.zeros((2 * k, 2 * k), dtype=SY.dtype)
            Mid[:k, :k] = top_left
            Mid[:k, k:] = -Rinv.T
            Mid[k:, :k] = -Rinv
            self._Wh = (xp.concatenate([S, g * Y], axis=0), Mid)  # W rows: [S; γY] (2k × n)
        return self._Wh

    def solve_compact(self, v: Any) -> Any:
        """H v by the compact inverse form ([BNS94] eq. 3.1); ``v`` of shape (n, …)."""
        if self.k == 0:
            return float(self.gamma) * v
        W, Mid = self._inverse_middle()
        return float(self.gamma) * v + W.T @ (Mid @ (W @ v))

    # -- B v --------------------------------------------------------------------------------------------
    def matvec(self, v: Any) -> Any:
        """B v by the direct compact form ([BNS94] eq. 3.5), B₀ = (1/γ) I."""
        delta = 1.0 / float(self.gamma)
        if self.k == 0:
            return delta * v
        xp, S, Y, k = self._xp, self.S, self.Y, self.k
        if self._Wb is None:
            SY = S @ Y.T
            L = xp.tril(SY, -1)
            K = xp.concatenate([xp.concatenate([delta * (S @ S.T), L], axis=1),
                                xp.concatenate([L.T, -xp.diag(xp.diag(SY))], axis=1)], axis=0)
            self._Wb = xp.linalg.solve(K, xp.eye(2 * k, dtype=SY.dtype))
        w = self._Wb @ xp.concatenate([delta * (S @ v), Y @ v], axis=0)
        return delta * v - (delta * (S.T @ w[:k]) + Y.T @ w[k:])

    def to_dense(self, inverse: bool = False) -> Any:
        """Dense n × n B (or H with ``inverse=True``, by the two-loop) — for tests on small n."""
        eye = self._xp.eye(self.n, dtype=self.S.dtype)
        return self.solve(eye) if inverse else self.matvec(eye)

    # -- costs ------------------------------------------------------------------------------------------
    @staticmethod
    def two_loop_flops(n: int, k: int) -> int:
        """Two loops, each pair one dot and one axpy per loop (4n), plus H₀ scaling (n)."""
        return 4 * k * n + n

    @staticmethod
    def compact_flops(n: int, k: int) -> int:
        """[S v; Y v] (2kn), the 2k × 2k middle (4k²), S w₁ + Y w₂ (2kn), γv (n)."""
        return (4 * k + 1) * n + 4 * k * k

    @staticmethod
    def solve_terms(n: int, k: int, gamma_given: bool = False, kept_curvatures: bool = False) -> dict[str, float]:
        """Cost terms of :meth:`solve` from stored pairs: the two loops, ρᵢ = 1/Σ sᵢ⊙yᵢ (kn + k; k with
        ``kept_curvatures``, :meth:`from_store` on a store that keeps them — their n per pair is the
        appender's) and, unless γ is given, γ = sᵀy/yᵀy of the newest pair (2n); none without pairs."""
        if k == 0:
            return {}
        t = {"two_loop": LBFGSOperator.two_loop_flops(n, k), "two_loop_rho": k if kept_curvatures else k * n + k}
        if not gamma_given:
            t["two_loop_gamma"] = 2 * n
        return t

    @property
    def flops_solve(self) -> int:
        return self.two_loop_flops(self.n, self.k)

    @property
    def flops_matvec(self) -> int:
        return self.compact_flops(self.n, self.k)


# --------------------------------------------------------------------------------------------------
# L-SR1
# --------------------------------------------------------------------------------------------------
def lsr1_middle_inverse(SY: Any, SS: Any, gamma: float) -> Any:
    """M⁻¹ = D + L + Lᵀ − γSᵀS from the Grams (row convention SY = S Yᵀ, SS = S Sᵀ; D = diag(SᵀY),
    L its strict lower triangle) — [BNS94] Thm 5.1, the symmetric form [RD16] cites."""
    xp = backend.namespace(SY, SS)
    L = xp.tril(SY, -1)
    return xp.diag(xp.diag(SY)) + L + L.T - gamma * SS


def lsr1_inverse_middle(SY: Any, YY: Any, gamma: float) -> Any:
    """N = R + Rᵀ − D − YᵀY/γ, the middle matrix of the inverse form H = I/γ + ΨN⁻¹Ψᵀ/γ²
    ([BNS94] eq. 5.3 with H₀ = I/γ; N = −(M⁻¹ + ΨᵀΨ/γ), the Woodbury identity)."""
    xp = backend.namespace(SY, YY)
    R = xp.triu(SY)
    return R + R.T - xp.diag(xp.diag(SY)) - YY / gamma


def psi_gram(SY: Any, SS: Any, YY: Any, gamma: float) -> Any:
    """ΨᵀΨ = YᵀY − γ(SᵀY + YᵀS) + γ²SᵀS for Ψ = Y − γS from the Grams; symmetrised exactly."""
    gamma = float(gamma)
    G = YY - gamma * (SY + SY.T) + (gamma * gamma) * SS
    return 0.5 * (G + G.T)


def _sym_inverse(A: Any) -> Any:
    xp = backend.namespace(A)
    Ai = xp.linalg.solve(A, xp.eye(A.shape[0], dtype=A.dtype))
    return 0.5 * (Ai + Ai.T)  # exact symmetry for eigh downstream


class LSR1Operator:
    """Compact L-SR1 matrix B = γI + ΨMΨᵀ ([BNS94] Thm 5.1, [RD16] §3 and Alg. 1), **B₀ = γI**.

    Built from the pairs' Grams: :meth:`from_store` (a :class:`~.pairs.PairStore`: the kept Grams,
    O(k³), Ψ never formed — products as Ψᵀv = Yv − γSv; or, when the store keeps none, fresh Grams
    and Ψ = Y − γS formed once) or :meth:`from_pairs`. γ = 0 (B₀ = 0, the sampled L-SR1 of
    Berahas et al.) is allowed for the direct form; :meth:`solve` then raises.

    :meth:`solve` applies the inverse form H = I/γ + ΨN⁻¹Ψᵀ/γ² ([BNS94] eq. 5.3, [RD16] Alg. 2).

    Singularity: :attr:`rcond` = min|λ|/max|λ| of M⁻¹, :attr:`singular` (``rcond <= rtol``). With
    ``check=True`` a (near) singular M⁻¹ raises ``ValueError``; with ``check=False`` the object is
    built and :attr:`M`/:meth:`matvec` raise. :meth:`solve` raises when N is (near) singular.
    Drop old pairs with :func:`lsr1_prune_count` first.

    B v costs (2k + 1)n + k² multiplications with Ψ stored, (4k + 1)n + k² without ([RD16] §3's
    count): :meth:`matvec_flops`.
    """

    def __init__(self, S: Any, Y: Any, gamma: float, SY: Any, SS: Any, YY: Any = None, *,
                 rtol: float = SINGULAR_RTOL, check: bool = True, form_psi: bool = False) -> None:
        xp, k, n = _check_pairs(S, Y)
        gamma = float(gamma)
        if not math.isfinite(gamma):
            raise ValueError(f"L-SR1 needs a finite gamma (B0 = gamma*I), got {gamma}")
        if SY.shape != (k, k) or SS.shape != (k, k) or (YY is not None and YY.shape != (k, k)):
            raise ValueError(f"Gram matrices must be ({k}, {k})")
        self._xp, self.S, self.Y, self.k, self.n = xp, S, Y, k, n
        self.gamma, self.rtol = gamma, float(rtol)
        self.SY, self.SS, self.YY = SY, SS, YY
        self._Psi_rows = Y - gamma * S if form_psi else None
        self.Minv = lsr1_middle_inverse(SY, SS, gamma)
        self.rcond = sym_rcond(self.Minv)
        self.singular = not (self.rcond > self.rtol)
        self._M = None if self.singular else _sym_inverse(self.Minv)
        self._Ninv = None
        if self.singular and check:
            raise ValueError(self._singular_message())

    @classmethod
    def from_pairs(cls, S: Any, Y: Any, gamma: float, *, rtol: float = SINGULAR_RTOL,
                   check: bool = True) -> "LSR1Operator":
        """From ``(k, n)`` rows: fresh SY, SS (2k²n), Ψ formed (kn); YY formed when needed."""
        return cls(S, Y, gamma, S @ Y.T, S @ S.T, None, rtol=rtol, check=check, form_psi=True)

    @classmethod
    def from_store(cls, store: Any, gamma: float, *, rtol: float = SINGULAR_RTOL,
                   check: bool = True) -> "LSR1Operator":
        """From a :class:`~.pairs.PairStore`: its kept Grams (no O(k²n) work), else fresh ones."""
        if store.has_grams:
            return cls(store.S, store.Y, gamma, store.SY, store.SS, store.YY, rtol=rtol, check=check)
        return cls.from_pairs(store.S, store.Y, gamma, rtol=rtol, check=check)

    # -- Ψ ----------------------------------------------------------------------------------------------
    def psi_t(self, v: Any) -> Any:
        """Ψᵀv, ``(k,)`` (or ``(k, p)``); Yv − γSv when Ψ is not stored."""
        if self._Psi_rows is not None:
            return self._Psi_rows @ v
        return self.Y @ v - self.gamma * (self.S @ v)

    def psi(self, c: Any) -> Any:
        """Ψc, ``(n,)``; Yᵀc − γSᵀc when Ψ is not stored."""
        if self._Psi_rows is not None:
            return self._Psi_rows.T @ c
        return self.Y.T @ c - self.S.T @ (self.gamma * c)

    @property
    def Psi(self) -> Any:
        """Ψ = Y − γS as an ``(n, k)`` view (papers' column convention; formed on first use)."""
        if self._Psi_rows is None:
            self._Psi_rows = self.Y - self.gamma * self.S
        return self._Psi_rows.T

    def psi_gram(self) -> Any:
        """ΨᵀΨ (k × k): from the Grams when YY is known, else P Pᵀ of the formed Ψ."""
        if self.YY is None:
            P = self._Psi_rows if self._Psi_rows is not None else self.Y - self.gamma * self.S
            return P @ P.T
        return psi_gram(self.SY, self.SS, self.YY, self.gamma)

    # -- products ---------------------------------------------------------------------------------------
    def _singular_message(self) -> str:
        return (f"L-SR1 middle matrix M^-1 = D + L + L^T - gamma*S^T S ({self.k}x{self.k}) is "
                f"(near) singular: rcond={self.rcond:.3e} <= rtol={self.rtol:.1e}; drop the "
                "oldest pairs (lsr1_prune_count) or skip the update")

    @property
    def M(self) -> Any:
        """M = (D + L + Lᵀ − γSᵀS)⁻¹ (k × k, symmetric)."""
        if self._M is None:
            raise ValueError(self._singular_message())
        return self._M

    def matvec(self, v: Any) -> Any:
        """B v = γv + Ψ(M(Ψᵀv)) ([RD16] Alg. 1 line 7)."""
        if self.k == 0:
            return self.gamma * v
        return self.gamma * v + self.psi(self.M @ self.psi_t(v))

    def inverse_middle(self) -> Any:
        """N of the inverse form (:func:`lsr1_inverse_middle`)."""
        YY = self.YY if self.YY is not None else self.Y @ self.Y.T
        return lsr1_inverse_middle(self.SY, YY, self.gamma)

    def solve(self, v: Any) -> Any:
        """H v = B⁻¹ v by the inverse compact form with H₀ = (1/γ) I (needs γ ≠ 0)."""
        if self.gamma == 0.0:
            raise ValueError("the inverse L-SR1 form needs gamma != 0 (H0 = I/gamma); B0 = 0 has only the direct form")
        if self.k == 0:
            return v / self.gamma
        if self._Ninv is None:
            N = self.inverse_middle()
            rc = sym_rcond(N)
            if not rc > self.rtol:
                raise ValueError(
                    f"L-SR1 inverse middle matrix R + R^T - D - Y^T Y/gamma is (near) singular "
                    f"(rcond={rc:.3e} <= rtol={self.rtol:.1e}): B is singular, H = B^-1 does not exist")
            self._Ninv = _sym_inverse(N)
        return v / self.gamma + self.psi(self._Ninv @ self.psi_t(v)) / (self.gamma * self.gamma)

    def to_dense(self, inverse: bool = False) -> Any:
        """Dense n × n B (or H with ``inverse=True``) — for tests on small n."""
        eye = self._xp.eye(self.n, dtype=self.S.dtype)
        return self.solve(eye) if inverse else self.matvec(eye)

    # -- costs ------------------------------------------------------------------------------------------
    @staticmethod
    def matvec_flops(n: int, k: int, psi_formed: bool = True) -> int:
        """Ψᵀv (kn, or 2kn from S and Y), M· (k²), Ψ· (kn, or 2kn), γv (n)."""
        return ((2 if psi_formed else 4) * k + 1) * n + k * k

    @staticmethod
    def form_flops(n: int, k: int) -> int:
        """:meth:`from_pairs`: Ψ (kn), SᵀY and SᵀS (2k²n), the k × k solve (k³)."""
        return k * n + 2 * k * k * n + k ** 3

    @staticmethod
    def build_flops(n: int, k: int, grams: bool = False) -> float:
        """:meth:`from_store` and M: without kept Grams :meth:`form_flops` + γSᵀS and the
        symmetrisation (2k²) + rcond (eigvalsh) + the solve's LU (k³/3); from kept Grams only the
        k × k work: rcond of M⁻¹, M = solve(M⁻¹, I), γSS and the symmetrisation (2k²)."""
        if k == 0:
            return 0
        if grams:
            return flops_eigvalsh(k) + flops_solve(k, k) + 2 * k * k
        return LSR1Operator.form_flops(n, k) + 2 * k * k + flops_eigvalsh(k) + k ** 3 / 3

    @staticmethod
    def psi_flops(n: int, k: int) -> int:
        """One Ψᵀv = Yv − γ(Sv) or Ψc = Yᵀc − Sᵀ(γc) with Ψ not formed: 2kn + k."""
        return 2 * k * n + k

    @staticmethod
    def inverse_setup_flops(n: int, k: int) -> float:
        """:meth:`solve`'s first call: YᵀY (k²n), /γ (k²), rcond, solve(N, I), symmetrisation (k²)."""
        return k * k * n + k * k + flops_eigvalsh(k) + flops_solve(k, k) + k * k

    @staticmethod
    def solve_flops(n: int, k: int) -> int:
        """H v = v/γ + Ψ N⁻¹ Ψᵀv / γ² with N⁻¹ cached and Ψ formed: (2k + 2)n + k² (n without pairs)."""
        return (2 * k + 2) * n + k * k if k else n

    @property
    def flops_matvec(self) -> int:
        return self.matvec_flops(self.n, self.k, self._Psi_rows is not None)

    @property
    def flops_solve(self) -> int:
        return self.matvec_flops(self.n, self.k, self._Psi_rows is not None)


def lsr1_prune_count(SY: Any, SS: Any, YY: Any, gamma: float, *, rtol: float = SINGULAR_RTOL,
                     inverse: bool = False, PtP: Any = None) -> int:
    """Number of oldest pairs to drop so the L-SR1 representation is usable — the pruning loop,
    on the Grams (row convention; trailing k × k blocks, no n-vector work, O(k⁴) at worst).

    Direct form ([RD16] Alg. 1 lines 30–39, B₀ = γI): drop the first pairs while not (ΨᵀΨ ≻ 0 and
    M⁻¹ nonsingular). Inverse form (``inverse=True``, Alg. 2 lines 24–32, H₀ = I/γ): drop while N
    is singular. "Singular" and "≻ 0" are read numerically: reciprocal condition (of Ψ's singular
    values, of the middle matrix's eigenvalues) above ``rtol``. Returns k when no suffix works.
    The inverse test reads SY and YY only (``SS`` may be None); the direct test reads ΨᵀΨ from
    ``PtP`` when given (YY may then be None), else from the Grams (:func:`psi_gram`).
    """
    k = int(SY.shape[0])
    need = (SY, YY) if inverse else (SY, SS, YY if PtP is None else PtP)
    if any(G is None or G.shape != (k, k) for G in need):
        raise ValueError(f"the pruning test needs {'SY, YY' if inverse else 'SY, SS and YY or PtP'} "
                         f"as ({k}, {k}) matrices")
    gamma = float(gamma)
    for d in range(k):
        SYd = SY[d:, d:]
        if inverse:
            if sym_rcond(lsr1_inverse_middle(SYd, YY[d:, d:], gamma)) > rtol:
                return d
            continue
        SSd = SS[d:, d:]
        PtPd = psi_gram(SYd, SSd, YY[d:, d:], gamma) if PtP is None else PtP[d:, d:]
        # Ψ full column rank: σ_min/σ_max of Ψ = sqrt(rcond of ΨᵀΨ)
        if not math.sqrt(max(sym_rcond(PtPd), 0.0)) > rtol:
            continue
        if sym_rcond(lsr1_middle_inverse(SYd, SSd, gamma)) > rtol:
            return d
    return k


def lsr1_prune_flops(n: int, k: int, *, inverse: bool = False, grams: bool = False) -> float:
    """Multiplications of :func:`lsr1_prune` on k pairs when the newest memory is accepted at d = 0:
    with kept Grams (direct form) ΨᵀΨ and M⁻¹ from the Grams (4k²) and two rcond; without, the
    inverse test SᵀY, YᵀY (2k²n), /γ, rcond, the direct test Ψ (kn), ΨΨᵀ (k²n), SᵀY, SᵀS (2k²n),
    γSᵀS (k²) and two rcond."""
    if k == 0:
        return 0
    if grams:
        return 2 * flops_eigvalsh(k) + 4 * k * k
    if inverse:
        return 2 * k * k * n + k * k + flops_eigvalsh(k)
    return k * n + 3 * k * k * n + k * k + 2 * flops_eigvalsh(k)


def lsr1_prune(store: Any, gamma: float, *, inverse: bool = False, rtol: float = SINGULAR_RTOL) -> int:
    """Drop the oldest pairs of a :class:`~.pairs.PairStore` until the L-SR1 form is usable
    (:func:`lsr1_prune_count`); returns the number dropped. With kept Grams: no n-vector work.
    Without: the inverse test forms SY and YY (2k²n); the direct test SY, SS and ΨᵀΨ from Ψ = Y − γS
    itself (kn + 3k²n; more accurate than the Gram formula, which cancels when Y ≈ γS)."""
    if store.count == 0:
        return 0
    if store.has_grams:
        d = lsr1_prune_count(store.SY, store.SS, store.YY, gamma, rtol=rtol, inverse=inverse)
    else:
        S, Y = store.S, store.Y
        if inverse:
            d = lsr1_prune_count(S @ Y.T, None, Y @ Y.T, gamma, rtol=rtol, inverse=True)
        else:
            P = Y - float(gamma) * S
            d = lsr1_prune_count(S @ Y.T, S @ S.T, None, gamma, rtol=rtol, PtP=P @ P.T)
    store.drop_oldest(d)
    return d


# --------------------------------------------------------------------------------------------------
# inverse BFGS update (dense) and the SR1 skip rule
# --------------------------------------------------------------------------------------------------
def bfgs_inverse_update(H: Any, s: Any, y: Any, *, symmetrize: bool = False, check: bool = True) -> Any:
    """Dense inverse BFGS update H⁺ = (I − ρsyᵀ) H (I − ρysᵀ) + ρssᵀ, ρ = 1/yᵀs ([NW06] 6.17).

    Written as H − ρ(s(Hy)ᵀ + (Hy)sᵀ) + ρ(1 + ρyᵀHy)ssᵀ (3n² multiplications + n² for Hy). H must be
    symmetric. ``check``: raise ``ValueError`` unless sᵀy > 0 (callers that damp beforehand may
    pass False). ``symmetrize``: return ½(H⁺ + H⁺ᵀ) (exact symmetry for repeated updates).
    """
    xp = backend.namespace(H, s, y)
    sy = s @ y
    if check and not float(sy) > 0.0:
        raise ValueError(f"BFGS update needs s^T y > 0 (got {float(sy):.3e})")
    rho = 1.0 / sy
    Hy = H @ y
    yHy = y @ Hy
    # ρ(1 + ρ yᵀHy), not ρ²yᵀHy + ρ: in float32 ρ² overflows for sᵀy < 1e-19 (ResNet-20 H_G pairs),
    # while ρ yᵀHy = yᵀHy / sᵀy stays bounded by the damping (≤ 1/μ₁)
    c = rho * (1.0 + rho * yHy)
    kernel = _host_kernel("bfgs", H.size) if (_plain_host(H, s, Hy) and H.ndim == 2 and s.ndim == 1
                                      and getattr(rho, "dtype", None) == getattr(c, "dtype", None) == H.dtype) else None
    if kernel is not None:
        # one pass over H instead of the expression's eight (three outer products and their sums):
        # 22 → 6 ms of a K-BFGS step at T = 1 on the MNIST autoencoder (issue 21), bit for bit
        out = kernel(H, s, Hy, rho, c, numpy.empty_like(H))
    else:
        out = H - rho * (xp.outer(s, Hy) + xp.outer(Hy, s)) + c * xp.outer(s, s)
    return 0.5 * (out + out.T) if symmetrize else out


class DenseInverseBFGS:
    """A dense inverse-Hessian approximation H (n × n, symmetric positive definite) with the BFGS
    update ([NW06] 6.17): :meth:`update` returns a new operator; :meth:`solve` is H v, :meth:`matvec`
    is B v = H⁻¹ v (a dense solve)."""

    def __init__(self, H: Any) -> None:
        if H.ndim != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"H must be square, got shape {H.shape}")
        self.H = H
        self.n = int(H.shape[0])

    @classmethod
    def identity(cls, like: Any, gamma: float = 1.0) -> "DenseInverseBFGS":
        xp = backend.namespace(like)
        return cls(float(gamma) * xp.eye(int(like.shape[0]), dtype=like.dtype))

    def update(self, s: Any, y: Any, *, symmetrize: bool = False) -> "DenseInverseBFGS":
        return DenseInverseBFGS(bfgs_inverse_update(self.H, s, y, symmetrize=symmetrize))

    def solve(self, v: Any) -> Any:
        return self.H @ v

    def matvec(self, v: Any) -> Any:
        return backend.namespace(self.H).linalg.solve(self.H, v)

    def to_dense(self, inverse: bool = False) -> Any:
        return self.H.copy() if inverse else self.matvec(backend.namespace(self.H).eye(self.n, dtype=self.H.dtype))

    @staticmethod
    def update_flops(n: int) -> int:
        """H y (n²), the three outer-product terms (3n²), the dots (2n)."""
        return 4 * n * n + 2 * n

    @property
    def flops_solve(self) -> int:
        return self.n * self.n

    @property
    def flops_matvec(self) -> int:
        return self.n ** 3 // 3 + 2 * self.n * self.n


def sr1_skip(s: Any, y: Any, Bs: Any, r: float = 1e-8) -> bool:
    """True when the SR1 update must be skipped ([NW06] eq. 6.26, [RD16] Alg. 1 line 26).

    The update is applied only if |sᵀ(y − Bs)| ≥ r ‖s‖ ‖y − Bs‖. We also skip when sᵀ(y − Bs) = 0
    exactly (the rule reads 0 ≥ 0 and the update would divide by zero) and when the test is not
    finite. For the inverse update ([RD16] Alg. 2 line 19, |yᵀ(s − Hy)| ≥ r‖y‖‖s − Hy‖) call
    ``sr1_skip(y, s, Hy, r)``.
    """
    xp = backend.namespace(s, y, Bs)
    v = y - Bs
    lhs = abs(float(s @ v))
    rhs = r * float(xp.linalg.norm(s)) * float(xp.linalg.norm(v))
    return (not lhs >= rhs) or lhs == 0.0


_COUNTS = {
    "lbfgs_two_loop": LBFGSOperator.two_loop_flops,
    "lbfgs_compact": LBFGSOperator.compact_flops,
    "lsr1_matvec": lambda n, k: LSR1Operator.matvec_flops(n, k, psi_formed=True),
    "lsr1_matvec_paper": lambda n, k: LSR1Operator.matvec_flops(n, k, psi_formed=False),
    "lsr1_form": LSR1Operator.form_flops,
    "bfgs_inverse_dense": lambda n, k: DenseInverseBFGS.update_flops(n),
}


def operator_flops(kind: str, n: int, m: int) -> int:
    """The operators' own multiplication counts by name (for :mod:`~.costs`): ``lbfgs_two_loop``
    (:meth:`LBFGSOperator.two_loop_flops`), ``lbfgs_compact``, ``lsr1_matvec`` (Ψ stored),
    ``lsr1_matvec_paper`` (Ψᵀv from S and Y, [RD16] §3), ``lsr1_form``, ``bfgs_inverse_dense``."""
    try:
        f = _COUNTS[kind]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}; known: {sorted(_COUNTS)}") from None
    return int(f(int(n), int(m)))
