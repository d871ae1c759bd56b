"""Named experiment presets for ``qnref compare --preset NAME``: each paper's experiment at small scale.

A preset fixes the data set, model, loss, epochs, seeds and the list of runs (label, optimizer,
hyperparameters, and optionally a step-size schedule, :mod:`qnref.schedules`). Every run of one
seed starts from the same θ₀. Sizes are reduced so that each preset finishes on a 2-core CPU in
minutes; ``quickstart`` in well under two minutes.

Presets are configs: :func:`qnref.config.preset_to_dict` writes one as the TOML that
``qnref compare --config FILE`` reads (``qnref compare --preset NAME --write-config FILE``), and
every comparison report holds the ``config.toml`` that reruns it.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Run:
    label: str
    optimizer: str
    hyperparameters: dict = field(default_factory=dict)
    schedule: str | None = None  # a qnref.schedules text; None: the preset's schedule


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
    init_std: float = 0.01  # for init="gaussian"
    autoencoder: bool = False  # train to reconstruct the (flattened) inputs
    schedule: str | None = None  # default step-size schedule of the runs (qnref.schedules text)
    val_fraction: float = 0.0  # validation split of the training rows
    early_stopping: str | None = None  # metric watched for early stopping (e.g. "val_loss")
    patience: int = 5  # evaluations without improvement before an early stop
    min_delta: float = 0.0  # smallest change of the early-stopping metric that counts as an improvement
    max_steps: int | None = None  # optimizer-step budget per run
    target: str | None = None  # e.g. "test_acc>=0.9": time/epochs/passes to reach it in the summary
    max_cpu_time: float | None = None  # process CPU-time budget per run [s]
    max_time: float | None = None  # wall-clock budget per run [s]


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


_add(Preset(
    name="lsr1-fig1-digits",
    description="[RD16] Fig. 1 at small scale: LeNet on 8×8 digits; L-SR1-TR and L-BFGS (forgetting every 5) "
                "with minibatch 400 and memory 5 vs first-order methods with minibatch 20",
    paper="Ramamurthy & Duffy 2016, §4.1.1, Fig. 1",
    dataset="digits", model="lenet-digits", epochs=10, seeds=(0, 1), l2=1e-3,
    runs=(
        Run("L-SR1-TR", "lsr1-tr", {"batch_size": 400, "memory": 5}),
        Run("L-BFGS (forget 5)", "lbfgs", {"batch_size": 400, "memory": 5, "forget_every": 5}),
        Run("L-BFGS", "lbfgs", {"batch_size": 400, "memory": 5}),
        Run("NAG", "nag", {"batch_size": 20, "lr": 0.01}),
        Run("SGD", "sgd", {"batch_size": 20, "lr": 0.01}),
        Run("AdaDelta", "adadelta", {"batch_size": 20}),
        Run("Adam", "adam", {"batch_size": 20}),
    ),
))

_add(Preset(
    name="lsr1-fig3-batch1000",
    description="[RD16] Fig. 3 / Table 1 at small scale: LeNet with batch normalization, minibatch 1000",
    paper="Ramamurthy & Duffy 2016, §4.1.3, Fig. 3",
    dataset="digits", model="lenet-digits", model_kwargs={"batchnorm": True}, epochs=20, seeds=(0,), l2=1e-3,
    runs=(
        Run("L-SR1-TR", "lsr1-tr", {"batch_size": 1000}),
        Run("Adam", "adam", {"batch_size": 1000}),
        Run("NAG", "nag", {"batch_size": 1000, "lr": 0.01}),
    ),
))

_add(Preset(
    name="mblsr1-large-batch-digits",
    description="[MB-LSR1] headline at small scale: MB-LSR1 vs L-SSR1-TR vs Adam, MLP 64-32-10 on digits, large batches",
    paper="Griffin et al., §5",
    dataset="digits", dataset_kwargs={"flat": True}, model="mlp", model_kwargs={"hidden": (32,), "activation": "tanh"},
    epochs=15, seeds=(0, 1, 2),
    runs=(
        Run("MB-LSR1", "mb-lsr1", {"batch_size": 512}),
        Run("L-SSR1-TR", "lssr1-tr", {"batch_size": 512}),
        Run("Adam", "adam", {"batch_size": 512, "lr": 0.01}),
    ),
))

_add(Preset(
    name="sqn-poster-toy",
    description="[SQN] poster toy problem: 2-4-8-8-4-2 sigmoid net, two classes of 50 points, full batch",
    paper="Berahas, Jahani & Takáč, numerical results (toy nets)",
    dataset="toy2class", model="toy-medium", init="gaussian", init_std=1.0, epochs=50, seeds=(0, 1, 2), eval_every=5,
    runs=(
        Run("S-LSR1", "s-lsr1", {}),
        Run("S-LBFGS", "s-lbfgs", {}),
        Run("L-SR1-TR", "lsr1-tr", {"batch_size": None}),
        Run("L-BFGS", "lbfgs", {"batch_size": None}),
        Run("GD", "gd-ls", {"batch_size": None}),
        Run("Adam", "adam", {"batch_size": None, "lr": 0.01}),
    ),
))

_add(Preset(
    name="soc-lenet-digits",
    description="Second-order CNN comparison at small scale: Hessian-free (SHG, 20% gradient sample), SQN, "
                "L-SR1 vs SGD and Adam on a LeNet for 8×8 digits",
    paper="second-order CNN comparison, §3–4",
    dataset="digits", model="lenet-digits", epochs=10, seeds=(0,), l2=1e-4,
    runs=(
        Run("SHG (HF)", "hf", {}),
        Run("SQN", "sqn", {}),
        Run("L-SR1-TR", "lsr1-tr", {"batch_size": 400}),
        Run("SGD", "sgd", {"batch_size": 100, "lr": 0.1}),
        Run("Adam", "adam", {"batch_size": 100}),
    ),
))

_add(Preset(
    name="ren-ch2-autoencoder-digits",
    description="[REN] ch. 2 autoencoder experiment at small scale: 64-32-16-8-16-32-64 on digits pixels, "
                "K-BFGS, K-BFGS(L), KFAC vs Adam and SGD-momentum",
    paper="Ren thesis, §2.8, Fig. 2.1",
    dataset="digits", dataset_kwargs={"flat": True}, autoencoder=True, model="autoencoder-digits",
    model_kwargs={"activation": "tanh"}, epochs=10, seeds=(0,),
    runs=(
        Run("K-BFGS", "kbfgs", {"batch_size": 100}),
        Run("K-BFGS(L)", "kbfgs-l", {"batch_size": 100}),
        Run("KFAC", "kfac", {"batch_size": 100, "lr": 0.1, "damping": 0.3}),
        Run("Adam", "adam", {"batch_size": 100}),
        Run("SGD-m", "momentum", {"batch_size": 100, "lr": 0.03}),
    ),
))

_add(Preset(
    name="ren-ch4-cnn-digits",
    description="[REN] ch. 4 CNN comparison at small scale: TNT, Shampoo, KFAC vs SGD-momentum and Adam on a LeNet for digits; "
                "the thesis's ×0.1 decay every 60 (first-order) / 50 (second-order) epochs scaled to 6 / 5 epochs",
    paper="Ren thesis, §4.7, Fig. 4.2",
    dataset="digits", model="lenet-digits", epochs=10, seeds=(0,), schedule="thesis:0.1",
    runs=(
        Run("TNT", "tnt", {"batch_size": 100, "lr": 1e-3, "damping": 0.1, "inv_freq": 1}),
        Run("Shampoo", "shampoo", {"batch_size": 100, "lr": 0.01, "inv_freq": 1}),
        Run("KFAC", "kfac", {"batch_size": 100, "lr": 0.1, "damping": 0.3}),
        Run("SGD-m", "momentum", {"batch_size": 100, "lr": 0.03}),
        Run("Adam", "adam", {"batch_size": 100}),
    ),
))

_add(Preset(
    name="ren-ch5-smw-autoencoder-digits",
    description="[REN] ch. 5 at small scale: SMW-GN and SMW-NG vs HF and SGD on the digits autoencoder",
    paper="Ren thesis, §5.8",
    dataset="digits", dataset_kwargs={"flat": True}, autoencoder=True, model="autoencoder-digits",
    model_kwargs={"activation": "tanh"}, epochs=5, seeds=(0,),
    runs=(
        Run("SMW-GN", "smw-gn", {"curvature_batch": 5, "lr": 0.3}),
        Run("SMW-NG", "smw-ng", {}),
        Run("HF", "hf", {}),
        Run("SGD", "sgd", {"batch_size": 64, "lr": 0.3}),
    ),
))
