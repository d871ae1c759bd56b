"""torch ⇄ qnref: model conversion, oracle comparisons, an Objective over any torch model, and a
``torch.optim.Optimizer`` wrapper for qnref's optimizers. See docs/adapters.md.

* :func:`from_torch` / :func:`to_torch` — ``nn.Sequential`` ⇄ (qnref model, θ), same weights (residual
  blocks as :class:`ResidualBlock` with an optional :class:`PadShortcut`);
* :func:`compare` / :func:`assert_agree` — every qnref product vs torch.func, max relative differences;
* :class:`TorchObjective` / :class:`TorchProblem` — qnref's objective protocol over any torch model;
* :class:`QNRefOptimizer` — a qnref optimizer as a ``torch.optim.Optimizer``.
"""
from .compare import ALL_WHAT, DEFAULT_WHAT, assert_agree, compare, drop_running_stats, rel_diff, torch_hvp
from .convert import (Conversion, PadShortcut, ResidualBlock, UnsupportedLayerError, convert, from_torch, running_stats,
                      set_running_stats, theta_to_torch_params, to_torch, torch_to_theta)
from .losses import qnref_loss_torch, resolve_loss
from .objective import (LoaderProblem, TorchObjective, TorchPoint, TorchProblem, flat_params, from_torch_tensor,
                        to_torch_tensor)
from .optimizer import NEEDS, ClosureProblem, QNRefOptimizer, requirement

__all__ = ["from_torch", "to_torch", "convert", "running_stats", "set_running_stats", "ResidualBlock", "PadShortcut", "Conversion", "UnsupportedLayerError", "theta_to_torch_params",
           "torch_to_theta", "compare", "assert_agree", "rel_diff", "torch_hvp", "drop_running_stats", "DEFAULT_WHAT",
           "ALL_WHAT", "qnref_loss_torch", "resolve_loss", "TorchObjective", "TorchPoint", "TorchProblem", "flat_params",
           "from_torch_tensor", "to_torch_tensor", "QNRefOptimizer", "ClosureProblem", "LoaderProblem", "NEEDS", "requirement"]
