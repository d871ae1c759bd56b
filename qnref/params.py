"""Flat parameter vectors and their per-layer views.

Everything in qnref optimizes one flat vector θ ∈ Rⁿ. A :class:`ParamLayout` lists the blocks
(name, shape, offset); :meth:`ParamLayout.views` returns zero-copy reshaped views of any vector
with that layout (θ itself, a gradient, a direction v), so quasi-Newton methods work on vectors
while Kronecker methods work on the per-layer matrices W̄ₗ = [Wₗ bₗ] (bias as last column,
the homogeneous coordinates of Martens & Grosse 2015 and Ren's thesis ch. 2).

Initialisers (applied on the host with a seeded NumPy generator and then moved, so a seed gives
the same θ on the CPU and the GPU):

- ``glorot`` / ``xavier``: U(−r, r), r = √(6 / (fan_in + fan_out)) (Glorot & Bengio 2010);
- ``glorot_normal``: N(0, 2 / (fan_in + fan_out));
- ``he``: N(0, 2 / fan_in) (He et al. 2015), the default for ReLU nets;
- ``gaussian``: N(0, std²) with the given ``std`` (the sampled-QN poster and Martens 2010 style);
- ``sparse``: Martens (2010) sparse init, 15 nonzero N(0, 1) incoming weights per unit.

Biases (the last column of W̄), BatchNorm shifts start at 0 and BatchNorm scales at 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy

from . import backend

SCHEMES = ("glorot", "xavier", "glorot_normal", "he", "gaussian", "sparse")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter block of a layer, as the layer declares it in ``Layer.param_specs()``.

    ``name``: the block's name inside the layer (``"W"``, ``"gamma"``, …; the layout prefixes the
    layer path); ``shape``: the block's shape (``W̄ = [W b]`` is (d_out, d_in + 1)); ``kind``:
    ``"weight"`` (a W̄ whose last column is the bias), ``"scale"`` or ``"shift"`` — it selects the
    initial values in :meth:`ParamLayout.init` (see the module docstring); ``fan``: (fan_in,
    fan_out) for the Glorot/He schemes. Layers do not initialise their blocks themselves.
    """

    name: str
    shape: tuple[int, ...]
    kind: str = "weight"
    fan: tuple[int, int] = (1, 1)


@dataclass(frozen=True)
class Block:
    """A parameter block: ``theta[offset:offset + size].reshape(shape)``."""

    name: str
    shape: tuple[int, ...]
    offset: int
    kind: str
    fan: tuple[int, int]

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))    # 1 for shape (); math.prod: views() asks for it per block and call

    @property
    def stop(self) -> int:
        return self.offset + self.size


class ParamLayout:
    """The blocks of a model's flat parameter vector, in order."""

    def __init__(self, specs: Sequence[tuple[str, ParamSpec]]):
        blocks = []
        off = 0
        for prefix, spec in specs:
            b = Block(f"{prefix}.{spec.name}" if prefix else spec.name, tuple(spec.shape), off, spec.kind, spec.fan)
            blocks.append(b)
            off += b.size
        self.blocks: list[Block] = blocks
        self.size: int = off

    def __len__(self) -> int:
        return len(self.blocks)

    def __repr__(self) -> str:
        return f"ParamLayout(n={self.size}, blocks={[(b.name, b.shape) for b in self.blocks]})"

    def check(self, theta: Any, what: str = "theta") -> None:
        """Raise a clear error unless ``theta`` is a 1-D float vector of length n."""
        if getattr(theta, "ndim", None) != 1:
            raise ValueError(f"{what} must be a flat 1-D vector of length {self.size}, got shape {getattr(theta, 'shape', None)}")
        if theta.shape[0] != self.size:
            raise ValueError(f"{what} has length {theta.shape[0]}, the model has {self.size} parameters")
        backend.check_dtype(theta.dtype)

    def views(self, theta: Any) -> list[Any]:
        """Zero-copy views of every block of ``theta`` (writes go through to θ)."""
        return [theta[b.offset : b.stop].reshape(b.shape) for b in self.blocks]

    def batched_views(self, mat: Any) -> list[Any]:
        """Views of the columns of an (N, n) matrix as (N, *shape) per block (per-example grads)."""
        n_rows = mat.shape[0]
        return [mat[:, b.offset : b.stop].reshape((n_rows,) + b.shape) for b in self.blocks]

    def index(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"no parameter block named {name!r}; blocks: {[b.name for b in self.blocks]}")

    def init(
        self,
        seed: int = 0,
        *,
        scheme: str = "glorot",
        std: float = 0.01,
        device: backend.Device = "cpu",
        dtype: Any = "float64",
    ) -> Any:
        """A freshly initialised θ (see module docstring for the schemes)."""
        if scheme not in SCHEMES:
            raise ValueError(f"unknown init scheme {scheme!r}; choose one of {SCHEMES}")
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}")
        dt = backend.check_dtype(dtype)
        rng = numpy.random.default_rng(seed)
        theta = numpy.zeros(self.size, dtype=numpy.float64)
        for b, view in zip(self.blocks, self.views(theta)):
            if b.kind == "scale":
                view[...] = 1.0
            elif b.kind == "weight":
                w = view[..., :-1] if view.ndim == 2 else view
                w[...] = _draw(rng, w.shape, b.fan, scheme, std)
        return backend.to_device(theta.astype(dt), device)


def _draw(rng: numpy.random.Generator, shape: tuple[int, ...], fan: tuple[int, int], scheme: str, std: float) -> numpy.ndarray:
    fan_in, fan_out = fan
    if scheme in ("glorot", "xavier"):
        r = numpy.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-r, r, size=shape)
    if scheme == "glorot_normal":
        return rng.standard_normal(shape) * numpy.sqrt(2.0 / (fan_in + fan_out))
    if scheme == "he":
        return rng.standard_normal(shape) * numpy.sqrt(2.0 / fan_in)
    if scheme == "gaussian":
        return rng.standard_normal(shape) * std
    # sparse (Martens 2010 §5): each output unit gets min(15, fan_in) nonzero N(0,1) inputs
    out = numpy.zeros(shape)
    rows = out.reshape(shape[0], -1)
    k = min(15, rows.shape[1])
    for r in range(rows.shape[0]):
        idx = rng.choice(rows.shape[1], size=k, replace=False)
        rows[r, idx] = rng.standard_normal(k)
    return out
