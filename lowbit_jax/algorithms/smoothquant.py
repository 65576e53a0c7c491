"""SmoothQuant as a pytree transform: W8A8 (int8 weights, per-token dynamic int8 activations, int32 accumulation)
with the activation outliers migrated into the weights by a per-input-channel scale.

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models" (ICML 2023), Section 4; reference code: mit-han-lab/smoothquant, `smoothquant/smooth.py`
(`smooth_ln_fcs`).

    calib = lowbit_jax.calibrate(apply_fn, params, batches)           # needs Stat.ABSMAX
    qparams = lowbit_jax.smoothquant(params, calib, alpha=0.5)
    logits = lowbit_jax.quantized(apply_fn)(qparams, tokens)          # W8A8 through kernels.qmatmul

For a weight W (*stack, K, *out) contracted over its axis K, with activations X (T, K) feeding it:

    s_j = clamp(max_t |X[t, j]|^α / clamp(max_n |W[j, n]|, 1e-5)^(1-α), 1e-5)      s: (*stack, K)
    x @ W == (x / s) @ (s ⊙ W),  s ⊙ W quantized to int8, symmetric, one absmax scale per output channel

`max_t |X|` is the calibration's `absmax`; `max_n |W[j, n]|` is taken over all output axes and, for weights that
share one input (q/k/v; gate/up: identical `absmax` and Hessian statistics), over all of them, so the group gets
one s, as `smooth_ln_fcs` does. The activations of every matmul with the result are quantized per token to int8
(`ActQuant(per_token=True)`, the paper's O1/O2 dynamic setting).

Deviations from the reference code:
* by default s is kept as the QArray's `in_scale` (`lowbit_jax.qarray.with_in_scale`): the dispatcher divides the
  activations by s before quantizing them. With `fold=True`, as in the paper, 1/s is folded into the preceding
  norm's scale (`passes/fold.py`) when the group is exactly the set of linears that norm feeds (free at run time);
  the other groups keep the in_scale.
* Because s need not be folded, every calibrated weight is smoothed (also o_proj / down_proj, which the
  reference leaves unsmoothed as no norm precedes them); `where` restricts the set.
* The weight scale is the max over output channels of the unquantized weights of the selected group members
  (weights not selected by `where` do not widen it).

All weights and statistics are validated before any is quantized; the input tree is never modified.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lowbit_jax import select as sel
from lowbit_jax.algorithms.common import calibrated_leaves, replace_leaves
from lowbit_jax.passes.calibration import Calibration, WeightCalibration
from lowbit_jax.passes.fold import fold_scales, fold_targets, group_target
from lowbit_jax.qarray import QArray, check_quantizable, with_in_scale
from lowbit_jax.spec import ActQuant, Format, PerChannel, QuantSpec

CLAMP = 1e-5   # smooth.py's clamp(min=1e-5) of the weight scales and of s


@functools.partial(jax.jit, static_argnames=("spec",))
def _with_in_scale_jit(w, s, spec: QuantSpec) -> QArray:
  return with_in_scale(w, s, spec)   # inputs validated (and errors named) before any call


@dataclasses.dataclass(frozen=True)
class Target:
  """One calibrated weight to transform: its key path, leaf, statistics and contraction axis (non-negative)."""
  where: str
  path: tuple
  leaf: object
  wc: WeightCalibration
  axis: int


def contraction_axis(leaf, wc: WeightCalibration, where: str, op: str) -> int:
  """The contraction axis c of a (*stack, K, *out) leaf: one contraction axis, the axes before it stacked (per
  layer), at least one output axis after it; anything else raises, naming `where`."""
  shape, nd = tuple(np.shape(leaf)), len(np.shape(leaf))
  ok = len(wc.contract_axes) == 1 and tuple(wc.stacked_axes) == tuple(range(wc.contract_axes[0]))
  if not ok or wc.contract_axes[0] >= nd - 1:
    raise ValueError(f"{where}: {op} supports (in, out) weights (optionally stacked over leading axes, several "
                     f"output axes allowed); this leaf of shape {shape} is contracted over axes "
                     f"{wc.contract_axes} with stacked axes {wc.stacked_axes}")
  return wc.contract_axes[0]


def calibrated_targets(params, calib, where: sel.Where, op: str) -> list[Target]:
  """The calibrated, selected float weights of `params`, with their layouts validated against `calib`."""
  return [Target(w, path, leaf, calib[w], contraction_axis(leaf, calib[w], w, op))
          for w, path, leaf in calibrated_leaves(params, calib, where, op)]


def checked_absmax(t: Target, op: str) -> np.ndarray:
  """The (*stack, K) activation absmax of a target, validated: collected, from this model, finite."""
  a = t.wc.absmax
  if a is None:
    raise ValueError(f"{t.where}: the calibration has no absmax statistics; expected "
                     f"lowbit_jax.calibrate(..., stats=...) to include Stat.ABSMAX for {op}")
  a = np.asarray(a, np.float32)
  want = tuple(np.shape(t.leaf)[:t.axis + 1])
  if a.shape != want:
    raise ValueError(f"{t.where}: the calibration does not match this weight (absmax of shape {a.shape} for a "
                     f"leaf of shape {tuple(np.shape(t.leaf))}; expected {want}); expected statistics from the "
                     f"same model")
  if not np.all(np.isfinite(a)) or np.any(a < 0):
    raise ValueError(f"{t.where}: the calibration's absmax statistics contain NaN/inf or negative values; "
                     f"expected finite statistics")
  return a


def w8a8_spec(axis: int, act: ActQuant) -> QuantSpec:
  """int8, symmetric, one absmax scale per output channel (contraction `axis`, negative), with activations."""
  return QuantSpec(format=Format.INT, bits=8, granularity=PerChannel(axis=axis), activations=act)


def _same_input(a: Target, b: Target, absmax: dict) -> bool:
  """Weights fed by one input: identical absmax (and Hessian, when collected) statistics."""
  if absmax[a.where].shape != absmax[b.where].shape or not np.array_equal(absmax[a.where], absmax[b.where]):
    return False
  ha, hb = a.wc.stats.xtx, b.wc.stats.xtx
  return ha is None or hb is None or bool(np.array_equal(np.asarray(ha), np.asarray(hb)))


def _groups(targets: list[Target], absmax: dict) -> list[list[Target]]:
  """Targets grouped by shared input, in calibration order."""
  groups: list[list[Target]] = []
  for t in targets:
    g = next((g for g in groups if _same_input(g[0], t, absmax)), None)
    if g is None:
      groups.append([t])
    else:
      g.append(t)
  return groups


def _weight_absmax(t: Target) -> np.ndarray:
  """max |W[..., j, n...]| over the output axes: (*stack, K)."""
  w = np.abs(np.asarray(t.leaf, np.float32))
  return np.max(w, axis=tuple(range(t.axis + 1, w.ndim)))


def smoothing_scales(act_absmax, weight_absmax, alpha: float) -> np.ndarray:
  """smooth.py's s = clamp(act^α / clamp(w, 1e-5)^(1-α), 1e-5), float32, elementwise."""
  act = np.asarray(act_absmax, np.float32)
  w = np.maximum(np.asarray(weight_absmax, np.float32), np.float32(CLAMP))
  s = np.power(act, np.float32(alpha)) / np.power(w, np.float32(1.0 - alpha))
  return np.maximum(s, np.float32(CLAMP)).astype(np.float32)


def smoothquant(params, calib: Calibration, *, alpha: float = 0.5, where: sel.Where = None, fold: bool = True):
  """W8A8 SmoothQuant of the calibrated weights of `params`; returns a new tree with QArray leaves.

  Args:
    params: the parameters `calib` was collected on.
    calib: `lowbit_jax.calibrate(apply_fn, params, batches)` with `Stat.ABSMAX` (collected by default).
    alpha: migration strength α in [0, 1] (0.5 in the paper; α = 1 moves all of the activation range into the
      weights, α = 0 gives s = 1 / max|W_j|).
    where: which calibrated weights to quantize (default: all of them).
    fold: fold 1/s into the preceding norm's scale where the graph allows (traced once from `calib.apply_fn` on
      the first calibration batch); those weights then carry no in_scale.

  Returns:
    The tree with each selected weight as an int8 per-output-channel QArray with `in_scale` s (none where s was
    folded) and `spec.activations == ActQuant(per_token=True)`.

  Raises:
    ValueError: naming the key path, for a calibration from another model, missing or NaN statistics, an
      unsupported layout, NaN/inf weights, or an alpha outside [0, 1].
  """
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0.0 <= alpha <= 1.0:
    raise ValueError(f"smoothquant: alpha must be a float in [0, 1] (0.5 in the paper), got {alpha!r}")
  if not isinstance(fold, bool):
    raise ValueError(f"smoothquant: fold must be a bool, got {fold!r}")
  targets = calibrated_targets(params, calib, where, "smoothquant")
  act = ActQuant(per_token=True)
  absmax = {t.where: checked_absmax(t, "smoothquant") for t in targets}
  for t in targets:
    check_quantizable(t.leaf, w8a8_spec(t.axis - len(np.shape(t.leaf)), act), t.where)

  groups = _groups(targets, absmax)
  foldable = fold_targets(calib.apply_fn, params, calib.batches[0], where=calib.options["where"]) if fold else {}
  done: dict[str, QArray] = {}
  folded: dict[tuple, np.ndarray] = {}
  bar = tqdm(total=len(targets), desc="smoothquant", leave=False, disable=len(targets) < 16)
  for g in groups:
    w_max = np.max(np.stack([_weight_absmax(t) for t in g]), axis=0)           # (*stack, K)
    s = smoothing_scales(absmax[g[0].where], w_max, float(alpha))
    ft = group_target(foldable, [t.where for t in g])
    if ft is not None and tuple(np.shape(s)) == ft.leaf_shape:
      folded[ft.leaf_path] = s
    else:
      ft = None
    for t in g:
      spec = w8a8_spec(t.axis - len(np.shape(t.leaf)), act)
      q = _with_in_scale_jit(jnp.asarray(t.leaf), jnp.asarray(s), spec)
      done[t.where] = q if ft is None else q.without_in_scale()
      bar.update()
  bar.close()
  out = replace_leaves(params, done)
  return fold_scales(out, folded) if folded else out


def smoothing_groups(params, calib: Calibration, *, where: sel.Where = None) -> list[list[str]]:
  """The key paths `smoothquant` gives one shared s each (weights fed by one input), in calibration order."""
  targets = calibrated_targets(params, calib, where, "smoothquant")
  absmax = {t.where: checked_absmax(t, "smoothquant") for t in targets}
  return [[t.where for t in g] for g in _groups(targets, absmax)]


__all__ = ["smoothquant", "smoothing_scales", "smoothing_groups", "calibrated_targets", "contraction_axis",
           "w8a8_spec", "replace_leaves", "Target", "CLAMP"]
