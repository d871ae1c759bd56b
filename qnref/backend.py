"""Array backends: NumPy on the CPU, CuPy on the GPU.

Core code never imports NumPy to operate on arrays that may live on the GPU. It asks
:func:`namespace` for the module of its inputs (``numpy`` or ``cupy``) and calls that.
Only functions that both libraries provide are used.

CuPy is imported lazily: ``import cupy`` succeeds on machines without a driver, but any array
operation then fails, so :func:`gpu_available` probes the runtime inside ``try``.
"""
from __future__ import annotations

import types
from typing import Any, Literal

import numpy

from . import host_kernels as _host_kernels

Device = Literal["cpu", "gpu"]
SUPPORTED_DTYPES = ("float32", "float64")

_cupy: types.ModuleType | None = None
_cupy_probed = False


class BackendError(TypeError):
    """Raised for mixed NumPy/CuPy inputs, unsupported dtypes or an unusable GPU."""


def _load_cupy() -> types.ModuleType | None:
    global _cupy, _cupy_probed
    if not _cupy_probed:
        _cupy_probed = True
        try:
            import cupy  # noqa: PLC0415 - optional, heavy

            _cupy = cupy
        except Exception:  # ImportError or a broken CUDA install
            _cupy = None
    return _cupy


def gpu_available() -> bool:
    """True when CuPy imports *and* a CUDA device answers."""
    cp = _load_cupy()
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def is_cupy_array(x: Any) -> bool:
    """True for a ``cupy.ndarray`` (without importing CuPy when it was never loaded)."""
    mod = type(x).__module__
    return mod.startswith("cupy")


def namespace(*arrays: Any) -> types.ModuleType:
    """Return ``numpy`` or ``cupy``: the namespace shared by all array arguments.

    Scalars and ``None`` are ignored. Mixing host and device arrays raises
    :class:`BackendError` naming the offending positions, instead of letting CuPy or NumPy
    fail later with an obscure message (or silently copy).
    """
    for a in arrays:    # the common case, host arrays only: one type test each (steps call this often)
        if type(a) is not numpy.ndarray:
            break
    else:
        return numpy
    kinds = []
    for i, a in enumerate(arrays):
        if a is None or isinstance(a, (int, float, complex, bool)):
            continue
        if is_cupy_array(a):
            kinds.append(("cupy", i))
        elif isinstance(a, (numpy.ndarray, numpy.generic)):
            kinds.append(("numpy", i))
        else:
            raise BackendError(
                f"argument {i} has type {type(a).__name__}; expected a numpy or cupy array"
            )
    names = {k for k, _ in kinds}
    if len(names) > 1:
        host = [i for k, i in kinds if k == "numpy"]
        dev = [i for k, i in kinds if k == "cupy"]
        raise BackendError(
            f"mixed backends: arguments {host} are NumPy (CPU) arrays and {dev} are CuPy (GPU) "
            "arrays; move them to one device first with qnref.backend.to_device"
        )
    if names == {"cupy"}:
        return _load_cupy()  # type: ignore[return-value]
    return numpy


def xp_for_device(device: Device) -> types.ModuleType:
    """The array module for ``device`` ("cpu" → numpy, "gpu" → cupy)."""
    if device == "cpu":
        return numpy
    if device == "gpu":
        if not gpu_available():
            raise BackendError(
                "device='gpu' requested but no usable CUDA device was found "
                "(install the 'gpu' extra, cupy-cuda13x, on a machine with an NVIDIA driver)"
            )
        return _load_cupy()  # type: ignore[return-value]
    raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")


def device_of(x: Any) -> Device:
    """"gpu" for CuPy arrays, "cpu" otherwise."""
    return "gpu" if is_cupy_array(x) else "cpu"


def to_device(x: Any, device: Device) -> Any:
    """Copy ``x`` to ``device`` (no copy when it already lives there)."""
    if device == "cpu":
        return x.get() if is_cupy_array(x) else numpy.asarray(x)
    xp = xp_for_device(device)
    return xp.asarray(x)


def to_numpy(x: Any) -> numpy.ndarray:
    """A host NumPy view/copy of ``x`` (for logging, plotting and checkpoints)."""
    return to_device(x, "cpu")


def check_dtype(dtype: Any) -> numpy.dtype:
    """Normalise ``dtype`` and reject anything but float32/float64 with a clear error."""
    try:
        dt = numpy.dtype(dtype)
    except TypeError as exc:
        raise BackendError(f"unsupported dtype {dtype!r}; use float32 or float64") from exc
    if dt.name not in SUPPORTED_DTYPES:
        raise BackendError(f"unsupported dtype {dt.name}; qnref computes in float32 or float64")
    if not dt.isnative:
        raise BackendError(f"dtype {dt.str} is {dt.name} in non-native (big-endian) byte order; convert the array "
                           f"with x.astype('{dt.name}') first (qnref computes in native-order float32/float64)")
    return dt


def default_rng(seed: int | None, xp: types.ModuleType = numpy) -> Any:
    """A seeded generator of the backend: ``numpy.random.Generator`` or CuPy's twin.

    Streams differ between backends (different bit generators); within one backend a seed
    reproduces the same numbers.
    """
    return xp.random.default_rng(seed)


def rng_state(rng: Any) -> dict:
    """Serialisable state of a NumPy generator (used by checkpoints)."""
    return rng.bit_generator.state


def set_rng_state(rng: Any, state: dict) -> None:
    rng.bit_generator.state = state


def from_dlpack(x: Any, device: Device | None = None) -> Any:
    """Import any DLPack-capable tensor (torch, JAX, CuPy, NumPy) without copying.

    The result lives where the producer's memory lives: host memory → NumPy, CUDA memory → CuPy.
    Pass ``device`` to force a (documented) copy to the other side.
    """
    dev_type = None
    if hasattr(x, "__dlpack_device__"):
        dev_type = int(x.__dlpack_device__()[0])
    # DLPack device types: 1 = CPU, 2 = CUDA, 3 = CUDA host (pinned), 13 = CUDA managed
    if dev_type in (2, 13):
        cp = _load_cupy()
        if cp is None:
            raise BackendError("a CUDA tensor was passed but CuPy is not installed")
        out = cp.from_dlpack(x)
    else:
        out = numpy.from_dlpack(x)
    return out if device is None else to_device(out, device)


def asarray(x: Any, xp: types.ModuleType, dtype: Any | None = None) -> Any:
    """``xp.asarray`` that refuses silent host↔device moves of existing arrays."""
    if is_cupy_array(x) and xp is numpy:
        raise BackendError("a CuPy (GPU) array was given where a NumPy (CPU) array is expected")
    if isinstance(x, numpy.ndarray) and not is_cupy_array(x) and xp is not numpy:
        raise BackendError("a NumPy (CPU) array was given where a CuPy (GPU) array is expected")
    return xp.asarray(x, dtype=dtype)


def all_finite(x: Any) -> bool:
    """True when every entry of ``x`` is finite (one host sync on the GPU). Large contiguous host
    float arrays are read once, split over the layer threads (:func:`qnref.host_kernels.all_finite`)."""
    fast = _host_kernels.all_finite(x)
    if fast is not None:
        return fast
    xp = namespace(x)
    return bool(xp.isfinite(x).all())


def check_finite(x: Any, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` and the first bad index when ``x`` has NaN/Inf."""
    if not all_finite(x):
        xp = namespace(x)
        bad = xp.argwhere(~xp.isfinite(x))
        first = tuple(int(i) for i in to_numpy(bad[0]))
        n_bad = int(bad.shape[0])
        raise ValueError(f"{what} contains {n_bad} non-finite value(s) (NaN or Inf), first at index {first}")


def scalar(x: Any) -> float:
    """A Python float from a 0-d array (a host sync on the GPU; keep these few)."""
    return float(x)
