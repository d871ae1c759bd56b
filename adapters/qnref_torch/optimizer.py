"""``QNRefOptimizer``: any qnref optimizer as a ``torch.optim.Optimizer``.

qnref optimizers are functional (``theta, state, info = opt.step(theta, state, problem)``) and
*draw* what they need from a problem: line searches and trust-region ratio tests re-evaluate f at
trial points, Hessian-free and trust-region methods ask for ``hvp``/``ggn_vp``, sampled methods
draw their own batches. The wrapper therefore runs in one of two modes.

Problem mode (recommended; every qnref method works)::

    problem = TorchProblem(model, "softmax_ce", X, y, l2=1e-4, seed=0)
    opt = QNRefOptimizer(model.parameters(), qnref_opt, problem=problem)
    for it in range(100):
        loss = opt.step()            # one qnref step; the problem draws its batches

The parameters passed must be the model's trainable parameters in ``named_parameters()`` order
(checked). A closure, if one is passed to ``step``, is evaluated once before the step (under
``torch.enable_grad``) only so that ``step`` returns its loss like other torch optimizers; what it
leaves in ``.grad`` is not used.

Closure mode (like ``torch.optim.LBFGS``; value and gradient only)::

    opt = QNRefOptimizer(model.parameters(), qnref_opt)     # no problem
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss
    loss = opt.step(closure)

Every evaluation the qnref optimizer asks for (at θ, at each line-search / trust-region trial
point) writes that θ into the parameters, calls the closure, and reads the returned loss and the
parameters' ``.grad`` (missing gradients count as zero). ``problem.batch(size)``, ``sample`` and
``full`` all return this one closure objective, whatever size is asked for: the closure decides
the data, and it must evaluate the *same* function every time it is called within one step
(fixed batch, no dropout). ``hvp``/``ggn_vp`` raise ``NotImplementedError`` in this mode — use
problem mode for Hessian-free / Newton-CG / GGN methods. ``n_samples`` (default 1) is what the
optimizer sees as the batch and data set size and what the pass counter adds per closure call.

After a step the parameters hold the returned θ (one copy, θ_new → parameters); ``.grad`` holds
whatever the last closure call left (possibly at a rejected trial point). ``last_info`` is the
step's :class:`~qnref.optim.base.StepInfo`. ``state_dict()`` stores the qnref state as host arrays
(:func:`qnref.optim.base.state_to_host`).

Only one parameter group is supported (qnref optimizes one flat θ); θ is float64 or float32 as the
parameters are, on their device (NumPy for CPU tensors, CuPy for CUDA ones, zero-copy).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy
import torch

from qnref import backend
from qnref.curvature.objective import NonFiniteError, PassCounter
from qnref.optim.base import state_from_host, state_to_host

from .objective import TorchProblem, from_torch_tensor, to_torch_tensor

__all__ = ["QNRefOptimizer", "ClosureProblem"]


def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


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
                 counter: PassCounter | None = None):
        self.counter = counter if counter is not None else PassCounter()
        self._obj = _ClosureObjective(params, closure, int(n_samples), self.counter)
        self.rng = numpy.random.default_rng(seed)
        self.device_rng = self.rng
        self.l2 = 0.0
        self.samples_drawn = 0

    @property
    def n_samples(self) -> int:
        return self._obj.n_samples

    @property
    def epochs(self) -> float:
        return self.samples_drawn / self.n_samples

    def batch(self, size: int | None = None) -> _ClosureObjective:
        self.samples_drawn += self.n_samples
        return self._obj

    def sample(self, size: int | None = None) -> _ClosureObjective:
        return self._obj

    def full(self) -> _ClosureObjective:
        return self._obj

    def subset(self, idx: Any) -> _ClosureObjective:
        return self._obj


class QNRefOptimizer(torch.optim.Optimizer):
    """Run the qnref optimizer instance ``optimizer`` on torch parameters (see the module docstring)."""

    def __init__(self, params: Iterable, optimizer: Any, problem: TorchProblem | None = None, *, n_samples: int = 1,
                 seed: int = 0):
        super().__init__(params, defaults={})
        if len(self.param_groups) != 1:
            raise ValueError("QNRefOptimizer supports a single parameter group (qnref optimizes one flat θ)")
        if not hasattr(optimizer, "init") or not hasattr(optimizer, "step"):
            raise TypeError(f"optimizer must follow qnref's protocol (init, step), got {type(optimizer).__name__}")
        self.qn = optimizer
        self.problem = problem
        self.n_samples = int(n_samples)
        self.seed = seed
        self.qn_state: Any = None
        self.last_info: Any = None
        self._closure_counter = PassCounter()
        params_ = self.param_groups[0]["params"]
        if problem is not None:
            theirs = problem.params
            if len(theirs) != len(params_) or any(a is not b for a, b in zip(params_, theirs)):
                raise ValueError("the parameters given to QNRefOptimizer must be the problem module's trainable "
                                 "parameters in named_parameters() order")

    @property
    def counter(self) -> PassCounter:
        return self.problem.counter if self.problem is not None else self._closure_counter

    def step(self, closure: Callable | None = None) -> Any:  # type: ignore[override]
        params = self.param_groups[0]["params"]
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
            problem = ClosureProblem(params, closure, self.n_samples, seed=self.seed, counter=self._closure_counter)
        theta_t = _flat(params)
        theta = from_torch_tensor(theta_t)  # theta_t is a fresh tensor (cat), so θ shares memory with nothing else
        if self.qn_state is None:
            self.qn_state = self.qn.init(theta)
        new_theta, self.qn_state, info = self.qn.step(theta, self.qn_state, problem)
        _write(params, to_torch_tensor(new_theta, params[0].device, params[0].dtype))
        self.last_info = info
        if loss is None:
            loss = torch.tensor(info.loss_start if math.isfinite(info.loss_start) else info.loss, dtype=params[0].dtype)
        return loss

    def state_dict(self) -> dict:  # type: ignore[override]
        return {"qnref_state": None if self.qn_state is None else state_to_host(self.qn_state),
                "qnref_state_class": None if self.qn_state is None else type(self.qn_state),
                "last_loss": None if self.last_info is None else self.last_info.loss}

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        cls = state_dict.get("qnref_state_class")
        data = state_dict.get("qnref_state")
        if data is None:
            self.qn_state = None
            return
        dev = "gpu" if self.param_groups[0]["params"][0].device.type == "cuda" else "cpu"
        self.qn_state = state_from_host(cls, data, dev)
