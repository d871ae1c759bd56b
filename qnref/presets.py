"""Named experiment presets for ``qnref compare --preset NAME``: the texts' optimizer comparisons, at two scales.

A preset fixes the data set, model, loss, epochs, seeds and the list of runs (label, optimizer,
hyperparameters, and optionally a step-size schedule, :mod:`qnref.schedules`). Every run of one
seed starts from the same θ₀.

Every experiment of the five texts that compares optimizers (the audit's section 4) has

- a **paper-scale** preset ``NAME`` (``scale="paper"``): the text's network, data, batch sizes,
  hyperparameters, metric and budget, reading the real data from ``--data-dir``
  (``qnref compare --preset NAME --data-dir D --dry-run`` checks files, model and settings in
  seconds), and
- a **small** replica (``scale="small"``, ``NAME-small`` or named in ``replica``) on shipped data
  (scikit-learn digits, the toy sets) that finishes in minutes on 2 cores, keeping the text's
  optimizer settings where they are scale-free (learning rates, damping, memory, frequencies) and
  scaling what depends on the data size (batch sizes, epochs) as its ``notes`` say.

``paper`` names the text and its figure/table, ``metric`` the quantity the text reports (one of
:data:`qnref.train.METRICS`), ``notes`` what the text does not give (marked "n/g": our choice) and
every deviation. ``quickstart`` is a tour, not a text's experiment. Old names stay as aliases
(:data:`ALIASES`). The table in docs/presets.md lists every preset.

Presets are configs: :func:`qnref.config.preset_to_dict` writes one as the TOML that
``qnref compare --config FILE`` reads (``qnref compare --preset NAME --write-config FILE``), and
every comparison report holds the ``config.toml`` that reruns it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace


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
    scale: str = "small"  # "small": shipped data, minutes on 2 cores; "paper": the text's data from --data-dir
    metric: str = "train_loss"  # what the text reports (a qnref.train.METRICS name)
    replica: str | None = None  # a paper-scale preset: the small preset that replicates it
    notes: str = ""  # n/g (not given by the text: our choice) and deviations from the text


SCALES = ("small", "paper")
PRESETS: dict[str, Preset] = {}
#: old preset names (README, reports, docs of earlier versions) → current names; each is also a key of PRESETS
ALIASES: dict[str, str] = {}


def _add(p: Preset) -> None:
    if p.name in PRESETS:
        raise ValueError(f"preset {p.name!r} defined twice")
    if p.scale not in SCALES:
        raise ValueError(f"preset {p.name}: scale must be one of {SCALES}, got {p.scale!r}")
    PRESETS[p.name] = p


def _alias(old: str, new: str) -> None:
    ALIASES[old] = new
    PRESETS[old] = PRESETS[new]


def canonical(name: str) -> str:
    """The current name of a preset (aliases resolved)."""
    return ALIASES.get(name, name)


def _both(paper: Preset, small: Preset) -> None:
    """A paper-scale preset and its small replica (which names the text too)."""
    _add(small)
    _add(replace(paper, replica=small.name))


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



# =============================================================================================
# [RD] Ramamurthy & Duffy, L-SR1 (2016)
# =============================================================================================
_RD_SEEDS = tuple(range(10))  # §4.1: "All experiments were repeated 10 times"


def _rd_lenet_runs(lr: float, first_order_batch: int, qn_batch: int = 400) -> tuple[Run, ...]:
    """§4 / §4.1.1–4.1.2: L-SR1-TR vs NAG, L-BFGS with forgetting every 5 steps, SGD, AdaDelta, SGD-m;
    memory 5, minibatch 400 for the second-order methods; Appendix: lr where needed, momentum 0.9,
    AdaDelta "did not take any parameters" (its defaults)."""
    fo = first_order_batch
    return (
        Run("L-SR1-TR", "lsr1-tr", {"batch_size": qn_batch, "memory": 5}),
        Run("L-BFGS (forget 5)", "lbfgs", {"batch_size": qn_batch, "memory": 5, "forget_every": 5}),
        Run("NAG", "nag", {"batch_size": fo, "lr": lr, "momentum": 0.9}),
        Run("SGD", "sgd", {"batch_size": fo, "lr": lr}),
        Run("AdaDelta", "adadelta", {"batch_size": fo}),
        Run("SGD-m", "momentum", {"batch_size": fo, "lr": lr, "momentum": 0.9}),
    )


_RD_FIG1_NOTES = ("LeNet5 of the Appendix, N(0, 0.1²) weights, zero biases; L2 1e-4, lr 0.003 and momentum 0.9 (Appendix, "
                  "MNIST); 'test loss measured as multi-class error count' = test_errors. L-BFGS without forgetting is "
                  "not plotted by the text and not run.")
for _bn in (False, True):
    _sfx = "-bn" if _bn else ""
    _both(
        Preset(
            name=f"lsr1-fig1{_sfx}",
            description=f"[RD] Fig. 1{' (with batch normalization)' if _bn else ''}: LeNet5 on MNIST, L-SR1-TR and L-BFGS "
                        "(forget 5) with minibatch 400 and memory 5 vs NAG, SGD, AdaDelta, SGD-m with minibatch 20",
            paper="Ramamurthy & Duffy 2016, §4.1.1, Fig. 1, Appendix (MNIST)",
            dataset="mnist", model="lenet5-mnist" + _sfx, epochs=20, seeds=_RD_SEEDS, l2=1e-4,
            init="gaussian", init_std=0.1, runs=_rd_lenet_runs(0.003, 20), scale="paper", metric="test_errors",
            notes=_RD_FIG1_NOTES,
        ),
        Preset(
            name=f"lsr1-fig1{_sfx}-small",
            description=f"[RD] Fig. 1{' with BN' if _bn else ''} at small scale: the text's MNIST settings on 8×8 digits "
                        "with the reduced LeNet",
            paper="Ramamurthy & Duffy 2016, §4.1.1, Fig. 1 (small replica)",
            dataset="digits", model="lenet-digits", model_kwargs={"batchnorm": True} if _bn else {}, epochs=20,
            seeds=(0, 1), l2=1e-4, init="gaussian", init_std=0.1, runs=_rd_lenet_runs(0.003, 20), metric="test_errors",
            notes="digits 1437/360 instead of MNIST; 2 seeds instead of 10; minibatches 20/400 and all settings as the text "
                  "(400 is 28 % of the digits training set, so the second-order methods take ~4 steps per epoch).",
        ),
    )

_RD_FIG2_NOTES = ("the modified LeNet5 of the Appendix (CIFAR10); L2 1e-3, lr 0.01, momentum 0.9; first-order minibatch 96, "
                  "second-order 400 and memory 5 'as above'; test_errors. Deviation: the text draws conv weights from "
                  "N(0, 0.01²) and FC weights from N(0, 0.1²); qnref's init takes one std, 0.01 here.")
for _bn in (False, True):
    _sfx = "-bn" if _bn else ""
    _both(
        Preset(
            name=f"lsr1-fig2{_sfx}",
            description=f"[RD] Fig. 2{' (with batch normalization)' if _bn else ''}: the LeNet-like CIFAR-10 net, L-SR1-TR "
                        "and L-BFGS (forget 5) with minibatch 400 vs NAG, SGD, AdaDelta, SGD-m with minibatch 96",
            paper="Ramamurthy & Duffy 2016, §4.1.2, Fig. 2, Appendix (CIFAR10)",
            dataset="cifar10", model="lenet-cifar10" + _sfx, epochs=20, seeds=_RD_SEEDS, l2=1e-3,
            init="gaussian", init_std=0.01, runs=_rd_lenet_runs(0.01, 96), scale="paper", metric="test_errors",
            notes=_RD_FIG2_NOTES,
        ),
        Preset(
            name=f"lsr1-fig2{_sfx}-small",
            description=f"[RD] Fig. 2{' with BN' if _bn else ''} at small scale: the text's CIFAR10 settings on digits",
            paper="Ramamurthy & Duffy 2016, §4.1.2, Fig. 2 (small replica)",
            dataset="digits", model="lenet-digits", model_kwargs={"batchnorm": True} if _bn else {}, epochs=20,
            seeds=(0, 1), l2=1e-3, init="gaussian", init_std=0.01, runs=_rd_lenet_runs(0.01, 96), metric="test_errors",
            notes="digits instead of CIFAR-10 (no shipped colour images); 2 seeds; all optimizer settings as the text.",
        ),
    )


def _rd_batch_runs(batches: tuple[int, ...], lr: float) -> tuple[Run, ...]:
    """§4.1.3: L-SR1 (memory 5), Adam (defaults) and NAG (the Appendix's lr, momentum 0.9) per minibatch size."""
    runs: list[Run] = []
    for b in batches:
        runs += [Run(f"L-SR1-TR b={b}", "lsr1-tr", {"batch_size": b, "memory": 5}),
                 Run(f"Adam b={b}", "adam", {"batch_size": b}),
                 Run(f"NAG b={b}", "nag", {"batch_size": b, "lr": lr, "momentum": 0.9})]
    return tuple(runs)


# Table 1: target test losses (error %) per minibatch size
_RD_TABLE1 = {"mnist": {500: 1.1, 1000: 1.2, 10000: 1.5}, "cifar10": {500: 30.0, 1000: 31.0, 10000: 34.0}}
for _fig, _ds, _model, _l2, _lr, _std in (("fig3", "mnist", "lenet5-mnist-bn", 1e-4, 0.003, 0.1),
                                          ("fig4", "cifar10", "lenet-cifar10-bn", 1e-3, 0.01, 0.01)):
    for _b in (500, 1000, 10000):
        _add(Preset(
            name=f"lsr1-{_fig}-b{_b}",
            description=f"[RD] {'Fig. 3' if _fig == 'fig3' else 'Fig. 4'} / Table 1, minibatch {_b}: L-SR1-TR, Adam, NAG "
                        f"with batch normalization on {'MNIST' if _ds == 'mnist' else 'CIFAR-10'}",
            paper=f"Ramamurthy & Duffy 2016, §4.1.3, {'Fig. 3' if _fig == 'fig3' else 'Fig. 4'}, Table 1",
            dataset=_ds, model=_model, epochs=200 if _b == 10000 else 50, seeds=_RD_SEEDS, l2=_l2,
            init="gaussian", init_std=_std, runs=_rd_batch_runs((_b,), _lr), scale="paper", metric="test_errors",
            target=f"test_acc>={1 - _RD_TABLE1[_ds][_b] / 100:.3f}", replica=f"lsr1-{_fig}-small",
            notes=f"50 epochs for minibatches 500/1000, 200 for 10000 (§4.1.3); the target is Table 1's test loss "
                  f"{_RD_TABLE1[_ds][_b]} % (reported: epochs to reach it). Networks, L2 and lr as in Fig. "
                  f"{'1' if _fig == 'fig3' else '2'}.",
        ))
    # the three minibatch sizes scaled to digits so that each keeps its steps per epoch (60000/b → 1437/b')
    _add(Preset(
        name=f"lsr1-{_fig}-small",
        description=f"[RD] {'Fig. 3' if _fig == 'fig3' else 'Fig. 4'} / Table 1 at small scale: L-SR1-TR, Adam, NAG with BN "
                    "on digits at three minibatch sizes",
        paper=f"Ramamurthy & Duffy 2016, §4.1.3, {'Fig. 3' if _fig == 'fig3' else 'Fig. 4'} (small replica)",
        dataset="digits", model="lenet-digits", model_kwargs={"batchnorm": True}, epochs=20, seeds=(0,), l2=_l2,
        init="gaussian", init_std=_std, runs=_rd_batch_runs((12, 24, 240) if _fig == "fig3" else (14, 29, 287), _lr),
        metric="test_errors",
        notes="minibatches scaled to digits so that each keeps the text's steps per epoch (MNIST 60000/500 → "
              "1437/12, …; CIFAR 50000/500 → 1437/14, …); 20 epochs for all sizes (text: 50 and 200).",
    ))

_add(Preset(
    name="lsr1-fig5",
    description="[RD] Fig. 5: ResNet-20 on CIFAR-10, default L-SR1-TR (memory 5, radius ×0.5/×2) vs SGD-momentum with "
                "He et al.'s schedule vs Adam, minibatch 128",
    paper="Ramamurthy & Duffy 2016, §4.2.1, Fig. 5",
    dataset="cifar10", model="resnet20", epochs=200, seeds=_RD_SEEDS, l2=1e-4, init="he",
    runs=(
        Run("L-SR1-TR", "lsr1-tr", {"batch_size": 128, "memory": 5, "decrease": 0.5, "increase": 2.0}),
        Run("SGD-m", "momentum", {"batch_size": 128, "lr": 0.1, "momentum": 0.9}, "multistep:80,120:0.1"),
        Run("Adam", "adam", {"batch_size": 128}),
    ),
    scale="paper", metric="test_errors", replica="lsr1-fig5-small",
    notes="lr 0.1 → 0.01 at epoch 80 → 0.001 at 120 for SGD-m (§4.2.1); weight decay 1e-4 and He init 'as in He et al.' "
          "(applied to all runs: qnref's L2 is per preset); 200 epochs (§4.2.2's length; §4.2.1 n/g); no data "
          "augmentation (qnref has none); 10 seeds (§4.1's count, n/g for §4.2).",
))
_add(Preset(
    name="lsr1-fig5-small",
    description="[RD] Fig. 5 at small scale: the reduced ResNet on digits, L-SR1-TR vs scheduled SGD-m vs Adam",
    paper="Ramamurthy & Duffy 2016, §4.2.1, Fig. 5 (small replica)",
    dataset="digits", model="resnet-digits", epochs=20, seeds=(0,), l2=1e-4, init="he",
    runs=(
        Run("L-SR1-TR", "lsr1-tr", {"batch_size": 128, "memory": 5, "decrease": 0.5, "increase": 2.0}),
        Run("SGD-m", "momentum", {"batch_size": 128, "lr": 0.1, "momentum": 0.9}, "multistep:8,12:0.1"),
        Run("Adam", "adam", {"batch_size": 128}),
    ),
    metric="test_errors",
    notes="the schedule's milestones 80/120 of 200 epochs scaled to 8/12 of 20.",
))

# =============================================================================================
# [MB] Griffin et al., MB-LSR1
# =============================================================================================
_add(Preset(
    name="mblsr1-fig1-small",
    description="[MB] Fig. 1 at small scale: MB-LSR1 vs SGD-momentum on an imbalanced binary set, FC-50 tanh, "
                "at the seven minibatch sizes 16, 32, 64, 128, N/10, N/8, N/4",
    paper="Griffin et al., §5.1, Fig. 1 (small replica)",
    dataset="imbalanced", model="mlp", model_kwargs={"hidden": (50,), "activation": "tanh"}, epochs=10, seeds=(0,),
    runs=tuple(r for b in (16, 32, 64, 128, 160, 200, 400) for r in (
        Run(f"MB-LSR1 b={b}", "mb-lsr1", {"batch_size": b}),
        Run(f"SGD-m b={b}", "momentum", {"batch_size": b, "lr": 0.01, "momentum": 0.9}))),
    metric="test_acc",
    notes="the 27 sets of [7] (imbalanced-learn's benchmark, presets mblsr1-fig1-<set> with --data-dir) are not "
          "shipped: the synthetic imbalanced Gaussian mixture (N = 1600) stands in; N/10, N/8, N/4 = 160, 200, 400; "
          "'SGD' means SGD with momentum (footnote 3), lr 0.01 and momentum 0.9 from Table 2's grid (the tuned "
          "values are n/g); 10 epochs (n/g).",
))


def _mb_fig2_runs(large: int, small: int = 128, zeta0: bool = False) -> tuple[Run, ...]:
    """§5.2 / Table 2: MB-LSR1, L-SSR1-TR, SGD(-momentum) and Adam at small and large batches, SVRG, RMSprop.

    ``zeta0``: also MB-LSR1 with ζ = 0 — the one setting that decides MB-LSR1 vs L-SSR1-TR at small scale
    (docs/reproductions.md: with ζ = 1 the averaged ρ̂ never falls below 0.1, so the radius never shrinks)."""
    extra = (Run("MB-LSR1 (ζ = 0)", "mb-lsr1", {"batch_size": small, "zeta": 0.0}),) if zeta0 else ()
    return extra + (
        Run("MB-LSR1", "mb-lsr1", {"batch_size": small}),
        Run("L-SSR1-TR", "lssr1-tr", {"batch_size": small}),
        Run("SGD", "momentum", {"batch_size": small, "lr": 0.01, "momentum": 0.9}),
        Run("SGD (LB)", "momentum", {"batch_size": large, "lr": 0.01, "momentum": 0.9}),
        Run("Adam", "adam", {"batch_size": small, "lr": 0.001}),
        Run("Adam (LB)", "adam", {"batch_size": large, "lr": 0.001}),
        Run("SVRG (LB)", "svrg", {"batch_size": large, "lr": 0.01}),
        Run("RMSprop (LB)", "rmsprop", {"batch_size": large, "lr": 0.001}),
    )


_MB_FIG2_NOTES = ("Table 2 lists grids only: lr 0.01 (SGD, SVRG) and 0.001 (Adam, RMSprop), momentum 0.9, small batch 128 and "
                  "large batch 4048 (as printed; probably 4096) are our picks from them; RMSprop's grid is n/g; "
                  "MB-LSR1's m = 16, batch 128, δ₀ = 1e-4 (the defaults, Table 2 grid values); 10 seeds (§5.2); "
                  "epochs n/g (10); metric: train and test accuracy.")
_both(
    Preset(
        name="mblsr1-fig2-mnist",
        description="[MB] Fig. 2 (MNIST): MB-LSR1 vs L-SSR1-TR, SGD-m and Adam (small and large batch), SVRG, RMSprop "
                    "on NetDNN",
        paper="Griffin et al., §5.2, Fig. 2, Tables 1–2", dataset="mnist", model="netdnn", epochs=10,
        seeds=tuple(range(10)), runs=_mb_fig2_runs(4048), scale="paper", metric="test_acc", notes=_MB_FIG2_NOTES,
    ),
    Preset(
        name="mblsr1-fig2-mnist-small",
        description="[MB] Fig. 2 (MNIST) at small scale: the same runs on digits with the reduced LeNet (conv+FC)",
        paper="Griffin et al., §5.2, Fig. 2 (small replica)", dataset="digits", model="lenet-digits", epochs=15,
        seeds=(0,), runs=_mb_fig2_runs(512, 32, zeta0=True), metric="test_acc",
        notes="NetDNN's 5×5 valid convs do not fit 8×8 images: the reduced LeNet stands in; batches scaled to digits "
              "(128 → 32, 4048 → 512 ≈ 36 % of 1437); otherwise as mblsr1-fig2-mnist.",
    ),
)
_both(
    Preset(
        name="mblsr1-fig2-cifar10",
        description="[MB] Fig. 2 (CIFAR10): the same comparison on ResNet20",
        paper="Griffin et al., §5.2, Fig. 2, Tables 1–2", dataset="cifar10", model="resnet20", epochs=10,
        seeds=tuple(range(10)), init="he", runs=_mb_fig2_runs(4048), scale="paper", metric="test_acc",
        notes=_MB_FIG2_NOTES + " ResNet20 = He et al.'s, 0.27M (Table 1: 272k).",
    ),
    Preset(
        name="mblsr1-fig2-cifar10-small",
        description="[MB] Fig. 2 (CIFAR10) at small scale: the reduced ResNet on digits",
        paper="Griffin et al., §5.2, Fig. 2 (small replica)", dataset="digits", model="resnet-digits", epochs=10,
        seeds=(0,), init="he", runs=_mb_fig2_runs(512, 32, zeta0=True), metric="test_acc",
        notes="the reduced ResNet (BN, 2 blocks) on digits; batches scaled as in mblsr1-fig2-mnist-small.",
    ),
)

# =============================================================================================
# [SQN] Berahas, Jahani & Takáč, sampled quasi-Newton (poster): the toy problem is shipped data
# =============================================================================================
for _size in ("small", "medium", "large"):
    _add(Preset(
        name=f"sqn-toy-{_size}",
        description=f"[SQN] toy classification, {_size} sigmoid net: S-LSR1 and S-LBFGS vs LSR1, LBFGS, GD and Adam, "
                    "full batch",
        paper="Berahas, Jahani & Takáč, Numerical results (toy classification problem)",
        dataset="toy2class", model=f"toy-{_size}", init="gaussian", init_std=1.0, epochs=50, seeds=(0, 1, 2),
        eval_every=5,
        runs=(
            Run("S-LSR1", "s-lsr1", {}),
            Run("S-LBFGS", "s-lbfgs", {}),
            Run("LSR1", "lsr1-tr", {"batch_size": None}),
            Run("LBFGS", "lbfgs", {"batch_size": None}),
            Run("GD", "gd-ls", {"batch_size": None}),
            Run("Adam", "adam", {"batch_size": None, "lr": 0.01}),
        ),
        scale="paper", metric="train_loss",
        notes="the text's own data (2 classes × 50 points, shipped); its dense BFGS and SR1 runs are not in qnref; "
              "iterations (50), GD's step rule (Armijo), Adam's lr, θ₀ ~ N(0, I) and the memory are n/g.",
    ))

# =============================================================================================
# [SOC] second-order methods for deep CNNs: SGD, SHG, GD, SR1, SQN with batch 100
# =============================================================================================


def _soc_runs(sgd_lr: float = 0.1) -> tuple[Run, ...]:
    """§3.3–3.4: SHG (Hessian products, gradient on 20 % of the data, line search (2)), SQN and SR1 with line
    search (2) c = 0.1, SGD and GD with a fixed tuned lr (GD: the average gradient of 20 % of the data); batch 100."""
    return (
        Run("SGD", "sgd", {"batch_size": 100, "lr": sgd_lr}),
        Run("SHG", "shg", {}),
        Run("GD", "gd", {"lr": sgd_lr}),
        Run("SR1", "soc-sr1", {"batch_size": 100}),
        Run("SQN", "sqn", {"batch_size": 100}),
    )


_SOC_NOTES = ("batch 100 (§3.3); tanh except the DRN (ReLU, Fig. 9); the tuned fixed learning rates of SGD and GD (0.1), "
              "the epochs (10) and SQN's L, M, b_H are n/g; metric: training loss vs epochs (Figs. 2–5); the target is "
              "Table 2's test accuracy (MNIST 98 %, CIFAR-10 73 %). SHG = 'shg', SR1 = 'soc-sr1', GD = 'gd'.")
_SOC_TARGET = {"mnist": "test_acc>=0.98", "cifar10": "test_acc>=0.73"}
_SOC_MODELS = {"lenet": ("lenet", {}), "alexnet": ("alexnet-small", {}), "drn": ("resnet18", {})}
for _ds in ("mnist", "cifar10"):
    for _net, (_model, _kw) in _SOC_MODELS.items():
        _add(Preset(
            name=f"soc-{_ds}-{_net}",
            description=f"[SOC] {'Fig. 2/4' if _ds == 'mnist' else 'Fig. 3/5'}"
                        f"{', Fig. 9' if _net == 'drn' else ', Table 2'}: SGD, SHG, GD, SR1, SQN on "
                        f"{ {'lenet': 'LeNet', 'alexnet': 'AlexNet', 'drn': 'the 18-layer DRN'}[_net]} "
                        f"({'MNIST' if _ds == 'mnist' else 'CIFAR-10'})",
            paper=f"second-order CNN comparison, §3–4.1, {'Figs. 2, 4' if _ds == 'mnist' else 'Figs. 3, 5'}"
                  f"{', Fig. 9' if _net == 'drn' else ', Table 2'}",
            dataset=_ds, model=_model, model_kwargs=dict(_kw), epochs=10, seeds=(0,), init="he" if _net == "drn" else "glorot",
            runs=_soc_runs(), scale="paper", metric="train_loss", target=_SOC_TARGET[_ds],
            replica="soc-drn-small" if _net == "drn" else "soc-lenet-small", notes=_SOC_NOTES,
        ))
for _abl, _kw, _fig in (("relu", {"activation": "relu"}, "Fig. 10"), ("res", {"residual": True}, "Fig. 11")):
    _add(Preset(
        name=f"soc-cifar10-alexnet-{_abl}",
        description=f"[SOC] §4.3 {_fig} ablation: AlexNet with {'ReLU' if _abl == 'relu' else 'its last conv a residual block'}"
                    " on CIFAR-10, SGD, SHG, GD, SR1, SQN",
        paper=f"second-order CNN comparison, §4.3, {_fig}", dataset="cifar10", model="alexnet-small", model_kwargs=_kw,
        epochs=10, seeds=(0,), runs=_soc_runs(), scale="paper", metric="train_loss", replica="soc-lenet-small",
        notes=_SOC_NOTES,
    ))
# §4.2 Figs. 6–8: batch sizes (SQN; SGD vs SR1; SGD vs SHG, whose batch is the Hessian-product batch)
_SOC_BATCHES = (100, 400, 3200)  # the text names 100 (§3.3), 400 and 3200 (§4.2); the rest of its grid is n/g


def _soc_batch_runs(batches: tuple[int, ...], sgd_lr: float = 0.1) -> tuple[Run, ...]:
    runs: list[Run] = []
    for b in batches:
        runs += [Run(f"SGD b={b}", "sgd", {"batch_size": b, "lr": sgd_lr}),
                 Run(f"SHG b={b}", "shg", {"curvature_batch": b}),
                 Run(f"SR1 b={b}", "soc-sr1", {"batch_size": b}),
                 Run(f"SQN b={b}", "sqn", {"batch_size": b})]
    return tuple(runs)


def _soc_fixed_runs(sgd_lr: float = 0.1, sr1_lr: float = 0.1, shg_lr: float = 0.1) -> tuple[Run, ...]:
    """§4.4, Fig. 12: the line searches replaced by 'well tuned fixed learning rates' (values n/g)."""
    return (Run("SGD", "sgd", {"batch_size": 100, "lr": sgd_lr}),
            Run("SR1 (line search)", "soc-sr1", {"batch_size": 100}),
            Run("SR1 (fixed lr)", "soc-sr1", {"batch_size": 100, "step_rule": "fixed", "lr": sr1_lr}),
            Run("SHG (line search)", "shg", {}),
            Run("SHG (fixed lr)", "shg", {"step_rule": "fixed", "lr": shg_lr}))


for _ds in ("mnist", "cifar10"):
    _add(Preset(
        name=f"soc-{_ds}-batch-sizes",
        description=f"[SOC] §4.2 Figs. 6–8 ({'MNIST' if _ds == 'mnist' else 'CIFAR-10'}): SGD, SHG, SR1, SQN at batch "
                    "sizes 100, 400, 3200 on LeNet",
        paper="second-order CNN comparison, §4.2, Figs. 6–8", dataset=_ds, model="lenet", epochs=10, seeds=(0,),
        runs=_soc_batch_runs(_SOC_BATCHES), scale="paper", metric="train_loss", replica="soc-batch-sizes-small",
        notes="the batch of SHG is its Hessian-product batch (its gradient stays on 20 % of the data); the network of "
              "Figs. 6–8, the batch grid beyond 100/400/3200, the lrs and epochs are n/g (LeNet, SGD lr 0.1, 10 epochs).",
    ))
    _add(Preset(
        name=f"soc-{_ds}-fixed-lr",
        description=f"[SOC] §4.4 Fig. 12 ({'MNIST' if _ds == 'mnist' else 'CIFAR-10'}): SR1 and SHG with their line "
                    "search (2) and with a fixed learning rate, vs SGD, on LeNet",
        paper="second-order CNN comparison, §4.4, Fig. 12", dataset=_ds, model="lenet", epochs=10, seeds=(0,),
        runs=_soc_fixed_runs(), scale="paper", metric="train_loss", replica="soc-fixed-lr-small",
        notes="the 'well tuned' fixed rates are n/g (0.1 here); network and epochs n/g (LeNet, 10).",
    ))
_add(Preset(
    name="soc-batch-sizes-small",
    description="[SOC] Figs. 6–8 at small scale: SGD, SHG, SR1, SQN at batch sizes 25, 100, 800 on the tanh digits LeNet",
    paper="second-order CNN comparison, §4.2, Figs. 6–8 (small replica)", dataset="digits", model="lenet-digits",
    model_kwargs={"activation": "tanh"}, epochs=10, seeds=(0,), runs=_soc_batch_runs((25, 100, 800)),
    metric="train_loss", notes="the batch sizes scaled ÷4 (3200 would exceed the 1437 training images).",
))
_add(Preset(
    name="soc-fixed-lr-small",
    description="[SOC] Fig. 12 at small scale: SR1 and SHG with line search and with a fixed lr, vs SGD, on the tanh "
                "digits LeNet",
    paper="second-order CNN comparison, §4.4, Fig. 12 (small replica)", dataset="digits", model="lenet-digits",
    model_kwargs={"activation": "tanh"}, epochs=10, seeds=(0,), runs=_soc_fixed_runs(), metric="train_loss",
    notes="fixed rates 0.1 (n/g).",
))
_add(Preset(
    name="soc-lenet-small",
    description="[SOC] Figs. 2–3 at small scale: SGD, SHG, GD, SR1, SQN on a tanh LeNet for 8×8 digits",
    paper="second-order CNN comparison, §3–4 (small replica)", dataset="digits", model="lenet-digits",
    model_kwargs={"activation": "tanh"}, epochs=10, seeds=(0,), runs=_soc_runs(), metric="train_loss",
    target="test_acc>=0.95",
    notes="the reduced LeNet (tanh) on digits; batch 100 and the methods' settings as the text; target 95 % (ours).",
))
_add(Preset(
    name="soc-drn-small",
    description="[SOC] Fig. 9 at small scale: SGD, SHG, GD, SR1, SQN on the reduced ReLU ResNet for digits",
    paper="second-order CNN comparison, §4.3, Fig. 9 (small replica)", dataset="digits", model="resnet-digits",
    epochs=10, seeds=(0,), init="he", runs=_soc_runs(), metric="train_loss",
    notes="the reduced ResNet (2 blocks, BN, ReLU) stands in for the 18-layer DRN.",
))

# =============================================================================================
# [REN] Yi Ren's thesis
# =============================================================================================
_AE = {"mnist": "autoencoder-mnist", "faces": "autoencoder-faces", "curves": "autoencoder-curves"}
_AE_DATA = {"mnist": ("mnist", {"flat": True}, True), "faces": ("faces", {}, False), "curves": ("curves", {}, False)}
_AE_TIME = {"mnist": 500.0, "faces": 2000.0, "curves": 500.0}  # ch. 3 L1467: seconds per run


def _ch2_runs(hp: dict, batch: int) -> tuple[Run, ...]:
    """§2.8 (Tables 2.5/2.6): the ch. 2 algorithms — K-BFGS and K-BFGS(L) of Alg. 4 (version "ch2"), KFAC of Alg. 7
    (version "ch2", T = 20) — vs Adam and RMSprop (β₁ = β₂ = 0.9, ε = the table's damping) and SGD-m (β = 0.9)."""
    (kl, kd), (ll, ld), (fl, fd), (al, ae), (rl, re), sl = (hp[k] for k in ("kbfgs", "kbfgsl", "kfac", "adam", "rmsprop", "sgdm"))
    return (
        Run("K-BFGS", "kbfgs", {"batch_size": batch, "version": "ch2", "lr": kl, "damping": kd}),
        Run("K-BFGS(L)", "kbfgs-l", {"batch_size": batch, "version": "ch2", "lr": ll, "damping": ld}),
        Run("KFAC", "kfac", {"batch_size": batch, "version": "ch2", "lr": fl, "damping": fd, "inv_freq": 20}),
        Run("Adam", "adam", {"batch_size": batch, "lr": al, "eps": ae, "beta1": 0.9, "beta2": 0.9}),
        Run("RMSprop", "rmsprop", {"batch_size": batch, "lr": rl, "eps": re, "rho": 0.9}),
        Run("SGD-m", "momentum", {"batch_size": batch, "lr": sl, "momentum": 0.9}),
    )


# (lr, damping) of Table 2.5 (m = 1000, L882-888) and Table 2.6 (m = 100, L915-921); SGD-m: lr only
_CH2 = {
    1000: {"mnist": {"kbfgs": (0.3, 0.3), "kbfgsl": (0.3, 0.3), "kfac": (1.0, 3.0), "adam": (1e-4, 1e-4), "rmsprop": (1e-4, 1e-4), "sgdm": 0.03},
           "faces": {"kbfgs": (0.1, 0.1), "kbfgsl": (0.1, 0.1), "kfac": (0.1, 0.1), "adam": (1e-4, 1e-4), "rmsprop": (1e-4, 1e-4), "sgdm": 0.01},
           "curves": {"kbfgs": (0.1, 0.01), "kbfgsl": (0.3, 0.3), "kfac": (0.3, 0.3), "adam": (1e-3, 1e-3), "rmsprop": (1e-3, 1e-3), "sgdm": 0.1}},
    100: {"mnist": {"kbfgs": (0.1, 0.3), "kbfgsl": (0.1, 0.3), "kfac": (0.1, 0.3), "adam": (1e-4, 1e-4), "rmsprop": (1e-4, 1e-4), "sgdm": 0.03},
          "faces": {"kbfgs": (0.03, 0.03), "kbfgsl": (0.03, 0.3), "kfac": (0.03, 0.3), "adam": (3e-5, 1e-4), "rmsprop": (3e-5, 1e-4), "sgdm": 0.01},
          "curves": {"kbfgs": (0.3, 1.0), "kbfgsl": (0.3, 0.3), "kfac": (0.03, 0.1), "adam": (3e-4, 1e-4), "rmsprop": (3e-3, 1e-4), "sgdm": 0.03}},
}
_CH2_NOTES = ("Table 2.4 autoencoder with ReLU (L768), sigmoid+BCE (MNIST, CURVES) or squared error (FACES); (η/2)‖θ‖² with "
              "η = 1e-5 (L848); the runs end after the same time (L777: 500/2000/500 s of the thesis's GPU; our budget "
              "is the same wall-clock time on this engine); the 'double-grad' variant and RMSprop's full-set warm start "
              "(L832-840) are not run.")
for _batch, _table in ((1000, "Table 2.5"), (100, "Table 2.6")):
    for _set in ("mnist", "faces", "curves"):
        _ds, _dkw, _ae = _AE_DATA[_set]
        _add(Preset(
            name=f"ren-ch2-{_set}" + ("" if _batch == 1000 else "-b100"),
            description=f"[REN] ch. 2 {_set.upper()} autoencoder, batch {_batch}: K-BFGS, K-BFGS(L), KFAC (ch. 2 "
                        "algorithms) vs Adam, RMSprop, SGD-m",
            paper=f"Ren thesis, §2.8, {'Fig. 2.2' if _batch == 1000 else 'Figs. 2.4–2.6'}, {_table}",
            dataset=_ds, dataset_kwargs=dict(_dkw), autoencoder=_ae, model=_AE[_set], model_kwargs={"activation": "relu"},
            epochs=1000, max_time=_AE_TIME[_set], seeds=tuple(range(20 if _batch == 1000 else 5)), l2=1e-5,
            runs=_ch2_runs(_CH2[_batch][_set], _batch), scale="paper", metric="train_loss", replica="ren-ch2-mnist-small",
            notes=_CH2_NOTES + (" 20 seeds (L777)." if _batch == 1000 else " Seeds for m = 100 n/g (5)."),
        ))
_add(Preset(
    name="ren-ch2-mnist-small",
    description="[REN] ch. 2 at small scale: the ch. 2 K-BFGS, K-BFGS(L), KFAC vs Adam, RMSprop, SGD-m on a ReLU "
                "autoencoder 64-32-16-8-16-32-64 for digits pixels, batch 100 (Table 2.6, MNIST column)",
    paper="Ren thesis, §2.8, Table 2.6 (small replica)",
    dataset="digits", dataset_kwargs={"flat": True}, autoencoder=True, model="autoencoder-digits",
    model_kwargs={"activation": "relu"}, epochs=10, seeds=(0,), l2=1e-5, runs=_ch2_runs(_CH2[100]["mnist"], 100),
    metric="train_loss",
    notes="digits instead of MNIST, the reduced autoencoder; 10 epochs instead of a time budget.",
))

# ch. 3 autoencoders (Table 3.5; T = 1 except K-BFGS† T = 20; KFAC T1 = 1, T2 = 20; no L2, L1572)
_CH3 = {"mnist": {"kbfgs": (0.03, 0.3), "dagger": (0.3, 30.0), "kbfgsl": (0.03, 0.3), "k20": (0.01, 0.1), "kl20": (0.003, 0.1),
                  "kfac": (0.03, 1.0), "adam": (1e-4, 1e-4), "sgdm": 0.003},
        "faces": {"kbfgs": (0.03, 1.0), "dagger": (0.03, 3.0), "kbfgsl": (0.03, 1.0), "k20": (0.01, 0.3), "kl20": (0.01, 0.3),
                  "kfac": (0.01, 0.1), "adam": (1e-4, 1e-4), "sgdm": 0.001},
        "curves": {"kbfgs": (0.03, 0.3), "dagger": (0.3, 30.0), "kbfgsl": (0.1, 3.0), "k20": (0.01, 0.03), "kl20": (0.003, 0.03),
                   "kfac": (0.3, 30.0), "adam": (1e-3, 1e-3), "sgdm": 0.003}}


def _ch3_ae_runs(hp: dict, batch: int = 1000) -> tuple[Run, ...]:
    b = {"batch_size": batch}
    return (
        Run("K-BFGS", "kbfgs", {**b, "lr": hp["kbfgs"][0], "damping": hp["kbfgs"][1]}),
        Run("K-BFGS† (T=20)", "kbfgs", {**b, "lr": hp["dagger"][0], "damping": hp["dagger"][1], "curvature_freq": 20}),
        Run("K-BFGS(L)", "kbfgs-l", {**b, "lr": hp["kbfgsl"][0], "damping": hp["kbfgsl"][1]}),
        Run("K-BFGS-20", "kbfgs", {**b, "version": "ch2", "lr": hp["k20"][0], "damping": hp["k20"][1]}),
        Run("K-BFGS(L)-20", "kbfgs-l", {**b, "version": "ch2", "lr": hp["kl20"][0], "damping": hp["kl20"][1]}),
        Run("KFAC", "kfac", {**b, "lr": hp["kfac"][0], "damping": hp["kfac"][1], "stat_freq": 1, "inv_freq": 20}),
        Run("Adam", "adam", {**b, "lr": hp["adam"][0], "eps": hp["adam"][1]}),
        Run("SGD-m", "momentum", {**b, "lr": hp["sgdm"], "momentum": 0.9}),
    )


for _set in ("mnist", "faces", "curves"):
    _ds, _dkw, _ae = _AE_DATA[_set]
    _add(Preset(
        name=f"ren-ch3-{_set}",
        description=f"[REN] ch. 3 Table 3.3, {_set.upper()} autoencoder: K-BFGS, K-BFGS†, K-BFGS(L), the ch. 2 K-BFGS-20 and "
                    "K-BFGS(L)-20, KFAC, Adam, SGD-m at a fixed time",
        paper="Ren thesis, §3.7.1, Table 3.3, Table 3.5", dataset=_ds, dataset_kwargs=dict(_dkw), autoencoder=_ae,
        model=_AE[_set], model_kwargs={"activation": "relu"}, epochs=1000, max_time=_AE_TIME[_set], seeds=tuple(range(5)),
        runs=_ch3_ae_runs(_CH3[_set]), scale="paper", metric="train_loss", replica="ren-ch3-mnist-small",
        notes="batch 1000, 500 s (MNIST, CURVES) / 2000 s (FACES) per run (L1467), no L2 (L1572), 5 seeds; Adam β₂ = 0.999.",
    ))
_add(Preset(
    name="ren-ch3-mnist-small",
    description="[REN] ch. 3 Table 3.3 at small scale: the eight runs (MNIST column of Table 3.5) on the digits autoencoder",
    paper="Ren thesis, §3.7.1, Table 3.3 (small replica)", dataset="digits", dataset_kwargs={"flat": True},
    autoencoder=True, model="autoencoder-digits", model_kwargs={"activation": "relu"}, epochs=10, seeds=(0,),
    runs=_ch3_ae_runs(_CH3["mnist"], 100), metric="train_loss",
    notes="batch 100 (1000 would be 70 % of digits), 10 epochs instead of 500 s.",
))

# CNNs of ch. 3 (Tables 3.4/3.7, 3.9/3.10) and ch. 4 (Tables 4.2/4.4): (lr, weight decay γ, damping λ)
_CNN_NOTES = ("batch 128; the thesis's rule: ×0.1 every 60 epochs (first-order) / 50 (second-order) = schedule 'thesis'; "
              "deviations: every run trains 200 epochs (the thesis stops the second-order ones at 150: qnref's epochs are "
              "per preset), no flip+crop augmentation (qnref has none), and the first-order runs get no weight decay γ "
              "(qnref's SGD-m/Adam have no per-run weight decay; the table's γ is listed in the run label); 5 seeds; "
              "metric: validation (= test split) accuracy; He init (n/g).")
_CH3_CNN = {  # Table 3.7 (VGG16, ResNet32) and 3.10 (ResNet32-4): (lr, γ, λ)
    ("cifar10", "vgg16"): {"kbfgs": (30, 1e-5, 1e4), "kbfgsl": (1, 1e-3, 100), "kfac": (3e-4, 1, 1e-3), "adam": (3e-3, 0.1, 0.1), "sgdm": (3e-3, 0.1)},
    ("cifar10", "resnet32"): {"kbfgs": (100, 1e-5, 1e3), "kbfgsl": (1e3, 1e-6, 1e4), "kfac": (0.01, 0.1, 0.1), "adam": (3e-3, 0.1, 0.01), "sgdm": (0.03, 0.01)},
    ("cifar100", "vgg16"): {"kbfgs": (0.1, 0.01, 10), "kbfgsl": (0.3, 1e-3, 100), "kfac": (0.01, 0.1, 1), "adam": (3e-4, 1, 0.01), "sgdm": (3e-3, 0.1)},
    ("cifar100", "resnet32"): {"kbfgs": (1e3, 1e-6, 1e4), "kbfgsl": (10, 1e-4, 100), "kfac": (0.1, 0.01, 0.1), "adam": (0.01, 0.1, 0.01), "sgdm": (0.03, 0.01)},
    ("cifar10", "resnet32-4"): {"kbfgs": (1e3, 1e-6, 1e4), "kbfgsl": (1e3, 1e-6, 1e4), "kfac": (0.1, 0.01, 1), "adam": (0.03, 0.01, 0.1), "sgdm": (0.03, 0.01)},
    ("cifar100", "resnet32-4"): {"kbfgs": (100, 1e-5, 1e3), "kbfgsl": (1e3, 1e-6, 1e4), "kfac": (0.01, 0.1, 0.01), "adam": (3e-3, 0.1, 0.01), "sgdm": (0.01, 0.1)},
}
_CH4_CNN = {  # Table 4.4: (lr, γ, damping)
    ("cifar10", "vgg16"): {"tnt": (1e-4, 10, 0.1), "kfac": (3e-4, 1, 1e-3), "shampoo": (1e-3, 1, 0.1), "adam": (3e-3, 0.1, 0.1), "sgdm": (3e-3, 0.1)},
    ("cifar10", "resnet32"): {"tnt": (1e-4, 10, 0.01), "kfac": (0.01, 0.1, 0.1), "shampoo": (0.01, 0.1, 0.01), "adam": (3e-3, 0.1, 0.01), "sgdm": (0.03, 0.01)},
    ("cifar100", "vgg16"): {"tnt": (1e-4, 10, 0.1), "kfac": (0.01, 0.1, 1), "shampoo": (1e-3, 1, 0.01), "adam": (3e-4, 1, 0.01), "sgdm": (3e-3, 0.1)},
    ("cifar100", "resnet32"): {"tnt": (1e-4, 10, 0.01), "kfac": (0.1, 0.01, 0.1), "shampoo": (0.01, 0.1, 0.01), "adam": (0.01, 0.1, 0.01), "sgdm": (0.03, 0.01)},
}
_CNN_MODEL = {"vgg16": ("vgg16", {}), "resnet32": ("resnet32", {}), "resnet32-4": ("resnet32", {"width": 4})}


def _first_order_cnn(hp: dict, batch: int) -> tuple[Run, ...]:
    al, ag, ae = hp["adam"]
    sl, sg = hp["sgdm"]
    return (Run(f"Adam (γ={ag:g} n/a)", "adam", {"batch_size": batch, "lr": al, "eps": ae}),
            Run(f"SGD-m (γ={sg:g} n/a)", "momentum", {"batch_size": batch, "lr": sl, "momentum": 0.9}))


def _ch3_cnn_runs(hp: dict, batch: int = 128) -> tuple[Run, ...]:
    b = {"batch_size": batch}
    return (
        Run("K-BFGS", "kbfgs", {**b, "lr": hp["kbfgs"][0], "weight_decay": hp["kbfgs"][1], "damping": hp["kbfgs"][2], "curvature_freq": 20}),
        Run("K-BFGS(L)", "kbfgs-l", {**b, "lr": hp["kbfgsl"][0], "weight_decay": hp["kbfgsl"][1], "damping": hp["kbfgsl"][2], "curvature_freq": 20}),
        Run("KFAC", "kfac", {**b, "lr": hp["kfac"][0], "weight_decay": hp["kfac"][1], "damping": hp["kfac"][2], "stat_freq": 10, "inv_freq": 100}),
    ) + _first_order_cnn(hp, batch)


def _ch4_cnn_runs(hp: dict, batch: int = 128) -> tuple[Run, ...]:
    b, f = {"batch_size": batch}, {"stat_freq": 10, "inv_freq": 100}
    return (
        Run("TNT", "tnt", {**b, "lr": hp["tnt"][0], "weight_decay": hp["tnt"][1], "damping": hp["tnt"][2], **f}),
        Run("KFAC", "kfac", {**b, "lr": hp["kfac"][0], "weight_decay": hp["kfac"][1], "damping": hp["kfac"][2], **f}),
        Run("Shampoo", "shampoo", {**b, "lr": hp["shampoo"][0], "weight_decay": hp["shampoo"][1], "damping": hp["shampoo"][2], **f}),
    ) + _first_order_cnn(hp, batch)


for (_ds, _net), _hp in _CH3_CNN.items():
    _model, _kw = _CNN_MODEL[_net]
    _tab = "Tables 3.9, 3.10" if _net == "resnet32-4" else "Tables 3.4, 3.7"
    _add(Preset(
        name=f"ren-ch3-{_ds}-{_net}",
        description=f"[REN] ch. 3 {_ds.upper()} {_net}: K-BFGS, K-BFGS(L) (T = 20), KFAC (T1 = 10, T2 = 100) vs Adam, SGD-m",
        paper=f"Ren thesis, §3.7.1, {_tab}", dataset=_ds, model=_model, model_kwargs=dict(_kw), epochs=200,
        seeds=tuple(range(5)), init="he", schedule="thesis", runs=_ch3_cnn_runs(_hp), scale="paper", metric="test_acc",
        replica="ren-ch3-cnn-small", notes=_CNN_NOTES,
    ))
for (_ds, _net), _hp in _CH4_CNN.items():
    _model, _kw = _CNN_MODEL[_net]
    _add(Preset(
        name=f"ren-ch4-{_ds}-{_net}",
        description=f"[REN] ch. 4 {_ds.upper()} {_net}: TNT, KFAC, Shampoo (T1 = 10, T2 = 100) vs Adam, SGD-m",
        paper="Ren thesis, §4.7.1, Tables 4.2, 4.4", dataset=_ds, model=_model, model_kwargs=dict(_kw), epochs=200,
        seeds=tuple(range(5)), init="he", schedule="thesis", runs=_ch4_cnn_runs(_hp), scale="paper", metric="test_acc",
        replica="ren-ch4-cnn-small", notes=_CNN_NOTES,
    ))
_add(Preset(
    name="ren-ch3-cnn-small",
    description="[REN] ch. 3 CNN comparison at small scale: K-BFGS, K-BFGS(L), KFAC vs Adam, SGD-m on a LeNet for digits "
                "(Table 3.7's CIFAR-10 ResNet32 column), the thesis's decay rule scaled ×0.1",
    paper="Ren thesis, §3.7.1, Tables 3.4, 3.7 (small replica)", dataset="digits", model="lenet-digits", epochs=10,
    seeds=(0,), init="he", schedule="thesis:0.1", runs=_ch3_cnn_runs(_CH3_CNN[("cifar10", "resnet32")], 100),
    metric="test_acc",
    notes="batch 100; the decay every 60/50 epochs scaled to 6/5 of 10 epochs (schedule thesis:0.1); the ResNet32 "
          "column's (lr, γ, λ) on the reduced LeNet.",
))
_add(Preset(
    name="ren-ch4-cnn-small",
    description="[REN] ch. 4 CNN comparison at small scale: TNT, KFAC, Shampoo (T1 = 10, T2 = 100) vs SGD-m and Adam on a "
                "LeNet for digits; the thesis's ×0.1 decay every 60 (first-order) / 50 (second-order) epochs scaled to 6 / 5",
    paper="Ren thesis, §4.7, Tables 4.2, 4.4 (small replica)",
    dataset="digits", model="lenet-digits", epochs=10, seeds=(0,), schedule="thesis:0.1",
    runs=(
        Run("TNT", "tnt", {"batch_size": 100, "lr": 1e-3, "damping": 0.1, "stat_freq": 10, "inv_freq": 100}),
        Run("Shampoo", "shampoo", {"batch_size": 100, "lr": 0.01, "stat_freq": 10, "inv_freq": 100}),
        Run("KFAC", "kfac", {"batch_size": 100, "lr": 0.1, "damping": 0.3, "stat_freq": 10, "inv_freq": 100}),
        Run("SGD-m", "momentum", {"batch_size": 100, "lr": 0.03}),
        Run("Adam", "adam", {"batch_size": 100}),
    ),
    metric="test_acc",
    notes="T1 = 10, T2 = 100 as the thesis's CNN runs (L2098); lr and damping tuned for this scale (the thesis's VGG/ResNet "
          "values do not transfer to a 1.9k-parameter LeNet); batch 100; no weight decay.",
))

# ch. 4 autoencoders (Table 4.3, EF variants Table 4.5; T1 = 1, T2 = 20; batch 1000; no L2)
_CH4 = {"mnist": {"tnt": (1e-4, 0.1), "kfac": (0.03, 1.0), "shampoo": (3e-4, 3e-4), "adam": (1e-4, 1e-4), "sgdm": 0.003,
                  "tnt-ef": (3e-6, 0.01), "kfac-ef": (1.0, 100.0)},
        "faces": {"tnt": (1e-6, 0.003), "kfac": (0.01, 0.1), "shampoo": (3e-4, 3e-4), "adam": (1e-4, 1e-4), "sgdm": 0.001,
                  "tnt-ef": (3e-6, 0.01), "kfac-ef": (0.3, 30.0)},
        "curves": {"tnt": (3e-6, 0.01), "kfac": (0.3, 30.0), "shampoo": (3e-4, 3e-4), "adam": (1e-3, 1e-3), "sgdm": 0.003,
                   "tnt-ef": (3e-3, 1.0), "kfac-ef": (1.0, 100.0)}}


def _ch4_ae_runs(hp: dict, batch: int = 1000) -> tuple[Run, ...]:
    b, f = {"batch_size": batch}, {"stat_freq": 1, "inv_freq": 20}
    return (
        Run("TNT", "tnt", {**b, "lr": hp["tnt"][0], "damping": hp["tnt"][1], **f}),
        Run("KFAC", "kfac", {**b, "lr": hp["kfac"][0], "damping": hp["kfac"][1], **f}),
        Run("Shampoo", "shampoo", {**b, "lr": hp["shampoo"][0], "damping": hp["shampoo"][1], **f}),
        Run("Adam", "adam", {**b, "lr": hp["adam"][0], "eps": hp["adam"][1]}),
        Run("SGD-m", "momentum", {**b, "lr": hp["sgdm"], "momentum": 0.9}),
        Run("TNT-EF", "tnt", {**b, "lr": hp["tnt-ef"][0], "damping": hp["tnt-ef"][1], "fisher": "empirical", **f}),
        Run("KFAC-EF", "kfac", {**b, "lr": hp["kfac-ef"][0], "damping": hp["kfac-ef"][1], "fisher": "empirical", **f}),
    )


for _set in ("mnist", "faces", "curves"):
    _ds, _dkw, _ae = _AE_DATA[_set]
    _add(Preset(
        name=f"ren-ch4-{_set}",
        description=f"[REN] ch. 4 Fig. 4.2, {_set.upper()} autoencoder: TNT, KFAC, Shampoo vs Adam, SGD-m, and the "
                    "empirical-Fisher TNT-EF, KFAC-EF",
        paper="Ren thesis, §4.7.1, Fig. 4.2, Tables 4.3, 4.5", dataset=_ds, dataset_kwargs=dict(_dkw), autoencoder=_ae,
        model=_AE[_set], model_kwargs={"activation": "relu"}, epochs=1000, max_time=_AE_TIME[_set], seeds=tuple(range(5)),
        runs=_ch4_ae_runs(_CH4[_set]), scale="paper", metric="train_loss", replica="ren-ch4-mnist-small",
        notes="architectures and losses as ch. 3 (Table 3.6), no L2, batch 1000, T1 = 1, T2 = 20 (L2082); the time budget "
              "is n/g in ch. 4: ch. 3's 500/2000/500 s; 5 seeds; Adam β₂ = 0.999.",
    ))
_add(Preset(
    name="ren-ch4-mnist-small",
    description="[REN] ch. 4 Fig. 4.2 at small scale: TNT, KFAC, Shampoo, Adam, SGD-m, TNT-EF, KFAC-EF on the digits "
                "autoencoder (Table 4.3/4.5 MNIST column)",
    paper="Ren thesis, §4.7.1, Fig. 4.2 (small replica)", dataset="digits", dataset_kwargs={"flat": True},
    autoencoder=True, model="autoencoder-digits", model_kwargs={"activation": "relu"}, epochs=10, seeds=(0,),
    runs=_ch4_ae_runs(_CH4["mnist"], 100), metric="train_loss",
    notes="batch 100, 10 epochs instead of a time budget.",
))

# ch. 5 (§5.8): SMW-GN, SMW-NG, SMW-NG-BD vs KFAC, HF, SGD on the thesis's classification MLPs
def _ch5_runs(n1: int, n2: int, lr: dict, n_train: int) -> tuple[Run, ...]:
    """HF's gradient on N₁ examples is ``grad_fraction=N₁/N`` (exact at the preset's N): the command line's type
    check refuses the ``grad_fraction=None`` that ``grad_batch`` needs."""
    smw = {"batch_size": n1, "curvature_batch": n2}
    return (
        Run("SMW-GN", "smw-gn", {**smw, "lr": lr["smw-gn"]}),
        Run("SMW-NG", "smw-ng", {**smw, "lr": lr["smw-ng"]}),
        Run("SMW-NG-BD", "smw-ng-bd", {**smw, "lr": lr["smw-ng"]}),
        Run("KFAC", "kfac", {"batch_size": n1, "lr": lr["kfac"], "momentum": 0.0}),
        Run("HF", "hf", {"grad_fraction": n1 / n_train, "curvature_batch": n2}),
        # HF under SMW-GN's own step and damping rules (λ boost 1.01 / drop 0.99 at ρ < ¼ / > ¾, fixed α): the
        # like-for-like comparison of docs/reproductions.md (Martens' 1.5 / ⅔ and a line search move faster)
        Run("HF (SMW rules)", "hf", {"grad_fraction": n1 / n_train, "curvature_batch": n2, "boost": 1.01, "drop": 0.99,
                                     "step_rule": "fixed", "lr": lr["smw-gn"]}),
        Run("SGD", "sgd", {"batch_size": n1, "lr": lr["sgd"]}),
    )


_CH5_NOTES = ("inputs standardized (train statistics, L2818); λ_LM₀ = 1, boost 1.01, drop 0.99, ε = ¼, τ = 1e-3 (the SMW "
              "defaults); S₁ = N₁ examples for the gradient, S₂ = N₂ for the curvature; KFAC 'block-diagonal, no re-scaling, "
              "no momentum' (L2804): momentum 0; HF with the gradient on N₁ examples (grad_fraction = N₁/N) and the curvature on "
              "N₂ (our reading), its "
              "'initial learning rate' has no counterpart in qnref's HF (Martens' line search); metric: training loss "
              "and test error (Figs. 5.1–5.3); seeds n/g (1).")
_both(
    Preset(
        name="ren-ch5-mnist",
        description="[REN] ch. 5 Fig. 5.1: SMW-GN, SMW-NG, SMW-NG-BD, KFAC, HF, SGD on MNIST, MLP 784-500-10 logistic",
        paper="Ren thesis, §5.8, Fig. 5.1", dataset="mnist", dataset_kwargs={"flat": True, "standardize": True},
        model="mlp", model_kwargs={"hidden": (500,), "activation": "sigmoid"}, epochs=10, seeds=(0,),
        runs=_ch5_runs(60, 30, {"smw-gn": 0.1, "smw-ng": 0.1, "kfac": 0.1, "sgd": 0.1}, 60_000), scale="paper",
        metric="test_errors", notes="N₁ = 60, N₂ = 30, lr 0.1 for all (SGD tuned, the others untuned), 10 epochs. " + _CH5_NOTES,
    ),
    Preset(
        name="ren-ch5-mnist-small",
        description="[REN] ch. 5 Fig. 5.1 at small scale: SMW-GN, SMW-NG, SMW-NG-BD, KFAC, HF, SGD on standardized digits, "
                    "MLP 64-500-10 logistic",
        paper="Ren thesis, §5.8, Fig. 5.1 (small replica)", dataset="digits",
        dataset_kwargs={"flat": True, "standardize": True}, model="mlp",
        model_kwargs={"hidden": (500,), "activation": "sigmoid"}, epochs=3, seeds=(0,),
        runs=_ch5_runs(60, 30, {"smw-gn": 0.1, "smw-ng": 0.1, "kfac": 0.1, "sgd": 0.1}, 1437), metric="test_errors",
        notes="digits (64 inputs) instead of MNIST; 3 epochs instead of 10; otherwise as ren-ch5-mnist.",
    ),
)
_add(Preset(
    name="ren-ch5-cifar10",
    description="[REN] ch. 5 Fig. 5.2: SMW-GN, SMW-NG, SMW-NG-BD, KFAC, HF, SGD on CIFAR-10, MLP 3072-400-400-10 logistic",
    paper="Ren thesis, §5.8, Fig. 5.2", dataset="cifar10", dataset_kwargs={"flat": True, "standardize": True},
    model="mlp", model_kwargs={"hidden": (400, 400), "activation": "sigmoid"}, epochs=10, seeds=(0,),
    runs=_ch5_runs(100, 50, {"smw-gn": 0.01, "smw-ng": 0.01, "kfac": 0.01, "sgd": 0.01}, 50_000), scale="paper",
    metric="test_errors", replica="ren-ch5-mnist-small",
    notes="N₁ = 100, N₂ = 50, lr 0.01 for all, 10 epochs. " + _CH5_NOTES,
))
_both(
    Preset(
        name="ren-ch5-webspam",
        description="[REN] ch. 5 Fig. 5.3: SMW-GN, SMW-NG, SMW-NG-BD, KFAC, HF, SGD on webspam, MLP 254-400-400-1 logistic, "
                    "binary cross-entropy",
        paper="Ren thesis, §5.8, Fig. 5.3", dataset="webspam", dataset_kwargs={"standardize": True}, model="mlp",
        model_kwargs={"hidden": (400, 400), "activation": "sigmoid"}, epochs=1, seeds=(0,),
        runs=_ch5_runs(60, 30, {"smw-gn": 0.05, "smw-ng": 0.1, "kfac": 0.1, "sgd": 0.4}, 300_000), scale="paper",
        metric="test_errors",
        notes="N = 300,000 training lines (the rest of the 350,000 is the test split), N₁ = 60, N₂ = 30; tuned lr: SGD 0.4, "
              "HF and SMW-GN 0.05, SMW-NG, SMW-NG-BD, KFAC 0.1; 1 epoch. " + _CH5_NOTES,
    ),
    Preset(
        name="ren-ch5-webspam-small",
        description="[REN] ch. 5 Fig. 5.3 at small scale: the same runs on the synthetic imbalanced binary set, MLP "
                    "20-400-400-1 logistic",
        paper="Ren thesis, §5.8, Fig. 5.3 (small replica)", dataset="imbalanced", model="mlp",
        model_kwargs={"hidden": (400, 400), "activation": "sigmoid"}, epochs=2, seeds=(0,),
        runs=_ch5_runs(60, 30, {"smw-gn": 0.05, "smw-ng": 0.1, "kfac": 0.1, "sgd": 0.4}, 1600), metric="test_errors",
        notes="a synthetic binary Gaussian mixture (1600 training rows, 20 features) stands in for webspam; 2 epochs.",
    ),
)

# ---------------------------------------------------------------------------------------------
# [MB] §5.1 Fig. 1 at paper scale: the 27 imbalanced-learn benchmark sets of [7] (Ding 2011), one preset per set
# ---------------------------------------------------------------------------------------------
def _mb_fig1_batches(n_train: int) -> tuple[tuple[str, int], ...]:
    """§5.1: n_b ∈ {16, 32, 64, 128, N/10, N/8, N/4}, N = the training rows of our 80/20 split (floor)."""
    return (("16", 16), ("32", 32), ("64", 64), ("128", 128), ("N/10", n_train // 10), ("N/8", n_train // 8),
            ("N/4", n_train // 4))


def _mb_fig1_runs(n_train: int) -> tuple[Run, ...]:
    runs: list[Run] = []
    for tag, b in _mb_fig1_batches(n_train):
        lab = f"b={b}" if tag == str(b) else f"b={tag}={b}"
        runs += [Run(f"MB-LSR1 {lab}", "mb-lsr1", {"batch_size": b}),
                 Run(f"SGD-m {lab}", "momentum", {"batch_size": b, "lr": 0.01, "momentum": 0.9})]
    return tuple(runs)


def _mb_fig1_presets() -> None:
    from .data.imbalanced_sets import BENCHMARK, split_sizes  # noqa: PLC0415 - NumPy only, no optimizer imports

    for problem, (ident, n_s, n_f, ratio) in BENCHMARK.items():
        n_train = split_sizes(n_s)[0]
        _add(Preset(
            name=f"mblsr1-fig1-{problem.replace('_', '-')}",
            description=f"[MB] Fig. 1, problem {ident}/27 '{problem}' ({n_s} × {n_f}, {ratio:g}:1): MB-LSR1 vs SGD-momentum, "
                        "FC-50 tanh, at the seven minibatch sizes 16, 32, 64, 128, N/10, N/8, N/4",
            paper="Griffin et al., §5.1, Fig. 1", dataset="imbalanced-benchmark",
            dataset_kwargs={"problem": problem, "standardize": True}, model="mlp",
            model_kwargs={"hidden": (50,), "activation": "tanh"}, epochs=10, seeds=(0,), runs=_mb_fig1_runs(n_train),
            scale="paper", metric="test_acc", replica="mblsr1-fig1-small",
            notes=f"one preset per set of the 27 (Fig. 1 plots test_acc of MB-LSR1 minus SGD-m per set and batch size); "
                  f"the set '{problem}' = imbalanced-learn's x{ident}data.npz (Zenodo 61452), labels −1/1 → 0/1 (1 = "
                  f"minority); split n/g: seeded stratified 80/20 → N = {n_train} training rows, N/10, N/8, N/4 = "
                  f"{n_train // 10}, {n_train // 8}, {n_train // 4} (floor); features standardized with the training "
                  "statistics (n/g); 'SGD' is SGD with momentum (footnote 3), lr 0.01 and momentum 0.9 from Table 2's "
                  "grid (the tuned values are n/g); MB-LSR1 with its defaults (m = 16, δ₀ = 1e-4, ζ = 1); epochs (10), "
                  "seeds (1) and train vs test accuracy are n/g.",
        ))


_mb_fig1_presets()

# ---------------------------------------------------------------------------------------------
# [REN] thesis Table 3.8 (§3.7.3, L1656-1689): ablation of K-BFGS's two improvements on the ch. 3 autoencoders
# ---------------------------------------------------------------------------------------------
#: qnref.optim.kbfgs.VARIANTS["table3.8-#1-off"] / ["table3.8-#2-off"] (tests check they agree): #1 = D_P D_LM
#: damping, #2 = the minibatched Hessian-action BFGS update of H_A
_T38_OFF = {"#1 off": {"version": "ch3", "damping_scheme": "dd"},
            "#2 off": {"version": "ch3", "hessian_action": "moving-average"}}


def _t38_runs(hp: dict, batch: int = 1000) -> tuple[Run, ...]:
    """Table 3.8's four rows: K-BFGS (both on), #1 off, #2 off, K-BFGS-20 (both off = the ch. 2 algorithm)."""
    b = {"batch_size": batch}
    kb = {**b, "lr": hp["kbfgs"][0], "damping": hp["kbfgs"][1]}
    return (
        Run("K-BFGS", "kbfgs", kb),
        Run("K-BFGS (#1 off)", "kbfgs", {**kb, **_T38_OFF["#1 off"]}),
        Run("K-BFGS (#2 off)", "kbfgs", {**kb, **_T38_OFF["#2 off"]}),
        Run("K-BFGS-20", "kbfgs", {**b, "version": "ch2", "lr": hp["k20"][0], "damping": hp["k20"][1]}),
    )


_T38_NOTES = ("Table 3.8 reports the training loss averaged over 5 seeds 'using the best HP values for each algorithm' "
              "(L1689); the #1-off / #2-off values are n/g: they take K-BFGS's Table 3.5 (lr, λ), K-BFGS-20 its own "
              "Table 3.5 values; 'the same MLP autoencoder experiments' as §3.7.1 (L1685): batch 1000, T = 1, no L2 "
              "(L1572), 500 s (MNIST, CURVES) / 2000 s (FACES) per run (L1467). The table has no K-BFGS(L) rows.")
_T38_SMALL = "ren-ch3-table3.8-small"
_add(Preset(
    name=_T38_SMALL,
    description="[REN] Table 3.8 at small scale: K-BFGS, K-BFGS (#1 off: DD damping), K-BFGS (#2 off: moving-average "
                "Hessian action), K-BFGS-20 on the digits autoencoder (MNIST column of Table 3.5)",
    paper="Ren thesis, §3.7.3, Table 3.8 (small replica)", dataset="digits", dataset_kwargs={"flat": True},
    autoencoder=True, model="autoencoder-digits", model_kwargs={"activation": "relu"}, epochs=10, seeds=(0, 1),
    runs=_t38_runs(_CH3["mnist"], 100), metric="train_loss",
    notes="batch 100 (1000 would be 70 % of digits), 10 epochs instead of 500 s, 2 seeds instead of 5; the MNIST "
          "column's (lr, λ).",
))
for _t38 in ("mnist", "faces", "curves"):
    _t38_ds, _t38_kw, _t38_ae = _AE_DATA[_t38]
    _add(Preset(
        name=f"ren-ch3-table3.8-{_t38}",
        description=f"[REN] Table 3.8, {_t38.upper()} autoencoder: K-BFGS with both improvements, with #1 (D_P D_LM) off, "
                    "with #2 (minibatched Hessian action) off, and K-BFGS-20 (both off)",
        paper="Ren thesis, §3.7.3, Table 3.8, Table 3.5", dataset=_t38_ds, dataset_kwargs=dict(_t38_kw),
        autoencoder=_t38_ae, model=_AE[_t38], model_kwargs={"activation": "relu"}, epochs=1000,
        max_time=_AE_TIME[_t38], seeds=tuple(range(5)), runs=_t38_runs(_CH3[_t38]), scale="paper", metric="train_loss",
        replica=_T38_SMALL, notes=_T38_NOTES,
    ))
del _t38, _t38_ds, _t38_kw, _t38_ae

# ---------------------------------------------------------------------------------------------
# old names (kept working)
# ---------------------------------------------------------------------------------------------
for _old, _new in (("lsr1-fig1-digits", "lsr1-fig1-small"), ("lsr1-fig3-batch1000", "lsr1-fig3-small"),
                   ("mblsr1-large-batch-digits", "mblsr1-fig2-mnist-small"), ("sqn-poster-toy", "sqn-toy-medium"),
                   ("soc-lenet-digits", "soc-lenet-small"), ("ren-ch2-autoencoder-digits", "ren-ch2-mnist-small"),
                   ("ren-ch4-cnn-digits", "ren-ch4-cnn-small"), ("ren-ch5-smw-autoencoder-digits", "ren-ch5-mnist-small")):
    _alias(_old, _new)
del _bn, _sfx, _fig, _ds, _model, _l2, _lr, _std, _b, _size, _net, _kw, _abl, _batch, _table, _set, _dkw, _ae
del _hp, _tab, _old, _new
