"""Losses ℓ(z, y) on network outputs z (N × C), per example, with their output-space curvature.

Conventions (pinned by tests, see docs/engine.md):

- the objective is the batch **mean** f = (1/N) Σᵢ ℓ(zᵢ, yᵢ); every method here is per example
  (no 1/N) — :class:`~qnref.curvature.objective.Objective` applies the mean;
- ``mse``: ℓ = ½‖z − y‖² summed over outputs (H_L = I), the Gaussian negative log-likelihood
  with unit variance up to a constant; libraries that average over outputs differ by 1/C,
  those without ½ by 2;
- ``softmax_ce``: ℓ = −Σₖ yₖ log softmax(z)ₖ for integer labels (N,) or rows of class
  probabilities (N, C); H_L = s (diag p − p pᵀ) with s = Σₖ yₖ (= 1 for labels);
- ``sigmoid_ce``: binary cross-entropy summed over outputs, ℓ = Σₖ softplus(zₖ) − yₖ zₖ, for
  autoencoders with targets in [0, 1]; H_L = diag(p (1 − p)), p = σ(z).

Each loss gives: ``per_example`` ℓᵢ, ``dz`` = ∂ℓᵢ/∂zᵢ, ``hvp`` = H_{L,i} vᵢ, ``sqrt_hessian``
Sᵢ with H_{L,i} = Sᵢ Sᵢᵀ, ``hessian`` (explicit, an oracle for tests), and ``sample`` targets
from the model's predictive distribution p(y | z) (for the true Fisher: with these targets,
E[∇ℓ ∇ℓᵀ] = H_L for all three losses, which are canonical-link negative log-likelihoods).
"""
from __future__ import annotations

from typing import Any

from .. import backend
from .activations import sigmoid, sigmoid_expr, softplus_expr
from .chunks import rowwise


class Loss:
    """Base of the losses. ``dz``, ``hvp``, ``sqrt_hessian``, ``hessian`` and ``sample`` take an
    optional ``p=``: the predictive distribution :meth:`predictive` returned for the same z (a
    :class:`~qnref.curvature.objective.Point` computes it once and passes it to every call at its θ:
    one σ(z) or softmax(z) per point instead of one per call, e.g. per CG iteration of HF's G v).
    A loss whose ``predictive`` returns None (the default) is always called without it."""

    name = "loss"

    def check(self, z_shape: tuple[int, ...], y: Any) -> Any:
        """Validate targets against outputs of shape ``z_shape`` and return them normalised."""
        raise NotImplementedError

    def predictive(self, z: Any) -> Any:
        """The model's predictive distribution at outputs z that the other methods reuse (``p=``),
        or None when there is nothing worth caching."""
        return None

    def per_example(self, z, y):
        raise NotImplementedError

    def dz(self, z, y):
        raise NotImplementedError

    def hvp(self, z, y, v):
        raise NotImplementedError

    def sqrt_hessian(self, z, y):
        raise NotImplementedError

    def hessian(self, z, y):
        raise NotImplementedError

    def sample(self, z, rng):
        raise NotImplementedError

    def value(self, z, y):
        """Mean over the batch (a 0-d array)."""
        return self.per_example(z, y).mean()

    def __repr__(self) -> str:
        return self.name


def _logsumexp(xp, z):
    m = z.max(axis=1, keepdims=True)
    return (m + xp.log(xp.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def _softmax(xp, z):
    e = xp.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _check_same_shape(z_shape, y, what):
    if tuple(y.shape) != tuple(z_shape):
        raise ValueError(f"{what} targets must have the output shape {tuple(z_shape)}, got {tuple(y.shape)}")
    if y.dtype.kind != "f":
        raise ValueError(f"{what} targets must be floating point, got dtype {y.dtype}")


def _check_rows_sum_to_one(y: Any) -> None:
    """Probability targets: every row sums to 1 (to a tolerance of the dtype's rounding)."""
    xp = backend.namespace(y)
    if y.shape[0] == 0:
        return
    sums = y.sum(axis=1, dtype=y.dtype if y.dtype.kind == "f" else "float64")
    tol = max(1e-6, 8 * y.shape[1] * float(xp.finfo(sums.dtype).eps))
    bad = xp.abs(sums - 1) > tol
    if bool(bad.any()) or not backend.all_finite(sums):
        i = int(xp.argmax(bad | ~xp.isfinite(sums)))
        raise ValueError(f"softmax_ce probability targets must sum to 1 in every row; row {i} sums to "
                         f"{float(sums[i]):.6g} (normalise them: y / y.sum(axis=1, keepdims=True))")


class SoftmaxCrossEntropy(Loss):
    """Softmax cross-entropy; targets are integer labels (N,) or probabilities (N, C)."""

    name = "softmax_ce"

    def check(self, z_shape, y):
        xp = backend.namespace(y)
        n, c = z_shape[0], z_shape[-1]
        if len(z_shape) != 2:
            raise ValueError(f"softmax_ce needs 2-D outputs (N, C), got {tuple(z_shape)}")
        if y.ndim == 1:
            if y.dtype.kind not in "iu":
                raise ValueError(f"class labels must be integers, got dtype {y.dtype}")
            if y.shape[0] != n:
                raise ValueError(f"{y.shape[0]} labels for {n} examples")
            if n and (int(y.min()) < 0 or int(y.max()) >= c):
                raise ValueError(f"labels must lie in [0, {c}), got range [{int(y.min())}, {int(y.max())}]")
            return y
        if y.ndim == 2:
            _check_same_shape(z_shape, y, "softmax_ce")
            if bool((y < 0).any()):
                raise ValueError("softmax_ce probability targets must be non-negative")
            _check_rows_sum_to_one(y)
            return y
        raise ValueError(f"softmax_ce targets must be labels (N,) or probabilities (N, C), got shape {tuple(y.shape)}")

    def _onehot(self, z, y):
        xp = backend.namespace(z)
        if y.ndim == 2:
            return y.astype(z.dtype, copy=False)
        t = xp.zeros_like(z)
        t[xp.arange(z.shape[0]), y] = 1
        return t

    def per_example(self, z, y):
        xp = backend.namespace(z)
        lse = _logsumexp(xp, z)
        if y.ndim == 1:
            return lse - z[xp.arange(z.shape[0]), y]
        return lse * y.sum(axis=1) - (y * z).sum(axis=1)

    def predictive(self, z):
        """softmax(z) per row."""
        return self._probs(z, None)

    def _probs(self, z, p):
        """The given p, else softmax(z)."""
        return _softmax(backend.namespace(z), z) if p is None else p

    def dz(self, z, y, p=None):
        t = self._onehot(z, y)
        return self._probs(z, p) * t.sum(axis=1, keepdims=True) - t

    def _mass(self, z, y):
        if y.ndim == 1:
            return 1.0
        return y.sum(axis=1, keepdims=True).astype(z.dtype)

    def hvp(self, z, y, v, p=None):
        p = self._probs(z, p)
        return self._mass(z, y) * (p * v - p * (p * v).sum(axis=1, keepdims=True))

    def sqrt_hessian(self, z, y, p=None):
        # S = √s (diag √p − p √pᵀ):  S Sᵀ = s (diag p − 2 p pᵀ + p (Σ p) pᵀ) = s (diag p − p pᵀ)
        xp = backend.namespace(z)
        p = self._probs(z, p)
        r = xp.sqrt(p)
        s = xp.sqrt(xp.asarray(self._mass(z, y), dtype=z.dtype))
        eye = xp.eye(z.shape[1], dtype=z.dtype)
        mat = r[:, :, None] * eye[None] - p[:, :, None] * r[:, None, :]
        return mat * (s[:, :, None] if s.ndim == 2 else s)

    def hessian(self, z, y, p=None):
        xp = backend.namespace(z)
        p = self._probs(z, p)
        eye = xp.eye(z.shape[1], dtype=z.dtype)
        h = p[:, :, None] * eye[None] - p[:, :, None] * p[:, None, :]
        m = self._mass(z, y)
        return h * (m[:, :, None] if getattr(m, "ndim", 0) == 2 else m)

    def sample(self, z, rng, p=None):
        """Labels drawn from Categorical(softmax(z)) by inverting the CDF."""
        xp = backend.namespace(z)
        p = self._probs(z, p)
        u = rng.random((z.shape[0], 1), dtype=z.dtype)
        idx = (xp.cumsum(p, axis=1) < u).sum(axis=1)
        return xp.minimum(idx, z.shape[1] - 1).astype(xp.int64)

    def predict(self, z):
        return z.argmax(axis=1)


class MeanSquaredError(Loss):
    """ℓ = ½‖z − y‖² per example (sum over outputs)."""

    name = "mse"

    def check(self, z_shape, y):
        _check_same_shape(z_shape, y, "mse")
        return y

    def per_example(self, z, y):
        d = (z - y).reshape(z.shape[0], -1)
        return 0.5 * (d * d).sum(axis=1)

    def dz(self, z, y):
        return z - y

    def hvp(self, z, y, v):
        return v.copy()

    def sqrt_hessian(self, z, y):
        xp = backend.namespace(z)
        return xp.broadcast_to(xp.eye(z.shape[1], dtype=z.dtype), (z.shape[0], z.shape[1], z.shape[1])).copy()

    def hessian(self, z, y):
        return self.sqrt_hessian(z, y)

    def sample(self, z, rng):
        """y ~ N(z, I)."""
        return z + rng.standard_normal(z.shape, dtype=z.dtype)


def _bernoulli_hvp(p: Any, v: Any) -> Any:
    """H_L v = p(1 − p) v for σ outputs p (the sigmoid cross-entropy's diagonal output Hessian)."""
    return p * (1 - p) * v


class SigmoidCrossEntropy(Loss):
    """Binary cross-entropy on logits, summed over outputs (autoencoders, binary labels)."""

    name = "sigmoid_ce"

    def check(self, z_shape, y):
        _check_same_shape(z_shape, y, "sigmoid_ce")
        if bool((y < 0).any()) or bool((y > 1).any()):
            raise ValueError("sigmoid_ce targets must lie in [0, 1]")
        return y

    # per example (row), so each pass runs over ranges of rows on the layer threads (chunks.rowwise:
    # the same bits; the loss and its gradient were single-threaded passes of 2-5 ms on the MNIST
    # autoencoder's (1000, 784) output)
    def per_example(self, z, y):
        xp = backend.namespace(z)
        return rowwise(lambda z_, y_: (softplus_expr(xp, z_) - y_ * z_).reshape(z_.shape[0], -1).sum(axis=1), z, y)

    def predictive(self, z):
        """σ(z) (:func:`~qnref.nn.activations.sigmoid`: the bits of every method's own σ)."""
        return self._p(z)

    def _p(self, z, p=None):
        """The given p, else σ(z)."""
        return sigmoid(backend.namespace(z), z) if p is None else p

    def dz(self, z, y, p=None):
        xp = backend.namespace(z)
        if p is not None:
            return p - y
        return rowwise(lambda z_, y_: sigmoid_expr(xp, z_) - y_, z, y)

    def hvp(self, z, y, v, p=None):
        xp = backend.namespace(z)
        if p is not None:
            return rowwise(_bernoulli_hvp, p, v)

        def f(z_, v_):
            return _bernoulli_hvp(sigmoid_expr(xp, z_), v_)
        return rowwise(f, z, v)

    def sqrt_hessian(self, z, y, p=None):
        xp = backend.namespace(z)
        p = self._p(z, p)
        return xp.sqrt(p * (1 - p))[:, :, None] * xp.eye(z.shape[1], dtype=z.dtype)[None]

    def hessian(self, z, y, p=None):
        xp = backend.namespace(z)
        p = self._p(z, p)
        return (p * (1 - p))[:, :, None] * xp.eye(z.shape[1], dtype=z.dtype)[None]

    def sample(self, z, rng, p=None):
        """y ~ Bernoulli(σ(z)) per output."""
        return (rng.random(z.shape, dtype=z.dtype) < self._p(z, p)).astype(z.dtype)

    def predict(self, z):
        return (z > 0).astype(z.dtype)


LOSSES = {"softmax_ce": SoftmaxCrossEntropy, "ce": SoftmaxCrossEntropy, "mse": MeanSquaredError, "sigmoid_ce": SigmoidCrossEntropy, "bce": SigmoidCrossEntropy}


def get_loss(loss: "str | Loss") -> Loss:
    """A loss instance from a name (softmax_ce, mse, sigmoid_ce) or pass an instance through."""
    if isinstance(loss, Loss):
        return loss
    try:
        return LOSSES[loss]()
    except KeyError:
        raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)}") from None
