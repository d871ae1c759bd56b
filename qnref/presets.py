"""Named experiment presets for ``qnref compare --preset NAME``: each paper's experiment at small scale.

A preset fixes the data set, model, loss, epochs, seeds and the list of runs (label, optimizer,
hyperparameters). Every run of one seed starts from the same θ₀. Sizes are reduced so that each
preset finishes on a 2-core CPU in minutes; ``quickstart`` in well under two minutes.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Run:
    label: str
    optimizer: str
    hyperparameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    paper: str
    dataset: str
    model: str
    runs: tuple[Run, ...]
    epochs: float = 5.0
    seeds: tuple[int, ...] = (0,)
    l2: float = 0.0
    eval_every: float = 1.0
    model_kwargs: dict = field(default_factory=dict)
    dataset_kwargs: dict = field(default_factory=dict)
    init: str = "glorot"
    loss: str | None = None


PRESETS: dict[str, Preset] = {}


def _add(p: Preset) -> None:
    PRESETS[p.name] = p


_add(Preset(
    name="quickstart",
    description="digits (8×8), MLP 64-32-10 tanh: first-order baselines vs quasi-Newton, trust-region, KFAC and SMW-NG",
    paper="all five texts (a tour)",
    dataset="digits",
    dataset_kwargs={"flat": True},
    model="mlp",
    model_kwargs={"hidden": (32,), "activation": "tanh"},
    epochs=6,
    seeds=(0, 1),
    l2=1e-4,
    eval_every=0.5,
    runs=(
        Run("SGD", "sgd", {"lr": 0.2, "batch_size": 64}),
        Run("Adam", "adam", {"lr": 0.01, "batch_size": 64}),
        Run("L-BFGS", "lbfgs", {"batch_size": 256}),
        Run("L-SR1-TR", "lsr1-tr", {"batch_size": 256}),
        Run("KFAC", "kfac", {"batch_size": 64}),
        Run("SMW-NG", "smw-ng", {"batch_size": 64}),
    ),
))
