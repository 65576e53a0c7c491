"""What every calibrated pytree transform (gptq, awq, smoothquant, llm_int8) shares: the calibrated, selected
weights of a tree (validated, errors naming the key path), their grouping by shared input, the round-to-nearest
fallback for weights without statistics, and putting quantized leaves back.

Every transform solves (K, N) problems: a weight's `WeightLayout` (from the trace: `wc.layout`) maps the leaf to
(*B, K, N) with B its scanned-layer / expert axes, K its flattened contraction block and N the rest; the statistics
of a `WeightCalibration` have the leading axes B. `Target.kn` / `unflatten_q` go between the leaf and (L, K, N),
L = prod(B), so one `lax.map` / `vmap` over L solves every layer, whatever the leaf's layout.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax import select as sel
from lowbit_jax.checks import DegenerateStatisticsWarning, as_bool
from lowbit_jax.layout import WeightLayout
from lowbit_jax.passes.calibration import Calibration, WeightCalibration
from lowbit_jax.passes.fold import fold_targets
from lowbit_jax.passes.origin import SiteKind
from lowbit_jax.rtn import quantize_jit
from lowbit_jax.qarray import QArray, check_quantizable
from lowbit_jax.spec import Format, QuantSpec


def _is_q(x) -> bool:
  return isinstance(x, QArray)


@dataclasses.dataclass(frozen=True)
class Target:
  """One calibrated, selected float weight: its key path, leaf and statistics."""
  path: tuple
  leaf: Any = dataclasses.field(repr=False)
  wc: WeightCalibration = dataclasses.field(repr=False)

  @property
  def where(self) -> str:
    return sel.path_repr(self.path)

  @property
  def layout(self) -> WeightLayout:
    return self.wc.layout

  @property
  def has_stats(self) -> bool:
    return self.wc.stats is not None

  def kn(self, dtype=None) -> jax.Array:
    """The weight as (L, K, N), L = prod(B) (1 for an unstacked weight), in `dtype` (default: the leaf's)."""
    lay = self.layout
    return lay.to_kn(jnp.asarray(self.leaf, dtype)).reshape((-1, lay.k, lay.n))


def check_calibration(calib, op: str) -> None:
  if not isinstance(calib, Calibration):
    raise ValueError(f"{op}: expected a lowbit_jax.Calibration (from lowbit_jax.calibrate), got "
                     f"{type(calib).__name__}")


def check_spec(spec, op: str, *, integer: bool = False) -> None:
  """`spec` is a QuantSpec (an integer one without double quantization when `integer`)."""
  if not isinstance(spec, QuantSpec):
    raise ValueError(f"{op}: expected a QuantSpec for `spec` (e.g. lowbit_jax.int_spec(4, group_size=128)), got "
                     f"{spec!r}")
  if integer and (spec.format is not Format.INT or spec.double_quant):
    raise ValueError(f"{op}: needs an integer QuantSpec without double quantization (Format.INT, e.g. "
                     f"lowbit_jax.int_spec(4, group_size=128)), got format {spec.format.name}"
                     f"{' with double quantization' if spec.double_quant else ''}")


def kn_spec(spec: QuantSpec) -> QuantSpec:
  """`spec` quantizing along -2: the K axis of a (..., K, N) problem (the leaf's own axes come from its layout)."""
  return dataclasses.replace(spec, granularity=dataclasses.replace(spec.granularity, axis=-2))


def calibrated_leaves(params, calib: Calibration, where: sel.Where, op: str) -> list[Target]:
  """The float weights `calib` has an entry for and `where` selects (default: every calibrated weight), in
  calibration (first-use) order, each checked against its calibration: same shape, a valid layout.

  Raises:
    ValueError: `calib` is not a Calibration; it has an entry for a leaf `params` lack or of another shape
      (another model); `where` selects a weight without an entry; nothing is selected.
  """
  check_calibration(calib, op)
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_q)[0]
  leaves = dict(flat)
  pred = None if where is None else sel.as_predicate(where)
  out = []
  for path in calib:
    w = sel.path_repr(path)
    if path not in leaves:
      raise ValueError(f"{w}: the calibration has an entry for a leaf that params lack; expected a calibration "
                       f"from the same model")
    leaf, wc = leaves[path], calib[path]
    if _is_q(leaf) or not hasattr(leaf, "shape") or (pred is not None and not pred(sel.path_str(path), leaf)):
      continue
    if tuple(np.shape(leaf)) != tuple(wc.use.shape):
      raise ValueError(f"{w}: the calibration does not match this weight (calibrated a leaf of shape "
                       f"{tuple(wc.use.shape)}, params hold shape {tuple(np.shape(leaf))}); expected a calibration "
                       f"from the same model")
    try:
      wc.layout
    except ValueError as e:
      raise ValueError(f"{w}: {op} cannot map this weight onto (layers, K, N) problems: {e}") from None
    out.append(Target(path, leaf, wc))
  if where is not None:
    for p in sel.select(params, where):
      if p not in calib:
        raise ValueError(f"{sel.path_repr(p)}: selected by `where` but the calibration has no statistics for it; "
                         f"expected a calibration that covers every selected weight")
  if not out:
    raise ValueError(f"{op}: no calibrated weight is selected (the calibration covers "
                     f"{[sel.path_repr(p) for p in calib][:6]}...)")
  return out


def check_weight(t: Target, spec: QuantSpec, op: str) -> None:
  """A finite float leaf that `spec` can quantize along its contraction block."""
  lay = t.layout
  view = jax.ShapeDtypeStruct(lay.merged_shape, np.dtype(t.leaf.dtype))
  check_quantizable(view, lay.spec_for(spec), t.where)
  if not bool(jnp.all(jnp.isfinite(jnp.asarray(t.leaf)))):
    raise ValueError(f"{t.where}: expected finite weights, found NaN/inf")


def check_stat(t: Target, name: str, value, shape: tuple, stat: str, op: str, *,
               inf_ok: bool = False) -> None:
  """One statistic of `t`: collected, of `shape` (the layout's (*B, K[, K])), without NaN, and without inf unless
  `inf_ok` (a caller that treats overflowing activations as degenerate statistics, see `degenerate`)."""
  if value is None:
    raise ValueError(f"{t.where}: the calibration lacks the {name} of this weight's input; expected statistics "
                     f"collected with {stat} for {op}")
  got = tuple(np.shape(value))
  if got != tuple(shape):
    raise ValueError(f"{t.where}: the calibration does not match this weight ({name} of shape {got} for a leaf of "
                     f"shape {tuple(np.shape(t.leaf))}); expected {tuple(shape)}, statistics from the same model")
  if not bool(jnp.all(~jnp.isnan(value) if inf_ok else jnp.isfinite(value))):
    raise ValueError(f"{t.where}: the calibration's {name} contains {'NaN' if inf_ok else 'NaN/inf'}; expected "
                     f"finite statistics")


def input_groups(targets: list[Target]) -> list[list[Target]]:
  """The targets partitioned by the activation feeding them (the trace's `use.input_ids`, e.g. q/k/v after one
  norm, gate/up after another), with one stacked layout per group (same B and K), in first-use order. A weight
  without input ids (never contracted against a traced activation) is a group of its own."""
  groups: dict[tuple, list[Target]] = {}
  for i, t in enumerate(targets):
    ids = tuple(t.wc.use.input_ids)
    key = (ids, t.layout.b_shape, t.layout.k) if ids else ("alone", i)
    groups.setdefault(key, []).append(t)
  return list(groups.values())


def _why_no_stats(t: Target) -> str:
  kinds = t.wc.use.kinds
  if SiteKind.CONV in kinds:
    return "a convolution"
  if SiteKind.LOOKUP in kinds and not t.wc.use.contracted:
    return "a lookup table"
  return "statistics not traceable"


def rtn_fallback(targets: list[Target], spec: QuantSpec, op: str, *, warn: bool = True) -> dict:
  """{key path: QArray} round-to-nearest along each weight's contraction block, for weights without calibration
  statistics; one warning naming them (and why) when `warn`."""
  if not targets:
    return {}
  if warn:
    names = ", ".join(f"{t.where} ({_why_no_stats(t)})" for t in targets)
    warnings.warn(f"{op}: no calibration statistics for {names}; quantized round-to-nearest", RuntimeWarning,
                  stacklevel=3)
  return {t.path: quantize_jit(jnp.asarray(t.leaf), spec, t.layout) for t in targets}   # validated before


def unflatten_q(q: QArray, t: Target) -> QArray:
  """A QArray solved as (L, K, N) (quantized along -2, every leaf full along L) in `t`'s leaf layout."""
  lay = t.layout
  q = jax.tree.map(lambda a: a.reshape(lay.b_shape + a.shape[1:]), q)
  return lay.from_kn(q)


def n_problems(t: Target) -> int:
  return math.prod(t.layout.b_shape)


def foldable(params, calib: Calibration) -> dict:
  """{path repr: FoldTarget} (`passes/fold.py`) of the calibration's function on its first batch, with the
  calibrated weights as the selection."""
  names = frozenset(sel.path_str(p) for p in calib)
  return fold_targets(calib.apply_fn, params, calib.batches[0], where=lambda path, _: path in names)


def replace_leaves(params, done: dict):
  """`params` with the leaves whose key paths are in `done` replaced; a new tree."""
  return jax.tree_util.tree_map_with_path(lambda p, l: done.get(p, l), params, is_leaf=_is_q)


# --- degenerate statistics: detected, not obeyed -------------------------------------------------------------
# One rule per function; each maps a statistic of leading axes B to a (prod(B),) bool "this layer is degenerate".

OVERFLOW = 2.0 ** 64   # an activation |x| above it has a square beyond float32's range: XᵀX is inf


def _per_layer(a, trailing: int) -> np.ndarray:
  a = np.asarray(a, np.float64)
  return a.reshape((-1,) + a.shape[a.ndim - trailing:])


def all_zero(diag_or_abs, trailing: int = 1) -> np.ndarray:
  """Per layer: the activations were all zero, or no row was seen (a zero Hessian diagonal / absmax / mean |x|)."""
  return np.all(_per_layer(diag_or_abs, trailing) == 0, axis=-1)


def overflowing(stat, trailing: int) -> np.ndarray:
  """Per layer: a statistic is inf, or an activation magnitude statistic is beyond `OVERFLOW`."""
  a = np.abs(_per_layer(stat, trailing))
  return np.any((~np.isfinite(a)) | (a > OVERFLOW), axis=tuple(range(1, a.ndim)))


def constant(hessian_diag, abs_mean, rtol: float = 1e-3) -> np.ndarray:
  """Per layer: every input channel's |x| is constant over the calibration rows (E[x²] == (E|x|)², Jensen's
  equality), e.g. one repeated token or a constant batch: XᵀX has rank 1, so output errors are measured along one
  direction only and any search "fixes" them by moving error elsewhere."""
  ex2 = _per_layer(hessian_diag, 1) / 2.0                    # `hessian` is 2 XᵀX / T
  m2 = _per_layer(abs_mean, 1) ** 2
  return np.all(ex2 <= (1.0 + rtol) * m2, axis=-1)


def layer_names(t: Target, idx) -> str:
  """`t.where` with the stack indices of the flat layer numbers `idx` ("params[...][1], params[...][2]")."""
  lay = t.layout
  if not lay.b_shape:
    return t.where
  return ", ".join(t.where + "".join(f"[{i}]" for i in np.unravel_index(j, lay.b_shape)) for j in idx)


def degenerate(group: list[Target], flags: dict[str, np.ndarray], op: str, strict: bool, *,
               instead: tuple[str, str] = ("quantizes round-to-nearest", "quantized round-to-nearest")) -> np.ndarray:
  """The (L,) mask of degenerate layers of a group of weights sharing one input, from {reason: (L,) mask}. Warns
  (`DegenerateStatisticsWarning`, naming the weights, layers and why) that those layers are quantized without the
  statistics (round-to-nearest; `instead`: what the algorithm does then, as
  (present tense, past participle)), or raises ValueError under `strict`."""
  mask = np.zeros(n_problems(group[0]), bool)
  for why, m in flags.items():
    m = np.asarray(m, bool)
    if not m.any():
      continue
    mask |= m
    names = "; ".join(layer_names(t, np.flatnonzero(m)) for t in group)
    if strict:
      raise ValueError(f"{names}: {op} cannot use this calibration: {why}; expected a calibration from varied, "
                       f"finite real activations (strict=True; strict=False {instead[0]} instead)")
    warnings.warn(f"{names}: {op} cannot use this calibration: {why}; {instead[1]} instead",
                  DegenerateStatisticsWarning, stacklevel=4)   # the algorithm's caller
  return mask


def check_strict(strict, op: str) -> bool:
  return as_bool(strict, f"{op}: strict")


def rtn_kn(t: Target, spec: QuantSpec) -> QArray:
  """Round-to-nearest of `t` as (L, K, N) along -2 (`spec` already `kn_spec`'d): what a degenerate layer gets."""
  return quantize_jit(t.kn(), spec, None)


def where_layers(mask: np.ndarray, fallback: QArray, q: QArray) -> QArray:
  """`q` (L, ...) with the layers in `mask` taken from `fallback` (same structure)."""
  m = jnp.asarray(mask)
  return jax.tree.map(lambda f, a: jnp.where(m.reshape((-1,) + (1,) * (a.ndim - 1)), f, a), fallback, q)
