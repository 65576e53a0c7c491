"""Non-finite gradients in a training step: a clear error (eager) or a skipped step (under jit), never corrupted
parameters.

    lowbit_jax.check_finite(grads)                           # eager: ValueError naming every bad key path
    params, opt_state, ok = lowbit_jax.skip_nonfinite(grads, (params, opt_state), (new_params, new_opt_state))

`skip_nonfinite` is the documented jit-friendly policy (as `optax.apply_if_finite`): when any gradient entry is
NaN/inf the step is skipped, i.e. the old parameters and optimizer state are returned unchanged, and `ok` is False.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax import select as sel
from lowbit_jax.qarray import QArray


def _float_leaves(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(p, x) for p, x in flat if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]


def nonfinite_paths(tree) -> list[str]:
  """Key paths (`params[...]` form) of the float leaves holding a NaN or inf (concrete arrays only)."""
  return [f"{sel.path_repr(p)} ({int(np.size(x) - np.count_nonzero(np.isfinite(np.asarray(x))))} values)"
          for p, x in _float_leaves(tree) if not np.all(np.isfinite(np.asarray(x)))]


def check_finite(tree, *, what: str = "gradients") -> None:
  """Raise ValueError naming every key path of `tree` with a NaN/inf. Eager only (under jit use
  `skip_nonfinite`)."""
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QArray))):
    raise ValueError(f"check_finite: {what} are traced (inside jit); expected concrete arrays, or use "
                     f"lowbit_jax.skip_nonfinite inside the jitted step")
  bad = nonfinite_paths(tree)
  if bad:
    raise ValueError(f"non-finite {what} at: " + ", ".join(bad) + "; expected finite values (lower the learning rate, "
                     "check the data, or skip the step with lowbit_jax.skip_nonfinite)")


def all_finite(tree):
  """A scalar bool array: every float leaf of `tree` is finite (jit-friendly)."""
  oks = [jnp.all(jnp.isfinite(x)) for _, x in _float_leaves(tree)]
  return jnp.all(jnp.stack(oks)) if oks else jnp.bool_(True)


def skip_nonfinite(grads, old, new):
  """(`new` if every gradient is finite else `old`, ok): the skipped-step policy, under jit or eagerly."""
  ok = all_finite(grads)
  return jax.tree.map(lambda a, b: jnp.where(ok, b, a), old, new), ok


__all__ = ["check_finite", "nonfinite_paths", "all_finite", "skip_nonfinite"]
