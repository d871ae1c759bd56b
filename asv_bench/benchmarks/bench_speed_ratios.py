"""Speed where users feel it (issue 21): qnref against the torch code a user would run instead, each
ratio measured side by side in one process, and the peak memory of the Kronecker steps on ResNet-20.

Timing policy of the ``track_`` ratios here (their own statistics, the same with or without asv's
``--quick``): one untimed warm-up call of each side (numba compilation, allocator, caches, the
optimizers' warm starts and first memory fill), then ``ROUNDS`` = 7 interleaved rounds — qnref,
then the peer, in every round — and the **median of the per-round ratios** (a load spike on the
shared machine then hits both sides of one round, or one round of seven). Each side of a round is
a **settled block** (:func:`~._common.settled_time`, version 21.4 of each benchmark): 0.5 s of
sleep, one untimed call, then its timed calls, so neither side runs while the other runtime's
threads still spin (docs/benchmarks.md, "Caveat: the two thread pools spin"). Threads: BLAS, OpenMP and
qnref's chunk pool are pinned to ``THREADS`` by ``_common`` (asv's benchmark processes), torch to the
same count by ``torch.set_num_threads``. float32 on the CPU throughout.

- :class:`CNNTorchRatios`: one forward+backward (``Objective.grad``) / torch's ``loss.backward()`` on
  the same architecture, batch 128; targets ResNet-20 ≤ 1.5, LeNet-5 ≤ 1.2.
- :class:`ShampooPeerRatio`: a qnref Shampoo step / a ``pytorch_optimizer.Shampoo`` step on the MNIST
  autoencoder 784-1000-500-250-30-250-500-1000-784 (batch 1000, preconditioners every 20 steps, one
  round = 20 steps = one full T₂ cycle on both sides); target ≤ 1.0. Skipped (NotImplementedError)
  when pytorch_optimizer is not installed.
- :class:`LBFGSPeerRatio`: a qnref L-BFGS step / a ``torch.optim.LBFGS`` step (history 10, strong
  Wolfe, ``max_iter=1``: one iteration per step), same autoencoder, batch 250 (documented: a round of
  10 steps on each side stays within asv's timeout; per-step overhead outside the evaluations scales
  with n, not the batch, so the smaller batch is the harder test); target ≤ 1.1.
- :class:`KroneckerPeakMemory`: peak traced memory (``tracemalloc``: NumPy registers its buffers) of
  one KFAC / K-BFGS / Shampoo / TNT step on ResNet-20 (batch 128) / that of an SGD-momentum step, with
  T₁ = T₂ = 1 (every step then updates the statistics and the factors: the peak step of a cycle);
  target ≤ 1.3. ``peakmem_step`` gives asv's own peak RSS of the same steps.
"""
import tracemalloc

import numpy as np

from ._common import THREADS, autoencoder, interleaved_ratio, settled_time

ROUNDS = 7


def _interleaved_ratio(f_qnref, f_peer, rounds=ROUNDS, calls=1):
    """:func:`~._common.interleaved_ratio` of settled blocks (:func:`~._common.settled_time`) of
    ``calls`` qnref calls against ``calls`` peer calls."""
    def timer(fn):
        return lambda: settled_time(fn, calls)

    return interleaved_ratio(timer(f_qnref), timer(f_peer), rounds)


def _need_torch():
    try:
        import torch
    except ImportError:
        raise NotImplementedError("torch not installed")
    torch.set_num_threads(THREADS)
    return torch


class CNNTorchRatios:
    """ResNet-20 / LeNet-5 forward+backward, qnref / torch (targets 1.5 / 1.2)."""

    params = [["resnet20", "lenet5-mnist"]]
    param_names = ["model"]
    unit = "ratio qnref/torch"
    timeout = 600
    # bump ``version`` when the measured code or a helper it calls (``_common``, ``bench_cnn``) changes
    # 21.4: settled blocks of 3 calls; 21.5: LeNet-5 blocks of 10 (its first two calls after the
    # settle ran 2-3x slow on a 2-vCPU VM, idle vCPU wake-up: 3 calls of 20 ms measured mostly that)
    version = "21.5"

    def setup(self, name):
        _need_torch()

    def track_forward_backward_ratio(self, name):
        import torch

        from .bench_cnn import _objective, _torch_resnet20

        model, obj, theta = _objective(name)
        if name == "resnet20":
            tm = _torch_resnet20().float()
        else:
            from qnref_torch import to_torch

            tm = to_torch(model, theta.astype(np.float64)).float()
        tm.train()
        X, y = torch.from_numpy(obj.X), torch.from_numpy(obj.y)
        loss_fn = torch.nn.CrossEntropyLoss()

        def peer():
            tm.zero_grad(set_to_none=True)
            loss_fn(tm(X), y).backward()

        return _interleaved_ratio(lambda: obj.grad(theta), peer, calls=3 if name == "resnet20" else 10)


def _autoencoder_pair(batch):
    """The autoencoder, θ₀ (float32), a full-batch qnref Problem on ``batch`` random images and the
    same network in torch (float32) with its closure-style loss (mean over the batch of the summed
    sigmoid cross-entropy, qnref's ``sigmoid_ce``)."""
    import torch
    from qnref_torch import to_torch

    from qnref.optim.base import Problem

    model = autoencoder()
    X = np.random.default_rng(0).random((batch, 784)).astype("float32")
    theta = model.init(0, dtype="float32")
    prob = Problem(model, "sigmoid_ce", X, X, seed=0)
    tm = to_torch(model, theta.astype(np.float64)).float()
    Xt = torch.from_numpy(X)
    bce = torch.nn.BCEWithLogitsLoss(reduction="sum")
    return model, theta, prob, tm, lambda: bce(tm(Xt), Xt) / batch


class _OptimizerPair:
    """qnref optimizer steps (full batch) and a torch optimizer's steps, side by side."""

    def _qnref_stepper(self, opt, theta, prob):
        box = [theta, opt.init(theta)]

        def step():
            box[0], box[1], _ = opt.step(box[0], box[1], prob)

        return step

    @staticmethod
    def _torch_stepper(topt, tm, loss):
        def closure():
            topt.zero_grad(set_to_none=True)
            value = loss()
            value.backward()
            return value

        return lambda: topt.step(closure)


class ShampooPeerRatio(_OptimizerPair):
    """qnref Shampoo (default root) / pytorch_optimizer.Shampoo per step (target 1.0)."""

    unit = "ratio qnref/pytorch_optimizer"
    timeout = 900
    version = "21.4"  # 21.4: settled blocks (20 steps after an untimed one: still one T₂ update per block)

    def setup(self):
        _need_torch()
        try:
            import pytorch_optimizer  # noqa: F401
        except ImportError:
            raise NotImplementedError("pytorch_optimizer not installed")

    def track_step_ratio(self):
        import pytorch_optimizer

        from qnref.optim import make_optimizer

        model, theta, prob, tm, loss = _autoencoder_pair(1000)
        opt = make_optimizer("shampoo", batch_size=None, inv_freq=20)
        # the peer's step size and momentum only set where it walks, not its cost (its momentum is one
        # elementwise lerp): pytorch_optimizer keeps the *preconditioned* gradient as its momentum
        # buffer and preconditions it again, which overflows float32 within a few T₂ cycles at
        # ε = 3e-4 (qnref's damping); momentum 0 and a small step keep its SVD roots finite
        topt = pytorch_optimizer.Shampoo(tm.parameters(), lr=1e-6, momentum=0.0, preconditioning_compute_steps=20,
                                         matrix_eps=3e-4)
        q, t = self._qnref_stepper(opt, theta, prob), self._torch_stepper(topt, tm, loss)
        return _interleaved_ratio(q, t, rounds=5, calls=20)


class LBFGSPeerRatio(_OptimizerPair):
    """qnref L-BFGS / torch.optim.LBFGS per step, memory 10, strong Wolfe, both ≈ 2.05 evaluations per step (target 1.1)."""

    unit = "ratio qnref/torch"
    timeout = 900
    version = "21.4"  # 21.2: the pair ring, kept curvatures and fused two-loop updates; 21.3: torch max_eval=20;
    # 21.4: settled blocks

    def setup(self):
        _need_torch()

    def track_step_ratio(self):
        import torch

        from qnref.optim import make_optimizer

        model, theta, prob, tm, loss = _autoencoder_pair(250)
        opt = make_optimizer("lbfgs", batch_size=None, memory=10)
        # max_eval=20 (qnref's max_evals): with max_iter=1 torch's default max_eval is 1·5//4 = 1, its strong
        # Wolfe search then gets no trial, returns t = 0 from step 2 on and keeps 1 pair (not the same work)
        topt = torch.optim.LBFGS(tm.parameters(), lr=1, max_iter=1, max_eval=20, history_size=10,
                                 line_search_fn="strong_wolfe")
        q, t = self._qnref_stepper(opt, theta, prob), self._torch_stepper(topt, tm, loss)
        for _ in range(11):  # both memories full before timing
            q()
            t()
        return _interleaved_ratio(q, t, calls=10)


KRON = {"kfac": dict(stat_freq=1, inv_freq=1), "kbfgs": dict(curvature_freq=1), "shampoo": dict(stat_freq=1, inv_freq=1),
        "tnt": dict(stat_freq=1, inv_freq=1), "momentum": {}}


def _resnet_stepper(name, batch=128):
    from qnref.nn.zoo import build_model
    from qnref.optim import make_optimizer
    from qnref.optim.base import Problem

    model = build_model("resnet20")
    r = np.random.default_rng(0)
    X = r.standard_normal((2 * batch, 3, 32, 32)).astype("float32")
    prob = Problem(model, "softmax_ce", X, r.integers(0, 10, 2 * batch), seed=0)
    opt = make_optimizer(name, batch_size=batch, **_kron_kwargs(name))
    box = [model.init(0, scheme="he", dtype="float32")]
    box.append(opt.init(box[0]))

    def step():
        box[0], box[1], _ = opt.step(box[0], box[1], prob)

    return step


def _kron_kwargs(name):
    """The T₁ = T₂ = 1 settings of ``KRON`` that the optimizer's class accepts."""
    import inspect

    from qnref.optim import make_optimizer

    accepted = inspect.signature(type(make_optimizer(name)).__init__).parameters
    return {k: v for k, v in KRON[name].items() if k in accepted}


def _traced_peak(step):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        step()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


class KroneckerPeakMemory:
    """Peak memory of a Kronecker step on ResNet-20 (batch 128) / an SGD-momentum step (target 1.3)."""

    params = [["kfac", "kbfgs", "shampoo", "tnt"]]
    param_names = ["optimizer"]
    unit = "ratio to an SGD-momentum step"
    timeout = 600
    version = "21.2"  # 21.2: streamed conv taps, θ point released before the θ⁺ pass

    def track_peak_ratio_to_momentum(self, name):
        peaks = {}
        for which in ("momentum", name):
            step = _resnet_stepper(which)
            step()  # warm start, first statistics
            step()
            peaks[which] = _traced_peak(step)
        return peaks[name] / peaks["momentum"]


class KroneckerStepPeakRSS:
    """asv's peak RSS of a process running three ResNet-20 steps (batch 128, T₁ = T₂ = 1), the
    SGD-momentum row the baseline."""

    params = [["momentum", "kfac", "kbfgs", "shampoo", "tnt"]]
    param_names = ["optimizer"]
    timeout = 600
    version = "21.2"  # 21.2: streamed conv taps, θ point released before the θ⁺ pass

    def peakmem_step(self, name):
        step = _resnet_stepper(name)
        for _ in range(3):
            step()
