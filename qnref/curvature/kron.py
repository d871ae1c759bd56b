"""Kronecker-factor statistics for dense and conv layers, damping, inverses and inverse p-th roots.

Everything here works on the raw taps of :meth:`qnref.curvature.objective.Point.layer_stats`
(``{"kind": "dense", "a": ā (N, d_in+1), "g": g (N, d_out)}`` or ``{"kind": "conv",
"a": ā (N, L, K+1), "g": g (N, L, C_out)}``) and on NumPy or CuPy arrays alike (the namespace
of the inputs is used; only ``matmul``, ``eye``, ``trace``, ``linalg.eigh`` / ``inv`` and
elementwise functions that both libraries provide).

Scaling conventions (pinned by ``tests/optim/test_kron.py``)
--------------------------------------------------------------
The taps' gₗ are **per-example** pre-activation gradients gᵢ = ∂ℓᵢ/∂hᵢ (with ℓᵢ the loss of one
example, *not* the mean loss), i.e. N × the gradient of the mean loss f = (1/N) Σ ℓᵢ with respect
to hᵢ. With them:

dense (Martens & Grosse 2015 §3; Ren's thesis eq. (2.3), Algorithm 7 line 9)::

    A = (1/N) Σᵢ āᵢ āᵢᵀ          (d_in+1) × (d_in+1)
    G = (1/N) Σᵢ gᵢ gᵢᵀ          d_out × d_out

conv (KFC, Grosse & Martens 2016; thesis eq. (3.9) and Algorithm 12 line 14), L output locations::

    A = (1/N) Σᵢ Σₜ āᵢₜ āᵢₜᵀ      sum over locations, mean over examples
    G = (1/N) Σᵢ (1/L) Σₜ gᵢₜ gᵢₜᵀ  mean over locations and examples

so that the single-example Fisher block of a conv layer is approximated by
Σₜ āₜāₜᵀ ⊗ (1/L) Σₜ gₜgₜᵀ (thesis (3.6)): the factor L sits in A.

Conversions to other conventions:

* a library whose g is the gradient of the *mean* loss (g/N) and which does not rescale it gets
  G_theirs = G / N²; multiplying its G by N² recovers ours;
* a conv convention that averages A over locations (A/L) must sum G over locations (L·G) for the
  same product; KFAC-PyTorch (Wang et al., used by Zhang et al. 2019) divides the patches by L and
  multiplies the (mean-loss) output gradients by N·L, which gives A/L² and L²·G: a different split
  with the *same* Kronecker product A ⊗ G (only the damping split π changes, see below);
* the thesis writes vec column-major and the block as A ⊗ G; our θ is row-major (below), where the
  same block is G ⊗ A;
* BackPACK (Dangel, Kunstner & Hennig 2020; ``KFAC``/``KFLR`` extensions, ``HBPConvNd``) sums the
  backpropagated gradients of a conv layer over the L locations *before* the outer product:
  G_BackPACK = (1/N) Σᵢ (Σₜ gᵢₜ)(Σₜ gᵢₜ)ᵀ (its "|T|·Γ", the Fisher/GGN block of the bias), with
  A_BackPACK = (1/N) Σᵢ Σₜ xᵢₜxᵢₜᵀ over the K weight inputs (no homogeneous 1; the bias is a
  separate block with the single factor G_BackPACK). That G is *not* a rescaling of ours (the
  cross-location terms gᵢₜgᵢₛᵀ, t ≠ s, enter it): :func:`backpack_conv_factors` computes both from
  our taps. Dense layers agree with ours up to the bias split (A_BackPACK = A[:-1, :-1]).

Type-2 taps (``layer_stats("exact")``, Botev et al. 2017) carry ``"targets": "exact"`` and a class
axis in g after the examples ((N, C, d_out) dense, (N, C, L, C_out) conv): G sums the C outer
products of each example, G = (1/N) Σᵢ Σ_c g_{ic}g_{ic}ᵀ = Eᵢ E_ỹ[gᵢgᵢᵀ] (dense; conv also averages
over locations as above). :func:`factors` handles both kinds of taps.

Layout: Kronecker order and the preconditioned gradient
--------------------------------------------------------
θ stores each block W̄ = [W b] (d_out × (d_in+1)) row by row: vec_r(W̄). The per-example gradient is
gāᵀ and vec_r(u vᵀ) = u ⊗ v, so vec_r(∇W̄ᵢ) = gᵢ ⊗ āᵢ and the Fisher block is
Eᵢ[(gᵢgᵢᵀ) ⊗ (āᵢāᵢᵀ)] ≈ G ⊗ A (KFAC's independence approximation, thesis (2.3)). With the
row-major identity (G ⊗ A) vec_r(X) = vec_r(G X Aᵀ) = vec_r(G X A) (A symmetric; thesis Lemma 8),

    (G ⊗ A)⁻¹ vec_r(∇W̄) = vec_r(G⁻¹ ∇W̄ A⁻¹)            (:func:`precondition`)

and the same with damped factors. For a single example and a single dense layer the
Kronecker-factored Fisher is exact: (g gᵀ) ⊗ (ā āᵀ) = (g ⊗ ā)(g ⊗ ā)ᵀ.

Damping (thesis Algorithm 12 line 19, Martens & Grosse 2015 §6.3 "factored Tikhonov")::

    π = sqrt( (tr A / dim A) / (tr G / dim G) )   = sqrt(tr(A ⊗ I) / tr(I ⊗ G))
    H_A = (A + π √λ I)⁻¹,   H_G = (G + √λ / π I)⁻¹

(the thesis's chapter-2 baseline, Algorithm 7, uses π = 1).

Inverse p-th roots (Shampoo, thesis Algorithm 16 line 12 and §4.7.2): :func:`inv_root_newton`
(coupled Newton iteration of Guo & Higham 2006 as used by Anil et al. 2020, max 100 iterations,
tolerance 1e-6) and :func:`inv_root_eigh` (eigendecomposition; the oracle).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numpy

from .. import backend
from ..host_kernels import kernel, plain_host

__all__ = [
    "dense_factors", "conv_factors", "factors", "ema", "pi_split", "damped_inverses", "precondition",
    "kron_block", "sym", "gram", "from_lower", "spd_inverse", "inv_root_eigh", "inv_root_newton", "mean_a", "mean_g",
    "apply_A", "contraction", "mode_product", "backpack_conv_factors", "mean_g_rounding",
    "factor_A", "factor_sums", "tap_size", "weight_grad",
]


# -- factor statistics ------------------------------------------------------------------------------
def _row_blocks(tap: Any, fn: Callable[[Any, Any], Any], need_a: bool = True, need_g: bool = True) -> list:
    """``fn`` applied to the tap's rows ā (rows, d_a) and g (rows, d_g): one block for array taps,
    one per chunk of examples for taps that stream their rows (``map_row_blocks``: the conv taps
    of :class:`qnref.nn.conv.ConvTap`, which never hold the (N, L, K+1) patches)."""
    stream = getattr(tap, "map_row_blocks", None)
    if stream is not None:
        return stream(fn, need_a, need_g)
    a = tap["a"] if need_a else None
    g = tap["g"] if need_g else None
    return [fn(None if a is None else a.reshape(-1, a.shape[-1]), None if g is None else g.reshape(-1, g.shape[-1]))]


def _summed(parts: list) -> Any:
    """Σ of the per-block results (tuples summed entrywise), in block order."""
    total = parts[0]
    for part in parts[1:]:
        total = tuple(t + q for t, q in zip(total, part)) if isinstance(total, tuple) else total + part
    return total


def tap_size(tap: Any) -> tuple[int, int]:
    """(N, L): examples and output locations of a tap (L = 1 for dense layers)."""
    if hasattr(tap, "map_row_blocks"):
        return int(tap.n), int(tap.locations)
    a = tap["a"]
    return int(a.shape[0]), (int(a.shape[1]) if tap["kind"] == "conv" else 1)


def factor_sums(tap: Any, need_g: bool = True) -> tuple[Any, Any]:
    """(Σ āāᵀ, Σ ggᵀ) over all rows of the tap (examples and locations); ``need_g=False``: (Σ āāᵀ, None)."""
    if need_g:
        return _summed(_row_blocks(tap, lambda a, g: (a.T @ a, g.T @ g)))
    return _summed(_row_blocks(tap, lambda a, g: a.T @ a, need_g=False)), None


def dense_factors(a: Any, g: Any) -> tuple[Any, Any]:
    """A = (1/N) Σ āāᵀ and G = (1/N) Σ ggᵀ from dense taps a (N, d_in+1), g (N, d_out)."""
    return factors({"kind": "dense", "a": a, "g": g})


def conv_factors(a: Any, g: Any) -> tuple[Any, Any]:
    """KFC factors from conv taps a (N, L, K+1), g (N, L, C_out).

    A = (1/N) Σᵢ Σₜ āᵢₜāᵢₜᵀ (sum over the L locations), G = (1/(N L)) Σᵢ Σₜ gᵢₜgᵢₜᵀ (thesis (3.9)).
    """
    return factors({"kind": "conv", "a": a, "g": g})


def factor_A(tap: Any) -> Any:
    """A = (1/N) Σᵢ Σₜ āᵢₜāᵢₜᵀ of a tap alone (the A of :func:`factors`; dense: L = 1)."""
    n, _ = tap_size(tap)
    return factor_sums(tap, need_g=False)[0] / n


def factors(tap: dict) -> tuple[Any, Any]:
    """(A, G) for a tap of either kind (see the module docstring for the reductions).

    A tap that carries its own ``reduced_factors()`` (the data-parallel taps of
    :mod:`qnref.distributed`, whose factors are allreduced over ranks) is asked for them instead.
    Type-2 taps (``"targets": "exact"``) sum G over their class axis (:func:`exact_g`; a data-parallel
    type-2 tap gathers its rows for that, its ``reduced_factors`` knows one set of targets only)."""
    kind = tap.get("kind")
    if is_exact(tap) and kind in ("dense", "conv"):
        return factor_A(tap), exact_g(tap)
    reduced = getattr(tap, "reduced_factors", None)
    if reduced is not None:
        return reduced()
    if kind not in ("dense", "conv"):
        raise ValueError(f"no Kronecker factors for a tap of kind {kind!r}")
    n, L = tap_size(tap)
    sa, sg = factor_sums(tap)
    return sa / n, sg / (n * L)


def is_exact(tap: dict) -> bool:
    """True for the type-2 taps of ``layer_stats("exact")`` (g with a class axis)."""
    return tap.get("targets") == "exact"


def exact_g(tap: dict) -> Any:
    """G = (1/(N L)) Σᵢ Σ_c Σₜ g_{ict}g_{ict}ᵀ of a type-2 tap (L = 1 for dense layers): the exact
    expectation over ỹ of the sampled G (Botev et al. 2017)."""
    g = tap["g"]
    n, L = g.shape[0], (g.shape[2] if g.ndim == 4 else 1)
    g2 = g.reshape(-1, g.shape[-1])
    return (g2.T @ g2) / (n * L)


def backpack_conv_factors(tap: dict) -> tuple[Any, Any]:
    """(A_BackPACK, G_BackPACK) of a conv tap in BackPACK's convention (module docstring):
    A = (1/N) Σᵢ Σₜ xᵢₜxᵢₜᵀ over the K weight inputs (our A without the homogeneous row/column),
    G = (1/N) Σᵢ Σ_c (Σₜ g_{ict})(Σₜ g_{ict})ᵀ — gradients summed over the locations before the outer
    product (c: the class axis of type-2 taps, or the one draw of empirical/sampled taps). BackPACK's
    weight block is G ⊗ A (its weights (C_out, C_in·kh·kw) row-major, channel-major patches like
    ours) and its bias block is G alone."""
    if tap.get("kind") != "conv":
        raise ValueError(f"backpack_conv_factors needs a conv tap, got kind {tap.get('kind')!r}")
    a, g = tap["a"], tap["g"]
    n = a.shape[0]
    x = a[..., :-1].reshape(-1, a.shape[-1] - 1)
    gs = g.sum(axis=-2)                              # Σₜ: (N, C_out) or (N, C, C_out)
    gs = gs.reshape(-1, gs.shape[-1])
    return (x.T @ x) / n, (gs.T @ gs) / n


def locations(tap: dict) -> int:
    """|T|: the number of output locations (1 for dense layers)."""
    return tap_size(tap)[1]


def mean_a(tap: dict) -> Any:
    """â = Eᵢ[(1/L) Σₜ āᵢₜ] (thesis (3.14)); Eᵢ[āᵢ] for dense layers."""
    n, L = tap_size(tap)
    return _summed(_row_blocks(tap, lambda a, g: a.sum(axis=0), need_g=False)) / (n * L)


def mean_g(tap: dict) -> Any:
    """Eᵢ[(1/L) Σₜ gᵢₜ] (thesis (3.13)); Eᵢ[gᵢ] for dense layers."""
    if is_exact(tap):
        raise ValueError("mean_g needs the taps of one set of targets, not the type-2 taps of layer_stats('exact')")
    g = tap["g"]
    return g.mean(axis=0) if g.ndim == 2 else g.mean(axis=(0, 1))


def mean_g_rounding(tap: dict) -> Any:
    """Per component, the rounding-error bound of :func:`mean_g`: ⌈log₂ n⌉ ε Eᵢₜ|gᵢₜ| for the mean of
    n = N·L terms by pairwise summation (Higham 2002, §4.2; NumPy and CuPy sum pairwise or better).

    A difference of two such means below the sum of their bounds is indistinguishable from rounding.
    It is what K-BFGS's y_G of a layer feeding BatchNorm is made of: BatchNorm's backward removes
    the batch mean of the gradients, so ḡ = 0 in exact arithmetic (docs/kbfgs.md)."""
    g = tap["g"]
    xp = backend.namespace(g)
    axes = (0,) if g.ndim == 2 else (0, 1)
    n = g.shape[0] * (1 if g.ndim == 2 else g.shape[1])
    eps = float(xp.finfo(g.dtype).eps)
    return (max(1, math.ceil(math.log2(max(n, 2)))) * eps) * xp.abs(g).mean(axis=axes)


def mean_h(tap: dict, wbar: Any) -> Any:
    """Eᵢ[(1/L) Σₜ hᵢₜ] with hᵢₜ = W̄ āᵢₜ (= W̄ · mean ā, the layer is linear in ā)."""
    return wbar @ mean_a(tap)


def apply_A(tap: dict, s: Any) -> Any:
    """A s with A = Eᵢ[Σₜ āᵢₜāᵢₜᵀ] of the tap, without forming A (thesis (3.15))."""
    return _summed(_row_blocks(tap, lambda a, g: a.T @ (a @ s), need_g=False)) / tap_size(tap)[0]


def weight_grad(tap: dict) -> Any:
    """∂f/∂W̄ = (1/N) Σᵢ Σₜ gᵢₜ āᵢₜᵀ from empirical taps (per-example g of the mean loss)."""
    return _summed(_row_blocks(tap, lambda a, g: g.T @ a)) / tap_size(tap)[0]


def ema(old: Any, new: Any, beta: float) -> Any:
    """Exponential moving average β·old + (1 − β)·new (thesis §2.5.2, Algorithm 12 line 14), a new array.

    For contiguous NumPy float arrays of one dtype and shape (from ``host_kernels.MIN_SIZE`` entries)
    with a Python float β, one numba pass
    (:mod:`qnref.host_kernels`) with the expression's own rounding (β and 1 − β rounded to the
    arrays' dtype, as NumPy does with a Python scalar): 0.36 → 0.16 ms at order 1000 in float32,
    and no two temporaries (issue 21). Anything else runs the expression itself."""
    if type(beta) is float and old.shape == new.shape and plain_host(old, new):
        k = kernel("ema", old.size)
        if k is not None:
            dt = old.dtype.type
            out = numpy.empty_like(old)
            k(old.reshape(-1), new.reshape(-1), dt(beta), dt(1.0 - beta), out.reshape(-1))
            return out
    return beta * old + (1.0 - beta) * new


# -- damping and inverses -----------------------------------------------------------------------------
def sym(M: Any) -> Any:
    return 0.5 * (M + M.T)


def pi_split(A: Any, G: Any) -> float:
    """π = sqrt((tr A / dim A) / (tr G / dim G)) (thesis Algorithm 12 line 19); 1 if undefined."""
    ta = backend.scalar(A.trace()) / A.shape[0]
    tg = backend.scalar(G.trace()) / G.shape[0]
    if not (ta > 0 and tg > 0 and math.isfinite(ta) and math.isfinite(tg)):
        return 1.0
    return math.sqrt(ta / tg)


#: smallest order d for which :func:`spd_inverse` and :func:`sym_eigh` take SciPy's LAPACK routes
#: (Cholesky inverse, ``syevd``): below it NumPy's own routines cost microseconds as well, and a
#: process that never reaches it does not load ``scipy.linalg`` (+28 MB resident: the Kronecker
#: steps of a small autoencoder measured 1.37× an SGD step's peak)
CHOLESKY_MIN_DIM = 128


def _host_lapack(S: Any) -> bool:
    """Whether ``S`` takes SciPy's LAPACK routes: a 2-D float32/float64 host matrix of order at
    least :data:`CHOLESKY_MIN_DIM`, outside ``qnref.nn.conv.KERNELS = "xp"`` (the pure NumPy/CuPy
    paths, as the device runs them)."""
    from ..nn import conv  # noqa: PLC0415 - the package-wide kernel switch

    return (not backend.is_cupy_array(S) and conv.KERNELS != "xp" and S.ndim == 2 and S.shape[-1] >= CHOLESKY_MIN_DIM
            and S.dtype.char in "fd")


def _lapack(*names: str, like: Any) -> tuple:
    """SciPy's LAPACK routines ``names`` for the dtype of ``like``; the first call loads SciPy's
    OpenBLAS, which then gets the short spin of every loaded OpenBLAS (:func:`qnref.nn.chunks.refresh_blas`:
    two libraries' spinning workers on 2 cores slowed a dense net's Kronecker step 1.5×, issue 21)."""
    from scipy.linalg import get_lapack_funcs  # noqa: PLC0415

    from ..nn import chunks  # noqa: PLC0415

    funcs = get_lapack_funcs(names, (like,))
    chunks.refresh_blas()
    return funcs


def spd_inverse(M: Any, *, lower: bool = False) -> Any:
    """Inverse of a symmetric positive-definite matrix: of ½(M + Mᵀ), or with ``lower=True`` of the
    symmetric matrix whose lower triangle M holds (LAPACK's convention: M's strict upper triangle is
    not read). The result is exactly symmetric.

    On the host by its Cholesky factor (LAPACK potrf + potri on the lower triangle, mirrored):
    d³/2 multiplications against the 4d³/3 of an LU inverse, ≈ 4× faster in float32 on OpenBLAS
    (issue 21), from order :data:`CHOLESKY_MIN_DIM` on. A smaller or not numerically
    positive-definite matrix (potrf fails), a CuPy array or another dtype takes the LU inverse, whose
    result callers check; so does everything outside :func:`_host_lapack`.

    ``lower=True`` is for matrices symmetric by construction (a syrk's Σ aaᵀ, averages and diagonal
    shifts of such): it gives the same bits as the default for them and, on the Cholesky route, skips
    the symmetrisation pass that potrf would not read (1.4 of 11.6 ms at order 1000, float32)."""
    xp = backend.namespace(M)
    S = M if lower else sym(M)  # potrf reads the lower triangle only
    H = _cholesky_inverse(S) if _host_lapack(S) else None
    if H is not None:
        return H
    return sym(xp.linalg.inv(from_lower(M) if lower else S))


def from_lower(M: Any) -> Any:
    """The symmetric matrix (a new array) whose lower triangle is that of the square matrix ``M``."""
    if backend.is_cupy_array(M):
        xp = backend.namespace(M)
        return xp.tril(M) + xp.tril(M, -1).T
    return mirror_lower(M.copy())


def _cholesky_inverse(S: Any) -> Any:
    """S⁻¹ by potrf + potri for a float32/float64 host matrix; None when S is not positive definite."""
    potrf, potri = _lapack("potrf", "potri", like=S)
    c, info = potrf(S, lower=True, clean=False)
    if info == 0:
        c, info = potri(c, lower=True, overwrite_c=True)
    if info != 0:
        return None
    return mirror_lower(c)


#: rows per block of :func:`mirror_lower` (a 64-row panel of a float64 order-1000 matrix is 0.5 MB: in L2)
MIRROR_BLOCK = 64


def mirror_lower(c: Any) -> Any:
    """The symmetric matrix whose lower triangle is that of the square host array ``c`` (in place):
    each panel of rows below a diagonal block is copied, transposed, to the columns right of it —
    copies only, so exactly symmetric. Panels keep the transposed reads in cache: 0.96 ms at order
    1000 (float32) against 1.98 ms for ``tril(c)`` mirrored by a whole-matrix transposed add."""
    d = c.shape[0]
    for a in range(0, d, MIRROR_BLOCK):
        e = min(d, a + MIRROR_BLOCK)
        blk = c[a:e, a:e]
        upper = _strict_upper(e - a)
        blk[upper] = blk.T[upper]
        c[a:e, e:] = c[e:, a:e].T
    return c


@functools.lru_cache(maxsize=8)
def _strict_upper(m: int) -> tuple[Any, Any]:
    """``numpy.triu_indices(m, 1)``, formed once per order (read-only): 16 ms of index building per
    TNT step on the MNIST autoencoder at T₂ = 1 otherwise (issue 21)."""
    rows, cols = numpy.triu_indices(m, 1)
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


def add_identity_(M: Any, c: float) -> Any:
    """M ← M + c·I in place (any layout, NumPy or CuPy); returns M. Off the diagonal nothing is
    touched: the bits of ``M + c * eye`` (x + 0 = x) without the identity's two d × d temporaries."""
    xp = backend.namespace(M)
    i = xp.arange(M.shape[0])
    M[i, i] += c
    return M


def plus_identity(M: Any, c: float) -> Any:
    """M + c·I as a new array (:func:`add_identity_` on a copy)."""
    return add_identity_(M.copy(), c)


def damped_inverses(A: Any, G: Any, damping: float, *, use_pi: bool = True) -> tuple[Any, Any, float]:
    """(H_A, H_G, π) = ((A + π√λ I)⁻¹, (G + √λ/π I)⁻¹, π): factored Tikhonov damping."""
    backend.namespace(A, G)  # refuses a host/device mix
    pi = pi_split(A, G) if use_pi else 1.0
    r = math.sqrt(damping)
    # A and G are symmetric by construction (syrks, their averages, a diagonal shift): lower=True
    HA = spd_inverse(plus_identity(A, pi * r), lower=True)
    HG = spd_inverse(plus_identity(G, r / pi), lower=True)
    return HA, HG, pi


def precondition(grad_block: Any, HG: Any, HA: Any) -> Any:
    """H_G ∇W̄ H_A = vec_r⁻¹((G ⊗ A)⁻¹ vec_r(∇W̄)) for H_G = G⁻¹, H_A = A⁻¹ (row-major layout)."""
    return HG @ grad_block @ HA


def kron_block(G: Any, A: Any) -> Any:
    """The explicit Fisher block G ⊗ A in our row-major layout (small layers, tests)."""
    xp = backend.namespace(G, A)
    return xp.kron(G, A)


# -- inverse p-th roots -------------------------------------------------------------------------------
def sym_eigh(S: Any) -> tuple[Any, Any]:
    """(w, V), ascending eigenvalues and orthonormal eigenvectors of the symmetric ``S`` (read from
    its lower triangle), as ``xp.linalg.eigh``.

    Under :func:`_host_lapack` (host, order ≥ :data:`CHOLESKY_MIN_DIM`) by SciPy's LAPACK ``syevd``
    (divide and conquer, NumPy's algorithm): NumPy's float32 ``eigh`` measured 158 / 29 / 6.2 ms at
    order 1000 / 500 / 250 against 97 / 21 / 5.3 ms for SciPy's on a 2-core AMD EPYC (Zen 4, OpenBLAS
    0.3.31 and 0.3.30), the same in float64 (issue 21). There a non-finite ``S`` raises
    ``numpy.linalg.LinAlgError`` (LAPACK is not handed NaN); NumPy's route raises or returns NaN."""
    xp = backend.namespace(S)
    if not _host_lapack(S):
        return xp.linalg.eigh(S)
    if not backend.all_finite(S):
        raise xp.linalg.LinAlgError("sym_eigh: the matrix has non-finite entries")
    (syevd,) = _lapack("syevd", like=S)
    w, V, info = syevd(S.T, compute_v=1, lower=0)  # Sᵀ: Fortran order, no copy in; its upper is S's lower
    if info != 0:
        raise xp.linalg.LinAlgError(f"sym_eigh: LAPACK syevd did not converge (info = {info})")
    return w, V


def gram(U: Any) -> Any:
    """U Uᵀ, exactly symmetric. On the host NumPy's ``U @ U.T`` is one BLAS syrk (half a GEMM's
    multiplications), which computes one triangle and mirrors it; CuPy's is a GEMM, symmetrised."""
    G = U @ U.T
    return G if not backend.is_cupy_array(G) else sym(G)


def tap_gram(a: Any, g: Any) -> Any:
    """[∇_{W̄}ℓᵢᵀ ∇_{W̄}ℓⱼ] = (ĀĀᵀ) ⊙ (ΓΓᵀ) for a dense layer's per-example taps ā (N, a) and
    γ (N, o), since ∇_{W̄}ℓᵢ = γᵢāᵢᵀ: the layer's term of the Kronecker trick (Ren thesis Alg. 22),
    N²(a + o) multiplications instead of N²·o·a. Exactly symmetric (two :func:`gram` products)."""
    return gram(a) * gram(g)


def inv_root_eigh(M: Any, p: float, eps: float = 0.0) -> Any:
    """(M + εI)^(−1/p) by eigendecomposition (eigenvalues clamped at 0 before adding ε), formed as
    :func:`gram` of V D^½ with D = (w + ε)^(−1/p): at order 1000 (float32, 2-core Zen 4) the syrk took
    6.2 ms against 10.4 ms for V D Vᵀ as a GEMM, and needs no symmetrisation (issue 21)."""
    xp = backend.namespace(M)
    try:
        w, V = sym_eigh(sym(M))
    except xp.linalg.LinAlgError:  # NumPy refuses a non-finite M ("did not converge"); CuPy returns NaN
        # a NaN root makes the step non-finite, which the driver rejects and reports (no host sync here)
        return xp.full_like(M, float("nan"))
    w = xp.maximum(w, 0.0) + eps
    return gram(V * w ** (-0.5 / p))  # (V D^½)(V D^½)ᵀ with D = w^(−1/p): a syrk, not a GEMM and a sym


def inv_root_newton(M: Any, p: int, eps: float = 0.0, *, max_iter: int = 100, tol: float = 1e-6) -> tuple[Any, int, float]:
    """(M + εI)^(−1/p) by the coupled Newton iteration (Guo & Higham 2006; Anil et al. 2020).

    With z = (1 + p) / (2 ‖M‖_F), M₀ = z M, H₀ = z^{1/p} I and
    Tₖ = ((p + 1) I − Mₖ) / p:  Hₖ₊₁ = Hₖ Tₖ, Mₖ₊₁ = Tₖᵖ Mₖ. Invariant Mₖ = Hₖᵖ M, so Mₖ → I gives
    Hₖ → M^(−1/p). Stops when max|Mₖ − I| ≤ ``tol`` (thesis §4.7.2: 100 iterations, 1e-6), or when
    the error grows (float round-off; the previous iterate is kept). The Frobenius norm bounds the
    spectral norm, so every eigenvalue of M₀ lies in (0, (p+1)/2] (convergence region (0, p+1)).
    Returns (root, iterations, final error).
    """
    if int(p) != p or p < 1:
        raise ValueError(f"p must be a positive integer, got {p!r}")
    p = int(p)
    xp = backend.namespace(M)
    n = M.shape[0]
    eye = xp.eye(n, dtype=M.dtype)
    Mm = sym(M) + eps * eye
    nrm = backend.scalar(xp.sqrt((Mm * Mm).sum()))
    if not (nrm > 0 and math.isfinite(nrm)):
        raise ValueError("inv_root_newton needs a finite, nonzero positive semi-definite matrix")
    z = (1.0 + p) / (2.0 * nrm)
    Mk = Mm * z
    Hk = eye * z ** (1.0 / p)
    err = backend.scalar(xp.abs(Mk - eye).max())
    it = 0
    while it < max_iter and err > tol:
        T = ((p + 1.0) * eye - Mk) / p
        Tp = T
        for _ in range(p - 1):
            Tp = Tp @ T
        M_new = Tp @ Mk
        H_new = Hk @ T
        new_err = backend.scalar(xp.abs(M_new - eye).max())
        it += 1
        if not math.isfinite(new_err) or new_err > 1.2 * err:
            break
        Mk, Hk, err = M_new, H_new, new_err
    return sym(Hk), it, err


# -- tensor contractions (Shampoo, TNT) ------------------------------------------------------------------
def contraction(X: Any, i: int) -> Any:
    """X⁽ⁱ⁾ = mat_i(X) mat_i(X)ᵀ: contraction of X with itself along all but mode i (thesis §4.2.1),
    as :func:`gram` of mat_i(X): one syrk on the host (the bits of ``mat_i(X) @ mat_i(X).T``), a GEMM
    symmetrised on CuPy, whose GEMM does not give an exactly symmetric product."""
    if X.ndim == 2:  # a weight matrix: X itself or its transposed view, no copy
        return gram(X if i == 0 else X.T)
    if X.ndim == 1:  # a bias: mat_0(x) is the column x itself (the general route's product, no moveaxis)
        return gram(X.reshape(-1, 1))
    xp = backend.namespace(X)
    return gram(xp.moveaxis(X, i, 0).reshape(X.shape[i], -1))


def mode_product(X: Any, U: Any, i: int) -> Any:
    """X ×ᵢ U: (X ×ᵢ U)_{…j'…} = Σⱼ X_{…j…} U_{j'j} (thesis §4.2.1)."""
    if X.ndim == 2:  # a weight matrix: U X or X Uᵀ, one GEMM with a contiguous result
        return U @ X if i == 0 else X @ U.T
    xp = backend.namespace(X, U)
    if X.ndim == 1:  # a bias: the product tensordot forms, U · (x as a column), without its axis bookkeeping
        return xp.dot(U, X.reshape(-1, 1)).reshape(-1)
    Y = xp.tensordot(U, X, axes=([1], [i]))
    return xp.moveaxis(Y, 0, i)
