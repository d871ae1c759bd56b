"""The papers' networks, plus reduced variants for the small data sets (8×8 digits, MNIST-1D).

Every builder has the signature ``builder(input_shape, n_outputs, width=1.0, **kw)`` and returns a
:class:`~qnref.nn.model.Sequential`; ``width`` scales every hidden width / channel count
(rounded, at least 1). :data:`MODELS` maps a name to ``(builder, description, default input
shape, default loss)``; :func:`build_model` looks names up (case-insensitive, with suggestions for
typos). Where a paper recommends an initialisation, the model carries it as ``model.init_kwargs``
(pass it on: ``model.init(seed, **model.init_kwargs)``).

Papers (full text in the project's shared/papers folder):

- [LSR1]  Ramamurthy & Duffy, "L-SR1: a second order optimization method for deep learning"
  (2017): LeNet5 on MNIST and its CIFAR-10 variant, with and without batch normalization
  (Appendix, "Network architectures"), ResNet-20 (§4.2, the CIFAR net of He et al. §4.2, n = 3);
- [SOC]   "A comparison of second-order methods for deep convolutional neural networks" (ICLR 2018
  submission): LeNet with 20, 50 5×5 filters and AlexNet-like with 64, 64, 128 5×5 filters, tanh
  unless stated (§3.2); the AlexNet with its last conv replaced by a residual block (§4.3);
- [REN]   Yi Ren, PhD thesis (Columbia 2022) on K-BFGS, TNT and SMW: the MNIST, FACES and CURVES
  autoencoders (Table 2.4 / Table 3.6), VGG16 with BN and one FC layer and ResNet32 / ResNet32-4
  (§3.7.2, §4.7.2), the SMW classification MLPs (§5.8);
- [SQN]   Berahas, Jahani & Takáč, "Quasi-Newton methods for deep learning: forget the past, just
  sample" (OPT 2019 poster): the toy classification nets small / medium / large with sigmoid
  activations and d = 36 / 176 / 908 parameters (Numerical results, table);
- [HE]    He, Zhang, Ren & Sun, "Deep residual learning for image recognition" (2016) §4.2: CIFAR
  ResNets with 6n + 2 layers, option-A (zero-padding) shortcuts, 0.27M (n=3) / 0.46M (n=5);
- [DOBS]  Schneider, Balles & Hennig, "DeepOBS" (ICLR 2019): the 3c3d CIFAR net; [ACNN]
  Springenberg et al., "Striving for simplicity: the all convolutional net" (ICLR 2015 workshop):
  All-CNN-C. These two are *not* in the thesis text shipped with the project; they are the standard
  CNN test problems of the second-order literature that the project's brief lists with it.

Convolutions always carry a bias (the homogeneous column of W̄), also before a BatchNorm, so
counts with BN are a few hundred parameters above those of bias-free implementations; the table
in docs/cnn.md lists every count.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, NamedTuple, Sequence

from .. import validate as check
from .activations import activation as make_activation
from .base import Layer
from .conv import Conv2d
from .dense import Dense
from .model import Sequential
from .norm import BatchNorm
from .pool import GlobalAvgPool, MaxPool2d
from .reshape import Flatten
from .residual import Residual, basic_block

Shape = tuple[int, ...]


class ModelInfo(NamedTuple):
    builder: Callable[..., Sequential]
    description: str
    input_shape: Shape
    loss: str


def _w(n: int, width: float) -> int:
    """A width-scaled size, at least 1."""
    width = check.number("width", width, 0, 1e6, lo_open=True)
    return max(1, int(round(n * width)))


def _sizes(name: str, sizes: Any) -> tuple[int, ...]:
    """Layer sizes given by the user: a non-empty sequence of integers ≥ 1 (``hidden=(0,)``,
    ``(-4,)``, ``(2.5,)``, ``"100"`` are refused by name)."""
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise check.ValidationError(name, sizes, "a sequence of integers ≥ 1, e.g. (100,)")
    return tuple(check.integer(f"{name}[{i}]", h, 1, 10**8) for i, h in enumerate(sizes))


def _flags(**flags: Any) -> None:
    for k, v in flags.items():
        check.boolean(k, v)


def _flat(shape: Sequence[int]) -> list[Layer]:
    return [Flatten()] if len(shape) != 1 else []


def _size(shape: Sequence[int]) -> int:
    s = 1
    for d in shape:
        s *= int(d)
    return s


def _unknown(kw: dict, who: str) -> None:
    if kw:
        raise TypeError(f"{who}() got unexpected keyword arguments {sorted(kw)}")


# -- fully connected ------------------------------------------------------------------------------
def mlp(input_shape: Shape = (40,), n_outputs: int = 10, width: float = 1.0, *, hidden: Sequence[int] = (100,), activation: str = "relu", name: str = "mlp", **kw) -> Sequential:
    """Multi-layer perceptron ``input → hidden… → n_outputs`` (linear output, flattens image inputs).

    Default: one hidden layer of 100 ReLU units on MNIST-1D's 40 features (10 classes). The SMW
    experiments of [REN] §5.8 are ``hidden=(500,), activation="sigmoid"`` on MNIST (784-500-10)
    and ``hidden=(400, 400)`` on CIFAR-10 (3072-400-400-10).
    """
    _unknown(kw, "mlp")
    layers: list[Layer] = _flat(input_shape)
    for h in _sizes("hidden", hidden):
        layers += [Dense(_w(h, width)), make_activation(activation)]
    layers.append(Dense(n_outputs))
    return Sequential(layers, input_shape, name=name)


_TOY_HIDDEN = {"small": (2, 2, 2, 2, 2), "medium": (4, 8, 8, 4, 2), "large": (10, 20, 20, 10, 2)}


def toy_net(input_shape: Shape = (2,), n_outputs: int = 2, width: float = 1.0, *, size: str = "small", activation: str = "sigmoid", **kw) -> Sequential:
    """[SQN] toy classification nets (Numerical results): 5 sigmoid hidden layers, 2 classes.

    The poster's table lists small 2-2-2-2-2 (d = 36), medium 2-4-8-8-4-2 (d = 176) and large
    2-10-20-20-10-2 (d = 908). Its code (OptMLGroup/SQN, ``network.py``) builds six fully connected
    layers ``2 → FC1 … FC5 → 2`` with hidden widths (2,2,2,2,2), (4,8,8,4,2), (10,20,20,10,2);
    those reproduce the stated d exactly, so they are used here. Initialisation in the code:
    N(0, (1/d)²) on every parameter; ``model.init_kwargs`` draws the weights so (qnref starts biases at 0).
    """
    _unknown(kw, "toy_net")
    if size not in _TOY_HIDDEN:
        raise ValueError(f"toy_net size must be one of {sorted(_TOY_HIDDEN)}, got {size!r}")
    model = mlp(input_shape, n_outputs, width, hidden=_TOY_HIDDEN[size], activation=activation, name=f"toy-{size}")
    model.init_kwargs = {"scheme": "gaussian", "std": 1.0 / model.n_params}
    return model


def autoencoder(input_shape: Shape = (784,), n_outputs: int | None = None, width: float = 1.0, *, sizes: Sequence[int] = (1000, 500, 250, 30), activation: str = "relu", name: str = "autoencoder", **kw) -> Sequential:
    """Deep autoencoder ``input → sizes… → reversed(sizes[:-1])… → input`` ([REN] Table 2.4).

    ``sizes`` lists the encoder widths down to the code layer; the code layer is linear, every other
    hidden layer uses ``activation`` (ReLU in [REN]; Hinton & Salakhutdinov and Martens 2010 used
    sigmoids) and the output is linear: logits for ``sigmoid_ce`` (the thesis' sigmoid + binary
    entropy) or the prediction for ``mse``. The code-layer width is not scaled by ``width``.
    """
    _unknown(kw, "autoencoder")
    sizes = _sizes("sizes", sizes)
    if not sizes:
        raise check.ValidationError("sizes", sizes, "a non-empty sequence of integers ≥ 1")
    d = _size(input_shape)
    n_out = d if n_outputs is None else n_outputs
    enc = [_w(s, width) for s in sizes[:-1]] + [int(sizes[-1])]
    layers: list[Layer] = _flat(input_shape)
    for s in enc[:-1]:
        layers += [Dense(s), make_activation(activation)]
    layers.append(Dense(enc[-1]))  # linear code layer
    for s in reversed(enc[:-1]):
        layers += [Dense(s), make_activation(activation)]
    layers.append(Dense(n_out))
    return Sequential(layers, input_shape, name=name)


# -- LeNet / AlexNet-like ---------------------------------------------------------------------------------
def lenet5_lsr1(input_shape: Shape = (1, 28, 28), n_outputs: int = 10, width: float = 1.0, *, batchnorm: bool = False, **kw) -> Sequential:
    """[LSR1] Appendix, MNIST: LeNet5 with or without batch normalization.

    conv 5×5 20 (stride 1, pad 0) + ReLU → [BN] → max-pool 2 → conv 5×5 50 + ReLU → [BN] →
    max-pool 2 → FC 500 + tanh → [BN] → FC 10. 431,080 parameters on MNIST (+1,140 with BN).
    The paper initialises with N(0, 0.1²) weights and zero biases (``model.init_kwargs``).
    """
    _unknown(kw, "lenet5_lsr1")
    bn = (lambda: [BatchNorm()]) if batchnorm else (lambda: [])
    layers: list[Layer] = [Conv2d(_w(20, width), 5), make_activation("relu"), *bn(), MaxPool2d(2),
                           Conv2d(_w(50, width), 5), make_activation("relu"), *bn(), MaxPool2d(2),
                           Flatten(), Dense(_w(500, width)), make_activation("tanh"), *bn(), Dense(n_outputs)]
    model = Sequential(layers, input_shape, name="lenet5-mnist" + ("-bn" if batchnorm else ""))
    model.init_kwargs = {"scheme": "gaussian", "std": 0.1}
    return model


def lenet_cifar_lsr1(input_shape: Shape = (3, 32, 32), n_outputs: int = 10, width: float = 1.0, *, batchnorm: bool = False, **kw) -> Sequential:
    """[LSR1] Appendix, CIFAR10: the modified LeNet5 with or without batch normalization.

    conv 5×5 32 pad 2 + ReLU → [BN] → max-pool 2 → ReLU → conv 5×5 32 pad 2 + ReLU → [BN] →
    max-pool 2 → conv 5×5 64 pad 2 + ReLU → [BN] → max-pool 2 → FC 64 + ReLU → [BN] → FC 10
    (the extra ReLU after the first pool is in the paper's list). 145,578 parameters on CIFAR-10.
    """
    _unknown(kw, "lenet_cifar_lsr1")
    bn = (lambda: [BatchNorm()]) if batchnorm else (lambda: [])
    relu = lambda: make_activation("relu")  # noqa: E731
    layers: list[Layer] = [Conv2d(_w(32, width), 5, padding=2), relu(), *bn(), MaxPool2d(2), relu(),
                           Conv2d(_w(32, width), 5, padding=2), relu(), *bn(), MaxPool2d(2),
                           Conv2d(_w(64, width), 5, padding=2), relu(), *bn(), MaxPool2d(2),
                           Flatten(), Dense(_w(64, width)), relu(), *bn(), Dense(n_outputs)]
    return Sequential(layers, input_shape, name="lenet-cifar10" + ("-bn" if batchnorm else ""))


def lenet_soc(input_shape: Shape = (1, 28, 28), n_outputs: int = 10, width: float = 1.0, *, activation: str = "tanh", hidden: int = 500, **kw) -> Sequential:
    """[SOC] §3.2: LeNet with 2 conv layers of 20 and 50 5×5 filters (tanh by default).

    The paper gives only the filters; the rest follows LeNet5 / Caffe's LeNet: max-pool 2 after
    each conv, FC ``hidden`` (500) + activation, FC 10. 431,080 parameters on MNIST, 657,080 on
    CIFAR-10.
    """
    _unknown(kw, "lenet_soc")
    hidden = check.integer("hidden", hidden, 1, 10**8)
    act = lambda: make_activation(activation)  # noqa: E731
    layers: list[Layer] = [Conv2d(_w(20, width), 5), act(), MaxPool2d(2), Conv2d(_w(50, width), 5), act(), MaxPool2d(2),
                           Flatten(), Dense(_w(hidden, width)), act(), Dense(n_outputs)]
    return Sequential(layers, input_shape, name="lenet")


def alexnet_soc(input_shape: Shape = (3, 32, 32), n_outputs: int = 10, width: float = 1.0, *, activation: str = "tanh", residual: bool = False, **kw) -> Sequential:
    """[SOC] §3.2: "AlexNet" with 3 conv layers of 64, 64, 128 5×5 filters (tanh by default).

    The paper gives only the filters; here each conv (pad 2) is followed by the activation and a
    2×2 max-pool, then one FC layer to the classes. ``residual=True`` is the ablation of §4.3 / Fig.
    11: the last conv becomes a residual block [conv 5×5 128 → act → conv 5×5 128] with an identity
    link (zero-padded from 64 to 128 channels, parameter-free) and the activation after the sum.
    ``activation="relu"`` is the ReLU ablation of Fig. 10. 332,746 parameters on CIFAR-10 (742,474
    with ``residual=True``).
    """
    _unknown(kw, "alexnet_soc")
    act = lambda: make_activation(activation)  # noqa: E731
    c1, c2, c3 = _w(64, width), _w(64, width), _w(128, width)
    layers: list[Layer] = [Conv2d(c1, 5, padding=2), act(), MaxPool2d(2), Conv2d(c2, 5, padding=2), act(), MaxPool2d(2)]
    if residual:
        layers += [Residual([Conv2d(c3, 5, padding=2), act(), Conv2d(c3, 5, padding=2)], shortcut="pad", activation=activation)]
    else:
        layers += [Conv2d(c3, 5, padding=2), act()]
    layers += [MaxPool2d(2), Flatten(), Dense(n_outputs)]
    return Sequential(layers, input_shape, name="alexnet-small" + ("-res" if residual else ""))


# -- ResNets and VGG ----------------------------------------------------------------------------------------
def resnet_cifar(input_shape: Shape = (3, 32, 32), n_outputs: int = 10, width: float = 1.0, *, depth: int = 20, shortcut: str = "pad", activation: str = "relu", **kw) -> Sequential:
    """[HE] §4.2 CIFAR ResNet with 6n + 2 layers (ResNet-20: n = 3, [LSR1] §4.2; ResNet-32: n = 5, [REN] §3.7.2).

    conv 3×3 16 → BN → ReLU → 3 stages of n basic blocks with 16, 32, 64 channels (× ``width``;
    ResNet32-4 of [REN] is ``width=4``), stride 2 at the first block of stages 2 and 3 → global
    average pool → FC. Shortcuts: "pad" = option A (identity with zero-padded channels; the paper's
    0.27M / 0.46M counts) or "projection" = option B (1×1 conv + BN where the shape changes).
    ResNet-20: 270,410 parameters on CIFAR-10 (He et al.: 0.27M), ResNet-32: 465,290 (0.46M).
    """
    _unknown(kw, "resnet_cifar")
    depth = check.integer("depth", depth, 8)
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    chans = [_w(16, width), _w(32, width), _w(64, width)]
    layers: list[Layer] = [Conv2d(chans[0], 3, padding=1), BatchNorm(), make_activation(activation)]
    for stage, c in enumerate(chans):
        for b in range(n):
            stride = 2 if (stage > 0 and b == 0) else 1
            layers.append(basic_block(c, stride, shortcut=shortcut, activation=activation))
    layers += [GlobalAvgPool(), Dense(n_outputs)]
    return Sequential(layers, input_shape, name=f"resnet{depth}" + (f"-{width:g}" if width != 1 else ""))


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16(input_shape: Shape = (3, 32, 32), n_outputs: int = 10, width: float = 1.0, *, batchnorm: bool = True, **kw) -> Sequential:
    """[REN] §3.7.2 / §4.7.2: VGG16 ("model D" of Simonyan & Zisserman) with BN after every conv and one FC.

    13 conv 3×3 (pad 1) layers 64, 64, M, 128, 128, M, 256×3, M, 512×3, M, 512×3, M (M = 2×2
    max-pool), each followed by BN and ReLU; then one FC layer from the flattened features to the
    classes. 14,728,266 parameters on CIFAR-10 (14,719,818 without BN).
    """
    _unknown(kw, "vgg16")
    layers: list[Layer] = []
    for v in _VGG16:
        if v == "M":
            layers.append(MaxPool2d(2))
        else:
            layers += [Conv2d(_w(v, width), 3, padding=1)] + ([BatchNorm()] if batchnorm else []) + [make_activation("relu")]
    layers += [Flatten(), Dense(n_outputs)]
    return Sequential(layers, input_shape, name="vgg16")


def c3d3(input_shape: Shape = (3, 32, 32), n_outputs: int = 10, width: float = 1.0, **kw) -> Sequential:
    """[DOBS] cifar10_3c3d: three conv and three dense layers.

    conv 5×5 64 (valid) + ReLU → max-pool 3×3 s2 → conv 3×3 96 (valid) + ReLU → max-pool 3×3 s2 →
    conv 3×3 128 (same) + ReLU → max-pool 3×3 s2 → FC 512 + ReLU → FC 256 + ReLU → FC 10.
    DeepOBS pools with TensorFlow "same" padding; here pad 1, which gives the same sizes
    (28 → 14, 12 → 6, 6 → 3) for 32×32 inputs. 895,210 parameters on CIFAR-10.
    """
    _unknown(kw, "c3d3")
    relu = lambda: make_activation("relu")  # noqa: E731
    layers: list[Layer] = [Conv2d(_w(64, width), 5), relu(), MaxPool2d(3, 2, 1),
                           Conv2d(_w(96, width), 3), relu(), MaxPool2d(3, 2, 1),
                           Conv2d(_w(128, width), 3, padding=1), relu(), MaxPool2d(3, 2, 1),
                           Flatten(), Dense(_w(512, width)), relu(), Dense(_w(256, width)), relu(), Dense(n_outputs)]
    return Sequential(layers, input_shape, name="3c3d")


def allcnnc(input_shape: Shape = (3, 32, 32), n_outputs: int = 10, width: float = 1.0, **kw) -> Sequential:
    """[ACNN] All-CNN-C (Springenberg et al. 2015, Table 2 model C; DeepOBS cifar100_allcnnc), no dropout.

    conv 3×3 96 ×2 → conv 3×3 96 stride 2 → conv 3×3 192 ×2 → conv 3×3 192 stride 2 →
    conv 3×3 192 (valid) → conv 1×1 192 → conv 1×1 n_outputs → global average pool; ReLU after
    every conv but the last ("same" padding = pad 1 elsewhere). 1,369,738 parameters for 10 classes.
    """
    _unknown(kw, "allcnnc")
    relu = lambda: make_activation("relu")  # noqa: E731
    a, b = _w(96, width), _w(192, width)
    layers: list[Layer] = [Conv2d(a, 3, padding=1), relu(), Conv2d(a, 3, padding=1), relu(), Conv2d(a, 3, stride=2, padding=1), relu(),
                           Conv2d(b, 3, padding=1), relu(), Conv2d(b, 3, padding=1), relu(), Conv2d(b, 3, stride=2, padding=1), relu(),
                           Conv2d(b, 3), relu(), Conv2d(b, 1), relu(), Conv2d(n_outputs, 1), GlobalAvgPool()]
    return Sequential(layers, input_shape, name="allcnnc")


def netdnn(input_shape: Shape = (1, 28, 28), n_outputs: int = 10, width: float = 1.0, *, activation: str = "relu", **kw) -> Sequential:
    """[MB] Table 1 "NetDNN": the MNIST network of the MB-LSR1 comparison, d = 59.9k, conv+FC, 4 layers.

    The text gives only those three facts (Table 1; §5.2 trains it on MNIST). The layout here is *our
    reconstruction* with exactly that count, a LeNet-style pair of conv layers and a pair of FC layers:
    conv 5×5 32 (valid) + act → max-pool 2 → conv 5×5 32 (valid) + act → max-pool 2 → FC 64 + act → FC 10.
    On MNIST: 832 + 25,632 + 32,832 + 650 = 59,946 parameters (59.9k). ReLU by default (the text names no
    activation; its other network, ResNet20, uses ReLU).
    """
    _unknown(kw, "netdnn")
    act = lambda: make_activation(activation)  # noqa: E731
    c, h = _w(32, width), _w(64, width)
    layers: list[Layer] = [Conv2d(c, 5), act(), MaxPool2d(2), Conv2d(c, 5), act(), MaxPool2d(2),
                           Flatten(), Dense(h), act(), Dense(n_outputs)]
    return Sequential(layers, input_shape, name="netdnn")


def resnet18(input_shape: Shape = (3, 32, 32), n_outputs: int = 10, width: float = 1.0, *, stem: str = "cifar", activation: str = "relu", **kw) -> Sequential:
    """[SOC] §3.2 "18-layer Deep Residual Network (DRN) (He et al., 2016)": ResNet-18 of He et al. Table 1.

    Four stages of two basic blocks (3×3 convs, BN, ``activation``) with 64, 128, 256, 512 channels (× ``width``),
    stride 2 at the first block of stages 2–4 with projection shortcuts (option B, 1×1 conv + BN, as in He et
    al.'s ImageNet ResNets), global average pool, one FC: 1 + 16 + 1 = 18 weight layers. ``stem="cifar"``
    (default) is the usual 32×32 adaptation — conv 3×3 64 stride 1 + BN + act, no max-pool — the one that reaches
    the ≈93 % CIFAR-10 accuracy the text reports for its DRN with augmentation and momentum (§3.2);
    ``stem="imagenet"`` is He et al.'s conv 7×7 64 stride 2 + BN + act + max-pool 3×3 stride 2. ReLU is the text's
    "regular DRN" (Fig. 9). 11,178,762 parameters for CIFAR-10 with the cifar stem: the common bias-free
    implementation's 11,173,962 plus the 4,800 conv biases qnref always carries (module docstring).
    """
    _unknown(kw, "resnet18")
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"resnet18 stem must be 'cifar' (3×3 conv, no pool) or 'imagenet' (7×7/2 conv + 3×3/2 pool), got {stem!r}")
    chans = [_w(c, width) for c in (64, 128, 256, 512)]
    if stem == "cifar":
        layers: list[Layer] = [Conv2d(chans[0], 3, padding=1), BatchNorm(), make_activation(activation)]
    else:
        layers = [Conv2d(chans[0], 7, stride=2, padding=3), BatchNorm(), make_activation(activation), MaxPool2d(3, 2, 1)]
    for stage, c in enumerate(chans):
        for b in range(2):
            stride = 2 if (stage > 0 and b == 0) else 1
            layers.append(basic_block(c, stride, shortcut="projection", activation=activation))
    layers += [GlobalAvgPool(), Dense(n_outputs)]
    return Sequential(layers, input_shape, name="resnet18" + ("" if stem == "cifar" else "-imagenet-stem"))


# -- reduced variants (digits 1×8×8, MNIST-1D 40 features) ------------------------------------------------
def lenet_digits(input_shape: Shape = (1, 8, 8), n_outputs: int = 10, width: float = 1.0, *, batchnorm: bool = False, activation: str = "relu", **kw) -> Sequential:
    """Reduced LeNet for 8×8 digits: conv 3×3 8 (pad 1) + act → [BN] → max-pool 2 → conv 3×3 16
    (pad 1) + act → [BN] → max-pool 2 → FC 10. 1,898 parameters (+48 with BN)."""
    _unknown(kw, "lenet_digits")
    bn = (lambda: [BatchNorm()]) if batchnorm else (lambda: [])
    layers: list[Layer] = [Conv2d(_w(8, width), 3, padding=1), make_activation(activation), *bn(), MaxPool2d(2),
                           Conv2d(_w(16, width), 3, padding=1), make_activation(activation), *bn(), MaxPool2d(2),
                           Flatten(), Dense(n_outputs)]
    return Sequential(layers, input_shape, name="lenet-digits" + ("-bn" if batchnorm else ""))


def resnet_digits(input_shape: Shape = (1, 8, 8), n_outputs: int = 10, width: float = 1.0, *, shortcut: str = "projection", activation: str = "relu", **kw) -> Sequential:
    """Reduced ResNet for 8×8 digits: conv 3×3 8 → BN → ReLU → basic block 8 → basic block 16
    (stride 2, projection shortcut by default) → global average pool → FC 10."""
    _unknown(kw, "resnet_digits")
    c1, c2 = _w(8, width), _w(16, width)
    layers: list[Layer] = [Conv2d(c1, 3, padding=1), BatchNorm(), make_activation(activation),
                           basic_block(c1, 1, shortcut=shortcut, activation=activation),
                           basic_block(c2, 2, shortcut=shortcut, activation=activation),
                           GlobalAvgPool(), Dense(n_outputs)]
    return Sequential(layers, input_shape, name="resnet-digits")


def cnn_mnist1d(input_shape: Shape = (1, 1, 40), n_outputs: int = 10, width: float = 1.0, *, activation: str = "relu", **kw) -> Sequential:
    """Reduced 1-D CNN for MNIST-1D as 2-D convs with 1×5 kernels: inputs are ``X.reshape(N, 1, 1, 40)``.

    conv 1×5 16 (pad 2) + act → conv 1×5 16 stride 2 (pad 2) + act → conv 1×5 16 stride 2 (pad 2)
    + act → FC 10 (in the spirit of the MNIST-1D baselines of Greydanus 2020; not a paper model).
    """
    _unknown(kw, "cnn_mnist1d")
    c = _w(16, width)
    act = lambda: make_activation(activation)  # noqa: E731
    layers: list[Layer] = [Conv2d(c, (1, 5), padding=(0, 2)), act(), Conv2d(c, (1, 5), stride=(1, 2), padding=(0, 2)), act(),
                           Conv2d(c, (1, 5), stride=(1, 2), padding=(0, 2)), act(), Flatten(), Dense(n_outputs)]
    return Sequential(layers, input_shape, name="cnn-mnist1d")


def _partial(fn: Callable[..., Sequential], **fixed: Any) -> Callable[..., Sequential]:
    def builder(input_shape: Shape, n_outputs: int | None = None, width: float = 1.0, **kw: Any) -> Sequential:
        args = {**fixed, **kw}
        if n_outputs is None:
            return fn(input_shape, width=width, **args)
        return fn(input_shape, n_outputs, width, **args)

    builder.__name__ = fn.__name__
    builder.__doc__ = fn.__doc__
    return builder


MODELS: dict[str, ModelInfo] = {
    "mlp": ModelInfo(_partial(mlp), "MLP, hidden sizes via hidden=(…); default 40-100-10 for MNIST-1D", (40,), "softmax_ce"),
    "toy-small": ModelInfo(_partial(toy_net, size="small"), "[SQN] toy net 2-2-2-2-2-2-2, sigmoid, d = 36", (2,), "softmax_ce"),
    "toy-medium": ModelInfo(_partial(toy_net, size="medium"), "[SQN] toy net 2-4-8-8-4-2-2, sigmoid, d = 176", (2,), "softmax_ce"),
    "toy-large": ModelInfo(_partial(toy_net, size="large"), "[SQN] toy net 2-10-20-20-10-2-2, sigmoid, d = 908", (2,), "softmax_ce"),
    "autoencoder-mnist": ModelInfo(_partial(autoencoder, sizes=(1000, 500, 250, 30), name="autoencoder-mnist"),
                                   "[REN] Table 2.4 MNIST autoencoder 784-1000-500-250-30-…-784, ReLU", (784,), "sigmoid_ce"),
    "autoencoder-faces": ModelInfo(_partial(autoencoder, sizes=(2000, 1000, 500, 30), name="autoencoder-faces"),
                                   "[REN] Table 2.4 FACES autoencoder 625-2000-1000-500-30-…-625, ReLU", (625,), "mse"),
    "autoencoder-curves": ModelInfo(_partial(autoencoder, sizes=(400, 200, 100, 50, 25, 6), name="autoencoder-curves"),
                                    "[REN] Table 2.4 CURVES autoencoder 784-400-200-100-50-25-6-…-784, ReLU", (784,), "sigmoid_ce"),
    "autoencoder-digits": ModelInfo(_partial(autoencoder, sizes=(32, 16, 8), name="autoencoder-digits"),
                                    "reduced autoencoder 64-32-16-8-16-32-64 for 8×8 digits (pixels/16)", (64,), "sigmoid_ce"),
    "lenet5-mnist": ModelInfo(_partial(lenet5_lsr1), "[LSR1] LeNet5 for MNIST, no BN", (1, 28, 28), "softmax_ce"),
    "lenet5-mnist-bn": ModelInfo(_partial(lenet5_lsr1, batchnorm=True), "[LSR1] LeNet5 for MNIST with batch normalization", (1, 28, 28), "softmax_ce"),
    "lenet-cifar10": ModelInfo(_partial(lenet_cifar_lsr1), "[LSR1] LeNet-like CIFAR-10 net (32-32-64 5×5 convs, FC 64), no BN", (3, 32, 32), "softmax_ce"),
    "lenet-cifar10-bn": ModelInfo(_partial(lenet_cifar_lsr1, batchnorm=True), "[LSR1] LeNet-like CIFAR-10 net with batch normalization", (3, 32, 32), "softmax_ce"),
    "lenet": ModelInfo(_partial(lenet_soc), "[SOC] LeNet, 20 and 50 5×5 filters, FC 500, tanh", (1, 28, 28), "softmax_ce"),
    "alexnet-small": ModelInfo(_partial(alexnet_soc), "[SOC] AlexNet-like, 64-64-128 5×5 filters, tanh (residual=True: §4.3 ablation)", (3, 32, 32), "softmax_ce"),
    "resnet20": ModelInfo(_partial(resnet_cifar, depth=20), "[HE]/[LSR1] CIFAR ResNet-20, option-A shortcuts (0.27M)", (3, 32, 32), "softmax_ce"),
    "resnet32": ModelInfo(_partial(resnet_cifar, depth=32), "[HE]/[REN] CIFAR ResNet-32 (0.46M); width=4 is ResNet32-4", (3, 32, 32), "softmax_ce"),
    "vgg16": ModelInfo(_partial(vgg16), "[REN] VGG16 with BN after every conv and one FC layer", (3, 32, 32), "softmax_ce"),
    "3c3d": ModelInfo(_partial(c3d3), "[DOBS] 3c3d CIFAR-10 net: 3 conv + 3 dense layers", (3, 32, 32), "softmax_ce"),
    "allcnnc": ModelInfo(_partial(allcnnc), "[ACNN] All-CNN-C (no dropout), configurable width", (3, 32, 32), "softmax_ce"),
    "netdnn": ModelInfo(_partial(netdnn), "[MB] Table 1 NetDNN for MNIST, 59.9k: conv 5×5 32, conv 5×5 32, FC 64, FC 10 (layout reconstructed)", (1, 28, 28), "softmax_ce"),
    "resnet18": ModelInfo(_partial(resnet18), "[SOC] DRN-18: He et al. ResNet-18 for 32×32 (3×3 stem, projection shortcuts)", (3, 32, 32), "softmax_ce"),
    "lenet-digits": ModelInfo(_partial(lenet_digits), "reduced LeNet for 8×8 digits (batchnorm=True adds BN)", (1, 8, 8), "softmax_ce"),
    "resnet-digits": ModelInfo(_partial(resnet_digits), "reduced ResNet (2 basic blocks, BN) for 8×8 digits", (1, 8, 8), "softmax_ce"),
    "cnn-mnist1d": ModelInfo(_partial(cnn_mnist1d), "reduced 1×5-kernel CNN for MNIST-1D reshaped to (1, 1, 40)", (1, 1, 40), "softmax_ce"),
}


def model_names() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, input_shape: Sequence[int] | None = None, n_outputs: int | None = None, width: float = 1.0, **kw: Any) -> Sequential:
    """Build the registered model ``name`` (see :data:`MODELS`).

    ``input_shape`` defaults to the registry's (e.g. (3, 32, 32) for CIFAR nets), ``n_outputs`` to
    the builder's (10 classes, 2 for the toy nets, the input size for autoencoders); ``width``
    scales hidden sizes; other keywords go to the builder (``batchnorm=``, ``activation=``,
    ``shortcut=``, ``hidden=``, …).
    """
    key = str(name).lower()
    if key not in MODELS:
        close = difflib.get_close_matches(key, list(MODELS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} Known models: {', '.join(model_names())}")
    info = MODELS[key]
    if input_shape is None:
        shape = tuple(info.input_shape)
    elif isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence) or not input_shape:
        raise check.ValidationError("input_shape", input_shape, "a non-empty sequence of integers ≥ 1, e.g. (1, 28, 28)")
    else:
        shape = tuple(check.integer(f"input_shape[{i}]", d, 1, 10**9) for i, d in enumerate(input_shape))
    if n_outputs is not None:
        n_outputs = check.integer("n_outputs", n_outputs, 1, 10**8)
    check.number("width", width, 0, 1e6, lo_open=True)
    _flags(**{k: v for k, v in kw.items() if k in ("batchnorm", "residual")})
    for k in ("activation", "shortcut", "size"):
        if k in kw and not isinstance(kw[k], str):
            raise check.ValidationError(k, kw[k], "a name (str)")
    return info.builder(shape, n_outputs, width, **kw)


def model_table() -> list[dict]:
    """One row per registered model: name, parameter count, input shape, loss, description."""
    rows = []
    for name in model_names():
        info = MODELS[name]
        m = build_model(name)
        rows.append({"name": name, "n_params": m.n_params, "input_shape": info.input_shape, "loss": info.loss, "description": info.description})
    return rows
