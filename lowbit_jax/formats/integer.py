"""Uniform integer codes (INT8/4/3/2), symmetric or with a zero point.

Invariant: ``x ≈ (code - zero) * scale`` with ``code`` in ``[0, 2**bits - 1]``. Symmetric specs have the implicit
``zero = 2**(bits-1)`` and ``scale = absmax / (2**(bits-1) - 1)`` (so codes span ``[-2**(bits-1), 2**(bits-1)-1]``
around it, the most negative level unused by a symmetric range); asymmetric specs store a per-granule integer
``zero`` and use the range ``[min(x, 0), max(x, 0)]`` as GPTQ's reference quantizer does
(IST-DASLab/gptq, quant.py), which keeps 0 exactly representable.

Error bound (finite input, float32 scales): ``|x - dequantize(x)| <= scale / 2`` (half a step). A bfloat16/float16
scale adds at most ``qmax * |scale - stored_scale|`` at the clipped end of the range.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def max_code(bits: int) -> int:
  return (1 << bits) - 1


def implicit_zero(bits: int) -> int:
  return 1 << (bits - 1)


def compute_params(xg, valid, red_axes, spec):
  """Per-granule (scale, zero), keepdims over `red_axes`; zero is None for symmetric specs."""
  del valid  # padding is 0, and both ranges below already contain 0: it changes no statistic
  if spec.symmetric:
    absmax = jnp.max(jnp.abs(xg), axis=red_axes, keepdims=True)
    scale = absmax / np.float32(implicit_zero(spec.bits) - 1)
    return jnp.where(scale > 0, scale, np.float32(1.0)), None
  lo = jnp.minimum(jnp.min(xg, axis=red_axes, keepdims=True), np.float32(0.0))
  hi = jnp.maximum(jnp.max(xg, axis=red_axes, keepdims=True), np.float32(0.0))
  scale = (hi - lo) / np.float32(max_code(spec.bits))
  scale = jnp.where(scale > 0, scale, np.float32(1.0))
  zero = jnp.clip(jnp.round(-lo / scale), 0, max_code(spec.bits))
  return scale, zero.astype(jnp.uint8)


def encode(xg, scale, zero, spec):
  """uint8 codes in [0, 2**bits - 1]; `scale` is the value dequantization will use (after storage rounding)."""
  z = np.float32(implicit_zero(spec.bits)) if zero is None else zero.astype(jnp.float32)
  q = jnp.round(xg / scale) + z
  return jnp.clip(q, 0, max_code(spec.bits)).astype(jnp.uint8)


def decode(codes, zero, spec):
  """``code - zero`` as float32 (multiply by the scale to dequantize)."""
  z = np.float32(implicit_zero(spec.bits)) if zero is None else zero.astype(jnp.float32)
  return codes.astype(jnp.float32) - z
