"""The network engine: layers, the :class:`Sequential` container, losses and the model zoo.

``from qnref.nn import Dense, Conv2d, BatchNorm, ReLU, Sequential, …`` — the public layers and
containers; the passes every layer supplies are described in :mod:`qnref.nn.base`.
"""
from .activations import Identity, ReLU, Sigmoid, Softplus, Tanh, activation
from .base import Layer
from .conv import Conv2d
from .dense import Dense
from .losses import Loss, MeanSquaredError, SigmoidCrossEntropy, SoftmaxCrossEntropy, get_loss
from .model import Sequential
from .norm import BatchNorm
from .pool import AvgPool2d, GlobalAvgPool, MaxPool2d
from .reshape import Flatten
from .residual import PadShortcut, Residual, basic_block
from .zoo import build_model, model_names

__all__ = [
    "AvgPool2d", "BatchNorm", "Conv2d", "Dense", "Flatten", "GlobalAvgPool", "Identity", "Layer", "Loss",
    "MaxPool2d", "MeanSquaredError", "PadShortcut", "ReLU", "Residual", "Sequential", "Sigmoid",
    "SigmoidCrossEntropy", "Softplus", "SoftmaxCrossEntropy", "Tanh", "activation", "basic_block", "build_model",
    "get_loss", "model_names",
]
