"""The objective f(θ) = (1/N) Σᵢ ℓ(net(θ, xᵢ), yᵢ) + (λ/2)‖θ‖² and every product an optimizer needs.

``Objective(model, loss, X, y, l2)`` is a function of θ on a fixed batch. ``obj.at(θ)`` runs the
forward pass once and returns a :class:`Point`, whose methods reuse that pass:

================  =======================================================================  ==========================
method            formula (J = ∂z/∂θ stacked over examples, H_L per-example output Hessian)  passes (forward = F)
================  =======================================================================  ==========================
``value``         f(θ)                                                                     F
``grad``          ∇f = (1/N) Jᵀ ∂ℓ/∂z + λθ                                                  F + B
``jvp(v)``        J v  (N × C)                                                             F + R-F
``vjp(u)``        Jᵀ u = Σᵢ Jᵢᵀ uᵢ  (no 1/N)                                                F + B
``hvp(v)``        ∇²f v, exact, by the R-op of the backward pass (Pearlmutter 1994)          F + R-F + B + R-B
``ggn_vp(v)``     G v = (1/N) Jᵀ H_L J v + λ v                                              F + R-F + B
``fisher_vp(v)``  empirical (1/N) Σ gᵢ gᵢᵀ v, gᵢ = ∇ℓᵢ; ``sampled`` with targets drawn       F + R-F + B
                  from the model; ``exact`` = E_ỹ[…] = (1/N) Jᵀ H_L J v (canonical losses)
``per_example_grads``  rows gᵢ = ∇_θ ℓᵢ (N × n)                                            F + B (per example)
``gram``          N × N matrix gᵢᵀgⱼ, or NC × NC matrix Jᵢ Jⱼᵀ, by the Kronecker trick      F + B (or C backward)
                  of Ren's thesis ch. 5 (Alg. 17–22) for dense nets
``layer_stats``   per Kronecker layer āₗ₋₁ (homogeneous) and gₗ = ∂ℓᵢ/∂hₗ per example        F + B
================  =======================================================================  ==========================

The L2 term enters ``value``, ``grad``, ``hvp`` and ``ggn_vp``; the Fisher products and Gram
matrices are of the data term only (they are statistical objects; add λI yourself).

Every pass is counted in a :class:`PassCounter` (examples processed per pass kind), shared by all
objectives a :class:`~qnref.optim.base.Problem` hands out, so optimizers are compared in
gradient-equivalent passes and epochs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import backend
from ..validate import number as _number
from ..nn.losses import Loss, MeanSquaredError, SigmoidCrossEntropy, get_loss
from ..nn.model import Sequential
from . import kron
from .derived import NonFiniteError, PointProducts, is_empirical
from .protocol import TapReducer, reduce_taps

__all__ = ["Objective", "Point", "PassCounter", "PointMethods", "NonFiniteError", "gram_matrix"]


@dataclass
class PassCounter:
    """Examples processed by each kind of pass (forward F, backward B, R-forward, R-backward).

    ``grad_equivalents`` counts one gradient = one forward + one backward over one example, so a
    full-batch gradient on N examples adds N, a Hessian-vector product ≈ 2N.
    """

    forward: int = 0
    backward: int = 0
    rforward: int = 0
    rbackward: int = 0
    calls: dict = field(default_factory=dict)

    def add(self, kind: str, n_examples: int, call: str | None = None) -> None:
        setattr(self, kind, getattr(self, kind) + int(n_examples))
        if call:
            self.calls[call] = self.calls.get(call, 0) + 1

    @property
    def grad_equivalents(self) -> float:
        return (self.forward + self.backward + self.rforward + self.rbackward) / 2.0

    def snapshot(self) -> dict:
        return {
            "forward": self.forward,
            "backward": self.backward,
            "rforward": self.rforward,
            "rbackward": self.rbackward,
            "grad_equivalents": self.grad_equivalents,
            "calls": dict(self.calls),
        }

    def restore(self, snap: dict) -> None:
        """Set the counts from a :meth:`snapshot` (checkpoint resume)."""
        for k in ("forward", "backward", "rforward", "rbackward"):
            setattr(self, k, int(snap[k]))
        self.calls = dict(snap["calls"])


class PointMethods:
    """``obj.value(θ)``, ``obj.hvp(θ, v)``, …: one-shot wrappers of ``obj.at(θ).…`` (one forward
    pass each), shared by every objective type (network, data-parallel, torch, JAX)."""

    def at(self, theta: Any) -> Any:  # pragma: no cover - provided by the objective
        raise NotImplementedError

    def value(self, theta: Any) -> float:
        return self.at(theta).value

    def value_and_grad(self, theta: Any) -> tuple[float, Any]:
        p = self.at(theta)
        return p.value, p.grad

    def grad(self, theta: Any) -> Any:
        return self.at(theta).grad

    def hvp(self, theta: Any, v: Any) -> Any:
        return self.at(theta).hvp(v)

    def ggn_vp(self, theta: Any, v: Any) -> Any:
        return self.at(theta).ggn_vp(v)

    def fisher_vp(self, theta: Any, v: Any, kind: str = "empirical") -> Any:
        return self.at(theta).fisher_vp(v, kind)

    def jvp(self, theta: Any, v: Any) -> Any:
        return self.at(theta).jvp(v)

    def vjp(self, theta: Any, u: Any) -> Any:
        return self.at(theta).vjp(u)

    def per_example_grads(self, theta: Any) -> Any:
        return self.at(theta).per_example_grads()

    def gram(self, theta: Any, kind: str = "grad") -> Any:
        return self.at(theta).gram(kind)

    def layer_stats(self, theta: Any, targets: str = "empirical", reduce: TapReducer | None = None) -> dict:
        return self.at(theta).layer_stats(targets, reduce)


class _ReducingTaps(dict):
    """The ``taps`` dict of a backward pass that stores ``reduce(name, tap)`` instead of the tap."""

    def __init__(self, reduce: TapReducer):
        super().__init__()
        self._reduce = reduce

    def __setitem__(self, name: str, tap: Any) -> None:
        super().__setitem__(name, self._reduce(name, tap))


class Objective(PointMethods):
    """f(θ) on a fixed batch (X, y). See the module docstring for the products.

    Parameters
    ----------
    model, loss:
        a :class:`~qnref.nn.model.Sequential` and a loss (name or instance).
    X, y:
        inputs (N, *model.input_shape) and targets; NumPy or CuPy, float32 or float64.
    l2:
        weight-decay coefficient λ ≥ 0 of the term (λ/2)‖θ‖².
    train:
        layer mode (batch normalization uses batch statistics when True).
    counter:
        a :class:`PassCounter` to add to (a fresh one by default).
    rng:
        generator for sampled targets (true-Fisher products, KFAC statistics).
    validate:
        check shapes, dtypes and finiteness of the data once (on by default).
    """

    def __init__(
        self,
        model: Sequential,
        loss: "str | Loss",
        X: Any,
        y: Any,
        l2: float = 0.0,
        *,
        train: bool = True,
        counter: PassCounter | None = None,
        rng: Any = None,
        validate: bool = True,
    ):
        self.model = model
        self.loss = get_loss(loss)
        self.l2 = _number("l2", l2, lo=0)
        self.xp = backend.namespace(X, y)
        if getattr(X, "ndim", 0) < 1 or X.shape[0] == 0:
            raise ValueError(f"the batch is empty (X has shape {getattr(X, 'shape', None)}); an objective needs at least one example")
        if validate:
            model.check_input(X)
            backend.check_dtype(X.dtype)
            backend.check_finite(X, "input data X")
            if y.dtype.kind == "f":
                backend.check_finite(y, "targets y")
            if y.shape[0] != X.shape[0]:
                raise ValueError(f"X has {X.shape[0]} examples but y has {y.shape[0]}")
            y = self.loss.check((X.shape[0],) + model.output_shape, y)
        self.X, self.y = X, y
        self.train = train
        self.counter = counter if counter is not None else PassCounter()
        self.rng = rng if rng is not None else backend.default_rng(0, self.xp)

    @property
    def n_samples(self) -> int:
        return int(self.X.shape[0])

    @property
    def dtype(self):
        return self.X.dtype

    @property
    def layout(self) -> Any:
        """The :class:`~qnref.params.ParamLayout` of θ."""
        return self.model.layout

    def at(self, theta: Any) -> "Point":
        """Run the forward pass at θ and return the :class:`Point` that reuses it."""
        self.model.layout.check(theta)
        backend.namespace(theta, self.X)
        if theta.dtype != self.X.dtype:
            raise TypeError(f"theta is {theta.dtype} but the data are {self.X.dtype}; use one dtype")
        if not backend.all_finite(theta):
            raise NonFiniteError("theta contains NaN or Inf")
        return Point(self, theta)

    def subset(self, idx: Any) -> "Objective":
        """The same objective on examples ``idx`` (shares the counter and RNG)."""
        return Objective(self.model, self.loss, self.X[idx], self.y[idx], self.l2, train=self.train,
                         counter=self.counter, rng=self.rng, validate=False)


#: "not computed yet" for a point's cached predictive distribution (None is a valid value: no cache)
_UNSET = object()


class Point(PointProducts):
    """The objective linearised at one θ: caches the forward pass (and the gradient once computed).

    Implements the primitives of :class:`~qnref.curvature.protocol.PointPrimitives` with qnref's
    layer passes and inherits the derived products from
    :class:`~qnref.curvature.derived.PointProducts`; overrides ``gram`` (Kronecker trick) and
    ``dz`` (cached).
    """

    def __init__(self, obj: Objective, theta: Any):
        self.obj = obj
        self.theta = theta
        self.xp = obj.xp
        self.z, self._caches = obj.model.forward(theta, obj.X, train=obj.train)
        obj.counter.add("forward", obj.n_samples, "forward")
        self._losses = obj.loss.per_example(self.z, obj.y)
        self._grad = None
        self._dz = None
        self._sampled = None
        self._pred: Any = _UNSET
        self._value: float | None = None

    # -- values ---------------------------------------------------------------------------
    @property
    def value(self) -> float:
        """f(θ) as a Python float (non-finite values are returned, not raised); computed (one host
        sync) on the first read and cached, since a point does not change."""
        if self._value is None:
            v = self._losses.mean()
            if self.obj.l2:
                v = v + 0.5 * self.obj.l2 * (self.theta @ self.theta)
            self._value = float(v)
        return self._value

    @property
    def losses(self) -> Any:
        """Per-example losses ℓᵢ (N,)."""
        return self._losses

    @property
    def dz(self) -> Any:
        """Per-example output gradients ∂ℓᵢ/∂zᵢ (N, C)."""
        if self._dz is None:
            # before anything else needs p (a gradient-only point: SGD, L-BFGS) the loss's own fused
            # σ − y pass: computing p first and subtracting is one pass more (≈ 1 % of a gradient)
            self._dz = (self.obj.loss.dz(self.z, self.obj.y) if self._pred is _UNSET
                        else self._loss_call("dz", self.z, self.obj.y))
        return self._dz

    def _loss_call(self, method: str, *args: Any) -> Any:
        """``loss.<method>(*args)`` with this point's predictive distribution p = σ(z) or softmax(z)
        (:meth:`Loss.predictive`, computed once per point), for losses that have one: a point's
        sampled targets, their output gradients and every H_L product (each CG iteration of HF)
        share one σ or softmax pass instead of one each (issue 21). The gradient's ∂ℓ/∂z takes the
        loss's fused pass when it comes first (:attr:`dz`)."""
        if self._pred is _UNSET:
            self._pred = self.obj.loss.predictive(self.z)
        fn = getattr(self.obj.loss, method)
        return fn(*args) if self._pred is None else fn(*args, p=self._pred)

    @property
    def caches(self) -> list:
        """The forward pass's per-layer caches (the activations)."""
        if self._caches is None:
            raise RuntimeError("this point's forward caches were released (Point.release); products that need "
                               "a pass at this θ must be asked for before, or on a new point obj.at(θ)")
        return self._caches

    def release(self) -> None:
        """Free the forward caches (most of a point's memory) once no further pass at this θ is
        needed; f, z, the per-example losses and whatever was computed (∇f) stay. Kronecker methods
        call it before their curvature pass at θ⁺, so that two points' activations are never held
        at once (issue 21: the peak memory of a KFAC step on ResNet-20 was 1.9× an SGD step's)."""
        self._caches = None

    def _backward(self, gz: Any, call: str, **kw) -> Any:
        self.obj.counter.add("backward", self.N, call)
        return self.obj.model.backward(self.theta, self.caches, gz, **kw)

    def _jvp(self, v: Any) -> tuple[Any, list]:
        self.obj.counter.add("rforward", self.N)
        return self.obj.model.jvp(self.theta, self.caches, v)

    @property
    def grad(self) -> Any:
        """∇f(θ) (flat, computed once per point)."""
        if self._grad is None:
            self._grad = self._mean_grad(None)
        return self._grad

    def grad_with_taps(self) -> tuple[Any, dict]:
        """(∇f, taps) from one backward pass: the gradient of :attr:`grad` (the same GEMMs and bits,
        cached as it) and, recorded on the way, the Kronecker layers' taps of the *mean* loss,
        {"a": āₗ₋₁, "g": gₗ/N, "kind"}: :meth:`layer_stats` ("empirical") scaled by 1/N. For methods
        that need ∇f and the per-example taps at one θ (SMW-NG and SMW-NG-BD on dense nets), one
        backward instead of two."""
        taps: dict = {}
        self._grad = self._mean_grad(taps)
        return self._grad, dict(taps)

    def _mean_grad(self, taps: dict | None) -> Any:
        g = self._backward(self.dz / self.N, "grad", taps=taps)
        if self.obj.l2:
            g += self.obj.l2 * self.theta
        return g

    # -- primitives (PointPrimitives) -------------------------------------------------------
    def local_jvp(self, v: Any) -> Any:
        return self._jvp(v)[0]

    def local_vjp(self, u: Any, call: str) -> Any:
        return self._backward(u, call)

    def local_loss_hvp(self, u: Any) -> Any:
        return self._loss_call("hvp", self.z, self.obj.y, u)

    def local_output_grads(self, targets: Any) -> Any:
        return self._fisher_dz(targets)

    def _diagonal_hessian(self) -> bool:
        return isinstance(self.obj.loss, (MeanSquaredError, SigmoidCrossEntropy))

    def local_loss_sqrt_hessian(self) -> Any:
        """√diag(H_L) for mse/sigmoid_ce ((N, C), from ``loss.hvp`` with ones), else ``loss.sqrt_hessian``."""
        z, y = self.z, self.obj.y
        if self._diagonal_hessian():
            return self.xp.sqrt(self._loss_call("hvp", z, y, self.xp.ones_like(z)))
        return self._loss_call("sqrt_hessian", z, y)

    def local_loss_hessian(self) -> Any:
        """diag(H_L) for mse/sigmoid_ce ((N, C)), else ``loss.hessian`` ((N, C, C))."""
        z, y = self.z, self.obj.y
        if self._diagonal_hessian():
            return self._loss_call("hvp", z, y, self.xp.ones_like(z))
        return self._loss_call("hessian", z, y)

    def check_independent(self, what: str) -> None:
        self._check_coupling(what)

    def rop(self, v: Any, N: int, want_grad: bool = True) -> tuple[Any, Any]:
        """(Jᵀ dz / N, R{Jᵀ dz / N}) of this point's rows by Pearlmutter's R-op (forward R-pass,
        then the R-op of the backward pass; Pearlmutter 1994 eq. 4–5), no L2 term; ``N`` is the
        whole batch's size (the shard's own for one process). ``want_grad=False``: the first entry
        is None and its parameter GEMMs are not done (the caller knows ∇f already)."""
        self.check_direction(v)
        jv, rcaches = self._jvp(v)
        gz = self.dz / N
        rgz = self._loss_call("hvp", self.z, self.obj.y, jv) / N
        self.obj.counter.add("backward", self.N, "hvp")
        self.obj.counter.add("rbackward", self.N)
        return self.obj.model.backward_rop(self.theta, self.caches, rcaches, gz, rgz, v, want_grad=want_grad)

    def hvp(self, v: Any) -> Any:
        """Exact ∇²f(θ) v by Pearlmutter's R-op (forward R-pass, then R-op of the backward pass); ∇f
        comes along (and is cached) on the first product at a point, later ones skip it."""
        grad, hv = self.rop(v, self.N, want_grad=self._grad is None)
        return self.close_hvp(grad, hv, v)

    def sampled_targets(self) -> Any:
        """Targets ỹ ~ p(y | z) drawn once per point (so the sampled Fisher is a fixed matrix)."""
        if self._sampled is None:
            self._sampled = self._loss_call("sample", self.z, self.obj.rng)
        return self._sampled

    def _fisher_dz(self, targets: Any) -> Any:
        """∂ℓ/∂z at the true targets ("empirical"), the point's ỹ ("sampled") or given targets."""
        if is_empirical(targets):
            return self.dz
        loss = self.obj.loss
        return self._loss_call("dz", self.z, self.select_targets(targets, None, lambda t: loss.check(tuple(self.z.shape), t)))

    # -- per-example quantities ---------------------------------------------------------------
    def _check_coupling(self, what: str) -> None:
        if self.obj.model.couples_examples and self.obj.train:
            raise ValueError(
                f"{what} needs independent examples, but the model has batch normalization in training "
                "mode (examples interact); build the Objective with train=False"
            )

    def per_example_grads(self, targets: Any = "empirical") -> Any:
        """(N, n) rows gᵢ = ∇_θ ℓ(zᵢ, yᵢ) (data term, no 1/N)."""
        self._check_coupling("per_example_grads")
        self.obj.counter.add("backward", self.N, "per_example_grads")
        return self.obj.model.per_example_grads(self.theta, self.caches, self._fisher_dz(targets))

    def layer_stats(self, targets: Any = "empirical", reduce: TapReducer | None = None) -> dict:
        """Per Kronecker layer: {"a": āₗ₋₁, "g": gₗ, "kind": …} with gₗ = ∂ℓᵢ/∂hₗ per example.

        ``targets`` is "empirical" (true labels), "sampled" (ỹ from the model, for the true
        Fisher of KFAC), an array of targets, or "exact" (alias "type2"): the *type-2* statistics
        of the exact expectation over ỹ ~ p(y|x) (Botev, Ritter & Barber 2017, KFLR). The
        mean-loss gradient of W̄ₗ is (1/N) Σᵢ gₗ,ᵢ āₗ₋₁,ᵢᵀ (dense); conv layers return patch
        matrices, see docs/engine.md.

        "exact": with the output-space loss Hessian factored as H_{L,i} = Sᵢ Sᵢᵀ (closed form of the
        loss: softmax √pᵢ columns, diagonal for mse / sigmoid_ce), and E_ỹ[∂ℓ/∂z ∂ℓ/∂zᵀ] = H_{L,i}
        for these losses at the model's predictive distribution (Martens 2020 §9.2),
        E_ỹ[gᵢgᵢᵀ] = Σ_c (Jᵢᵀ Sᵢ e_c)(Jᵢᵀ Sᵢ e_c)ᵀ. One backward pass per output c (C passes,
        counted) with the columns Sᵢ e_c gives the taps ``{"kind", "a", "g", "targets": "exact"}``
        where ``g`` has a class axis after the examples: (N, C, d_out) dense, (N, C, L, C_out)
        conv; :func:`qnref.curvature.kron.factors` sums over it. Needs independent examples
        (BatchNorm in training mode couples them: the cross terms of different examples' ỹ do not
        vanish in a product of per-class backward passes), refused otherwise.

        ``reduce(name, tap)``: the value recorded for each layer, applied during the backward pass
        as soon as the layer's tap exists, so each tap's arrays (its output gradient g) are freed
        before the next layer's (issue 21: ResNet-20's taps held 0.8 GB).
        """
        if isinstance(targets, str) and targets in ("exact", "type2"):
            return reduce_taps(self._exact_layer_stats(), reduce)
        taps: dict = {} if reduce is None else _ReducingTaps(reduce)
        self._backward(self._fisher_dz(targets), "layer_stats", taps=taps, want_params=False)
        return dict(taps)

    def _exact_layer_stats(self) -> dict:
        """The type-2 taps of :meth:`layer_stats` ("exact"): one backward per column of Sᵢ."""
        self._check_coupling("layer_stats(targets='exact')")
        xp, z = self.xp, self.z
        S = self.local_loss_sqrt_hessian()          # (N, C, C) with H = S Sᵀ, or the diagonal's root
        diagonal = self._diagonal_hessian()         # mse / sigmoid_ce: S has z's shape
        n = z.shape[0]
        C = int(S.reshape(n, -1).shape[1]) if diagonal else int(S.shape[1])
        per_class = []
        for c in range(C):
            if not diagonal:
                u = xp.ascontiguousarray(S[:, :, c])
            else:                                   # diagonal H_L: Sᵢ e_c = √h_{i,c} e_c
                u = xp.zeros_like(z)
                u.reshape(n, -1)[:, c] = S.reshape(n, -1)[:, c]
            taps: dict = {}
            self._backward(u, "layer_stats", taps=taps, want_params=False)
            per_class.append(taps)
        return {name: {"kind": t["kind"], "a": t["a"],
                       "g": xp.stack([pc[name]["g"] for pc in per_class], axis=1), "targets": "exact"}
                for name, t in per_class[0].items()}

    def gram(self, kind: str = "grad") -> Any:
        """Gram matrices of thesis ch. 5 (see :meth:`PointProducts.gram`).

        Override (faster): for nets whose parametrized layers are all dense the Kronecker trick
        Σₗ (Āₗ Āₗᵀ) ⊙ (Γₗ Γₗᵀ) (Ren's thesis Alg. 17–22) is used and no n-vector per example is
        formed; otherwise per-example gradients / per-class Jacobian rows.
        """
        return gram_matrix(self, kind)


def gram_matrix(local: Point, kind: str, rows: Any = None) -> Any:
    """The Gram matrices of :meth:`Point.gram` from the point ``local``.

    ``rows(x)`` maps a per-example array of ``local``'s examples to the rows of the whole batch
    (identity for one process; an allgather over ranks for data-parallel points).
    """
    rows = rows or (lambda x: x)
    local._check_coupling("gram")
    model, xp = local.obj.model, local.xp
    trick = all(l.kron_dense for l in model.kron_layers) and _only_kron_params(model)
    if kind == "grad":
        if not trick:
            return kron.gram(rows(local.per_example_grads()))
        taps = local.layer_stats("empirical")
        total = 0
        for t in taps.values():
            total = total + kron.tap_gram(rows(t["a"]), rows(t["g"]))
        return total
    if kind != "jacobian":
        raise ValueError(f"unknown Gram kind {kind!r}; choose 'grad' or 'jacobian'")
    if local.z.ndim != 2:
        raise ValueError("gram('jacobian') needs 2-D outputs (N, C)")
    C = local.z.shape[1]
    eye = xp.eye(C, dtype=local.z.dtype)
    unit = [xp.broadcast_to(eye[c], local.z.shape).copy() for c in range(C)]  # ∂z_c/∂z for every example
    if not trick:
        J = []
        for c in range(C):
            local.obj.counter.add("backward", local.N, "gram")
            J.append(rows(model.per_example_grads(local.theta, local.caches, unit[c])))
        J = xp.stack(J, axis=1)
        return kron.gram(J.reshape(J.shape[0] * C, -1))
    per_c = []
    for c in range(C):
        taps: dict = {}
        local._backward(unit[c], "gram", taps=taps, want_params=False)
        per_c.append(taps)
    total = None
    for name in per_c[0]:
        a = rows(per_c[0][name]["a"])
        ka = kron.gram(a)
        gam = xp.stack([rows(t[name]["g"]) for t in per_c], axis=1)  # row i·C + c
        gam = gam.reshape(gam.shape[0] * C, -1)
        term = xp.repeat(xp.repeat(ka, C, axis=0), C, axis=1) * kron.gram(gam)
        total = term if total is None else total + term
    return total


def _only_kron_params(model: Sequential) -> bool:
    """True when every parameter block belongs to a Kronecker (dense) layer."""
    names = {l.name for l in model.kron_layers}
    return all(b.name.rsplit(".", 1)[0] in names for b in model.layout.blocks)
