"""FP8 codes (E4M3 and E5M2, the `jnp.float8_e4m3fn` / `jnp.float8_e5m2` dtypes) with a float scale.

``scale = absmax / FMAX`` per tensor or per channel (Micikevicius et al. 2022, "FP8 Formats for Deep Learning"),
``code = saturate(x / scale)`` cast to float8 (round to nearest even), ``x ≈ code * scale``. Saturating and
NaN-safe: values are clipped to ``±FMAX`` before the cast (E4M3fn has no infinity: an unclipped overflow would
become NaN), and an all-zero granule gets scale 1, so finite inputs never produce NaN or inf.

Error bound: relative ``2**-(mantissa_bits + 1)`` for normal values (1/16 for E4M3, 1/8 for E5M2) and absolute
``scale * 2**(min_exponent - mantissa_bits - 1)`` in the subnormal range.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lowbit_jax.spec import Format

DTYPES = {Format.FP8_E4M3: jnp.float8_e4m3fn, Format.FP8_E5M2: jnp.float8_e5m2}


def fmax(fmt) -> float:
  return float(jnp.finfo(DTYPES[fmt]).max)


def compute_params(xg, valid, red_axes, spec):
  del valid
  absmax = jnp.max(jnp.abs(xg), axis=red_axes, keepdims=True)
  scale = absmax / np.float32(fmax(spec.format))
  return jnp.where(scale > 0, scale, np.float32(1.0)), None


def encode(xg, scale, zero, spec):
  del zero
  m = np.float32(fmax(spec.format))
  return jnp.clip(xg / scale, -m, m).astype(DTYPES[spec.format])


def decode(codes, zero, spec):
  del zero, spec
  return codes.astype(jnp.float32)
