"""Per-step cost of each optimizer's *own algebra* (issue 10: "flops of the optimizer's own algebra").

The optimizer's own algebra is the arithmetic a step does on top of the objective's passes
(forward, backward, R-op / Gauss-Newton products, per-example Gram matrices, layer taps): vector
updates, two-loop recursions, compact-form products, small dense factorizations, Kronecker factor
statistics, inverses and inverse roots, preconditioning GEMMs, SMW solves, CG vector operations.

:func:`algebra_flops` returns ``{"per_step": int, "terms": {name: int}}`` for every registered
optimizer. The formulas were derived by reading each implementation in :mod:`qnref.optim` (not
the papers), operation by operation, so that they count what the code does.

Counting convention
-------------------
**Multiplications**, a multiply-add counting once (the convention of :func:`.compact.flop_count`,
Nocedal & Wright §7.2 and Ramamurthy & Duffy §3; IEEE flops ≈ 2 × these numbers):

* an elementwise ``*`` or ``/`` on arrays of k elements (after broadcasting) counts k, scalar
  operations on Python floats / 0-d results count 0; ``+``, ``−``, negation, ``sqrt``, ``abs``,
  comparisons, sums, copies, concatenations count 0 (``mean`` counts its division);
* a product ``A @ B`` of (m × k)(k × p) counts m·k·p, so a dot product of length n counts n;
* dense LAPACK routines (never counted elementwise; the nominal multiplication counts below are
  the textbook leading terms, hence *approximate*): ``inv`` d³, ``solve`` d³/3 + d²·(right-hand
  sides), ``eigvalsh`` 2d³/3 (tridiagonal reduction), ``eigh`` with vectors 3d³, ``svd`` of a
  small square matrix 6d³, Householder QR with Q of an n × k matrix 2nk² − 2k³/3 (inside
  :func:`.compact.flop_count` ``"lsr1_subproblem"``).

Terms that run every T steps are divided by T (``/T₁`` statistics, ``/T₂`` inverses and roots,
``/L`` SQN windows); each term is rounded to an integer separately.

Data-dependent counts (nominal assumptions, keyword arguments of :func:`algebra_flops`)
-----------------------------------------------------------------------------------------
* ``pairs``: curvature pairs in memory — default the memory size (steady state, memory full);
* ``trials``: line-search trial points per step — default 1 (the first trial accepted);
* ``cg_iters``: CG iterations of Hessian-free — default 10 (the thesis's runs stop after tens;
  the cap ``max_cg_iters`` is 250);
* ``root_iters``: coupled-Newton iterations of a Shampoo inverse root — default the cap
  ``newton_iters`` (100): an **upper bound**;
* SR1 pair tests accept, no restart, no hard case in the trust-region solve; damping of K-BFGS
  inactive (Powell's branch not taken); hybrid directions of MB-LSR1 not clipped (only the norm).

Counted as objective passes, hence excluded here: f/∇f, Hv, Gv, Jv, Jᵀv, per-example Gram matrices
(SMW), layer taps (activations ā and pre-activation gradients g), the loss's dz (sampled targets).
Included although a pass might own it: ∇W̄ = gᵀā/N formed from taps by K-BFGS
(``grad_from_taps``), the sampled-gradient scaling dz/N of TNT, and the output-Hessian diagonal
of SMW-GN (≈ 2NC, sigmoid/mse losses).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from .operators import operator_flops as flop_count

__all__ = ["algebra_flops", "FORMULAS", "model_shapes"]


# -- LAPACK nominal costs (multiplications) --------------------------------------------------------
def _inv(d: int) -> float:
    return d ** 3


def _solve(d: int, rhs: int) -> float:
    return d ** 3 / 3 + d * d * rhs


def _eigvalsh(d: int) -> float:
    return 2 * d ** 3 / 3


def _eigh(d: int) -> float:
    return 3 * d ** 3


# -- model description ------------------------------------------------------------------------------
def model_shapes(layout_or_model: Any) -> dict:
    """{"n": parameters, "layers": [(d_out, d_in + 1)] of the Kronecker (dense) blocks,
    "others": [sizes of the other blocks], "out": output dimension C}.

    A :class:`~qnref.nn.model.Sequential` gives the exact Kronecker structure (conv layers
    included, through :func:`._kron_common.kron_structure`); a bare
    :class:`~qnref.params.ParamLayout` is read as dense layers: every 2-D block named ``*.W``.
    """
    layout = getattr(layout_or_model, "layout", layout_or_model)
    blocks = list(layout.blocks)
    n = int(layout.size)
    if hasattr(layout_or_model, "kron_layers"):
        from ._kron_common import kron_structure  # noqa: PLC0415

        layers, others = kron_structure(layout_or_model)
        lay = [(int(L.shape[0]), int(L.shape[1])) for L in layers]
        wshapes = [tuple(int(s) for s in L.w_shape) for L in layers]
        oth = [int(math.prod(blocks[k].shape)) for k in others]
    else:
        lay, wshapes, oth = [], [], []
        for b in blocks:
            shp = tuple(int(s) for s in b.shape)
            if len(shp) == 2 and str(b.name).endswith(".W"):
                lay.append(shp)
                wshapes.append((shp[0], shp[1] - 1))
            else:
                oth.append(int(math.prod(shp)))
    out = lay[-1][0] if lay else n
    return {"n": n, "layers": lay, "w_shapes": wshapes, "others": oth, "out": out}


# -- shared pieces ---------------------------------------------------------------------------------
def _two_loop(n: int, k: int, gamma_given: bool = False) -> dict:
    """compact.lbfgs_two_loop: flop_count's 4kn + n, plus ρ = 1/Σ S⊙Y (kn + k) and γ (2n)."""
    if k == 0:
        return {}
    t = {"two_loop": flop_count("lbfgs_two_loop", n, k), "two_loop_rho": k * n + k}
    if not gamma_given:
        t["two_loop_gamma"] = 2 * n
    return t


def _lsr1_form(n: int, k: int) -> float:
    """LSR1Compact(S, Y, γ): flop_count("lsr1_form") (Ψ, SᵀY, SᵀS, solve as k³) + γSᵀS and
    the symmetrisation (2k²) + rcond (eigvalsh) + the solve's LU (k³/3)."""
    if k == 0:
        return 0
    return flop_count("lsr1_form", n, k) + 2 * k * k + _eigvalsh(k) + k ** 3 / 3


def _svd(d: int) -> float:
    return 6 * d ** 3


def _qr(n: int, k: int) -> float:
    return 2 * n * k * k - 2 * k ** 3 / 3


def _lsr1_subproblem(n: int, k: int) -> float:
    """trust_region.solve_lsr1_subproblem, generic case (rank k, no hard case), read from the code:
    QR of Ψ, SVD of R, Rr, M symmetrised, Rr M Rrᵀ (2k³), eigh, Pk = U V (k³), g_∥ (nk + k²),
    g_⊥ (k² + nk), ‖g_⊥‖ (n), p = Q Pk c (k² + nk) + (c/a) g_⊥ (n), Bp = γp + Ψ M Ψᵀ p
    (n + 2nk + k²), pred (2n), ‖p‖ (n): 2k²n + (5k + 6)n + O(k³).
    (:func:`.compact.flop_count` ``"lsr1_subproblem"``, 2k²n + (5k + 2)n + 3k³, is the same
    leading term with a cruder small-matrix part.)"""
    if k == 0:  # g_⊥ = g: ‖g‖, p = (c/a) g, Bp = γp, pred, ‖p‖
        return 6 * n
    return (_qr(n, k) + _svd(k) + 2 * k * k + 2 * k ** 3 + _eigh(k) + k ** 3
            + 5 * n * k + 4 * k * k + 6 * n)


def _lsr1_prune(n: int, k: int, inverse: bool) -> float:
    """lsr1_prune_count with the newest memory accepted at d = 0."""
    if k == 0:
        return 0
    if inverse:  # SᵀY, YᵀY, /γ, rcond
        return 2 * k * k * n + k * k + _eigvalsh(k)
    # Ψ (kn), ΨΨᵀ (k²n), rcond, SᵀY, SᵀS (2k²n), γSᵀS (k²), rcond
    return k * n + 3 * k * k * n + k * k + 2 * _eigvalsh(k)


def _lsr1_inverse_setup(n: int, k: int) -> float:
    """LSR1Compact.solve's first call: YᵀY (k²n), /γ (k²), rcond, solve(N, I) and symmetrisation."""
    return k * k * n + k * k + _eigvalsh(k) + _solve(k, k) + k * k


def _lsr1_solve(n: int, k: int) -> float:
    """H v = v/γ + Ψᵀ N⁻¹ Ψ v / γ² with N⁻¹ cached: (2k + 2)n + k²."""
    return (2 * k + 2) * n + k * k if k else n


def _lsr1_matvec(n: int, k: int) -> float:
    return flop_count("lsr1_matvec", n, k) if k else n


def _kron_precondition(layers) -> float:
    """H_G ∇W̄ H_A per dense block (o × a): o²a + oa²."""
    return sum(o * o * a + o * a * a for o, a in layers)


def _tensor_parts(sh: dict) -> list[tuple]:
    """Shapes of Shampoo/TNT tensor variables: W (o, d_in) and b (o,) per layer, other blocks."""
    parts = []
    for w in sh["w_shapes"]:
        parts.append(tuple(w))
        parts.append((w[0],))
    parts += [(s,) for s in sh["others"]]
    return parts


def _contractions(parts) -> float:
    """Ĝ⁽ⁱ⁾ = mat_i(X) mat_i(X)ᵀ for every mode: dᵢ² · Π_{j≠i} dⱼ each."""
    tot = 0
    for shp in parts:
        size = math.prod(shp)
        tot += sum(d * size for d in shp)
    return tot


def _ema_sq(parts) -> float:
    """β·old + (1 − β)·new on every dᵢ × dᵢ statistic: 2dᵢ²."""
    return sum(2 * d * d for shp in parts for d in shp)


def _mode_products(parts) -> float:
    """ĝ ×₁ U₁ ⋯ ×ₖ Uₖ: dᵢ² · Π_{j≠i} dⱼ per mode (same count as the contractions)."""
    return _contractions(parts)


# -- the formulas ----------------------------------------------------------------------------------
def _sgd(opt, sh, N, a):
    return {"update": sh["n"], "step_norm": sh["n"]}


def _momentum(opt, sh, N, a):
    n = sh["n"]
    t = {"velocity": 2 * n, "step_norm": n}
    if getattr(opt, "_lookahead", False):
        t["lookahead_point"] = n
    return t


def _diag_adaptive(opt, sh, N, a):
    n = sh["n"]
    b1 = getattr(opt, "beta1", 0.0)
    t = {}
    if b1:
        t["first_moment"] = 2 * n
    t["second_moment"] = 3 * n
    if getattr(opt, "_bias_correction", False):
        t["bias_correction"] = (2 if b1 else 1) * n
    t["scaled_step"] = 2 * n
    t["step_norm"] = n
    return t


def _adadelta(opt, sh, N, a):
    n = sh["n"]
    return {"accumulators": 6 * n, "ratio_step": 2 * n, "lr_scale": n, "step_norm": n}


def _svrg(opt, sh, N, a):
    n = sh["n"]
    return {"update": n, "step_norm": n}


def _gd_ls(opt, sh, N, a):
    n, t = sh["n"], a["trials"]
    return {"grad_norm": n, "line_search": t * n, "update": n}


def _lbfgs(opt, sh, N, a):
    n, t = sh["n"], a["trials"]
    k = a["pairs"] if a["pairs"] is not None else opt.memory
    if opt.forget_every is not None and a["pairs"] is None:
        k = min(k, max(0, (opt.forget_every - 1) // 2))  # mean memory over a forgetting cycle (approx.)
    terms = {"grad_norm": n}
    terms.update(_two_loop(n, k))
    terms.update({"slope": n, "line_search": 2 * t * n, "pair": 3 * n})
    return terms


def _lsr1_tr(opt, sh, N, a):
    n = sh["n"]
    k = a["pairs"] if a["pairs"] is not None else opt.memory
    if getattr(opt, "gram_cache", False):
        return _lsr1_tr_cached(opt, n, k)
    t = {"grad_norm": n, "compact_form": _lsr1_form(n, k)}
    if opt.solver == "exact":
        t["tr_subproblem"] = _lsr1_subproblem(n, k)
    else:  # Steihaug-CG: about 10 CG iterations of B·d (approximate)
        t["tr_subproblem"] = 10 * (_lsr1_matvec(n, k) + 6 * n)
    t.update({"step_norm": n, "Bs": _lsr1_matvec(n, k), "sr1_test": 3 * n,
              "prune": _lsr1_prune(n, min(k + 1, opt.memory), inverse=False)})
    return t


def _psi_products(n: int, k: int, count: int) -> float:
    """``count`` products Ψᵀv = Yv − γ(Sv) or Ψc = Yᵀc − Sᵀ(γc) with Ψ not stored: 2kn + k each."""
    return count * (2 * k * n + k)


def _lsr1_tr_cached(opt, n, k):
    """``LSR1TrustRegion(gram_cache=True)`` (the default), generic step: no Gram fallback (QR
    route, ``extra["gram_fallback"]``), no hard case, Ψ of full rank, the newest memory kept.

    Compact form from the cached Grams: γSS and the symmetrisation of M (2k²), rcond of M⁻¹
    (eigvalsh), M = solve(M⁻¹, I); ΨᵀΨ from the Grams (3k²) and its rcond (eigvalsh).
    Gram solver (:func:`.trust_region.solve_lsr1_subproblem_gram`): five Ψ products (Ψᵀg, Ψ for
    g_⊥, Ψ for p, Ψᵀp and Ψ(MΨᵀp) of Bp; 2kn + k each), ‖g_⊥‖, (c/a)g_⊥, γp, pred (2n), ‖p‖:
    10kn + 6n; small: eigh of ΨᵀΨ and of R_rMR_rᵀ (2 × 3k³), R_rMR_rᵀ (2k³), T = W_rΣ_r⁻¹V
    (k³ + k²), the symmetrisations and R_r (3k²); T·, Tᵀ· (3k²) and M· (k²) of the products.
    Then ‖s‖ (n), the SR1 test (3n; Bs = the solver's Bp), the Gram border S s, Y s, S y, Y y
    (4k'n with k' = k, or m − 1 when the memory is full and the oldest pair is dropped first) and
    sᵀy, sᵀs, yᵀy (3n), the pruning test on the Grams (no n-work), ‖g‖ (n).

    Per step: (14k + 14)n + O(k³) while k < m pairs are stored, **(14m + 10)n + O(m³)** in the
    steady state (memory full) — linear in m, against (7m² + 9m + 12)n for the QR route.
    ``solver="steihaug"``: the compact form from the Grams, Ψ formed once (kn), about 10 CG
    iterations of B·d (approximate) and B s by one more product."""
    m = opt.memory
    k1 = min(k + 1, m)
    kb = k if k < m else m - 1  # rows the new pair is bordered with
    t = {"grad_norm": n}
    if k:
        t["compact_form"] = _eigvalsh(k) + _solve(k, k) + 2 * k * k
    if opt.solver == "steihaug":  # Ψ formed once (kn), then B·d = (2k + 1)n + k² per product
        if k:
            t["form_psi"] = k * n
        t.update({"tr_subproblem": 10 * (_lsr1_matvec(n, k) + 6 * n), "Bs": _lsr1_matvec(n, k)})
    elif k:
        t.update({"gram_rcond": 3 * k * k + _eigvalsh(k),
                  "tr_subproblem": _psi_products(n, k, 5) + 6 * n + 4 * k * k,
                  "tr_subproblem_small": 2 * _eigh(k) + 3 * k ** 3 + 4 * k * k})
    else:  # no pairs: g_⊥ = g, B = γI (the QR solver's empty case), B s = γs
        t.update({"tr_subproblem": 6 * n, "Bs": n})
    t.update({"step_norm": n, "sr1_test": 3 * n, "gram_update": 4 * kb * n + 3 * n,
              "prune": 2 * _eigvalsh(k1) + 4 * k1 * k1})
    return t


def _lsr1_ls(opt, sh, N, a):
    n, tr = sh["n"], a["trials"]
    k = a["pairs"] if a["pairs"] is not None else opt.memory
    t = {"grad_norm": n, "compact_form": _lsr1_form(n, k)}
    if k:
        t["inverse_middle"] = _lsr1_inverse_setup(n, k)
    t.update({"Hg": _lsr1_solve(n, k), "slope": n, "line_search": tr * n, "pair": n,
              "Hy": _lsr1_solve(n, k), "sr1_test": 3 * n, "prune": _lsr1_prune(n, min(k + 1, opt.memory), inverse=True),
              "step_norm": n})
    return t


def _sampled_lbfgs(opt, sh, N, a):
    n, tr, m = sh["n"], a["trials"], opt.memory
    k = a["pairs"] if a["pairs"] is not None else m
    t = {"grad_norm": n, "sample_directions": m * n,
         "pair_filter": (3 if opt.lbfgs_test == "cosine" else 2) * m * n}
    if k:
        t["gamma"] = 2 * n
        t.update(_two_loop(n, k, gamma_given=True))
    t.update({"slope": n, "line_search": tr * n, "step": 2 * n})
    return t


def _sampled_lsr1(opt, sh, N, a):
    n, m = sh["n"], opt.memory
    k = a["pairs"] if a["pairs"] is not None else m
    # lsr1_pair_filter: candidate i tests B s with the j pairs kept so far, then re-forms the
    # compact matrix with j + 1 pairs (all candidates kept: j = 0 … k − 1)
    filt = sum(n + (2 * j * n + j * j if j else 0) + 3 * n + _lsr1_form(n, j + 1) for j in range(k))
    return {"grad_norm": n, "sample_directions": m * n, "pair_filter": filt,
            "compact_form": _lsr1_form(n, k),
            "tr_subproblem": _lsr1_subproblem(n, k)}


def _mb_lsr1(opt, sh, N, a):
    n, tr = sh["n"], a["trials"]
    k = a["pairs"] if a["pairs"] is not None else opt.memory
    return {"grad_norm": n, "compact_form": _lsr1_form(n, k),
            "tr_subproblem": _lsr1_subproblem(n, k),
            "hybrid_direction": 8 * n, "direction_checks": 2 * n, "line_search": tr * n,
            "step": 2 * n, "store_compact_form": _lsr1_form(n, k), "Bs": _lsr1_matvec(n, k),
            "sr1_test": 3 * n, "prune": _lsr1_prune(n, min(k + 1, opt.memory), inverse=False)}


def _sqn(opt, sh, N, a):
    n, tr, L = sh["n"], a["trials"], opt.L
    k = a["pairs"] if a["pairs"] is not None else opt.memory
    t = dict(_two_loop(n, k))
    t["slope"] = n
    if opt.step_rule == "armijo":
        t["line_search"] = tr * n
    t.update({"update": 2 * n, "window": 4 * n / L})
    return t


def _hf(opt, sh, N, a):
    n, I = sh["n"], a["cg_iters"]
    t = {"cg_setup": 6 * n, "cg_iterations": 6 * n * I, "step": 3 * n}
    if opt.preconditioner == "martens":
        t["cg_preconditioner"] = n * (I + 1)  # r / M per iteration (building M: a pass, excluded)
    return t


def _smw(opt, sh, N, a):
    n = sh["n"]
    N2 = min(opt.curvature_batch, opt.batch_size)
    C = sh["out"]
    t = {}
    if opt.curvature == "ng":
        t.update({"jacobian_dot": N2 * C, "gram_scale": 2 * N2 * N2, "solve": _solve(N2, 1),
                  "weights": N2 + N2 * C, "direction": n, "model": 2 * n + N2})
    else:
        NC = N2 * C
        if opt.form == "5.6":
            t.update({"output_hessian": 3 * NC, "rhs": NC, "scaled_gram": 4 * NC * NC,
                      "solve": _solve(NC, 1), "weights": 2 * NC, "direction": n, "model": 2 * n + NC})
        else:  # 5.7 / 5.6-inv (approximate: same leading terms)
            t.update({"output_hessian": 2 * NC, "scaled_gram": 3 * NC * NC, "solve": _solve(NC, 1),
                      "weights": 3 * NC, "direction": n, "model": 2 * n + 2 * NC})
    t["trial_and_step"] = 3 * n
    return t


def _kfac(opt, sh, N, a):
    n, lay = sh["n"], sh["layers"]
    T1, T2 = opt.stat_freq, opt.inv_freq
    t = {"momentum": n, "precondition": _kron_precondition(lay), "step": 2 * n + (n if opt.weight_decay else 0),
         "factor_statistics": sum((N + 1) * (d_in * d_in + o * o) for o, d_in in lay) / T1,
         "factor_ema": sum(2 * (d_in * d_in + o * o) for o, d_in in lay) / T1,
         "inverses": sum(_inv(d) + 3 * d * d for o, d_in in lay for d in (o, d_in)) / T2}
    return t


def _lbfgs_apply(o: int, p: int, c: int) -> float:
    """_kron_common.lbfgs_apply on an o × c block with p pairs (H₀ = γI)."""
    if p == 0:
        return o * c
    return (2 * p * p * o + _inv(p) + p * p + 2 * p ** 3 + o * p
            + 2 * p * o * c + 4 * p * p * c + 2 * p * o * c + o * c)


def _bfgs_inverse_update(d: int) -> float:
    """_kron_common.bfgs_inverse_update: H y (d²), six d² elementwise products, two dots."""
    return 7 * d * d + 2 * d


def _kbfgs(opt, sh, N, a):
    n, lay, T = sh["n"], sh["layers"], opt.curvature_freq
    limited = opt.memory is not None
    p = a["pairs"] if a["pairs"] is not None else (opt.memory or 0)
    t = {"grad_from_taps": sum((N + 1) * o * d_in for o, d_in in lay) if not sh["others"] else 0,
         "momentum": n if opt.version == "ch3" else 2 * n, "scale": n, "step": 2 * n}
    if limited:
        t["precondition"] = sum(o * d_in * d_in + _lbfgs_apply(o, p, d_in) for o, d_in in lay)
    else:
        t["precondition"] = _kron_precondition(lay)
    upd_a = 0.0
    upd_g = 0.0
    for o, d_in in lay:
        # H_A: â (mean), H_A â, ã-action (2N d_in + d_in) or moving average (ch2), λ_A s_A, s_Aᵀy_A, BFGS
        if opt.version == "ch3":
            ya = 2 * N * d_in + d_in
        else:
            ya = N * d_in * d_in + d_in * d_in + 2 * d_in * d_in + d_in * d_in
        upd_a += d_in + d_in * d_in + ya + d_in + d_in + _bfgs_inverse_update(d_in)
        # H_G: h̄ at both points (2 means + 2 GEMVs), ḡ means, EMAs of s_G, y_G, H_G y, damping, update
        hy = _lbfgs_apply(o, p, 1) if limited else o * o
        upd_g += 2 * d_in + 2 * o * d_in + 2 * o + 4 * o + hy + 3 * o + o
        if not limited:
            upd_g += _bfgs_inverse_update(o)
    t["HA_update"] = upd_a / T
    t["HG_update"] = upd_g / T
    return t


def _tensor(opt, sh, N, a, kind):
    n = sh["n"]
    parts = _tensor_parts(sh)
    T1, T2 = opt.stat_freq, opt.inv_freq
    t = {"momentum": n, "statistics": _contractions(parts) / T1, "statistics_ema": _ema_sq(parts) / T1}
    if kind == "tnt" and opt.fisher == "sampled":
        t["sampled_grad_scale"] = N * sh["out"] / T1
    roots = 0.0
    for shp in parts:
        k = len(shp)
        for d in shp:
            if kind == "tnt":
                roots += _inv(d) + 4 * d * d
            elif opt.root == "eigh":
                roots += _eigh(d) + d ** 3 + 2 * d * d
            else:
                I = a["root_iters"] if a["root_iters"] is not None else opt.newton_iters
                roots += 6 * d * d + I * ((2 * k + 1) * d ** 3 + 2 * d * d)
    t["roots" if kind == "shampoo" else "inverses"] = roots / T2
    t["precondition"] = _mode_products(parts)
    t["step"] = 2 * n + (n if opt.weight_decay else 0)
    return t


#: registry name → (function(opt, shapes, batch, assumptions) → terms, formula in words)
FORMULAS: dict[str, tuple[Callable, str]] = {
    "sgd": (_sgd, "2n"),
    "momentum": (_momentum, "3n"),
    "nag": (_momentum, "4n"),
    "adam": (_diag_adaptive, "10n"),
    "rmsprop": (_diag_adaptive, "6n (8n with β₁ > 0)"),
    "adagrad": (_diag_adaptive, "6n"),
    "adadelta": (_adadelta, "10n"),
    "svrg": (_svrg, "2n"),
    "gd-ls": (_gd_ls, "(2 + t)n"),
    "lbfgs": (_lbfgs, "(5m + 8 + 2t)n + m"),
    "lsr1-tr": (_lsr1_tr, "(14m + 10)n + O(m³) (default gram_cache=True; (14k + 14)n while k < m pairs); "
                          "gram_cache=False: (7m² + 9m + 12)n + O(m³)"),
    "lsr1-ls": (_lsr1_ls, "(5m² + 5m + 11 + t)n + O(m³)"),
    "s-lbfgs": (_sampled_lbfgs, "(8m + 7 + t)n + m"),
    "s-lsr1": (_sampled_lsr1, "(2m³/3 + O(m²))n + O(m⁴): compact form re-formed per kept pair"),
    "mb-lsr1": (_mb_lsr1, "(9m² + 10m + 23 + t)n + O(m³)"),
    "lssr1-tr": (_mb_lsr1, "as mb-lsr1"),
    "sqn": (_sqn, "(5m + 6 + t + 4/L)n + m"),
    "hf": (_hf, "6n·I_CG + 9n"),
    "smw-gn": (_smw, "4(N₂C)² + (N₂C)³/3 + 6n + O(N₂C)"),
    "smw-ng": (_smw, "2N₂² + N₂³/3 + 6n + O(N₂C)"),
    "kfac": (_kfac, "Σ o a(o + a) + Σ (N+3)(a² + o²)/T₁ + Σ (a³ + o³ + 3a² + 3o²)/T₂ + 4n"),
    "kbfgs": (_kbfgs, "Σ o a(o + a) + Σ[(N+1)oa + 2Na + 8a² + 8o² + 2oa + …]/T + 4n"),
    "kbfgs-l": (_kbfgs, "Σ[o a² + 4p o a + 4p² a] + L-BFGS setup O(p²o + p³) per product + …"),
    "shampoo": (lambda o, s, N, a: _tensor(o, s, N, a, "shampoo"),
                "Σ_parts Σᵢ dᵢ²Πⱼ≠ᵢdⱼ (×2: statistics/T₁ + preconditioning) + I_root Σ (2k+1)dᵢ³/T₂ + 4n"),
    "tnt": (lambda o, s, N, a: _tensor(o, s, N, a, "tnt"),
            "Σ_parts Σᵢ dᵢ²Πⱼ≠ᵢdⱼ (×2) + Σ (dᵢ³ + 4dᵢ²)/T₂ + NC/T₁ + 4n"),
}


def algebra_flops(opt: Any, layout_or_model: Any, batch_size: int | None = None, *,
                  trials: int = 1, pairs: int | None = None, cg_iters: int = 10,
                  root_iters: int | None = None) -> dict:
    """Multiplications of one step of ``opt``'s own algebra (see the module docstring).

    ``opt``: an optimizer instance or a registry name (paper defaults). ``layout_or_model``: a
    :class:`~qnref.nn.model.Sequential` (needed for conv nets) or a ParamLayout. ``batch_size``:
    the examples per step (default: ``opt.batch_size``; it matters for KFAC / K-BFGS / TNT factor
    statistics only). The keyword arguments fix the data-dependent counts (module docstring).

    Returns ``{"per_step": int, "terms": {name: int}}`` (amortized terms already divided by their
    period; ``per_step`` = sum of the rounded terms).
    """
    if isinstance(opt, str):
        from .registry import make_optimizer  # noqa: PLC0415

        opt = make_optimizer(opt)
    name = getattr(opt, "name", None)
    if name not in FORMULAS:
        raise ValueError(f"no algebra cost formula for optimizer {name!r}")
    sh = model_shapes(layout_or_model)
    N = batch_size if batch_size is not None else getattr(opt, "batch_size", None)
    if N is None:
        N = 1000
    assumptions = {"trials": int(trials), "pairs": pairs, "cg_iters": int(cg_iters), "root_iters": root_iters}
    raw = FORMULAS[name][0](opt, sh, int(N), assumptions)
    terms = {k: int(round(v)) for k, v in raw.items()}
    return {"per_step": int(sum(terms.values())), "terms": terms}
