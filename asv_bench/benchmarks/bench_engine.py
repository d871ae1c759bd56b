"""Engine cost: forward+backward, Hv and Gv on the thesis's MNIST autoencoder (issue 2).

Pearlmutter's claim: an exact Hessian-vector product costs a small constant (≈ 2–4) times a
gradient; the Gauss-Newton product needs no second-order terms and costs ≈ 1.5 gradients.
"""
import numpy as np

from ._common import SlowTiming, autoencoder_objective, best_time, devices, sync, warm_once


class AutoencoderProducts(SlowTiming):
    """784-1000-500-250-30-250-500-1000-784, batch 1000, float32 (time).

    Timing: :class:`~._common.SlowTiming` (one warm-up call of each product per process, 10–20 samples);
    peak memory: :class:`AutoencoderPeakMemory`."""

    params = (["float32"], devices())
    param_names = ["dtype", "device"]
    timeout = 300
    # bump ``version`` when the measured code or a helper it calls (``_common``) changes: asv's
    # automatic version hashes only the benchmark's own source, so old results would mix in
    version = "18.1"

    def setup(self, dtype, device):
        self.obj, self.theta = autoencoder_objective(1000, dtype, device)
        self.v = self.theta * 0 + 1e-3
        warm_once(("AutoencoderProducts", dtype, device), self._all_products)

    def _all_products(self):
        self.obj.grad(self.theta)
        self.obj.hvp(self.theta, self.v)
        return self.obj.ggn_vp(self.theta, self.v)

    def time_forward_backward(self, dtype, device):
        sync(self.obj.grad(self.theta))

    def time_hvp(self, dtype, device):
        sync(self.obj.hvp(self.theta, self.v))

    def time_ggn_vp(self, dtype, device):
        sync(self.obj.ggn_vp(self.theta, self.v))



class AutoencoderPeakMemory:
    """Process peak memory of one gradient / one Hv on the same autoencoder (batch 1000, float32).
    asv reads the process's peak resident size, setup included, so this setup makes the objective
    only: the warm-up of :class:`AutoencoderProducts` runs every product and would make each peak
    the largest product's (the gradient read 210 MB there, 127 MB alone; version 21.1)."""

    params = (["float32"], devices())
    param_names = ["dtype", "device"]
    timeout = 300
    version = "21.1"

    def setup(self, dtype, device):
        self.obj, self.theta = autoencoder_objective(1000, dtype, device)
        self.v = self.theta * 0 + 1e-3

    def peakmem_forward_backward(self, dtype, device):
        self.obj.grad(self.theta)

    def peakmem_hvp(self, dtype, device):
        self.obj.hvp(self.theta, self.v)


class ProductRatios:
    """Hv / gradient and Gv / gradient time ratios, measured side by side in one process."""

    params = (["float32", "float64"], devices())
    param_names = ["dtype", "device"]
    timeout = 300
    unit = "ratio"
    # bump ``version`` when the measured code or a helper it calls (``_common``) changes: asv's
    # automatic version hashes only the benchmark's own source, so old results would mix in
    version = "18.1"

    def setup(self, dtype, device):
        self.obj, self.theta = autoencoder_objective(1000, dtype, device)
        self.v = self.theta * 0 + 1e-3
        self.t_grad = best_time(lambda: self.obj.grad(self.theta))

    def track_hvp_over_grad(self, dtype, device):
        return best_time(lambda: self.obj.hvp(self.theta, self.v)) / self.t_grad

    def track_ggn_over_grad(self, dtype, device):
        return best_time(lambda: self.obj.ggn_vp(self.theta, self.v)) / self.t_grad


class ProductPasses:
    """Gradient-equivalent passes per product (exact counts)."""

    unit = "gradient equivalents"

    def setup(self):
        self.obj, self.theta = autoencoder_objective(64, "float64", "cpu", d=32, sizes=(16, 8, 16))
        self.v = np.ones_like(self.theta)

    def _passes(self, fn):
        before = self.obj.counter.grad_equivalents
        fn()
        return (self.obj.counter.grad_equivalents - before) / self.obj.n_samples

    def track_passes_grad(self):
        return self._passes(lambda: self.obj.grad(self.theta))

    def track_passes_hvp(self):
        return self._passes(lambda: self.obj.hvp(self.theta, self.v))

    def track_passes_ggn(self):
        return self._passes(lambda: self.obj.ggn_vp(self.theta, self.v))


class EngineScaling:
    """Fitted log-log exponents of gradient and Hv time: in the batch size (expected ≈ 1) and in
    the width w of a 256-w-w-10 MLP (n ≈ w², expected ≈ 2 in w, i.e. ≈ 1 in n)."""

    unit = "exponent"
    timeout = 300
    # bump ``version`` when the measured code or a helper it calls (``_common``) changes: asv's
    # automatic version hashes only the benchmark's own source, so old results would mix in
    version = "18.1"

    @staticmethod
    def _fit(xs, ts):
        return float(np.polyfit(np.log(xs), np.log(ts), 1)[0])

    @staticmethod
    def _mlp_objective(width, batch):
        from qnref.curvature.objective import Objective
        from qnref.nn.activations import Tanh
        from qnref.nn.dense import Dense
        from qnref.nn.model import Sequential

        model = Sequential([Dense(width), Tanh(), Dense(width), Tanh(), Dense(10)], input_shape=(256,))
        r = np.random.default_rng(0)
        obj = Objective(model, "softmax_ce", r.standard_normal((batch, 256)).astype("float32"), r.integers(0, 10, batch))
        return obj, model.init(0, dtype="float32")

    def _sweep(self, sizes, make, product):
        ts = []
        for s in sizes:
            obj, th = make(s)
            v = th * 0 + 1e-3
            ts.append(best_time(lambda: product(obj, th, v)))
        return self._fit(sizes, ts)

    def track_grad_exponent_in_batch(self):
        return self._sweep([256, 1024, 4096], lambda b: self._mlp_objective(512, b), lambda o, t, v: o.grad(t))

    def track_hvp_exponent_in_batch(self):
        return self._sweep([256, 1024, 4096], lambda b: self._mlp_objective(512, b), lambda o, t, v: o.hvp(t, v))

    def track_grad_exponent_in_n(self):
        widths = [256, 512, 1024]
        ns = [self._mlp_objective(w, 8)[0].model.n_params for w in widths]
        ts = []
        for w in widths:
            obj, th = self._mlp_objective(w, 1024)
            ts.append(best_time(lambda: obj.grad(th)))
        return self._fit(ns, ts)
