"""Trust-region building blocks: radius rules, subproblem solvers.

Subproblem: minimize m(p) = gᵀp + ½ pᵀBp subject to ‖p‖₂ ≤ Δ.  A global solution p* is
characterized by ([NW06] Thm 4.1, Moré–Sorensen 1983)::

    (B + σI) p* = −g,   σ ≥ 0,   σ (Δ − ‖p*‖) = 0,   B + σI ⪰ 0.

* :func:`solve_lsr1_subproblem` — exact solution for B = γI + ΨMΨᵀ by the orthonormal-basis
  (OBS) method of Brust, Erway & Marcia, "On solving L-SR1 trust-region subproblems",
  Comput. Optim. Appl. 66 (2017) 245–266 [BEM17]: spectral decomposition of B from a thin QR of Ψ
  and an m × m eigendecomposition, then Newton on the secular equation 1/‖p(σ)‖ − 1/Δ = 0.
* :func:`solve_lsr1_subproblem_gram` — the same from ΨᵀΨ (eigendecomposition of the k × k Gram
  matrix instead of a QR of Ψ) and Ψᵀv / Ψc products only: O(kn) + O(k³).
* :func:`solve_dense_subproblem` — the same from a full eigendecomposition of a dense B (oracle).
* :func:`steihaug_cg` — Steihaug–Toint truncated CG ([NW06] Alg. 7.2).
* :class:`RadiusRule` — the accept test and radius rule of [RD16] Algorithm 1 (lines 13–25);
  :class:`AveragedRadiusRule` — MB-LSR1's ([MB] Alg. 5).

[NW06] Nocedal & Wright, *Numerical Optimization*, 2nd ed., ch. 4 and §7.1.
[RD16] Ramamurthy & Duffy, "L-SR1: a second order optimization method for deep learning", appendix,
Algorithm 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy

from .. import backend
from .base import check_above, check_positive, check_range
from .costs import flops_eigh, flops_eigvalsh, flops_qr, flops_svd

__all__ = [
    "solve_compact_subproblem",
    "lsr1_subproblem_flops",
    "lsr1_subproblem_gram_flops",
    "RadiusRule",
    "AveragedRadiusRule",
    "reduction_ratio",
    "TrustRegionSolution",
    "SteihaugResult",
    "solve_lsr1_subproblem",
    "solve_lsr1_subproblem_gram",
    "solve_dense_subproblem",
    "steihaug_cg",
]


# --------------------------------------------------------------------------------------------
# radius rules ([RD16] Algorithm 1)
# --------------------------------------------------------------------------------------------
def reduction_ratio(ared: float, pred: float) -> float:
    """ρ = ared / pred; −∞ when the step is unusable (pred ≤ 0 or a non-finite reduction).

    A NaN/Inf f(x + s) or a model that predicts no decrease must count as a bad step: −∞ both
    rejects the step and shrinks the radius (:class:`RadiusRule`).
    """
    ared, pred = float(ared), float(pred)
    if not (math.isfinite(ared) and math.isfinite(pred)) or pred <= 0.0:
        return -math.inf
    return ared / pred


@dataclass(frozen=True)
class RadiusRule:
    """The trust-region rules of [RD16] Algorithm 1 in one object.

    :meth:`accept`: ρ = ared/pred > ``eta`` (line 13, the paper asks η ∈ (0, 10⁻³); False for a NaN
    ratio). :meth:`update` (lines 18–25; all comparisons strict, as in the paper)::

        Δₖ₊₁ ← Δₖ
        if ρₖ > u:                              (u = 0.75)
            if ‖sₖ‖ > boundary_fraction·Δₖ:     (the paper's ρ = 0.8)
                Δₖ₊₁ ← increase·Δₖ               (2)
        else if ρₖ < l:                         (l = 0.1)
            Δₖ₊₁ ← decrease·Δₖ                   (0.5)

    ``rho`` is ared/pred (:func:`reduction_ratio`); a NaN ratio shrinks. Not in the paper:
    ``delta_max`` (default ∞) caps the radius, ``delta_min`` (0; S-LSR1 keeps 10⁻¹²) bounds it
    below. Radius growth depends on the step norm, not on acceptance. The paper's initial radius
    is Δ₀ = ‖∇f(x₀)‖₂.
    """

    eta: float = 1e-4
    u: float = 0.75
    l: float = 0.1  # noqa: E741
    boundary_fraction: float = 0.8
    increase: float = 2.0
    decrease: float = 0.5
    delta_max: float = math.inf
    delta_min: float = 0.0

    def __post_init__(self) -> None:
        """The hyperparameter checks of every method that uses the rule (values as given)."""
        check_range("eta", self.eta, 0.0, 1.0, hi_open=True)
        check_range("l", self.l, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("u", self.u, self.l, 1.0, lo_open=True, hi_open=True)
        check_range("boundary_fraction", self.boundary_fraction, 0.0, 1.0)
        check_above("increase", self.increase, 1.0)
        check_range("decrease", self.decrease, 0.0, 1.0, lo_open=True, hi_open=True)
        if not self.delta_max > 0:
            raise ValueError(f"delta_max must be > 0, got {self.delta_max}")
        check_positive("delta_min", self.delta_min, allow_zero=True)

    def accept(self, rho: float) -> bool:
        return float(rho) > self.eta

    def update(self, delta: float, rho: float, step_norm: float) -> float:
        delta, rho, step_norm = float(delta), float(rho), float(step_norm)
        new = delta
        if rho > self.u:
            if step_norm > self.boundary_fraction * delta:
                new = self.increase * delta
        elif rho < self.l or math.isnan(rho):
            new = self.decrease * delta
        return max(min(new, float(self.delta_max)), self.delta_min)


@dataclass(frozen=True)
class AveragedRadiusRule:
    """The radius rule of MB-LSR1 ([MB] Griffin et al., Algorithm 5), applied to the running
    average ρ̂ that :func:`~.drivers.trust_region_update` forms with ``average=(ζ, ρ̂, T)``::

        ρ̂ < low → Δ = min(Δ, ‖s‖);   ρ̂ ≥ high and ‖s‖ ≥ Δ(1 − rtol) → Δ = increase·Δ;   Δ ≥ delta_min

    (``rtol``: the clipped step has ‖s‖ = Δ only up to rounding). Acceptance in MB-LSR1 is the
    line search's, so :meth:`accept` always says yes.
    """

    low: float = 0.1
    high: float = 0.5
    increase: float = 2.0
    delta_min: float = 0.0
    rtol: float = 1e-12

    def accept(self, rho: float) -> bool:
        return True

    def update(self, delta: float, rho: float, step_norm: float) -> float:
        if rho < self.low:
            delta = min(delta, step_norm)
        elif rho >= self.high and step_norm >= delta * (1.0 - self.rtol):
            delta = self.increase * delta
        return max(delta, self.delta_min)


# --------------------------------------------------------------------------------------------
# exact subproblem solvers
# --------------------------------------------------------------------------------------------
@dataclass
class TrustRegionSolution:
    """Solution of min gᵀp + ½pᵀBp s.t. ‖p‖ ≤ Δ.

    p : the step (same backend as g).
    sigma : Lagrange multiplier σ ≥ 0 with (B + σI)p = −g.
    pred : predicted reduction −(gᵀp + ½pᵀBp) ≥ 0.
    boundary : ‖p‖ = Δ (σ > 0, or the hard case).
    hard_case : g ⟂ eigenspace of λ_min < 0 and σ = −λ_min (p has a null-vector component).
    lambda_min : smallest eigenvalue of B.
    step_norm : ‖p‖.
    newton_iters : Newton iterations on the secular equation.
    rank : rank of Ψ kept after dropping dependent columns (n for the dense solver).
    Bp : B p when the solver returns it (:func:`solve_lsr1_subproblem_gram`), else None.
    """

    p: Any
    sigma: float
    pred: float
    boundary: bool
    hard_case: bool
    lambda_min: float
    step_norm: float
    newton_iters: int = 0
    rank: int = 0
    Bp: Any = None


@dataclass
class _Secular:
    sigma: float
    coef: numpy.ndarray  # p = Σ coef_i v_i (+ tau z)
    tau: float
    z_index: int  # eigen-index whose eigenvector completes the hard case (-1: none)
    hard_case: bool
    boundary: bool
    iters: int


#: |entries| inside this range square and cube without overflow or underflow in float64
_SAFE_LO, _SAFE_HI = 1e-100, 1e100


def _norm(v: numpy.ndarray) -> float:
    """‖v‖₂ of a host vector, scale-safe: the plain ``numpy.linalg.norm`` (bit-identical) when the
    entries are of moderate size, else computed on v/max|vᵢ| and scaled back (no overflow to inf
    for finite entries up to 1e308, no underflow to 0)."""
    if v.size == 0:
        return 0.0
    m = float(numpy.max(numpy.abs(v)))
    if m == 0.0 or not math.isfinite(m) or _SAFE_LO <= m <= _SAFE_HI:
        return float(numpy.linalg.norm(v))
    return m * float(numpy.linalg.norm(v / m))


def _secular_slope(q: numpy.ndarray, d: numpy.ndarray, pn: float) -> float:
    """φ'(σ) = Σ qᵢ²/dᵢ / ‖q‖³ of the secular equation, qᵢ = aᵢ/dᵢ: as written when ‖q‖ is of
    moderate size (bit-identical to the recorded trajectories), else as Σ (qᵢ/‖q‖)²/dᵢ / ‖q‖, which
    neither overflows (no Python-float ``** 3``) nor underflows for finite inputs."""
    if _SAFE_LO <= pn <= _SAFE_HI:
        num = float(numpy.sum(q * q / d))
        if math.isfinite(num):
            return num / pn ** 3
    if not (pn > 0.0 and math.isfinite(pn)):
        return math.nan
    u = q / pn
    return float(numpy.sum(u * u / d)) / pn


def _secular_solve(lam: numpy.ndarray, a: numpy.ndarray, delta: float, *, hard_tol: float,
                   eig_tol: float, newton_tol: float, maxiter: int) -> _Secular:
    """Solve the subproblem in eigen-coordinates (host NumPy arrays of length ≤ m + 1 or n).

    B = Σ λᵢ vᵢvᵢᵀ restricted to span{vᵢ} ∋ g, aᵢ = vᵢᵀg, p(σ) = −Σ aᵢ/(λᵢ+σ) vᵢ.
    Newton on φ(σ) = 1/‖p(σ)‖ − 1/Δ ([BEM17] §3, [NW06] Alg. 4.3): φ is concave and increasing
    on (−λ_min, ∞), so Newton started where φ ≤ 0 increases monotonically to the root.
    """
    a = a.copy()
    scale = max(float(numpy.abs(lam).max()), 1e-300)
    lam_min = float(lam.min())
    gnorm = _norm(a)
    tol_l = eig_tol * scale
    zero = numpy.zeros_like(a)

    def pnorm(sigma: float) -> float:
        nz = a != 0.0
        return _norm(a[nz] / (lam[nz] + sigma))

    if lam_min > tol_l:  # B positive definite: try the Newton step
        sigma0 = 0.0
        if pnorm(0.0) <= delta:
            return _Secular(0.0, -a / lam, 0.0, -1, False, False, 0)
    else:
        sigma_low = max(0.0, -lam_min)
        group = lam <= lam_min + tol_l  # the eigenspace of λ_min (within tolerance)
        a_min = _norm(a[group])
        if a_min <= hard_tol * gnorm:
            a[group] = 0.0  # g ⟂ eigenspace: the pole at −λ_min is absent
            pn = pnorm(sigma_low)
            if pn <= delta:
                coef = zero.copy()
                nz = a != 0.0
                coef[nz] = -a[nz] / (lam[nz] + sigma_low)
                if lam_min < -tol_l:  # hard case: σ = −λ_min, fill up with the eigenvector
                    tau = math.sqrt(max(delta * delta - pn * pn, 0.0))
                    j = int(numpy.flatnonzero(group)[0])
                    return _Secular(sigma_low, coef, tau, j, True, True, 0)
                # λ_min ≈ 0, g in the range of B: σ = 0 and the minimum-norm Newton step
                return _Secular(0.0, coef, 0.0, -1, False, pn >= delta * (1 - 1e-12), 0)
            sigma0 = sigma_low
        else:
            # ‖p(σ0)‖ ≥ a_min/(λ_min + σ0) = Δ, so φ(σ0) ≤ 0 ([BEM17] initial guess)
            sigma0 = max(0.0, a_min / delta - lam_min)

    sigma, it = sigma0, 0
    for it in range(1, maxiter + 1):
        nz = a != 0.0
        d = lam[nz] + sigma
        q = a[nz] / d
        pn = _norm(q)
        if abs(pn - delta) <= newton_tol * delta:
            break
        phi = 1.0 / pn - 1.0 / delta
        dphi = _secular_slope(q, d, pn)
        new = sigma - phi / dphi
        floor = max(0.0, -lam_min)  # B + σI ⪰ 0 and σ ≥ 0
        if new <= floor or not math.isfinite(new):
            new = 0.5 * (sigma + floor)  # only reachable through rounding near the root
        if new == sigma:
            break
        sigma = new
    coef = zero.copy()
    nz = a != 0.0
    coef[nz] = -a[nz] / (lam[nz] + sigma)
    return _Secular(sigma, coef, 0.0, -1, False, True, it)


def _radius(delta: float) -> float:
    delta = float(delta)
    if not delta > 0.0:
        raise ValueError(f"trust-region radius must be > 0, got {delta}")
    return delta


def _finish(xp: Any, g: Any, p: Any, Bp: Any, sec: _Secular, lam_min: float, delta: float,
            rank: int) -> TrustRegionSolution:
    pred = -float(g @ p + 0.5 * (p @ Bp))
    pn = float(xp.linalg.norm(p))
    return TrustRegionSolution(p=p, sigma=float(sec.sigma), pred=pred, boundary=bool(sec.boundary),
                               hard_case=bool(sec.hard_case), lambda_min=lam_min, step_norm=pn,
                               newton_iters=sec.iters, rank=rank)


def _range_eigen(xp: Any, Rr: Any, M: Any) -> tuple[Any, Any]:
    """Eigendecomposition of R_r M R_rᵀ (r × r): B's spectrum on range(Ψ) is λ̂ + γ."""
    return xp.linalg.eigh(Rr @ (0.5 * (M + M.T)) @ Rr.T)


def _solve_in_range_basis(xp: Any, g: Any, gamma: float, delta: float, r: int, lam_hat: Any, *,
                          par: Callable[[Any], Any], par_t: Callable[[Any], Any],
                          complement_z: Callable[[], Any], Bv: Callable[[Any], Any],
                          hard_tol: float, eig_tol: float, newton_tol: float, maxiter: int) -> TrustRegionSolution:
    """Steps 3–4 of the OBS method, shared by the QR and Gram routes.

    ``par(c)`` = P_∥c and ``par_t(v)`` = P_∥ᵀv for the orthonormal eigenbasis P_∥ (n × r) of B on
    range(Ψ) with eigenvalues ``lam_hat`` + γ; γ on the complement. ``complement_z()`` returns a
    (not yet normalized) vector of the complement, for the hard case with γ smallest.
    """
    n = int(g.shape[0])
    if r > 0:
        g_par = par_t(g)
        g_perp = g - par(g_par)
        lam_range = backend.to_numpy(lam_hat) + gamma
        a_range = backend.to_numpy(g_par)
    else:
        g_perp = g
        lam_range = numpy.zeros(0)
        a_range = numpy.zeros(0)
    has_perp = n > r
    if has_perp:
        lam = numpy.concatenate([lam_range, [gamma]])
        a = numpy.concatenate([a_range, [float(xp.linalg.norm(g_perp))]])
    else:
        lam, a = lam_range, a_range
    lam_min = float(lam.min())

    sec = _secular_solve(lam, a, delta, hard_tol=hard_tol, eig_tol=eig_tol,
                         newton_tol=newton_tol, maxiter=maxiter)
    # assemble p = P_∥ c_∥ + c_⊥ ĝ_⊥ (+ τ z)
    p = xp.zeros_like(g)
    if r > 0:
        p = p + par(xp.asarray(sec.coef[:r], dtype=g.dtype))
    if has_perp and sec.coef[r] != 0.0:
        p = p + (float(sec.coef[r]) / float(a[r])) * g_perp
    if sec.hard_case and sec.tau > 0.0:
        j = sec.z_index
        if j < r:
            e = xp.zeros(r, dtype=g.dtype)
            e[j] = 1.0
            z = par(e)
        else:  # γ is λ_min: eigenvector in the complement of range(Ψ)
            if r > 0:
                z = complement_z()
            else:
                z = xp.zeros_like(g)
                z[0] = 1.0
            z = z / xp.linalg.norm(z)
        p = p + sec.tau * z
    Bp = Bv(p)
    sol = _finish(xp, g, p, Bp, sec, lam_min, delta, r)
    sol.Bp = Bp
    return sol


def solve_lsr1_subproblem(g: Any, gamma: float, Psi: Any, M: Any, delta: float, *, rank_tol: float = 1e-12,
                          hard_tol: float = 1e-12, eig_tol: float = 1e-12, newton_tol: float = 1e-14,
                          maxiter: int = 100) -> TrustRegionSolution:
    """Exact minimizer of gᵀp + ½pᵀBp, ‖p‖ ≤ Δ, B = γI + ΨMΨᵀ (OBS method of [BEM17]).

    ``Psi``: ``(n, k)`` (e.g. :attr:`.operators.LSR1Operator.Psi`), ``M``: symmetric ``(k, k)``;
    ``Psi = M = None``: no pairs, B = γI.

    1. Thin QR Ψ = QR (Householder), then an SVD of the k × k R drops dependent columns:
       Ψ = (QU_r)(Σ_r W_rᵀ), QU_r orthonormal n × r (r = numerical rank, σᵢ > rank_tol·σ₁).
    2. Eigendecomposition (Σ_rW_rᵀ) M (Σ_rW_rᵀ)ᵀ = V Λ̂ Vᵀ; P_∥ = QU_rV.  The spectrum of B is
       λ̂ᵢ + γ on range(Ψ) (eigenvectors P_∥) and γ, multiplicity n − r, on its complement.
    3. g_∥ = P_∥ᵀg, g_⊥ = g − P_∥g_∥; in these coordinates the subproblem is diagonal and the
       secular equation φ(σ) = 1/‖p(σ)‖ − 1/Δ is solved by Newton (host side, ≤ r + 1 numbers).
    4. Hard case (λ_min < 0 and g ⟂ its eigenspace, ‖p(−λ_min)‖ ≤ Δ): σ = −λ_min and
       p = p(−λ_min) + τz, ‖p‖ = Δ.  z is a column of P_∥ when λ_min = λ̂₁ + γ, or — when γ is
       the smallest eigenvalue — the normalized projection (I − P_∥P_∥ᵀ)eⱼ onto the complement,
       j = the coordinate with the smallest row norm of P_∥ ([BEM17] §3.2).

    Cost O(nk² + k³): one QR, products with Q of length n, one B p for the predicted reduction.
    Scalars and the r-vectors of step 3 are moved to the host (control flow, one sync each).
    """
    if Psi is None and M is None:
        xp = backend.namespace(g)
        Psi, M = xp.zeros((g.shape[0], 0), dtype=g.dtype), xp.zeros((0, 0), dtype=g.dtype)
    xp = backend.namespace(g, Psi, M)
    gamma, delta, n = float(gamma), _radius(delta), int(g.shape[0])
    k = int(Psi.shape[1]) if Psi.ndim == 2 else 0
    if Psi.ndim != 2 or Psi.shape[0] != n or M.shape != (k, k):
        raise ValueError(f"need Psi (n, k) and M (k, k); got {Psi.shape}, {M.shape}, n={n}")

    if k > 0:
        Q, R = xp.linalg.qr(Psi, mode="reduced")
        U, sv, Wt = xp.linalg.svd(R)
        sv_h = backend.to_numpy(sv)
        r = int(numpy.sum(sv_h > rank_tol * sv_h[0])) if sv_h.size and sv_h[0] > 0 else 0
    else:
        r = 0
    lam_hat, Pk = None, None
    if r > 0:
        lam_hat, V = _range_eigen(xp, sv[:r, None] * Wt[:r], M)  # Ψ = (Q U_r) R_r
        Pk = U[:, :r] @ V  # k × r; P_∥ = Q @ Pk (never formed unless needed)

    def complement_z() -> Any:
        # (I − P_∥P_∥ᵀ)eⱼ for the coordinate j with the smallest row norm of P_∥ ([BEM17] §3.2)
        P_par = Q @ Pk
        jj = int(backend.to_numpy(xp.argmin(xp.sum(P_par * P_par, axis=1))))
        z = -(P_par @ P_par[jj])
        z[jj] += 1.0
        return z

    return _solve_in_range_basis(
        xp, g, gamma, delta, r, lam_hat,
        par=lambda c: Q @ (Pk @ c), par_t=lambda v: Pk.T @ (Q.T @ v),
        complement_z=complement_z, Bv=lambda v: gamma * v + (Psi @ (M @ (Psi.T @ v)) if k > 0 else 0),
        hard_tol=hard_tol, eig_tol=eig_tol, newton_tol=newton_tol, maxiter=maxiter)


def solve_lsr1_subproblem_gram(g: Any, gamma: float, psi_t: Callable[[Any], Any], psi: Callable[[Any], Any], PtP: Any,
                               M: Any, delta: float, *, rank_tol: float = 1e-7, hard_tol: float = 1e-12,
                               eig_tol: float = 1e-12, newton_tol: float = 1e-14,
                               maxiter: int = 100) -> TrustRegionSolution:
    """:func:`solve_lsr1_subproblem` from the Gram matrix ΨᵀΨ and Ψ products only.

    ``psi_t(v)`` returns Ψᵀv (k,), ``psi(c)`` returns Ψc (n,) — e.g. Yv − γSv and Yᵀc − γSᵀc
    (:meth:`.operators.LSR1Operator.psi_t` / ``psi``); ``PtP`` = ΨᵀΨ = YᵀY − γ(SᵀY + YᵀS) + γ²SᵀS
    (k × k, :func:`.operators.psi_gram`); ``M`` symmetric k × k.

    1. ΨᵀΨ = W diag(μ) Wᵀ; the rank r counts σᵢ = √μᵢ > ``rank_tol``·σ₁ (a threshold on the
       singular values of Ψ, i.e. μᵢ > rank_tol²·μ₁ on the squared ones).  Q_r = ΨW_rΣ_r⁻¹ is an
       orthonormal basis of range(Ψ) and Ψ = Q_r(Σ_rW_rᵀ) as in the QR route.
    2. Eigendecomposition (Σ_rW_rᵀ)M(Σ_rW_rᵀ)ᵀ = VΛ̂Vᵀ; P_∥ = ΨT with T = W_rΣ_r⁻¹V (k × r),
       applied implicitly (never formed).
    3. g_∥ = Tᵀ(Ψᵀg), g_⊥ = g − ΨTg_∥, then the shared secular solver :func:`_secular_solve`.
    4. Hard case: z = ΨT[:, j] for a range eigenvalue; when γ is the smallest eigenvalue,
       z = (I − P_∥P_∥ᵀ)eⱼ (projected twice) for the first coordinate j with ‖P_∥ᵀeⱼ‖² ≤ ½
       (fewer than 2r coordinates fail, so typically j = 0): O(kn) per try.

    Cost: Ψᵀg, g_⊥, p, Ψᵀp and Ψ(MΨᵀp) — five products of 2kn each plus O(n), and O(k³) for
    the small eigendecompositions; no O(k²n) term.  The returned solution carries Bp.

    Accuracy: forming ΨᵀΨ squares the condition number, so singular values of Ψ below about
    √ε·σ₁ ≈ 1.5·10⁻⁸σ₁ are noise (hence the default ``rank_tol`` = 10⁻⁷ on singular values)
    and the step agrees with the QR route to about ε·κ(Ψ)² relative (≈ 10⁻¹² for the
    well-conditioned memories of L-SR1, worse as Ψ approaches rank deficiency).
    """
    xp = backend.namespace(g, PtP, M)
    gamma, delta, n = float(gamma), _radius(delta), int(g.shape[0])
    k = int(PtP.shape[0]) if PtP.ndim == 2 else -1
    if PtP.ndim != 2 or PtP.shape != (k, k) or M.shape != (k, k):
        raise ValueError(f"need PtP and M (k, k); got {PtP.shape}, {M.shape}")

    r = 0
    if k > 0:
        mu, W = xp.linalg.eigh(0.5 * (PtP + PtP.T))
        mu_h = backend.to_numpy(mu)[::-1]  # descending
        W = W[:, ::-1]
        if mu_h[0] > 0.0:
            r = int(numpy.sum(mu_h > (rank_tol * rank_tol) * mu_h[0]))
    T = None
    if r > 0:
        sig = xp.sqrt(xp.asarray(mu_h[:r].copy(), dtype=PtP.dtype))
        Wr = W[:, :r]
        lam_hat, V = _range_eigen(xp, sig[:, None] * Wr.T, M)  # Ψ = Q_r (Σ_r W_rᵀ)
        T = (Wr / sig[None, :]) @ V  # k × r; P_∥ = Ψ T
    else:
        lam_hat = None

    def complement_z() -> Any:
        # (I − P_∥P_∥ᵀ)eⱼ, projected twice, for the first j with ‖P_∥ᵀeⱼ‖² ≤ ½: O(kn) per try
        for jj in range(n):
            e = xp.zeros_like(g)
            e[jj] = 1.0
            c = T.T @ psi_t(e)  # P_∥ᵀ eⱼ
            if float(c @ c) <= 0.5 or jj == n - 1:
                z = e - psi(T @ c)
                return z - psi(T @ (T.T @ psi_t(z)))  # second projection (orthogonality)
        raise AssertionError("unreachable")  # pragma: no cover

    return _solve_in_range_basis(
        xp, g, gamma, delta, r, lam_hat,
        par=lambda c: psi(T @ c), par_t=lambda v: T.T @ psi_t(v), complement_z=complement_z,
        Bv=lambda v: gamma * v + (psi(M @ psi_t(v)) if k > 0 else 0),
        hard_tol=hard_tol, eig_tol=eig_tol, newton_tol=newton_tol, maxiter=maxiter)


def _rcond_psd(G: Any) -> float:
    """λ_min/λ_max of a symmetric PSD Gram matrix (negative rounding counts as 0)."""
    xp = backend.namespace(G)
    ev = backend.to_numpy(xp.linalg.eigvalsh(G))
    top = float(ev.max()) if ev.size else 0.0
    return max(float(ev.min()), 0.0) / top if top > 0.0 and math.isfinite(top) else 0.0


def solve_compact_subproblem(g: Any, gamma: float, B: Any, delta: float, *, gram: bool,
                             gram_rcond: float = 1e-6) -> tuple[TrustRegionSolution, bool]:
    """The exact L-SR1 trust-region step for B = γI + ΨMΨᵀ (an :class:`~.operators.LSR1Operator`;
    ``None``: B = γI) by one of two routes; returns (solution, Gram fallback taken).

    ``gram=True``: from ΨᵀΨ and Ψ products only (:func:`solve_lsr1_subproblem_gram`, O(kn) + O(k³)
    with the store's kept Grams) when λ_min/λ_max(ΨᵀΨ) ≥ ``gram_rcond``; below it ΨᵀΨ has squared
    κ(Ψ) past ε/gram_rcond of accuracy and the step takes the QR route (fallback = True).
    ``gram=False``: the QR route (:func:`solve_lsr1_subproblem`, thin QR of the formed Ψ, O(k²n)).
    """
    if B is None:
        return solve_lsr1_subproblem(g, gamma, None, None, delta), False
    if gram:
        PtP = B.psi_gram()
        if _rcond_psd(PtP) >= gram_rcond:
            return solve_lsr1_subproblem_gram(g, gamma, B.psi_t, B.psi, PtP, B.M, delta), False
    return solve_lsr1_subproblem(g, gamma, B.Psi, B.M, delta), gram


def lsr1_subproblem_flops(n: int, k: int) -> float:
    """Multiplications of :func:`solve_lsr1_subproblem`, generic case (rank k, no hard case), read
    from the code: QR of Ψ, SVD of R, R_r, M symmetrised, R_r M R_rᵀ (2k³), eigh, P_k = U V (k³),
    g_∥ (nk + k²), g_⊥ (k² + nk), ‖g_⊥‖ (n), p = Q P_k c (k² + nk) + (c/a) g_⊥ (n),
    Bp = γp + ΨMΨᵀp (n + 2nk + k²), pred (2n), ‖p‖ (n): 2k²n + (5k + 6)n + O(k³); 6n without pairs."""
    if k == 0:  # g_⊥ = g: ‖g‖, p = (c/a) g, Bp = γp, pred, ‖p‖
        return 6 * n
    return (flops_qr(n, k) + flops_svd(k) + 2 * k * k + 2 * k ** 3 + flops_eigh(k) + k ** 3
            + 5 * n * k + 4 * k * k + 6 * n)


def lsr1_subproblem_gram_flops(n: int, k: int) -> dict[str, float]:
    """Multiplications of :func:`solve_lsr1_subproblem_gram` (generic case, Ψ of full rank) and of
    the ΨᵀΨ rcond test that selects it: ``gram_rcond`` — ΨᵀΨ from the Grams (3k²) and its
    eigvalsh; ``tr_subproblem`` — five Ψ products (Ψᵀg, Ψ for g_⊥, Ψ for p, Ψᵀp and Ψ(MΨᵀp) of
    Bp; 2kn + k each, :meth:`.operators.LSR1Operator.psi_flops`), ‖g_⊥‖, (c/a)g_⊥, γp, pred (2n),
    ‖p‖, T·, Tᵀ· (3k²) and M· (k²); ``tr_subproblem_small`` — eigh of ΨᵀΨ and of R_rMR_rᵀ
    (2 × 3k³), R_rMR_rᵀ (2k³), T = W_rΣ_r⁻¹V (k³ + k²), the symmetrisations and R_r (3k²).
    Total 10kn + 6n + O(k³); 6n without pairs (the QR solver's empty case)."""
    if k == 0:
        return {"tr_subproblem": 6 * n}
    return {"gram_rcond": 3 * k * k + flops_eigvalsh(k), "tr_subproblem": 5 * (2 * k * n + k) + 6 * n + 4 * k * k,
            "tr_subproblem_small": 2 * flops_eigh(k) + 3 * k ** 3 + 4 * k * k}


def solve_dense_subproblem(g: Any, B: Any, delta: float, *, hard_tol: float = 1e-12, eig_tol: float = 1e-12,
                           newton_tol: float = 1e-14, maxiter: int = 100) -> TrustRegionSolution:
    """Exact trust-region step for a dense symmetric B by a full eigendecomposition (oracle).

    B = VΛVᵀ, aᵢ = vᵢᵀg, Newton on 1/‖p(σ)‖ − 1/Δ as in :func:`solve_lsr1_subproblem`, with the
    hard case p = −Σ_{λᵢ>λ_min} aᵢ/(λᵢ − λ_min) vᵢ + τ v₁ ([NW06] §4.3).  O(n³); small n only.
    """
    xp, delta = backend.namespace(g, B), _radius(delta)
    lam_d, V = xp.linalg.eigh(0.5 * (B + B.T))
    lam = backend.to_numpy(lam_d)
    a = backend.to_numpy(V.T @ g)
    sec = _secular_solve(lam, a, delta, hard_tol=hard_tol, eig_tol=eig_tol,
                         newton_tol=newton_tol, maxiter=maxiter)
    p = V @ xp.asarray(sec.coef, dtype=g.dtype)
    if sec.hard_case and sec.tau > 0.0:
        p = p + sec.tau * V[:, sec.z_index]
    return _finish(xp, g, p, B @ p, sec, float(lam.min()), delta, int(g.shape[0]))


# --------------------------------------------------------------------------------------------
# Steihaug–Toint CG
# --------------------------------------------------------------------------------------------
@dataclass
class SteihaugResult:
    """Outcome of :func:`steihaug_cg`.

    p : the step, ‖p‖ ≤ Δ.
    pred : predicted reduction −(gᵀp + ½pᵀBp) (tracked through the CG residual, no extra product).
    boundary : the step stopped on the boundary.
    negative_curvature : a direction with dᵀBd ≤ 0 was met.
    n_iter : number of B-products.
    converged : ‖g + Bp‖ ≤ tol·‖g‖ (interior solution).
    message : what happened.
    """

    p: Any
    pred: float
    boundary: bool
    negative_curvature: bool
    n_iter: int
    converged: bool
    message: str


def _to_boundary(p: Any, d: Any, delta: float) -> float:
    """τ ≥ 0 with ‖p + τd‖ = Δ (stable root of the quadratic; ‖p‖ ≤ Δ)."""
    dd, pd, pp = float(d @ d), float(p @ d), float(p @ p)
    rest = max(delta * delta - pp, 0.0)
    root = math.sqrt(pd * pd + dd * rest)
    return (rest / (pd + root)) if pd > 0.0 else ((root - pd) / dd)


def steihaug_cg(
    g: Any,
    Bv: Callable[[Any], Any],
    delta: float,
    tol: float = 1e-10,
    maxiter: int | None = None,
) -> SteihaugResult:
    """Steihaug–Toint truncated CG for min gᵀp + ½pᵀBp, ‖p‖ ≤ Δ ([NW06] Alg. 7.2).

    CG from p = 0 on Bp = −g; stops at the boundary when an iterate leaves the region or a
    direction of non-positive curvature dᵀBd ≤ 0 appears (then p moves along d to ‖p‖ = Δ), or
    when ‖g + Bp‖ ≤ tol·‖g‖.  ``Bv(v)`` returns B v; ``maxiter`` defaults to 2n.
    """
    xp, delta, n = backend.namespace(g), _radius(delta), int(g.shape[0])
    maxiter = 2 * n if maxiter is None else int(maxiter)
    p = xp.zeros_like(g)
    r = g.copy()  # residual r = g + Bp
    rr = float(r @ r)
    gnorm = math.sqrt(rr)
    if gnorm == 0.0:
        return SteihaugResult(p, 0.0, False, False, 0, True, "g = 0")
    d = -r

    def done(p: Any, r: Any, boundary: bool, neg: bool, it: int, conv: bool,
             msg: str) -> SteihaugResult:
        # m(p) = gᵀp + ½pᵀBp = ½(gᵀp + pᵀr) since r = g + Bp
        pred = -0.5 * float(g @ p + p @ r)
        return SteihaugResult(p, pred, boundary, neg, it, conv, msg)

    for it in range(1, maxiter + 1):
        Bd = Bv(d)
        dBd = float(d @ Bd)
        if not dBd > 0.0:
            tau = _to_boundary(p, d, delta)
            return done(p + tau * d, r + tau * Bd, True, True, it, False,
                        "negative curvature: stepped to the boundary")
        alpha = rr / dBd
        p_new = p + alpha * d
        if float(xp.linalg.norm(p_new)) >= delta:
            tau = _to_boundary(p, d, delta)
            return done(p + tau * d, r + tau * Bd, True, False, it, False,
                        "iterate left the trust region: stopped on the boundary")
        r = r + alpha * Bd
        p = p_new
        rr_new = float(r @ r)
        if math.sqrt(rr_new) <= tol * gnorm:
            return done(p, r, False, False, it, True, "converged (interior)")
        d = -r + (rr_new / rr) * d
        rr = rr_new
    return done(p, r, False, False, maxiter, False, f"maxiter={maxiter} reached")
