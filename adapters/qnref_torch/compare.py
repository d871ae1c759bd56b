"""Oracle comparisons: every qnref product against torch.func on the same model, data and θ.

``compare(module, loss, X, y)`` converts ``module`` (a float64 deep copy; the caller's module is
not touched) with :func:`qnref_torch.convert.convert`, evaluates each requested quantity with
qnref (:class:`qnref.curvature.objective.Objective` in float64) and independently with torch, and
returns the maximum relative difference of each::

    rel(q, t) = max |q − t| / max |t|        (t = torch's value, elementwise over the whole array)

Torch side, all differentiated with respect to qnref's θ (torch parameters are *views* of one flat
θ tensor in qnref's layout, W̄ = [W b], see :func:`~qnref_torch.convert.theta_to_torch_params`):

=================  ==========================================================================
``value``          f(θ) = torch_loss(module(X), y) / c + (λ/2)‖θ‖²  (c: :mod:`qnref_torch.losses`)
``outputs``        module(X) vs qnref's forward
``grad``           ``torch.func.grad(f)``
``jvp``            ``torch.func.jvp(net, θ, v)``: J v (N × outputs)
``vjp``            ``torch.func.vjp(net, θ)`` applied to a random output-space u: Jᵀ u
``hvp``            forward-over-reverse ``torch.func.jvp(torch.func.grad(f), θ, v)`` (reverse-over-reverse
                   where a torch op has no forward-mode backward, see :func:`torch_hvp`)
``ggn``            Jᵀ (∇²_z L) J v + λ v: jvp of the net, jvp-of-grad of the loss in z (torch's own
                   loss Hessian), vjp of the net
``fisher``         empirical Fisher (1/N) Σᵢ gᵢ gᵢᵀ v with gᵢ from ``torch.func.vmap(torch.func.grad(ℓᵢ))``
``per_example_grads``  the N × n matrix of those gᵢ
``kfac_factors``   per Linear / Conv2d layer, from forward hooks (inputs) and full backward hooks
                   (output gradients of the summed loss Σᵢ ℓᵢ): dense A = (1/N) Σᵢ āᵢāᵢᵀ,
                   G = (1/N) Σᵢ gᵢgᵢᵀ; conv (KFC) A = (1/N) Σᵢ Σₜ āᵢₜāᵢₜᵀ (patches from ``F.unfold``),
                   G = (1/(N L)) Σᵢ Σₜ gᵢₜgᵢₜᵀ; qnref's from ``Point.layer_stats("empirical")``.
                   The reported number is the max over layers and both factors.
=================  ==========================================================================

v is a standard normal vector in Rⁿ and u a standard normal output-space array, both drawn from
``numpy.random.default_rng(seed)``. ``value`` and ``outputs`` are always reported. Products with
per-example quantities (fisher, per_example_grads) need independent examples: for a module in
training mode with BatchNorm they raise (put the module in ``eval()``).
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Sequence

import numpy
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from qnref.curvature.objective import Objective

from .convert import Conversion, convert, theta_to_torch_params
from .losses import outputs_per_example, resolve_loss

__all__ = ["compare", "assert_agree", "rel_diff", "torch_hvp", "drop_running_stats", "DEFAULT_WHAT", "ALL_WHAT"]

DEFAULT_WHAT = ("grad", "jvp", "vjp", "hvp", "ggn", "fisher", "kfac_factors")
ALL_WHAT = DEFAULT_WHAT + ("value", "outputs", "per_example_grads")


def rel_diff(a: Any, b: Any) -> float:
    """max |a − b| / max |b| (b the reference), in float64; 0 when both are exactly zero."""
    a = numpy.asarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a, dtype=numpy.float64)
    b = numpy.asarray(b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else b, dtype=numpy.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    diff = float(numpy.abs(a - b).max()) if a.size else 0.0
    scale = float(numpy.abs(b).max()) if b.size else 0.0
    if scale == 0.0:
        return diff
    return diff / scale


def _as_torch(a: Any, *, labels: bool = False) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(numpy.asarray(a))
    t = t.detach().cpu()
    if labels:
        return t.long()
    return t.double()


def _prepare(module: nn.Module, loss: Any, X: Any, y: Any, input_shape: Sequence[int] | None):
    name, loss_fn, cfun = resolve_loss(loss)
    mod = copy.deepcopy(module).to("cpu", torch.float64)
    Xt = _as_torch(X)
    is_labels = (isinstance(y, torch.Tensor) and not y.is_floating_point()) or (
        not isinstance(y, torch.Tensor) and numpy.asarray(y).dtype.kind in "iu")
    yt = _as_torch(y, labels=is_labels)
    conv = convert(mod, tuple(input_shape) if input_shape is not None else tuple(Xt.shape[1:]), dtype="float64")
    if mod.training:
        drop_running_stats(mod)
    return name, loss_fn, cfun, mod, Xt, yt, conv


def drop_running_stats(module: nn.Module) -> None:
    """Make the BatchNorm layers of a training-mode module stateless (in place).

    torch's BatchNorm updates its running statistics in every training-mode forward, an in-place
    buffer mutation that torch.func transforms reject. With ``running_mean = running_var =
    num_batches_tracked = None`` torch normalises with batch statistics and touches no buffer —
    the same function of θ (qnref's BatchNorm never updates statistics inside a product either).
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None


def torch_hvp(fun, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """∇²fun(x) v by forward-over-reverse (``jvp`` of ``grad``).

    Some torch ops lack a forward-mode derivative of their backward (in torch 2.13 ``mse_loss``'s
    backward fails under ``jvp`` with "ZeroTensors are immutable"); then reverse-over-reverse
    (``vjp`` of ``grad``, equal because the Hessian is symmetric) is used instead.
    """
    try:
        return jvp(grad(fun), (x,), (v,))[1]
    except (RuntimeError, NotImplementedError):
        return vjp(grad(fun), x)[1](v)[0]


def _kfac_torch(conv: Conversion, mod: nn.Module, Xt, yt, loss_fn, c_sum: float) -> dict[str, tuple]:
    acts: dict[str, torch.Tensor] = {}
    gouts: dict[str, torch.Tensor] = {}
    handles = []
    for lname, m in conv.torch_layers.items():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            handles.append(m.register_forward_hook(lambda mm, inp, out, k=lname: acts.__setitem__(k, inp[0].detach())))
            handles.append(m.register_full_backward_hook(lambda mm, gin, gout, k=lname: gouts.__setitem__(k, gout[0].detach())))
    try:
        Xr = Xt.clone().requires_grad_(True)
        with torch.enable_grad():
            total = loss_fn(mod(Xr), yt) / c_sum  # Σᵢ ℓᵢ (per-example gradients in the hooks)
            total.backward()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for lname, m in conv.torch_layers.items():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        a, g = acts[lname], gouts[lname]
        n = a.shape[0]
        if isinstance(m, nn.Linear):
            abar = torch.cat([a, torch.ones(n, 1, dtype=a.dtype)], 1)
            out[lname] = (abar.T @ abar / n, g.T @ g / n)
        else:
            cols = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # (N, K, L)
            cols = cols.transpose(1, 2)  # (N, L, K): rows (oh, ow), columns (c, i, j)
            abar = torch.cat([cols, torch.ones(cols.shape[:2] + (1,), dtype=a.dtype)], 2).reshape(-1, cols.shape[2] + 1)
            L = cols.shape[1]
            g2 = g.reshape(n, g.shape[1], -1).transpose(1, 2).reshape(-1, g.shape[1])  # (N·L, C_out)
            out[lname] = (abar.T @ abar / n, g2.T @ g2 / (n * L))
    return out


def _kfac_qnref(point) -> dict[str, tuple]:
    out = {}
    for lname, t in point.layer_stats("empirical").items():
        a, g = t["a"], t["g"]
        n = a.shape[0]
        if t["kind"] == "dense":
            out[lname] = (a.T @ a / n, g.T @ g / n)
        else:
            L = a.shape[1]
            a2, g2 = a.reshape(-1, a.shape[2]), g.reshape(-1, g.shape[2])
            out[lname] = (a2.T @ a2 / n, g2.T @ g2 / (n * L))
    return out


def compare(
    module: nn.Module,
    loss: Any,
    X: Any,
    y: Any,
    what: Iterable[str] = DEFAULT_WHAT,
    seed: int = 0,
    *,
    input_shape: Sequence[int] | None = None,
    l2: float = 0.0,
    theta: Any = None,
) -> dict[str, float]:
    """Max relative difference qnref vs torch.func of each quantity in ``what`` (plus value, outputs).

    ``loss`` is a qnref loss name or a torch loss module (see :mod:`qnref_torch.losses` for the
    scale mapping). ``X``, ``y`` are NumPy arrays or torch tensors (made float64 / int64 on the
    CPU). The module's ``training`` flag selects qnref's objective: train mode → batch statistics
    (``Objective(train=True)``), eval mode → the running statistics (``train=False``); per-example
    quantities (fisher, per_example_grads) of a training-mode BatchNorm module are
    refused with that advice. ``theta``: ``None`` (default) compares at the module's weights moved
    by 0.1·N(0, 1) (seeded by ``seed``), so zero-initialised biases are tested too; ``"module"`` at
    the module's own weights; or a flat θ in qnref's layout. Any ``nn.Module`` of supported layers
    converts (``torch.fx``, :mod:`qnref_torch.fx`).
    """
    what = tuple(what)
    bad = [w for w in what if w not in ALL_WHAT]
    if bad:
        raise ValueError(f"unknown quantities {bad}; choose from {ALL_WHAT}")
    name, loss_fn, cfun, mod, Xt, yt, conv = _prepare(module, loss, X, y, input_shape)
    model = conv.model
    if theta is None:   # the module's weights moved by 0.1·N(0, 1): biases (0 at torch's init) get tested too
        theta = conv.theta + 0.1 * numpy.random.default_rng(seed + 7919).standard_normal(conv.theta.shape)
    elif isinstance(theta, str) and theta == "module":
        theta = conv.theta
    else:
        theta = numpy.array(theta, dtype=numpy.float64)
        if theta.shape != conv.theta.shape:
            raise ValueError(f"theta must have the converted model's {conv.theta.shape[0]} entries (qnref layout), "
                             f"got shape {theta.shape}")
    N = Xt.shape[0]
    train = mod.training   # BatchNorm: batch statistics in train mode, running statistics in eval mode
    per_example = {"fisher", "per_example_grads"} & set(what)
    if train and model.couples_examples and per_example:
        raise ValueError(f"{sorted(per_example)} need independent examples, but the module has BatchNorm in training "
                         "mode (batch statistics couple the examples): call module.eval() for them, or leave them "
                         "out of what= (grad, jvp, vjp, hvp, ggn and kfac_factors work in both modes)")
    obj = Objective(model, name, Xt.numpy(), yt.numpy(), l2, train=train)
    pt = obj.at(theta)
    C = outputs_per_example(tuple(pt.z.shape))
    c = cfun(N, C)
    th = torch.from_numpy(theta.copy())
    with torch.no_grad():   # the deep copy holds θ too (the hooks of kfac_factors run the module itself)
        named = dict(mod.named_parameters())
        for k, t in theta_to_torch_params(conv, th).items():
            named[k].copy_(t)

    def net(t):
        return functional_call(mod, theta_to_torch_params(conv, t), (Xt,))

    def f(t):
        val = loss_fn(net(t), yt) / c
        return val + 0.5 * l2 * (t @ t) if l2 else val

    rng = numpy.random.default_rng(seed)
    v = rng.standard_normal(theta.shape[0])
    u = rng.standard_normal(pt.z.shape)
    vt, ut = torch.from_numpy(v), torch.from_numpy(u)
    res: dict[str, float] = {}
    with torch.no_grad():
        z = net(th)
    res["outputs"] = rel_diff(pt.z, z)
    res["value"] = rel_diff(numpy.asarray(pt.value), f(th).detach())
    if "grad" in what:
        res["grad"] = rel_diff(pt.grad, grad(f)(th))
    if "jvp" in what:
        res["jvp"] = rel_diff(pt.jvp(v), jvp(net, (th,), (vt,))[1])
    if "vjp" in what:
        res["vjp"] = rel_diff(pt.vjp(u), vjp(net, th)[1](ut)[0])
    if "hvp" in what:
        res["hvp"] = rel_diff(pt.hvp(v), torch_hvp(f, th, vt))
    if "ggn" in what:
        z0, jv = jvp(net, (th,), (vt,))
        hjv = torch_hvp(lambda zz: loss_fn(zz, yt) / c, z0.detach(), jv)
        gv = vjp(net, th)[1](hjv)[0] + l2 * vt
        res["ggn"] = rel_diff(pt.ggn_vp(v), gv)
    if "fisher" in what or "per_example_grads" in what:
        c1 = cfun(1, C)

        def li(t, x, yy):
            return loss_fn(functional_call(mod, theta_to_torch_params(conv, t), (x[None],)), yy[None]) / c1

        G = vmap(grad(li), in_dims=(None, 0, 0))(th, Xt, yt)
        if "per_example_grads" in what:
            res["per_example_grads"] = rel_diff(pt.per_example_grads(), G)
        if "fisher" in what:
            res["fisher"] = rel_diff(pt.fisher_vp(v, "empirical"), G.T @ (G @ vt) / N)
    if "kfac_factors" in what:
        tq = _kfac_qnref(pt)
        tt = _kfac_torch(conv, mod, Xt, yt, loss_fn, c / N)
        if set(tq) != set(tt):
            raise AssertionError(f"Kronecker layers differ: qnref {sorted(tq)}, torch {sorted(tt)}")
        res["kfac_factors"] = max((max(rel_diff(tq[k][0], tt[k][0]), rel_diff(tq[k][1], tt[k][1])) for k in tq), default=0.0)
    return res


def assert_agree(module: nn.Module, loss: Any, X: Any, y: Any, what: Iterable[str] = DEFAULT_WHAT, seed: int = 0, *,
                 rtol: float = 1e-10, **kw: Any) -> dict[str, float]:
    """pytest helper: :func:`compare` and fail listing every quantity whose difference exceeds ``rtol``."""
    res = compare(module, loss, X, y, what, seed, **kw)
    bad = {k: v for k, v in res.items() if not v <= rtol}
    if bad:
        raise AssertionError(f"qnref and torch disagree beyond rtol={rtol:g}: "
                             + ", ".join(f"{k}={v:.3e}" for k, v in bad.items()) + f" (all: {res})")
    return res
