"""A recording "device" backend: qnref's CuPy code path executed by NumPy, every array call logged.

While :func:`recording_backend` is active,

* :class:`DeviceArray` (an ``numpy.ndarray`` subclass whose ``__module__`` starts with ``cupy``, so
  :func:`qnref.backend.is_cupy_array` is true for it) plays the CuPy array: indexing, reductions and
  NumPy functions return 0-d arrays instead of NumPy scalars, as CuPy does, and every implicit
  device→host conversion (``float``/``int``/``bool``/``operator.index``, ``.item()``,
  ``.tolist()``, ``.get()``, formatting) is counted as a **host sync**;
* :func:`qnref.backend.namespace` of such arrays returns :class:`Namespace`, a proxy of ``numpy``
  named ``cupy`` that records every attribute and call (``cupy.linalg.norm``, ``cupy.random.
  Generator.standard_normal``, …) with the kinds of its positional arguments and the names of its
  keyword arguments, then runs NumPy on the unwrapped arrays and wraps the results;
* array methods and properties (``cupy.ndarray.sum``, ``cupy.ndarray.T``) and operators
  (``cupy.add`` for ``a + b``) are recorded as well; fake ``cupy``/``cupyx``/``cupyx.scipy.*``
  modules stand in for the real ones (``cupyx.scipy.linalg`` → ``scipy.linalg`` on host copies);
* NumPy-only behaviours are recorded as *violations*: ``numpy.asarray``/``numpy.array`` of a device
  array (CuPy raises ``TypeError``), NumPy functions called directly on device arrays, host arrays
  mixed into device operations, scipy or numba called on device arrays.

Every event carries the ``qnref/…py:line`` of the innermost qnref frame (events without one, i.e.
made by test code, are not recorded). :mod:`test_cupy_conformance` checks the events against the
pinned CuPy API (``tests/cupy_api.json``, written by ``tools/cupy_names.py``);
:mod:`test_host_syncs` counts the syncs of each optimizer step.
"""
from __future__ import annotations

import collections
import contextlib
import linecache
import pathlib
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy

import qnref

QNREF_DIR = str(pathlib.Path(qnref.__file__).resolve().parent)
_NP_ND = numpy.ndarray
_np_view = numpy.ndarray.view
_np_getitem = numpy.ndarray.__getitem__
_np_setitem = numpy.ndarray.__setitem__
_np_iter = numpy.ndarray.__iter__
_HERE = __file__

#: NumPy array constructors that copy a device array to the host when given one (CuPy raises)
HOST_CONVERTERS = ("asarray", "array", "asanyarray", "ascontiguousarray", "asfortranarray", "asarray_chkfinite")
#: namespace functions that legitimately accept host data (host → device copies)
HOST_OK = {"asarray", "array", "asanyarray", "ascontiguousarray", "asfortranarray", "random.default_rng"}


@dataclass(frozen=True)
class Event:
    """One recorded use. ``kind``: ``call`` (namespace function), ``attr`` (namespace attribute or
    value), ``method``/``prop`` (on an array), ``op`` (operator → ufunc), ``sync`` (device→host
    conversion), ``violation`` (NumPy-only behaviour, see ``name``)."""

    kind: str
    name: str
    site: str
    args: tuple[str, ...] = ()
    kwargs: tuple[str, ...] = ()
    detail: str = ""


@dataclass
class Recorder:
    """Counts of :class:`Event` and per-phase host-sync counts."""

    events: collections.Counter = field(default_factory=collections.Counter)
    phase: str | None = None
    syncs: collections.Counter = field(default_factory=collections.Counter)
    sync_sites: collections.Counter = field(default_factory=collections.Counter)

    # ------------------------------------------------------------------ bookkeeping
    def note(self, kind: str, name: str, args: tuple = (), kwargs: dict | None = None, detail: str = "", depth: int = 2) -> None:
        site = qnref_site(depth + 1)
        if site is None:
            return
        self.events[Event(kind, name, site, tuple(kind_of(a) for a in args), tuple(sorted(kwargs or ())), detail)] += 1

    def sync(self, what: str, depth: int = 2) -> None:
        site = qnref_site(depth + 1)
        if site is None:
            return
        self.events[Event("sync", what, site)] += 1
        if self.phase is not None:
            self.syncs[self.phase] += 1
            caller = qnref_site(depth + 1, skip=BACKEND_FILE)
            if caller != site:  # a backend helper (scalar, all_finite): name its caller too
                site = f"{caller} (via {site.split('/')[-1]})"
            self.sync_sites[(self.phase, what, site)] += 1

    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        old, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = old

    def of_kind(self, *kinds: str) -> dict[Event, int]:
        return {e: n for e, n in self.events.items() if e.kind in kinds}

    @property
    def total(self) -> int:
        return sum(self.events.values())


#: the active recorder (one at a time)
REC: Recorder | None = None


BACKEND_FILE = f"{QNREF_DIR}/backend.py"


def qnref_site(depth: int, skip: str = "") -> str | None:
    """``qnref/…py:line`` of the innermost qnref frame above ``depth`` (None: not called from qnref),
    passing over frames of the file ``skip`` when a qnref frame lies beyond them."""
    f = sys._getframe(depth)
    first = None
    while f is not None:
        fn = f.f_code.co_filename
        if fn.startswith(QNREF_DIR) and fn == skip and first is None:
            first = f"qnref{fn[len(QNREF_DIR):]}:{f.f_lineno}"
        elif fn.startswith(QNREF_DIR):
            return f"qnref{fn[len(QNREF_DIR):]}:{f.f_lineno}"
        f = f.f_back
    return first


def caller_file(depth: int) -> str:
    """File of the first frame above ``depth`` that is not this module."""
    f = sys._getframe(depth)
    while f is not None and f.f_code.co_filename == _HERE:
        f = f.f_back
    return "" if f is None else f.f_code.co_filename


def kind_of(a: Any) -> str:
    """The argument kind recorded for a positional argument."""
    if isinstance(a, DeviceArray):
        return "device"
    if isinstance(a, _NP_ND):
        return "host"
    if a is None:
        return "None"
    if isinstance(a, bool):
        return "bool"
    if isinstance(a, int):
        return "int"
    if isinstance(a, float):
        return "float"
    if isinstance(a, numpy.generic):
        return "npscalar"
    if isinstance(a, str):
        return "str"
    if isinstance(a, (tuple, list)):
        inner = sorted({kind_of(x) for x in a})
        return f"{type(a).__name__}[{','.join(inner)}]"
    if isinstance(a, (type, numpy.dtype)):
        return "dtype"
    if isinstance(a, slice):
        return "slice"
    if isinstance(a, ObjectProxy):
        return "object"
    if callable(a):
        return "callable"
    return type(a).__name__


# ---------------------------------------------------------------------- wrapping
def unwrap(x: Any) -> Any:
    """Device arrays → plain NumPy views (recursively through tuples, lists and dicts)."""
    if isinstance(x, DeviceArray):
        return _np_view(x, _NP_ND)
    if type(x) is tuple:
        return tuple(unwrap(v) for v in x)
    if type(x) is list:
        return [unwrap(v) for v in x]
    if type(x) is dict:
        return {k: unwrap(v) for k, v in x.items()}
    if isinstance(x, ObjectProxy):
        return x._obj
    return x


def wrap(x: Any) -> Any:
    """NumPy results → device arrays (NumPy scalars → 0-d device arrays, as CuPy returns them)."""
    if isinstance(x, DeviceArray):
        return x
    if isinstance(x, _NP_ND):
        return _np_view(x, DeviceArray)
    if isinstance(x, numpy.generic):
        return _np_view(numpy.asarray(x), DeviceArray)
    if isinstance(x, tuple):
        vals = [wrap(v) for v in x]
        return type(x)(*vals) if hasattr(x, "_fields") else tuple(vals)
    if type(x) is list:
        return [wrap(v) for v in x]
    if isinstance(x, numpy.random.Generator):
        return GeneratorProxy(x)
    return x


def has_device(args: Any) -> bool:
    for a in args:
        if isinstance(a, DeviceArray):
            return True
        if type(a) in (tuple, list) and any(isinstance(v, DeviceArray) for v in a):
            return True
    return False


class DeviceArray(numpy.ndarray):
    """The stand-in for ``cupy.ndarray`` (see the module docstring)."""

    __module__ = "cupy._recording"

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if REC is not None:
            name = ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}"
            if _direct_numpy_call(ufunc.__name__):
                REC.note("violation", f"numpy.{name}", inputs, kwargs, "NumPy ufunc called on a device array (use xp)")
            else:
                REC.note("op", f"cupy.{name}", inputs, kwargs)
            if any(isinstance(a, _NP_ND) and not isinstance(a, DeviceArray) for a in inputs):
                REC.note("violation", f"cupy.{name}", inputs, kwargs, "host NumPy array mixed into a device operation (CuPy raises TypeError)")
        if out is not None:
            kwargs["out"] = tuple(unwrap(o) for o in out)
        res = getattr(ufunc, method)(*unwrap(inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return wrap(res)

    def __array_function__(self, func, types_, args, kwargs):
        if REC is not None:
            src = caller_file(2)
            name = f"{func.__module__.split('.')[0]}.{func.__name__}"
            if "/scipy/" in src:
                REC.note("violation", "scipy", args, kwargs, f"scipy called on a device array ({name} from {pathlib.Path(src).name})")
            else:
                REC.note("violation", name, args, kwargs, "NumPy function called directly on a device array (use xp)")
        return wrap(func(*unwrap(args), **unwrap(kwargs)))

    # indexing: CuPy returns 0-d arrays, and a 0-d device index is not a host sync
    def __getitem__(self, key):
        return wrap(_np_getitem(_np_view(self, _NP_ND), unwrap(key)))

    def __setitem__(self, key, value):
        _np_setitem(_np_view(self, _NP_ND), unwrap(key), unwrap(value))

    def __iter__(self):
        for v in _np_iter(_np_view(self, _NP_ND)):
            yield wrap(v)

    # implicit device → host conversions: host syncs
    def __float__(self):
        _sync("float()")
        return float(_np_view(self, _NP_ND))

    def __int__(self):
        _sync("int()")
        return int(_np_view(self, _NP_ND))

    def __index__(self):
        _sync("operator.index()")
        return _np_view(self, _NP_ND).__index__()

    def __bool__(self):
        _sync("bool()")
        return bool(_np_view(self, _NP_ND))

    def __complex__(self):
        _sync("complex()")
        return complex(_np_view(self, _NP_ND))

    def __format__(self, spec):
        _sync("format()")
        return format(_np_view(self, _NP_ND), spec)

    def __repr__(self):
        _sync("repr()")
        return "device:" + repr(_np_view(self, _NP_ND))

    __str__ = __repr__

    def get(self, stream: Any = None, order: str = "C", out: Any = None, blocking: bool = True) -> numpy.ndarray:
        """CuPy's explicit device → host copy (a host sync)."""
        _sync(".get()")
        return numpy.array(_np_view(self, _NP_ND), order=order)


def _sync(what: str) -> None:
    if REC is not None:
        REC.sync(what, depth=3)


def _direct_numpy_call(name: str) -> bool:
    """True when the qnref source line that triggered a ufunc spells ``numpy.<name>(``/``np.<name>(``."""
    f = sys._getframe(2)
    if not f.f_code.co_filename.startswith(QNREF_DIR):
        return False  # an operator or call outside qnref (tests, scipy)
    line = linecache.getline(f.f_code.co_filename, f.f_lineno)
    return f"numpy.{name}(" in line or f"np.{name}(" in line


_SYNC_METHODS = {"item": ".item()", "tolist": ".tolist()", "tobytes": ".tobytes()", "tofile": ".tofile()", "dump": ".dump()", "dumps": ".dumps()"}


def _make_method(name: str):
    base = getattr(_NP_ND, name)

    def method(self, *args, **kwargs):
        if REC is not None:
            REC.note("method", f"cupy.ndarray.{name}", args, kwargs)
            if name in _SYNC_METHODS:
                REC.sync(_SYNC_METHODS[name])
        return wrap(base(_np_view(self, _NP_ND), *unwrap(args), **unwrap(kwargs)))

    method.__name__ = name
    return method


def _make_property(name: str):
    def get(self):
        if REC is not None:
            REC.note("prop", f"cupy.ndarray.{name}")
        return wrap(getattr(_np_view(self, _NP_ND), name))

    def set_(self, value):
        setattr(_np_view(self, _NP_ND), name, unwrap(value))

    return property(get, set_)


for _name in dir(_NP_ND):
    if _name.startswith("_") or _name in ("get", "view"):
        continue
    _attr = getattr(_NP_ND, _name)
    if callable(_attr):
        setattr(DeviceArray, _name, _make_method(_name))
    else:
        setattr(DeviceArray, _name, _make_property(_name))


def _view(self, *args, **kwargs):
    if REC is not None:
        REC.note("method", "cupy.ndarray.view", args, kwargs)
    return wrap(_np_view(_np_view(self, _NP_ND), *unwrap(args), **kwargs))


DeviceArray.view = _view


# ---------------------------------------------------------------------- namespaces
class Function:
    """A recorded namespace function (or ufunc, whose methods are reached as attributes)."""

    def __init__(self, fn: Any, path: str):
        self._fn, self._path = fn, path

    def __call__(self, *args, **kwargs):
        if REC is not None:
            rel = self._path.split(".", 1)[1] if "." in self._path else self._path
            REC.note("call", self._path, args, kwargs)
            if rel not in HOST_OK and any(isinstance(a, _NP_ND) and not isinstance(a, DeviceArray) for a in list(args) + list(kwargs.values())):
                REC.note("violation", self._path, args, kwargs, "host NumPy array passed to a device function (CuPy raises TypeError)")
        return wrap(self._fn(*unwrap(args), **unwrap(kwargs)))

    def __getattr__(self, name: str):
        val = getattr(self._fn, name)
        if callable(val):
            return Function(val, f"{self._path}.{name}")
        if REC is not None:
            REC.note("attr", f"{self._path}.{name}")
        return val


class ObjectProxy:
    """A CuPy object emulated by its NumPy/SciPy twin (``cupy.random.Generator``,
    ``cupyx.scipy.sparse.linalg.LinearOperator``, …): attributes and method calls recorded under
    ``path``, arrays unwrapped on the way in and wrapped on the way out."""

    def __init__(self, obj: Any, path: str):
        self._obj, self._path = obj, path

    def __getattr__(self, name: str):
        val = getattr(self._obj, name)
        path = f"{self._path}.{name}"
        if callable(val):
            return Function(val, path)
        if REC is not None:
            REC.note("attr", path)
        return wrap(val)

    def __matmul__(self, other):
        return Function(self._obj.__matmul__, f"{self._path}.__matmul__")(other)


class GeneratorProxy(ObjectProxy):
    """``cupy.random.Generator``: recorded methods of a NumPy generator."""

    def __init__(self, gen: numpy.random.Generator):
        super().__init__(gen, "cupy.random.Generator")
        self._gen = gen


def _device_callback(fn: Any) -> Any:
    """A user callback handed to an emulated CuPy object: it receives and returns device arrays."""
    def cb(*args, **kwargs):
        return unwrap(fn(*wrap(args), **wrap(kwargs) if kwargs else {}))

    return cb


class ClassProxy:
    """A CuPy class emulated by a NumPy/SciPy class: instances are :class:`ObjectProxy` objects and
    callables passed to the constructor (``matvec=``) see device arrays."""

    def __init__(self, cls: type, path: str):
        self._cls, self._path = cls, path

    def __call__(self, *args, **kwargs):
        if REC is not None:
            REC.note("call", self._path, args, kwargs)
        args = tuple(_device_callback(a) if callable(a) and not isinstance(a, type) else unwrap(a) for a in args)
        kwargs = {k: _device_callback(v) if callable(v) and not isinstance(v, type) else unwrap(v) for k, v in kwargs.items()}
        return ObjectProxy(self._cls(*args, **kwargs), self._path)


class _FakeCuda:
    """Just enough of ``cupy.cuda`` for :func:`qnref.backend.gpu_available`."""

    class runtime:  # noqa: N801 - mirrors cupy.cuda.runtime
        @staticmethod
        def getDeviceCount() -> int:  # noqa: N802
            return 1

    class Device:  # noqa: D106 - mirrors cupy.cuda.Device (one device, nothing to wait for)
        def __init__(self, device_id: int = 0):
            self.id = device_id

        def synchronize(self) -> None:
            pass

        def use(self) -> None:
            pass


class Namespace(types.ModuleType):
    """A recorded proxy of a NumPy/SciPy module under a CuPy name."""

    def __init__(self, target: Any, path: str, extra: dict | None = None):
        super().__init__(path)
        self._target, self._path, self._extra, self._subs = target, path, dict(extra or {}), {}
        # classes of cupyx.scipy.* stand-ins (SciPy classes) take and return device arrays
        self._emulate_classes = path.startswith("cupyx")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        full = f"{self._path}.{name}"
        if name in self._extra:
            val = self._extra[name]
            if REC is not None and not isinstance(val, Namespace):
                REC.note("attr", full)
            return val
        val = getattr(self._target, name)
        if isinstance(val, types.ModuleType):
            if name not in self._subs:
                self._subs[name] = Namespace(val, full)
            return self._subs[name]
        if isinstance(val, type) and self._emulate_classes:
            return ClassProxy(val, full)
        if isinstance(val, type) or not callable(val):
            if REC is not None:
                REC.note("attr", full)
            return val
        return Function(val, full)


def _asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None, blocking: bool = True) -> numpy.ndarray:
    if isinstance(a, DeviceArray):
        _sync("cupy.asnumpy()")
        return numpy.array(_np_view(a, _NP_ND), order=order)
    return numpy.asarray(a, order=order)


def _scatter(ufunc):
    def f(a, slices, value):
        ufunc.at(a, slices, value)

    return f


def _fake_modules() -> dict[str, Any]:
    import scipy.linalg  # noqa: PLC0415
    import scipy.sparse.linalg  # noqa: PLC0415
    import scipy.special  # noqa: PLC0415

    cupy = Namespace(numpy, "cupy", {"ndarray": DeviceArray, "cuda": _FakeCuda, "asnumpy": Function(_asnumpy, "cupy.asnumpy")})
    sla = Namespace(scipy.linalg, "cupyx.scipy.linalg")
    ssla = Namespace(scipy.sparse.linalg, "cupyx.scipy.sparse.linalg")
    sparse = Namespace(scipy.sparse, "cupyx.scipy.sparse", {"linalg": ssla})
    special = Namespace(scipy.special, "cupyx.scipy.special")
    sp = Namespace(scipy, "cupyx.scipy", {"linalg": sla, "sparse": sparse, "special": special})
    cupyx = Namespace(types.SimpleNamespace(), "cupyx", {
        "scipy": sp,
        "scatter_add": Function(_scatter(numpy.add), "cupyx.scatter_add"),
        "scatter_max": Function(_scatter(numpy.maximum), "cupyx.scatter_max"),
        "scatter_min": Function(_scatter(numpy.minimum), "cupyx.scatter_min"),
    })
    return {"cupy": cupy, "cupyx": cupyx, "cupyx.scipy": sp, "cupyx.scipy.linalg": sla,
            "cupyx.scipy.sparse": sparse, "cupyx.scipy.sparse.linalg": ssla, "cupyx.scipy.special": special}


def _host_converter(name: str, fn: Any):
    def conv(*args, **kwargs):
        if REC is not None and has_device(args[:1]):
            src = caller_file(2)
            if "/scipy/" in src:
                REC.note("violation", "scipy", args[:1], kwargs, f"scipy called on a device array (numpy.{name} in {pathlib.Path(src).name})")
            else:
                REC.note("violation", f"numpy.{name}", args[:1], kwargs, "NumPy conversion of a device array (CuPy raises TypeError; use .get() / backend.to_numpy)")
            REC.sync(f"numpy.{name}()")
            args = (unwrap(args[0]),) + args[1:]
        return fn(*args, **kwargs)

    conv.__name__ = name
    return conv


class _KernelModule(types.ModuleType):
    """A numba kernel module whose kernels flag device-array arguments."""

    def __init__(self, mod: types.ModuleType):
        super().__init__(mod.__name__)
        self._mod = mod

    def __getattr__(self, name: str):
        val = getattr(self._mod, name)
        if not callable(val) or isinstance(val, type):
            return val

        def kernel(*args, **kwargs):
            if REC is not None and has_device(args):
                REC.note("violation", f"numba:{self._mod.__name__}.{name}", args, kwargs, "numba kernel called on a device array")
            return val(*unwrap(args), **unwrap(kwargs))

        return kernel


@contextlib.contextmanager
def recording_backend(rec: Recorder | None = None) -> Iterator[Recorder]:
    """Install the recording device backend (see the module docstring) for the ``with`` block."""
    global REC
    from qnref import backend  # noqa: PLC0415
    from qnref.nn import conv  # noqa: PLC0415

    if REC is not None:
        raise RuntimeError("recording_backend is not re-entrant")
    rec = rec or Recorder()
    fakes = _fake_modules()
    saved_mods = {k: sys.modules.get(k) for k in fakes}
    saved_backend = (backend._cupy, backend._cupy_probed)
    saved_np = {n: getattr(numpy, n) for n in HOST_CONVERTERS}
    saved_lazy = conv.lazy_kernels
    try:
        sys.modules.update(fakes)
        backend._cupy, backend._cupy_probed = fakes["cupy"], True
        for n, fn in saved_np.items():
            setattr(numpy, n, _host_converter(n, fn))

        def lazy(module: str):
            m = saved_lazy(module)
            return None if m is None else _KernelModule(m)

        conv.lazy_kernels = lazy
        REC = rec
        yield rec
    finally:
        REC = None
        conv.lazy_kernels = saved_lazy
        for n, fn in saved_np.items():
            setattr(numpy, n, fn)
        backend._cupy, backend._cupy_probed = saved_backend
        for k, m in saved_mods.items():
            if m is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = m


def to_device(x: Any) -> Any:
    """A host array as a :class:`DeviceArray` (test-side; not recorded)."""
    return wrap(numpy.array(x))


def to_host(x: Any) -> Any:
    """Device arrays (also inside tuples/lists/dicts) → NumPy copies (test-side; not recorded)."""
    if isinstance(x, DeviceArray):
        return numpy.array(_np_view(x, _NP_ND))
    if isinstance(x, (tuple, list)):
        return type(x)(to_host(v) for v in x) if not hasattr(x, "_fields") else type(x)(*[to_host(v) for v in x])
    if isinstance(x, dict):
        return {k: to_host(v) for k, v in x.items()}
    return x


# ---------------------------------------------------------------------- workloads
def small_problem(key: str, device: bool, n: int = 300, seed: int = 1234):
    """``tools/gpu_check.reference_problem`` (MLP or BatchNorm CNN); arrays on the recording device
    when ``device`` (call inside :func:`recording_backend`)."""
    return gpu_check().reference_problem(key, "gpu" if device else "cpu", n, seed)


def gpu_check() -> types.ModuleType:
    """``tools/gpu_check.py``, the one definition of the reference problems and product sets."""
    tools = str(pathlib.Path(__file__).resolve().parents[1] / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    import gpu_check as gc  # noqa: PLC0415

    return gc


@dataclass
class OptimizerRun:
    """One optimizer's steps on the recording device: events, syncs per step, θ after each step."""

    name: str
    recorder: Recorder | None = None
    syncs_per_step: list[int] = field(default_factory=list)
    thetas: list[numpy.ndarray] = field(default_factory=list)
    cpu_thetas: list[numpy.ndarray] = field(default_factory=list)
    error: str | None = None
    cpu_error: str | None = None  # refused on NumPy too (not a device problem)


#: settings that make the NumPy run take the route the optimizer's default takes on the device
#: (Shampoo's root="auto" is the eigendecomposition on NumPy, the coupled Newton on CuPy)
CPU_AS_DEVICE: dict[str, dict] = {"shampoo": {"root": "newton"}}


def run_optimizer(name: str, n_steps: int = 5, model: str = "mlp", n: int = 300,
                  settings: dict | None = None) -> OptimizerRun:
    """``n_steps`` of ``make_optimizer(name, **settings)`` on :func:`small_problem` ``model``: on the recording
    device (syncs counted per step in phases ``step0``…) and on NumPy with the layers' array-API
    paths (``conv.KERNELS = "xp"``; θ to compare bit for bit). A refusal on
    NumPy (e.g. SMW on BatchNorm in training mode) is recorded as ``error`` on both sides."""
    from qnref.optim import make_optimizer  # noqa: PLC0415

    from qnref.nn import conv  # noqa: PLC0415

    out = OptimizerRun(name)
    saved, conv.KERNELS = conv.KERNELS, "xp"  # NumPy on the layers' array-API paths, as the device runs them
    try:
        theta, problem = small_problem(model, False, n)
        opt = make_optimizer(name, **(settings if settings is not None else CPU_AS_DEVICE.get(name, {})))
        state = opt.init(theta)
        for _ in range(n_steps):
            theta, state, _ = opt.step(theta, state, problem)
            out.cpu_thetas.append(numpy.array(theta))
    except (ValueError, TypeError) as e:
        out.error = out.cpu_error = f"{type(e).__name__}: {e}"
        return out
    finally:
        conv.KERNELS = saved
    rec = Recorder()
    try:
        with recording_backend(rec):
            theta, problem = small_problem(model, True, n)
            opt = make_optimizer(name, **(settings or {}))
            with rec.in_phase("init"):
                state = opt.init(theta)
            for i in range(n_steps):
                with rec.in_phase(f"step{i}"):
                    theta, state, info = opt.step(theta, state, problem)
                note_device_values(rec, info.as_dict(), f"{type(opt).__name__} StepInfo", type(opt))
                out.thetas.append(to_host(theta))
    except Exception as e:  # reported by the tests with the recorder's events so far
        out.error = f"{type(e).__name__}: {e}"
    out.recorder = rec
    out.syncs_per_step = [rec.syncs[f"step{i}"] for i in range(len(out.thetas))]
    return out


def note_device_values(rec: Recorder, values: dict, what: str, owner: type) -> None:
    """Flag device arrays among values that must be host scalars (step infos): on CuPy a 0-d array
    is no ``float`` (``json.dumps`` fails, every format is a hidden sync)."""
    import inspect  # noqa: PLC0415

    site = f"qnref{inspect.getsourcefile(owner)[len(QNREF_DIR):]}:{inspect.getsourcelines(owner)[1]}"
    for k, v in values.items():
        if isinstance(v, DeviceArray) or (isinstance(v, (list, tuple)) and any(isinstance(x, DeviceArray) for x in v)):
            rec.events[Event("violation", f"{what}.{k}", site, detail=f"{what} field {k!r} holds a device array, not a host scalar")] += 1


_RUNS: dict[tuple, OptimizerRun] = {}


def optimizer_runs(n_steps: int = 5, model: str = "mlp", n: int = 300) -> dict[str, OptimizerRun]:
    """:func:`run_optimizer` for every registered optimizer (cached for the test session)."""
    from qnref.optim import load_all  # noqa: PLC0415

    for name in sorted(load_all()):
        if (name, n_steps, model, n) not in _RUNS:
            _RUNS[(name, n_steps, model, n)] = run_optimizer(name, n_steps, model, n)
    return {name: _RUNS[(name, n_steps, model, n)] for name in sorted(load_all())}


# ---------------------------------------------------------------------- pytest plugin
_PLUGIN_CTX: Any = None


def pytest_configure(config: Any) -> None:
    """With ``pytest -p cupy_recording`` the whole session runs on the recording device, so the
    ``gpu`` tests run (and must pass) on a machine without a GPU: a dry run of their code."""
    global _PLUGIN_CTX
    _PLUGIN_CTX = recording_backend()
    _PLUGIN_CTX.__enter__()


def pytest_unconfigure(config: Any) -> None:
    global _PLUGIN_CTX
    if _PLUGIN_CTX is not None:
        _PLUGIN_CTX.__exit__(None, None, None)
        _PLUGIN_CTX = None
