"""Line searches on a one-dimensional function φ(α) = f(x + α p).

* :func:`backtracking_armijo` — backtracking until the sufficient-decrease (Armijo) condition
  φ(α) ≤ φ(0) + c₁ α φ'(0) holds ([NW06] Alg. 3.1).  ``c1=0.1`` is the rule
  f(w + ηp) − f(w) ≤ 0.1 η ∇f(w)ᵀp of the second-order CNN comparison paper (its eq. 2), also
  available as :data:`CNN_COMPARISON_C1`.
* :func:`strong_wolfe` — bracketing and zoom of [NW06] Alg. 3.5 / 3.6 with safeguarded cubic
  (then quadratic, then bisection) interpolation, returning a step with
  φ(α) ≤ φ(0) + c₁αφ'(0) and |φ'(α)| ≤ c₂|φ'(0)|.

Both treat a non-finite φ(α) (or φ'(α)) as "step too long": they shrink and try again.  They
return a :class:`LineSearchResult`; on failure ``alpha == 0.0`` and ``success is False``, never a
NaN step.  All scalars are Python floats (φ may return 0-d arrays; each conversion is one sync).

[NW06] J. Nocedal, S. J. Wright, *Numerical Optimization*, 2nd ed., §3.1, §3.5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

__all__ = ["LineSearchResult", "backtracking_armijo", "strong_wolfe", "CNN_COMPARISON_C1"]

#: c₁ of the sufficient-decrease rule (2) in the second-order CNN comparison paper.
CNN_COMPARISON_C1 = 0.1


@dataclass
class LineSearchResult:
    """Outcome of a line search.

    alpha : accepted step (0.0 on failure).
    value : φ(alpha) (φ(0) on failure).
    slope : φ'(alpha) when it was evaluated (strong Wolfe), else ``None``.
    n_evals : number of φ (or (φ, φ') ) evaluations.
    success : whether the requested conditions hold at ``alpha``.
    message : what happened.
    """

    alpha: float
    value: float
    slope: float | None
    n_evals: int
    success: bool
    message: str


def _finite(*xs: float) -> bool:
    return all(math.isfinite(x) for x in xs)


def _bad_start(phi0: float, dphi0: float, dphi_out: float | None) -> LineSearchResult | None:
    """The failed result of a search that cannot start (φ(0) or φ'(0) not finite, or φ'(0) ≥ 0)."""
    if not _finite(phi0, dphi0):
        return LineSearchResult(0.0, phi0, dphi_out, 0, False, "phi(0) or phi'(0) is not finite")
    if dphi0 >= 0.0:
        return LineSearchResult(0.0, phi0, dphi_out, 0, False, f"not a descent direction (phi'(0) = {dphi0:.3e} >= 0)")
    return None


def backtracking_armijo(phi: Callable[[float], float], phi0: float, dphi0: float, alpha0: float = 1.0,
                        c1: float = 1e-4, shrink: float = 0.5, max_evals: int = 30) -> LineSearchResult:
    """Backtracking line search for the Armijo condition ([NW06] Alg. 3.1).

    Tries α = α₀, shrink·α₀, shrink²·α₀, … and accepts the first α with a finite φ(α) and
    φ(α) ≤ φ₀ + c₁ α φ'(0).  A non-finite φ(α) fails the test (shrink again).  Fails at once when
    φ'(0) ≥ 0 (not a descent direction) or φ₀, φ'(0) are not finite.
    """
    phi0, dphi0 = float(phi0), float(dphi0)
    if not (0.0 < c1 < 1.0 and 0.0 < shrink < 1.0 and alpha0 > 0.0):
        raise ValueError("need 0 < c1 < 1, 0 < shrink < 1 and alpha0 > 0")
    bad = _bad_start(phi0, dphi0, None)
    if bad is not None:
        return bad
    alpha = float(alpha0)
    for n in range(1, max_evals + 1):
        val = float(phi(alpha))
        if math.isfinite(val) and val <= phi0 + c1 * alpha * dphi0:
            return LineSearchResult(alpha, val, None, n, True, "Armijo condition satisfied")
        alpha *= shrink
    return LineSearchResult(0.0, phi0, None, max_evals, False,
                            f"no step satisfied the Armijo condition in {max_evals} evaluations")


def _cubicmin(a: float, fa: float, fpa: float, b: float, fb: float, fpb: float) -> float | None:
    """Minimizer of the cubic interpolating φ, φ' at a and b ([NW06] eq. 3.59); None if none."""
    if not _finite(a, fa, fpa, b, fb, fpb) or a == b:
        return None
    d1 = fpa + fpb - 3.0 * (fa - fb) / (a - b)
    rad = d1 * d1 - fpa * fpb
    if not (math.isfinite(rad) and rad >= 0.0):
        return None
    d2 = math.copysign(math.sqrt(rad), b - a)
    den = fpb - fpa + 2.0 * d2
    if den == 0.0:
        return None
    x = b - (b - a) * (fpb + d2 - d1) / den
    return x if math.isfinite(x) else None


def _quadmin(a: float, fa: float, fpa: float, b: float, fb: float) -> float | None:
    """Minimizer of the quadratic with q(a)=fa, q'(a)=fpa, q(b)=fb; None if not convex."""
    if not _finite(a, fa, fpa, b, fb) or a == b:
        return None
    h = b - a
    curv = fb - fa - fpa * h  # = c h², c the quadratic coefficient
    if not curv > 0.0:
        return None
    x = a - fpa * h * h / (2.0 * curv)
    return x if math.isfinite(x) else None


def strong_wolfe(phi_dphi: Callable[[float], tuple[float, float]], phi0: float, dphi0: float, alpha0: float = 1.0,
                 c1: float = 1e-4, c2: float = 0.9, alpha_max: float = 1e10, max_evals: int = 30,
                 expand: float = 2.0) -> LineSearchResult:
    """Strong Wolfe line search: bracketing ([NW06] Alg. 3.5) and zoom (Alg. 3.6).

    ``phi_dphi(α)`` returns (φ(α), φ'(α)).  Accepts α with φ(α) ≤ φ₀ + c₁αφ'(0) and
    |φ'(α)| ≤ c₂|φ'(0)|, 0 < c₁ < c₂ < 1.  Bracketing multiplies α by ``expand`` (capped at
    ``alpha_max``) while φ decreases and φ' < 0.  Zoom interpolates by the cubic through both ends'
    values and slopes, keeping the trial at least 20% of the interval away from its ends,
    else the quadratic (10%), else bisects.  A non-finite value or slope at a bracketing trial
    shrinks the trial halfway back towards the last finite point; inside zoom it becomes the new
    upper end of the interval.  On failure returns α = 0 and ``success=False``.
    """
    phi0, dphi0 = float(phi0), float(dphi0)
    if not (0.0 < c1 < c2 < 1.0):
        raise ValueError(f"need 0 < c1 < c2 < 1, got c1={c1}, c2={c2}")
    if not (alpha0 > 0.0 and alpha_max > 0.0 and expand > 1.0):
        raise ValueError("need alpha0 > 0, alpha_max > 0 and expand > 1")
    bad = _bad_start(phi0, dphi0, dphi0)
    if bad is not None:
        return bad
    evals = 0

    def armijo(a: float, f: float) -> bool:
        return f <= phi0 + c1 * a * dphi0

    def curvature(g: float) -> bool:
        return abs(g) <= -c2 * dphi0

    def fail(msg: str) -> LineSearchResult:
        return LineSearchResult(0.0, phi0, dphi0, evals, False, msg)

    def zoom(lo: float, f_lo: float, g_lo: float,
             hi: float, f_hi: float, g_hi: float) -> LineSearchResult:
        # Invariants (Alg. 3.6): lo satisfies Armijo with the lowest φ so far, g_lo (hi − lo) < 0.
        nonlocal evals
        while evals < max_evals:
            d = hi - lo
            left, right = min(lo, hi), max(lo, hi)
            a = _cubicmin(lo, f_lo, g_lo, hi, f_hi, g_hi)
            if a is None or not (left + 0.2 * abs(d) <= a <= right - 0.2 * abs(d)):
                a = _quadmin(lo, f_lo, g_lo, hi, f_hi)
                if a is None or not (left + 0.1 * abs(d) <= a <= right - 0.1 * abs(d)):
                    a = lo + 0.5 * d
            if a == lo or a == hi or abs(d) <= 1e-14 * max(1.0, abs(lo)):
                return fail(f"zoom interval collapsed to [{left:.3e}, {right:.3e}] "
                            f"(best sufficient-decrease step {lo:.3e})")
            f, g = phi_dphi(a)
            f, g = float(f), float(g)
            evals += 1
            if not _finite(f, g) or not armijo(a, f) or f >= f_lo:
                hi, f_hi, g_hi = a, f, g  # non-finite: NaNs make the next trial a bisection
                continue
            if curvature(g):
                return LineSearchResult(a, f, g, evals, True, "strong Wolfe conditions satisfied")
            if g * (hi - lo) >= 0.0:
                hi, f_hi, g_hi = lo, f_lo, g_lo
            lo, f_lo, g_lo = a, f, g
        return fail(f"max_evals={max_evals} reached in zoom (best sufficient-decrease step {lo:.3e})")

    a_prev, f_prev, g_prev = 0.0, phi0, dphi0
    a = min(float(alpha0), float(alpha_max))
    bad = math.inf  # smallest trial seen with a non-finite value: never step there again
    first = True
    while evals < max_evals:
        f, g = phi_dphi(a)
        f, g = float(f), float(g)
        evals += 1
        if not _finite(f, g):
            # too far: pull back halfway towards the last finite point
            bad = a
            a = a_prev + 0.5 * (a - a_prev)
            if a == a_prev or a == bad:
                return fail("non-finite phi at every trial step")
            continue
        if not armijo(a, f) or (not first and f >= f_prev):
            return zoom(a_prev, f_prev, g_prev, a, f, g)
        if curvature(g):
            return LineSearchResult(a, f, g, evals, True, "strong Wolfe conditions satisfied")
        if g >= 0.0:
            return zoom(a, f, g, a_prev, f_prev, g_prev)
        if a >= alpha_max:
            return fail(f"alpha_max={alpha_max:.3e} reached with phi still decreasing")
        a_prev, f_prev, g_prev = a, f, g
        a = min(expand * a, alpha_max, a + 0.5 * (bad - a))
        if a == a_prev:
            return fail(f"cannot extend the step beyond {a:.3e} (non-finite phi further out)")
        first = False
    return fail(f"max_evals={max_evals} reached while bracketing")
