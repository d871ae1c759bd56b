"""The GPU path, proved on a GPU machine: products and trajectories GPU vs CPU, timings vs torch-CUDA.

Run by ``bash tools/gpu_check.sh`` (which installs CuPy and runs the ``gpu`` tests first), or alone::

    python tools/gpu_check.py [--steps 5] [--optimizers sgd,lbfgs,...] [--tol 1e-10] [--repeats 5]
                              [--no-bench] [--json out.json]

Prints one table: every product (value, grad, Hv, Gv, Fv, Jv, Jᵀu, Gram, per-example gradients) on
an MLP, a BatchNorm CNN with pooling and a residual net, and a few optimizer trajectories, each as
the largest relative difference between GPU and CPU in float64 (pass: ≤ ``--tol``); then the median
time of grad/Hv/Gv on an MLP and of a ResNet-20 forward+backward on the GPU, with torch-CUDA's time
for the same computation where torch sees a CUDA device. Exit status 0 when every comparison passes.

The CPU-runnable parts (:func:`parse_args`, :func:`rel_err`, :func:`compare`, :func:`format_table`)
are tested in ``tests/gpu/test_gpu_check_tool.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

#: optimizers whose trajectories are compared by default (one per family; ``--optimizers all`` for every one)
DEFAULT_OPTIMIZERS = ("sgd", "adam", "lbfgs", "lsr1-tr", "hf", "kfac", "shampoo", "smw-gn", "s-lsr1")


@dataclass
class Row:
    """One line of the table: a comparison (``err``/``tol``) or a timing (``ms``/``torch_ms``)."""

    section: str
    name: str
    err: float | None = None
    tol: float | None = None
    ms: float | None = None
    torch_ms: float | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.err is None or (math.isfinite(self.err) and self.err <= self.tol)


# ---------------------------------------------------------------------- CPU-testable parts
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_check", description="GPU vs CPU products, trajectories and timings")
    ap.add_argument("--steps", type=_positive(int), default=5, help="optimizer steps per trajectory (default 5)")
    ap.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                    help="comma-separated registry names, or 'all' (default: one per family)")
    ap.add_argument("--tol", type=_positive(float), default=1e-10, help="largest relative GPU−CPU difference (default 1e-10)")
    ap.add_argument("--repeats", type=_positive(int), default=5, help="timed repeats per benchmark (median; default 5)")
    ap.add_argument("--no-bench", action="store_true", help="skip the timings")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    if not names:
        ap.error("--optimizers: give at least one registry name or 'all'")
    args.optimizers = names
    return args


def _positive(kind: type):
    """An argparse type: a positive finite ``kind`` (int or float), with a clear message otherwise."""
    noun = "integer" if kind is int else "number"

    def convert(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {noun}, got {s!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"expected a positive finite {noun}, got {s!r}")
        return v

    return convert


def rel_err(got: Any, want: Any) -> float:
    """max |got − want| / max |want| (the norm-wise relative difference; inf on a shape mismatch,
    NaN where either side holds NaN/Inf that the other does not)."""
    a = np.asarray(got, dtype=np.float64)
    b = np.asarray(want, dtype=np.float64)
    if a.shape != b.shape:
        return math.inf
    if a.size == 0:
        return 0.0
    same_bad = (~np.isfinite(a)) & (~np.isfinite(b)) & ((a == b) | (np.isnan(a) & np.isnan(b)))
    if not np.all(np.isfinite(a) | same_bad) or not np.all(np.isfinite(b) | same_bad):
        return math.nan
    a, b = np.where(same_bad, 0.0, a), np.where(same_bad, 0.0, b)
    scale = float(np.abs(b).max())
    diff = float(np.abs(a - b).max())
    return diff / scale if scale > 0 else diff


def compare(section: str, name: str, gpu: Any, cpu: Any, tol: float) -> Row:
    """A comparison row: GPU result (device or host array, or a tuple of them) against the CPU one."""
    return Row(section, name, err=rel_err(_host(gpu), _host(cpu)), tol=tol)


def _host(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return np.concatenate([np.ravel(_host(v)) for v in x]) if x else np.zeros(0)
    if hasattr(x, "get") and type(x).__module__.startswith("cupy"):
        return x.get()
    return np.asarray(x)


def format_table(rows: Sequence[Row]) -> str:
    """The report: one table, sections in order of first appearance."""
    head = f"{'section':<12} {'check':<34} {'rel. diff':>10} {'tol':>8} {'GPU ms':>9} {'torch ms':>9}  result"
    out = [head, "-" * len(head)]
    for r in rows:
        err = "" if r.err is None else f"{r.err:10.2e}"
        tol = "" if r.tol is None else f"{r.tol:8.0e}"
        ms = "" if r.ms is None else f"{r.ms:9.2f}"
        tms = "" if r.torch_ms is None else f"{r.torch_ms:9.2f}"
        res = ("ok" if r.ok else "FAIL") if r.err is not None else ""
        if r.note:
            res = f"{res} {r.note}".strip()
        out.append(f"{r.section:<12} {r.name:<34} {err:>10} {tol:>8} {ms:>9} {tms:>9}  {res}")
    n_cmp = sum(r.err is not None for r in rows)
    n_bad = sum(not r.ok for r in rows)
    out.append("-" * len(head))
    out.append(f"{n_cmp - n_bad}/{n_cmp} comparisons within tolerance" + ("" if not n_bad else f"; {n_bad} FAILED"))
    return "\n".join(out)


def median_ms(fn: Callable[[], Any], sync: Callable[[], None], repeats: int) -> float:
    """Median wall time of ``fn`` in ms over ``repeats`` runs after one warm-up (``sync`` waits for the device)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------------- GPU parts
def _models() -> dict:
    """The product-check models: name → (model, X, y) (MLP, CNN with max/avg pooling, BatchNorm CNN,
    residual net, global average pooling)."""
    from qnref.nn.activations import ReLU, Tanh
    from qnref.nn.conv import Conv2d
    from qnref.nn.dense import Dense
    from qnref.nn.model import Sequential
    from qnref.nn.norm import BatchNorm
    from qnref.nn.pool import AvgPool2d, GlobalAvgPool, MaxPool2d
    from qnref.nn.reshape import Flatten
    from qnref.nn.zoo import build_model

    r = np.random.default_rng(3)
    return {
        "mlp": (Sequential([Dense(16), Tanh(), Dense(5)], input_shape=(8,)), r.standard_normal((32, 8)), r.integers(0, 5, 32)),
        "cnn": (Sequential([Conv2d(4, 3, padding=1), Tanh(), MaxPool2d(3, stride=2, padding=1), Conv2d(4, 3, stride=2),
                            Tanh(), AvgPool2d(2, stride=1), Flatten(), Dense(3)], input_shape=(2, 10, 10)),
                r.standard_normal((8, 2, 10, 10)), r.integers(0, 3, 8)),
        "cnn-bn": (Sequential([Conv2d(4, 3, padding=1), BatchNorm(), ReLU(), MaxPool2d(2), Flatten(), Dense(3)], input_shape=(2, 8, 8)),
                   r.standard_normal((8, 2, 8, 8)), r.integers(0, 3, 8)),
        "residual": (build_model("resnet-digits", n_outputs=3), r.standard_normal((8, 1, 8, 8)), r.integers(0, 3, 8)),
        "global-pool": (Sequential([Conv2d(3, 3, padding=1), MaxPool2d(2), GlobalAvgPool(), Dense(3)], input_shape=(1, 6, 6)),
                        r.standard_normal((5, 1, 6, 6)), r.integers(0, 3, 5)),
    }


def products(make: Callable[[bool], Any], theta: Any, v: Any) -> dict:
    """Every product of an objective; ``make(train)`` builds it (BatchNorm: batch statistics when
    ``train``, running statistics otherwise — the per-example products need ``train=False``)."""
    from qnref.curvature.operators import as_operator

    p = make(True).at(theta)
    out = {"value": p.value, "grad": p.grad, "hvp": p.hvp(v), "ggn_vp": p.ggn_vp(v)}
    ev = make(False)
    q = ev.at(theta)
    out.update(fisher_vp=q.fisher_vp(v), gram=q.gram("grad"), per_example=q.per_example_grads())
    out["jvp"] = ev.jvp(theta, v)
    out["vjp"] = ev.vjp(theta, out["jvp"])
    for kind in ("hessian", "ggn", "fisher"):  # LinearOperator views (cupyx.scipy.sparse.linalg on CuPy)
        out[f"operator-{kind}"] = as_operator(q, kind).matvec(v)
    return out


def check_products(tol: float) -> list[Row]:
    from qnref import backend
    from qnref.curvature.objective import Objective

    rows = []
    for key, (model, X, y) in _models().items():
        theta = model.init(seed=1)
        v = np.random.default_rng(2).standard_normal(theta.size)
        cpu = products(lambda t: Objective(model, "softmax_ce", X, y, l2=1e-3, train=t), theta, v)
        Xg, yg, tg, vg = (backend.to_device(a, "gpu") for a in (X, y, theta, v))
        gpu = products(lambda t: Objective(model, "softmax_ce", Xg, yg, l2=1e-3, train=t), tg, vg)
        rows += [compare("products", f"{key}: {name}", gpu[name], cpu[name], tol) for name in cpu]
    return rows


def reference_problem(key: str, device: str = "cpu", n: int = 300, seed: int = 1234):
    """(θ₀, :class:`~qnref.optim.base.Problem`) of a reference-trajectory setting on ``n`` examples
    on ``device``: ``"mlp"`` (4 → 6 → 5 → 3, tanh) or ``"cnn-bn"`` (the 8×8 LeNet with BatchNorm,
    width 0.5), as in ``tests/optim/reference_trajectories.py``."""
    from qnref import backend
    from qnref.nn.activations import Tanh
    from qnref.nn.dense import Dense
    from qnref.nn.model import Sequential
    from qnref.nn.zoo import build_model
    from qnref.optim.base import Problem

    r = np.random.default_rng(seed)
    if key == "mlp":
        model = Sequential([Dense(6), Tanh(), Dense(5), Tanh(), Dense(3)], input_shape=(4,))
        X = r.standard_normal((n, 4))
        y = (X[:, 0] + X[:, 1] * X[:, 2] > 0).astype(np.int64) + (X[:, 3] > 0.8)
    elif key == "cnn-bn":
        model = build_model("lenet-digits", batchnorm=True, width=0.5, n_outputs=3)
        X = r.standard_normal((n, 1, 8, 8))
        y = (X[:, 0, :4].sum(axis=(1, 2)) > X[:, 0, 4:].sum(axis=(1, 2))).astype(np.int64) + (X[:, 0, 0, 0] > 1.0)
    else:
        raise ValueError(f"model key must be 'mlp' or 'cnn-bn', got {key!r}")
    theta = model.init(seed=7)
    X, y, theta = (backend.to_device(a, device) for a in (X, y, theta))
    return theta, Problem(model, "softmax_ce", X, y, 1e-3, seed=11)


def trajectory(name: str, steps: int, device: str, model: str = "mlp") -> list[np.ndarray]:
    """θ after each of ``steps`` steps of ``make_optimizer(name)`` on :func:`reference_problem` on ``device``."""
    from qnref import backend
    from qnref.optim import make_optimizer

    theta, problem = reference_problem(model, device)
    opt = make_optimizer(name)
    state = opt.init(theta)
    out = []
    for _ in range(steps):
        theta, state, _ = opt.step(theta, state, problem)
        out.append(backend.to_numpy(theta).copy())
    return out


def check_trajectories(names: Sequence[str], steps: int, tol: float) -> list[Row]:
    from qnref.optim import load_all

    if list(names) == ["all"]:
        names = sorted(load_all())
    rows = []
    for name in names:
        try:
            g, c = trajectory(name, steps, "gpu"), trajectory(name, steps, "cpu")
            rows.append(compare("trajectory", f"{name} ({steps} steps)", g, c, tol))
        except Exception as e:  # noqa: BLE001 - reported in the table
            rows.append(Row("trajectory", f"{name} ({steps} steps)", err=math.nan, tol=tol, note=f"{type(e).__name__}: {e}"[:80]))
    return rows


def bench(repeats: int, mlp_batch: int = 1000, resnet_batch: int = 128, torch_device: str = "cuda") -> list[Row]:
    """grad/Hv/Gv of an MLP (784-1000-500-10, batch ``mlp_batch``) and ResNet-20 forward+backward
    (batch ``resnet_batch``) on the GPU, vs torch on ``torch_device`` (float64 both)."""
    import cupy

    from qnref import backend
    from qnref.curvature.objective import Objective
    from qnref.nn.zoo import build_model

    sync = cupy.cuda.Device().synchronize
    r = np.random.default_rng(0)
    rows = []
    mlp = build_model("mlp", input_shape=(784,), n_outputs=10, hidden=(1000, 500), activation="tanh")
    X, y = r.standard_normal((mlp_batch, 784)), r.integers(0, 10, mlp_batch)
    theta = mlp.init(seed=0)
    v = r.standard_normal(theta.size)
    obj = Objective(mlp, "softmax_ce", backend.to_device(X, "gpu"), backend.to_device(y, "gpu"))
    tg, vg = backend.to_device(theta, "gpu"), backend.to_device(v, "gpu")
    torch_t = _torch_mlp_times(X, y, repeats, torch_device)
    rows.append(Row("bench", f"MLP grad (batch {mlp_batch})", ms=median_ms(lambda: obj.at(tg).grad, sync, repeats), torch_ms=torch_t.get("grad")))
    rows.append(Row("bench", "MLP Hv", ms=median_ms(lambda: obj.at(tg).hvp(vg), sync, repeats), torch_ms=torch_t.get("hvp")))
    rows.append(Row("bench", "MLP Gv", ms=median_ms(lambda: obj.at(tg).ggn_vp(vg), sync, repeats), torch_ms=torch_t.get("ggn")))
    res = build_model("resnet20")
    Xr, yr = r.standard_normal((resnet_batch, 3, 32, 32)), r.integers(0, 10, resnet_batch)
    th = backend.to_device(res.init(seed=0), "gpu")
    objr = Objective(res, "softmax_ce", backend.to_device(Xr, "gpu"), backend.to_device(yr, "gpu"))
    rows.append(Row("bench", f"ResNet-20 fwd+bwd (batch {resnet_batch})", ms=median_ms(lambda: objr.at(th).grad, sync, repeats),
                    torch_ms=_torch_resnet20_ms(Xr, yr, repeats, torch_device)))
    return rows


def _torch_on(device: str):
    """torch when it can use ``device`` ("cuda" or "cpu"), else None; and its synchronize."""
    try:
        import torch
    except ImportError:
        return None, None
    if device == "cuda":
        return (torch, torch.cuda.synchronize) if torch.cuda.is_available() else (None, None)
    return torch, lambda: None


def _torch_mlp(torch: Any, device: str) -> Any:
    """The benchmark MLP in torch: 784-1000-500-10, tanh, float64."""
    nn = torch.nn
    return nn.Sequential(nn.Linear(784, 1000), nn.Tanh(), nn.Linear(1000, 500), nn.Tanh(),
                         nn.Linear(500, 10)).to(torch.device(device), torch.float64)


def torch_params(torch: Any, net: Any, flat: np.ndarray) -> dict:
    """qnref's θ layout (per Dense layer the row-major block W̄ = [W b], out × in+1) → torch's
    parameter dict of ``net`` (a Sequential of Linear layers and activations)."""
    out, off = {}, 0
    for i, m in enumerate(net):
        if isinstance(m, torch.nn.Linear):
            o, n_in = m.weight.shape
            blk = torch.as_tensor(np.asarray(flat[off : off + o * (n_in + 1)]).reshape(o, n_in + 1), device=m.weight.device)
            out[f"{i}.weight"], out[f"{i}.bias"] = blk[:, :-1].contiguous(), blk[:, -1].contiguous()
            off += o * (n_in + 1)
    return out


def qnref_flat(torch: Any, net: Any, d: dict) -> np.ndarray:
    """Inverse of :func:`torch_params`: a torch parameter dict as one vector in qnref's layout."""
    parts = [torch.cat([d[f"{i}.weight"], d[f"{i}.bias"][:, None]], 1).reshape(-1)
             for i, m in enumerate(net) if isinstance(m, torch.nn.Linear)]
    return torch.cat(parts).detach().cpu().numpy()


def torch_products(torch: Any, net: Any, X: Any, y: Any) -> tuple[Callable, Callable, Callable]:
    """grad(ps), hvp(ps, vs) (forward-over-reverse) and ggn(ps, vs) (J v, then H_L of the mean
    softmax cross-entropy, then Jᵀ) of ``net`` on (X, y): the computations timed against qnref's."""
    from torch.func import functional_call, jvp, vjp

    dev = next(net.parameters()).device
    Xt, yt = torch.as_tensor(X, device=dev), torch.as_tensor(y, device=dev)

    def f(ps):
        return functional_call(net, ps, (Xt,))

    def loss(ps):
        return torch.nn.functional.cross_entropy(f(ps), yt)

    def grad(ps):
        return torch.func.grad(loss)(ps)

    def hvp(ps, vs):
        return jvp(torch.func.grad(loss), (ps,), (vs,))[1]

    def ggn(ps, vs):
        z, jv = jvp(f, (ps,), (vs,))
        p = torch.softmax(z, dim=1)
        hu = (p * jv - p * (p * jv).sum(1, keepdim=True)) / z.shape[0]
        return vjp(f, ps)[1](hu)[0]

    return grad, hvp, ggn


def _torch_mlp_times(X: np.ndarray, y: np.ndarray, repeats: int, device: str = "cuda") -> dict:
    """torch's grad / Hv / Gv times in ms for the benchmark MLP on ``device`` ({} without torch there)."""
    torch, sync = _torch_on(device)
    if torch is None:
        return {}
    net = _torch_mlp(torch, device)
    params = {k: p.detach() for k, p in net.named_parameters()}
    vec = {k: torch.randn_like(p) for k, p in params.items()}
    grad, hvp, ggn = torch_products(torch, net, X, y)
    return {"grad": median_ms(lambda: grad(params), sync, repeats), "hvp": median_ms(lambda: hvp(params, vec), sync, repeats),
            "ggn": median_ms(lambda: ggn(params, vec), sync, repeats)}


def _torch_resnet20_ms(X: np.ndarray, y: np.ndarray, repeats: int, device: str = "cuda") -> float | None:
    """[HE] §4.2 ResNet-20 (option-A shortcuts) in torch, float64, forward + backward; ms."""
    torch, sync = _torch_on(device)
    if torch is None:
        return None
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.pad = cout - cin
            self.stride = stride

        def forward(self, x):
            out = torch.relu(self.b1(self.c1(x)))
            out = self.b2(self.c2(out))
            sc = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
            if self.pad:
                sc = nn.functional.pad(sc, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            return torch.relu(out + sc)

    layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    dev = torch.device(device)
    net = nn.Sequential(*layers).to(dev, torch.float64)
    Xt, yt = torch.as_tensor(X, device=dev), torch.as_tensor(y, device=dev)

    def step():
        net.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(Xt), yt).backward()

    return median_ms(step, sync, repeats)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from qnref import backend

    if not backend.gpu_available():
        print("gpu_check: no usable CUDA device (CuPy missing or no driver); nothing to check", file=sys.stderr)
        return 2
    rows = check_products(args.tol) + check_trajectories(args.optimizers, args.steps, args.tol)
    if not args.no_bench:
        try:
            rows += bench(args.repeats)
        except Exception as e:  # noqa: BLE001 - the comparisons above still count
            rows.append(Row("bench", "benchmarks", note=f"failed: {type(e).__name__}: {e}"[:100]))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) | {"ok": r.ok} for r in rows], fh, indent=1, default=str)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
