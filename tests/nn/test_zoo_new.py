"""The zoo's [MB] NetDNN and [SOC] DRN-18: parameter counts from hand-written layer formulas, output shapes, and
gradients against float64 central differences on tiny inputs (the pattern of tests/nn/test_zoo.py)."""
import numpy as np
import pytest

from qnref.curvature.objective import Objective
from qnref.nn.zoo import MODELS, build_model


def conv(cin, cout, k):  # weights + the bias qnref's convolutions always carry
    return cin * cout * k * k + cout


def dense(i, o):
    return i * o + o


def bn(c):  # scale and shift
    return 2 * c


def resnet18_count(cin=3, classes=10, stem=3, widths=(64, 128, 256, 512)):
    """He et al. Table 1, 18 layers: stem conv + 4 stages × 2 basic blocks × 2 convs + FC; BN after every conv;
    projection (1×1 conv + BN) where a block changes the shape (first block of stages 2–4)."""
    n = conv(cin, widths[0], stem) + bn(widths[0])
    c_in = widths[0]
    for stage, c in enumerate(widths):
        for b in range(2):
            n += conv(c_in, c, 3) + bn(c) + conv(c, c, 3) + bn(c)
            if stage > 0 and b == 0:
                n += conv(c_in, c, 1) + bn(c)
            c_in = c
    return n + dense(widths[-1], classes)


def test_netdnn_is_table1s_59_9k():
    # conv 5×5 32 → 24×24 → pool 12 → conv 5×5 32 → 8×8 → pool 4 → 32·4·4 = 512 → FC 64 → FC 10
    d = conv(1, 32, 5) + conv(32, 32, 5) + dense(32 * 4 * 4, 64) + dense(64, 10)
    m = build_model("netdnn")
    assert m.n_params == d == 59_946 and round(d / 1000, 1) == 59.9  # [MB] Table 1: d = 59.9k
    assert m.input_shape == (1, 28, 28) and m.output_shape == (10,) and MODELS["netdnn"].loss == "softmax_ce"
    assert build_model("netdnn", n_outputs=3).output_shape == (3,)


def test_resnet18_counts_and_shapes():
    m = build_model("resnet18")
    assert m.n_params == resnet18_count() == 11_178_762
    assert m.n_params - 4_800 == 11_173_962  # the usual bias-free ResNet-18 for CIFAR (4,800 conv biases here)
    assert m.output_shape == (10,) and m.input_shape == (3, 32, 32)
    assert build_model("resnet18", input_shape=(1, 28, 28)).n_params == resnet18_count(cin=1)  # [SOC] MNIST
    assert build_model("resnet18", n_outputs=100).n_params == resnet18_count(classes=100)
    assert build_model("resnet18", stem="imagenet").n_params == resnet18_count(stem=7)
    assert build_model("resnet18", width=0.25).n_params == resnet18_count(widths=(16, 32, 64, 128))
    with pytest.raises(ValueError, match="stem must be 'cifar'"):
        build_model("resnet18", stem="mnist")
    with pytest.raises(TypeError, match="unexpected keyword"):
        build_model("netdnn", batchnorm=True)


@pytest.mark.parametrize("name,kw,shape,train", [
    ("netdnn", {}, (1, 28, 28), False),
    ("netdnn", {"activation": "tanh"}, (1, 28, 28), False),
    ("resnet18", {"width": 0.125}, (3, 32, 32), True),
    ("resnet18", {"width": 0.125, "stem": "imagenet", "activation": "tanh"}, (3, 32, 32), True),
    ("resnet18", {"width": 0.125}, (1, 28, 28), False),
])
def test_gradient_matches_central_differences(name, kw, shape, train):
    """∇f·v against (f(θ+εv) − f(θ−εv)) / 2ε in float64 (BN in training mode where train=True: batch statistics).
    Glorot init and inputs of std 0.5 keep tanh unsaturated: saturated units equal 1.0 exactly, and the ties they
    make in a max-pool would let the difference quotient cross a kink."""
    model = build_model(name, input_shape=shape, **kw)
    r = np.random.default_rng(0)
    X = 0.5 * r.standard_normal((3,) + shape)
    y = r.integers(0, 10, 3)
    theta = model.init(0, scheme="glorot")
    obj = Objective(model, "softmax_ce", X, y, train=train)
    value, g = obj.value_and_grad(theta)
    assert np.isfinite(value) and g.shape == theta.shape and np.isfinite(g).all()
    for seed in (1, 2):
        v = np.random.default_rng(seed).standard_normal(theta.size)
        v /= np.linalg.norm(v)  # a unit direction: the step is ε, whatever the parameter count
        eps = 1e-5
        fd = (obj.value(theta + eps * v) - obj.value(theta - eps * v)) / (2 * eps)
        assert abs(g @ v - fd) <= 1e-6 * max(1.0, abs(fd)), (name, kw, g @ v, fd)
    assert obj.at(theta).z.shape == (3, 10)
