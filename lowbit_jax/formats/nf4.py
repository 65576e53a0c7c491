"""NF4: QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, "QLoRA", sec. 3; bitsandbytes' NF4 table).

Each block (`PerGroup`, 64 in the paper) is scaled by its absmax into [-1, 1] and rounded to the nearest of 16
levels that are quantiles of N(0, 1) (exact zero included, asymmetric: 7 negative, 8 positive). Codes are 4-bit
indices into `LEVELS`. With `double_quant`, the absmax scales are themselves quantized to 8 bits in blocks of 256
(see `QArray`); encoding uses the *stored* (double-quantized) scale, so ``deq = LEVELS[code] * scale`` exactly.

Deviation: QLoRA double-quantizes the scales with bitsandbytes' 8-bit dynamic float map after subtracting their
mean; we use an asymmetric linear 8-bit integer map with a zero point per 256-block (same 8 bits per scale, about
0.127 bits per parameter in all).

Error bound: with ``s`` the stored scale, ``|x - deq| <= s * MAX_GAP / 2 + max(|x| - s, 0)``.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lowbit_jax.formats import clip

LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
MIDPOINTS = (LEVELS[1:] + LEVELS[:-1]) / 2
MAX_GAP = float(np.max(np.diff(LEVELS)))


def compute_params(xg, valid, red_axes, spec):
  """absmax per block (padding is 0: it never raises an absmax); with `spec.clip`, the clipped absmax of least
  error (`formats/clip.py`)."""
  absmax = jnp.max(jnp.abs(xg), axis=red_axes, keepdims=True)

  def params_at(ratio):
    s = absmax * ratio
    return jnp.where(s > 0, s, np.float32(1.0)), None

  if spec.clip is None:
    return params_at(np.float32(1.0))
  return clip.search(xg, valid, red_axes, spec, params_at, encode)


def encode(xg, scale, zero, spec):
  del zero, spec
  v = jnp.clip(xg / scale, -1.0, 1.0)
  return jnp.searchsorted(jnp.asarray(MIDPOINTS), v).astype(jnp.uint8)


def decode(codes, zero, spec):
  del zero, spec
  return jnp.asarray(LEVELS)[codes]
