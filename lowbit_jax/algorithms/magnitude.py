"""Magnitude pruning as a pytree transform: `lowbit_jax.magnitude_prune(params, calib, options)` sets the
smallest-magnitude weights of the calibrated weights to exactly zero.

    calib = lowbit_jax.calibrate(apply_fn, params, batches)
    pruned = lowbit_jax.magnitude_prune(params, calib)                                    # 50 % per layer
    pruned = lowbit_jax.magnitude_prune(params, calib, lowbit_jax.Sparsity(fraction=0.6, scope=Scope.GLOBAL))
    pruned = lowbit_jax.magnitude_prune(params, calib, lowbit_jax.NM(n=2, m=4))            # 2:4 along K

The baseline of Han et al., "Learning both Weights and Connections for Efficient Neural Networks" (NeurIPS 2015)
and of the SparseGPT paper's tables (Zhu & Gupta 2017's one-shot magnitude pruning). The calibration supplies only
each weight's layout (its contraction block and stack axes, as for every quantizer): N:M groups run along the
contraction axis K, and a stack's layers are pruned each on its own (Scope.LAYER). No statistics are used, so
weights without them (convolutions) are pruned like the others, without a warning. The result is a new tree of the
same structure, dtypes and shapes: pruned weights stay float arrays with exact zeros.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lowbit_jax import select as sel
from lowbit_jax.algorithms import common
from lowbit_jax.algorithms.sparsity import NM, Scope, Sparsity, check_k, check_pattern, lowest, magnitude_pruned
from lowbit_jax.checks import check_finite_outputs
from lowbit_jax.passes.calibration import Calibration


def check_prunable(t: common.Target, pattern, op: str) -> None:
  if not jnp.issubdtype(np.dtype(t.leaf.dtype), jnp.floating):
    raise ValueError(f"{t.where}: expected a floating-point weight to prune, got dtype {t.leaf.dtype}")
  if not bool(jnp.all(jnp.isfinite(jnp.asarray(t.leaf)))):
    raise ValueError(f"{t.where}: expected finite weights, found NaN/inf")
  check_k(pattern, t.layout.k, t.where)


def to_leaf(t: common.Target, kn):
  """A float (L, K, N) result back in `t`'s leaf layout and dtype."""
  lay = t.layout
  return lay.kn_to_leaf(jnp.reshape(kn, lay.b_shape + (lay.k, lay.n))).astype(t.leaf.dtype)


def magnitude_prune(params, calib: Calibration, options: Sparsity | NM = Sparsity(), *, where: sel.Where = None,
                    strict: bool = False):
  """Prune the calibrated weights of `params` by magnitude; returns a new tree with exact zeros.

  Args:
    params: the parameters `calib` was collected on.
    calib: `lowbit_jax.calibrate(apply_fn, params, batches)` (only each weight's layout is read).
    options: `Sparsity(fraction, scope)`: the floor(fraction * entries) smallest |w| of each (K, N) problem
      (Scope.LAYER: a weight, or each layer of a stack) or of all selected weights together (Scope.GLOBAL);
      `NM(n, m)`: the n largest |w| of every m consecutive weights along the contraction axis are kept.
    where: which calibrated weights to prune (default: all of them).
    strict: accepted for the signature every pruner shares; magnitude pruning reads no statistics, so nothing is
      degenerate.

  Raises:
    ValueError: naming the key path, for NaN/inf weights, a contraction length not divisible by m (N:M); a
      fraction outside [0, 1) or n > m when the options are built; a calibration from another model.
  """
  op = "magnitude_prune"
  check_pattern(options, op)
  common.check_strict(strict, op)
  targets = common.calibrated_leaves(params, calib, where, op)
  for t in targets:
    check_prunable(t, options, op)
  done = {}
  if isinstance(options, Sparsity) and options.scope is Scope.GLOBAL:
    flat = [jnp.abs(t.kn(jnp.float32)).reshape(-1) for t in targets]
    sizes = np.cumsum([f.shape[0] for f in flat])[:-1]
    allw = jnp.concatenate(flat)
    pruned = jnp.split(lowest(allw, int(options.fraction * allw.shape[0])), sizes)
    for t, m in zip(targets, pruned):
      w = t.kn()
      done[t.path] = to_leaf(t, jnp.where(m.reshape(w.shape), jnp.zeros((), w.dtype), w))
  else:
    for t in targets:
      w = t.kn()
      done[t.path] = to_leaf(t, jnp.where(magnitude_pruned(w, options), jnp.zeros((), w.dtype), w))
  check_finite_outputs(((sel.path_repr(p), q) for p, q in done.items()), op)
  return common.replace_leaves(params, done)
