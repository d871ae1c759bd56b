"""The derived products of a point, implemented once on top of the primitives of
:class:`~qnref.curvature.protocol.PointPrimitives` (conventions in :mod:`qnref.curvature.protocol`).

=====================  =====================================================================  ========================
product                from the primitives                                                    reference
=====================  =====================================================================  ========================
``jvp(v)``             gather(local_jvp(v))                                                   J v
``vjp(u)``             reduce(local_vjp(own rows of u))                                       Jᵀ u
``ggn_vp(v)``          reduce(local_vjp(H_L (J v) / N)) + λ v                                 Schraudolph 2002 eq. 7
``fisher_vp(v, k)``    exact: the GGN without λ; empirical/sampled: cᵢ = eᵢᵀ(J v)ᵢ,           Martens 2020 §9.2
                       reduce(local_vjp(c ⊙ e / N)) — no per-example gradients formed
``output_grads(t)``    gather(local_output_grads(t))
``dz``                 output_grads("empirical")
``loss_sqrt_hessian()``  gather(local_loss_sqrt_hessian()); default primitive: H_{L,i} from C        SMW-GN (Ren ch. 5)
                       ``local_loss_hvp`` calls on unit vectors, Sᵢ = V √max(Λ, 0) (eigh)
``loss_hessian()``     gather(local_loss_hessian()); default primitive: the same C calls
``gram(kind)``         [gᵢᵀgⱼ] = P Pᵀ from per_example_grads; [Jᵢ Jⱼᵀ] from NC Jacobian rows  Ren thesis ch. 5
                       Jᵀ e_{(i,c)} (vjp of unit outputs); the NumPy point overrides with the
                       Kronecker trick of Alg. 17–22 (dense nets)
``check_direction(v)``  shape (n,), same dtype and array library as θ, finite
=====================  =====================================================================  ========================

``reduce`` (``reduce_sum``), ``gather`` (``gather_rows``) and ``local_rows`` are identities for
one process and the collectives of a data-parallel point.
"""
from __future__ import annotations

from typing import Any

from .. import backend
from .protocol import FISHER_KINDS, GRAM_KINDS


class NonFiniteError(ValueError):
    """θ, a direction or the data contain NaN/Inf."""


def is_empirical(targets: Any) -> bool:
    """True for the true targets: ``"empirical"`` (or ``None``, the adapters' older spelling)."""
    return targets is None or (isinstance(targets, str) and targets == "empirical")


class PointProducts:
    """Mixin: every derived product of :class:`~qnref.curvature.protocol.PointProtocol`.

    A subclass sets ``theta``, ``obj`` (with ``l2`` and ``counter``) and implements the
    primitives; it may override a derived product when it has a faster route (documented there).
    """

    theta: Any
    obj: Any

    # -- defaults of the primitives that one process does not need ------------------------------
    def reduce_sum(self, x: Any) -> Any:
        """Sum over the processes sharing the batch (identity for one process)."""
        return x

    def gather_rows(self, x: Any) -> Any:
        """Rows of all processes in batch order (identity for one process)."""
        return x

    def local_rows(self, u: Any) -> Any:
        """This process's rows of a whole-batch row array (identity for one process)."""
        return u

    def check_independent(self, what: str) -> None:
        """Examples are independent unless a subclass knows otherwise."""

    def select_targets(self, targets: Any, true: Any, convert: Any) -> Any:
        """The targets meant by ``targets``: ``true`` for "empirical", the point's ỹ
        (:meth:`sampled_targets`) for "sampled", ``convert(targets)`` for an explicit array."""
        if is_empirical(targets):
            return true
        if isinstance(targets, str):
            if targets == "sampled":
                return self.sampled_targets()
            raise ValueError(f"unknown targets {targets!r}; choose 'empirical', 'sampled' or pass an array of targets")
        return convert(targets)

    # -- attributes ----------------------------------------------------------------------------
    @property
    def N(self) -> int:
        """Examples in the whole batch (the mean's denominator)."""
        return self.obj.n_samples

    @property
    def layout(self) -> Any:
        """The :class:`~qnref.params.ParamLayout` of θ (the objective's)."""
        return self.obj.layout
    @property
    def l2(self) -> float:
        """λ of the term (λ/2)‖θ‖²."""
        return self.obj.l2

    @property
    def counter(self) -> Any:
        """The :class:`~qnref.curvature.objective.PassCounter` this point adds its passes to."""
        return self.obj.counter

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape (N, *per-example output shape) of the batch's outputs z (and of ``vjp``'s u)."""
        return tuple(self.z.shape)

    # -- checks --------------------------------------------------------------------------------
    def check_direction(self, v: Any, what: str = "v") -> None:
        """A direction must be a flat vector like θ: shape (n,) (``ValueError``), θ's dtype and
        array library (``TypeError``), finite (:class:`NonFiniteError`)."""
        self.layout.check(v, what)
        backend.namespace(v, self.theta)
        if v.dtype != self.theta.dtype:
            raise TypeError(f"{what} is {v.dtype} but theta is {self.theta.dtype}")
        if not backend.all_finite(v):
            raise NonFiniteError(f"{what} contains NaN or Inf")

    def _check_output_array(self, u: Any, what: str = "u") -> None:
        shape = self.output_shape
        if tuple(getattr(u, "shape", ())) != shape:
            raise ValueError(f"{what} must have the output shape {shape}, got {tuple(getattr(u, 'shape', ()))}")
        if not backend.all_finite(u):
            raise NonFiniteError(f"{what} contains NaN or Inf")

    def close_hvp(self, grad: Any, hv: Any, v: Any) -> Any:
        """Finish an R-op that also produced the data gradient: cache ``grad`` + λθ as ``grad``
        (unless already known, or ``grad`` is None) and return ``hv`` + λv (in place)."""
        if grad is not None and self._grad is None:
            if self.l2:
                grad += self.l2 * self.theta
            self._grad = grad
        if self.l2:
            hv += self.l2 * v
        return hv

    # -- Jacobian products ---------------------------------------------------------------------
    def jvp(self, v: Any) -> Any:
        """J v: the directional derivative of the outputs, shape (N, *output_shape)."""
        self.check_direction(v)
        return self.gather_rows(self.local_jvp(v))

    def vjp(self, u: Any) -> Any:
        """Jᵀ u = Σᵢ Jᵢᵀ uᵢ for output-space u of the outputs' shape (no 1/N, no L2)."""
        self._check_output_array(u)
        return self.reduce_sum(self.local_vjp(self.local_rows(u), "vjp"))

    # -- curvature products --------------------------------------------------------------------
    def _gauss_newton(self, v: Any, call: str) -> Any:
        """(1/N) Jᵀ H_L J v (the data term of the GGN)."""
        self.check_direction(v)
        jv = self.local_jvp(v)
        return self.reduce_sum(self.local_vjp(self.local_loss_hvp(jv) / self.N, call))

    def ggn_vp(self, v: Any) -> Any:
        """Generalized Gauss-Newton product G v = (1/N) Jᵀ H_L J v + λ v (Schraudolph 2002, eq. 7)."""
        gv = self._gauss_newton(v, "ggn_vp")
        if self.l2:
            gv += self.l2 * v
        return gv

    def fisher_vp(self, v: Any, kind: str = "empirical", *, targets: Any = None) -> Any:
        """F v for F = (1/N) Σᵢ gᵢ gᵢᵀ with gᵢ = Jᵢᵀ eᵢ (eᵢ = ∂ℓ/∂zᵢ at true or sampled targets).

        Computed without per-example gradients: cᵢ = eᵢᵀ (J v)ᵢ, then F v = Jᵀ (c ⊙ e) / N.
        ``kind="exact"`` is the expectation over ỹ, equal to (1/N) Jᵀ H_L J v for these losses
        (Martens 2020, §9.2). ``targets`` (kind "sampled" only) replaces the point's own draw
        :meth:`sampled_targets` (e.g. another point's draws, to compare two implementations).
        No L2 term.
        """
        if kind not in FISHER_KINDS:
            raise ValueError(f"unknown Fisher kind {kind!r}; choose 'empirical', 'sampled' or 'exact'")
        if targets is not None and kind != "sampled":
            raise ValueError(f"targets are for kind='sampled'; kind={kind!r} uses the true targets")
        if kind == "exact":
            return self._gauss_newton(v, "fisher_vp")
        self.check_independent("fisher_vp")
        e = self.local_output_grads(kind if targets is None else targets)
        self.check_direction(v)
        jv = self.local_jvp(v)
        n_rows = e.shape[0]
        c = (e * jv).reshape(n_rows, -1).sum(axis=1)
        return self.reduce_sum(self.local_vjp(e * (c / self.N).reshape((-1,) + (1,) * (e.ndim - 1)), "fisher_vp"))

    # -- output-space loss Hessians (SMW-GN) ------------------------------------------------------
    def _own_output_shape(self) -> tuple[int, ...]:
        return tuple(self.local_rows(self.z).shape)

    def local_loss_hessian(self) -> Any:
        """Default primitive: H_{L,i} (n_own, C, C) from C ``local_loss_hvp`` calls on unit vectors
        (symmetrised); point types with a closed form override it (and may return the diagonal)."""
        xp = self.xp
        shape = self._own_output_shape()
        if len(shape) != 2:
            raise ValueError(f"the output-space loss Hessian needs 2-D outputs (N, C), got {shape}")
        n, C = shape
        cols = []
        for c in range(C):
            u = xp.zeros(shape, dtype=self.theta.dtype)
            u[:, c] = 1.0
            cols.append(self.local_loss_hvp(u))
        H = xp.stack(cols, axis=2)                       # H[i, :, c] = H_i e_c
        return 0.5 * (H + H.transpose(0, 2, 1))

    def local_loss_sqrt_hessian(self) -> Any:
        """Default primitive: Sᵢ = Vᵢ √max(Λᵢ, 0) from the eigendecomposition of
        :meth:`local_loss_hessian` (or the elementwise root of a diagonal one); Sᵢ Sᵢᵀ = H_{L,i}."""
        xp = self.xp
        H = self.local_loss_hessian()
        if H.ndim == 2:
            return xp.sqrt(xp.maximum(H, 0))
        lam, V = xp.linalg.eigh(H)
        return V * xp.sqrt(xp.maximum(lam, 0))[:, None, :]

    def loss_sqrt_hessian(self) -> Any:
        """Sᵢ with H_{L,i} = Sᵢ Sᵢᵀ for the whole batch ((N, C, C), or (N, C) for a diagonal H_L)."""
        return self.gather_rows(self.local_loss_sqrt_hessian())

    def loss_hessian(self) -> Any:
        """H_{L,i} for the whole batch ((N, C, C), or its diagonal (N, C) for a diagonal H_L)."""
        return self.gather_rows(self.local_loss_hessian())

    # -- per-example quantities ----------------------------------------------------------------
    def output_grads(self, targets: Any = "empirical") -> Any:
        """eᵢ = ∂ℓ(zᵢ, tᵢ)/∂zᵢ of the whole batch, (N, *output_shape); ``targets`` "empirical",
        "sampled" (the point's ỹ) or an array of targets."""
        return self.gather_rows(self.local_output_grads(targets))

    @property
    def dz(self) -> Any:
        """Per-example output gradients ∂ℓᵢ/∂zᵢ at the true targets (N, *output_shape)."""
        return self.output_grads("empirical")

    def gram(self, kind: str = "grad") -> Any:
        """Gram matrices of Ren's thesis ch. 5 (data term, no 1/N).

        ``kind="grad"``: the N × N matrix [gᵢᵀ gⱼ] of per-example gradients (SMW natural gradient).
        ``kind="jacobian"``: the NC × NC matrix [Jᵢ Jⱼᵀ] of per-example output Jacobians, row
        index i·C + c (SMW Gauss-Newton). Generic route: P Pᵀ from :meth:`per_example_grads`, and
        the NC Jacobian rows Jᵀ e_{(i,c)} by one ``vjp`` each.
        """
        if kind not in GRAM_KINDS:
            raise ValueError(f"unknown Gram kind {kind!r}; choose 'grad' or 'jacobian'")
        self.check_independent("gram")
        xp = self.xp
        if kind == "grad":
            P = self.per_example_grads()
            return P @ P.T
        shape = self.output_shape
        if len(shape) != 2:
            raise ValueError("gram('jacobian') needs 2-D outputs (N, C)")
        N, C = shape
        rows = []
        for i in range(N):
            for c in range(C):
                u = xp.zeros(shape, dtype=self.theta.dtype)
                u[i, c] = 1.0
                rows.append(self.reduce_sum(self.local_vjp(self.local_rows(u), "gram")))
        J = xp.stack(rows, axis=0)
        return J @ J.T
