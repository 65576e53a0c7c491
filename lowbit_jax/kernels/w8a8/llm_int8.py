"""The spec of `llm_int8_matmul`: LLM.int8()'s mixed-precision decomposition, in pure jnp.

Dettmers, Lewis, Belkada, Zettlemoyer, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale"
(NeurIPS 2022), Section 3.2; reference code: bitsandbytes `MatMul8bitLt` (`bitsandbytes/autograd/_functions.py`).

For x (..., K) and an 8-bit weight W (K, N) stored with per-output-channel absmax scales:

    O = {k : max_t |x[t, k]| > threshold}                 outlier input columns, over every token of this call
    out = x[..., O] @ dequantize(W)[O, :]                  float (f32 accumulation): the outlier part
        + w8a8(x[..., not O], W)                           int8 x int8 -> int32, per-token activation absmax
                                                           scales x per-output-channel weight scales

`w8a8` is `kernels.w8a8.reference.w8a8_matmul` (symmetric int8 activations, absmax / 127 per token), applied to x
with the outlier columns zeroed, so the per-token scales come from the regular columns only, as bitsandbytes'
`int8_vectorwise_quant` zeroes the outlier columns before taking the row statistics.

Deviations from bitsandbytes, all for `jit`: the outlier columns are a (K,) mask, not a gathered index list, so
both parts are full-width contractions with zeroed columns (same values, no data-dependent shapes; the float part
costs a full f16/f32 product instead of |O| rows). A column is an outlier when |x| > threshold (bitsandbytes: >=;
`calibrate` counts >), so threshold 0 sends every non-zero column to the float path. Gradient: straight-through,
that of ``x @ W`` (as the w8a8 reference). No Pallas kernel: the dispatcher records that this reference runs.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from lowbit_jax.kernels import common
from lowbit_jax.kernels.qmatmul import reference as weight_only
from lowbit_jax.kernels.w8a8 import reference as w8a8
from lowbit_jax.qarray import QArray

DEFAULT_THRESHOLD = 6.0   # the paper's outlier magnitude


def outlier_columns(x, threshold: float):
  """(K,) bool: the input columns of x (..., K) with any |x| > threshold over all its tokens."""
  ax = jnp.abs(x.astype(jnp.float32)).reshape(-1, x.shape[-1])              # (T, K)
  return jnp.any(ax > np.float32(threshold), axis=0)


def _forward(x, w: QArray, *, threshold: float, per_token: bool):
  xf = x.astype(jnp.float32)                                                  # exact for bf16/f16 inputs
  mask = outlier_columns(xf, threshold)                                       # (K,)
  zero = jnp.zeros((), jnp.float32)
  x_out = jnp.where(mask, xf, zero)                                           # (..., K) outlier columns only
  x_reg = jnp.where(mask, zero, xf)                                           # (..., K) the rest
  fp = weight_only.qmatmul(x_out, w)                                          # (..., N) f32
  i8 = w8a8.w8a8_matmul(x_reg, w, per_token=per_token)                        # (..., N) f32
  return (fp + i8).astype(x.dtype)


def llm_int8_matmul(x, w: QArray, *, threshold: float = DEFAULT_THRESHOLD, per_token: bool = True):
  """LLM.int8() ``x @ w`` for a 2-D QArray w (K, N), x (..., K) float -> (..., N) in x.dtype (see the module
  docstring). Huge `threshold`: exactly `w8a8_matmul`; threshold 0: ``x @ w.dequantize()`` in float32."""
  fwd = functools.partial(_forward, threshold=float(threshold), per_token=per_token)
  return common.with_reference_vjp(fwd, weight_only.qmatmul)(x, w)
