#!/usr/bin/env python
"""Mutation run over the Kronecker and SMW optimizers (qnref issue 20).

Copies the working tree's qnref/, tests/ and pyproject.toml to a temporary directory, and for each single
injected bug below: restores the pristine file, applies the one textual replacement (it must match
exactly once, else the mutant is reported "n/a"), and runs the narrow test selection there, fast
tests first and stopping at the first failure:

    1. tests/optim/test_replays.py
    2. tests/optim/test_kron.py tests/optim/test_kron_methods.py tests/optim/test_smw.py
    3. the new variants' oracle tests: test_kfac_ch2, test_kbfgs_variants, test_smw_ng_bd, test_tnt_ideal
       (tests/optim/), test_type2_factors, test_block_fisher (tests/curvature/), test_mutation_gaps

A mutant of the new variant code names its own test file, which runs first (then the stages above,
each file once). A mutant is *killed* when a selection fails (or times out), *survived* when both pass. The
repository this script lives in is never modified. Usage::

    OPENBLAS_NUM_THREADS=1 python tools/mutation_run.py [--only SUBSTRING] [--json out.json] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = [
    ["tests/optim/test_replays.py"],
    ["tests/optim/test_kron.py", "tests/optim/test_kron_methods.py", "tests/optim/test_smw.py"],
    # the new variants' oracle tests (issue 20, second run)
    ["tests/optim/test_kfac_ch2.py", "tests/optim/test_kbfgs_variants.py", "tests/optim/test_smw_ng_bd.py",
     "tests/optim/test_tnt_ideal.py", "tests/curvature/test_type2_factors.py", "tests/curvature/test_block_fisher.py",
     "tests/optim/test_mutation_gaps.py"],
]
O = "qnref/optim/"
K = "qnref/curvature/kron.py"
B = "qnref/curvature/block_fisher.py"
T = "tests/optim/"
C = "tests/curvature/"

#: (id, file, old, new, what[, first test files]) — each a single injected bug
MUTANTS = [
    # -- the six named in issue 20 ----------------------------------------------------------------------
    ("kbfgs-no-1/lambda-others", O + "kbfgs.py", "P = mom / self.damping", "P = mom.copy()",
     "non-Kronecker blocks without the 1/λ scaling"),
    ("kbfgs-yA-no-lambdaA", O + "kbfgs.py", 'yA = t["AsA"] + lamA * sA', 'yA = t["AsA"]',
     "y_A without the λ_A s_A term (ch3)"),
    ("kbfgs-sG-beta-swap", O + "kbfgs.py", "sG = self.beta * st.sG[name] + (1.0 - self.beta) * dh",
     "sG = (1.0 - self.beta) * st.sG[name] + self.beta * dh", "β and 1−β swapped in the s_G average"),
    ("kbfgs-HG0-lambda", O + "kbfgs.py", 'return 1.0 / lamG if self.version == "ch3" else 1.0',
     'return lamG if self.version == "ch3" else 1.0', "H_G initialised as λ_G I instead of I/λ_G"),
    ("kfac-A-ema-swap", O + "kfac.py", "new.A[L.name] = kron.ema(new.A[L.name], A, self.beta)",
     "new.A[L.name] = kron.ema(A, new.A[L.name], self.beta)", "KFAC A moving average with arguments swapped"),
    ("powell-mu1", O + "_kron_common.py", "th = (1.0 - mu1) * yHy / (yHy - sy)", "th = mu1 * yHy / (yHy - sy)",
     "Powell damping with μ₁ in place of 1−μ₁"),
    # -- kbfgs.py --------------------------------------------------------------------------------------
    ("kbfgs-yG-beta-swap", O + "kbfgs.py", "yG = self.beta * st.yG[name] + (1.0 - self.beta) * dg",
     "yG = (1.0 - self.beta) * st.yG[name] + self.beta * dg", "β and 1−β swapped in the y_G average"),
    ("kbfgs-ch3-momentum-1-beta", O + "kbfgs.py",
     '(grad if self.gradient == "momentum" else (1.0 - self.beta) * grad)', "((1.0 - self.beta) * grad)",
     "ch3 momentum with the ch2 (1−β) factor"),
    ("kbfgs-ch2-A-ema-swap", O + "kbfgs.py", 'A = kron.ema(st.A[name], t["A"], self.beta)',
     'A = kron.ema(t["A"], st.A[name], self.beta)', "ch2 A moving average swapped"),
    ("kbfgs-sG-old-weights", O + "kbfgs.py", 'dh = w_new @ t_new["mean_a"] - w_old @ t["mean_a"]',
     'dh = w_old @ t_new["mean_a"] - w_old @ t["mean_a"]', "h̄⁺ computed with the old weights"),
    ("kbfgs-damping-swap", O + "kbfgs.py", 'damp = kc.dp_dlm if self.damping_scheme == "dpdlm" else kc.double_damping',
     'damp = kc.double_damping if self.damping_scheme == "dpdlm" else kc.dp_dlm', "DD and D_P D_LM swapped between versions"),
    ("kbfgs-no-location-split", O + "kbfgs.py", "lamA, lamG = kc.sqrt_split(self.damping, locs[L.name])",
     "lamA, lamG = kc.sqrt_split(self.damping, 1)", "conv damping split without |T|"),
    ("kbfgsl-undamped-s", O + "kbfgs.py", "st.pairs[name].append(s_t, y_t)", "st.pairs[name].append(sG, y_t)",
     "K-BFGS(L) stores the undamped s_G"),
    ("kbfgs-curvature-every-step", O + "kbfgs.py", "kc.second_pass(opened, theta_new, k % self.curvature_freq == 0)",
     "kc.second_pass(opened, theta_new, True)", "curvature update every step (T ignored)"),
    ("kbfgs-HA-skip-sign", O + "kbfgs.py", "if kc.all_finite(sA, yA) and float(sA @ yA) > 0:",
     "if kc.all_finite(sA, yA) and float(sA @ yA) < 0:", "H_A update never applied"),
    ("kbfgsl-H0-identity", O + "kbfgs.py", "LBFGSOperator(pairs.S, pairs.Y, self._h0(state.lam[name][1]))",
     "LBFGSOperator(pairs.S, pairs.Y, 1.0)", "K-BFGS(L) ch3 with H₀ = I instead of I/λ_G"),
    ("kbfgs-ch2-yA-no-lambdaA", O + "kbfgs.py", "yA = A @ sA + lamA * sA", "yA = A @ sA",
     "ch2 y_A = A s_A without λ_A"),
    # -- _kron_common.py -------------------------------------------------------------------------------
    ("dd-mu2", O + "_kron_common.py", "th2 = (1.0 - mu2) * ss / (ss - sy)", "th2 = mu2 * ss / (ss - sy)",
     "DD second damping with μ₂ in place of 1−μ₂"),
    ("dpdlm-y-plus-mu2-s", O + "_kron_common.py", "return st, y + mu2 * st", "return st, y + mu2 * s",
     "D_P D_LM adds μ₂ s instead of μ₂ s̃"),
    ("sqrt-split-swap", O + "_kron_common.py", "return math.sqrt(L) * r, r / math.sqrt(L)",
     "return r / math.sqrt(L), math.sqrt(L) * r", "λ_A and λ_G swapped for conv layers"),
    ("descend-wd-sign", O + "_kron_common.py", "P += weight_decay * theta", "P -= weight_decay * theta",
     "weight decay with the wrong sign"),
    ("tensor-ema-swap", O + "_kron_common.py", "kron.ema(o, n, self.beta)", "kron.ema(n, o, self.beta)",
     "Shampoo/TNT statistics moving average swapped"),
    ("tensor-warm-no-average", O + "_kron_common.py", "state.stats = [[x / len(objs) for x in a] for a in total]",
     "state.stats = [[x for x in a] for a in total]", "warm-start statistics summed, not averaged"),
    ("tensor-inv-at-stat-freq", O + "_kron_common.py", "        if k % self.inv_freq == 0:\n            precond, bad",
     "        if k % self.stat_freq == 0:\n            precond, bad", "Shampoo/TNT roots at T₁ instead of T₂"),
    ("tensor-momentum-1-mu", O + "_kron_common.py", "mom = self.momentum * state.mom + p.grad",
     "mom = self.momentum * state.mom + (1.0 - self.momentum) * p.grad", "Shampoo/TNT momentum with (1−μ)"),
    ("conv-tensor-2way", O + "_kron_common.py", "w_shape = (d_out, cin, (b.shape[1] - 1) // cin)",
     "w_shape = (d_out, b.shape[1] - 1)", "conv weights as a 2-way tensor"),
    ("tnt-sampled-is-empirical", O + "_kron_common.py", 'return p.vjp(p.output_grads("sampled") / p.N)',
     'return p.vjp(p.output_grads("empirical") / p.N)', "TNT's sampled gradient uses the labels"),
    ("tensor-part-bias-from-W", O + "_kron_common.py", "        return v[:, -1]\n    return v.reshape",
     "        return v[:, 0]\n    return v.reshape", "bias part read from the first column"),
    # -- kfac.py ---------------------------------------------------------------------------------------
    ("kfac-G-ema-swap", O + "kfac.py", "new.G[L.name] = kron.ema(new.G[L.name], G, self.beta)",
     "new.G[L.name] = kron.ema(G, new.G[L.name], self.beta)", "KFAC G moving average swapped"),
    ("kfac-inv-at-stat-freq", O + "kfac.py", "return k % self.inv_freq == 0 or", "return k % self.stat_freq == 0 or",
     "KFAC inverses at T₁ instead of T₂"),
    ("kfac-warm-unweighted", O + "kfac.py", "sums[name] = (sums[name][0] + n * A, sums[name][1] + n * G)",
     "sums[name] = (sums[name][0] + A, sums[name][1] + G)", "warm-start factors not weighted by chunk size"),
    ("kfac-others-scaled", O + "kfac.py", "P = mom.copy()", "P = mom / self.damping",
     "KFAC BatchNorm blocks scaled by 1/λ"),
    ("kfac-stats-at-old-theta", O + "kfac.py", "kc.second_pass(opened, theta_new, k % self.stat_freq == 0)",
     "kc.second_pass(opened, theta, k % self.stat_freq == 0)", "statistics at θ instead of θ⁺"),
    ("kfac-momentum-1-mu", O + "kfac.py", "mom = self.momentum * state.mom + opened.g",
     "mom = self.momentum * state.mom + (1.0 - self.momentum) * opened.g", "KFAC momentum with (1−μ)"),
    # -- kron.py ---------------------------------------------------------------------------------------
    ("kron-conv-G-sum", K, "return sa / n, sg / (n * L)", "return sa / n, sg / n",
     "conv G summed over locations"),
    ("kron-conv-A-mean", K, "return sa / n, sg / (n * L)",
     "return sa / (n * L), sg / (n * L)", "conv A averaged over locations"),
    ("kron-pi-inverted", K, "return math.sqrt(ta / tg)", "return math.sqrt(tg / ta)", "π inverted"),
    ("kron-HG-damping-pi", K, "HG = spd_inverse(plus_identity(G, r / pi), lower=True)", "HG = spd_inverse(plus_identity(G, r * pi), lower=True)",
     "G damped with π√λ instead of √λ/π"),
    ("kron-mean-a-sum-locations", K, "a.sum(axis=0), need_g=False)) / (n * L)",
     "a.sum(axis=0), need_g=False)) / n", "â summed over locations"),
    ("kron-mean-g-first-location", K, "return g.mean(axis=0) if g.ndim == 2 else g.mean(axis=(0, 1))",
     "return g.mean(axis=0) if g.ndim == 2 else g[:, 0].mean(axis=0)", "ḡ of a conv layer from one location"),
    ("kron-apply-A-per-location", K, "a.T @ (a @ s), need_g=False)) / tap_size(tap)[0]", "a.T @ (a @ s), need_g=False)) / math.prod(tap_size(tap))",
     "Ã s averaged over locations"),
    ("kron-newton-scaling", K, "z = (1.0 + p) / (2.0 * nrm)", "z = 1.0 / nrm",
     "coupled Newton with another start scaling (same root to the tolerance)"),
    ("kron-mode-product-transpose", K, "Y = xp.tensordot(U, X, axes=([1], [i]))",
     "Y = xp.tensordot(U, X, axes=([0], [i]))", "mode product with Uᵀ"),
    ("kron-contraction-wrong-mode", K, "return gram(xp.moveaxis(X, i, 0).reshape(X.shape[i], -1))",
     "return gram(xp.moveaxis(X, i, -1).reshape(X.shape[i], -1))", "mode-i unfolding from a wrong memory order"),
    # -- shampoo.py, tnt.py --------------------------------------------------------------------------
    ("shampoo-root-k", O + "shampoo.py", "kron.inv_root_newton(S, 2 * k, self.damping",
     "kron.inv_root_newton(S, k, self.damping", "Shampoo root −1/k instead of −1/(2k)"),
    ("shampoo-eigh-no-eps", O + "shampoo.py", "kron.inv_root_eigh(S, 2 * k, self.damping)",
     "kron.inv_root_eigh(S, 2 * k, 0.0 * self.damping + 1e-12)", "eigh roots without ε"),
    ("tnt-c0-power", O + "tnt.py", "denom = (c0 ** (k - 1)) * others", "denom = (c0 ** k) * others",
     "(4.10) with c₀ᵏ instead of c₀^{k−1}"),
    ("tnt-c0-root", O + "tnt.py", "c0 = (max(tr, 0.0) / total) ** (1.0 / k)", "c0 = (max(tr, 0.0) / total) ** 0.5",
     "c₀ with the square root for every order"),
    ("tnt-damping-squared", O + "tnt.py", "kron.add_identity_(U, damping)",
     "kron.add_identity_(U, damping ** 2)", "TNT (and TNT-ideal) damped with ε²"),
    # -- smw.py ------------------------------------------------------------------------------------------
    ("smw-boost-is-drop", O + "smw.py", "    if rho < eps:\n        return lambda_lm * boost",
     "    if rho < eps:\n        return lambda_lm * drop", "λ_LM decreased when ρ < ε"),
    ("smw-drop-threshold", O + "smw.py", "if rho > 1.0 - eps:", "if rho > eps:", "drop when ρ > ε instead of 1−ε"),
    ("smw-no-tau", O + "smw.py", "lam = state.lambda_lm + self.tau", "lam = state.lambda_lm", "λ without τ"),
    ("smw-ng-gram-unscaled", O + "smw.py", '_gram_solve(xp, curv.gram("grad"), u, mu, N)',
     '_gram_solve(xp, curv.gram("grad"), u, mu, 1)', "NG: D without 1/N₂"),
    ("smw-gn-backward-unscaled", O + "smw.py", "p = -(g - curv.vjp(S.apply(w.reshape(N, C)) / N)) / mu",
     "p = -(g - curv.vjp(S.apply(w.reshape(N, C)))) / mu", "GN: Jᵀ(Sw) without 1/N₂"),
    ("smw-gn-D-unscaled", O + "smw.py", "kron.sym(S.T.left(S.right(K)) / N)", "kron.sym(S.T.left(S.right(K)))",
     "GN (5.6): D without 1/N₂"),
    ("smw-model-decrease", O + "smw.py", "return -self.g_dot_p - 0.5 * self.pBp", "return -self.g_dot_p - self.pBp",
     "m(0) − m(p) without the ½"),
    ("smw-rho-at-update", O + "smw.py", 't = 1.0 if self.rho_at == "direction" else self.lr', "t = self.lr",
     "ρ at θ + αp by default"),
    ("smw-full-step", O + "smw.py", "_update(theta, d.p, self.lr, t, trial)", "_update(theta, d.p, 1.0, t, trial)", "θ ← θ + p (α ignored)"),
    # -- new variant code (issue 20, second run): each runs its own test file first ------------------------
    # kfac.py version="ch2" (thesis Alg. 7)
    ("kfac-ch2-no-1-mu", O + "kfac.py", "(1.0 - self.momentum) * opened.g   # §2.5.2", "opened.g   # §2.5.2",
     "ch2 KFAC momentum without Alg. 7's (1−β) factor", [T + "test_kfac_ch2.py"]),
    ("kfac-ch2-mu-swap", O + "kfac.py", "self.momentum * state.mom + (1.0 - self.momentum) * opened.g",
     "(1.0 - self.momentum) * state.mom + self.momentum * opened.g", "ch2 ĝ average with β and 1−β swapped",
     [T + "test_kfac_ch2.py"]),
    ("kfac-ch2-k-le-T-plus-1", O + "kfac.py", 'self.version == "ch2" and k <= self.inv_freq)',
     'self.version == "ch2" and k <= self.inv_freq + 1)', "ch2 re-inversion off by one (k ≤ T + 1)",
     [T + "test_kfac_ch2.py"]),
    ("kfac-ch2-no-early-inverse", O + "kfac.py", 'self.version == "ch2" and k <= self.inv_freq)',
     'self.version == "ch2" and k <= 1)', "ch2 without the k ≤ T re-inversions (only k = 1)", [T + "test_kfac_ch2.py"]),
    ("kfac-ch2-pi-split", O + "kfac.py", 'return self.use_pi and self.version == "ch3"', "return self.use_pi",
     "ch2 KFAC with the π split (Alg. 7 has π = 1)", [T + "test_kfac_ch2.py"]),
    # type-2 factors and the BackPACK conversion (kron.py)
    ("kron-exact-g-one-class", K, "    g2 = g.reshape(-1, g.shape[-1])\n    return (g2.T @ g2) / (n * L)",
     "    g2 = g[:, 0].reshape(-1, g.shape[-1])\n    return (g2.T @ g2) / (n * L)",
     "type-2 G from the first class only (no sum over labels)", [C + "test_type2_factors.py"]),
    ("kron-exact-g-per-class-mean", K, "    g2 = g.reshape(-1, g.shape[-1])\n    return (g2.T @ g2) / (n * L)",
     "    g2 = g.reshape(-1, g.shape[-1])\n    return (g2.T @ g2) / (n * L * g.shape[1])",
     "type-2 G averaged over the labels instead of summed", [C + "test_type2_factors.py"]),
    ("kron-backpack-G-mean", K, "gs = g.sum(axis=-2)", "gs = g.mean(axis=-2)",
     "BackPACK conv G with gradients averaged, not summed, over locations", [C + "test_type2_factors.py"]),
    # smw.py SMW-NG-BD (thesis §5.8)
    ("smw-bd-D-unscaled", O + "smw.py", "kron.add_identity_(kron.sym(K / N), mu)",
     "kron.add_identity_(kron.sym(K), mu)", "NG-BD (and NG): the shared Gram solve's D without 1/N₂",
     [T + "test_smw_ng_bd.py"]),
    ("smw-bd-no-l2", O + "smw.py", "    mu = float(lam) + curv.l2\n    layout = curv.layout",
     "    mu = float(lam)\n    layout = curv.layout", "NG-BD: μ without the l2 term", [T + "test_smw_ng_bd.py"]),
    ("smw-bd-taps-sign", O + "smw.py", "xp.subtract(jtw, g, out=jtw)",
     "xp.add(jtw, g, out=jtw)", "NG-BD taps route: Jᵀw added, not subtracted",
     [T + "test_smw_ng_bd.py"]),
    ("smw-bd-rows-unscaled", O + "smw.py", "p[idx] = -(g[idx] - Pl.T @ (w / N)) / mu", "p[idx] = -(g[idx] - Pl.T @ w) / mu",
     "NG-BD rows route: Jᵀw without 1/N₂", [T + "test_smw_ng_bd.py"]),
    ("smw-bd-group-per-block", O + "smw.py", 'groups.setdefault(str(b.name).rsplit(".", 1)[0], []).append(k)',
     "groups.setdefault(str(b.name), []).append(k)", "NG-BD blocks per parameter block, not per layer",
     [T + "test_smw_ng_bd.py"]),
    # smw.py: S₂'s taps as rows of S₁'s backward pass (issue 21, tenth session)
    ("smw-s1-taps-unscaled", O + "smw.py", '"g": taps[L.name]["g"][at] * N1}', '"g": taps[L.name]["g"][at]}',
     "NG / NG-BD on dense nets: S₂'s γ left at the mean loss's scale γ/N₁", [T + "test_smw_ng_bd.py"]),
    ("smw-ng-taps-last-layer", O + "smw.py", "            u = u + jg(a, gam, gl, name)", "            u = jg(a, gam, gl, name)",
     "NG on dense nets: J g of the last layer only", [T + "test_smw_ng_bd.py"]),
    ("smw-gram-rhs-mean", O + "smw.py", 'return ((a @ b["a"].T) * (gam @ b["g"].T)).sum(axis=1)',
     'return ((a @ b["a"].T) * (gam @ b["g"].T)).mean(axis=1)', "NG / NG-BD: the S₂ × S₁ Gram right-hand side averaged over S₁ again",
     [T + "test_smw_ng_bd.py"]),
    # tnt.py TNT-ideal (thesis Alg. 14)
    ("tnt-ideal-sum-not-mean", O + "tnt.py", "stats = [[S / n_pop for S in a] for a in total]",
     "stats = [[S for S in a] for a in total]", "TNT-ideal: Σ_x instead of E_x", [T + "test_tnt_ideal.py"]),
    ("tnt-ideal-decay-off-by-one", O + "tnt.py", "lr = self.lr * k ** (-self.decay) if self.decay else self.lr",
     "lr = self.lr * (k + 1) ** (-self.decay) if self.decay else self.lr", "α_t = α (t+1)^(−β)",
     [T + "test_tnt_ideal.py"]),
    ("tnt-ideal-S-rows", O + "tnt.py", "U = xp.ascontiguousarray(S[:, :, c])", "U = xp.ascontiguousarray(S[:, c, :])",
     "TNT-ideal: rows of S instead of its columns (SᵀS for SSᵀ)", [T + "test_tnt_ideal.py"]),
    ("tnt-ideal-diag-no-root", O + "tnt.py", "            U[:, c] = S[:, c]", "            U[:, c] = S[:, c] ** 2",
     "TNT-ideal, diagonal H_L: h instead of √h", [T + "test_tnt_ideal.py"]),
    ("tnt-ideal-bias-column", O + "tnt.py", "        return v[:, :, -1]", "        return v[:, :, 0]",
     "TNT-ideal: the bias part read from the first weight column", [T + "test_tnt_ideal.py"]),
    # kbfgs.py variant branches (Table 3.8, Alg. 5, Alg. 10/11, §2.8.3)
    ("kbfgs-lr-power-off-by-one", O + "kbfgs.py", "self.lr * float(k) ** (-self.lr_power)",
     "self.lr * float(k + 1) ** (-self.lr_power)", "α_k = α (k+1)^(−β)", [T + "test_kbfgs_variants.py"]),
    ("kbfgs-exact-inverse-lambda", O + "kbfgs.py", "            H = kron.spd_inverse(kron.plus_identity(A, lamA), lower=True)",
     "            H = kron.spd_inverse(kron.plus_identity(A, self.damping), lower=True)", "exact H_A damped with λ instead of λ_A",
     [T + "test_kbfgs_variants.py"]),
    ("kbfgs-skip-inverted", O + "kbfgs.py", "if self.skip and not kc.dd_skip_passes(", "if self.skip and kc.dd_skip_passes(",
     "DD-skip keeps the pairs it should skip", [T + "test_kbfgs_variants.py"]),
    ("kbfgs-skip-strict", O + "_kron_common.py", "return float(st @ yt) >= bound - math.sqrt",
     "return float(st @ yt) > bound + math.sqrt", "DD-skip test strict (drops the Powell equality pairs)",
     [T + "test_kbfgs_variants.py"]),
    ("kbfgs-dpidlm-H-identity", O + "_kron_common.py", "return dp_dlm(s, y, y / mu2, mu1, mu2)",
     "return dp_dlm(s, y, y, mu1, mu2)", "D_P(I) with H = I instead of μ₂⁻¹ I", [T + "test_kbfgs_variants.py"]),
    ("kbfgs-double-grad-sum", O + "kbfgs.py", "grad = 0.5 * (grad + state.grad_plus)", "grad = grad + state.grad_plus",
     "double-grad without the ½", [T + "test_kbfgs_variants.py"]),
    ("kbfgs-minibatch-grad-scaled", O + "kbfgs.py", "mom = grad                                   # Alg. 5",
     "mom = (1.0 - self.beta) * grad                                   # Alg. 5", "gradient='minibatch' scaled by 1−β",
     [T + "test_kbfgs_variants.py"]),
    ("kbfgs-exact-minibatch-count", K, "    return factor_sums(tap, need_g=False)[0] / n\n",
     "    return factor_sums(tap, need_g=False)[0] / (n + 1)\n", "Alg. 10's batch Ã averaged over N + 1",
     [T + "test_kbfgs_variants.py"]),
    ("kbfgs-exact-inverse-lambdaG", O + "kbfgs.py", "            H = kron.spd_inverse(kron.plus_identity(A, lamA), lower=True)",
     "            H = kron.spd_inverse(kron.plus_identity(A, st.lam[name][1]), lower=True)", "exact H_A damped with λ_G (differs on conv layers only)",
     [T + "test_kbfgs_variants.py"]),
    ("kbfgs-exact-minibatch-per-row", K, "    return factor_sums(tap, need_g=False)[0] / n\n",
     "    return factor_sums(tap, need_g=False)[0] / math.prod(tap_size(tap))\n", "Alg. 10's batch Ã averaged over N·|T| rows (differs on conv only)",
     [T + "test_kbfgs_variants.py"]),
    # block_fisher.py (thesis Fig. 4.1 study)
    ("bf-mom-beta-swap", B, "self.mom = self.beta * self.mom + (1 - self.beta) * point.grad",
     "self.mom = (1 - self.beta) * self.mom + self.beta * point.grad", "block-Fisher ĝ with β and 1−β swapped",
     [C + "test_block_fisher.py"]),
    ("bf-damping-squared", B, "np.linalg.cholesky(F + self.damping * np.eye(len(F)))",
     "np.linalg.cholesky(F + self.damping ** 2 * np.eye(len(F)))", "block Fisher damped with λ²", [C + "test_block_fisher.py"]),
    ("bf-exact-p-not-sqrt", B, "* np.sqrt(p[:, c:c + 1])", "* p[:, c:c + 1]", "exact Fisher blocks weighted by p², not p",
     [C + "test_block_fisher.py"]),
    ("bf-F-ema-swap", B, "self.F[name] = kron.ema(self.F[name], F, self.beta)", "self.F[name] = kron.ema(F, self.F[name], self.beta)",
     "block-Fisher F̂ moving average swapped", [C + "test_block_fisher.py"]),
    ("bf-kfac-momentum-1-mu", B, "self.mom = self.momentum * self.mom + point.grad",
     "self.mom = self.momentum * self.mom + (1 - self.momentum) * point.grad", "the study's KFAC direction with (1−μ)",
     [C + "test_block_fisher.py"]),
]


def copy_tree(dst: Path) -> None:
    """The package, the tests, the tools (test_mutation_gaps reads this file's mutants) and the
    project file of the working tree (what the selection needs)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
    dst.mkdir(parents=True)
    for name in ("qnref", "tests", "tools"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")


def run_stage(tree: Path, files: list, timeout: float) -> tuple[bool, str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree), OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS", "1"),
               PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *files]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timeout after {timeout:.0f} s", time.time() - t0
    if r.returncode == 0:
        return True, "", time.time() - t0
    failed = re.findall(r"^FAILED (\S+)", r.stdout, re.M) or re.findall(r"^ERROR (\S+)", r.stdout, re.M)
    return False, failed[0] if failed else (r.stdout.strip().splitlines() or ["rc %d" % r.returncode])[-1], time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="run only the mutants whose id contains one of these (comma-separated)")
    ap.add_argument("--json", help="write the table as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary tree")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--without-replays", action="store_true",
                    help="run only the existing tests (stage 2), to see what the replays add")
    args = ap.parse_args(argv)
    only = [w for w in (args.only or "").split(",") if w]
    stages = STAGES[1:] if args.without_replays else STAGES
    stages = [[f for f in s if (ROOT / f).exists()] for s in stages]    # test_mutation_gaps.py may be absent
    mutants = [m for m in MUTANTS if not only or any(w in m[0] for w in only)]
    tmp = Path(tempfile.mkdtemp(prefix="qnref-mutants-"))
    tree = tmp / "tree"
    copy_tree(tree)
    env = dict(os.environ, PYTHONPATH=str(tree))
    where = subprocess.run([sys.executable, "-c", "import qnref; print(qnref.__file__)"], cwd=tree, env=env,
                           capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(tree)):
        print(f"the copy's qnref is not the one imported ({where}); refusing to run", file=sys.stderr)
        return 2
    print(f"tree copy: {tree}")
    ok, why, dt = run_stage(tree, [f for s in stages for f in s], args.timeout)
    if not ok:
        print(f"the unmutated selection fails ({why}); fix that first", file=sys.stderr)
        return 2
    print(f"unmutated selection passes ({dt:.1f} s)")
    rows = []
    for mid, rel, old, new, what, *first in mutants:
        first = first[0] if first else []
        # the mutant's own test files first, then the rest of the selection (each file once)
        plan = [first] + [[f for f in s if f not in first] for s in stages] if first else stages
        plan = [s for s in plan if s]
        path = tree / rel
        pristine = (ROOT / rel).read_text()
        n = pristine.count(old)
        if n != 1:
            rows.append({"id": mid, "file": rel, "what": what, "status": "n/a", "by": f"pattern found {n} times"})
            print(f"{mid:32s} n/a ({n} matches)")
            continue
        path.write_text(pristine.replace(old, new))
        try:
            status, by, total = "survived", "", 0.0
            for files in plan:
                ok, why, dt = run_stage(tree, files, args.timeout)
                total += dt
                if not ok:
                    status, by = "killed", why
                    break
        finally:
            path.write_text(pristine)
        rows.append({"id": mid, "file": rel, "what": what, "status": status, "by": by, "seconds": round(total, 1)})
        print(f"{mid:32s} {status:8s} {by}  ({total:.1f} s)", flush=True)
    applicable = [r for r in rows if r["status"] != "n/a"]
    killed = sum(r["status"] == "killed" for r in applicable)
    print(f"\n{killed}/{len(applicable)} killed ({100.0 * killed / max(1, len(applicable)):.1f} %); "
          f"{len(rows) - len(applicable)} not applicable")
    for r in applicable:
        if r["status"] == "survived":
            print(f"  survived: {r['id']} ({r['file']}): {r['what']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"killed": killed, "applicable": len(applicable), "rows": rows}, indent=1))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
