"""An :class:`~qnref.curvature.objective.Objective` twin over an arbitrary torch model (torch.func).

qnref's optimizers only touch an objective through the protocol of
:mod:`qnref.curvature.protocol` (``problem.batch/sample/full/subset`` → ``obj.at(θ)`` → a point's
products). :class:`TorchProblem`, :class:`TorchObjective` and :class:`TorchPoint` implement it for
any ``nn.Module`` (not only convertible ones), so quasi-Newton, trust-region, Hessian-free,
sampled and SMW methods run on torch models unchanged; Kronecker methods (KFAC, K-BFGS, Shampoo,
TNT) need qnref's layer structure and raise
:class:`~qnref.curvature.protocol.UnsupportedProductError` (convert the model instead)::

    problem = TorchProblem(net, "softmax_ce", X, y, l2=1e-4, seed=0)
    theta = problem.get_theta()                 # flat NumPy copy of the trainable parameters
    state = opt.init(theta)
    theta, state, info = opt.step(theta, state, problem)
    problem.set_theta(theta)                    # write back into net's parameters

θ layout
    the trainable parameters (``requires_grad``) in ``named_parameters()`` order, each flattened
    row-major (torch's own layout, *not* qnref's W̄ = [W b]; for a converted model use
    :func:`qnref_torch.convert.theta_to_torch_params` instead).

Objective
    f(θ) = loss(module(X; θ), y) + (λ/2)‖θ‖², where ``loss`` is a qnref name (then qnref's exact
    convention, :func:`qnref_torch.losses.qnref_loss_torch`), a torch loss module, or any callable
    ``loss(z, y) -> scalar`` used *as is* (it is f's data term, so use a mean reduction to match
    qnref's scaling).

Products (all through ``torch.func.functional_call`` with θ split into views). The point
implements the primitives and inherits the derived products
(:class:`~qnref.curvature.derived.PointProducts`):
    value + grad: one forward with autograd, the backward on first use of ``grad``;
    hvp: forward-over-reverse ``jvp(grad(f))`` (reverse-over-reverse if an op lacks forward mode);
    local_jvp / local_vjp: ``torch.func.jvp`` / ``vjp`` of the net;
    local_loss_hvp, local_output_grads, per_example_grads: ``vmap`` over examples of the loss on a
    batch of one, ℓᵢ = loss(zᵢ[None], yᵢ[None]) (so f's data term must be the mean of the ℓᵢ);
    derived: ggn_vp = Jᵀ H_L J v / N + λ v, fisher_vp "empirical", "sampled" (targets drawn from
    the model's predictive distribution with a ``torch.Generator``, or passed explicitly) and
    "exact" (the GGN without L2), gram; layer_stats raises UnsupportedProductError.
    BatchNorm layers in training mode are made stateless (batch statistics, no running-stat
    updates) during every evaluation: see :func:`qnref_torch.compare.drop_running_stats`.

DLPack and copies
    θ arrays are NumPy (CPU) or CuPy (CUDA). When θ lives where the model lives, θ and v enter
    torch with ``torch.from_dlpack`` (zero-copy) and results leave with ``numpy.from_dlpack`` /
    ``cupy.from_dlpack`` (zero-copy; the arrays share memory with torch tensors that nothing else
    references, and are writable). When devices differ (NumPy θ, CUDA model) θ and v are copied
    to the model's device and results copied back to the host: two documented copies per product.
    A θ whose dtype differs from the parameters' raises instead of casting.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import numpy
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from qnref import backend
from qnref.curvature.derived import PointProducts, is_empirical
from qnref.curvature.objective import NonFiniteError, PassCounter, PointMethods
from qnref.curvature.structure import ConvertedModel, OpaqueModel, layout_of, no_layer_structure, positions
from qnref.optim.base import Problem

from .compare import torch_hvp
from .losses import QNREF_LOSSES, qnref_loss_torch, resolve_loss

__all__ = ["TorchObjective", "TorchPoint", "TorchProblem", "LoaderProblem", "to_torch_tensor", "from_torch_tensor", "flat_params"]

_NP_OF_TORCH = {torch.float32: numpy.float32, torch.float64: numpy.float64}


def to_torch_tensor(a: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """NumPy/CuPy → torch, zero-copy via DLPack when ``a`` already lives on ``device``."""
    if isinstance(a, torch.Tensor):
        return a.to(device)
    on_gpu = backend.is_cupy_array(a)
    if (device.type == "cuda") == on_gpu:
        t = torch.from_dlpack(a if a.flags.c_contiguous else a.copy())
    else:  # documented copy across devices
        t = torch.as_tensor(backend.to_numpy(a), device=device)
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"array is {t.dtype} but the model's parameters are {dtype}; use one dtype")
    return t


def from_torch_tensor(t: torch.Tensor, like: Any = None) -> Any:
    """torch → NumPy (CPU tensor) or CuPy (CUDA tensor), zero-copy; copied to the host when ``like`` is NumPy."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.device.type == "cuda":
        if like is not None and not backend.is_cupy_array(like):
            return numpy.from_dlpack(t.cpu())  # documented copy to the host
        return backend.from_dlpack(t)
    return numpy.from_dlpack(t)


def flat_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters in θ order."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def _stateless_bn(module: nn.Module):
    """Temporarily run training-mode BatchNorm layers without running statistics (no buffer updates)."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.running_mean is not None:
            saved.append((m, m.running_mean, m.running_var, m.num_batches_tracked))
            m.running_mean = m.running_var = m.num_batches_tracked = None
    try:
        yield
    finally:
        for m, rm, rv, nb in saved:
            m.running_mean, m.running_var, m.num_batches_tracked = rm, rv, nb


def _resolve(loss: Any) -> Callable:
    if isinstance(loss, str):
        if loss not in QNREF_LOSSES + ("ce", "bce"):
            raise ValueError(f"unknown loss {loss!r}; use {QNREF_LOSSES}, a torch loss module or a callable")
        return qnref_loss_torch(loss)
    if callable(loss):
        return loss
    raise TypeError(f"loss must be a qnref loss name, a torch loss module or a callable, got {type(loss).__name__}")


LAYOUTS = ("torch", "qnref")


class _Params:
    """Shared parameter bookkeeping of one torch model (names, shapes, offsets).

    ``layout="torch"``: θ = the trainable parameters in ``named_parameters()`` order, row-major;
    ``layout="qnref"``: θ in the converted qnref model's layout (W̄ = [W b] blocks), through
    :func:`qnref_torch.convert.theta_to_torch_params`; ``conversion`` is then set.
    """

    def __init__(self, module: nn.Module, layout: str = "torch", input_shape: Any = None):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.module = module
        self.layout_kind = layout
        self.conversion = None
        named = flat_params(module)
        if not named:
            raise ValueError("the module has no trainable parameters")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [tuple(p.shape) for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.n = sum(self.sizes)
        dts = {p.dtype for p in self.params}
        devs = {p.device for p in self.params}
        if len(dts) != 1 or len(devs) != 1:
            raise ValueError(f"all trainable parameters must share one dtype and device, got {dts}, {devs}")
        self.dtype = dts.pop()
        self.device = devs.pop()
        if self.dtype not in _NP_OF_TORCH:
            raise TypeError(f"parameters are {self.dtype}; qnref works in float32 or float64")
        self.xp = backend.xp_for_device("gpu") if self.device.type == "cuda" else numpy
        if layout == "torch":
            self.structure: Any = OpaqueModel(module, layout_of(list(zip(self.names, self.shapes))), "torch")
            return
        from .convert import convert  # noqa: PLC0415  (convert imports nothing from here; kept local for clarity)

        if input_shape is None:
            raise ValueError("layout='qnref' needs the input shape (taken from X by TorchProblem/TorchObjective)")
        frozen = [n for n, q in module.named_parameters() if not q.requires_grad]
        if frozen:
            raise ValueError(f"layout='qnref' optimizes every parameter of the converted model, but {frozen} are "
                             "frozen (requires_grad=False); use layout='torch' (θ = the trainable parameters only)")
        self.conversion = convert(module, tuple(int(d) for d in input_shape), dtype=_NP_OF_TORCH[self.dtype])
        self.n = self.conversion.model.n_params
        self.structure = ConvertedModel(self.conversion.model, lambda: self.couples_examples, module)

    @property
    def couples_examples(self) -> bool:
        """True when a BatchNorm layer is in training mode (its batch statistics couple the examples)."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in self.module.modules())

    def split(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.conversion is not None:
            from .convert import theta_to_torch_params  # noqa: PLC0415

            return theta_to_torch_params(self.conversion, theta)
        out, off = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = theta[off:off + size].view(shape)
            off += size
        return out

    def get(self) -> torch.Tensor:
        if self.conversion is None:
            return torch.cat([p.detach().reshape(-1) for p in self.params])
        theta = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        views = self.split(theta)          # views of θ's blocks, one per torch parameter
        with torch.no_grad():
            for name, p in zip(self.names, self.params):
                views[name].copy_(p.detach())
        return theta

    def set(self, theta: torch.Tensor) -> None:
        parts = self.split(theta)
        with torch.no_grad():
            for name, p in zip(self.names, self.params):
                p.copy_(parts[name])


class TorchObjective(PointMethods):
    """f(θ) = loss(module(X), y) + (λ/2)‖θ‖² on a fixed batch; see the module docstring."""

    def __init__(self, module: nn.Module, loss: Any, X: Any, y: Any, l2: float = 0.0, *,
                 counter: PassCounter | None = None, layout: str = "torch", rng: Any = None,
                 _params: _Params | None = None):
        if not (l2 >= 0) or l2 != l2:
            raise ValueError(f"l2 must be a finite non-negative number, got {l2}")
        self.module = module
        self.loss = loss
        self.loss_fn = _resolve(loss)
        self.l2 = float(l2)
        shape = tuple(X.shape[1:])
        self._p = _params if _params is not None else _Params(module, layout, shape)
        dev = self._p.device
        self.X = X.to(dev) if isinstance(X, torch.Tensor) else to_torch_tensor(X, dev)
        self.y = y.to(dev) if isinstance(y, torch.Tensor) else to_torch_tensor(y, dev)
        if self.X.shape[0] != self.y.shape[0]:
            raise ValueError(f"X has {self.X.shape[0]} examples but y has {self.y.shape[0]}")
        self.counter = counter if counter is not None else PassCounter()
        #: generator of the qnref engine twin's sampled targets (layout="qnref"; the problem's device_rng)
        self.rng = rng if rng is not None else backend.default_rng(0, self.xp)
        self._twin = None

    def engine_objective(self) -> Any:
        """layout="qnref": qnref's own :class:`~qnref.curvature.objective.Objective` on the converted
        model and this batch (layer taps and sampled targets come from it; its passes are not counted)."""
        if self._p.conversion is None:
            raise no_layer_structure("the qnref engine twin (layer taps)", "torch")
        if self._twin is None:
            name = _loss_name(self.loss)
            if not isinstance(self.loss, str) and resolve_loss(self.loss)[2](2, 3) != 1.0:
                raise ValueError(f"layout='qnref' needs a loss with qnref's scaling: a qnref name or a torch loss "
                                 f"module that equals it (CrossEntropyLoss()); got {self.loss!r}")
            X, y = self.X, self.y
            Xn = backend.from_dlpack(X) if X.device.type == "cuda" else X.detach().numpy()
            yn = backend.from_dlpack(y) if y.device.type == "cuda" else y.detach().numpy()
            self._twin = self._p.structure.twin(name, Xn, yn, self.l2, self.rng)
        return self._twin

    # -- what optimizers read -----------------------------------------------------------------------
    @property
    def n_samples(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_params(self) -> int:
        return self._p.n

    @property
    def dtype(self):
        return numpy.dtype(_NP_OF_TORCH[self._p.dtype])

    @property
    def xp(self) -> Any:
        """NumPy (CPU model) or CuPy (CUDA model): the array library of θ and of the results."""
        return self._p.xp

    @property
    def layout(self) -> Any:
        """θ's blocks: the trainable parameters in ``named_parameters()`` order, row-major."""
        return self._p.structure.layout

    @property
    def model(self) -> Any:
        """The :class:`~qnref.curvature.protocol.ModelStructure`: an :class:`OpaqueModel` (layout only,
        no Kronecker layers) for layout="torch", a :class:`~qnref.curvature.structure.ConvertedModel` for layout="qnref"."""
        if self._p.conversion is None:
            self._p.structure.couples_examples = self._p.couples_examples
        return self._p.structure

    @property
    def conversion(self) -> Any:
        """The :class:`~qnref_torch.convert.Conversion` of layout="qnref" (``None`` for layout="torch")."""
        return self._p.conversion

    def net(self, theta: torch.Tensor, X: torch.Tensor | None = None) -> torch.Tensor:
        with _stateless_bn(self.module):
            return functional_call(self.module, self._p.split(theta), (self.X if X is None else X,))

    def data_loss(self, theta: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.net(theta), self.y)

    def f(self, theta: torch.Tensor) -> torch.Tensor:
        v = self.data_loss(theta)
        return v + 0.5 * self.l2 * (theta @ theta) if self.l2 else v

    def at(self, theta: Any) -> "TorchPoint":
        if getattr(theta, "ndim", None) != 1 or theta.shape[0] != self._p.n:
            raise ValueError(f"theta must be a flat vector of length {self._p.n}, got shape {getattr(theta, 'shape', None)}")
        if not backend.all_finite(theta):
            raise NonFiniteError("theta contains NaN or Inf")
        return TorchPoint(self, theta)

    def subset(self, idx: Any) -> "TorchObjective":
        idx_t = torch.as_tensor(positions(idx, self.n_samples), device=self.X.device)
        return TorchObjective(self.module, self.loss, self.X[idx_t], self.y[idx_t], self.l2, counter=self.counter,
                              rng=self.rng, _params=self._p)


class TorchPoint(PointProducts):
    """f linearised at one θ (the forward pass and its autograd graph are kept for ``grad``).

    Primitives: ``value``, ``grad``, ``z``, ``hvp``, ``local_jvp``, ``local_vjp``,
    ``local_loss_hvp``, ``local_output_grads``, ``per_example_grads``, ``sampled_targets``;
    the rest is inherited. ``layer_stats`` raises (an opaque module has no Kronecker taps).
    """

    def __init__(self, obj: TorchObjective, theta: Any):
        self.obj = obj
        self.theta = theta
        self._t = to_torch_tensor(theta, obj._p.device, obj._p.dtype)
        self._leaf = self._t.detach().requires_grad_(True)
        with torch.enable_grad():
            zt = obj.net(self._leaf)
            f = obj.loss_fn(zt, obj.y)
            self._f = f + 0.5 * obj.l2 * (self._leaf @ self._leaf) if obj.l2 else f
        self._zt = zt.detach()
        obj.counter.add("forward", obj.n_samples, "forward")
        self._grad = None
        self._z = None
        self._e = None
        self._sampled = None
        self._twin = None

    @property
    def xp(self) -> Any:
        return self.obj.xp

    @property
    def value(self) -> float:
        return float(self._f.detach())

    @property
    def z(self) -> Any:
        """Network outputs (N, *output_shape) as a NumPy/CuPy array."""
        if self._z is None:
            self._z = self._out(self._zt)
        return self._z

    def _out(self, t: torch.Tensor) -> Any:
        return from_torch_tensor(t, self.theta)

    def _dir(self, v: Any) -> torch.Tensor:
        return to_torch_tensor(v, self.obj._p.device, self.obj._p.dtype)

    @property
    def grad(self) -> Any:
        if self._grad is None:
            (g,) = torch.autograd.grad(self._f, self._leaf)
            self.obj.counter.add("backward", self.N, "grad")
            self._grad = self._out(g)
        return self._grad

    # -- primitives (PointPrimitives) -------------------------------------------------------
    def check_independent(self, what: str) -> None:
        if self.obj._p.couples_examples:
            raise ValueError(f"{what} needs independent examples, but the module has BatchNorm in training mode "
                             "(examples interact); call module.eval() first")

    def hvp(self, v: Any) -> Any:
        """∇²f v by forward-over-reverse autodiff of f (λ v included)."""
        self.check_direction(v)
        self.obj.counter.add("rforward", self.N)
        self.obj.counter.add("backward", self.N, "hvp")
        self.obj.counter.add("rbackward", self.N)
        return self._out(torch_hvp(self.obj.f, self._t, self._dir(v)))

    def local_jvp(self, v: Any) -> Any:
        self.obj.counter.add("rforward", self.N)
        return self._out(jvp(self.obj.net, (self._t,), (self._dir(v),))[1])

    def local_vjp(self, u: Any, call: str) -> Any:
        ut = to_torch_tensor(u, self.obj._p.device, self.obj._p.dtype)
        self.obj.counter.add("backward", self.N, call)
        return self._out(vjp(self.obj.net, self._t)[1](ut)[0])

    def _example_loss(self):
        loss_fn = self.obj.loss_fn
        return lambda zi, yi: loss_fn(zi[None], yi[None])

    def _native_targets(self, targets: Any) -> torch.Tensor:
        return self.select_targets(targets, self.obj.y, lambda t: _targets_tensor(t, self.obj.y))

    def local_loss_hvp(self, u: Any) -> Any:
        li, ut = self._example_loss(), to_torch_tensor(u, self.obj._p.device, self.obj._p.dtype)
        return self._out(vmap(lambda zi, yi, ui: torch_hvp(lambda zz: li(zz, yi), zi, ui))(self._zt, self.obj.y, ut))

    def local_output_grads(self, targets: Any) -> Any:
        empirical = is_empirical(targets)
        if empirical and self._e is not None:
            return self._e
        e = self._out(vmap(grad(self._example_loss()))(self._zt, self._native_targets(targets)))
        if empirical:
            self._e = e
        return e

    def per_example_grads(self, targets: Any = "empirical") -> Any:
        """(N, n) rows ∇ℓᵢ where ℓᵢ = loss(module(xᵢ), yᵢ) on a batch of one (data term only).

        ``targets``: "empirical" (true y; ``None`` too), "sampled" (:meth:`sampled_targets`) or an
        array replacing y (e.g. qnref's ``Point.sampled_targets()``).
        """
        self.check_independent("per_example_grads")
        obj = self.obj
        yy_all = self._native_targets(targets)

        def li(t, x, yy):
            return obj.loss_fn(functional_call(obj.module, obj._p.split(t), (x[None],)), yy[None])

        obj.counter.add("backward", self.N, "per_example_grads")
        with _stateless_bn(obj.module):
            return self._out(vmap(grad(li), in_dims=(None, 0, 0))(self._t, obj.X, yy_all))

    def engine_point(self) -> Any:
        """layout="qnref": qnref's own point at this θ on the converted model (cached); see
        :meth:`TorchObjective.engine_objective`."""
        if self._twin is None:
            self._twin = self.obj.engine_objective().at(self.theta)
        return self._twin

    def layer_stats(self, targets: Any = "empirical", reduce: Any = None, *, keys: str = "qnref") -> dict:
        """Per Kronecker layer taps: from qnref's engine point on the converted model (layout="qnref");
        layout="torch" raises :class:`~qnref.curvature.protocol.UnsupportedProductError`.

        ``keys="qnref"`` (what optimizers read): qnref layer names ("0.conv2d", "5.dense").
        ``keys="torch"``: the torch module paths ("stem", "block.conv1", "head"), first layer to
        last (``obj.conversion.layer_paths`` is the map). ``reduce(name, tap)`` (qnref name) replaces
        each tap by its value, applied by the engine as each tap is recorded."""
        if keys not in ("qnref", "torch"):
            raise ValueError(f"keys must be 'qnref' or 'torch', got {keys!r}")
        if self.obj.conversion is None:
            raise no_layer_structure("layer_stats (the Kronecker layer taps)", "torch")
        pt = self.engine_point()
        if is_empirical(targets) or isinstance(targets, str):
            taps = pt.layer_stats(targets, reduce)
        else:
            taps = pt.layer_stats(backend.to_numpy(targets.detach().cpu()) if isinstance(targets, torch.Tensor) else targets,
                                  reduce)
        if keys == "qnref":
            return taps
        paths = self.obj.conversion.layer_paths
        return {paths[name]: taps[name] for name in paths if name in taps}

    def sampled_targets(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Targets ỹ ~ p(y | z) from the model's predictive distribution, drawn once per point.

        The distribution is the one whose negative log-likelihood the loss is (qnref's conventions):
        softmax_ce → Categorical(softmax(z)) labels, mse → N(z, I), sigmoid_ce → Bernoulli(σ(z)).
        It needs ``loss`` to be a qnref name or a torch loss module that :func:`qnref_torch.resolve_loss`
        maps; for any other callable pass explicit targets to :meth:`fisher_vp`. Draws use ``generator``
        (a ``torch.Generator`` on the model's device; torch's global generator when ``None``) and are
        *not* the draws of qnref's ``Point.sampled_targets()`` (different generators): to reproduce
        qnref's sampled Fisher, pass ``targets=qnref_point.sampled_targets()``.
        """
        if self._sampled is None and self.obj.conversion is not None and generator is None:
            # layout="qnref": the engine twin's draws (the problem's device_rng), so that sampled
            # Fisher products and the layer taps of kind "sampled" see the same ỹ as qnref's engine
            self._sampled = _targets_tensor(self.engine_point().sampled_targets(), self.obj.y)
        if self._sampled is None:
            name = _loss_name(self.obj.loss)
            z = self._zt
            if name == "softmax_ce":
                self._sampled = torch.multinomial(torch.softmax(z, dim=1), 1, generator=generator)[:, 0]
            elif name == "mse":
                self._sampled = z + torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
            else:
                u = torch.rand(z.shape, generator=generator, dtype=z.dtype, device=z.device)
                self._sampled = (u < torch.sigmoid(z)).to(z.dtype)
        return self._sampled

    def fisher_vp(self, v: Any, kind: str = "empirical", *, targets: Any = None,
                  generator: torch.Generator | None = None) -> Any:
        """F v (data term only, no L2), :meth:`PointProducts.fisher_vp` plus ``generator``.

        * ``"empirical"``: (1/N) Σ gᵢ gᵢᵀ v with gᵢ = ∇ℓ(zᵢ, yᵢ) at the true targets;
        * ``"sampled"``: the same at targets ỹ — ``targets`` if given (e.g. qnref's
          ``Point.sampled_targets()``, which makes the result comparable with qnref to 1e-10), else
          :meth:`sampled_targets` (drawn once per point with ``generator``; differs from qnref's draws);
        * ``"exact"``: E_ỹ of the sampled Fisher, which for qnref's losses (canonical links) is the
          GGN without the L2 term, Jᵀ (∇²_z loss) J v. For an arbitrary callable loss this is the
          GGN of that loss (a Fisher only if the loss is a canonical negative log-likelihood).
        """
        if kind == "sampled" and targets is None and generator is not None:
            targets = self.sampled_targets(generator)
        return super().fisher_vp(v, kind, targets=targets)


def _loss_name(loss: Any) -> str:
    if isinstance(loss, str):
        return {"ce": "softmax_ce", "bce": "sigmoid_ce"}.get(loss, loss)
    try:
        return resolve_loss(loss)[0]
    except ValueError:
        raise ValueError(f"cannot sample targets for the loss {loss!r} (no known predictive distribution); "
                         "pass targets= to fisher_vp(v, 'sampled', targets=...)") from None


def _targets_tensor(targets: Any, like: torch.Tensor) -> torch.Tensor:
    """Targets as a tensor on ``like``'s device: integer labels stay int64, everything else takes ``like``'s dtype."""
    t = targets if isinstance(targets, torch.Tensor) else to_torch_tensor(
        numpy.ascontiguousarray(backend.to_numpy(targets)) if not backend.is_cupy_array(targets) else targets, like.device)
    t = t.to(like.device)
    if t.is_floating_point():
        return t.to(like.dtype if like.is_floating_point() else t.dtype)
    return t.long()


class TorchProblem(Problem):
    """:class:`qnref.optim.base.Problem` over a torch model: the same batch stream (same seed → the same
    minibatches as qnref's Problem on the same data), handing out :class:`TorchObjective` instances.
    the ``nn.Module`` is ``module``.

    ``layout="torch"`` (default; any ``nn.Module``): θ = the trainable parameters in
    ``named_parameters()`` order; ``model`` is an :class:`~qnref.curvature.structure.OpaqueModel`
    (layout, no Kronecker layers), so Kronecker methods raise.
    ``layout="qnref"`` (a module of supported layers, all parameters trainable): the module is
    converted (:func:`qnref_torch.convert`) and θ is in the qnref model's layout (W̄ = [W b]);
    every product is still computed by torch.func, the Kronecker layer taps and sampled targets
    come from qnref's engine point on the converted model (same generator as qnref's Problem
    with this seed), and ``model`` is a :class:`~qnref.curvature.structure.ConvertedModel`. Every registered optimizer runs,
    with the trajectory of qnref's own engine on the converted model (tests/adapters/test_matrix.py).
    """

    def __init__(self, module: nn.Module, loss: Any, X: Any, y: Any, l2: float = 0.0, *, seed: int = 0,
                 counter: PassCounter | None = None, layout: str = "torch"):
        self.module = module
        self.loss = loss
        self._params = _Params(module, layout, tuple(X.shape[1:]))
        self.xp = self._params.xp
        rng = backend.default_rng(seed + 1, self.xp)
        self._full = TorchObjective(module, loss, X, y, l2, counter=counter, rng=rng, _params=self._params)
        self.X, self.y = self._full.X, self._full.y
        self.l2 = float(l2)
        self.train = module.training
        #: the objectives :meth:`batch` handed out (QNRefOptimizer clears it before each step)
        self.drawn_batches: list = []
        self._start_stream(seed, rng)

    @property
    def model(self) -> Any:
        return self._full.model

    @property
    def conversion(self) -> Any:
        """The :class:`~qnref_torch.convert.Conversion` (layout="qnref"), else ``None``."""
        return self._params.conversion

    def batch(self, size: int) -> "TorchObjective":
        """:meth:`Problem.batch`, remembering the objective (the step's minibatch, for BatchNorm's running statistics)."""
        obj = super().batch(size)
        self.drawn_batches.append(obj)
        return obj

    def update_running_stats(self, batch: "TorchObjective | None" = None) -> bool:
        """One training-mode forward of the module at its current parameters on ``batch`` (default:
        the first minibatch drawn since :attr:`drawn_batches` was cleared), with the BatchNorm buffers
        live: running mean/var move by torch's momentum rule exactly as in a plain torch training
        loop (forward at θ_k on the step's batch, then the update). Returns whether it ran (a module
        without training-mode BatchNorm, or no batch drawn: nothing to do)."""
        if batch is None:
            batch = self.drawn_batches[0] if self.drawn_batches else None
        if batch is None or not self._params.couples_examples:
            return False
        with torch.no_grad():
            self.module(batch.X)
        return True

    @property
    def layout_kind(self) -> str:
        """"torch" or "qnref" (θ's order; see the class docstring)."""
        return self._params.layout_kind

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self._params.params)

    @property
    def n_params(self) -> int:
        return self._params.n

    def subset(self, idx: Any) -> TorchObjective:
        return self._full.subset(idx)

    def get_theta(self) -> Any:
        """A flat copy of the trainable parameters (NumPy on the CPU, CuPy on CUDA)."""
        return from_torch_tensor(self._params.get().clone())

    def set_theta(self, theta: Any) -> None:
        """Copy θ into the module's parameters."""
        self._params.set(to_torch_tensor(theta, self._params.device, self._params.dtype))


class LoaderProblem(TorchProblem):
    """A :class:`TorchProblem` fed by a ``DataLoader`` (or any re-iterable of ``(X, y)`` batches).

    * ``batch(size)`` — the loader's next batch (the loader decides its size and order; ``size`` is
      not used); at the end of the loader a new pass starts (``epoch_passes`` + 1). This is the
      minibatch of first-order, quasi-Newton, Kronecker and SMW steps and HF's gradient batch.
    * ``sample(size)``, ``subset(idx)``, ``full()`` — the declared in-memory ``extra = (X, y)``
      subset (curvature batches of HF/SQN, progress checks of MB-LSR1, SMW's semi-stochastic S₂,
      SVRG's snapshot gradient, S-LBFGS/S-LSR1 with ``batch_size=None``): ``sample`` draws without
      replacement from it, ``full()`` is all of it (its examples count as drawn).
      Pass a representative subset; ``full()`` is *not* the whole data set.
    * ``n_samples`` is the size of the ``extra`` subset (what ``sample``/``subset``/``full`` index, e.g.
      KFAC's warm-start chunks); ``epochs`` counts examples drawn over ``len(loader.dataset)`` (or the
      ``n_samples=`` given, :attr:`dataset_size`).

    Everything else (layouts, products, BatchNorm running statistics) is :class:`TorchProblem`'s.

    ``state()`` (so ``QNRefOptimizer.state_dict()``) holds the generators of the in-memory subset's
    sampler and the sampled targets, the counters, ``epoch_passes``, the number of batches consumed
    in the current pass of the loader and, at the start of that pass, the state of every
    ``torch.Generator`` the loader shuffles with (``loader.generator``, ``loader.sampler.generator``,
    ``loader.batch_sampler.sampler.generator``). ``load_state`` sets those generators back to the
    pass start, starts a new pass and skips the consumed batches (they are loaded again, not used),
    so the same loader resumes bit-identically. A loader that shuffles with torch's global RNG
    (``shuffle=True`` without ``generator=``) cannot be restored that way: pass
    ``generator=torch.Generator().manual_seed(s)`` to the ``DataLoader``. Augmentation randomness
    inside the dataset or worker processes is the user's.
    """

    def __init__(self, module: nn.Module, loss: Any, loader: Any, extra: tuple, l2: float = 0.0, *, seed: int = 0,
                 counter: PassCounter | None = None, layout: str = "torch", n_samples: int | None = None):
        if not (isinstance(extra, (tuple, list)) and len(extra) == 2):
            raise TypeError("extra must be an (X, y) pair of in-memory tensors: the subset that sample(), subset() and "
                            "full() draw from")
        if n_samples is None:
            try:
                n_samples = len(loader.dataset)
            except (AttributeError, TypeError):
                raise ValueError("n_samples is needed when the loader has no sized .dataset") from None
        self.loader = loader
        self._n = int(n_samples)
        self._it = None
        self._pass_pos = 0          # batches consumed in the current pass of the loader
        self._pass_gens = None      # the loader's generator states at the start of the current pass
        super().__init__(module, loss, extra[0], extra[1], l2, seed=seed, counter=counter, layout=layout)

    @property
    def n_samples(self) -> int:
        """Examples of the in-memory ``extra`` subset (what ``sample``/``subset``/``full`` index)."""
        return int(self._full.n_samples) if hasattr(self, "_full") else self._n

    @property
    def dataset_size(self) -> int:
        """``len(loader.dataset)`` (or the ``n_samples=`` given): the denominator of :attr:`epochs`."""
        return self._n

    @property
    def epochs(self) -> float:
        return self.samples_drawn / self._n

    def _loader_generators(self) -> list:
        """The ``torch.Generator`` objects the loader draws its order from (identity-deduplicated)."""
        out: list = []
        cands = [getattr(self.loader, "generator", None), getattr(getattr(self.loader, "sampler", None), "generator", None)]
        bs = getattr(self.loader, "batch_sampler", None)
        cands.append(getattr(getattr(bs, "sampler", None), "generator", None))
        for g in cands:
            if isinstance(g, torch.Generator) and all(g is not h for h in out):
                out.append(g)
        return out

    def _start_pass(self) -> None:
        self._pass_gens = [g.get_state().numpy().copy() for g in self._loader_generators()]
        self._pass_pos = 0
        self._it = iter(self.loader)

    def _next(self) -> tuple:
        if self._it is None:
            self._start_pass()
        try:
            item = next(self._it)
        except StopIteration:
            self.epoch_passes += 1
            self._start_pass()
            try:
                item = next(self._it)
            except StopIteration:
                raise ValueError("the loader yields no batches") from None
        self._pass_pos += 1
        return item

    def state(self) -> dict:
        st = super().state()
        st["loader"] = {"started": self._it is not None, "pos": int(self._pass_pos),
                        "generators": None if self._pass_gens is None else list(self._pass_gens)}
        return st

    def load_state(self, st: dict) -> None:
        super().load_state(st)
        ld = st.get("loader")
        self._it, self._pass_pos, self._pass_gens = None, 0, None
        if not ld or not ld.get("started"):
            return
        gens, saved = self._loader_generators(), ld.get("generators") or []
        if len(gens) != len(saved):
            raise ValueError(f"the state was saved with a loader drawing from {len(saved)} torch.Generator(s), this "
                             f"loader draws from {len(gens)}: resume with the same kind of DataLoader")
        for g, s_ in zip(gens, saved):
            g.set_state(torch.from_numpy(numpy.asarray(s_, dtype=numpy.uint8).copy()))
        self._start_pass()
        for k in range(int(ld["pos"])):      # replay the consumed batches of this pass
            try:
                next(self._it)
            except StopIteration:
                raise ValueError(f"the loader has fewer than {ld['pos']} batches per pass: not the loader the state "
                                 "was saved with") from None
            self._pass_pos += 1

    def _check_size(self, size: int, what: str = "batch size") -> int:
        """The loader decides the minibatch: any requested size is accepted (and not used)."""
        return int(size)

    def batch(self, size: int) -> TorchObjective:
        item = self._next()
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"the loader must yield (X, y) pairs, got {type(item).__name__}")
        X, y = item
        obj = TorchObjective(self.module, self.loss, X, y, self.l2, counter=self.counter, rng=self.device_rng,
                             _params=self._params)
        self.samples_drawn += obj.n_samples
        self.drawn_batches.append(obj)
        return obj

    def sample(self, size: int) -> TorchObjective:
        m = self._full.n_samples
        size = min(int(size), m)
        if size < 1:
            raise ValueError(f"sample size must be a positive integer, got {size!r}")
        if size == m:
            return self._full
        return self.subset(numpy.sort(self.rng.choice(m, size=size, replace=False)))

    def full(self) -> TorchObjective:
        """The declared ``extra`` subset (counts its examples as drawn)."""
        self.samples_drawn += self._full.n_samples
        return self._full
