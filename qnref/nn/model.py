"""Sequential model over a flat θ: forward, backward, R-op forward/backward, per-example grads.

The model is a pure function z = net(θ, X). Parameters live in one vector θ with a
:class:`~qnref.params.ParamLayout`; each layer receives zero-copy views of its blocks. Every pass
returns flat vectors with the same layout, so optimizers never re-pack.

Kronecker taps: passing ``taps={}`` to :meth:`Sequential.backward` collects, for every layer with
Kronecker structure, its homogeneous input āₗ₋₁ and its pre-activation gradient gₗ
(keyed by the layer's name), as KFAC / K-BFGS / Shampoo / TNT statistics and the Gram trick need.
"""
from __future__ import annotations

from typing import Any, Sequence

from .. import backend
from ..params import ParamLayout
from .allocator import tune_malloc
from .base import Ctx, Layer, Shape, walk


class Sequential:
    """A chain of layers; composites (residual blocks) nest and are treated as one layer."""

    def __init__(self, layers: Sequence[Layer], input_shape: Sequence[int], name: str = "model"):
        if not layers:
            raise ValueError("a model needs at least one layer")
        self.layers: list[Layer] = list(layers)
        self.name = name
        self.input_shape: Shape = tuple(int(d) for d in input_shape)
        if any(d < 1 for d in self.input_shape):
            raise ValueError(f"input_shape must be positive, got {self.input_shape}")
        shape = self.input_shape
        specs = []
        self._ranges: list[tuple[int, int]] = []
        for i, layer in enumerate(self.layers):
            layer.name = layer.name or f"{i}.{type(layer).__name__.lower()}"
            shape = layer.build(shape)
            first = len(specs)
            specs.extend((layer.name, s) for s in layer.param_specs())
            self._ranges.append((first, len(specs)))
        self.output_shape: Shape = tuple(shape)
        self.layout = ParamLayout(specs)
        self.n_params: int = self.layout.size
        self.couples_examples = any(l.couples_examples for l in walk(self.layers))
        self.kron_layers = [l for l in walk(self.layers) if l.has_kron]

    # -- set-up -----------------------------------------------------------------------------
    def init(self, seed: int = 0, *, scheme: str = "glorot", std: float = 0.01, device: backend.Device = "cpu", dtype: Any = "float64") -> Any:
        """A fresh θ (see :meth:`qnref.params.ParamLayout.init`)."""
        return self.layout.init(seed, scheme=scheme, std=std, device=device, dtype=dtype)

    def summary(self) -> str:
        rows = [f"{self.name}: input {self.input_shape} → output {self.output_shape}, n = {self.n_params:,}"]
        for layer, (a, b) in zip(self.layers, self._ranges):
            size = sum(self.layout.blocks[k].size for k in range(a, b))
            rows.append(f"  {layer.name:<18} {layer.describe():<34} out {layer.out_shape}  params {size:,}")
        return "\n".join(rows)

    def _split(self, views: list[Any] | None) -> list[list[Any] | None]:
        if views is None:
            return [None] * len(self.layers)
        return [views[a:b] for a, b in self._ranges]

    def check_input(self, X: Any) -> None:
        if getattr(X, "ndim", 0) != len(self.input_shape) + 1 or tuple(X.shape[1:]) != self.input_shape:
            raise ValueError(
                f"input must have shape (N, {', '.join(map(str, self.input_shape))}) for model {self.name!r}, "
                f"got {tuple(getattr(X, 'shape', ()))}"
            )

    # -- passes -----------------------------------------------------------------------------
    def forward(self, theta: Any, X: Any, *, train: bool = True) -> tuple[Any, list]:
        """Outputs z = net(θ, X) and the per-layer caches the other passes use."""
        if not backend.is_cupy_array(X):
            tune_malloc()  # keep freed activation buffers (allocator.py: measured page-fault cost)
        ctx = Ctx(train=train)
        caches = []
        h = X
        for layer, p in zip(self.layers, self._split(self.layout.views(theta))):
            h, cache = layer.forward(p, h, ctx)
            caches.append(cache)
        return h, caches

    def backward(self, theta: Any, caches: list, gz: Any, *, taps: dict | None = None, want_params: bool = True) -> Any:
        """VJP Jᵀ gz: the flat parameter gradient (None when ``want_params`` is False).

        With ``taps`` a dict, Kronecker layers record {name: {"a": āₗ₋₁, "g": gₗ, "kind": …}}.
        ``gz`` may be the gradient of the mean loss or per-example gradients: taps keep its scale.
        """
        xp = backend.namespace(theta)
        grad = xp.empty_like(theta) if want_params else None
        gviews = self._split(self.layout.views(grad)) if want_params else [None] * len(self.layers)
        pviews = self._split(self.layout.views(theta))
        g = gz
        last = len(self.layers) - 1
        for k in range(last, -1, -1):
            layer = self.layers[k]
            extra = {}
            if taps is not None:
                if layer.has_kron:
                    taps[layer.name] = layer.kron_taps(caches[k], g)
                if layer.sublayers():  # composites record their children's taps themselves
                    extra["taps"] = taps
            g = layer.backward(pviews[k], caches[k], g, gviews[k], need_gx=k > 0, **extra)
        return grad

    def jvp(self, theta: Any, caches: list, v: Any | None, dX: Any | None = None) -> tuple[Any, list]:
        """R-op forward: (J v, rcaches). ``v`` is a parameter direction (flat), ``dX`` an input one."""
        vviews = self._split(self.layout.views(v)) if v is not None else [None] * len(self.layers)
        pviews = self._split(self.layout.views(theta))
        d = dX
        rcaches = []
        for layer, p, dp, cache in zip(self.layers, pviews, vviews, caches):
            d, rc = layer.jvp(p, cache, d, dp)
            rcaches.append(rc)
        return d, rcaches

    def backward_rop(self, theta: Any, caches: list, rcaches: list, gz: Any, rgz: Any, v: Any, *,
                     want_grad: bool = True) -> tuple[Any, Any]:
        """R-op of the backward pass: (gradient, R{gradient}) for direction ``v`` (flat).

        With gz = ∂f/∂z and rgz = R{∂f/∂z} = H_L (J v) / N this is Pearlmutter's exact H v (data part).
        ``want_grad=False`` returns ``(None, R{gradient})`` without the gradient's parameter GEMMs (one
        of the nine GEMM passes of an MLP's H v: a point whose ∇f is known, e.g. in HF's CG, issue 21).
        """
        xp = backend.namespace(theta)
        grad = xp.empty_like(theta) if want_grad else None
        rgrad = xp.empty_like(theta)
        gviews = self._split(self.layout.views(grad)) if want_grad else [None] * len(self.layers)
        rviews = self._split(self.layout.views(rgrad))
        pviews = self._split(self.layout.views(theta))
        vviews = self._split(self.layout.views(v))
        g, rg = gz, rgz
        for k in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[k]
            if gviews[k]:
                layer.backward(pviews[k], caches[k], g, gviews[k], need_gx=False)
            g, rg = layer.backward_rop(pviews[k], caches[k], rcaches[k], g, rg, vviews[k], rviews[k], need_gx=k > 0)
        return grad, rgrad

    def per_example_grads(self, theta: Any, caches: list, gz: Any) -> Any:
        """(N, n) matrix of ∂ℓᵢ/∂θ given per-example output gradients gz[i] = ∂ℓᵢ/∂zᵢ."""
        xp = backend.namespace(theta)
        n_ex = gz.shape[0]
        out = xp.empty((n_ex, self.n_params), dtype=theta.dtype)
        oviews = self._split(self.layout.batched_views(out))
        pviews = self._split(self.layout.views(theta))
        g = gz
        for k in range(len(self.layers) - 1, -1, -1):
            g = self.layers[k].per_example_grads(pviews[k], caches[k], g, oviews[k])
        return out
