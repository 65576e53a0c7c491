"""Ternary codes {-1, 0, +1} with BitNet b1.58's absmean scale, stored as 2-bit codes ``q + 1``.

BitNet b1.58 (Ma et al. 2024, "The Era of 1-bit LLMs", eq. 1-3): ``gamma = mean(|W|)``,
``W~ = RoundClip(W / (gamma + eps), -1, 1)``, and ``W ≈ W~ * gamma``. The paper uses one gamma per tensor
(`PerTensor`); `PerChannel`/`PerGroup` give one per granule. Padding is masked out of the mean.
Deviation: instead of adding eps to gamma (which rounds tiny weights to 0 and breaks the bound below), an
all-zero granule gets gamma = 1; every other gamma is already > 0.

Error bound: with ``s`` the stored scale, ``|x - deq| <= s / 2`` where ``|x| <= 1.5 s`` and
``|x| - s`` (clipping) above that.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

def compute_params(xg, valid, red_axes, spec):
  """gamma = mean(|x|) over each granule's valid entries, summed as mean(|x| / m) * m with m the granule's absmax,
  so the sum stays finite for weights up to float32's max (a plain sum of 64 values of 1e37 overflows)."""
  del spec
  mask = jnp.broadcast_to(valid, xg.shape)
  ax = jnp.where(mask, jnp.abs(xg), np.float32(0.0))
  m = jnp.max(ax, axis=red_axes, keepdims=True)
  m = jnp.where(m > 0, m, np.float32(1.0))
  total = jnp.sum(ax / m, axis=red_axes, keepdims=True)
  count = jnp.sum(mask.astype(jnp.float32), axis=red_axes, keepdims=True)
  gamma = total / jnp.maximum(count, np.float32(1.0)) * m
  return jnp.where(gamma > 0, gamma, np.float32(1.0)), None


def encode(xg, scale, zero, spec):
  del zero, spec
  q = jnp.clip(jnp.round(xg / scale), -1, 1)
  return (q + 1).astype(jnp.uint8)


def decode(codes, zero, spec):
  del zero, spec
  return codes.astype(jnp.float32) - np.float32(1.0)
