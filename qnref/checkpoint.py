"""Checkpoint files that cannot run code and refuse to lie: a ``.npz`` archive of plain arrays,
read with ``allow_pickle=False``, plus a JSON manifest with a SHA-256 of every array.

File layout (one ZIP archive, entries stored uncompressed, readable by ``numpy.load``):

``__manifest__.npy``
    uint8 bytes of a UTF-8 JSON object: ``format`` ("qnref-checkpoint"), ``format_version``
    (:data:`FORMAT_VERSION`), ``qnref_version``, ``fingerprints`` (model / optimizer / data / run:
    what a resumed run must match), ``arrays`` (name → shape, dtype, sha256 of the C-order bytes)
    and ``tree`` (the payload: nested dicts, lists, tuples, dataclasses, scalars, with arrays
    referenced by name; floats stored as ``float.hex`` so every bit survives).
``__manifest_sha256__.npy``
    uint8 bytes of the hex SHA-256 of the manifest bytes (a flipped byte anywhere in the
    manifest is caught even where JSON would still parse).
``<name>.npy``
    one entry per array of the manifest; only numeric and bool dtypes are written or read.
archive comment
    the hex SHA-256 of every byte of the file before it (the last 64 bytes): a flip anywhere —
    local headers, data, the central directory — or a truncation is refused before the ZIP is parsed.

Dataclasses (optimizer states) are encoded field by field and rebuilt from the class the
*caller* names — the optimizer's ``State`` class, and for nested dataclasses the classes its field
annotations name — never from a class name read from the file. A nested dataclass in a place whose
annotation names no class (say a ``PairStore`` inside a field annotated ``dict``) is read back as the
dict of its fields, for the owning State's ``__post_init__`` to coerce;
``tests/test_checkpoint.py`` checks, for every registered optimizer, that its state survives the
round trip with identical types and bits. Missing required fields, unknown
fields, wrong shapes, dtypes or hashes, truncation and stray archive entries are all refused with
one :class:`CheckpointError` line naming the file and the problem.

Writes are atomic: a temporary file ``.<name>.tmp-<pid>-<random>`` in the target folder, fsync,
``os.replace``, fsync of the folder. Temporaries left by killed writers (dead pid) are removed on
the next write. The file mode follows the umask (created with 0o666 & ~umask).

Format 1 (qnref ≤ 0.1: a pickle) is refused, because unpickling can execute code;
:func:`convert_pickle` (``qnref convert-checkpoint --trust OLD NEW``) converts one explicitly and
*does run the pickle*: use it only on files you wrote yourself.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import types
import typing
import zipfile
from typing import Any, Mapping

import numpy

from . import backend

__all__ = ["CheckpointError", "FORMAT", "FORMAT_VERSION", "save", "load", "encode", "decode", "convert_pickle",
           "compare_fingerprints", "array_sha256", "stale_temporaries"]

FORMAT = "qnref-checkpoint"
FORMAT_VERSION = 2
MANIFEST = "__manifest__"
MANIFEST_SHA = "__manifest_sha256__"
#: largest manifest read (bytes); histories of long runs are a few MB at most
MAX_MANIFEST_BYTES = 256 * 2**20
#: array dtype kinds a checkpoint may hold: bool, signed/unsigned integers, floats, complex
_KINDS = "biufc"
_TMP_TAG = ".tmp-"
_DIGEST_LEN = 64


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read or trusted; the message is one line naming the file."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self.what = os.fspath(path), what
        super().__init__(_one_line(f"checkpoint {self.path}: {what}"))


def _one_line(text: str) -> str:
    return " ".join(str(text).split("\n"))


# -- the tree: nested Python values with arrays at the leaves ----------------------------------------
def array_sha256(a: numpy.ndarray) -> str:
    """SHA-256 of an array's C-order bytes (what the manifest records)."""
    return hashlib.sha256(numpy.ascontiguousarray(a).view(numpy.uint8).reshape(-1).data).hexdigest()


def _is_array(v: Any) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, (numpy.generic, type))


def _dataclass_of(hint: Any) -> type | None:
    """The one dataclass type a field annotation names (``X``, ``X | None``, ``Optional[X]``)."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    found = [a for a in args if isinstance(a, type) and dataclasses.is_dataclass(a)]
    return found[0] if len(found) == 1 else None


def _item_hint(hint: Any, kind: str, index: int = 0) -> Any:
    """The annotation of the items of a list/tuple/dict annotation (``Any`` when not given)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if typing.get_origin(a) in (list, tuple, dict):
                return _item_hint(a, kind, index)
        return Any
    if kind == "dict" and origin is dict and len(args) == 2:
        return args[1]
    if kind == "list" and origin is list and args:
        return args[0]
    if kind == "tuple" and origin is tuple and args:
        return args[0] if len(args) == 2 and args[1] is Ellipsis else (args[index] if index < len(args) else Any)
    return Any


def _field_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation is treated as Any
        return {}


class _OldState(dict):
    """The fields of a format-1 (pickled) state, written as a dataclass node."""


class _Writer:
    """Collects the arrays of a tree while encoding it."""

    def __init__(self) -> None:
        self.arrays: dict[str, numpy.ndarray] = {}

    def add(self, path: str, a: Any) -> str:
        host = numpy.asarray(backend.to_numpy(a))
        if not host.flags.c_contiguous:  # (ascontiguousarray would turn 0-d arrays into 1-d ones)
            host = host.copy(order="C")
        if host.dtype.kind not in _KINDS:
            raise TypeError(f"{path}: arrays of dtype {host.dtype} cannot be checkpointed (numeric and bool only)")
        base = "".join(c if c.isalnum() or c in "._-" else "_" for c in path) or "array"
        name, i = base, 1
        while name in self.arrays or name in (MANIFEST, MANIFEST_SHA):
            name, i = f"{base}~{i}", i + 1
        self.arrays[name] = host.astype(host.dtype.newbyteorder("="), copy=False)
        return name

    def encode(self, v: Any, hint: Any = Any, path: str = "") -> dict:
        if v is None:
            return {"k": "none"}
        if isinstance(v, (bool, numpy.bool_)) and not _is_array(v):
            return {"k": "bool", "v": bool(v)} if isinstance(v, bool) else {"k": "scalar", "ref": self.add(path, numpy.asarray(v))}
        if isinstance(v, numpy.generic):
            return {"k": "scalar", "ref": self.add(path, numpy.asarray(v))}
        if isinstance(v, int):
            return {"k": "int", "v": int(v)}
        if isinstance(v, float):
            return {"k": "float", "v": float(v).hex()}
        if isinstance(v, str):
            return {"k": "str", "v": v}
        if _is_array(v):
            return {"k": "array", "ref": self.add(path, v), "host": type(v).__module__.startswith("numpy")}
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            declared = _dataclass_of(hint)
            if declared is not None and declared is not type(v):
                raise TypeError(f"{path or 'state'}: holds a {type(v).__qualname__} but its annotation names "
                                f"{declared.__qualname__}")
            hints = _field_hints(type(v))
            fields = {f.name: self.encode(getattr(v, f.name), hints.get(f.name, Any), f"{path}.{f.name}")
                      for f in dataclasses.fields(v)}
            # declared: rebuilt as the annotation's class; undeclared (e.g. inside a bare ``dict``
            # field): read back as a dict of its fields, for the owning State to coerce
            return {"k": "dataclass" if declared is not None else "fields", "v": fields}
        if isinstance(v, _OldState):  # format-1 conversion: the reader rebuilds it as the run's State
            return {"k": "dataclass", "v": {k: self.encode(x, Any, f"{path}.{k}") for k, x in v.items()}}
        if isinstance(v, dict):
            items = []
            for key, x in v.items():
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    raise TypeError(f"{path}: dict keys must be str or int to be checkpointed, got {type(key).__name__}")
                items.append([self.encode(key), self.encode(x, _item_hint(hint, "dict"), f"{path}.{key}")])
            return {"k": "dict", "v": items}
        if isinstance(v, (list, tuple)):
            kind = "list" if isinstance(v, list) else "tuple"
            return {"k": kind, "v": [self.encode(x, _item_hint(hint, kind, i), f"{path}.{i}") for i, x in enumerate(v)]}
        raise TypeError(f"{path or 'value'}: a {type(v).__qualname__} cannot be checkpointed "
                        "(allowed: None, bool, int, float, str, arrays, lists, tuples, dicts, dataclasses)")


def encode(tree: Any, hint: Any = Any) -> tuple[dict, dict[str, numpy.ndarray]]:
    """The JSON node of ``tree`` and its arrays by name (``hint``: the annotation of ``tree``, e.g.
    an optimizer's ``State`` class)."""
    w = _Writer()
    node = w.encode(tree, hint, "")
    return node, w.arrays


class _Reader:
    def __init__(self, path: str, arrays: Mapping[str, numpy.ndarray], device: backend.Device):
        self.path, self.arrays, self.device, self.used = path, arrays, device, set()

    def bad(self, where: str, what: str) -> CheckpointError:
        return CheckpointError(self.path, f"{where or 'tree'}: {what}")

    def ref(self, node: dict, where: str) -> numpy.ndarray:
        name = node.get("ref")
        if not isinstance(name, str) or name not in self.arrays:
            raise self.bad(where, f"refers to array {name!r}, which the file does not hold")
        self.used.add(name)
        return self.arrays[name]

    def decode(self, node: Any, hint: Any, where: str) -> Any:
        if not isinstance(node, dict) or not isinstance(node.get("k"), str):
            raise self.bad(where, "malformed manifest entry")
        k, v = node["k"], node.get("v")
        if k == "none":
            return None
        if k == "bool" and isinstance(v, bool):
            return v
        if k == "int" and isinstance(v, int) and not isinstance(v, bool):
            return v
        if k == "float" and isinstance(v, str):
            try:
                return float.fromhex(v)
            except (ValueError, OverflowError):
                raise self.bad(where, f"bad float {v!r}") from None
        if k == "str" and isinstance(v, str):
            return v
        if k == "scalar":
            a = self.ref(node, where)
            if a.ndim != 0:
                raise self.bad(where, f"scalar stored with shape {a.shape}")
            return a[()]
        if k == "array":
            a = self.ref(node, where)
            host = node.get("host")
            if not isinstance(host, bool):
                raise self.bad(where, f"array entry has a malformed 'host' flag {host!r}")
            return a if host else backend.to_device(a, self.device)
        if k in ("list", "tuple") and isinstance(v, list):
            out = [self.decode(x, _item_hint(hint, k, i), f"{where}.{i}") for i, x in enumerate(v)]
            return out if k == "list" else tuple(out)
        if k == "dict" and isinstance(v, list):
            out = {}
            for item in v:
                if not (isinstance(item, list) and len(item) == 2):
                    raise self.bad(where, "malformed dict entry")
                key = self.decode(item[0], Any, where)
                if not isinstance(key, (str, int)) or isinstance(key, bool) or key in out:
                    raise self.bad(where, f"bad or repeated key {key!r}")
                out[key] = self.decode(item[1], _item_hint(hint, "dict"), f"{where}.{key}")
            return out
        if k == "dataclass" and isinstance(v, dict):
            return self.dataclass(v, hint, where)
        if k == "fields" and isinstance(v, dict):
            return {name: self.decode(x, Any, f"{where}.{name}") for name, x in v.items()}
        raise self.bad(where, f"malformed manifest entry of kind {k!r}")

    def dataclass(self, fields_: dict, hint: Any, where: str) -> Any:
        cls = _dataclass_of(hint)
        if cls is None:
            raise self.bad(where, "holds a dataclass where the run expects none (its class is never read from the file)")
        hints = _field_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields_) - set(fields))
        if unknown:
            raise self.bad(where, f"{cls.__qualname__} has no field(s) {', '.join(unknown)}")
        init, later = {}, {}
        for name, f in fields.items():
            if name not in fields_:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise self.bad(where, f"lacks the required field {name!r} of {cls.__qualname__}")
                continue  # a field added later with a default: older checkpoints stay loadable
            value = self.decode(fields_[name], hints.get(name, Any), f"{where}.{name}")
            (init if f.init else later)[name] = value
        try:
            obj = cls(**init)
        except Exception as exc:  # noqa: BLE001 - a __post_init__ refusing the stored values
            raise self.bad(where, f"{cls.__qualname__} refused the stored fields ({type(exc).__name__}: {exc})") from None
        for name, value in later.items():
            object.__setattr__(obj, name, value)
        return obj


def decode(node: dict, arrays: Mapping[str, numpy.ndarray], hint: Any = Any, *, path: str = "<memory>",
           device: backend.Device = "cpu") -> Any:
    """Inverse of :func:`encode`; dataclasses are rebuilt only as the classes ``hint`` names."""
    return _Reader(path, arrays, device).decode(node, hint, "")


# -- writing --------------------------------------------------------------------------------------
def stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Temporaries of earlier writes to ``path`` whose writer process is gone."""
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    prefix = f".{base}{_TMP_TAG}"
    out = []
    try:
        names = os.listdir(folder)
    except OSError:
        return out
    for n in names:
        if not n.startswith(prefix):
            continue
        pid = n[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        out.append(os.path.join(folder, n))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _write_npy(zf: zipfile.ZipFile, name: str, a: numpy.ndarray) -> None:
    with zf.open(name + ".npy", "w", force_zip64=True) as fh:
        numpy.lib.format.write_array(fh, a, allow_pickle=False)


def save(path: str | os.PathLike, payload: dict, fingerprints: dict, hints: Mapping[str, Any] | None = None) -> None:
    """Write ``payload`` (a dict of trees; ``hints`` gives the annotation of some entries, e.g.
    ``{"state": State}``) with ``fingerprints`` atomically to ``path``."""
    from . import __version__  # noqa: PLC0415 - avoid a cycle at import time

    path = os.fspath(path)
    hints = dict(hints or {})
    w = _Writer()
    try:
        items = [[w.encode(k), w.encode(v, hints.get(k, Any), str(k))] for k, v in payload.items()]
        json.dumps(fingerprints, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, f"cannot be written: {exc}") from None
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "qnref_version": __version__,
        "fingerprints": fingerprints,
        "arrays": {n: {"shape": list(a.shape), "dtype": a.dtype.str, "sha256": array_sha256(a)} for n, a in w.arrays.items()},
        "tree": {"k": "dict", "v": items},
    }
    raw = json.dumps(manifest, allow_nan=False, sort_keys=True).encode()
    atomic_write(path, lambda fh: write_archive(fh, raw, w.arrays))


def write_archive(fh: Any, manifest: bytes, arrays: Mapping[str, numpy.ndarray]) -> None:
    """The archive of the module docstring into the seekable binary file ``fh``: the manifest
    bytes, their SHA-256, the arrays, and the whole-file SHA-256 as the archive comment."""
    digest = hashlib.sha256(manifest).hexdigest().encode()
    with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.comment = b"0" * _DIGEST_LEN
        _write_npy(zf, MANIFEST, numpy.frombuffer(manifest, dtype=numpy.uint8))
        _write_npy(zf, MANIFEST_SHA, numpy.frombuffer(digest, dtype=numpy.uint8))
        for n, a in arrays.items():
            _write_npy(zf, n, a)
    fh.flush()
    size = fh.tell()
    fh.seek(0)
    whole = _sha256_of(fh, size - _DIGEST_LEN)
    fh.seek(size - _DIGEST_LEN)
    fh.write(whole.encode())


def _sha256_of(fh: Any, nbytes: int) -> str:
    h = hashlib.sha256()
    left = nbytes
    while left > 0:
        chunk = fh.read(min(left, 1 << 22))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def _check_whole_file(path: str) -> None:
    """The archive comment (last 64 bytes) must be the SHA-256 of everything before it."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size < _DIGEST_LEN + 22:
                raise CheckpointError(path, f"is truncated ({size} bytes)")
            fh.seek(size - _DIGEST_LEN)
            stored = fh.read(_DIGEST_LEN)
            fh.seek(0)
            actual = _sha256_of(fh, size - _DIGEST_LEN)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from None
    if stored != actual.encode():
        raise CheckpointError(path, "fails its whole-file SHA-256 (truncated, or modified after it was written)")


def atomic_write(path: str, write: Any) -> None:
    """``write(fh)`` into a temporary beside ``path``, fsync, rename over ``path``; the user's path
    (not the temporary's) names any failure."""
    folder, base = os.path.split(os.path.abspath(path))
    for stale in stale_temporaries(path):
        try:
            os.unlink(stale)
        except OSError:
            pass
    tmp = os.path.join(folder, f".{base}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # mode follows the umask
    except OSError as exc:
        raise CheckpointError(path, f"cannot be written ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "w+b") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if os.path.isdir(path):
            raise CheckpointError(path, "is a directory; give a file name")
        os.replace(tmp, path)
        _fsync_dir(folder)
    except OSError as exc:
        _unlink(tmp)
        raise CheckpointError(path, f"cannot be written ({exc.strerror or exc})") from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading --------------------------------------------------------------------------------------
def _kind_of_file(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except IsADirectoryError:
        raise CheckpointError(path, "is a directory, not a checkpoint file") from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from None
    if not head:
        raise CheckpointError(path, "is empty (truncated?)")
    if head.startswith(b"PK"):
        return "zip"
    if head[:1] == b"\x80":
        raise CheckpointError(path, "is an old pickle checkpoint (format 1), refused because loading a pickle can run "
                                    "code; if you wrote it yourself, convert it once with "
                                    "`qnref convert-checkpoint --trust OLD NEW`")
    raise CheckpointError(path, "is not a qnref checkpoint (not a .npz archive)")


def _header(fh: Any) -> tuple[tuple, bool, numpy.dtype]:
    version = numpy.lib.format.read_magic(fh)
    if version == (1, 0):
        return numpy.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return numpy.lib.format.read_array_header_2_0(fh)
    raise ValueError(f"unsupported .npy version {version}")


def _member_array(npz: Any, path: str, name: str, shape: tuple, dtype: numpy.dtype) -> numpy.ndarray:
    """One entry, its .npy header checked against the manifest before the data are read."""
    info = npz.zip.getinfo(name + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(path, f"array {name!r} is compressed (checkpoints store arrays uncompressed)")
    with npz.zip.open(info) as fh:
        hshape, fortran, hdtype = _header(fh)
        header_len = fh.tell()
    nbytes = int(numpy.prod(shape, dtype=numpy.int64)) * dtype.itemsize
    if tuple(hshape) != shape or hdtype != dtype or fortran or info.file_size != header_len + nbytes:
        raise CheckpointError(path, f"array {name!r} does not match the manifest (header {hdtype} {tuple(hshape)}, "
                                    f"{info.file_size} bytes; manifest {dtype} {shape})")
    return npz[name]


def _bad_zip(path: str, exc: BaseException) -> CheckpointError:
    return CheckpointError(path, f"is corrupt or truncated ({type(exc).__name__}: {exc})")


def load(path: str | os.PathLike, hints: Mapping[str, Any] | None = None, *, device: backend.Device = "cpu"
         ) -> tuple[dict, dict]:
    """Read and verify a checkpoint: ``(payload, manifest)``. Raises :class:`CheckpointError` (one
    line) for anything but an intact file of this format."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise CheckpointError(path, "does not exist")
    _kind_of_file(path)
    _check_whole_file(path)
    try:
        npz = numpy.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any failure to parse untrusted bytes means a bad file
        raise _bad_zip(path, exc) from None
    try:
        with npz:
            return _load_open(path, npz, dict(hints or {}), device)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - CRC errors, short reads, bad headers, …
        raise _bad_zip(path, exc) from None


def _load_open(path: str, npz: Any, hints: dict, device: backend.Device) -> tuple[dict, dict]:
    names = npz.zip.namelist()
    if len(set(names)) != len(names):
        raise CheckpointError(path, "has repeated archive entries")
    if not all(n.endswith(".npy") for n in names):
        raise CheckpointError(path, "holds entries that are not .npy arrays")
    for required in (MANIFEST, MANIFEST_SHA):
        if required + ".npy" not in names:
            raise CheckpointError(path, f"lacks its {required} entry (not a qnref checkpoint, or truncated)")
    info = npz.zip.getinfo(MANIFEST + ".npy")
    if info.file_size > MAX_MANIFEST_BYTES:
        raise CheckpointError(path, f"manifest of {info.file_size} bytes exceeds {MAX_MANIFEST_BYTES}")
    raw_m = _small_bytes(path, npz, MANIFEST)
    digest = _small_bytes(path, npz, MANIFEST_SHA)
    if hashlib.sha256(raw_m).hexdigest().encode() != digest:
        raise CheckpointError(path, "manifest does not match its SHA-256 (the file was modified or corrupted)")
    try:
        manifest = json.loads(raw_m.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(path, f"manifest is not valid JSON ({exc})") from None
    _check_manifest(path, manifest)
    arrays: dict[str, numpy.ndarray] = {}
    expected = set(manifest["arrays"]) | {MANIFEST, MANIFEST_SHA}
    extra = sorted(n[:-4] for n in names if n[:-4] not in expected)
    if extra:
        raise CheckpointError(path, f"holds arrays the manifest does not list: {', '.join(extra[:5])}")
    for name, meta in manifest["arrays"].items():
        if name + ".npy" not in names:
            raise CheckpointError(path, f"lacks array {name!r} listed in its manifest")
        shape, dtype = tuple(meta["shape"]), numpy.dtype(meta["dtype"])
        a = _member_array(npz, path, name, shape, dtype)
        if array_sha256(a) != meta["sha256"]:
            raise CheckpointError(path, f"array {name!r} does not match its SHA-256 (the file was modified or corrupted)")
        arrays[name] = a
    reader = _Reader(path, arrays, device)
    tree = manifest["tree"]
    if not (isinstance(tree, dict) and tree.get("k") == "dict" and isinstance(tree.get("v"), list)):
        raise CheckpointError(path, "manifest tree is not a dict")
    payload = {}
    for item in tree["v"]:
        if not (isinstance(item, list) and len(item) == 2):
            raise CheckpointError(path, "malformed payload entry")
        key = reader.decode(item[0], Any, "")
        if not isinstance(key, str) or key in payload:
            raise CheckpointError(path, f"bad or repeated payload key {key!r}")
        payload[key] = reader.decode(item[1], hints.get(key, Any), key)
    unused = sorted(set(arrays) - reader.used)
    if unused:
        raise CheckpointError(path, f"arrays {', '.join(unused[:5])} are listed but unused")
    return payload, manifest


def _small_bytes(path: str, npz: Any, name: str) -> bytes:
    info = npz.zip.getinfo(name + ".npy")
    with npz.zip.open(info) as fh:
        shape, fortran, dtype = _header(fh)
    if dtype != numpy.uint8 or len(shape) != 1 or fortran:
        raise CheckpointError(path, f"entry {name!r} is not a byte string")
    return bytes(_member_array(npz, path, name, tuple(shape), numpy.dtype(numpy.uint8)))


def _check_manifest(path: str, m: Any) -> None:
    if not isinstance(m, dict):
        raise CheckpointError(path, "manifest is not a JSON object")
    if m.get("format") != FORMAT:
        raise CheckpointError(path, f"is not a qnref checkpoint (format {m.get('format')!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(path, f"has format version {m.get('format_version')!r}; this qnref reads {FORMAT_VERSION}")
    for key, kind in (("qnref_version", str), ("fingerprints", dict), ("arrays", dict), ("tree", dict)):
        if not isinstance(m.get(key), kind):
            raise CheckpointError(path, f"manifest lacks {key!r} (or it is not a {kind.__name__})")
    for name, meta in m["arrays"].items():
        ok = (isinstance(meta, dict) and isinstance(meta.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in meta["shape"])
              and isinstance(meta.get("dtype"), str) and isinstance(meta.get("sha256"), str))
        if not ok:
            raise CheckpointError(path, f"manifest entry of array {name!r} is malformed")
        try:
            dt = numpy.dtype(meta["dtype"])
        except TypeError:
            raise CheckpointError(path, f"array {name!r} has an unknown dtype {meta['dtype']!r}") from None
        if dt.kind not in _KINDS or dt.hasobject or not (dt.isnative or dt.byteorder == "|"):
            raise CheckpointError(path, f"array {name!r} has dtype {dt}, which checkpoints never hold")


def compare_fingerprints(path: str, stored: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Refuse a checkpoint written for another run: every group (model, optimizer, data, run) and
    entry must agree. ``None`` stored for an entry means 'unknown' (converted format-1 files)."""
    diffs = []
    for group in sorted(set(stored) | set(expected)):
        a, b = stored.get(group), expected.get(group)
        if not isinstance(a, dict) or not isinstance(b, dict):
            if a != b:
                diffs.append(f"{group}: {a!r} in the file, {b!r} in this run")
            continue
        for k in sorted(set(a) | set(b)):
            if a.get(k) is None and k in a:
                continue
            if a.get(k) != b.get(k):
                diffs.append(f"{group}.{k}: {_short(a.get(k))} in the file, {_short(b.get(k))} in this run")
    if diffs:
        raise CheckpointError(path, "was written for another configuration: " + "; ".join(diffs))


def _short(v: Any) -> str:
    t = repr(v)
    return t if len(t) <= 120 else t[:117] + "..."


# -- format 1 (pickle) -----------------------------------------------------------------------------
def convert_pickle(old: str | os.PathLike, new: str | os.PathLike, *, trust: bool = False) -> dict:
    """Convert a format-1 (pickle) checkpoint to this format. **Runs the pickle** (which can execute
    arbitrary code); refuses unless ``trust=True``. Returns the new manifest's fingerprints."""
    import pickle  # noqa: PLC0415 - only for explicit, trusted conversions

    old, new = os.fspath(old), os.fspath(new)
    if not trust:
        raise CheckpointError(old, "converting a pickle checkpoint runs the pickle; pass --trust (trust=True) "
                                   "only for a file you wrote yourself")
    if os.path.abspath(old) == os.path.abspath(new):
        raise CheckpointError(new, "must differ from the old checkpoint's path")
    try:
        with open(old, "rb") as fh:
            data = pickle.load(fh)  # noqa: S301 - explicitly trusted by the caller
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(old, f"is not a readable pickle checkpoint ({type(exc).__name__}: {exc})") from None
    required = ("fingerprint", "theta", "state", "problem", "history", "step", "time", "next_eval", "next_ckpt")
    if not isinstance(data, dict) or data.get("qnref_checkpoint") != 1 or any(k not in data for k in required):
        raise CheckpointError(old, "is not a format-1 qnref checkpoint")
    fp = data["fingerprint"]
    fingerprints = {
        "model": {"name": fp.get("model"), "n_params": fp.get("n_params")},
        "optimizer": {"class": fp.get("optimizer"), "hyperparameters": fp.get("hyperparameters")},
        "data": {"name": fp.get("data"), "n_train": fp.get("n_train"), "dtype": fp.get("dtype"), "sha256": None},
        "run": {"l2": fp.get("l2"), "seed": fp.get("seed")},
    }
    state = _OldState({k: v for k, v in data["state"].items() if k != "__class__"})
    payload = {k: data[k] for k in required if k != "fingerprint"}
    payload["state"] = state
    save(new, payload, fingerprints)
    return fingerprints


