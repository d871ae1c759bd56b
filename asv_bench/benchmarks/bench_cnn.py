"""CNN forward+backward cost (issue 3): LeNet-5 (batch 128, 1×28×28) and ResNet-20 (batch 128,
3×32×32) in float32, and side by side with torch on the CPU (same thread count, one process)."""
import numpy as np

from qnref.curvature.objective import Objective
from qnref.nn.zoo import build_model

from ._common import THREADS, SlowTiming, best_time, warm_once

CASES = {"lenet5-mnist": (1, 28, 28), "resnet20": (3, 32, 32)}


def _objective(name, batch=128, dtype="float32"):
    model = build_model(name)
    r = np.random.default_rng(0)
    X = r.standard_normal((batch,) + CASES[name]).astype(dtype)
    y = r.integers(0, 10, batch)
    return model, Objective(model, "softmax_ce", X, y), model.init(0, scheme="he", dtype=dtype)


class CNNForwardBackward(SlowTiming):
    """Timing: :class:`~._common.SlowTiming` (one warm-up gradient per process, 10–20 samples)."""

    params = [list(CASES)]
    param_names = ["model"]
    timeout = 300
    # bump ``version`` when the measured code or a helper it calls (``_common``) changes: asv's
    # automatic version hashes only the benchmark's own source, so old results would mix in
    # 21.9: setup_cache compiles the numba kernels first (their compilation was in the peak)
    version = "21.9"

    def setup_cache(self):
        """One gradient of each model, in asv's own process before the measured ones: numba then
        loads the kernels from its on-disk cache instead of compiling them inside the measured
        process. A fresh install compiled them during the peakmem process's warm-up, which added
        ≈ 45 MB to LeNet-5's peak (263 MB cold against 208–219 MB warm, issue 21's ninth round)."""
        for name in CASES:
            _, obj, theta = _objective(name)
            obj.grad(theta)
        return list(CASES)  # not None: asv passes a cache to setup and to every benchmark method

    def setup(self, _cache, name):
        self.model, self.obj, self.theta = _objective(name)
        warm_once(("CNNForwardBackward", name), lambda: self.obj.grad(self.theta))

    def time_forward_backward(self, _cache, name):
        self.obj.grad(self.theta)

    def peakmem_forward_backward(self, _cache, name):
        self.obj.grad(self.theta)


def _torch_resnet20():
    """ResNet-20 with option-A (zero-padded identity) shortcuts, as qnref's zoo builds it."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1)
            self.b2 = nn.BatchNorm2d(cout)
            self.stride, self.pad = stride, cout - cin

        def forward(self, x):
            h = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
            sc = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
            if self.pad:
                sc = nn.functional.pad(sc, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            return torch.relu(h + sc)

    layers = [nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def _torch_time(name, batch=128):
    import torch

    model, obj, theta = _objective(name, batch, "float64")
    if name == "resnet20":
        tm = _torch_resnet20().float()
    else:
        from qnref_torch import to_torch

        tm = to_torch(model, theta).float()
    tm.train()
    X = torch.from_numpy(obj.X.astype(np.float32))
    y = torch.from_numpy(obj.y)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        tm.zero_grad(set_to_none=True)
        loss_fn(tm(X), y).backward()

    return best_time(step)


class CNNTorchRatio:
    """qnref / torch time of one forward+backward (float32, CPU); goal ≤ 1.5."""

    params = [list(CASES)]
    param_names = ["model"]
    unit = "ratio qnref/torch"
    timeout = 600
    # bump ``version`` when the measured code or a helper it calls (``_common``) changes: asv's
    # automatic version hashes only the benchmark's own source, so old results would mix in
    version = "18.1"

    def setup(self, name):
        try:
            import torch  # noqa: F401
        except ImportError:
            raise NotImplementedError("torch not installed")
        import torch

        torch.set_num_threads(THREADS)

    def track_ratio_to_torch(self, name):
        model, obj, theta = _objective(name)
        t_q = best_time(lambda: obj.grad(theta))
        return t_q / _torch_time(name)


class CNNPageFaults:
    """Minor page faults per forward+backward in a warm process: 0 with the malloc thresholds of
    qnref/nn/allocator.py (≈ 35 000 for ResNet-20 without them, QNREF_MALLOC_TUNING=0)."""

    params = [list(CASES)]
    param_names = ["model"]
    unit = "faults per gradient"
    timeout = 300

    def setup(self, name):
        self.model, self.obj, self.theta = _objective(name)
        for _ in range(2):  # warm: the heap reaches its working size
            self.obj.grad(self.theta)

    def track_minor_faults_per_grad(self, name):
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            self.obj.grad(self.theta)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
