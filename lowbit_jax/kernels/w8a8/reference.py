"""The spec of `w8a8_matmul`: dynamic 8-bit activation quantization, then an 8-bit x 8-bit contraction.

    xq, sx = quantize_activations(x, act_format(w), per_token)      # sx: (..., 1) per token, or one scalar
    out[..., n] = sx[...] * sum_g  scale[g, n] * sum_{k in g} xq[..., k] * (code[k, n] - zero[g, n])

INT weights (and ternary) use int8 activations (symmetric, absmax / 127, SmoothQuant's dynamic per-token
quantization) and an exact int32 contraction; FP8 weights use E4M3 activations (absmax / 448) and an f32
contraction of the FP8 values (products of two FP8 numbers are exact in f32); NF4 weights use int8 activations
and an f32 contraction with the NF4 levels. Result in x.dtype.

Gradient: the activation quantizer is straight-through (QAT's STE), so d/dx and d/dscale are those of the
weight-only product ``x @ w`` (`kernels.qmatmul.reference`), which is what `with_reference_vjp` wires.
The weight is decoded one K-tile at a time (`kernels.qmatmul.reference.for_each_tile`): the per-group partial
sums of one tile are exact int32 (INT) or f32, scaled and accumulated in f32; no float copy of the whole weight.
This module never imports Pallas.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from lowbit_jax.formats import FORMATS, fp8
from lowbit_jax.kernels import common
from lowbit_jax.kernels.qmatmul import reference as weight_only
from lowbit_jax.qarray import QArray
from lowbit_jax.spec import Format

INT8_MAX = 127
_FP8 = (Format.FP8_E4M3, Format.FP8_E5M2)


def act_format(w: QArray) -> Format:
  """The activation format paired with w: E4M3 for FP8 weights, INT (8-bit) otherwise."""
  return act_format_for(w.spec.format)


def act_format_for(weight_format: Format) -> Format:
  """The activation format paired with weights of `weight_format` (`act_format` of a QArray; QAT's fake quant)."""
  return Format.FP8_E4M3 if weight_format in _FP8 else Format.INT


def quantize_activations(x, fmt: Format, *, per_token: bool = True):
  """Dynamic symmetric 8-bit quantization of x (..., K): (codes (..., K), scale f32 (..., 1) or (1,)*ndim).

  INT: int8 codes in [-127, 127], scale = absmax / 127. FP8_E4M3: float8_e4m3fn codes, scale = absmax / 448,
  saturating. An all-zero row (or tensor) gets scale 1, so the result is always finite.
  """
  xf = x.astype(jnp.float32)
  axes = (-1,) if per_token else tuple(range(x.ndim))
  absmax = jnp.max(jnp.abs(xf), axis=axes, keepdims=True)
  if fmt is Format.INT:
    qmax = np.float32(INT8_MAX)
  elif fmt in _FP8:
    qmax = np.float32(fp8.fmax(fmt))
  else:
    raise ValueError(f"quantize_activations: expected Format.INT or an FP8 format, got {fmt}")
  scale = jnp.where(absmax > 0, absmax / qmax, np.float32(1.0))
  q = jnp.clip(xf / scale, -qmax, qmax)
  codes = jnp.round(q).astype(jnp.int8) if fmt is Format.INT else q.astype(fp8.DTYPES[fmt])
  return codes, scale


def _forward(x, w: QArray, *, per_token: bool):
  n = w.codes.shape[-1]
  xq, sx = quantize_activations(x, act_format(w), per_token=per_token)
  xq = xq.reshape(-1, x.shape[-1])                                                # (M, K)
  xq = jnp.pad(xq, [(0, 0), (0, w.k_pad - w.k)])                                  # (M, K_pad)
  exact = w.spec.format in (Format.INT, Format.TERNARY)
  acc_t = jnp.int32 if exact else jnp.float32

  def step(acc, xt, codes, scale, zero):   # one weight tile: R scale granules of rows / R code rows each
    vals = FORMATS[w.spec.format].decode(codes, zero, w.spec)                     # (R, rows/R, N) f32
    r = vals.shape[0]
    a = xt.astype(acc_t).reshape(xt.shape[0], r, -1)                              # (M, R, rows/R)
    partial = jnp.einsum("mrk,rkn->mrn", a, vals.astype(acc_t), preferred_element_type=acc_t)   # (M, R, N)
    s = jnp.broadcast_to(scale[:, 0, :], (r, n))                                  # (R, N)
    return acc + jnp.einsum("mrn,rn->mn", partial.astype(jnp.float32), s, preferred_element_type=jnp.float32)

  out = weight_only.for_each_tile(w, xq, step, jnp.zeros((xq.shape[0], n), jnp.float32))     # (M, N)
  out = out.reshape(x.shape[:-1] + (n,))                                          # (..., N)
  return (out * sx).astype(x.dtype)


def w8a8_matmul(x, w: QArray, *, per_token: bool = True):
  """``quantize_activations(x) @ w`` for a 2-D QArray w (K, N), x (..., K) float -> (..., N) in x.dtype.
  Differentiable with a straight-through activation quantizer (see the module docstring)."""
  fwd = functools.partial(_forward, per_token=per_token)
  return common.with_reference_vjp(fwd, weight_only.qmatmul)(x, w)
