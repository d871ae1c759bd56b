"""Oracle comparisons of qnref's products against JAX (the twin of :mod:`qnref_torch.compare`).

``compare(spec, loss, X, y)`` builds the qnref model from the spec (:func:`~qnref_jax.convert.from_spec`),
evaluates every requested product with qnref (float64) and with JAX — differentiating
``f(θ) = loss(apply(θ), y) + (λ/2)‖θ‖²`` with respect to qnref's own θ, so no permutation is
involved — and returns max |q − j| / max |j| per quantity:

=================  ==========================================================================
``grad``           ``jax.grad(f)``
``jvp`` / ``vjp``  ``jax.jvp`` / ``jax.vjp`` of θ ↦ apply(θ, X)
``hvp``            forward-over-reverse ``jax.jvp(jax.grad(f), θ, v)``
``ggn``            Jᵀ (∇²_z loss) J v + λ v (jvp, jvp-of-grad of the loss in z, vjp)
``fisher``         (1/N) Σ gᵢ gᵢᵀ v with gᵢ from ``jax.vmap(jax.grad(ℓᵢ))``
``per_example_grads`` the N × n matrix of the gᵢ
``kfac_factors``   explicit (residual children included): the inputs āₗ of every dense/conv layer and gₗ = ∂(Σᵢ ℓᵢ)/∂hₗ (gradient
                   with respect to a zero perturbation added to the layer's output); factors as in
                   :mod:`qnref_torch.compare` (dense: A = (1/N)Σāāᵀ, G = (1/N)Σggᵀ; conv: KFC, patches by
                   ``lax.conv_general_dilated_patches``)
=================  ==========================================================================

Losses are qnref names with qnref's conventions (batch mean; mse = ½‖z − y‖² summed over outputs;
sigmoid_ce summed over outputs). It runs inside ``jax.enable_x64(True)`` (scoped, never process-wide): JAX
would silently compute in float32 otherwise.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy

from qnref.curvature.objective import Objective
from qnref.nn.dense import Dense

from .convert import apply, from_spec, layer_keys, split, theta_to_params

__all__ = ["compare", "assert_agree", "rel_diff", "jax_loss", "DEFAULT_WHAT", "ALL_WHAT"]

DEFAULT_WHAT = ("grad", "jvp", "vjp", "hvp", "ggn", "fisher", "kfac_factors")
ALL_WHAT = DEFAULT_WHAT + ("value", "outputs", "per_example_grads")


def rel_diff(a: Any, b: Any) -> float:
    a, b = numpy.asarray(a, dtype=numpy.float64), numpy.asarray(b, dtype=numpy.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    diff = float(numpy.abs(a - b).max()) if a.size else 0.0
    scale = float(numpy.abs(b).max()) if b.size else 0.0
    return diff / scale if scale else diff


def jax_loss(name: str):
    """qnref's loss ``name`` in jnp: the batch mean of ℓᵢ (see :mod:`qnref.nn.losses`)."""
    import jax
    import jax.numpy as jnp

    name = {"ce": "softmax_ce", "bce": "sigmoid_ce"}.get(name, name)
    if name == "softmax_ce":
        def f(z, y):
            lse = jax.scipy.special.logsumexp(z, axis=1)
            if y.ndim == 1:
                return jnp.mean(lse - jnp.sum(z * jax.nn.one_hot(y, z.shape[1], dtype=z.dtype), axis=1))
            return jnp.mean(lse * y.sum(axis=1) - (y * z).sum(axis=1))
        return f
    if name == "mse":
        return lambda z, y: 0.5 * jnp.sum((z - y) ** 2) / z.shape[0]
    if name == "sigmoid_ce":
        return lambda z, y: jnp.sum(jax.nn.softplus(z) - y * z) / z.shape[0]
    raise ValueError(f"unknown loss {name!r}; choose softmax_ce, mse or sigmoid_ce")


def compare(spec: Sequence[dict], loss: str, X: Any, y: Any, what: Iterable[str] = DEFAULT_WHAT, seed: int = 0, *,
            input_shape: Sequence[int] | None = None, l2: float = 0.0, train: bool = True) -> dict[str, float]:
    """Max relative difference qnref vs JAX of each quantity in ``what`` (plus value and outputs).

    ``train`` is the BatchNorm mode on both sides (batch statistics when True, the spec's running
    statistics when False). Per-example quantities (fisher, per_example_grads) need independent
    examples and raise for a spec with BatchNorm in training mode.
    """
    from .objective import x64_scope  # noqa: PLC0415

    with x64_scope():   # scoped float64 (the process-wide jax_enable_x64 flag is left alone)
        return _compare(spec, loss, X, y, what, seed, input_shape=input_shape, l2=l2, train=train)


def _compare(spec, loss, X, y, what, seed, *, input_shape, l2, train):
    import jax
    import jax.numpy as jnp
    from jax import lax

    what = tuple(what)
    bad = [w for w in what if w not in ALL_WHAT]
    if bad:
        raise ValueError(f"unknown quantities {bad}; choose from {ALL_WHAT}")
    Xn = numpy.asarray(X, dtype=numpy.float64)
    yn = numpy.asarray(y)
    if yn.dtype.kind == "f":
        yn = yn.astype(numpy.float64)
    model, theta = from_spec(spec, tuple(input_shape) if input_shape is not None else Xn.shape[1:])
    structure, _ = split(spec)
    if train and model.couples_examples and {"fisher", "per_example_grads"} & set(what):
        raise ValueError("fisher / per_example_grads need independent examples, but the spec has BatchNorm in "
                         "training mode; pass train=False or leave them out of `what`")
    loss_fn = jax_loss(loss)
    N = Xn.shape[0]
    pt = Objective(model, loss, Xn, yn, l2, train=train).at(theta)
    Xj, yj, th = jnp.asarray(Xn), jnp.asarray(yn), jnp.asarray(theta)

    def net(t, x=Xj, **kw):
        return apply(structure, theta_to_params(model, structure, t), x, train=train, **kw)

    def f(t):
        v = loss_fn(net(t), yj)
        return v + 0.5 * l2 * (t @ t) if l2 else v

    rng = numpy.random.default_rng(seed)
    v = rng.standard_normal(theta.shape[0])
    u = rng.standard_normal(pt.z.shape)
    vj, uj = jnp.asarray(v), jnp.asarray(u)
    jit = jax.jit

    def ggn(t, d):
        z, jv = jax.jvp(net, (t,), (d,))
        hjv = jax.jvp(jax.grad(lambda zz: loss_fn(zz, yj)), (z,), (jv,))[1]
        return jax.vjp(net, t)[1](hjv)[0] + l2 * d

    def li(t, x, yy):
        return loss_fn(net(t, x[None]), yy[None])

    def everything(t, d, w):
        """All requested JAX quantities in one jitted function (one XLA compilation per call)."""
        out = {"outputs": net(t), "value": f(t)}
        if "grad" in what:
            out["grad"] = jax.grad(f)(t)
        if "jvp" in what:
            out["jvp"] = jax.jvp(net, (t,), (d,))[1]
        if "vjp" in what:
            out["vjp"] = jax.vjp(net, t)[1](w)[0]
        if "hvp" in what:
            out["hvp"] = jax.jvp(jax.grad(f), (t,), (d,))[1]  # forward-over-reverse
        if "ggn" in what:
            out["ggn"] = ggn(t, d)
        if "fisher" in what or "per_example_grads" in what:
            G = jax.vmap(jax.grad(li), in_axes=(None, 0, 0))(t, Xj, yj)
            out["per_example_grads"] = G
            out["fisher"] = G.T @ (G @ d) / N
        return out

    J = jit(everything)(th, vj, uj)
    res = {"outputs": rel_diff(pt.z, J["outputs"]), "value": rel_diff(pt.value, J["value"])}
    ours = {"grad": lambda: pt.grad, "jvp": lambda: pt.jvp(v), "vjp": lambda: pt.vjp(u), "hvp": lambda: pt.hvp(v),
            "ggn": lambda: pt.ggn_vp(v), "fisher": lambda: pt.fisher_vp(v, "empirical"),
            "per_example_grads": lambda: pt.per_example_grads()}
    for k, fn in ours.items():
        if k in what:
            res[k] = rel_diff(fn(), J[k])
    if "kfac_factors" in what:
        params = theta_to_params(model, structure, th)

        def record(t):
            r: dict = {}
            apply(structure, theta_to_params(model, structure, t), Xj, train=train, record=r)
            return r

        keys = layer_keys(model, structure)  # apply key → qnref layer (residual children included)
        rec = jit(record)(th)  # inputs of the dense/conv layers
        zero = {k: jnp.zeros((N,) + tuple(keys[k].out_shape)) for k in rec}
        gs = jit(jax.grad(lambda pz: N * loss_fn(apply(structure, params, Xj, train=train, perturb=pz), yj)))(zero)
        worst = 0.0
        taps = pt.layer_stats("empirical")
        if set(taps) != {keys[k].name for k in rec}:
            raise AssertionError(f"Kronecker layers differ: qnref {sorted(taps)}, JAX {sorted(keys[k].name for k in rec)}")
        for k in sorted(rec):
            layer = keys[k]
            a, g = rec[k], gs[k]
            t = taps[layer.name]
            if isinstance(layer, Dense):
                abar = jnp.concatenate([a, jnp.ones((N, 1))], 1)
                At, Gt = abar.T @ abar / N, g.T @ g / N
                Aq, Gq = t["a"].T @ t["a"] / N, t["g"].T @ t["g"] / N
            else:
                kh, kw = layer.kernel_size
                (ph, pw) = layer.padding
                cols = lax.conv_general_dilated_patches(a, (kh, kw), layer.stride, [(ph, ph), (pw, pw)],
                                                        dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                                        precision=lax.Precision.HIGHEST)  # (N, K, Ho, Wo), K order (c, i, j)
                K = cols.shape[1]
                cols = cols.reshape(N, K, -1).transpose(0, 2, 1).reshape(-1, K)
                L = cols.shape[0] // N
                abar = jnp.concatenate([cols, jnp.ones((cols.shape[0], 1))], 1)
                g2 = g.reshape(N, g.shape[1], -1).transpose(0, 2, 1).reshape(-1, g.shape[1])
                At, Gt = abar.T @ abar / N, g2.T @ g2 / (N * L)
                a2, gq = t["a"].reshape(-1, t["a"].shape[2]), t["g"].reshape(-1, t["g"].shape[2])
                Aq, Gq = a2.T @ a2 / N, gq.T @ gq / (N * L)
            worst = max(worst, rel_diff(Aq, At), rel_diff(Gq, Gt))
        res["kfac_factors"] = worst
    return res


def assert_agree(spec, loss, X, y, what: Iterable[str] = DEFAULT_WHAT, seed: int = 0, *, rtol: float = 1e-10, **kw) -> dict:
    """pytest helper: :func:`compare`, failing with every quantity whose difference exceeds ``rtol``."""
    res = compare(spec, loss, X, y, what, seed, **kw)
    bad = {k: v for k, v in res.items() if not v <= rtol}
    if bad:
        raise AssertionError(f"qnref and JAX disagree beyond rtol={rtol:g}: "
                             + ", ".join(f"{k}={v:.3e}" for k, v in bad.items()) + f" (all: {res})")
    return res
