"""First-order baselines: SGD, heavy-ball momentum, Nesterov (NAG), Adam, RMSprop, AdaGrad,
AdaDelta, SVRG, the CNN comparison's GD (fixed rate on 20 % of the data) and gradient descent
with a backtracking (Armijo) line search.

Every method follows the protocol of :mod:`qnref.optim.base`::

    theta, state, info = opt.step(theta, state, problem)

and draws ``problem.batch(batch_size)`` once per step (``batch_size=None``: the whole training
set, still counted as an epoch of the batch stream). Notation: g = ∇f_B(θ) is the gradient of the
minibatch objective (including the L2 term of the problem), ⊙ and ``/`` are elementwise, η is the
learning rate ``lr``.

Conventions shared by all classes
---------------------------------
* The update is computed functionally (new state arrays) and applied only when it is finite:
  a non-finite batch loss, gradient or step leaves θ and the state unchanged and reports
  ``accepted=False, nonfinite=True``. θ itself must be finite on entry (the objective raises
  :class:`~qnref.curvature.objective.NonFiniteError` otherwise).
* ``StepInfo.loss_start`` is f_B at the point where the gradient was taken (θ, or the look-ahead
  point θ + μv for NAG). ``StepInfo.loss`` of the methods with a fixed step is the same number:
  the loss at the new point is unknown without another forward pass, which the methods do not
  need. GD-LS reports the accepted value f_B(θ + αp).
* ``step_size`` is η (the accepted α for GD-LS); ``step_norm`` is ‖θ_new − θ‖.
* ``batch_size=None`` draws the whole set; GD draws ⌈fraction·N⌉ examples (:func:`fraction_size`).
* Host syncs per step: the batch loss and ‖Δθ‖² (plus the objective's own finiteness check of θ).

Defaults and their sources are listed per class and in ``docs/first_order.md``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import backend
from .base import Optimizer, Problem, StepInfo, check_int, check_positive, check_range, draw_size, set_checked
from .costs import CostAssumptions, ModelShapes
from .drivers import Opened, close_step, finite_move, line_search, nonfinite_step, open_step, with_extra
from .registry import register

__all__ = ["SGD", "Momentum", "NAG", "Adam", "RMSprop", "AdaGrad", "AdaDelta", "SVRG", "GD", "GDLineSearch",
           "fraction_size", "full_gradient", "fixed_step_lr"]


def _check_batch_size(batch_size: int | None) -> int | None:
    return None if batch_size is None else check_int("batch_size", batch_size, 1)


def _check_unit(name: str, value: float) -> float:
    """A decay/momentum coefficient in [0, 1)."""
    return check_range(name, value, 0.0, 1.0, hi_open=True)


def fraction_size(n: int, fraction: float) -> int:
    """⌈fraction·n⌉ examples, at least 1 and at most n: the size of a batch given as a fraction of
    the training set (GD's and Hessian-free's 20 % gradient batch, CNN comparison §3.3, §4.1)."""
    return max(1, min(n, int(math.ceil(fraction * n))))


def fixed_step_lr(opt: Any, lr: float | None) -> None:
    """Check the ``lr`` of a method with ``step_rule`` ``"fixed"`` or a line search, and set
    ``opt.lr`` only for the fixed rule: a method whose step comes from a search has no learning
    rate (adapters then treat their ``lr`` as a scale of the returned step, as for every
    line-search method), and an ``lr`` given with the search would be silently unused, so it is
    refused."""
    if opt.step_rule == "fixed":
        if lr is None:
            raise ValueError("step_rule='fixed' needs lr (the fixed step length, [SOC] §4.4 tunes it), got lr=None")
        opt.lr = check_positive("lr", lr)
    elif lr is not None:
        raise ValueError(f"lr={lr!r} is the step of step_rule='fixed'; with step_rule={opt.step_rule!r} the line "
                         "search chooses the step (give step_rule='fixed' with lr, or no lr)")


def full_gradient(problem: Problem, theta: Any, chunk: int | None) -> Any:
    """∇f(θ) on the whole training set (L2 term included), summed over consecutive chunks of
    ``chunk`` examples (``None``: one pass over the set) and weighted by their sizes, so it equals
    the full-batch gradient for models whose examples do not interact. Uses ``problem.subset``:
    the passes are counted in ``problem.counter`` but not as epochs (a warm start, not training
    data, as the Kronecker methods' statistics warm start)."""
    from ._kron_common import full_chunks

    n = problem.n_samples
    total = None
    for obj in full_chunks(problem, chunk or n):
        part = obj.at(theta).grad * (obj.n_samples / n)
        total = part if total is None else total + part
    return total


class FirstOrderOptimizer(Optimizer):
    """Common driver: draw a batch, take one gradient, add the step Δθ that ``_update`` returns.

    Subclasses implement ``init`` and ``_update(theta, g, state) -> (delta, new_state)`` (pure:
    no in-place changes to ``state``), and may override ``_gradient_point`` (where g is taken),
    ``_draw_size`` (the step's batch; ``batch_size`` by default) and ``_prepare`` (a state set-up
    that needs the problem before the first update: RMSprop's warm start).
    """

    family: ClassVar[str] = "first-order"

    def __init__(self, lr: float, batch_size: int | None = 128):
        self.lr = check_positive("lr", lr)
        self.batch_size = _check_batch_size(batch_size)

    def _gradient_point(self, theta, state):
        return theta

    def _draw_size(self, problem: Problem) -> int | None:
        return self.batch_size

    def _prepare(self, theta, state, problem: Problem):
        return state

    def _update(self, theta, g, state) -> tuple[Any, Any]:
        raise NotImplementedError

    def _close(self, opened: Opened, theta, state, delta, new_state, *, evals: int = 1,
               **extra: Any) -> tuple[Any, Any, StepInfo]:
        """Apply Δθ if finite (one host sync: ‖Δθ‖²); otherwise keep θ and the old state."""
        moved = finite_move(theta, delta)
        if moved is None:
            info = dataclasses.replace(nonfinite_step(opened, self.lr), evals=evals, extra=dict(extra))
            return theta, state, info
        info = close_step(opened, loss=opened.f0, accepted=True, evals=evals, step_size=self.lr,
                          step_norm=moved[1], extra=dict(extra))
        return moved[0], new_state, info

    def step(self, theta, state, problem: Problem) -> tuple[Any, Any, StepInfo]:
        # a NaN/Inf gradient gives a non-finite Δθ in every rule, which _close rejects: one check
        ready = self._prepare(theta, state, problem)
        opened = open_step(problem, self._draw_size(problem), self._gradient_point(theta, ready), tol=None,
                           need_grad=False)
        if opened.stop is not None:
            return theta, state, dataclasses.replace(opened.stop, step_size=self.lr)
        delta, new_state = self._update(theta, opened.g, ready)
        return self._close(opened, theta, state, delta, new_state)


# -- plain and momentum SGD ------------------------------------------------------------------------
@dataclass
class SGDState:
    t: int = 0


@register("sgd")
class SGD(FirstOrderOptimizer):
    """Minibatch SGD: θ ← θ − η g (Robbins & Monro 1951).

    Default η = 0.01: the fixed rate of the first-order baselines in Ramamurthy & Duffy (2016,
    appendix, CIFAR-10); the CNN comparison paper also runs SGD at a tuned *fixed* rate.
    """

    paper: ClassVar[str] = "Robbins & Monro 1951; lr from Ramamurthy & Duffy 2016 (appendix)"

    def __init__(self, lr: float = 0.01, batch_size: int | None = 128):
        super().__init__(lr, batch_size)

    def init(self, theta) -> SGDState:
        return SGDState()

    def _update(self, theta, g, state):
        return -self.lr * g, SGDState(state.t + 1)

    cost_formula: ClassVar[str] = "2n"

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """−ηg (n), ‖Δθ‖² (n)."""
        return {"update": shapes.n, "step_norm": shapes.n}


@dataclass
class MomentumState:
    velocity: Any
    t: int = 0


@register("momentum")
class Momentum(FirstOrderOptimizer):
    """Heavy ball (Polyak 1964) in the velocity form of Sutskever et al. (2013, eq. 1–2)::

        v ← μ v − η ∇f_B(θ),   θ ← θ + v

    Equivalent (for constant η) to m ← μ m + g, θ ← θ − η m of Ren's thesis §2.8.2 / §4.7.2
    with v = −η m. Defaults μ = 0.9 (Ren's thesis; Ramamurthy & Duffy 2016 appendix),
    η = 0.01 (Ramamurthy & Duffy 2016, CIFAR-10 appendix).
    """

    paper: ClassVar[str] = "Polyak 1964; Sutskever et al. 2013; defaults Ramamurthy & Duffy 2016, Ren thesis"
    _lookahead: ClassVar[bool] = False

    def __init__(self, lr: float = 0.01, momentum: float = 0.9, batch_size: int | None = 128):
        super().__init__(lr, batch_size)
        self.momentum = _check_unit("momentum", momentum)

    def init(self, theta) -> MomentumState:
        return MomentumState(backend.namespace(theta).zeros_like(theta))

    def _gradient_point(self, theta, state):
        return theta + self.momentum * state.velocity if self._lookahead else theta

    def _update(self, theta, g, state):
        v = self.momentum * state.velocity - self.lr * g
        return v, MomentumState(v, state.t + 1)

    cost_formula: ClassVar[str] = "3n"

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """μv − ηg (2n), ‖v‖² (n), NAG's look-ahead point θ + μv (n)."""
        n = shapes.n
        return {"velocity": 2 * n, "step_norm": n, **({"lookahead_point": n} if self._lookahead else {})}


@register("nag")
class NAG(Momentum):
    """Nesterov's accelerated gradient in the formulation of Sutskever et al. (2013, eq. 3–4)::

        v ← μ v − η ∇f_B(θ + μ v),   θ ← θ + v

    The gradient is taken at the look-ahead point θ + μv, so ``info.loss_start`` is f_B there
    (not at θ). This is the same method as the "Nesterov" option of PyTorch/Keras, which track
    θ' = θ + μv instead (Bengio et al. 2013). Defaults as :class:`Momentum` (μ = 0.9, η = 0.01;
    Ramamurthy & Duffy 2016, who compare L-SR1 against NAG).
    """

    paper: ClassVar[str] = "Nesterov 1983; Sutskever et al. 2013 (ICML) eq. 3-4"
    cost_formula: ClassVar[str] = "4n"
    _lookahead: ClassVar[bool] = True


# -- diagonal adaptive methods -------------------------------------------------------------------
@dataclass
class MomentState:
    """m: first moment (empty when the method has none), v: second moment / accumulator, t: steps."""

    m: Any
    v: Any
    t: int = 0


class DiagonalAdaptive(FirstOrderOptimizer):
    """Shared rule of Adam, RMSprop and AdaGrad::

        m ← β₁ m + (1 − β₁) g                        (m = g when β₁ = 0)
        v ← a v + b g⊙g                             (EMA: a = β₂, b = 1 − β₂; AdaGrad: a = b = 1)
        m̂, v̂ = m / (1 − β₁ᵗ), v / (1 − β₂ᵗ)          (bias correction, Adam only)
        θ ← θ − η m̂ / (√v̂ + ε)

    Subclasses store ``beta1`` (if they have a first moment) and name the EMA rate of v in
    ``_decay_rate`` (a = rate, b = 1 − rate; empty: AdaGrad's sum) and set ``_bias_correction``.
    """

    _bias_correction: ClassVar[bool] = False

    def __init__(self, lr: float, eps: float, batch_size: int | None):
        super().__init__(lr, batch_size)
        self.eps = check_positive("eps", eps)

    @property
    def _beta1(self) -> float:
        return getattr(self, "beta1", 0.0)

    _decay_rate: ClassVar[str] = ""

    @property
    def _decay(self) -> tuple[float, float]:
        if not self._decay_rate:
            return 1.0, 1.0
        rate = getattr(self, self._decay_rate)
        return rate, 1.0 - rate

    def init(self, theta) -> MomentState:
        xp = backend.namespace(theta)
        m = xp.zeros_like(theta) if self._beta1 else xp.zeros(0, dtype=theta.dtype)
        return MomentState(m, xp.zeros_like(theta))

    def _update(self, theta, g, state):
        xp = backend.namespace(theta)
        b1, (a, b), t = self._beta1, self._decay, state.t + 1
        m = b1 * state.m + (1.0 - b1) * g if b1 else state.m
        v = a * state.v + b * (g * g)
        num, den = (m if b1 else g), v
        if self._bias_correction:
            num = num / (1.0 - b1**t) if b1 else num
            den = den / (1.0 - a**t)
        # replace, not MomentState(…): a subclass state (RMSprop's warm-start flag) keeps its fields
        return -self.lr * num / (xp.sqrt(den) + self.eps), dataclasses.replace(state, m=m, v=v, t=t)

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """m (2n with β₁ > 0), v (3n), bias corrections (n each), η·num/(√v + ε) (2n), ‖Δθ‖² (n)."""
        n, b1 = shapes.n, self._beta1
        t = {"first_moment": 2 * n} if b1 else {}
        t["second_moment"] = 3 * n
        if self._bias_correction:
            t["bias_correction"] = (2 if b1 else 1) * n
        return {**t, "scaled_step": 2 * n, "step_norm": n}


@register("adam")
class Adam(DiagonalAdaptive):
    """Adam (Kingma & Ba 2015, Algorithm 1): :class:`DiagonalAdaptive` with bias correction.

    Defaults η = 1e-3, β₁ = 0.9, β₂ = 0.999, ε = 1e-8 — the paper's; Ren's thesis ch. 3–4 uses
    the same β's and ε = 1e-8 "following common practice" (it tunes ε as a damping in ch. 2).
    """

    paper: ClassVar[str] = "Kingma & Ba 2015 (ICLR), Algorithm 1"
    cost_formula: ClassVar[str] = "10n"
    _bias_correction: ClassVar[bool] = True
    _decay_rate: ClassVar[str] = "beta2"

    def __init__(self, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 batch_size: int | None = 128):
        super().__init__(lr, eps, batch_size)
        set_checked(self, beta1=(beta1, "[0, 1)"), beta2=(beta2, "[0, 1)"))


@dataclass
class RMSpropState(MomentState):
    """:class:`MomentState` and whether v was warm-started from the full training set."""

    warm_started: bool = False


@register("rmsprop")
class RMSprop(DiagonalAdaptive):
    """RMSprop (Tieleman & Hinton 2012, Coursera lecture 6.5)::

        v ← ρ v + (1 − ρ) g⊙g,   θ ← θ − η g / (√v + ε)

    Defaults η = 1e-3, ρ = 0.9 (lecture 6.5; Ren's thesis §2.8.2 uses β₂ = 0.9), ε = 1e-8.
    ``beta1 > 0`` adds Adam's first-moment EMA without bias correction, m ← β₁m + (1 − β₁)g,
    θ ← θ − η m / (√v + ε): the variant of Ren's thesis §2.8.2 ("the only difference [to Adam]
    is the bias correction", β₁ = β₂ = 0.9). Not PyTorch's ``momentum`` (which accumulates the
    scaled step).

    ``warm_start=True`` (Ren's thesis §2.8, "Initialization of Algorithms", L832-840: "∇f ⊙ ∇f
    for RMSprop", estimated "using the entire training set before we start updating
    parameters"): before the first update v₀ = ∇f(θ₀) ⊙ ∇f(θ₀) with ∇f the gradient of the whole
    training set (:func:`full_gradient`, in chunks of ``batch_size``; L2 term included, like g),
    then the usual v₁ = ρ v₀ + (1 − ρ) g₁⊙g₁. m stays 0 (the thesis: "∇̂f is always initialized as
    zero"). Default off (the lecture's v₀ = 0). The warm start needs the training set, so it runs
    in :meth:`step`; the update rule alone (``_update``, e.g. adapters that feed their own
    gradient) refuses a state that was not warm-started.
    """

    paper: ClassVar[str] = "Tieleman & Hinton 2012 (lecture 6.5); Ren thesis §2.8.2, warm start §2.8 L832-840"
    cost_formula: ClassVar[str] = "6n (8n with β₁ > 0)"
    _decay_rate: ClassVar[str] = "rho"

    def __init__(self, lr: float = 1e-3, rho: float = 0.9, eps: float = 1e-8, beta1: float = 0.0,
                 batch_size: int | None = 128, warm_start: bool = False):
        super().__init__(lr, eps, batch_size)
        set_checked(self, rho=(rho, "[0, 1)"), beta1=(beta1, "[0, 1)"), warm_start=(warm_start, "bool"))

    def init(self, theta) -> RMSpropState:
        base = super().init(theta)
        return RMSpropState(base.m, base.v)

    def _prepare(self, theta, state, problem: Problem):
        if not self.needs_warm_start(state):
            return state
        g0 = full_gradient(problem, theta, draw_size(self, problem, self.batch_size))
        return self.warmed(state, g0)

    def needs_warm_start(self, state) -> bool:
        """True while ``warm_start=True`` and the second moment has not been warm-started yet."""
        return self.warm_start and state.t == 0 and not getattr(state, "warm_started", False)

    def warmed(self, state, g0):
        """The state with v = ∇f⊙∇f of the full training set (thesis §2.8 L832-840), given that ∇f
        (the torch adapter's parameter groups pass each group's slice of one full gradient)."""
        # a non-finite g0 gives a non-finite step, which the driver rejects (θ and the state stay)
        return dataclasses.replace(state, v=g0 * g0, warm_started=True)

    def _update(self, theta, g, state):
        if self.warm_start and state.t == 0 and not getattr(state, "warm_started", False):
            raise ValueError("rmsprop warm_start=True: the second moment v was not warm-started (∇f⊙∇f on the "
                             "training set needs the problem); take the step with opt.step(theta, state, problem), "
                             "or use warm_start=False")
        return super()._update(theta, g, state)


@register("adagrad")
class AdaGrad(DiagonalAdaptive):
    """AdaGrad (Duchi, Hazan & Singer 2011, diagonal version)::

        G ← G + g⊙g,   θ ← θ − η g / (√G + ε)

    Defaults η = 0.01, ε = 1e-10 (G₀ = 0): no paper in this project fixes them; these are the
    common library values (PyTorch ``torch.optim.Adagrad``). Duchi et al. write δ for ε.
    """

    paper: ClassVar[str] = "Duchi, Hazan & Singer 2011 (JMLR)"
    cost_formula: ClassVar[str] = "6n"

    def __init__(self, lr: float = 0.01, eps: float = 1e-10, batch_size: int | None = 128):
        super().__init__(lr, eps, batch_size)


@dataclass
class AdaDeltaState:
    """v = E[g²], u = E[Δθ²] (Zeiler's accumulators), t: steps."""

    v: Any
    u: Any
    t: int = 0


@register("adadelta")
class AdaDelta(FirstOrderOptimizer):
    """AdaDelta (Zeiler 2012, Algorithm 1)::

        v ← ρ v + (1 − ρ) g⊙g
        Δ ← −(√(u + ε) / √(v + ε)) ⊙ g
        u ← ρ u + (1 − ρ) Δ⊙Δ
        θ ← θ + η Δ

    Defaults ρ = 0.95, ε = 1e-6 (Zeiler's MNIST settings), η = 1 (the paper has no learning rate;
    η scales the step as in PyTorch/Keras). Ramamurthy & Duffy (2016) ran AdaDelta with no
    parameters set, i.e. these defaults.
    """

    paper: ClassVar[str] = "Zeiler 2012 (arXiv:1212.5701), Algorithm 1"

    def __init__(self, lr: float = 1.0, rho: float = 0.95, eps: float = 1e-6, batch_size: int | None = 128):
        super().__init__(lr, batch_size)
        self.rho = _check_unit("rho", rho)
        self.eps = check_positive("eps", eps)

    def init(self, theta) -> AdaDeltaState:
        xp = backend.namespace(theta)
        return AdaDeltaState(xp.zeros_like(theta), xp.zeros_like(theta))

    def _update(self, theta, g, state):
        xp, r = backend.namespace(theta), self.rho
        v = r * state.v + (1.0 - r) * (g * g)
        d = -(xp.sqrt(state.u + self.eps) / xp.sqrt(v + self.eps)) * g
        u = r * state.u + (1.0 - r) * (d * d)
        return self.lr * d, AdaDeltaState(v, u, state.t + 1)

    cost_formula: ClassVar[str] = "10n"

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """v, u (3n each), the ratio step (2n), η· (n), ‖Δθ‖² (n)."""
        n = shapes.n
        return {"accumulators": 6 * n, "ratio_step": 2 * n, "lr_scale": n, "step_norm": n}


# -- variance reduction ----------------------------------------------------------------------------
@dataclass
class SVRGState:
    """snapshot θ̃, its full gradient μ̃ = ∇f(θ̃), k: steps since the snapshot, t: steps."""

    snapshot: Any
    mu: Any
    k: int = 0
    t: int = 0


@register("svrg")
class SVRG(FirstOrderOptimizer):
    """Stochastic variance-reduced gradient (Johnson & Zhang 2013, Procedure SVRG, option I).

    Every ``inner_steps`` (m) steps the snapshot is renewed: θ̃ ← θ, μ̃ ← ∇f(θ̃) on
    ``problem.full()``. Each step then draws a batch B and moves along the variance-reduced
    gradient, both batch gradients on the same B::

        θ ← θ − η (∇f_B(θ) − ∇f_B(θ̃) + μ̃)

    On the snapshot step θ = θ̃, so the direction is exactly μ̃ and no batch is drawn (the step is
    a full-gradient step; ``info.batch_size`` = N, ``loss_start`` the full loss). Defaults:
    m = ⌈2N / batch_size⌉ (``inner_steps=None``; J&Z use m = 2n single-example steps for convex
    problems), η = 0.01 (from the grid {0.3, …, 1e-4} that Griffin et al. tune SVRG over;
    J&Z tune η per problem).
    """

    paper: ClassVar[str] = "Johnson & Zhang 2013 (NeurIPS), option I"
    cost_formula: ClassVar[str] = "2n"
    algebra_flops = SGD.algebra_flops  # −η(∇f_B(θ) − ∇f_B(θ̃) + μ̃) (n), ‖Δθ‖² (n)

    def __init__(self, lr: float = 0.01, inner_steps: int | None = None, batch_size: int | None = 128):
        super().__init__(lr, batch_size)
        self.inner_steps = None if inner_steps is None else check_int("inner_steps", inner_steps, 1)

    def init(self, theta) -> SVRGState:
        xp = backend.namespace(theta)
        return SVRGState(xp.zeros_like(theta), xp.zeros_like(theta))

    def period(self, problem: Problem) -> int:
        """m, the number of steps between snapshots."""
        if self.inner_steps is not None:
            return self.inner_steps
        draw_size(self, problem, self.batch_size)  # a chosen batch above the set is refused here (snapshots only)
        b = problem.n_samples if self.batch_size is None else self.batch_size
        return max(1, math.ceil(2 * problem.n_samples / b))

    def step(self, theta, state: SVRGState, problem: Problem) -> tuple[Any, Any, StepInfo]:
        snapshot = state.k % self.period(problem) == 0
        opened = open_step(problem, None if snapshot else self.batch_size, theta, tol=None, need_grad=False)
        if opened.stop is not None:
            return theta, state, with_extra(dataclasses.replace(opened.stop, step_size=self.lr), snapshot=snapshot)
        if snapshot:
            mu = opened.g
            new = SVRGState(theta.copy(), mu, 1, state.t + 1)
            return self._close(opened, theta, state, -self.lr * mu, new, snapshot=True)
        v = opened.g - opened.obj.at(state.snapshot).grad + state.mu
        new = SVRGState(state.snapshot, state.mu, state.k + 1, state.t + 1)
        return self._close(opened, theta, state, -self.lr * v, new, evals=2, snapshot=False)


# -- the CNN comparison's GD: fixed rate on a fraction of the data --------------------------------
@register("gd")
class GD(FirstOrderOptimizer):
    """Gradient descent of the second-order CNN comparison ([SOC] §3.4 L101, §4.1 L109)::

        θ ← θ − η ∇f_D(θ),   D = the next ⌈fraction·N⌉ examples of the epoch stream

    "In each iteration, GD will use average gradient of 20% of data to be the update direction"
    (§4.1), with a "well tuned fix learning rate" (§3.4: "SGD and GD will use well tuned fix
    learning rate and we will apply line search for SHG, SQN and SR1"). It draws its data like
    Hessian-free's gradient batch D_g (``problem.batch(⌈0.2 N⌉)``, :func:`fraction_size`), so one
    step is 0.2 epochs, the data SHG reads per update. Defaults: ``fraction=0.2`` (§3.3, §4.1);
    η = 0.01, the value of :class:`SGD` (the text tunes η and gives no number). The update rule,
    its state and cost are SGD's (``SGD._update``); only the batch differs.
    """

    paper: ClassVar[str] = "second-order CNN comparison §3.4 L101, §4.1 L109 (GD on 20% of the data, fixed rate)"
    cost_formula: ClassVar[str] = "2n"
    init = SGD.init
    _update = SGD._update
    algebra_flops = SGD.algebra_flops  # −η g (n), ‖Δθ‖² (n)

    def __init__(self, lr: float = 0.01, fraction: float = 0.2):
        self.lr = check_positive("lr", lr)
        self.fraction = check_range("fraction", fraction, 0.0, 1.0, lo_open=True)

    def _draw_size(self, problem: Problem) -> int:
        return fraction_size(problem.n_samples, self.fraction)


# -- gradient descent with a line search -----------------------------------------------------------
@dataclass
class GDLineSearchState:
    t: int = 0


@register("gd-ls")
class GDLineSearch(FirstOrderOptimizer):
    """(Minibatch) gradient descent with backtracking: p = −g, accept the first α = α₀ sᵏ with

        f_B(θ + α p) − f_B(θ) ≤ c₁ α ∇f_B(θ)ᵀp        (c₁ = 0.1)

    both sides on the step's batch: the sufficient-decrease condition, eq. (2) of the second-order
    CNN comparison ([SOC] §3.4), which that text applies to SHG, SQN and SR1 — *not* to its GD,
    which runs at a fixed tuned rate (registered as ``"gd"``, :class:`GD`). This class is a
    line-search GD variant of our own: the natural first-order reference for the line-search
    second-order methods, with the text's c₁ = 0.1. α₀ = 1 and s = 1/2 (halving, at most
    ``max_evals`` trials) are Nocedal & Wright's textbook choices (Alg. 3.1). A failed search (or
    a non-finite batch loss/gradient) does not move θ. Non-finite trial values are treated as
    failures of the Armijo test (the step shrinks).
    """

    paper: ClassVar[str] = "line-search GD variant with eq. (2) of the second-order CNN comparison (§3.4); Nocedal & Wright Alg. 3.1"

    def __init__(self, alpha0: float = 1.0, c1: float = 0.1, shrink: float = 0.5, max_evals: int = 30,
                 batch_size: int | None = 128):
        self.batch_size = _check_batch_size(batch_size)
        set_checked(self, alpha0=(alpha0, "> 0"), c1=(c1, "(0, 1)"), shrink=(shrink, "(0, 1)"),
                    max_evals=(max_evals, "int"))

    def init(self, theta) -> GDLineSearchState:
        return GDLineSearchState()

    cost_formula: ClassVar[str] = "(1 + t)n"

    def algebra_flops(self, shapes: ModelShapes, batch_size: int, assume: CostAssumptions) -> dict[str, float]:
        """gᵀg (n), θ + αp per trial (tn); the new θ is the accepted trial's (:attr:`~.drivers.LineOutcome.theta`)."""
        n = shapes.n
        return {"grad_norm": n, "line_search": assume.trials * n}

    def step(self, theta, state, problem: Problem) -> tuple[Any, Any, StepInfo]:
        opened = open_step(problem, self.batch_size, theta, tol=None, need_grad=False)
        if opened.stop is not None:  # f not finite at θ
            return theta, state, opened.stop
        g = opened.g
        gg = float(g @ g)
        if not math.isfinite(gg):    # ∇f not finite at θ
            return theta, state, close_step(opened, loss=opened.f0, accepted=False, evals=1, nonfinite=True)
        ls = line_search(opened.obj, theta, -g, opened.f0, -gg, rule="armijo", alpha0=self.alpha0, c1=self.c1,
                         shrink=self.shrink, max_evals=self.max_evals)   # fails at g = 0 (φ'(0) = 0)
        extra = {"ls_evals": ls.evals, "ls_message": ls.message}
        if not ls.success:
            return theta, state, close_step(opened, loss=opened.f0, accepted=False, evals=1 + ls.evals,
                                            step_size=0.0, nonfinite=ls.nonfinite, extra=extra)
        info = close_step(opened, loss=ls.value, accepted=True, evals=1 + ls.evals, step_size=ls.alpha,
                          step_norm=ls.alpha * math.sqrt(gg), nonfinite=ls.nonfinite, extra=extra)
        return ls.theta, GDLineSearchState(state.t + 1), info  # θ + α(−g): the bits of θ − αg
