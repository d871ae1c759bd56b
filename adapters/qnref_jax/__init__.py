"""JAX ⇄ qnref: a small layer-dict model spec, oracle comparisons with jax.grad/jvp/vjp, an Objective
over pure JAX functions (ravel_pytree), and an optax-style wrapper of qnref optimizers.
See docs/adapters.md. float64 runs in a scoped ``jax.enable_x64(True)`` (:func:`x64_scope`); the process-wide
flag is never switched (:func:`enable_x64` is there for callers who want that themselves)."""
from .compare import ALL_WHAT, DEFAULT_WHAT, assert_agree, compare, jax_loss, rel_diff
from .convert import (UnsupportedLayerError, apply, enable_x64, from_spec, layer_keys, merge, params_to_theta, split,
                      theta_to_params, to_spec)
from .objective import GradientTransformation, JaxObjective, JaxPoint, JaxProblem, as_gradient_transformation, x64_scope
from .transform import (GradientTransformationExtraArgs, QNRefState, requirement, state_from_arrays, state_to_arrays,
                        transformation)

__all__ = ["from_spec", "to_spec", "split", "merge", "apply", "params_to_theta", "theta_to_params", "enable_x64",
           "UnsupportedLayerError", "layer_keys", "compare", "assert_agree", "rel_diff", "jax_loss", "DEFAULT_WHAT", "ALL_WHAT",
           "JaxObjective", "JaxPoint", "JaxProblem", "as_gradient_transformation", "GradientTransformation",
           "transformation", "QNRefState", "GradientTransformationExtraArgs", "requirement", "x64_scope",
           "state_to_arrays", "state_from_arrays"]
