"""AWQ as a pytree transform: `lowbit_jax.awq(params, calib, ...)` maps `awq_core` over the calibrated weights.

    calib = lowbit_jax.calibrate(apply_fn, params, batches)
    qparams = lowbit_jax.awq(params, calib)                       # int_spec(4, group_size=128)
    logits = lowbit_jax.quantized(apply_fn)(qparams, tokens)

Paper: Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration", MLSys 2024.
Reference implementation: mit-han-lab/llm-awq, `awq/quantize/auto_scale.py` (scale search over the linears that
share an input) and `awq/quantize/auto_clip.py` (clip search per linear).

For every group of weights fed by the same input X (T, K) (q/k/v after one norm; gate/up after another; any
single linear otherwise), and for every layer of a scanned stack (or expert) separately:

    s* = argmin_{α ∈ {0, 1/n_grid, ..., (n_grid-1)/n_grid}}  Σ_{W in group} || X W − (X / s) Q(s ⊙ W) ||² / numel,
         s(α) = mean|x|^α / sqrt(max · min)                                             (K,)
    W_c  = clip search on s* ⊙ W with the statistics of X / s*  (per (group, output) block, optional)
    Q    = QArray of Q(W_c) with in_scale s*, standing for W_c / s*: ``x @ W ≈ (x / s*) @ Q(W_c)``

Weights are grouped by their input as the trace saw it (`WeightUse.input_ids`, with one stacked layout per group).
Every layout works: each weight is mapped to (*B, K, N) by its `WeightCalibration.layout` (B: scanned layers in
any position, experts; K: the contraction block, one or several axes), the searches of all B problems of a group
run as one `lax.map`, and the result goes back to the leaf's layout with its in_scale s (*B, K). Weights without
calibration statistics (convolutions) are quantized round-to-nearest, with one warning naming them.

Deliberate deviations from the reference (see also `awq_core`):
  * losses are scored per linear with the calibration Hessian (output MSE of each linear, summed over the group)
    instead of re-running the enclosing block (attention / MLP) for every candidate;
  * with `fold=True` (the default), s is folded into the preceding per-channel parameter (a norm's scale:
    p' = p / s, see `passes/fold.py`) when the group is exactly the set of linears that parameter's output feeds
    and their stack axes lead; otherwise it is kept on the QArray as `in_scale` (the kernels divide the
    activations by it). The float function is unchanged either way. The reference's v -> o and up -> down pairs
    (folding into a preceding linear) are not folded: o and down get their own searched scale on their own input,
    kept as `in_scale`;
  * every selected linear is clipped (the reference skips q and k, whose error is amplified by softmax; we have no
    model-specific names), and the output head is treated like any other selected linear.

Nothing is modified in place: every weight and statistic is validated before any search runs, and the result is a
new tree.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from lowbit_jax import select as sel
from lowbit_jax.algorithms import awq_core, common
from lowbit_jax.algorithms.common import Target
from lowbit_jax.checks import as_bool, as_float, as_int, check_finite_outputs
from lowbit_jax.passes.calibration import Calibration
from lowbit_jax.passes.fold import FoldTarget, fold_scales, group_target
from lowbit_jax.qarray import QArray, with_in_scale
from lowbit_jax.spec import QuantSpec, int_spec

DEFAULT_SPEC = int_spec(4, group_size=128)


def _check(t: Target, spec: QuantSpec) -> None:
  """Validate one weight and its statistics; every failure is a ValueError naming `t.where`."""
  common.check_weight(t, spec, "awq")
  if not t.has_stats:
    return
  lay, st = t.layout, t.wc.stats
  need = "Stat.HESSIAN and Stat.ABS_MEAN"
  common.check_stat(t, "Hessian", st.xtx, lay.b_shape + (lay.k, lay.k), need, "awq", inf_ok=True)
  common.check_stat(t, "mean |x| (ABS_MEAN)", st.abs_sum, lay.b_shape + (lay.k,), need, "awq", inf_ok=True)


def _degenerate(group: list[Target], H: np.ndarray, m: np.ndarray, op: str, strict: bool) -> np.ndarray:
  """The (L,) layers of a group whose statistics AWQ must not search with (warned, or raised under `strict`)."""
  diag = np.diagonal(H, axis1=-2, axis2=-1)
  return common.degenerate(group, {
      "its activations are all zero (or no row was seen)": common.all_zero(m),
      "its activations overflow float32 (an inf Hessian or mean |x|)": common.overflowing(H, 2)
      | common.overflowing(m, 1),
      "every input channel's |x| is constant over the calibration rows (a rank-1 Hessian: the scale and clip "
      "searches would clip weights freely)": common.constant(diag, m) & ~common.all_zero(m)}, op, strict)


@functools.partial(jax.jit, static_argnames=("spec", "n_grid", "clip", "max_shrink"))
def _search_group(Ws: tuple, H, m, bad, *, spec: QuantSpec, n_grid: int, clip: bool, max_shrink: float):
  """`awq_core.awq_layer` over the leading axis L of every W (L, K, N_i), H (L, K, K) and mean |x| m (L, K), then
  each member quantized: (s (L, K), QArrays (L, K, N_i) along -2 of s ⊙ W_c with in_scale s, standing for W_c).
  The layers in `bad` (L,) get s = 1 and no clipping: round-to-nearest of W."""
  def one(args):
    ws, h, mean, b = args
    h = jnp.where(b, jnp.eye(h.shape[0], dtype=h.dtype), h)
    mean = jnp.where(b, 1.0, mean)
    s, _, clipped = awq_core.awq_layer(ws, h, mean, spec=spec, n_grid=n_grid, clip=clip, max_shrink=max_shrink)
    return jnp.where(b, 1.0, s), tuple(jnp.where(b, w, c) for w, c in zip(ws, clipped))
  s, clipped = lax.map(one, (Ws, H, m, bad))
  return s, tuple(with_in_scale(w, s, spec) for w in clipped)


def _fold_target(group: list[Target], targets: dict) -> FoldTarget | None:
  """The norm-like parameter the group's scale folds into: the group is exactly its consumers, their stack axes
  lead (in scan order) and the per-layer scale (*B, K) has its shape."""
  t = group_target(targets, [m.where for m in group])
  if t is None:
    return None
  for m in group:
    lay = m.layout
    if lay.map_axes != tuple(range(len(lay.b_shape))) or lay.b_shape + (lay.k,) != tuple(t.leaf_shape):
      return None
  return t


def _check_options(n_grid, clip, max_shrink, fold, strict) -> None:
  as_bool(fold, "awq: fold")
  as_int(n_grid, "awq: n_grid", low=1)
  as_bool(clip, "awq: clip")
  as_float(max_shrink, "awq: max_shrink", low=0.0, high=1.0, high_open=True)
  common.check_strict(strict, "awq")


def awq(params, calib: Calibration, spec: QuantSpec = DEFAULT_SPEC, *, where: sel.Where = None, n_grid: int = 20,
        clip: bool = True, max_shrink: float = 0.5, fold: bool = True, strict: bool = False):
  """Quantize the calibrated weights of `params` with AWQ; returns a new tree with QArray leaves.

  Args:
    params: the parameters `calib` was collected on.
    calib: `lowbit_jax.calibrate(apply_fn, params, batches)` (with Stat.HESSIAN and Stat.ABS_MEAN).
    spec: an integer QuantSpec (`lowbit_jax.int_spec(bits, group_size=..., symmetric=..., scale_dtype=...)`; the
      reference's default is 4-bit, groups of 128, asymmetric); its axis is ignored: each weight is quantized
      along the contraction block the trace recorded. The in_scale is always float32.
    where: which calibrated weights to quantize (default: all of them).
    n_grid: candidates α = i / n_grid, i < n_grid, for the scale search, and the clip search's shrink step.
    clip: run the clip search after the scale search.
    max_shrink: the clip search tries clamp ranges down to (1 - max_shrink) of each block's absmax.
    fold: fold s into the preceding per-channel parameter where the graph allows (norm -> linears; traced once
      from `calib.apply_fn` on the first calibration batch, see `passes/fold.py`).
    strict: raise instead of warning (`lowbit_jax.DegenerateStatisticsWarning`) and quantizing round-to-nearest
      (s = 1, no clipping) the weights of a group (or layer of a stack) whose calibration is degenerate: all-zero,
      overflowing, or constant activations (every channel's |x| the same in every row).

  Returns:
    A tree like `params` with the selected weights replaced by QArrays whose `in_scale` is the searched s; with
    `fold`, the weights whose s was folded carry no in_scale and their norm's parameter is divided by s.

  Raises:
    ValueError: naming the key path, for a non-integer spec, a calibration from another model, missing or NaN
      statistics, NaN weights, unsupported bits/group combinations, or a result with NaN/inf.
  """
  common.check_calibration(calib, "awq")
  common.check_spec(spec, "awq", integer=True)
  _check_options(n_grid, clip, max_shrink, fold, strict)
  targets = common.calibrated_leaves(params, calib, where, "awq")
  for t in targets:
    _check(t, spec)
  done = common.rtn_fallback([t for t in targets if not t.has_stats], spec, "awq")
  groups = common.input_groups([t for t in targets if t.has_stats])
  fold_to = common.foldable(params, calib) if fold else {}
  folded: dict[tuple, jax.Array] = {}
  kspec = common.kn_spec(spec)
  bar = tqdm(total=len(groups), desc="awq", leave=False, disable=len(groups) < 16)
  for group in groups:
    ft = _fold_target(group, fold_to)
    st, lay = group[0].wc.stats, group[0].layout
    H = np.reshape(np.asarray(st.hessian, np.float32), (-1, lay.k, lay.k))
    m = np.reshape(np.asarray(st.abs_mean, np.float32), (-1, lay.k))
    bad = _degenerate(group, H, m, "awq", strict)
    s, qs = _search_group(tuple(t.kn(jnp.float32) for t in group), jnp.asarray(H), jnp.asarray(m),
                          jnp.asarray(bad), spec=kspec, n_grid=n_grid, clip=clip, max_shrink=float(max_shrink))
    for t, q in zip(group, qs):   # folded: the QArray stands for s ⊙ W_c, s goes into the norm
      q = QArray(q.codes, q.scale, q.zero, spec=q.spec, k=q.k_shape, dtype=np.dtype(t.leaf.dtype),
                 in_scale=None if ft is not None else q.in_scale)
      done[t.path] = common.unflatten_q(q, t)
    if ft is not None:
      folded[ft.leaf_path] = s.reshape(ft.leaf_shape)
    bar.update()
  bar.close()
  check_finite_outputs(((sel.path_repr(p), q) for p, q in done.items()), "awq")
  out = common.replace_leaves(params, done)
  return fold_scales(out, folded) if folded else out
