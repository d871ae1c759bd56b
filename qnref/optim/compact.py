"""Compact (S, Y) representations of quasi-Newton matrices and the dense updates they replace.

References
----------
* [BNS94] R. H. Byrd, J. Nocedal, R. B. Schnabel, "Representations of quasi-Newton matrices and
  their use in limited memory methods", Math. Programming 63 (1994) 129–156.
* [NW06] J. Nocedal, S. J. Wright, *Numerical Optimization*, 2nd ed. (2006): BFGS (6.17)/(6.19),
  SR1 (6.24)/(6.25), skip rule (6.26), two-loop recursion (Alg. 7.4), compact forms §7.2.
* [RD16] V. Ramamurthy, N. Duffy, "L-SR1: a second order optimization method for deep learning"
  (2016/17), §3 and Algorithms 1–2 of the appendix.

Storage convention
------------------
Curvature pairs are stored **row-wise**: ``S`` and ``Y`` have shape ``(k, n)``, row ``i`` is the
pair (sᵢ, yᵢ), oldest first.  The papers' n × k matrices Sₖ, Yₖ are the transposes; so the
papers' Sₖᵀ Yₖ is ``S @ Y.T`` here and (Sₖᵀ Yₖ)ᵢⱼ = sᵢᵀ yⱼ.

Scaling conventions (read this before passing ``gamma``)
--------------------------------------------------------
* **L-BFGS** (:func:`lbfgs_two_loop`, :class:`LBFGSCompact`): ``gamma`` scales the *inverse*
  Hessian, H₀ = γ I, B₀ = (1/γ) I — [NW06] eq. (7.20), γ = sᵀy / yᵀy of the newest pair by default.
  SciPy's ``LbfgsInvHessProduct`` uses H₀ = I, i.e. ``gamma=1``.
* **L-SR1** (:class:`LSR1Compact`, :func:`lsr1_prune_count`): ``gamma`` scales the *Hessian*,
  B₀ = γ I, H₀ = (1/γ) I — [RD16] Alg. 1 and Brust–Erway–Marcia (2017).

Flop counts
-----------
:func:`flop_count` counts **multiplications** (a multiply-add counts once), the convention of
[NW06] §7.2 and [RD16] §3 ("(4m + 1)n + O(m²) multiplications"); IEEE flops are about twice that.
"""
from __future__ import annotations

import math
from typing import Any

from .. import backend

#: Reciprocal-condition threshold below which a small middle matrix counts as singular.
SINGULAR_RTOL = 1e-10

__all__ = [
    "SINGULAR_RTOL",
    "PairMemory",
    "lbfgs_two_loop",
    "LBFGSCompact",
    "LSR1Compact",
    "lsr1_prune_count",
    "lsr1_prune_count_from_grams",
    "GramCache",
    "bfgs_update",
    "bfgs_inverse_update",
    "sr1_skip",
    "sr1_update",
    "sr1_inverse_update",
    "flop_count",
]


# --------------------------------------------------------------------------------------------
# Pair memory
# --------------------------------------------------------------------------------------------
class PairMemory:
    """Limited memory of curvature pairs (sᵢ, yᵢ) in preallocated ``(capacity, n)`` buffers.

    Rows ``0 .. count-1`` hold the pairs, oldest first (the column order of [RD16] Alg. 1:
    Sₖ = [s₀, …, s_{k−1}]).  :meth:`push` drops the oldest pair when the memory is full
    (Alg. 1 lines 27–28).  ``S`` and ``Y`` are views of the filled rows (no copy); they are
    invalidated by the next mutation.

    Parameters
    ----------
    capacity : memory size m (> 0).
    n : vector length.
    dtype : float32 or float64.
    xp : array module (numpy or cupy); numpy by default. See also :meth:`like`.
    """

    def __init__(self, capacity: int, n: int, *, dtype: Any = "float64", xp: Any = None) -> None:
        import numpy  # noqa: PLC0415 - default module only, never applied to device arrays

        if int(capacity) < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._xp = numpy if xp is None else xp
        dt = backend.check_dtype(dtype)
        self._S = self._xp.zeros((int(capacity), int(n)), dtype=dt)
        self._Y = self._xp.zeros((int(capacity), int(n)), dtype=dt)
        self._count = 0

    @classmethod
    def like(cls, x: Any, capacity: int) -> "PairMemory":
        """A memory for vectors shaped, typed and placed like the 1-D array ``x``."""
        xp = backend.namespace(x)
        return cls(capacity, int(x.shape[0]), dtype=x.dtype, xp=xp)

    # -- properties -------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return int(self._S.shape[0])

    @property
    def n(self) -> int:
        return int(self._S.shape[1])

    @property
    def count(self) -> int:
        return self._count

    @property
    def dtype(self) -> Any:
        return self._S.dtype

    @property
    def S(self) -> Any:
        """View ``(count, n)`` of the stored s vectors, oldest first."""
        return self._S[: self._count]

    @property
    def Y(self) -> Any:
        """View ``(count, n)`` of the stored y vectors, oldest first."""
        return self._Y[: self._count]

    def __len__(self) -> int:
        return self._count

    def newest(self) -> tuple[Any, Any]:
        """The newest pair (s, y) as views; raises ``IndexError`` when empty."""
        if self._count == 0:
            raise IndexError("PairMemory is empty")
        return self._S[self._count - 1], self._Y[self._count - 1]

    # -- mutation ---------------------------------------------------------------------------
    def _shift(self, k: int) -> None:
        # Move rows k..count-1 to 0..count-k-1 one row at a time: non-overlapping copies,
        # safe on CuPy too (whose slice assignment does not guard against overlap).
        for i in range(self._count - k):
            self._S[i] = self._S[i + k]
            self._Y[i] = self._Y[i + k]
        self._count -= k

    def push(self, s: Any, y: Any) -> None:
        """Append the pair (s, y) (copied); drop the oldest pair first when full."""
        backend.namespace(self._S, s, y)  # raises on a host/device mix
        if s.shape != (self.n,) or y.shape != (self.n,):
            raise ValueError(f"s and y must have shape ({self.n},), got {s.shape} and {y.shape}")
        if self._count == self.capacity:
            self._shift(1)
        self._S[self._count] = s
        self._Y[self._count] = y
        self._count += 1

    def remove_oldest(self, k: int = 1) -> None:
        """Drop the ``k`` oldest pairs (all of them when ``k >= count``)."""
        k = int(k)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if k >= self._count:
            self._count = 0
        elif k > 0:
            self._shift(k)

    def clear(self) -> None:
        """Forget every pair (the buffers are kept)."""
        self._count = 0

    # -- checkpoints ------------------------------------------------------------------------
    def state(self) -> dict:
        """Checkpointable state: copies of the filled rows and the capacity."""
        return {"S": self.S.copy(), "Y": self.Y.copy(), "count": self._count,
                "capacity": self.capacity}

    @classmethod
    def from_state(cls, state: dict) -> "PairMemory":
        """Rebuild a memory from :meth:`state` (on the backend of the stored arrays)."""
        S, Y = state["S"], state["Y"]
        xp = backend.namespace(S, Y)
        mem = cls(int(state["capacity"]), int(S.shape[1]), dtype=S.dtype, xp=xp)
        count = int(state["count"])
        if S.shape[0] != count or Y.shape != S.shape:
            raise ValueError("inconsistent PairMemory state: S/Y rows must equal count")
        mem._S[:count] = S
        mem._Y[:count] = Y
        mem._count = count
        return mem


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _check_pairs(S: Any, Y: Any) -> tuple[Any, int, int]:
    xp = backend.namespace(S, Y)
    if S.ndim != 2 or S.shape != Y.shape:
        raise ValueError(f"S and Y must both have shape (k, n); got {S.shape} and {Y.shape}")
    return xp, int(S.shape[0]), int(S.shape[1])


def _sym_rcond(A: Any) -> float:
    """min |λ| / max |λ| of a symmetric matrix (1.0 for an empty one, 0.0 for zero)."""
    if A.shape[0] == 0:
        return 1.0
    xp = backend.namespace(A)
    ev = xp.abs(xp.linalg.eigvalsh(A))
    big = float(ev.max())
    if not math.isfinite(big):
        return 0.0
    return float(ev.min()) / big if big > 0.0 else 0.0


# --------------------------------------------------------------------------------------------
# L-BFGS
# --------------------------------------------------------------------------------------------
def lbfgs_two_loop(g: Any, S: Any, Y: Any, gamma: Any = None) -> Any:
    """H g by the L-BFGS two-loop recursion ([NW06] Alg. 7.4) with H₀ = γ I.

    ``S``, ``Y``: ``(k, n)`` pairs, oldest first; ``gamma`` defaults to sᵀy / yᵀy of the newest
    pair ([NW06] eq. 7.20; 1 when k = 0).  SciPy's ``LbfgsInvHessProduct(S, Y)`` is ``gamma=1``.
    Cost ≈ 4kn + n multiplications.  ``g`` is 1-D.  Pairs must have sᵀy ≠ 0 (callers keep only
    sᵀy > 0 so that H stays positive definite).
    """
    xp, k, n = _check_pairs(S, Y)
    backend.namespace(g, S)
    if gamma is None:
        gamma = (S[-1] @ Y[-1]) / (Y[-1] @ Y[-1]) if k > 0 else 1.0
    rho = 1.0 / xp.sum(S * Y, axis=1)  # stays on the device: no sync in the loops
    q = g.copy()
    alpha = [None] * k
    for i in range(k - 1, -1, -1):
        alpha[i] = rho[i] * (S[i] @ q)
        q -= alpha[i] * Y[i]
    r = gamma * q
    for i in range(k):
        beta = rho[i] * (Y[i] @ r)
        r += (alpha[i] - beta) * S[i]
    return r


class LBFGSCompact:
    """Compact L-BFGS matrices of [BNS94] with **H₀ = γ I, B₀ = (1/γ) I**.

    * :meth:`solve` — H v, inverse compact form [BNS94] Thm 2.2 / eq. (3.1)::

          H = γI + [S  γY] [[R⁻ᵀ(D + γYᵀY)R⁻¹, −R⁻ᵀ], [−R⁻¹, 0]] [Sᵀ; γYᵀ]

    * :meth:`matvec` — B v, direct compact form [BNS94] Thm 2.3 / eq. (3.5)::

          B = δI − [δS  Y] [[δSᵀS, L], [Lᵀ, −D]]⁻¹ [δSᵀ; Yᵀ],   δ = 1/γ

    (papers' column notation; R = upper triangle of SᵀY, L its strict lower triangle, D its
    diagonal).  B = H⁻¹, both equal to k dense BFGS updates of B₀ applied oldest first.

    ``S``, ``Y``: ``(k, n)`` rows, oldest first, with sᵢᵀyᵢ > 0 (checked: ``ValueError``).
    ``gamma`` defaults to sᵀy / yᵀy of the newest pair.  ``v`` may be ``(n,)`` or ``(n, p)``.
    Each product costs (4k + 1)n + 4k² multiplications (:attr:`flops_matvec`).
    """

    def __init__(self, S: Any, Y: Any, gamma: float | None = None) -> None:
        xp, k, n = _check_pairs(S, Y)
        self._xp, self.S, self.Y, self.k, self.n = xp, S, Y, k, n
        if gamma is None:
            gamma = float((S[-1] @ Y[-1]) / (Y[-1] @ Y[-1])) if k > 0 else 1.0
        self.gamma = float(gamma)
        if not (self.gamma > 0.0 and math.isfinite(self.gamma)):
            raise ValueError(f"L-BFGS needs gamma > 0 (H0 = gamma*I), got {self.gamma}")
        if k == 0:
            self._Wh = self._Wb = None
            return
        SY = S @ Y.T
        d = xp.diag(SY)
        if float(d.min()) <= 0.0:
            raise ValueError("L-BFGS compact form needs s_i^T y_i > 0 for every stored pair")
        D = xp.diag(d)
        eye = xp.eye(k, dtype=SY.dtype)
        R = xp.triu(SY)
        Rinv = xp.linalg.solve(R, eye)  # k ≤ ~50: a dense solve is as good as a triangular one
        g = self.gamma
        # inverse-form middle matrix, acting on [S v; Y v] (the γ's of [S γY] folded in)
        top_left = Rinv.T @ (D + g * (Y @ Y.T)) @ Rinv
        self._Wh = xp.concatenate(
            [xp.concatenate([top_left, -g * Rinv.T], axis=1),
             xp.concatenate([-g * Rinv, xp.zeros_like(R)], axis=1)], axis=0)
        # direct-form middle matrix K⁻¹, K = [[δSᵀS, L], [Lᵀ, −D]]
        delta = 1.0 / g
        L = xp.tril(SY, -1)
        K = xp.concatenate(
            [xp.concatenate([delta * (S @ S.T), L], axis=1),
             xp.concatenate([L.T, -D], axis=1)], axis=0)
        self._Wb = xp.linalg.solve(K, xp.eye(2 * k, dtype=SY.dtype))

    def solve(self, v: Any) -> Any:
        """H v (inverse compact form, H₀ = γ I)."""
        if self.k == 0:
            return self.gamma * v
        k = self.k
        w = self._Wh @ self._xp.concatenate([self.S @ v, self.Y @ v], axis=0)
        return self.gamma * v + self.S.T @ w[:k] + self.Y.T @ w[k:]

    def matvec(self, v: Any) -> Any:
        """B v (direct compact form, B₀ = (1/γ) I)."""
        delta = 1.0 / self.gamma
        if self.k == 0:
            return delta * v
        k = self.k
        w = self._Wb @ self._xp.concatenate([delta * (self.S @ v), self.Y @ v], axis=0)
        return delta * v - (delta * (self.S.T @ w[:k]) + self.Y.T @ w[k:])

    def to_dense(self, inverse: bool = False) -> Any:
        """Dense n × n B (or H with ``inverse=True``) — for tests on small n."""
        eye = self._xp.eye(self.n, dtype=self.S.dtype)
        return self.solve(eye) if inverse else self.matvec(eye)

    @property
    def flops_matvec(self) -> int:
        return flop_count("lbfgs_compact", self.n, self.k)

    @property
    def flops_solve(self) -> int:
        return flop_count("lbfgs_compact", self.n, self.k)


# --------------------------------------------------------------------------------------------
# L-SR1
# --------------------------------------------------------------------------------------------
class LSR1Compact:
    """Compact L-SR1 matrix B = γI + Ψ M Ψᵀ ([BNS94] Thm 5.1, [RD16] §3 and Alg. 1).

    Ψ = Y − γS (papers' n × k columns; :attr:`Psi` has shape ``(n, k)``) and
    M = (D + L + Lᵀ − γ SᵀS)⁻¹, D = diag(SᵀY), L = strict lower triangle of SᵀY.
    **B₀ = γ I, H₀ = (1/γ) I** (sign free: SR1 allows indefinite B). γ = 0 (B₀ = 0, the sampled
    L-SR1 of Berahas et al.) is allowed for the direct form; :meth:`solve` then raises.

    :meth:`solve` applies the inverse compact SR1 form ([BNS94] eq. 5.3, [RD16] Alg. 2)::

        H = H₀ + (S − H₀Y)(R + Rᵀ − D − YᵀH₀Y)⁻¹(S − H₀Y)ᵀ = (1/γ)I + (1/γ²) Ψ N⁻¹ Ψᵀ,

    with N = R + Rᵀ − D − YᵀY/γ (R = upper triangle of SᵀY); note N = −(M⁻¹ + ΨᵀΨ/γ), the
    Woodbury identity for B⁻¹.

    Singularity reporting: :attr:`rcond` = min|λ|/max|λ| of M⁻¹ and :attr:`singular`
    (``rcond <= rtol``).  With ``check=True`` (default) a (near) singular M⁻¹ raises
    ``ValueError`` in the constructor; with ``check=False`` the object is built, ``singular``
    is True and :attr:`M`/:meth:`matvec` raise ``ValueError``.  :meth:`solve` raises
    ``ValueError`` when N is (near) singular (then B itself is singular).  Drop old pairs with
    :func:`lsr1_prune_count` as in [RD16] Alg. 1 lines 30–39.

    ``v`` may be ``(n,)`` or ``(n, p)``.  B v costs (2k + 1)n + k² multiplications with Ψ stored
    (the paper's (4k + 1)n counts forming Ψᵀv = Yᵀv − γSᵀv from S, Y each time).
    """

    def __init__(self, S: Any, Y: Any, gamma: float, *, rtol: float = SINGULAR_RTOL,
                 check: bool = True) -> None:
        xp, k, n = _check_pairs(S, Y)
        gamma = float(gamma)
        if not math.isfinite(gamma):
            raise ValueError(f"L-SR1 needs a finite gamma (B0 = gamma*I), got {gamma}")
        self._xp, self.S, self.Y, self.k, self.n = xp, S, Y, k, n
        self.gamma, self.rtol = gamma, float(rtol)
        self._Psi_rows = Y - gamma * S  # (k, n); Psi = its transpose (a view)
        SY = S @ Y.T
        self._SY = SY
        self._SS = self._YY = None
        L = xp.tril(SY, -1)
        self.Minv = xp.diag(xp.diag(SY)) + L + L.T - gamma * (S @ S.T)
        self._finish_init(check)

    @classmethod
    def from_grams(cls, S: Any, Y: Any, gamma: float, SY: Any, SS: Any, YY: Any = None, *,
                   rtol: float = SINGULAR_RTOL, check: bool = True) -> "LSR1Compact":
        """The same matrix built from cached Gram matrices SY = S Yᵀ, SS = S Sᵀ (YY = Y Yᵀ, used
        by :meth:`inverse_middle` and :meth:`psi_gram`) without touching n-vectors: O(k³).

        Ψ is never formed: products are applied as Ψᵀv = Yv − γSv and Ψc = Yᵀc − γSᵀc
        (2kn each), so construction costs no O(k²n) work (see :class:`GramCache`)."""
        xp, k, n = _check_pairs(S, Y)
        gamma = float(gamma)
        if not math.isfinite(gamma):
            raise ValueError(f"L-SR1 needs a finite gamma (B0 = gamma*I), got {gamma}")
        if SY.shape != (k, k) or SS.shape != (k, k) or (YY is not None and YY.shape != (k, k)):
            raise ValueError(f"Gram matrices must be ({k}, {k})")
        self = cls.__new__(cls)
        self._xp, self.S, self.Y, self.k, self.n = xp, S, Y, k, n
        self.gamma, self.rtol = gamma, float(rtol)
        self._Psi_rows = None
        self._SY, self._SS, self._YY = SY, SS, YY
        L = xp.tril(SY, -1)
        self.Minv = xp.diag(xp.diag(SY)) + L + L.T - gamma * SS
        self._finish_init(check)
        return self

    def _finish_init(self, check: bool) -> None:
        xp, k = self._xp, self.k
        self.rcond = _sym_rcond(self.Minv)
        self.singular = not (self.rcond > self.rtol)
        self._M = None
        self._Ninv = None
        if self.singular:
            if check:
                raise ValueError(self._singular_message())
        else:
            self._M = xp.linalg.solve(self.Minv, xp.eye(k, dtype=self.Minv.dtype))
            self._M = 0.5 * (self._M + self._M.T)  # exact symmetry for eigh downstream

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

    def psi_gram(self) -> Any:
        """ΨᵀΨ = YᵀY − γ(SᵀY + YᵀS) + γ²SᵀS (k × k; from the cached Grams when available)."""
        if getattr(self, "_YY", None) is None or getattr(self, "_SS", None) is None:
            P = self._Psi_rows if self._Psi_rows is not None else self.Y - self.gamma * self.S
            return P @ P.T
        return psi_gram(self._SY, self._SS, self._YY, self.gamma)

    def _singular_message(self) -> str:
        return (f"L-SR1 middle matrix M^-1 = D + L + L^T - gamma*S^T S ({self.k}x{self.k}) is "
                f"(near) singular: rcond={self.rcond:.3e} <= rtol={self.rtol:.1e}; drop the "
                "oldest pairs (lsr1_prune_count) or skip the update")

    @property
    def Psi(self) -> Any:
        """Ψ = Y − γS as an ``(n, k)`` view (papers' column convention; formed on first use
        when built by :meth:`from_grams`)."""
        if self._Psi_rows is None:
            self._Psi_rows = self.Y - self.gamma * self.S
        return self._Psi_rows.T

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
        """N = R + Rᵀ − D − YᵀY/γ, the middle matrix of the inverse form."""
        xp, SY = self._xp, self._SY
        R = xp.triu(SY)
        YY = self._YY if getattr(self, "_YY", None) is not None else self.Y @ self.Y.T
        return R + R.T - xp.diag(xp.diag(SY)) - YY / self.gamma

    def solve(self, v: Any) -> Any:
        """H v = B⁻¹ v by the inverse compact SR1 form with H₀ = (1/γ) I (needs γ ≠ 0)."""
        if self.gamma == 0.0:
            raise ValueError("the inverse L-SR1 form needs gamma != 0 (H0 = I/gamma); B0 = 0 has only the direct form")
        if self.k == 0:
            return v / self.gamma
        if self._Ninv is None:
            N = self.inverse_middle()
            rc = _sym_rcond(N)
            if not rc > self.rtol:
                raise ValueError(
                    f"L-SR1 inverse middle matrix R + R^T - D - Y^T Y/gamma is (near) singular "
                    f"(rcond={rc:.3e} <= rtol={self.rtol:.1e}): B is singular, H = B^-1 does "
                    "not exist")
            Ninv = self._xp.linalg.solve(N, self._xp.eye(self.k, dtype=N.dtype))
            self._Ninv = 0.5 * (Ninv + Ninv.T)
        return v / self.gamma + self.psi(self._Ninv @ self.psi_t(v)) / (self.gamma * self.gamma)

    def to_dense(self, inverse: bool = False) -> Any:
        """Dense n × n B (or H with ``inverse=True``) — for tests on small n."""
        eye = self._xp.eye(self.n, dtype=self.S.dtype)
        return self.solve(eye) if inverse else self.matvec(eye)

    @property
    def flops_matvec(self) -> int:
        return flop_count("lsr1_matvec", self.n, self.k)

    @property
    def flops_solve(self) -> int:
        return flop_count("lsr1_matvec", self.n, self.k)


def lsr1_prune_count(S: Any, Y: Any, gamma: float, *, rtol: float = SINGULAR_RTOL,
                     inverse: bool = False) -> int:
    """Number of oldest pairs to drop so the L-SR1 representation is usable.

    Direct form ([RD16] Alg. 1 lines 30–39, B₀ = γI): drop the first columns while not
    (ΨᵀΨ ≻ 0 and M⁻¹ nonsingular), Ψ = Y − γS.  Inverse form (``inverse=True``, Alg. 2 lines
    24–32, H₀ = (1/γ)I): drop while YᵀS − YᵀH₀Y (our N) is singular.  "Singular" and "≻ 0" are
    read numerically: reciprocal condition (of Ψ's singular values, of the middle matrix's
    eigenvalues) above ``rtol``.  Returns k when no suffix works.
    """
    xp, k, _ = _check_pairs(S, Y)
    gamma = float(gamma)
    for d in range(k):
        Sd, Yd = S[d:], Y[d:]
        if inverse:
            SY = Sd @ Yd.T
            R = xp.triu(SY)
            N = R + R.T - xp.diag(xp.diag(SY)) - (Yd @ Yd.T) / gamma
            if _sym_rcond(N) > rtol:
                return d
            continue
        P = Yd - gamma * Sd
        # Ψ full column rank: σ_min/σ_max of Ψ = sqrt(rcond of the Gram matrix ΨᵀΨ)
        if not math.sqrt(max(_sym_rcond(P @ P.T), 0.0)) > rtol:
            continue
        SY = Sd @ Yd.T
        L = xp.tril(SY, -1)
        Minv = xp.diag(xp.diag(SY)) + L + L.T - gamma * (Sd @ Sd.T)
        if _sym_rcond(Minv) > rtol:
            return d
    return k


def psi_gram(SY: Any, SS: Any, YY: Any, gamma: float) -> Any:
    """ΨᵀΨ = YᵀY − γ(SᵀY + YᵀS) + γ²SᵀS for Ψ = Y − γS from the k × k Grams (row convention:
    ``SY = S @ Y.T``, ``SS = S @ S.T``, ``YY = Y @ Y.T``); symmetrised exactly."""
    gamma = float(gamma)
    G = YY - gamma * (SY + SY.T) + (gamma * gamma) * SS
    return 0.5 * (G + G.T)


def lsr1_prune_count_from_grams(SY: Any, SS: Any, YY: Any, gamma: float, *,
                                rtol: float = SINGULAR_RTOL, inverse: bool = False) -> int:
    """:func:`lsr1_prune_count` from the cached Grams (SY = S Yᵀ, SS = S Sᵀ, YY = Y Yᵀ) only:
    the same tests on trailing k × k blocks, O(k⁴) at worst and no n-vector work."""
    k = int(SY.shape[0])
    if SY.shape != (k, k) or SS.shape != (k, k) or YY.shape != (k, k):
        raise ValueError("SY, SS, YY must be square and of one size")
    xp = backend.namespace(SY, SS, YY)
    gamma = float(gamma)
    for d in range(k):
        SYd, SSd, YYd = SY[d:, d:], SS[d:, d:], YY[d:, d:]
        if inverse:
            R = xp.triu(SYd)
            N = R + R.T - xp.diag(xp.diag(SYd)) - YYd / gamma
            if _sym_rcond(N) > rtol:
                return d
            continue
        if not math.sqrt(max(_sym_rcond(psi_gram(SYd, SSd, YYd, gamma)), 0.0)) > rtol:
            continue
        L = xp.tril(SYd, -1)
        Minv = xp.diag(xp.diag(SYd)) + L + L.T - gamma * SSd
        if _sym_rcond(Minv) > rtol:
            return d
    return k


class GramCache:
    """The k × k Gram matrices SY = S Yᵀ ((SY)ᵢⱼ = sᵢᵀyⱼ), SS = S Sᵀ, YY = Y Yᵀ of a
    :class:`PairMemory`, kept in step with it: :meth:`push` borders them with the new row and
    column (4kn multiplications: S s, Y s, S y, Y y, plus 3n), :meth:`drop` slices the oldest
    rows and columns off (no arithmetic).  Mirror every mutation of the memory: call
    :meth:`push` with the memory's rows *before* the pair is appended (after dropping the
    oldest pair when it is full) and :meth:`drop` with each ``remove_oldest``.

    Plain arrays on the backend of the pairs; :meth:`state` / :meth:`from_state` for
    checkpoints.  Rounding: the bordered entries are the same dot products a fresh
    ``S @ Y.T`` computes, so they agree to a few ulps (BLAS may sum in another order).
    """

    def __init__(self, SY: Any, SS: Any, YY: Any) -> None:
        k = int(SY.shape[0])
        if SY.shape != (k, k) or SS.shape != (k, k) or YY.shape != (k, k):
            raise ValueError("SY, SS, YY must be square and of one size")
        self.SY, self.SS, self.YY = SY, SS, YY

    @classmethod
    def from_pairs(cls, S: Any, Y: Any) -> "GramCache":
        """Fresh Grams of ``(k, n)`` pairs (O(k²n), once)."""
        _check_pairs(S, Y)
        return cls(S @ Y.T, S @ S.T, Y @ Y.T)

    @classmethod
    def empty_like(cls, x: Any) -> "GramCache":
        xp = backend.namespace(x)
        z = xp.zeros((0, 0), dtype=x.dtype)
        return cls(z, z.copy(), z.copy())

    @property
    def count(self) -> int:
        return int(self.SY.shape[0])

    def push(self, S: Any, Y: Any, s: Any, y: Any, *, Ss: Any = None, Ys: Any = None) -> None:
        """Border the Grams with the pair (s, y); ``S``, ``Y``: the ``(k, n)`` rows stored before
        it (k = :attr:`count`).  ``Ss = S @ s`` and ``Ys = Y @ s`` may be passed when known."""
        xp = backend.namespace(S, Y, s, y)
        k = self.count
        if S.shape[0] != k or Y.shape[0] != k:
            raise ValueError(f"GramCache holds {k} pairs but S, Y have {S.shape[0]}, {Y.shape[0]} rows")
        Ss = S @ s if Ss is None else Ss
        Ys = Y @ s if Ys is None else Ys
        Sy, Yy = S @ y, Y @ y
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

    def drop(self, k: int = 1) -> None:
        """Forget the ``k`` oldest pairs (all of them when ``k >= count``)."""
        k = int(k)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        k = min(k, self.count)
        if k:
            self.SY = self.SY[k:, k:].copy()
            self.SS = self.SS[k:, k:].copy()
            self.YY = self.YY[k:, k:].copy()

    def psi_gram(self, gamma: float) -> Any:
        """ΨᵀΨ for Ψ = Y − γS (:func:`psi_gram`)."""
        return psi_gram(self.SY, self.SS, self.YY, gamma)

    def state(self) -> dict:
        return {"SY": self.SY, "SS": self.SS, "YY": self.YY}

    @classmethod
    def from_state(cls, d: dict) -> "GramCache":
        return cls(d["SY"], d["SS"], d["YY"])


# --------------------------------------------------------------------------------------------
# dense updates (oracles, dense methods)
# --------------------------------------------------------------------------------------------
def bfgs_update(B: Any, s: Any, y: Any) -> Any:
    """Dense BFGS update B⁺ = B − Bs sᵀB / sᵀBs + y yᵀ / yᵀs ([NW06] eq. 6.19).

    Raises ``ValueError`` unless sᵀy > 0 and sᵀBs > 0 (skip or damp beforehand).
    """
    xp = backend.namespace(B, s, y)
    Bs = B @ s
    sy, sBs = float(s @ y), float(s @ Bs)
    if not (sy > 0.0 and sBs > 0.0):
        raise ValueError(f"BFGS update needs s^T y > 0 and s^T B s > 0 (got {sy:.3e}, {sBs:.3e})")
    return B - xp.outer(Bs, Bs) / sBs + xp.outer(y, y) / sy


def bfgs_inverse_update(H: Any, s: Any, y: Any) -> Any:
    """Dense inverse BFGS update H⁺ = (I − ρsyᵀ) H (I − ρysᵀ) + ρssᵀ, ρ = 1/yᵀs ([NW06] 6.17).

    H must be symmetric.  Raises ``ValueError`` unless sᵀy > 0.
    """
    xp = backend.namespace(H, s, y)
    sy = float(s @ y)
    if not sy > 0.0:
        raise ValueError(f"BFGS update needs s^T y > 0 (got {sy:.3e})")
    rho = 1.0 / sy
    Hy = H @ y
    yHy = float(y @ Hy)
    return (H - rho * (xp.outer(s, Hy) + xp.outer(Hy, s))
            + (rho * rho * yHy + rho) * xp.outer(s, s))


def sr1_skip(s: Any, y: Any, Bs: Any, r: float = 1e-8) -> bool:
    """True when the SR1 update must be skipped ([NW06] eq. 6.26, [RD16] Alg. 1 line 26).

    The update is applied only if |sᵀ(y − Bs)| ≥ r ‖s‖ ‖y − Bs‖.  We also skip when
    sᵀ(y − Bs) = 0 exactly (then the rule reads 0 ≥ 0 and the update would divide by zero; for
    y = Bs B already satisfies the secant equation) and when the test is not finite.

    For the inverse update ([RD16] Alg. 2 line 19, |yᵀ(s − Hy)| ≥ r‖y‖‖s − Hy‖) call
    ``sr1_skip(y, s, Hy, r)``.
    """
    xp = backend.namespace(s, y, Bs)
    v = y - Bs
    lhs = abs(float(s @ v))
    rhs = r * float(xp.linalg.norm(s)) * float(xp.linalg.norm(v))
    return (not lhs >= rhs) or lhs == 0.0


def sr1_update(B: Any, s: Any, y: Any, r: float = 1e-8) -> tuple[Any, bool]:
    """Dense SR1 update B⁺ = B + (y − Bs)(y − Bs)ᵀ / (y − Bs)ᵀs ([NW06] eq. 6.24).

    Returns ``(B_new, skipped)``; when :func:`sr1_skip` says so, ``B_new`` is a copy of B.
    """
    xp = backend.namespace(B, s, y)
    Bs = B @ s
    if sr1_skip(s, y, Bs, r):
        return B.copy(), True
    v = y - Bs
    return B + xp.outer(v, v) / float(v @ s), False


def sr1_inverse_update(H: Any, s: Any, y: Any, r: float = 1e-8) -> tuple[Any, bool]:
    """Dense inverse SR1 update H⁺ = H + (s − Hy)(s − Hy)ᵀ / (s − Hy)ᵀy ([NW06] eq. 6.25).

    Skip rule |yᵀ(s − Hy)| ≥ r‖y‖‖s − Hy‖ ([RD16] Alg. 2 line 19).  Returns ``(H_new, skipped)``.
    When both are defined this is the inverse of :func:`sr1_update` (SR1 is self-dual).
    """
    xp = backend.namespace(H, s, y)
    Hy = H @ y
    if sr1_skip(y, s, Hy, r):
        return H.copy(), True
    w = s - Hy
    return H + xp.outer(w, w) / float(w @ y), False


# --------------------------------------------------------------------------------------------
# flop counts
# --------------------------------------------------------------------------------------------
_FLOPS = {
    # two loops, each pair: one dot and one axpy per loop → 4n; plus H₀ scaling
    "lbfgs_two_loop": lambda n, m: 4 * m * n + n,
    # [S v; Y v] (2mn), 2m × 2m middle (4m²), S w₁ + Y w₂ (2mn), γ v (n)
    "lbfgs_compact": lambda n, m: (4 * m + 1) * n + 4 * m * m,
    # Ψᵀv (mn), M· (m²), Ψ· (mn), γv (n) — Ψ stored
    "lsr1_matvec": lambda n, m: (2 * m + 1) * n + m * m,
    # [RD16] §3 / [NW06] §7.2 count, Ψᵀv formed as Yᵀv − γSᵀv from S and Y
    "lsr1_matvec_paper": lambda n, m: (4 * m + 1) * n + m * m,
    # LSR1Compact construction: Ψ (mn), SᵀY and SᵀS recomputed (2m²n), m × m solve (m³)
    "lsr1_form": lambda n, m: m * n + 2 * m * m * n + m ** 3,
    # incremental update of [RD16] §3 (new row/column of SᵀY and SᵀS): 2mn + O(m³)
    "lsr1_update_paper": lambda n, m: 2 * m * n + m ** 3,
    # solve_lsr1_subproblem: Householder QR (≈ 2m²n incl. forming Q), Qᵀg and g_⊥ (2mn),
    # p assembly (mn + n), Bp for the predicted reduction ((2m+1)n)
    "lsr1_subproblem": lambda n, m: 2 * m * m * n + (5 * m + 2) * n + 3 * m ** 3,
    # dense updates on n × n matrices
    "bfgs_dense": lambda n, m: 3 * n * n,
    "sr1_dense": lambda n, m: 2 * n * n,
}


def flop_count(kind: str, n: int, m: int) -> int:
    """Multiplications of one operation of kind ``kind`` with vector length n and memory m.

    Kinds: ``lbfgs_two_loop`` (4mn + n), ``lbfgs_compact`` (H v or B v, (4m+1)n + 4m²),
    ``lsr1_matvec`` ((2m+1)n + m², Ψ stored), ``lsr1_matvec_paper`` ((4m+1)n + m², [RD16] §3),
    ``lsr1_form``, ``lsr1_update_paper`` (2mn + m³), ``lsr1_subproblem``, ``bfgs_dense``,
    ``sr1_dense``.  Multiply-adds count once; IEEE flops ≈ 2 × this.
    """
    try:
        f = _FLOPS[kind]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}; known: {sorted(_FLOPS)}") from None
    return int(f(int(n), int(m)))
