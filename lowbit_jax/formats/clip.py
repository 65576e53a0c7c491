"""The clipping-ratio search of `QuantSpec.clip` (`lowbit_jax.ClipSearch`), shared by the formats that have a range.

For every granule, each candidate ratio r (1, 1 - 1/steps, ..., 1 - max_shrink) shrinks the granule's range to
``params_at(r)``; the granule is encoded and decoded with exactly the values that will be stored (scales rounded to
`scale_dtype`), and the ratio with the least ``sum over valid entries of |x - deq|**norm`` is kept (the first one
on ties, so r = 1 wins when clipping does not help). IST-DASLab GPTQ's `Quantizer.find_params(mse=True)` does the
same search over its grid; llama.cpp's `make_qx_quants` searches scales around absmax with the same goal.

One `lax.fori_loop` over the ratios keeps a single candidate live (memory of two copies of the weight, whatever the
number of ratios), and the trace has one step.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def search(xg, valid, red_axes, spec, params_at, encode):
  """(scale, zero) keepdims over `red_axes` of the best ratio.

  xg: the grouped float32 weight; valid: padding mask broadcastable to xg (or None); params_at(ratio) -> (scale,
  zero) of the shrunk range; encode: the format's encoder."""
  from lowbit_jax.formats import dequantize   # the one decode rule (package __init__ imports this module)
  ratios = jnp.asarray(spec.clip.ratios)
  norm = spec.clip.norm

  def error(scale, zero):
    s = scale.astype(spec.scale_dtype).astype(jnp.float32)
    deq = dequantize(encode(xg, s, zero, spec), s, zero, spec)
    e = jnp.abs(deq - xg) ** norm
    if valid is not None:
      e = jnp.where(valid, e, 0.0)
    return jnp.sum(e, axis=red_axes, keepdims=True)

  def body(i, best):
    b_err, b_scale, b_zero = best
    scale, zero = params_at(ratios[i])
    err = error(scale, zero)
    better = err < b_err
    return (jnp.where(better, err, b_err), jnp.where(better, scale, b_scale),
            None if zero is None else jnp.where(better, zero, b_zero))

  scale, zero = params_at(ratios[0])
  init = (error(scale, zero), scale, zero)
  _, scale, zero = lax.fori_loop(1, ratios.shape[0], body, init)
  return scale, zero
