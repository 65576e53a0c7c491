"""LLM.int8() as a pytree transform, and the outlier statistics that motivate it.

Dettmers, Lewis, Belkada, Zettlemoyer, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale"
(NeurIPS 2022); reference code: bitsandbytes `Linear8bitLt` / `MatMul8bitLt`.

    qparams = lowbit_jax.llm_int8(params)                        # LLM_INT8_SPEC: int8, outlier_threshold 6.0
    qparams = lowbit_jax.llm_int8(params, calib, llm_int8_spec(threshold=4.0))
    logits = lowbit_jax.quantized(apply_fn)(qparams, tokens)     # kernels.qmatmul -> llm_int8_matmul
    print(outlier_report(lowbit_jax.calibrate(apply_fn, params, batches)).markdown())

Weights: W (*stack, K, *out) -> int8 codes, symmetric, one absmax scale per output channel (bitsandbytes' row-wise
`SCB` of the (out, in) torch weight), with `spec.activations = ActQuant(outlier_threshold=threshold)`. Every
forward pass then splits x (..., K) by input column: the columns with any |x| > threshold run in float with the
dequantized weight rows, the rest as int8 x int8 -> int32 with per-token activation scales (vector-wise
quantization); see `kernels/w8a8/llm_int8.py` for the matmul and its deviations (masks instead of gathers).

The transform needs no calibration (it is round-to-nearest with an `ActQuant(outlier_threshold=...)` spec); given
one, it quantizes the calibrated weights along the contraction block the trace recorded (`WeightCalibration.layout`:
any layout, scanned layers in any position, several contraction axes; no statistics needed, so convolutions too),
else the selected leaves along the spec's axis (-2: Flax (in, out) kernels, stacked or not). `outlier_report`
summarizes
which layers see outlier columns (from `absmax`: a column is an outlier column at threshold t when max |x| > t,
the criterion the matmul applies per call).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lowbit_jax import select as sel
from lowbit_jax.algorithms import common
from lowbit_jax.checks import check_finite_outputs
from lowbit_jax.kernels.w8a8.llm_int8 import DEFAULT_THRESHOLD
from lowbit_jax.passes.calibration import Calibration
from lowbit_jax.qarray import QArray, check_quantizable, quantize
from lowbit_jax.spec import ActQuant, Format, PerChannel, QuantSpec, SymGrid


def llm_int8_spec(*, threshold: float = DEFAULT_THRESHOLD) -> QuantSpec:
  """int8, symmetric, one absmax / 127 scale per output channel (bitsandbytes' row-wise grid, `SymGrid.RESTRICTED`),
  with the LLM.int8() activation path at `threshold`.

  Raises:
    ValueError: for a threshold that is not a finite float >= 0.
  """
  if threshold is None:
    raise ValueError("llm_int8_spec: threshold must be a finite float >= 0 (6.0 in the paper), got None")
  try:
    act = ActQuant(outlier_threshold=threshold)
  except ValueError as e:
    raise ValueError(f"llm_int8_spec: threshold: {e}") from None
  return QuantSpec(format=Format.INT, bits=8, granularity=PerChannel(axis=-2), grid=SymGrid.RESTRICTED,
                   activations=act)


LLM_INT8_SPEC = llm_int8_spec()


@functools.partial(jax.jit, static_argnames=("spec",))
def _quantize_jit(w, spec: QuantSpec) -> QArray:
  return quantize(w, spec)   # inputs validated (and errors named) before any call


def _check_spec(spec) -> None:
  common.check_spec(spec, "llm_int8")
  act = spec.activations
  if spec.format is not Format.INT or spec.bits != 8 or act is None or act.outlier_threshold is None:
    raise ValueError(f"llm_int8: expected an 8-bit integer QuantSpec with ActQuant(outlier_threshold=...) "
                     f"activations (llm_int8_spec(threshold=6.0)), got {spec}")


def llm_int8(params, calib: Calibration | None = None, spec: QuantSpec = LLM_INT8_SPEC, *, where: sel.Where = None):
  """Quantize weights of `params` for LLM.int8() inference; returns a new tree with QArray leaves.

  Args:
    params: any parameter pytree.
    calib: optional `lowbit_jax.calibrate(...)` of `params`: when given, its weights are the ones quantized, each
      along its traced contraction block; when None, the leaves selected by `where` (default: the linear weights)
      are quantized along the spec's axis (-2: Flax's (in, out) kernels, stacked or not).
    spec: `llm_int8_spec(threshold=...)` (default threshold 6.0, the paper's; 0 runs every non-zero column in
      float): 8-bit integers with an `ActQuant(outlier_threshold=...)`.
    where: which leaves (see `lowbit_jax.select`; with a calibration, which calibrated weights).

  Raises:
    ValueError: naming the key path, for a spec without an outlier threshold, a calibration from another model,
      NaN/inf/non-float weights, or a result with NaN/inf.
  """
  _check_spec(spec)
  if calib is None:
    chosen = sel.select(params, where)
    for p, leaf in chosen.items():
      check_quantizable(leaf, spec, sel.path_repr(p))
    done = {p: _quantize_jit(jnp.asarray(leaf), spec)
            for p, leaf in tqdm(chosen.items(), desc="llm_int8", leave=False, disable=len(chosen) < 16)}
  else:
    targets = common.calibrated_leaves(params, calib, where, "llm_int8")
    for t in targets:
      common.check_weight(t, spec, "llm_int8")
    # no statistics needed: every weight (convolutions included) is round-to-nearest along its contraction block
    done = common.rtn_fallback(targets, spec, "llm_int8", warn=False)
  check_finite_outputs(((sel.path_repr(p), q) for p, q in done.items()), "llm_int8")
  return common.replace_leaves(params, done)


@dataclasses.dataclass(frozen=True)
class OutlierRow:
  """One weight (one layer of a stacked weight): its input width and outlier columns at the report threshold."""
  where: str
  k: int
  outlier_columns: int             # input columns with max |x| > threshold over the calibration data
  max_abs: float                   # max |x| over all its input columns
  entry_fraction: float | None     # fraction of input entries with |x| > the calibration's threshold


@dataclasses.dataclass(frozen=True)
class OutlierReport:
  """Outlier statistics of a calibration at `threshold` (see `outlier_report`)."""
  threshold: float
  calibration_threshold: float
  rows: tuple[OutlierRow, ...]

  @property
  def total_outlier_columns(self) -> int:
    return sum(r.outlier_columns for r in self.rows)

  @property
  def layers_with_outliers(self) -> int:
    return sum(r.outlier_columns > 0 for r in self.rows)

  def markdown(self) -> str:
    t, tc = _fmt(self.threshold), _fmt(self.calibration_threshold)
    lines = [f"| weight | K | outlier columns (max abs x > {t}) | % columns | max abs x | % entries > {tc} |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in self.rows:
      frac = "n/a" if r.entry_fraction is None else f"{100 * r.entry_fraction:.3f}"
      lines.append(f"| {r.where} | {r.k} | {r.outlier_columns} | {100 * r.outlier_columns / r.k:.1f} | "
                   f"{r.max_abs:.3g} | {frac} |")
    lines.append(f"\n{self.layers_with_outliers} of {len(self.rows)} weights see outlier columns "
                 f"({self.total_outlier_columns} columns in all) at threshold {t}.")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.markdown()


def _fmt(x: float) -> str:
  return f"{x:g}"


def outlier_report(calib: Calibration, *, threshold: float = DEFAULT_THRESHOLD) -> OutlierReport:
  """Which weights see LLM.int8() outlier columns, and how many, from a calibration's `absmax` (one row per weight,
  one per layer of a stacked weight, in first-use order). `entry_fraction` uses the calibration's own outlier
  counts (its `outlier_threshold`) and is None when `Stat.OUTLIERS` was not collected.

  Raises:
    ValueError: naming the key path, for a calibration without absmax statistics or with NaN/inf ones, or an
      invalid threshold.
  """
  if not isinstance(calib, Calibration):
    raise ValueError(f"outlier_report: expected a lowbit_jax.Calibration, got {type(calib).__name__}")
  try:
    act = ActQuant(outlier_threshold=threshold)
  except ValueError as e:
    raise ValueError(f"outlier_report: {e}") from None
  t = act.outlier_threshold
  if t is None:
    raise ValueError("outlier_report: threshold must be a finite float >= 0, got None")
  rows = []
  for path in calib:
    wc, w = calib[path], sel.path_repr(path)
    if wc.stats is None:
      continue   # no traceable statistics (a convolution)
    if wc.absmax is None:
      raise ValueError(f"{w}: the calibration has no absmax statistics; expected Stat.ABSMAX for outlier_report")
    a = np.asarray(wc.absmax, np.float32)
    if a.ndim == 0 or not np.all(np.isfinite(a)):
      raise ValueError(f"{w}: the calibration's absmax statistics are not a finite (..., K) array")
    frac = None if wc.stats.outliers is None else np.asarray(wc.outlier_fraction, np.float32)
    for idx in np.ndindex(a.shape[:-1]):
      name = w + "".join(f"[{i}]" for i in idx)
      rows.append(OutlierRow(where=name, k=int(a.shape[-1]), outlier_columns=int(np.sum(a[idx] > t)),
                             max_abs=float(np.max(a[idx])),
                             entry_fraction=None if frac is None else float(np.mean(frac[idx]))))
  cal_t = float(calib.options.outlier_threshold)
  return OutlierReport(threshold=t, calibration_threshold=cal_t, rows=tuple(rows))


__all__ = ["llm_int8", "llm_int8_spec", "LLM_INT8_SPEC", "outlier_report", "OutlierReport", "OutlierRow"]
