"""``QNRefOptimizer``: any qnref optimizer as a ``torch.optim.Optimizer``.

qnref optimizers are functional (``theta, state, info = opt.step(theta, state, problem)``) and
*draw* what they need from a problem: line searches and trust-region ratio tests re-evaluate f at
trial points, Hessian-free and trust-region methods ask for ``hvp``/``ggn_vp``, sampled methods
draw their own batches, Kronecker methods read per-layer taps. The wrapper runs in one of two modes.

Problem mode (every registered method)::

    problem = TorchProblem(model, "softmax_ce", X, y, l2=1e-4, seed=0, layout="qnref")
    opt = QNRefOptimizer(model.parameters(), "kfac", problem=problem, lr=0.03)
    for it in range(100):
        loss = opt.step()            # one qnref step; the problem draws its batches

``layout="qnref"`` (a module of supported layers, see :mod:`qnref_torch.convert`) gives every
method, Kronecker ones included, and the trajectory of qnref's own engine on the converted model;
``layout="torch"`` (any ``nn.Module``) gives the methods that need no layer structure
(:data:`NEEDS`). The parameters passed must be the problem module's parameters (checked). A
closure passed to ``step`` is evaluated once before the step only so that ``step`` returns its
loss like other torch optimizers; what it leaves in ``.grad`` is not used.

Closure mode (like ``torch.optim.LBFGS``; value and gradient only)::

    opt = QNRefOptimizer(model.parameters(), "lsr1-ls")     # no problem
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss
    loss = opt.step(closure)

Every evaluation the qnref optimizer asks for (at θ, at each line-search / trust-region trial
point) writes that θ into the parameters, calls the closure (under ``torch.enable_grad``), and
reads the returned loss and the parameters' ``.grad`` (missing gradients count as zero).
``problem.batch(size)``, ``sample`` and ``full`` all return this one closure objective: the
closure decides the data and must evaluate the *same* function every time it is called within
one step (fixed batch, no dropout). Methods that need more than f and ∇f (:data:`NEEDS`
"curvature" or "layers") are refused at construction with the mode to use.

torch.optim conventions
    ``param_groups`` hold ``lr`` and the method's other scalar hyperparameters
    (``opt.param_groups[0]["lr"]``, ``["damping"]``, …); schedulers (``StepLR``, ``OneCycleLR``, …)
    change them and the next ``step`` uses them (the qnref optimizer is rebuilt through its
    validating constructor when a value changes). For methods without a learning rate (line
    searches, trust regions, Hessian-free) ``lr`` scales the step the method returns (default 1:
    the method's own step; the method's state still records its unscaled step). Several param
    groups: for the elementwise first-order methods (:data:`PER_GROUP`: sgd, momentum, nag, adam,
    rmsprop, adagrad, adadelta) each group has its own hyperparameters, as in torch.optim: one
    qnref optimizer and one state per group over that group's slice of θ, each applying its rule
    to the slice of the one gradient the step takes (one batch per step, so ``batch_size`` must
    agree). Other methods couple parameters (quasi-Newton, Kronecker, HF, SMW, line searches),
    so their groups are concatenated into one θ and must agree (ValueError naming the method and
    the groups that differ). Parameters with ``requires_grad=False`` are excluded from θ and
    never written. ``state_dict()`` holds only tensors and plain Python values (``torch.save`` /
    ``torch.load(weights_only=True)`` round-trip it) and resumes bit-identically, the problem's
    batch stream and generators included; ``zero_grad`` is torch's.

BatchNorm running statistics (problem mode): after each step the module runs one training-mode
forward at θ_k on the step's first minibatch with its buffers live, so running mean/var follow
torch's momentum rule exactly as a plain torch loop (forward, backward, update) would; methods
that draw no minibatch (``full()`` only) leave them. ``opt.update_running_stats = False`` turns it
off. In closure mode the closure's own forward passes update them (once per evaluation: line
searches evaluate several times).

After a step the parameters hold the returned θ; ``.grad`` holds whatever the last closure call
left (possibly at a rejected trial point). ``last_info`` is the step's
:class:`~qnref.optim.base.StepInfo`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import numpy
import torch

from qnref import backend, checkpoint
from qnref.curvature.objective import NonFiniteError, PassCounter
from qnref.curvature.protocol import OPTIMIZER_NEEDS, optimizer_needs
from qnref.optim.drivers import close_step, finite_move, open_step
from qnref.optim.base import draw_size
from qnref.optim.first_order import SGD, AdaDelta, DiagonalAdaptive, Momentum, full_gradient
from qnref.optim.registry import make_optimizer

from .objective import TorchProblem, from_torch_tensor, to_torch_tensor

__all__ = ["QNRefOptimizer", "ClosureProblem", "NEEDS", "requirement", "PER_GROUP"]

#: The methods whose update of each parameter depends only on that parameter's own gradient and
#: state (elementwise rules): several param groups may set different hyperparameters for them.
#: NAG is a Momentum, Adam/RMSprop/AdaGrad are DiagonalAdaptive.
PER_GROUP = (SGD, Momentum, DiagonalAdaptive, AdaDelta)
PER_GROUP_NAMES = ("sgd", "momentum", "nag", "adam", "rmsprop", "adagrad", "adadelta")

#: What each registered method asks of a problem (:data:`qnref.curvature.protocol.OPTIMIZER_NEEDS`):
#: "grad" (closure mode works), "curvature" (a TorchProblem of either layout), "layers"
#: (TorchProblem(..., layout="qnref")).
NEEDS = OPTIMIZER_NEEDS
requirement = optimizer_needs


def _write(params: list[torch.Tensor], theta_t: torch.Tensor) -> None:
    off = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(theta_t[off:off + n].view_as(p))
            off += n


class _ClosurePoint:
    def __init__(self, obj: "_ClosureObjective", theta: Any):
        self.obj = obj
        self.theta = theta
        params = obj.params
        _write(params, to_torch_tensor(theta, params[0].device, params[0].dtype))
        with torch.enable_grad():
            loss = obj.closure()
        self.value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        self.grad = from_torch_tensor(torch.cat([g.detach().reshape(-1) for g in grads]), theta)  # cat copies
        obj.counter.add("forward", obj.n_samples, "forward")
        obj.counter.add("backward", obj.n_samples, "grad")

    def hvp(self, v: Any) -> Any:
        raise NotImplementedError("closure mode gives f and ∇f only; pass problem=TorchProblem(...) to QNRefOptimizer "
                                  "for methods that need Hessian- or GGN-vector products")

    ggn_vp = hvp


class _ClosureObjective:
    def __init__(self, params: list[torch.Tensor], closure: Callable, n_samples: int, counter: PassCounter):
        self.params, self.closure, self._n, self.counter = params, closure, n_samples, counter
        self.l2 = 0.0

    @property
    def n_samples(self) -> int:
        return self._n

    def at(self, theta: Any) -> _ClosurePoint:
        if not backend.all_finite(theta):
            raise NonFiniteError("theta contains NaN or Inf")
        return _ClosurePoint(self, theta)

    def value(self, theta):
        return self.at(theta).value

    def value_and_grad(self, theta):
        p = self.at(theta)
        return p.value, p.grad

    def grad(self, theta):
        return self.at(theta).grad


class ClosureProblem:
    """The problem of closure mode: every draw returns the closure's objective."""

    def __init__(self, params: list[torch.Tensor], closure: Callable, n_samples: int = 1, *, seed: int = 0,
                 counter: PassCounter | None = None, rng: numpy.random.Generator | None = None):
        self.counter = counter if counter is not None else PassCounter()
        self._obj = _ClosureObjective(params, closure, int(n_samples), self.counter)
        self.rng = rng if rng is not None else numpy.random.default_rng(seed)
        self.device_rng = self.rng
        self.l2 = 0.0
        self.samples_drawn = 0

    @property
    def n_samples(self) -> int:
        return self._obj.n_samples

    @property
    def epochs(self) -> float:
        return self.samples_drawn / self.n_samples

    def _check_size(self, size: int, what: str = "batch size") -> int:
        """Any size is accepted: the closure decides the data (qnref's drivers ask every problem)."""
        return int(size)

    def batch(self, size: int | None = None) -> _ClosureObjective:
        self.samples_drawn += self.n_samples
        return self._obj

    def sample(self, size: int | None = None) -> _ClosureObjective:
        return self._obj

    def full(self) -> _ClosureObjective:
        return self._obj

    @property
    def full_objective(self) -> _ClosureObjective:
        return self._obj

    def subset(self, idx: Any) -> _ClosureObjective:
        return self._obj


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


class QNRefOptimizer(torch.optim.Optimizer):
    """Run a qnref optimizer on torch parameters (see the module docstring).

    ``optimizer``: a qnref optimizer instance, or a registry name built with ``**hyperparameters``
    (``QNRefOptimizer(params, "kfac", problem=p, lr=0.03)``). ``problem``: a :class:`TorchProblem`
    (problem mode) or ``None`` (closure mode). ``n_samples``: what closure mode reports as the batch
    and data set size; ``seed``: closure mode's generator (problem mode uses the problem's).
    """

    def __init__(self, params: Iterable, optimizer: Any, problem: TorchProblem | None = None, *, n_samples: int = 1,
                 seed: int = 0, **hyperparameters: Any):
        if isinstance(optimizer, str):
            optimizer = make_optimizer(optimizer, **hyperparameters)
        elif hyperparameters:
            raise TypeError(f"hyperparameters {sorted(hyperparameters)} are for a registry name; set them on the "
                            f"{type(optimizer).__name__} instance instead")
        if not hasattr(optimizer, "init") or not hasattr(optimizer, "step") or not hasattr(optimizer, "hyperparameters"):
            raise TypeError(f"optimizer must be a qnref optimizer (init, step, hyperparameters) or a registry name, "
                            f"got {type(optimizer).__name__}")
        hp = {k: v for k, v in optimizer.hyperparameters().items() if _scalar(v)}
        self._native_lr = "lr" in hp
        defaults = dict(hp) if self._native_lr else {"lr": 1.0, **hp}
        super().__init__(params, defaults=defaults)
        self.qn = optimizer
        self.need = requirement(optimizer)
        self.problem = problem
        #: problem mode: after each step, BatchNorm running statistics move as in a torch training loop
        #: (one training-mode forward at θ_k on the step's first minibatch; TorchProblem.update_running_stats)
        self.update_running_stats = True
        self.n_samples = int(n_samples)
        self.seed = seed
        self.qn_state: Any = None       # one state, or (several groups, PER_GROUP) a list: one per group
        self._group_qn: list = []       # PER_GROUP with several groups: group i's qnref optimizer
        self.last_info: Any = None
        self._closure_counter = PassCounter()
        self._closure_rng = numpy.random.default_rng(seed)
        name = getattr(optimizer, "name", type(optimizer).__name__)
        if problem is None:
            if self.need != "grad":
                what = {"curvature": "Hessian/GGN/Fisher products or Gram matrices",
                        "layers": "per-layer Kronecker taps"}[self.need]
                raise ValueError(f"optimizer {name!r} needs {what}, which closure mode (f and ∇f only) cannot give: "
                                 "use problem mode, QNRefOptimizer(params, opt, problem=TorchProblem(module, loss, X, y"
                                 + (", layout='qnref'))" if self.need == "layers" else "))"))
        else:
            if self.need == "layers" and getattr(problem, "conversion", None) is None:
                raise ValueError(f"optimizer {name!r} needs per-layer Kronecker taps, which a TorchProblem with "
                                 "layout='torch' (an opaque nn.Module) cannot give: use TorchProblem(module, loss, X, y, "
                                 "layout='qnref') (a module of supported layers, see qnref_torch.convert)")
            mine = self._params()
            theirs = problem.params
            if len(theirs) != len(mine) or any(a is not b for a, b in zip(mine, theirs)):
                raise ValueError("the parameters given to QNRefOptimizer must be the problem module's trainable "
                                 "parameters (all of them, in named_parameters() order)")
        self._sync_hyperparameters()

    # -- parameter groups and hyperparameters -----------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        """θ's parameters: every group's parameters with ``requires_grad``, group by group."""
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "problem", None) is not None:
            raise ValueError("problem mode optimizes the problem module's parameters; add_param_group is refused "
                             "(build the TorchProblem on the module whose parameters you want to optimize)")
        super().add_param_group(param_group)
        if len(self.param_groups) > 1 and hasattr(self, "qn"):
            self._sync_hyperparameters()
            if self._per_group() and self.qn_state is not None:
                # the old groups keep their state (one group's state is group 0's); the new one starts fresh
                states = self.qn_state if isinstance(self.qn_state, list) else [self.qn_state]
                self.qn_state = states + [None] * (len(self.param_groups) - len(states))

    def _per_group(self) -> bool:
        """Several groups of an elementwise method: one qnref optimizer and one state per group."""
        return len(self.param_groups) > 1 and isinstance(self.qn, PER_GROUP)

    def _name(self) -> str:
        return getattr(self.qn, "name", type(self.qn).__name__)

    def _group_hyperparameters(self) -> dict:
        keys = [k for k in self.defaults]
        first = {k: self.param_groups[0][k] for k in keys}
        diffs = [(i, k, g[k]) for i, g in enumerate(self.param_groups[1:], start=1) for k in keys if g[k] != first[k]]
        if diffs:
            i, k, v = diffs[0]
            groups = sorted({d[0] for d in diffs})
            raise ValueError(f"param group {i} sets {k}={v!r} but group 0 has {k}={first[k]!r}: optimizer "
                             f"{self._name()!r} couples parameters across groups (one θ, one hyperparameter set), so "
                             f"every group must agree (groups {groups} differ from group 0 in "
                             f"{sorted({d[1] for d in diffs})}); per-group hyperparameters are for the elementwise "
                             f"methods {', '.join(PER_GROUP_NAMES)} (or use one QNRefOptimizer per group)")
        return first

    def _sync_hyperparameters(self) -> None:
        """Rebuild the qnref optimizer(s) through the validating constructor when a group value changed."""
        if self._per_group():
            keys = list(self.defaults)
            sizes = {g.get("batch_size") for g in self.param_groups}
            if len(sizes) > 1:
                raise ValueError(f"param groups set batch_size {[g.get('batch_size') for g in self.param_groups]}: "
                                 f"a step of {self._name()!r} draws one batch for all groups, so batch_size must agree")
            base = self.qn.hyperparameters()
            qns = []
            for i, g in enumerate(self.param_groups):
                hp = {k: g[k] for k in keys}
                old = self._group_qn[i] if i < len(self._group_qn) else (self.qn if i == 0 else None)
                if old is not None and all(old.hyperparameters().get(k) == v for k, v in hp.items()):
                    qns.append(old)
                    continue
                try:
                    qns.append(type(self.qn)(**{**base, **hp}))
                except (ValueError, TypeError) as e:
                    raise (TypeError if isinstance(e, TypeError) else ValueError)(f"param group {i}: {e}") from e
            self._group_qn = qns
            self.qn = qns[0]
            self._lr_scale = 1.0          # every PER_GROUP method has its own lr
            return
        hp = self._group_hyperparameters()
        self._lr_scale = 1.0 if self._native_lr else float(hp.pop("lr"))
        if not (math.isfinite(self._lr_scale) and self._lr_scale > 0):
            raise ValueError(f"lr must be finite and > 0, got {self._lr_scale}")
        current = self.qn.hyperparameters()
        if any(current.get(k) != v for k, v in hp.items()):
            self.qn = type(self.qn)(**{**current, **hp})

    def _slices(self) -> list[tuple[int, int]]:
        """Each group's [start, stop) in θ (its trainable parameters, in order)."""
        out, off = [], 0
        for g in self.param_groups:
            n = sum(p.numel() for p in g["params"] if p.requires_grad)
            out.append((off, off + n))
            off += n
        return out

    def _step_groups(self, theta: Any, problem: Any) -> tuple[Any, list, Any]:
        """One step of several groups of an elementwise method: one batch and one gradient (at the
        concatenated gradient points: NAG's look-ahead θ + μ_i v_i per group), then group i's rule on
        its slice. A group whose step is not finite keeps its θ slice and state (as its own
        optimizer would); the others move."""
        xp = backend.namespace(theta)
        qns, sl = self._group_qn, self._slices()
        states = list(self.qn_state) if isinstance(self.qn_state, list) else [self.qn_state]
        states += [None] * (len(qns) - len(states))
        states = [q.init(theta[a:b]) if s is None else s for q, (a, b), s in zip(qns, sl, states)]
        if any(getattr(q, "needs_warm_start", lambda _s: False)(s) for q, s in zip(qns, states)):
            g_full = full_gradient(problem, theta, draw_size(qns[0], problem, qns[0].batch_size))
            states = [q.warmed(s, g_full[a:b]) if getattr(q, "needs_warm_start", lambda _s: False)(s) else s
                      for q, (a, b), s in zip(qns, sl, states)]
        if isinstance(self.qn, Momentum) and self.qn._lookahead:
            point = xp.concatenate([q._gradient_point(theta[a:b], s) for q, (a, b), s in zip(qns, sl, states)])
        else:
            point = theta
        opened = open_step(problem, qns[0].batch_size, point, tol=None, need_grad=False)
        if opened.stop is not None:
            return theta, states, dataclasses.replace(opened.stop, step_size=qns[0].lr)
        g = opened.g
        parts, new_states, sq, rejected = [], [], 0.0, []
        for i, (q, (a, b), s) in enumerate(zip(qns, sl, states)):
            delta, ns = q._update(theta[a:b], g[a:b], s)
            moved = finite_move(theta[a:b], delta)
            if moved is None:
                parts.append(theta[a:b])
                new_states.append(s)
                rejected.append(i)
            else:
                parts.append(moved[0])
                new_states.append(ns)
                sq += moved[1] ** 2
        info = close_step(opened, loss=opened.f0, accepted=len(rejected) < len(qns), evals=1, step_size=qns[0].lr,
                          step_norm=math.sqrt(sq), nonfinite=bool(rejected),
                          extra={"group_lr": [q.lr for q in qns], "rejected_groups": rejected})
        return xp.concatenate(parts), new_states, info

    @property
    def counter(self) -> PassCounter:
        return self.problem.counter if self.problem is not None else self._closure_counter

    # -- stepping ---------------------------------------------------------------------------------
    def _theta(self, params: list[torch.Tensor]) -> Any:
        if self.problem is not None:
            return self.problem.get_theta()
        return from_torch_tensor(torch.cat([p.detach().reshape(-1) for p in params]))

    def _set_theta(self, params: list[torch.Tensor], theta: Any) -> None:
        if self.problem is not None:
            self.problem.set_theta(theta)
        else:
            _write(params, to_torch_tensor(theta, params[0].device, params[0].dtype))

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:  # type: ignore[override]
        self._sync_hyperparameters()
        params = self._params()
        loss = None
        if self.problem is not None:
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            problem = self.problem
        else:
            if closure is None:
                raise ValueError("QNRefOptimizer without a problem needs a closure that re-evaluates the loss "
                                 "(and calls backward), as torch.optim.LBFGS does")
            problem = ClosureProblem(params, closure, self.n_samples, counter=self._closure_counter,
                                     rng=self._closure_rng)
        theta = self._theta(params)   # a fresh array: θ shares memory with nothing else
        if self.problem is not None:
            self.problem.drawn_batches.clear()
        if self._per_group():
            new_theta, self.qn_state, info = self._step_groups(theta, problem)
        else:
            if self.qn_state is None:
                self.qn_state = self.qn.init(theta)
            new_theta, self.qn_state, info = self.qn.step(theta, self.qn_state, problem)
        if self.problem is not None and self.update_running_stats:
            self.problem.update_running_stats()   # the parameters still hold θ_k: torch's own order
        if self._lr_scale != 1.0:
            new_theta = theta + self._lr_scale * (new_theta - theta)
        self._set_theta(params, new_theta)
        self.last_info = info
        if loss is None:
            loss = torch.tensor(info.loss_start if math.isfinite(info.loss_start) else info.loss, dtype=params[0].dtype)
        return loss

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:  # type: ignore[override]
        """Tensors and plain Python values only (``torch.load(weights_only=True)`` reads it back)."""
        out: dict = {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
                     "optimizer": getattr(self.qn, "name", type(self.qn).__name__), "qnref_state": None,
                     "problem_state": None}
        if isinstance(self.qn_state, list):     # several groups of a PER_GROUP method: one state each
            out["qnref_state"] = {"groups": [None if st is None else _encode(st, type(st)) for st in self.qn_state]}
        elif self.qn_state is not None:
            out["qnref_state"] = _encode(self.qn_state, type(self.qn_state))
        pstate = self.problem.state() if self.problem is not None else {
            "rng": backend.rng_state(self._closure_rng), "counter": self._closure_counter.snapshot()}
        out["problem_state"] = _encode(pstate, Any)
        return out

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        name = getattr(self.qn, "name", type(self.qn).__name__)
        if state_dict.get("optimizer") != name:
            raise ValueError(f"state_dict is of optimizer {state_dict.get('optimizer')!r}, this one runs {name!r}")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer {len(self.param_groups)}")
        for g, saved in zip(self.param_groups, groups):
            g.update(saved)
        self._sync_hyperparameters()
        params = self._params()
        dev = "gpu" if params[0].device.type == "cuda" else "cpu"
        if state_dict.get("qnref_state") is None:
            self.qn_state = None
        elif "groups" in state_dict["qnref_state"]:
            theta = self._theta(params)
            encs = state_dict["qnref_state"]["groups"]
            if not self._per_group() or len(encs) != len(self._group_qn):
                raise ValueError(f"state_dict holds {len(encs)} per-group states; this optimizer runs "
                                 f"{len(self.param_groups)} groups of {name!r}")
            self.qn_state = [None if enc is None else _decode(enc, type(q.init(theta[a:b])), dev)
                             for enc, q, (a, b) in zip(encs, self._group_qn, self._slices())]
        else:
            if self._per_group():
                raise ValueError(f"state_dict holds one state of {name!r}; this optimizer runs "
                                 f"{len(self.param_groups)} groups, one state each")
            cls = type(self.qn.init(self._theta(params)))
            self.qn_state = _decode(state_dict["qnref_state"], cls, dev)
        ps = state_dict.get("problem_state")
        if ps is not None:
            st = _decode(ps, Any, "cpu")
            if self.problem is not None:
                self.problem.load_state(st)
            else:
                backend.set_rng_state(self._closure_rng, st["rng"])
                self._closure_counter.restore(st["counter"])


def _encode(tree: Any, hint: Any) -> dict:
    """qnref's checkpoint encoding (a JSON-able manifest node + named NumPy arrays) with the arrays as
    CPU tensors: only plain values and tensors, the same schema checks as qnref's checkpoints."""
    node, arrays = checkpoint.encode(tree, hint)
    return {"node": node, "arrays": {k: torch.from_numpy(numpy.ascontiguousarray(a).copy()) for k, a in arrays.items()}}


def _decode(enc: dict, hint: Any, device: Any) -> Any:
    arrays = {k: t.numpy() for k, t in enc["arrays"].items()}
    return checkpoint.decode(enc["node"], arrays, hint, path="<state_dict>", device=device)
