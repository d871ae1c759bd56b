"""Any ``nn.Module`` whose ``forward`` composes supported layers → a qnref layer list, by ``torch.fx``.

:func:`qnref_torch.convert.convert` uses this for modules that are not an ``nn.Sequential`` of
supported layers. The module is traced symbolically (``torch.fx.Tracer`` with stack traces; the
supported torch layers and :class:`~qnref_torch.convert.PadShortcut` stay leaves) and the graph,
from its one input to its one output, is read as a chain of

* ``call_module`` nodes of the layers of :mod:`qnref_torch.convert`'s table (same options checked);
* functions and methods: ``F.relu``/``torch.relu``/``.relu()``, ``torch.tanh``/``F.tanh``/``.tanh()``,
  ``torch.sigmoid``/``F.sigmoid``/``.sigmoid()``, ``F.softplus`` (beta 1), ``torch.flatten(x, 1)``/
  ``.flatten(1)``/``.view(n, -1)``/``.reshape(n, -1)`` (→ ``Flatten``), ``F.max_pool2d``,
  ``F.avg_pool2d``, ``F.adaptive_avg_pool2d(x, 1)`` + flatten (→ ``GlobalAvgPool``);
* residual additions ``a + b`` (``operator.add``, ``torch.add``): the two branches back to their
  fork become ``Residual(body, shortcut)`` (an empty shortcut is the identity), the activation
  after it stays a layer of its own.

Parameters keep their torch names (``block.conv1.weight``), so
:func:`~qnref_torch.convert.theta_to_torch_params` and ``functional_call`` work as for a
Sequential. A module called twice (shared weights) or any other op raises
:class:`~qnref_torch.convert.UnsupportedLayerError` naming the op and its source line.
"""
from __future__ import annotations

import operator
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from qnref.nn import activations as qact
from qnref.nn.reshape import Flatten

__all__ = ["fx_layers"]

_ACT_FUNCS = {F.relu: qact.ReLU, torch.relu: qact.ReLU, torch.tanh: qact.Tanh, F.tanh: qact.Tanh,
              torch.sigmoid: qact.Sigmoid, F.sigmoid: qact.Sigmoid}
_ACT_METHODS = {"relu": qact.ReLU, "tanh": qact.Tanh, "sigmoid": qact.Sigmoid}
_ADD = (operator.add, torch.add, operator.iadd)


def _unsupported_error():
    from .convert import UnsupportedLayerError  # noqa: PLC0415

    return UnsupportedLayerError


class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple):
        super().__init__()
        self.record_stack_traces = True
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)


def _where(node: fx.Node) -> str:
    st = getattr(node, "stack_trace", None) or ""
    lines = [ln.strip() for ln in st.strip().splitlines()]
    tdir = os.path.dirname(torch.__file__)
    files = [i for i, ln in enumerate(lines) if ln.startswith("File ") and tdir not in ln]
    if files:
        i = files[-1]
        code = lines[i + 1] if i + 1 < len(lines) else ""
        return f"{lines[i]}: {code}"
    return "source line unknown"


def _describe(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    name = getattr(t, "__name__", None) or str(t)
    mod = getattr(t, "__module__", None) or ""
    mod = "torch" if mod.startswith("torch._") or not mod else mod
    return f"{mod}.{name}"


def _int_arg(node: fx.Node, pos: int, key: str, default: Any) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(key, default)


def fx_layers(module: nn.Module, plan: list, classes: dict) -> list:
    """qnref layers of ``module`` traced by torch.fx; appends (layer, path, torch module | None, entries) to ``plan``."""
    from .convert import PadShortcut, _convert_list, _pair  # noqa: PLC0415

    Err = _unsupported_error()
    leaves = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, PadShortcut)
    try:
        graph = _Tracer(leaves).trace(module)
    except Exception as exc:  # noqa: BLE001 - symbolic tracing refuses data-dependent Python control flow
        raise Err(f"cannot trace {type(module).__name__} with torch.fx ({type(exc).__name__}: {exc}); qnref converts "
                  "modules whose forward is a fixed composition of supported layers") from None
    gm = fx.GraphModule(module, graph)
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    outputs = [n for n in nodes if n.op == "output"]
    if len(inputs) != 1 or len(outputs) != 1 or not isinstance(outputs[0].args[0], fx.Node):
        raise Err(f"{type(module).__name__}.forward must take one tensor and return one tensor")
    x, out = inputs[0], outputs[0].args[0]
    used_modules: set[str] = set()

    def parent(n: fx.Node) -> fx.Node:
        ins = [a for a in n.args if isinstance(a, fx.Node) and a.op != "get_attr"]
        if n.op == "call_method" and n.target in ("view", "reshape"):
            ins = ins[:1]
        if len(ins) != 1:
            raise Err(f"unsupported op {_describe(n)} at {_where(n)}: expected one tensor input")
        return ins[0]

    def chain_to(n: fx.Node) -> list[fx.Node]:
        path = [n]
        while path[-1] is not x:
            p = path[-1]
            if p.op == "call_function" and p.target in _ADD:
                path.append(fork_of(p))
            else:
                path.append(parent(p))
        return path

    def fork_of(add: fx.Node) -> fx.Node:
        a, b = add.args[0], add.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or len(add.args) > 2 or add.kwargs:
            raise Err(f"unsupported op {_describe(add)} at {_where(add)}: only a + b of two tensors is a residual")
        pa = chain_to(a)
        ids = {id(q) for q in pa}
        for q in chain_to(b):
            if id(q) in ids:
                return q
        raise Err(f"residual addition at {_where(add)} has branches with no common input")

    def layer_of(n: fx.Node, nxt: list) -> Any:
        """The qnref layer of one unary node (None: absorbed, e.g. the pool of a GlobalAvgPool)."""
        if n.op == "call_module":
            if n.target in used_modules:
                raise Err(f"module {n.target!r} is called twice (shared weights) at {_where(n)}; qnref θ has one "
                          "block per layer")
            used_modules.add(n.target)
            mod = gm.get_submodule(n.target)
            if isinstance(mod, nn.AdaptiveAvgPool2d):
                raise Err(f"unsupported op AdaptiveAvgPool2d at {_where(n)}: only AdaptiveAvgPool2d(1) followed by a "
                          "flatten (→ GlobalAvgPool) is supported")
            (layer,) = _convert_list([(n.target, mod)], plan, classes)
            return layer
        if n.op == "call_function":
            t = n.target
            if t in _ACT_FUNCS and len(n.args) == 1 and not n.kwargs.get("inplace", False):
                layer = _ACT_FUNCS[t]()
            elif t is F.softplus:
                if _int_arg(n, 1, "beta", 1.0) != 1.0:
                    raise Err(f"unsupported op F.softplus with beta != 1 at {_where(n)}")
                layer = qact.Softplus()
            elif t is torch.flatten:
                if _int_arg(n, 1, "start_dim", 0) != 1 or _int_arg(n, 2, "end_dim", -1) != -1:
                    raise Err(f"unsupported op torch.flatten at {_where(n)}: only torch.flatten(x, 1) is supported")
                layer = Flatten()
            elif t in (F.max_pool2d, F.avg_pool2d):
                k = _pair(_int_arg(n, 1, "kernel_size", None))
                s = _int_arg(n, 2, "stride", None)
                s = k if s is None or s == [] else _pair(s)
                p = _pair(_int_arg(n, 3, "padding", 0))
                if t is F.max_pool2d:
                    if _int_arg(n, 4, "dilation", 1) not in (1, (1, 1)) or _int_arg(n, 5, "ceil_mode", False):
                        raise Err(f"unsupported op F.max_pool2d options at {_where(n)} (dilation 1, ceil_mode False)")
                    layer = classes["MaxPool2d"](k, s, p)
                else:
                    if _int_arg(n, 4, "ceil_mode", False) or not _int_arg(n, 5, "count_include_pad", True) or \
                            _int_arg(n, 6, "divisor_override", None) is not None:
                        raise Err(f"unsupported op F.avg_pool2d options at {_where(n)}")
                    layer = classes["AvgPool2d"](k, s, p)
            else:
                raise Err(f"unsupported op {_describe(n)} at {_where(n)} (no qnref counterpart)")
        elif n.op == "call_method":
            m = n.target
            if m in _ACT_METHODS and len(n.args) == 1:
                layer = _ACT_METHODS[m]()
            elif m == "flatten" and _int_arg(n, 1, "start_dim", 0) == 1 and _int_arg(n, 2, "end_dim", -1) == -1:
                layer = Flatten()
            elif m in ("view", "reshape") and len(n.args) == 3 and n.args[2] == -1:
                layer = Flatten()
            else:
                raise Err(f"unsupported op {_describe(n)} at {_where(n)} (no qnref counterpart)")
        else:
            raise Err(f"unsupported op {_describe(n)} at {_where(n)}")
        plan.append((layer, n.name, None, []))
        return layer

    def build(src: fx.Node, dst: fx.Node) -> list:
        rev: list = []
        n = dst
        while n is not src:
            if n.op == "call_function" and n.target in _ADD:
                from qnref.nn.residual import Residual  # noqa: PLC0415

                fork = fork_of(n)
                body = build(fork, n.args[0])
                short = build(fork, n.args[1])
                if not body:
                    body, short = short, body
                if not body:
                    raise Err(f"residual addition at {_where(n)} adds its input to itself")
                layer = Residual(body, short, activation=None)
                plan.append((layer, n.name, None, []))
                rev.append(layer)
                n = fork
                continue
            p = parent(n)
            is_flat = (n.op == "call_function" and n.target is torch.flatten) or (
                n.op == "call_method" and n.target in ("flatten", "view", "reshape"))
            pool_mod = p.op == "call_module" and isinstance(gm.get_submodule(p.target), nn.AdaptiveAvgPool2d)
            pool_fn = p.op == "call_function" and p.target is F.adaptive_avg_pool2d
            if is_flat and (pool_mod or pool_fn):
                size = gm.get_submodule(p.target).output_size if pool_mod else _int_arg(p, 1, "output_size", None)
                if _pair(size) != (1, 1):
                    raise Err(f"unsupported adaptive pooling to {size} at {_where(p)} (only output size 1)")
                layer = classes["GlobalAvgPool"]()
                plan.append((layer, p.name, None, []))
                rev.append(layer)
                n = parent(p)
                continue
            rev.append(layer_of(n, rev))
            n = p
        return rev[::-1]

    start = len(plan)
    layers = build(x, out)
    from qnref.nn.base import walk  # noqa: PLC0415

    order = {id(layer): i for i, layer in enumerate(walk(layers))}
    plan[start:] = sorted(plan[start:], key=lambda e: order[id(e[0])])   # built last to first; keep forward order
    return layers
