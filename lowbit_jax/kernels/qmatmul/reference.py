"""The spec of `qmatmul`: ``x @ W`` with W a 2-D QArray, dequantization fused into the dot, f32 accumulation.

    out[..., n] = sum_g  scale[g, n] * sum_{k in group g} x[..., k] * (code[k, n] - zero[g, n])

i.e. the integer (or NF4/FP8 level) codes are contracted with the activations group by group in float32 and
the per-group scales are applied to the partial sums, which is what a fused kernel does in registers. The result
equals ``x @ w.dequantize()`` up to float rounding and is cast back to ``x.dtype``. Padding of the contraction
axis meets zero-padded activations, so it contributes nothing. Pallas kernels must match this function.
"""
from __future__ import annotations

import jax.numpy as jnp

from lowbit_jax.qarray import QArray


def qmatmul(x, w: QArray):
  """x: (..., K) float; w: QArray of logical shape (K, N) with contraction axis -2. Returns (..., N), x.dtype."""
  k_pad, n_groups = w.k_pad, w.n_groups
  vals = w.code_values()                                                     # (K_pad, N) f32
  xp = jnp.pad(x.astype(jnp.float32), [(0, 0)] * (x.ndim - 1) + [(0, k_pad - w.k)])   # (..., K_pad)
  xg = xp.reshape(x.shape[:-1] + (n_groups, k_pad // n_groups))              # (..., G, g)
  vg = vals.reshape(n_groups, k_pad // n_groups, -1)                         # (G, g, N)
  partial = jnp.einsum("...gk,gkn->...gn", xg, vg, preferred_element_type=jnp.float32)   # (..., G, N)
  scale = jnp.broadcast_to(w.scale_values(), (n_groups, vals.shape[-1]))    # (G, N)
  out = jnp.einsum("...gn,gn->...n", partial, scale, preferred_element_type=jnp.float32)
  return out.astype(x.dtype)
