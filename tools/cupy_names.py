"""Write the pinned list of CuPy's public names and signatures (``tests/cupy_api.json``).

The CPU-side conformance check (``tests/test_cupy_conformance.py``) compares every call that qnref
makes through its array namespace with this list, so CI needs neither CuPy (a 70 MB wheel) nor a GPU.
Regenerate it after a CuPy upgrade::

    pip install --target /tmp/cupyenv --no-deps cupy-cuda13x fastrlock "cuda-pathfinder>=1.3.4,<2"
    PYTHONPATH=/tmp/cupyenv python tools/cupy_names.py            # writes tests/cupy_api.json
    PYTHONPATH=/tmp/cupyenv python tools/cupy_names.py --check    # exit 1 when the file is stale

``import cupy`` works without a driver; some ``cupyx.scipy`` modules load CUDA libraries at import
(``libcublasLt``) and fail on such a machine: their names and signatures are read from the
installed sources with :mod:`ast` instead (no import), following the ``from … import`` lines of the
package ``__init__``.

Each entry is ``{"kind": k, "params": [[name, kind], …] | null}`` with ``k`` one of ``function``,
``ufunc``, ``class``, ``module``, ``attribute``; a parameter kind is one of ``pos`` (positional-only),
``any`` (positional or keyword), ``kw`` (keyword-only), ``*`` (``*args``) and ``**`` (``**kwargs``);
``params`` is null when the signature cannot be read (the check then tests the name only).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import pathlib
import re
import sys
import types
from typing import Any

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "cupy_api.json"

#: namespaces recorded: dotted path → how to reach it ("module" or "class")
NAMESPACES: tuple[str, ...] = (
    "cupy",
    "cupy.linalg",
    "cupy.random",
    "cupy.fft",
    "cupy.lib",
    "cupy.lib.stride_tricks",
    "cupy.ndarray",
    "cupy.random.Generator",
    "cupy.random.BitGenerator",
    "cupyx",
    "cupyx.scipy.linalg",
    "cupyx.scipy.sparse.linalg",
    "cupyx.scipy.special",
)

_KIND = {
    inspect.Parameter.POSITIONAL_ONLY: "pos",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "any",
    inspect.Parameter.KEYWORD_ONLY: "kw",
    inspect.Parameter.VAR_POSITIONAL: "*",
    inspect.Parameter.VAR_KEYWORD: "**",
}


def params_of_signature(sig: inspect.Signature, drop_self: bool) -> list[list[str]]:
    ps = list(sig.parameters.values())
    if drop_self and ps and ps[0].name == "self":
        ps = ps[1:]
    return [[p.name, _KIND[p.kind]] for p in ps]


def signature_from_doc(obj: Any) -> inspect.Signature | None:
    """Cython methods and CuPy ufuncs carry their signature on the first docstring line:
    ``add(x1, x2, /, out=None, \\*, casting='same_kind', dtype=None)``."""
    doc = getattr(obj, "__doc__", None) or ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    m = re.match(r"^[\w.]+\((.*)\)(\s*->.*)?$", first)
    if not m:
        return None
    args = m.group(1).replace("\\*", "*")
    try:
        tree = ast.parse(f"def f({args}): pass")
    except SyntaxError:
        return None
    return signature_from_ast(tree.body[0].args)  # type: ignore[attr-defined]


def signature_from_ast(a: ast.arguments) -> inspect.Signature:
    P = inspect.Parameter
    out = [P(x.arg, P.POSITIONAL_ONLY) for x in a.posonlyargs]
    out += [P(x.arg, P.POSITIONAL_OR_KEYWORD) for x in a.args]
    if a.vararg:
        out.append(P(a.vararg.arg, P.VAR_POSITIONAL))
    out += [P(x.arg, P.KEYWORD_ONLY) for x in a.kwonlyargs]
    if a.kwarg:
        out.append(P(a.kwarg.arg, P.VAR_KEYWORD))
    return inspect.Signature(out, __validate_parameters__=False)


def describe(obj: Any, in_class: bool) -> dict:
    """One entry of the list for a live object."""
    if isinstance(obj, types.ModuleType):
        return {"kind": "module", "params": None}
    if type(obj).__name__ == "ufunc" and type(obj).__module__.startswith("cupy"):
        sig = signature_from_doc(obj)
        return {"kind": "ufunc", "params": None if sig is None else params_of_signature(sig, False),
                "methods": sorted(n for n in dir(obj) if not n.startswith("_"))}
    if inspect.isclass(obj):
        return {"kind": "class", "params": None}
    if callable(obj):
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            sig = signature_from_doc(obj)
        return {"kind": "function", "params": None if sig is None else params_of_signature(sig, in_class)}
    return {"kind": "attribute", "params": None}


def live_namespace(path: str) -> dict[str, dict]:
    head, _, tail = path.rpartition(".")
    try:
        obj: Any = importlib.import_module(path)
    except ImportError:
        obj = getattr(importlib.import_module(head), tail)
    in_class = inspect.isclass(obj)
    entries = {}
    for name in sorted(dir(obj)):
        if name.startswith("_"):
            continue
        try:
            member = inspect.getattr_static(obj, name) if in_class else getattr(obj, name)
        except AttributeError:
            continue
        if in_class and type(member).__name__ in ("getset_descriptor", "property", "member_descriptor"):
            entries[name] = {"kind": "attribute", "params": None}
            continue
        if in_class and isinstance(member, (staticmethod, classmethod)):
            member = getattr(obj, name)
        entries[name] = describe(member, in_class)
    return entries


def _module_file(modname: str) -> pathlib.Path:
    spec = importlib.util.find_spec(modname)  # does not execute the module
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot locate {modname}")
    return pathlib.Path(spec.origin)


def static_namespace(path: str) -> dict[str, dict]:
    """Public names of a package that cannot be imported here: its ``__init__`` imports, each
    resolved to the ``def``/``class`` of the submodule's source (signatures from the AST)."""
    init = ast.parse(_module_file(path).read_text())
    entries: dict[str, dict] = {}
    for node in init.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            src = None
            try:
                src = ast.parse(_module_file(node.module).read_text())
            except (ImportError, OSError, SyntaxError):
                pass
            defs = {d.name: d for d in (src.body if src else []) if isinstance(d, (ast.FunctionDef, ast.ClassDef))}
            for alias in node.names:
                name = alias.asname or alias.name
                if name.startswith("_"):
                    continue
                d = defs.get(alias.name)
                if isinstance(d, ast.FunctionDef):
                    entries[name] = {"kind": "function", "params": params_of_signature(signature_from_ast(d.args), False)}
                elif isinstance(d, ast.ClassDef):
                    entries[name] = {"kind": "class", "params": None}
                else:
                    entries[name] = {"kind": "function", "params": None}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            entries[node.name] = describe_ast(node)
    return dict(sorted(entries.items()))


def describe_ast(d: ast.AST) -> dict:
    if isinstance(d, ast.FunctionDef):
        return {"kind": "function", "params": params_of_signature(signature_from_ast(d.args), False)}
    return {"kind": "class", "params": None}


def collect() -> dict:
    import cupy  # noqa: PLC0415 - the tool's one requirement

    out: dict[str, Any] = {"cupy_version": cupy.__version__, "generated_by": "tools/cupy_names.py", "namespaces": {}}
    for path in NAMESPACES:
        try:
            ns = live_namespace(path)
            how = "import"
        except Exception:  # CUDA libraries missing: read the sources
            ns = static_namespace(path)
            how = "ast"
        out["namespaces"][path] = {"source": how, "names": ns}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=OUT, help="where to write the list (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="compare with the existing file instead of writing it")
    args = ap.parse_args(argv)
    text = json.dumps(collect(), indent=1, sort_keys=True) + "\n"
    if args.check:
        same = args.out.exists() and args.out.read_text() == text
        print(f"{args.out}: {'up to date' if same else 'STALE (regenerate it)'}")
        return 0 if same else 1
    args.out.write_text(text)
    data = json.loads(text)
    total = sum(len(v["names"]) for v in data["namespaces"].values())
    print(f"wrote {args.out} (CuPy {data['cupy_version']}, {total} names)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
