"""Uniform integer codes (INT8/4/3/2), symmetric or with a zero point.

Invariant: codes lie in ``[0, 2**bits - 1]`` and

    symmetric                  x ≈ (code - 2**(bits-1)) * scale     implicit zero; the scale follows `spec.grid`
    asymmetric, INTEGER zero   x ≈ (code - zero) * scale            uint8 zero per granule, range [min(x,0), max(x,0)]
    asymmetric, FLOAT offset   x ≈ code * scale + offset            offset in scale_dtype, range [min(x), max(x)]

Symmetric grids (`lowbit_jax.SymGrid`; `absmax` = max |x| of the granule, b = bits):
  FULL        scale = absmax / (2**(b-1) - 1/2): the reference GPTQ's ``2*absmax / (2**b - 1)`` with zero 2**(b-1)
              (IST-DASLab/gptq `quant.py`), qwix's qmax + 0.5; every code is used, +absmax clips by half a step.
  SIGNED_MAX  scale = m / -2**(b-1), m the signed value of largest |x|: m lands exactly on code 0 (llama.cpp Q4_0);
              the stored scale may be negative.
  RESTRICTED  scale = absmax / (2**(b-1) - 1): code 0 is never used (llama.cpp Q8_0, SmoothQuant, bitsandbytes).
The asymmetric INTEGER range keeps 0 exactly representable (GPTQ's `quant.py`); the FLOAT offset range is the
granule's own [min, max] over valid entries (llama.cpp Q4_1). With `spec.clip` the range is shrunk per granule to the
clipping ratio of least error (`formats/clip.py`); symmetric and INTEGER ranges shrink towards 0, FLOAT ranges
towards their midpoint.

A scale whose magnitude would round to zero in `scale_dtype` is replaced by 1 (the granule is then all but zero),
so a stored scale is never 0 and dequantization never divides by or multiplies with a lost scale; a scale or float
offset beyond the range of `scale_dtype` (float16 above 65504) is clamped to its largest finite value, so values
outside the representable range clip instead of dequantizing to inf or NaN.

Error bound (finite input, float32 scales, no clipping search): ``|x - dequantize(x)| <= |scale| / 2`` (half a
step; FULL's +absmax sits half a step above the top level), except SIGNED_MAX's end opposite the signed max, which
clips by up to one step; under `ClipSearch`, values beyond the chosen range add their distance to it; bfloat16 /
float16 scales add at most ``2**(bits-1) * |scale - stored_scale|`` at the end of the range.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lowbit_jax.formats import clip
from lowbit_jax.spec import SymGrid


def max_code(bits: int) -> int:
  return (1 << bits) - 1


def implicit_zero(bits: int) -> int:
  return 1 << (bits - 1)


def _storable(scale, spec):
  """A scale whose magnitude rounds to 0 in the storage dtype becomes 1; one beyond its range is clamped to its
  largest finite value (module docstring)."""
  info = np.finfo(spec.scale_dtype)
  scale = jnp.clip(scale, -np.float32(info.max), np.float32(info.max))
  return jnp.where(jnp.abs(scale) >= np.float32(info.tiny), scale, np.float32(1.0))


def _stats(xg, valid, red_axes, spec):
  """The range statistics the grid is built from: (a, b) keepdims over `red_axes`."""
  if spec.symmetric:
    hi, lo = jnp.max(xg, axis=red_axes, keepdims=True), jnp.min(xg, axis=red_axes, keepdims=True)
    if spec.grid is SymGrid.SIGNED_MAX:
      return jnp.where(-lo > hi, lo, hi), None      # the signed value of largest magnitude (ties: positive)
    return jnp.maximum(hi, -lo), None               # absmax
  if spec.float_offset:
    mask = True if valid is None else jnp.broadcast_to(valid, xg.shape)
    lo = jnp.min(jnp.where(mask, xg, np.float32(np.inf)), axis=red_axes, keepdims=True)
    hi = jnp.max(jnp.where(mask, xg, np.float32(-np.inf)), axis=red_axes, keepdims=True)
    return lo, hi
  # padding is 0, and the INTEGER range contains 0 anyway: it changes no statistic
  lo = jnp.minimum(jnp.min(xg, axis=red_axes, keepdims=True), np.float32(0.0))
  hi = jnp.maximum(jnp.max(xg, axis=red_axes, keepdims=True), np.float32(0.0))
  return lo, hi


def _params_at(stats, ratio, spec):
  """(scale, zero) of the range `stats` shrunk by `ratio` (1: the whole range). Float offsets are rounded to the
  storage dtype here, so encoding sees the value dequantization will use."""
  a, b = stats
  if spec.symmetric:
    denom = {SymGrid.FULL: implicit_zero(spec.bits) - 0.5, SymGrid.SIGNED_MAX: -implicit_zero(spec.bits),
             SymGrid.RESTRICTED: implicit_zero(spec.bits) - 1}[spec.grid]
    return _storable(a * ratio / np.float32(denom), spec), None
  if spec.float_offset:
    mid, half = (a + b) / 2, (b - a) / 2 * ratio
    lo = jnp.where(jnp.isfinite(mid), mid - half, np.float32(0.0))        # an all-padding granule: [0, 0]
    fmax = np.float32(np.finfo(spec.scale_dtype).max)
    lo = jnp.clip(lo, -fmax, fmax)                                        # a storable offset (module docstring)
    scale = _storable(2 * half / np.float32(max_code(spec.bits)), spec)
    return scale, lo.astype(spec.scale_dtype).astype(jnp.float32)
  lo, hi = a * ratio, b * ratio
  scale = _storable((hi - lo) / np.float32(max_code(spec.bits)), spec)
  zero = jnp.clip(jnp.round(-lo / scale), 0, max_code(spec.bits))
  return scale, zero.astype(jnp.uint8)


def compute_params(xg, valid, red_axes, spec):
  """Per-granule (scale, zero), keepdims over `red_axes`: zero is None (symmetric), uint8 (INTEGER zero point) or
  the float32 value of the stored offset (FLOAT). `valid` (broadcastable to xg, or None) masks padding."""
  stats = _stats(xg, valid, red_axes, spec)
  if spec.clip is None:
    return _params_at(stats, np.float32(1.0), spec)
  return clip.search(xg, valid, red_axes, spec, lambda r: _params_at(stats, r, spec), encode)


def encode(xg, scale, zero, spec):
  """uint8 codes in [0, 2**bits - 1]; `scale` (and a float `zero`) are the values dequantization will use."""
  if spec.float_offset:
    q = jnp.round((xg - zero.astype(jnp.float32)) / scale)
  else:
    z = np.float32(implicit_zero(spec.bits)) if zero is None else zero.astype(jnp.float32)
    q = jnp.round(xg / scale) + z
  return jnp.clip(q, 0, max_code(spec.bits)).astype(jnp.uint8)


def decode(codes, zero, spec):
  """``code - zero`` as float32 (multiply by the scale to dequantize); the bare code for a FLOAT offset, which
  `lowbit_jax.formats.dequantize` adds after scaling."""
  if spec.float_offset:
    return codes.astype(jnp.float32)
  z = np.float32(implicit_zero(spec.bits)) if zero is None else zero.astype(jnp.float32)
  return codes.astype(jnp.float32) - z
