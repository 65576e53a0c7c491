"""SmoothQuant as a pytree transform: W8A8 (int8 weights, per-token dynamic int8 activations, int32 accumulation)
with the activation outliers migrated into the weights by a per-input-channel scale.

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models" (ICML 2023), Section 4; reference code: mit-han-lab/smoothquant, `smoothquant/smooth.py`
(`smooth_ln_fcs`).

    calib = lowbit_jax.calibrate(apply_fn, params, batches)           # needs Stat.ABSMAX
    qparams = lowbit_jax.smoothquant(params, calib, alpha=0.5)         # spec: W8A8_SPEC
    logits = lowbit_jax.quantized(apply_fn)(qparams, tokens)          # W8A8 through kernels.qmatmul

Every weight is seen in the layout the trace recorded (`WeightCalibration.layout`): (*B, K, N) with B its
scanned-layer / expert axes (any position), K its contraction block (one or several axes), N the rest. With
activations X (T, K) feeding it:

    s_j = clamp(max_t |X[t, j]|^α / clamp(max_n |W[j, n]|, 1e-5)^(1-α), 1e-5)      s: (*B, K)
    x @ W == (x / s) @ (s ⊙ W),  s ⊙ W quantized with `spec` (default `W8A8_SPEC`: int8, symmetric, one absmax
                                 scale per output channel, per-token dynamic int8 activations)

`max_t |X|` is the calibration's `absmax`; `max_n |W[j, n]|` is taken over all output axes and, for weights that
share one input (q/k/v; gate/up: the trace's `input_ids`), over all of them, so the group gets one s, as
`smooth_ln_fcs` does. The activations of every matmul with the result are quantized per token to int8
(`ActQuant(per_token=True)`, the paper's O1/O2 dynamic setting). Weights without calibration statistics
(convolutions) are quantized round-to-nearest with `spec`, with one warning naming them.

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

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lowbit_jax import select as sel
from lowbit_jax.algorithms import common
from lowbit_jax.algorithms.common import Target, replace_leaves
from lowbit_jax.checks import as_bool, as_float, check_finite_outputs
from lowbit_jax.passes.calibration import Calibration
from lowbit_jax.passes.fold import fold_scales, group_target
from lowbit_jax.qarray import QArray, with_in_scale
from lowbit_jax.spec import ActQuant, Format, PerChannel, QuantSpec, SymGrid

CLAMP = 1e-5   # smooth.py's clamp(min=1e-5) of the weight scales and of s
# int8, symmetric, one absmax / 127 scale per output channel (the paper's and its int8 GEMMs' RESTRICTED grid),
# per-token dynamic int8 activations (the paper's W8A8).
W8A8_SPEC = QuantSpec(format=Format.INT, bits=8, granularity=PerChannel(axis=-2), grid=SymGrid.RESTRICTED,
                      activations=ActQuant(per_token=True))


@functools.partial(jax.jit, static_argnames=("spec",))
def _with_in_scale_jit(w, s, spec: QuantSpec) -> QArray:
  return with_in_scale(w, s, spec)   # inputs validated (and errors named) before any call


def checked_absmax(t: Target, op: str) -> np.ndarray:
  """The (*B, K) activation absmax of a target, validated: collected, from this model, not NaN, >= 0."""
  lay = t.layout
  common.check_stat(t, "absmax", t.wc.stats.absmax, lay.b_shape + (lay.k,), "Stat.ABSMAX", op, inf_ok=True)
  a = np.asarray(t.wc.stats.absmax, np.float32)
  if np.any(a < 0):
    raise ValueError(f"{t.where}: the calibration's absmax contains negative values; expected finite statistics")
  return a


def _weight_absmax(t: Target) -> np.ndarray:
  """max |W[..., j, n]| over the output axes: (*B, K)."""
  lay = t.layout
  w = np.abs(np.asarray(lay.to_kn(jnp.asarray(t.leaf, jnp.float32))))
  return np.max(w, axis=-1)


def smoothing_scales(act_absmax, weight_absmax, alpha: float) -> np.ndarray:
  """smooth.py's s = clamp(act^α / clamp(w, 1e-5)^(1-α), 1e-5), float32, elementwise."""
  act = np.asarray(act_absmax, np.float32)
  w = np.maximum(np.asarray(weight_absmax, np.float32), np.float32(CLAMP))
  with np.errstate(over="ignore"):   # overflowing activations: detected by the caller (`_unless_degenerate`)
    s = np.power(act, np.float32(alpha)) / np.power(w, np.float32(1.0 - alpha))
  return np.maximum(s, np.float32(CLAMP)).astype(np.float32)


def _unless_degenerate(g: list[Target], act: np.ndarray, w_max: np.ndarray, s: np.ndarray, strict: bool):
  """`s` (*B, K) with 1 at the layers whose activations are all zero or overflow, or whose s (or s ⊙ W) is not a
  finite float32 (warned, or raised under `strict`): those are quantized unsmoothed."""
  k = np.shape(s)[-1]
  with np.errstate(over="ignore", invalid="ignore"):
    scaled = np.asarray(s, np.float32) * np.asarray(w_max, np.float32)
  bad = common.degenerate(g, {
      "its activations are all zero (or no row was seen)": common.all_zero(act),
      "its activations overflow float32 (|x| beyond 2**64)": common.overflowing(act, 1),
      "its smoothing scale overflows float32": common.overflowing(s, 1) | common.overflowing(scaled, 1)},
      "smoothquant", strict)
  out = np.array(s, np.float32).reshape(-1, k)
  out[bad] = 1.0
  return out.reshape(np.shape(s))


def _targets(params, calib: Calibration, spec: QuantSpec, where: sel.Where) -> tuple[list, list, dict]:
  """(weights with statistics, weights without, {key path: absmax}), all validated."""
  targets = common.calibrated_leaves(params, calib, where, "smoothquant")
  for t in targets:
    common.check_weight(t, spec, "smoothquant")
  stats = [t for t in targets if t.has_stats]
  absmax = {t.path: checked_absmax(t, "smoothquant") for t in stats}
  return stats, [t for t in targets if not t.has_stats], absmax


def smoothquant(params, calib: Calibration, spec: QuantSpec = W8A8_SPEC, *, where: sel.Where = None,
                alpha: float = 0.5, fold: bool = True, strict: bool = False):
  """W8A8 SmoothQuant of the calibrated weights of `params`; returns a new tree with QArray leaves.

  Args:
    params: the parameters `calib` was collected on.
    calib: `lowbit_jax.calibrate(apply_fn, params, batches)` with `Stat.ABSMAX` (collected by default).
    spec: the format of s ⊙ W (default `W8A8_SPEC`: int8 per output channel with per-token int8 activations);
      its axis is ignored: each weight is quantized along the contraction block the trace recorded.
    where: which calibrated weights to quantize (default: all of them).
    alpha: migration strength α in [0, 1] (0.5 in the paper; α = 1 moves all of the activation range into the
      weights, α = 0 gives s = 1 / max|W_j|).
    fold: fold 1/s into the preceding norm's scale where the graph allows (traced once from `calib.apply_fn` on
      the first calibration batch); those weights then carry no in_scale.
    strict: raise instead of warning (`lowbit_jax.DegenerateStatisticsWarning`) and quantizing without
      smoothing (s = 1) the weights of a group (or layer of a stack) whose activations are all zero or overflow
      (|x| beyond 2**64, or a smoothing scale that is not a finite float32).

  Returns:
    The tree with each selected weight as a QArray of `spec` with `in_scale` s (none where s was folded).

  Raises:
    ValueError: naming the key path, for a calibration from another model, missing or NaN statistics, NaN/inf
      weights, an alpha outside [0, 1], or a result with NaN/inf.
  """
  common.check_calibration(calib, "smoothquant")
  common.check_spec(spec, "smoothquant")
  alpha = as_float(alpha, "smoothquant: alpha", low=0.0, high=1.0, note=" (0.5 in the paper)")
  as_bool(fold, "smoothquant: fold")
  common.check_strict(strict, "smoothquant")
  targets, no_stats, absmax = _targets(params, calib, spec, where)
  done = common.rtn_fallback(no_stats, spec, "smoothquant")
  fold_to = common.foldable(params, calib) if fold else {}
  folded: dict[tuple, np.ndarray] = {}
  kspec = common.kn_spec(spec)
  bar = tqdm(total=len(targets), desc="smoothquant", leave=False, disable=len(targets) < 16)
  for g in common.input_groups(targets):
    w_max = np.max(np.stack([_weight_absmax(t) for t in g]), axis=0)           # (*B, K)
    s = _unless_degenerate(g, absmax[g[0].path], w_max, smoothing_scales(absmax[g[0].path], w_max, alpha), strict)
    ft = group_target(fold_to, [t.where for t in g])
    lead = all(t.layout.map_axes == tuple(range(len(t.layout.b_shape))) for t in g)
    if ft is not None and lead and tuple(np.shape(s)) == tuple(ft.leaf_shape):
      folded[ft.leaf_path] = s
    else:
      ft = None
    for t in g:
      q = t.layout.from_kn(_with_in_scale_jit(t.layout.to_kn(jnp.asarray(t.leaf)), jnp.asarray(s), kspec))
      done[t.path] = q if ft is None else q.without_in_scale()
      bar.update()
  bar.close()
  check_finite_outputs(((sel.path_repr(p), q) for p, q in done.items()), "smoothquant")
  out = replace_leaves(params, done)
  return fold_scales(out, folded) if folded else out


def smoothing_groups(params, calib: Calibration, *, where: sel.Where = None) -> list[list[str]]:
  """The key paths (`path_repr`) `smoothquant` gives one shared s each (weights fed by one input), in calibration
  order."""
  targets, _, _ = _targets(params, calib, W8A8_SPEC, where)
  return [[t.where for t in g] for g in common.input_groups(targets)]


__all__ = ["smoothquant", "smoothing_scales", "smoothing_groups", "W8A8_SPEC", "CLAMP"]
