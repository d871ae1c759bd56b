"""Loss conventions: torch loss modules ⇄ qnref losses.

qnref's objective is always the batch **mean** of a per-example loss ℓᵢ:

* ``softmax_ce``: ℓᵢ = −Σₖ yᵢₖ log softmax(zᵢ)ₖ (labels or probability rows);
* ``mse``:        ℓᵢ = ½ ‖zᵢ − yᵢ‖² summed over all outputs;
* ``sigmoid_ce``: ℓᵢ = Σₖ softplus(zᵢₖ) − yᵢₖ zᵢₖ summed over all outputs.

A torch loss equals c · f_qnref with the constant c below (N examples, C = outputs per example):

==============================================  ==============  ==========
torch                                           qnref           c
==============================================  ==============  ==========
``CrossEntropyLoss(reduction="mean")``          softmax_ce      1
``CrossEntropyLoss(reduction="sum")``           softmax_ce      N
``MSELoss(reduction="mean")``                   mse             2 / C
``MSELoss(reduction="sum")``                    mse             2 N
``BCEWithLogitsLoss(reduction="mean")``         sigmoid_ce      1 / C
``BCEWithLogitsLoss(reduction="sum")``          sigmoid_ce      N
==============================================  ==============  ==========

(``CrossEntropyLoss`` with probability targets and ``reduction="mean"`` divides by N as well, so
c = 1 there too.) Class weights, ``label_smoothing``, ``pos_weight`` and ``reduction="none"`` have
no qnref counterpart and raise. Every gradient, Hessian, GGN and Fisher product scales by the same
c, so comparisons divide torch's results by c.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

QNREF_LOSSES = ("softmax_ce", "mse", "sigmoid_ce")
_ALIASES = {"ce": "softmax_ce", "bce": "sigmoid_ce"}


def qnref_loss_torch(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """qnref's loss ``name`` written in torch: f(z, y) = mean over the batch of ℓᵢ."""
    name = _ALIASES.get(name, name)
    if name == "softmax_ce":
        return lambda z, y: F.cross_entropy(z, y, reduction="mean")
    if name == "mse":
        return lambda z, y: 0.5 * ((z - y) ** 2).sum() / z.shape[0]
    if name == "sigmoid_ce":
        return lambda z, y: F.binary_cross_entropy_with_logits(z, y, reduction="sum") / z.shape[0]
    raise ValueError(f"unknown qnref loss {name!r}; choose one of {QNREF_LOSSES}")


def resolve_loss(loss: Any) -> tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[int, int], float]]:
    """(qnref name, torch loss function, scale c(N, C)) with torch_loss = c · f_qnref.

    ``loss`` is a qnref name ("softmax_ce", "mse", "sigmoid_ce") — then the torch function is the
    same convention and c = 1 — or one of the torch modules listed in the module docstring.
    """
    if isinstance(loss, str):
        name = _ALIASES.get(loss, loss)
        return name, qnref_loss_torch(name), lambda n, c: 1.0
    red = getattr(loss, "reduction", None)
    if red not in ("mean", "sum"):
        raise ValueError(f"{type(loss).__name__}(reduction={red!r}) has no qnref counterpart; use 'mean' or 'sum'")
    if isinstance(loss, nn.CrossEntropyLoss):
        if loss.weight is not None or loss.label_smoothing:
            raise ValueError("CrossEntropyLoss with class weights or label_smoothing has no qnref counterpart")
        return "softmax_ce", loss, (lambda n, c: 1.0) if red == "mean" else (lambda n, c: float(n))
    if isinstance(loss, nn.MSELoss):
        return "mse", loss, (lambda n, c: 2.0 / c) if red == "mean" else (lambda n, c: 2.0 * n)
    if isinstance(loss, nn.BCEWithLogitsLoss):
        if loss.weight is not None or loss.pos_weight is not None:
            raise ValueError("BCEWithLogitsLoss with weight or pos_weight has no qnref counterpart")
        return "sigmoid_ce", loss, (lambda n, c: 1.0 / c) if red == "mean" else (lambda n, c: float(n))
    raise ValueError(
        f"unsupported loss {loss!r}: pass a qnref loss name {QNREF_LOSSES} or nn.CrossEntropyLoss / nn.MSELoss / "
        "nn.BCEWithLogitsLoss with reduction 'mean' or 'sum'"
    )


def outputs_per_example(z_shape: tuple[int, ...]) -> int:
    return int(math.prod(z_shape[1:]))
