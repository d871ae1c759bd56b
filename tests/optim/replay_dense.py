"""Dense NumPy replays of the Kronecker and SMW methods, written from Ren's thesis's algorithms.

Used by ``tests/optim/test_replays.py``. Nothing here imports ``qnref.optim`` or
``qnref.curvature.kron``: the replays get from qnref only what the text takes as given (the
network's forward/backward products through the public ``Objective``/``Point`` API: the loss value,
the minibatch gradient, the layer taps ``layer_stats`` (ā, per-example g), output Jacobian-vector
products ``jvp``, the outputs ``z``) and redo every optimizer computation (moving averages,
inverses, BFGS/L-BFGS, damping, tensor contractions, inverse roots, SMW/LM) in plain dense NumPy.

The replay draws its minibatches and sampled targets from a *twin* of the problem (the same data, seeds
and model built a second time) in the order the algorithm needs them, so both see the same
batches and the same ỹ ~ p(y|x, θ).

Text references: thesis Alg. 3 (DD), 4 (K-BFGS ch. 2), 7 (KFAC ch. 2), 8 (D_P D_LM), 9 (K-BFGS
ch. 3), 12 (KFAC ch. 3), 15 (TNT), 16 (Shampoo), 23 (SMW-GN / SMW-NG); eqs. (3.9), (3.12)-(3.15),
(4.10), (5.2)-(5.5).
"""
from __future__ import annotations

import math

import numpy as np


# -- model structure from the layout and the taps (no qnref.optim helpers) ------------------------------------
def blocks(model):
    """[(name, shape, start, size)] of the parameter layout, in order."""
    out, start = [], 0
    for b in model.layout.blocks:
        size = int(np.prod(b.shape)) if len(b.shape) else 1
        out.append((b.name, tuple(b.shape), start, size))
        start += size
    return out


def block_view(theta, blk):
    name, shape, start, size = blk
    return theta[start:start + size].reshape(shape if shape else (1,))


def kron_blocks(model, taps):
    """{layer name: index of its W̄ block} for the layers that have taps; the other block indices."""
    bl = blocks(model)
    names = [b[0] for b in bl]
    kron = {}
    for layer in model.kron_layers:          # model order (the state is compared layer by layer)
        if layer.name in taps:
            kron[layer.name] = names.index(f"{layer.name}.W")
    others = [i for i in range(len(bl)) if i not in kron.values()]
    return kron, others


def flat_a(t):
    return t["a"].reshape(-1, t["a"].shape[-1])


def flat_g(t):
    return t["g"].reshape(-1, t["g"].shape[-1])


def n_loc(t):
    return t["a"].shape[1] if t["a"].ndim == 3 else 1


# -- dense linear algebra of the texts ---------------------------------------------------------------------------
def inv(M):
    return np.linalg.inv(M)


def bfgs_H(H, s, y):
    """Inverse BFGS update, thesis eq. (2.6): H⁺ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ."""
    rho = 1.0 / (s @ y)
    E = np.eye(len(s)) - rho * np.outer(s, y)
    return E @ H @ E.T + rho * np.outer(s, s)


def lbfgs_two_loop(S, Y, gamma, v):
    """H v for the L-BFGS matrix of pairs (S[i], Y[i]) (oldest first) from H₀ = γ I (N&W Alg. 7.4)."""
    q = v.copy()
    alphas = []
    for s, y in zip(S[::-1], Y[::-1]):
        a = (s @ q) / (s @ y)
        alphas.append(a)
        q = q - a * y
    r = gamma * q
    for (s, y), a in zip(zip(S, Y), alphas[::-1]):
        b = (y @ r) / (s @ y)
        r = r + s * (a - b)
    return r


def powell(s, y, Hy, mu1):
    """Thesis Alg. 3 lines 1-2 / Alg. 8: Powell's damping on H."""
    sy, yHy = s @ y, y @ Hy
    th = (1 - mu1) * yHy / (yHy - sy) if sy < mu1 * yHy else 1.0
    return th * s + (1 - th) * Hy


def dd(s, y, Hy, mu1, mu2):
    """Double damping, thesis Alg. 3."""
    st = powell(s, y, Hy, mu1)
    ss, sy = st @ st, st @ y
    th2 = (1 - mu2) * ss / (ss - sy) if sy < mu2 * ss else 1.0
    return st, th2 * y + (1 - th2) * st


def dpdlm(s, y, Hy, mu1, mu2):
    """D_P D_LM, thesis Alg. 8."""
    st = powell(s, y, Hy, mu1)
    return st, y + mu2 * st


def chunk_objectives(twin, size):
    """The whole training set in consecutive chunks (the thesis's warm start on the entire data)."""
    n = twin.n_samples
    size = min(size, n)
    return [twin.subset(np.arange(a, min(n, a + size))) for a in range(0, n, size)]


# -- K-BFGS (Alg. 4 = ch2, Alg. 9 = ch3), K-BFGS(L) ---------------------------------------------------------
class KBFGSReplay:
    """Alg. 9 (``version="ch3"``) / Alg. 4 (``"ch2"``), BFGS or L-BFGS (``memory``) for H_G.

    Documented conventions replayed (docs/kbfgs.md): non-Kronecker blocks (BatchNorm) move along
    the momentum with rate α/λ (Alg. 9 §3.4.3; also used for ch2); weight decay γ as
    W ← W − α(p + γW) on every block (L1619); a pair with s̃ᵀỹ ≤ 0 is skipped (never happens here);
    ch2 runs the curvature update every ``T`` steps too (the code's ``curvature_freq``; Alg. 4 has T = 1).
    """

    def __init__(self, twin, model, theta, *, lr, damping, beta, mu1, T, batch, version, memory=None,
                 weight_decay=0.0):
        self.twin, self.model = twin, model
        self.lr, self.lam, self.beta, self.mu1, self.T, self.batch = lr, damping, beta, mu1, T, batch
        self.version, self.memory, self.wd = version, memory, weight_decay
        self.k = 0
        self.mom = np.zeros_like(theta)
        self.blocks = blocks(model)
        # warm start: A on the whole training set (Alg. 9 line 3; Alg. 4 line 3)
        sums, count, taps0 = {}, 0, None
        for obj in chunk_objectives(twin, batch):
            taps = obj.at(theta).layer_stats("empirical")
            taps0 = taps
            for name, t in taps.items():
                a = flat_a(t)
                sums[name] = sums.get(name, 0) + a.T @ a
            count += obj.n_samples
        self.kron, self.others = kron_blocks(model, taps0)
        self.HA, self.HG, self.S, self.Y, self.sG, self.yG, self.A, self.lamAG = {}, {}, {}, {}, {}, {}, {}, {}
        for name, t in taps0.items():
            L = n_loc(t)
            lamA, lamG = math.sqrt(L) * math.sqrt(damping), math.sqrt(damping) / math.sqrt(L)   # §3.3.2
            self.lamAG[name] = (lamA, lamG)
            A = sums[name] / count
            self.A[name] = A
            self.HA[name] = inv(A + lamA * np.eye(len(A)))
            d_out = t["g"].shape[-1]
            self.HG[name] = np.eye(d_out) * self.gamma0(lamG)
            self.S[name], self.Y[name] = [], []
            self.sG[name] = np.zeros(d_out)
            self.yG[name] = np.zeros(d_out)

    def gamma0(self, lamG):
        return 1.0 / lamG if self.version == "ch3" else 1.0        # Alg. 9 l. 3 / Alg. 4 l. 3

    def apply_HG(self, name, X):
        if self.memory is None:
            return self.HG[name] @ X
        g0 = self.gamma0(self.lamAG[name][1])
        if X.ndim == 1:
            return lbfgs_two_loop(self.S[name], self.Y[name], g0, X)
        return np.stack([lbfgs_two_loop(self.S[name], self.Y[name], g0, X[:, j]) for j in range(X.shape[1])], axis=1)

    def step(self, theta):
        obj = self.twin.batch(self.batch)
        p = obj.at(theta)
        taps = p.layer_stats("empirical")
        grad = p.grad
        self.k += 1
        if self.version == "ch3":
            self.mom = self.beta * self.mom + grad                       # Alg. 9 l. 8
        else:
            self.mom = self.beta * self.mom + (1 - self.beta) * grad     # Alg. 4 l. 8
        P = np.zeros_like(theta)
        for i in self.others:
            block_view(P, self.blocks[i])[...] = block_view(self.mom, self.blocks[i]) / self.lam
        for name, i in self.kron.items():
            block_view(P, self.blocks[i])[...] = self.apply_HG(name, block_view(self.mom, self.blocks[i]) @ self.HA[name])
        new = theta - self.lr * (P + self.wd * theta)
        if self.k % self.T == 0:
            tn = obj.at(new).layer_stats("empirical")
            for name, i in self.kron.items():
                self._curv(name, taps[name], tn[name], block_view(theta, self.blocks[i]), block_view(new, self.blocks[i]))
        return new

    def _curv(self, name, t, tn, W, Wn):
        lamA, lamG = self.lamAG[name]
        a = flat_a(t)
        N = t["a"].shape[0]
        abar = a.mean(axis=0)                                   # mean over examples and locations (3.14)
        sA = self.HA[name] @ abar
        if self.version == "ch3":
            yA = a.T @ (a @ sA) / N + lamA * sA                 # (3.15), current minibatch only
        else:
            self.A[name] = self.beta * self.A[name] + (1 - self.beta) * (a.T @ a) / N   # §2.4, L567
            yA = (self.A[name] + lamA * np.eye(len(sA))) @ sA
        if sA @ yA > 0:
            self.HA[name] = bfgs_H(self.HA[name], sA, yA)
        # pairs (3.12)-(3.13) / (2.5): batch means of h = W̄ā and of g over examples and locations
        h, hn = (a @ W.T).mean(axis=0), (flat_a(tn) @ Wn.T).mean(axis=0)
        g, gn = flat_g(t).mean(axis=0), flat_g(tn).mean(axis=0)
        self.sG[name] = self.beta * self.sG[name] + (1 - self.beta) * (hn - h)
        self.yG[name] = self.beta * self.yG[name] + (1 - self.beta) * (gn - g)
        s, y = self.sG[name], self.yG[name]
        Hy = self.apply_HG(name, y)
        st, yt = (dpdlm if self.version == "ch3" else dd)(s, y, Hy, self.mu1, lamG)
        if not st @ yt > 0:
            return
        if self.memory is None:
            self.HG[name] = bfgs_H(self.HG[name], st, yt)
        else:
            self.S[name].append(st)
            self.Y[name].append(yt)
            if len(self.S[name]) > self.memory:
                self.S[name].pop(0)
                self.Y[name].pop(0)


# -- KFAC (Alg. 12 = ch3, Alg. 7 = ch2) ----------------------------------------------------------------------
class KFACReplay:
    """KFAC, thesis Alg. 12 (``alg=12``) or Alg. 7 (``alg=7``).

    Alg. 12: ĝ ← μĝ + ∇f; P = H_G ĝ H_A (BatchNorm: P = ĝ, lr α, L1531); statistics at θ⁺ with sampled
    ỹ every T₁; H_A = (A + π√λ I)⁻¹, H_G = (G + √λ/π I)⁻¹ every T₂. Factors (3.9): A sums over
    locations, G averages over them; g per example.
    Alg. 7 (literal): ĝ ← βĝ + (1−β)∇f (L832: "same as K-BFGS"), statistics every step, π = 1,
    inverses when k ≤ T or k ≡ 0 (mod T).
    ``alg=7.1`` is the *documented* reading of Alg. 7 in docs/kfac.md ("Alg. 12 with π = 1").
    """

    def __init__(self, twin, model, theta, *, lr, damping, momentum, beta, T1, T2, batch, fisher="sampled",
                 alg=12, weight_decay=0.0):
        self.twin, self.model, self.alg = twin, model, alg
        self.lr, self.lam, self.mu, self.beta, self.T1, self.T2, self.batch = lr, damping, momentum, beta, T1, T2, batch
        self.fisher, self.wd = fisher, weight_decay
        self.k = 0
        self.mom = np.zeros_like(theta)
        self.blocks = blocks(model)
        sA, sG, count, taps0 = {}, {}, 0, None
        for obj in chunk_objectives(twin, batch):
            taps = obj.at(theta).layer_stats(fisher)
            taps0 = taps
            for name, t in taps.items():
                a, g = flat_a(t), flat_g(t)
                sA[name] = sA.get(name, 0) + a.T @ a
                sG[name] = sG.get(name, 0) + g.T @ g / n_loc(t)
            count += obj.n_samples
        self.kron, self.others = kron_blocks(model, taps0)
        self.A = {n: sA[n] / count for n in sA}
        self.G = {n: sG[n] / count for n in sG}
        self.HA, self.HG, self.pi = {}, {}, {}
        self.invert()

    def invert(self):
        r = math.sqrt(self.lam)
        for n in self.A:
            A, G = self.A[n], self.G[n]
            pi = 1.0 if self.alg != 12 else math.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
            self.pi[n] = pi
            self.HA[n] = inv(A + pi * r * np.eye(len(A)))
            self.HG[n] = inv(G + r / pi * np.eye(len(G)))

    def step(self, theta):
        obj = self.twin.batch(self.batch)
        grad = obj.at(theta).grad
        self.k += 1
        if self.alg == 7:
            self.mom = self.beta * self.mom + (1 - self.beta) * grad
        else:
            self.mom = self.mu * self.mom + grad
        P = self.mom.copy()
        for name, i in self.kron.items():
            block_view(P, self.blocks[i])[...] = self.HG[name] @ block_view(self.mom, self.blocks[i]) @ self.HA[name]
        new = theta - self.lr * (P + self.wd * theta)
        T1 = 1 if self.alg == 7 else self.T1
        if self.k % T1 == 0:
            for name, t in obj.at(new).layer_stats(self.fisher).items():
                a, g = flat_a(t), flat_g(t)
                N = t["a"].shape[0]
                self.A[name] = self.beta * self.A[name] + (1 - self.beta) * (a.T @ a) / N
                self.G[name] = self.beta * self.G[name] + (1 - self.beta) * (g.T @ g) / (N * n_loc(t))
        due = self.k % self.T2 == 0 or (self.alg == 7 and self.k <= self.T2)
        if due:
            self.invert()
        return new


# -- Shampoo (Alg. 16) and TNT (Alg. 15) ---------------------------------------------------------------------
def tensor_parts(model, taps):
    """[(block index, "W" | "b" | "all", tensor shape)]: dense W (o, i) and b (o,); conv W as the 3-way
    (C_out, C_in, kh·kw) tensor (§4.7.2); BatchNorm γ/β as 1-way tensors (§4.3.4)."""
    kron, others = kron_blocks(model, taps)
    bl = blocks(model)
    parts = []
    for name, i in kron.items():
        o, c = bl[i][1]
        if taps[name]["a"].ndim == 3:
            layer = next(L for L in model.kron_layers if L.name == name)
            cin = int(layer.in_shape[0])
            wshape = (o, cin, (c - 1) // cin)
        else:
            wshape = (o, c - 1)
        parts.append((i, "W", wshape))
        parts.append((i, "b", (o,)))
    for i in others:
        parts.append((i, "all", bl[i][1] or (1,)))
    return parts


def get_part(theta, bl, q):
    i, kind, shape = q
    v = block_view(theta, bl[i])
    if kind == "W":
        return v[:, :-1].reshape(shape)
    if kind == "b":
        return v[:, -1].copy()
    return v.reshape(shape)


def set_part(theta, bl, q, X):
    i, kind, shape = q
    v = block_view(theta, bl[i])
    if kind == "W":
        v[:, :-1] = X.reshape(v.shape[0], -1)
    elif kind == "b":
        v[:, -1] = X
    else:
        v[...] = X.reshape(v.shape)


def unfold(X, i):
    return np.moveaxis(X, i, 0).reshape(X.shape[i], -1)


def mode_mult(X, U, i):
    """X ×ᵢ U (thesis §4.2.1)."""
    Xi = U @ unfold(X, i)
    rest = [X.shape[j] for j in range(X.ndim) if j != i]
    return np.moveaxis(Xi.reshape([U.shape[0]] + rest), 0, i)


def eig_root(M, p, eps):
    """(M + εI)^(−1/p) by eigendecomposition."""
    w, V = np.linalg.eigh(0.5 * (M + M.T))
    w = np.maximum(w, 0) + eps
    return (V * w ** (-1.0 / p)) @ V.T


def newton_root(M, p, eps, max_iter=100, tol=1e-6):
    """Coupled Newton iteration for (M + εI)^(−1/p) (Alg. 16 line 12, §4.7.2: max 100 iterations, tol
    1e-6), with the documented details of docs/shampoo_tnt.md: M₀ = zM, H₀ = z^{1/p} I,
    z = (1+p)/(2‖M‖_F), T = ((p+1)I − M)/p, H ← H T, M ← Tᵖ M, stop at max|M − I| ≤ tol or when the
    error grows by more than 1.2× (that iterate is discarded)."""
    n = len(M)
    I = np.eye(n)
    Mm = 0.5 * (M + M.T) + eps * I
    z = (1 + p) / (2 * np.linalg.norm(Mm))
    Mk, Hk = z * Mm, z ** (1.0 / p) * I
    err = np.abs(Mk - I).max()
    for _ in range(max_iter):
        if err <= tol:
            break
        T = ((p + 1) * I - Mk) / p
        Mn = np.linalg.matrix_power(T, p) @ Mk
        Hn = Hk @ T
        en = np.abs(Mn - I).max()
        if not np.isfinite(en) or en > 1.2 * err:
            break
        Mk, Hk, err = Mn, Hn, en
    return 0.5 * (Hk + Hk.T)


class TensorReplay:
    """Shampoo (Alg. 16, ``method="shampoo"``) and TNT (Alg. 15, ``method="tnt"``)."""

    def __init__(self, twin, model, theta, *, method, lr, damping, momentum, beta, T1, T2, batch, root="newton",
                 fisher="sampled", weight_decay=0.0):
        self.twin, self.model, self.method, self.root, self.fisher = twin, model, method, root, fisher
        self.lr, self.eps, self.mu, self.beta, self.T1, self.T2, self.batch = lr, damping, momentum, beta, T1, T2, batch
        self.wd = weight_decay
        self.k = 0
        self.mom = np.zeros_like(theta)
        self.bl = blocks(model)
        objs = chunk_objectives(twin, batch)
        if len(objs) > 1 and objs[-1].n_samples < objs[0].n_samples:
            objs = objs[:-1]                      # documented: a trailing smaller batch is dropped
        self.parts = None
        total = None
        for obj in objs:
            p = obj.at(theta)
            if self.parts is None:
                self.parts = tensor_parts(model, p.layer_stats("empirical"))
            c = self.contractions(self.stat_grad(p))
            total = c if total is None else [[x + y for x, y in zip(a, b)] for a, b in zip(total, c)]
        self.stats = [[x / len(objs) for x in a] for a in total]
        self.recompute()

    def stat_grad(self, p):
        """Ḡ: the minibatch gradient (Shampoo, TNT-EF), or (TNT, Alg. 15 l. 7) the minibatch mean of the
        gradients at targets ỹ sampled from the model: the gradient of the batch loss at ỹ."""
        if self.method == "shampoo" or self.fisher == "empirical":
            return p.grad
        yt = p.sampled_targets()
        o = p.obj
        from qnref.curvature.objective import Objective   # the model's objective, not an optimizer helper
        return Objective(o.model, o.loss, o.X, yt, 0.0, train=o.train, validate=False).at(p.theta).grad

    def contractions(self, g):
        out = []
        for q in self.parts:
            X = get_part(g, self.bl, q)
            out.append([unfold(X, i) @ unfold(X, i).T for i in range(X.ndim)])
        return out

    def recompute(self):
        self.precond = []
        for q, S in zip(self.parts, self.stats):
            shape = q[2]
            k = len(shape)
            if self.method == "shampoo":
                f = newton_root if self.root == "newton" else eig_root
                self.precond.append([f(M, 2 * k, self.eps) for M in S])
            else:   # TNT (4.10): Ũᵢ = Ĝ⁽ⁱ⁾ / (c₀^{k−1} Π_{j≠i} dⱼ), c₀ = (tr Ĝ⁽ⁱ⁾ / Π dⱼ)^{1/k}
                total = int(np.prod(shape))
                c0 = (np.trace(S[0]) / total) ** (1.0 / k)
                Us = [M / (c0 ** (k - 1) * (total // shape[i])) for i, M in enumerate(S)]
                self.precond.append([inv(U + self.eps * np.eye(len(U))) for U in Us])

    def step(self, theta):
        obj = self.twin.batch(self.batch)
        p = obj.at(theta)
        grad = p.grad
        self.k += 1
        self.mom = self.mu * self.mom + grad                            # Alg. 15 l. 10 / Alg. 16 l. 7
        if self.k % self.T1 == 0:
            new = self.contractions(self.stat_grad(p))
            self.stats = [[self.beta * o + (1 - self.beta) * n for o, n in zip(a, b)] for a, b in zip(self.stats, new)]
        if self.k % self.T2 == 0:
            self.recompute()
        P = np.zeros_like(theta)
        for q, Us in zip(self.parts, self.precond):
            X = get_part(self.mom, self.bl, q)
            for i, U in enumerate(Us):
                X = mode_mult(X, U, i)
            set_part(P, self.bl, q, X)
        return theta - self.lr * (P + self.wd * theta)


# -- SMW-GN / SMW-NG (Alg. 23) with a dense solve ---------------------------------------------------------------
def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def dense_jacobian(point, n):
    """J (N, C, n): output Jacobians by n forward-mode products J eⱼ."""
    cols = [point.jvp(e) for e in np.eye(n)]
    return np.stack(cols, axis=-1)


class SMWReplay:
    """Thesis Alg. 23 with p = −(B + λI)⁻¹ g by a dense solve (B of eq. (5.2) GN or (5.3) NG on S₂;
    softmax cross-entropy, H_i = diag(s) − s sᵀ), ρ of (5.5) at θ + p on S₁, the LM rule of §5.2.3."""

    def __init__(self, twin, *, curvature, lr, N1, N2, lambda_lm=1.0, tau=1e-3, boost=1.01, drop=0.99, eps=0.25):
        self.twin, self.curv = twin, curvature
        self.lr, self.N1, self.N2 = lr, N1, N2
        self.lam_lm, self.tau, self.boost, self.drop, self.eps = lambda_lm, tau, boost, drop, eps
        self.t = 0
        self.last = {}

    def step(self, theta):
        obj1 = self.twin.batch(self.N1)
        p1 = obj1.at(theta)
        f0, g = p1.value, p1.grad
        idx = np.sort(self.twin.rng.choice(obj1.n_samples, size=self.N2, replace=False)) if self.N2 < obj1.n_samples \
            else None
        obj2 = obj1 if idx is None else obj1.subset(idx)
        p2 = obj2.at(theta)
        n = len(theta)
        J = dense_jacobian(p2, n)                                 # (N2, C, n)
        s = softmax(p2.z)
        if self.curv == "gn":
            H = np.stack([np.diag(si) - np.outer(si, si) for si in s])
            B = np.einsum("icn,icd,idm->nm", J, H, J) / self.N2
        else:
            e = s.copy()
            y = obj2.y
            e[np.arange(len(y)), y] -= 1.0                        # ∂ℓᵢ/∂zᵢ
            G = np.einsum("ic,icn->in", e, J)                     # per-example gradients ∇ℓᵢ
            B = G.T @ G / self.N2
        lam = self.lam_lm + self.tau
        pvec = -np.linalg.solve(B + lam * np.eye(n), g)
        pred = -(g @ pvec) - 0.5 * pvec @ B @ pvec
        f1 = obj1.at(theta + pvec).value
        rho = (f0 - f1) / pred
        if rho < self.eps:
            self.lam_lm *= self.boost
        elif rho > 1 - self.eps:
            self.lam_lm *= self.drop
        self.t += 1
        self.last = {"rho": rho, "lambda": lam, "model_decrease": pred, "loss_trial": f1}
        return theta + self.lr * pvec
