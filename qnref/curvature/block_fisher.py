"""Block-diagonal Fisher reference direction and the cosine-similarity study of Ren's thesis Fig. 4.1
(§4.3.4, L1928-1932).

The thesis compares the directions of TNT, KFAC, Shampoo, Adam and SGD-m with that of a *block Fisher
method*, "where each block corresponded to one layer's full Fisher matrix" (L1930), on a 256-20-20-20-20-10
MLP (Martens & Grosse 2015) and 16×16 MNIST: the block-Fisher method makes the trajectory, and every other
method computes its direction, with its own moving averages (decay 0.9), at the block-Fisher iterates.

Block Fisher (this module; :class:`BlockFisher`), per step k on the batch M_k at θ_k::

    ĝ ← β ĝ + (1 − β) ∇f_{M_k}(θ_k)                    moving average of the gradient (β = 0.9, L1930)
    F_l = (1/m) Σᵢ vec_r(∇_{W̄_l} ℓᵢ) vec_r(∇_{W̄_l} ℓᵢ)ᵀ   per-layer Fisher block (targets ỹ ~ p(y|x):
                                                       "sampled"; "empirical"; "exact" = E_ỹ)
    F̂_l ← β F̂_l + (1 − β) F_l                          (β = 0.9, L1930)
    d_l = (F̂_l + λ I)⁻¹ ĝ_l                            dense damped solve per Kronecker layer W̄_l
    d   = ĝ                                            every other block (as KFAC, thesis §4.7.2)
    θ ← θ − α d

In our row-major layout vec_r(∇W̄) = g ⊗ ā, so F_l is the exact block that KFAC approximates by G ⊗ A
(:mod:`qnref.curvature.kron`). F̂_l starts from the Fisher block of the whole training set (the warm start
every compared method uses, thesis §4.7.2). The per-example gradients come from
:meth:`Point.per_example_grads` (examples must be independent: no BatchNorm in training mode); the
"exact" expectation enumerates the labels weighted by p (softmax cross-entropy).

:func:`cosine_study` runs the block-Fisher method for ``steps`` steps and records, per Kronecker layer,
the cosine between its direction d_l and each compared method's direction at the same θ_k:

* ``kfac``: KFAC's statistics (thesis Alg. 12 l. 12-19) updated on the block-Fisher point θ_k (same batch,
  same ỹ), inverses every step (T₁ = T₂ = 1), π-split damping, momentum ĝ ← μĝ + ∇f — built from
  :func:`kron.factors`, :func:`kron.ema`, :func:`kron.damped_inverses`, :func:`kron.precondition`;
* ``tnt``, ``shampoo``, ``momentum`` (SGD-m), ``adam``: the registered optimizers, each stepping from θ_k on a
  twin of the problem (same data and seed, hence the same batches) with T₁ = T₂ = 1; its direction is
  (θ_k − θ_new)/α (no weight decay), and its state carries its moving averages from step to step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import kron

__all__ = ["fisher_blocks", "BlockFisher", "cosine", "layer_cosines", "cosine_study", "StudyResult",
           "kron_slices", "KFACDirection", "digits_study_problem", "plot_cosines", "DEFAULT_METHODS"]


def kron_slices(model) -> dict[str, tuple[slice, tuple]]:
    """{Kronecker layer name: (slice of its W̄ block in the flat θ, W̄ shape)}, in model order."""
    starts, start = {}, 0
    for b in model.layout.blocks:
        size = int(math.prod(b.shape)) if len(b.shape) else 1
        starts[b.name] = (slice(start, start + size), tuple(b.shape))
        start += size
    return {layer.name: starts[f"{layer.name}.W"] for layer in model.kron_layers}


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def fisher_blocks(point: Any, model: Any, targets: str = "sampled") -> dict[str, Any]:
    """F_l = (1/N) Σᵢ rᵢ,ₗ rᵢ,ₗᵀ of every Kronecker layer from the per-example gradient rows rᵢ of the
    point (the data term). ``targets``: "sampled" (the point's ỹ), "empirical" (true labels) or
    "exact" (Σ_c p_ic rᵢ(c)rᵢ(c)ᵀ over the labels c; softmax cross-entropy)."""
    if targets not in ("sampled", "empirical", "exact"):
        raise ValueError(f"targets must be 'sampled', 'empirical' or 'exact', got {targets!r}")
    sl = kron_slices(model)
    N = point.N
    if targets != "exact":
        R = point.per_example_grads(targets)
        return {name: R[:, s].T @ R[:, s] / N for name, (s, _) in sl.items()}
    if point.obj.loss.name != "softmax_ce":
        raise ValueError(f"targets='exact' enumerates labels: softmax_ce only, got the loss {point.obj.loss.name!r}")
    p = _softmax(point.z)
    out = {name: 0 for name in sl}
    for c in range(p.shape[1]):
        R = point.per_example_grads(np.full(N, c, dtype=np.int64)) * np.sqrt(p[:, c:c + 1])
        for name, (s, _) in sl.items():
            out[name] = out[name] + R[:, s].T @ R[:, s] / N
    return out


def cosine(u: Any, v: Any) -> float:
    """uᵀv / (‖u‖ ‖v‖); a zero vector has no direction (ValueError)."""
    u, v = np.asarray(u, dtype=float).ravel(), np.asarray(v, dtype=float).ravel()
    if u.shape != v.shape:
        raise ValueError(f"cosine needs vectors of one size, got {u.size} and {v.size}")
    nu, nv = float(np.linalg.norm(u)), float(np.linalg.norm(v))
    if not (nu > 0 and nv > 0 and math.isfinite(nu) and math.isfinite(nv)):
        raise ValueError(f"cosine needs finite nonzero vectors, got norms {nu} and {nv}")
    return float(u @ v) / (nu * nv)


def layer_cosines(model: Any, d_ref: Any, d: Any) -> dict[str, float]:
    """Cosine between two flat directions on each Kronecker layer's W̄ block."""
    return {name: cosine(d_ref[s], d[s]) for name, (s, _) in kron_slices(model).items()}


@dataclass
class BlockFisher:
    """The block-Fisher reference method (module docstring). ``damping`` λ, ``beta`` the decay of ĝ and F̂."""

    model: Any
    damping: float = 1e-3
    beta: float = 0.9
    targets: str = "sampled"
    mom: Any = None
    F: dict = field(default_factory=dict)

    def __post_init__(self):
        if not (self.damping > 0 and math.isfinite(self.damping)):
            raise ValueError(f"damping must be finite and > 0, got {self.damping!r}")
        if not (0 <= self.beta < 1):
            raise ValueError(f"beta must lie in [0, 1), got {self.beta!r}")

    def warm(self, problem: Any, theta: Any, chunk: int) -> None:
        """F̂ = the Fisher blocks of the whole training set (consecutive chunks), ĝ = 0."""
        n, acc = problem.n_samples, {}
        for start in range(0, n, chunk):
            obj = problem.subset(np.arange(start, min(n, start + chunk)))
            for name, F in fisher_blocks(obj.at(theta), self.model, self.targets).items():
                acc[name] = acc.get(name, 0) + obj.n_samples * F
        self.F = {name: F / n for name, F in acc.items()}
        self.mom = np.zeros_like(theta)

    def update(self, point: Any) -> None:
        """ĝ and F̂ moving averages with the batch point's gradient and Fisher blocks."""
        self.mom = self.beta * self.mom + (1 - self.beta) * point.grad
        for name, F in fisher_blocks(point, self.model, self.targets).items():
            self.F[name] = kron.ema(self.F[name], F, self.beta)

    def direction(self) -> Any:
        """d: (F̂_l + λI)⁻¹ ĝ_l on the Kronecker blocks (Cholesky solve), ĝ elsewhere."""
        d = self.mom.copy()
        for name, (s, _) in kron_slices(self.model).items():
            F = self.F[name]
            L = np.linalg.cholesky(F + self.damping * np.eye(len(F)))
            d[s] = np.linalg.solve(L.T, np.linalg.solve(L, self.mom[s]))
        return d


class KFACDirection:
    """KFAC's direction at given points (thesis Alg. 12 with T₁ = T₂ = 1, statistics on the given point):
    A, G ← EMA with the point's taps, (H_A, H_G, π) = damped inverses, ĝ ← μĝ + ∇f, P_l = H_G ĝ_l H_A."""

    def __init__(self, model: Any, damping: float, momentum: float = 0.9, beta: float = 0.9,
                 targets: str = "sampled"):
        self.model, self.damping, self.momentum, self.beta, self.targets = model, damping, momentum, beta, targets
        self.A, self.G, self.mom = {}, {}, None

    def warm(self, problem: Any, theta: Any, chunk: int) -> None:
        n, sA, sG = problem.n_samples, {}, {}
        for start in range(0, n, chunk):
            obj = problem.subset(np.arange(start, min(n, start + chunk)))
            for name, t in obj.at(theta).layer_stats(self.targets).items():
                A, G = kron.factors(t)
                sA[name] = sA.get(name, 0) + obj.n_samples * A
                sG[name] = sG.get(name, 0) + obj.n_samples * G
        self.A = {k: v / n for k, v in sA.items()}
        self.G = {k: v / n for k, v in sG.items()}
        self.mom = np.zeros_like(theta)

    def direction(self, point: Any) -> Any:
        for name, t in point.layer_stats(self.targets).items():
            A, G = kron.factors(t)
            self.A[name], self.G[name] = kron.ema(self.A[name], A, self.beta), kron.ema(self.G[name], G, self.beta)
        self.mom = self.momentum * self.mom + point.grad
        P = self.mom.copy()
        for name, (s, shape) in kron_slices(self.model).items():
            HA, HG, _ = kron.damped_inverses(self.A[name], self.G[name], self.damping)
            P[s] = kron.precondition(self.mom[s].reshape(shape), HG, HA).ravel()
        return P


@dataclass
class StudyResult:
    """Per method: an array (steps, layers) of cosines with the block-Fisher direction; the layer
    names; the block-Fisher batch losses."""

    layers: list
    cosines: dict
    losses: list

    def mean(self) -> dict[str, list[float]]:
        """Mean cosine over the steps, per method and layer."""
        return {m: [float(x) for x in np.mean(c, axis=0)] for m, c in self.cosines.items()}


#: compared methods of Fig. 4.1 and their settings for the study (T₁ = T₂ = 1: every direction uses
#: the statistics of the current point; KFAC's λ is the block-Fisher λ of the study, TNT's and Shampoo's ε
#: the thesis's MNIST values, Table 4.3; the thesis gives none for the study)
DEFAULT_METHODS: dict[str, dict] = {
    "kfac": {},
    "tnt": {"lr": 1e-4, "damping": 0.1, "stat_freq": 1, "inv_freq": 1},
    "shampoo": {"lr": 3e-4, "damping": 3e-4, "stat_freq": 1, "inv_freq": 1, "root": "eigh"},
    "momentum": {"lr": 0.01, "momentum": 0.9},
    "adam": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.9, "eps": 1e-8},
}


def cosine_study(make_problem: Callable[[], Any], theta: Any, *, steps: int = 20, lr: float = 0.01,
                 damping: float = 1e-3, batch_size: int = 256, beta: float = 0.9, targets: str = "sampled",
                 methods: dict | None = None) -> StudyResult:
    """Run the block-Fisher method from θ for ``steps`` steps (its own problem ``make_problem()``) and
    record each compared method's per-layer cosine with it at every iterate (module docstring).

    ``make_problem`` builds a fresh :class:`~qnref.optim.base.Problem` with the same data and seed on
    every call (one per optimizer: the same batches); ``methods`` maps names ("kfac" or registered
    optimizers) to their hyperparameters (:data:`DEFAULT_METHODS`)."""
    from ..optim.registry import make_optimizer  # noqa: PLC0415 - the optimizers depend on this package

    methods = DEFAULT_METHODS if methods is None else methods
    prob = make_problem()
    model = prob.model
    bf = BlockFisher(model, damping=damping, beta=beta, targets=targets)
    bf.warm(prob, theta, batch_size)
    kfac = None
    twins = {}
    for name, hp in methods.items():
        if name == "kfac":
            kfac = KFACDirection(model, hp.get("damping", damping), hp.get("momentum", 0.9), beta, targets)
            kfac.warm(prob, theta, batch_size)
        else:
            opt = make_optimizer(name, batch_size=batch_size, **hp)
            twins[name] = (opt, make_problem(), opt.init(theta))
    cos = {name: [] for name in methods}
    losses = []
    th = theta
    for _ in range(steps):
        point = prob.batch(batch_size).at(th)
        losses.append(point.value)
        bf.update(point)
        d = bf.direction()
        if kfac is not None:
            cos["kfac"].append(list(layer_cosines(model, d, kfac.direction(point)).values()))
        for name, (opt, tp, st) in twins.items():
            th_new, st, info = opt.step(th, st, tp)
            if not info.accepted:
                raise RuntimeError(f"{name} refused its step at the block-Fisher iterate: {info}")
            twins[name] = (opt, tp, st)
            cos[name].append(list(layer_cosines(model, d, (th - th_new) / opt.lr).values()))
        th = th - lr * d
    return StudyResult([L.name for L in model.kron_layers], {k: np.array(v) for k, v in cos.items()}, losses)


def digits_study_problem(size: int = 8, widths: tuple = (20, 20, 20, 20), seed: int = 0):
    """(make_problem, θ₀, model) for the Fig. 4.1 study on scikit-learn's digits: 8×8 images (or
    upsampled to ``size`` × ``size`` by pixel replication, 16 for the thesis's 16×16 MNIST), a
    size²-20-20-20-20-10 tanh MLP (Martens & Grosse 2015's layer widths), softmax cross-entropy."""
    from sklearn.datasets import load_digits  # noqa: PLC0415

    from ..nn.activations import Tanh  # noqa: PLC0415
    from ..nn.dense import Dense  # noqa: PLC0415
    from ..nn.model import Sequential  # noqa: PLC0415
    from ..optim.base import Problem  # noqa: PLC0415

    if size % 8:
        raise ValueError(f"size must be a multiple of 8 (8×8 digits upsampled), got {size!r}")
    d = load_digits()
    X = d.images / 16.0
    if size != 8:
        X = np.kron(X, np.ones((1, size // 8, size // 8)))
    X = X.reshape(len(X), -1)
    X = (X - X.mean(axis=0)) / np.maximum(X.std(axis=0), 1e-8)
    y = d.target.astype(np.int64)
    layers = []
    for w in widths:
        layers += [Dense(w), Tanh()]
    model = Sequential(layers + [Dense(10)], input_shape=(X.shape[1],))
    return (lambda: Problem(model, "softmax_ce", X, y, seed=seed)), model.init(seed), model


def plot_cosines(result: StudyResult, path: str, *, title: str = "") -> None:
    """A Fig. 4.1-like figure: one panel per Kronecker layer, cosine with the block-Fisher direction
    against the step, one line per method (matplotlib, Agg backend; written to ``path``)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    n = len(result.layers)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 2.8), sharey=True, squeeze=False)
    for j, (ax, layer) in enumerate(zip(axes[0], result.layers)):
        for method, c in result.cosines.items():
            ax.plot(np.arange(1, c.shape[0] + 1), c[:, j], label=method, lw=1.2)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylim(-0.2, 1.0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("cosine with block Fisher", fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
