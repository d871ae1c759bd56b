"""The model zoo: parameter counts against the papers, registry look-ups, reduced models run."""
import numpy as np
import pytest

from qnref.curvature.objective import Objective
from qnref.nn.model import Sequential
from qnref.nn.zoo import MODELS, ModelInfo, build_model, model_table

# Counts stated by the papers (exact where they give d, rounded where they give "0.27M").
PAPER_COUNTS = {
    "toy-small": 36,  # [SQN] table, d = 36
    "toy-medium": 176,  # d = 176
    "toy-large": 908,  # d = 908
}
PAPER_APPROX = {
    "resnet20": (0.27e6, 0.01),  # He et al. §4.2 / Table 6: 0.27M
    "resnet32": (0.46e6, 0.02),  # 0.46M
    "autoencoder-mnist": (2.8e6, 0.02),  # Martens 2010 / Hinton & Salakhutdinov: ~2.8M
}
# Our exact counts (pinned: a change is a change of architecture)
EXACT = {
    "mlp": 5_110, "autoencoder-digits": 5_544, "autoencoder-mnist": 2_837_314, "autoencoder-faces": 7_537_655,
    "autoencoder-curves": 842_340, "lenet5-mnist": 431_080, "lenet5-mnist-bn": 432_220, "lenet-cifar10": 145_578,
    "lenet-cifar10-bn": 145_962, "lenet": 431_080, "alexnet-small": 332_746, "resnet20": 270_410, "resnet32": 465_290,
    "vgg16": 14_728_266, "3c3d": 895_210, "allcnnc": 1_369_738, "lenet-digits": 1_898, "resnet-digits": 5_194,
    "cnn-mnist1d": 4_298, "netdnn": 59_946, "resnet18": 11_178_762, **PAPER_COUNTS,
}


def test_registry_entries():
    assert set(MODELS) == set(EXACT)
    for name, info in MODELS.items():
        assert isinstance(info, ModelInfo)
        builder, description, shape, loss = info  # the documented 4-tuple
        assert callable(builder) and description and loss in ("softmax_ce", "mse", "sigmoid_ce")
        assert builder.__doc__, name


@pytest.mark.parametrize("name", sorted(EXACT))
def test_parameter_counts(name):
    model = build_model(name)
    assert isinstance(model, Sequential)
    assert model.n_params == EXACT[name]
    assert model.input_shape == MODELS[name].input_shape


def test_counts_match_papers():
    for name, d in PAPER_COUNTS.items():
        assert build_model(name).n_params == d
    for name, (approx, rel) in PAPER_APPROX.items():
        assert abs(build_model(name).n_params - approx) <= rel * approx, name
    # option-B shortcuts add the 1×1 projections (+ BN): still ≈ 0.27M
    assert build_model("resnet20", shortcut="projection").n_params == 273_258
    # LeNet5 on CIFAR-10 inputs, VGG16 without BN, the residual AlexNet ablation, ResNet32-4
    assert build_model("lenet", input_shape=(3, 32, 32)).n_params == 657_080
    assert build_model("vgg16", batchnorm=False).n_params == 14_719_818
    assert build_model("alexnet-small", residual=True).n_params == 742_474
    assert build_model("resnet32", width=4).n_params == 7_390_730
    # thesis ch. 5 SMW classification MLPs
    assert build_model("mlp", input_shape=(784,), hidden=(500,), activation="sigmoid").n_params == 784 * 500 + 500 + 5010


def test_table_and_defaults():
    rows = model_table()
    assert [r["name"] for r in rows] == sorted(MODELS)
    assert build_model("toy-large").output_shape == (2,)
    assert build_model("autoencoder-digits").output_shape == (64,)
    assert build_model("RESNET20").name == "resnet20"
    m = build_model("lenet-digits", n_outputs=4, width=2)
    assert m.output_shape == (4,) and m.layers[0].out_channels == 16
    assert build_model("toy-small").init_kwargs == {"scheme": "gaussian", "std": 1 / 36}


def test_unknown_names_and_arguments():
    with pytest.raises(ValueError, match=r"did you mean 'resnet20'"):
        build_model("resnet-20")
    with pytest.raises(ValueError, match="Known models"):
        build_model("transformer")
    with pytest.raises(TypeError, match="unexpected keyword"):
        build_model("lenet-digits", batchnrom=True)
    with pytest.raises(ValueError, match="6n"):
        build_model("resnet20", depth=21)
    with pytest.raises(ValueError, match="width"):
        build_model("mlp", width=0)
    with pytest.raises(ValueError, match="size"):
        build_model("toy-small", size="huge")


@pytest.mark.parametrize("name,bs", [("lenet-digits", 3), ("resnet-digits", 3), ("cnn-mnist1d", 2), ("autoencoder-digits", 3),
                                     ("mlp", 3), ("toy-medium", 4)])
def test_reduced_models_run(name, bs):
    info = MODELS[name]
    model = build_model(name)
    r = np.random.default_rng(0)
    X = r.standard_normal((bs,) + info.input_shape)
    if info.loss == "softmax_ce":
        y = r.integers(0, model.output_shape[0], bs)
    else:
        y = r.uniform(0, 1, (bs,) + model.output_shape)
    theta = model.init(0, **getattr(model, "init_kwargs", {}))
    obj = Objective(model, info.loss, X, y, train=False)
    value, g = obj.value_and_grad(theta)
    assert np.isfinite(value) and np.isfinite(g).all() and g.shape == theta.shape
    v = r.standard_normal(theta.size)
    eps = 1e-6
    fd = (obj.value(theta + eps * v) - obj.value(theta - eps * v)) / (2 * eps)
    assert abs(g @ v - fd) <= 1e-6 * max(1.0, abs(fd))


def test_bn_variants_train_step():
    model = build_model("lenet-digits", batchnorm=True)
    r = np.random.default_rng(1)
    X = r.standard_normal((6, 1, 8, 8))
    obj = Objective(model, "softmax_ce", X, r.integers(0, 10, 6), train=True)
    theta = model.init(0, scheme="he")
    assert np.isfinite(obj.hvp(theta, np.ones_like(theta))).all()


def test_resnet20_forward_backward_shapes():
    model = build_model("resnet20")
    X = np.random.default_rng(2).standard_normal((2, 3, 32, 32))
    theta = model.init(0, scheme="he")
    obj = Objective(model, "softmax_ce", X, np.array([1, 7]))
    p = obj.at(theta)
    assert p.z.shape == (2, 10) and np.isfinite(p.grad).all()
