"""GPTQ as a pytree transform: `lowbit_jax.gptq(params, calib, ...)` maps `gptq_core` over the calibrated weights.

    calib = lowbit_jax.calibrate(apply_fn, params, batches)
    qparams = lowbit_jax.gptq(params, calib, bits=4, group_size=128)
    logits = lowbit_jax.quantized(apply_fn)(qparams, tokens)

Each calibrated weight is quantized with its own Hessian (per layer for a scanned stack). With
`true_sequential=True` the weights are visited in the order the model first uses them, and after each group of
weights that share one input (q/k/v; gate/up) the statistics of the remaining weights are re-captured from the model
with the already-quantized weights in place, as the reference implementation feeds each block the outputs of the
quantized blocks before it (IST-DASLab/gptq, `llama.py`, `--true-sequential`). A scanned stack is one leaf, so its
layers are quantized together from one capture. See `gptq_core` for the numerics.

Nothing is modified in place: all weights and statistics are validated before any is quantized, and the result is
a new tree.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lowbit_jax import select as sel
from lowbit_jax.algorithms.common import calibrated_leaves, leaves_by_path, replace_leaves
from lowbit_jax.algorithms.gptq_core import gptq_core
from lowbit_jax.passes.calibration import Calibration, WeightCalibration
from lowbit_jax.qarray import QArray
from lowbit_jax.spec import int_spec


def _layout(leaf, wc: WeightCalibration, where: str) -> str:
  """'kn' for (*stack, K, N) leaves, 'nk' for 2-D (N, K) ones; anything else is an error."""
  nd = len(leaf.shape)
  k = int(np.shape(wc.hessian)[-1])
  stack = tuple(range(nd - 2))
  if wc.contract_axes == (nd - 2,) and tuple(wc.stacked_axes) == stack:
    layout = "kn"
  elif nd == 2 and wc.contract_axes == (1,) and not wc.stacked_axes:
    layout = "nk"
  else:
    raise ValueError(f"{where}: GPTQ supports (in, out) weights, optionally stacked over leading axes, and 2-D "
                     f"(out, in) ones; this leaf of shape {tuple(leaf.shape)} is contracted over axes "
                     f"{wc.contract_axes} with stacked axes {wc.stacked_axes}")
  kk = leaf.shape[wc.contract_axes[0]]
  if kk != k or tuple(np.shape(wc.hessian)[:-2]) != tuple(leaf.shape[a] for a in stack if layout == "kn"):
    raise ValueError(f"{where}: the calibration does not match this weight (Hessian of shape "
                     f"{np.shape(wc.hessian)} for a leaf of shape {tuple(leaf.shape)}); expected statistics from "
                     f"the same model")
  if not bool(jnp.all(jnp.isfinite(wc.hessian))):
    raise ValueError(f"{where}: the calibration statistics contain NaN/inf; expected finite statistics")
  return layout


def _transpose_2d(q: QArray) -> QArray:
  """A (K, N) QArray quantized along axis -2 as the (N, K) QArray quantized along axis -1 (same bytes)."""
  spec = dataclasses.replace(q.spec, granularity=dataclasses.replace(q.spec.granularity, axis=-1))
  zero = None if q.zero is None else q.zero.T
  return QArray(q.codes.T, q.scale.T, zero, spec=spec, k=q.k, dtype=q.dtype)


def _quantize_leaf(leaf, wc: WeightCalibration, layout: str, spec, where: str, **opts) -> QArray:
  if layout == "nk":
    return _transpose_2d(gptq_core(jnp.asarray(leaf).T, wc.hessian, spec, path=where, **opts).q)
  w = jnp.asarray(leaf)
  if w.ndim == 2:
    return gptq_core(w, wc.hessian, spec, path=where, **opts).q
  stack = w.shape[:-2]
  flat_w = w.reshape((-1,) + w.shape[-2:])                                   # (layers, K, N)
  flat_h = jnp.reshape(wc.hessian, (-1,) + np.shape(wc.hessian)[-2:])       # (layers, K, K)
  qs = [gptq_core(flat_w[i], flat_h[i], spec, path=f"{where}[{i}]", **opts).q for i in range(flat_w.shape[0])]
  q = jax.tree.map(lambda *xs: jnp.stack(xs), *qs)
  return jax.tree.map(lambda x: x.reshape(stack + x.shape[1:]), q)


def gptq(params, calib: Calibration, *, bits: int = 4, group_size: int | None = 128, sym: bool = True,
         act_order: bool = False, static_groups: bool = False, blocksize: int = 128, percdamp: float = 0.01,
         true_sequential: bool = False, scale_dtype=jnp.float32, where: sel.Where = None):
  """Quantize the calibrated weights of `params` with GPTQ; returns a new tree with QArray leaves.

  Args:
    params: the parameters `calib` was collected on.
    calib: `lowbit_jax.calibrate(apply_fn, params, batches)`.
    bits, group_size, sym: the integer grid (`lowbit_jax.int_spec`; group_size None = per channel).
    act_order, static_groups, blocksize, percdamp: as in the reference implementation (see `gptq_core`).
    true_sequential: re-capture statistics after each group of same-input weights (see the module docstring).
    scale_dtype: dtype of the stored scales.
    where: which calibrated weights to quantize (default: all of them).

  Raises:
    ValueError: naming the key path, for a calibration from another model, missing or NaN statistics, an
      unsupported layout, or unsupported bits/group combinations.
  """
  spec = int_spec(bits, group_size=group_size, symmetric=sym, scale_dtype=scale_dtype)
  targets = []
  for w, _, leaf in calibrated_leaves(params, calib, where, "gptq"):
    _layout(leaf, calib[w], w)
    targets.append(w)
  leaves = leaves_by_path(params)
  opts = dict(blocksize=blocksize, percdamp=percdamp, act_order=act_order, static_groups=static_groups)

  done: dict[str, QArray] = {}
  current, stats = params, calib
  bar = tqdm(total=len(targets), desc="gptq", leave=False)
  remaining = list(targets)
  while remaining:
    if true_sequential:   # the next weight and every other one fed by the same input
      head = stats[remaining[0]].hessian
      group = [w for w in remaining if np.shape(stats[w].hessian) == np.shape(head)
               and bool(jnp.array_equal(stats[w].hessian, head))]
    else:
      group = list(remaining)
    for w in group:
      path, leaf = leaves[w]
      wc = stats[w]
      done[w] = _quantize_leaf(leaf, wc, _layout(leaf, wc, w), spec, w, **opts)
      bar.update()
    remaining = [w for w in remaining if w not in done]
    if true_sequential and remaining:
      current = replace_leaves(params, done)
      stats = calib.recalibrate(current)
  bar.close()
  return replace_leaves(params, done)
