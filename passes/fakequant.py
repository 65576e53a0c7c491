"""Fake quantization of activations at weight dot sites (QAT of W8A8 specs).

`ActFakeQuantHandler` is the `WeightHandler` of analysis with one change: at a `dot_general` / `ragged_dot` that
contracts a selected (Tagged) float weight over its traced contraction block, the activation operand is replaced
by its fake-quantized value, exactly the rounding `kernels.w8a8_matmul` applies when `quantized(apply_fn)` runs the
converted weight there: `kernels.w8a8.reference.quantize_activations` over the contracted axes (one scale per token,
i.e. per row of the (*B, M, K) view `passes/qdot.py` builds; or one per tensor, per dot batch entry), dequantized.
The gradient is straight-through (identity): the activation scale is the absmax, so nothing is clipped, which is
the rule `kernels/w8a8/reference.py` already uses for the packed kernel's backward.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lowbit_jax.kernels.w8a8.reference import act_format_for, quantize_activations
from lowbit_jax.passes import origin as orig
from lowbit_jax.passes.values import Tagged, WeightHandler
from lowbit_jax.spec import ActQuant, Format


def fake_activations(x, *, contract, batch, weight_format: Format, act: ActQuant):
  """x with the dims `contract` fake-quantized to 8 bits (per token over them, or per tensor per `batch` entry);
  straight-through gradient."""
  fmt = act_format_for(weight_format)
  free = tuple(d for d in range(x.ndim) if d not in contract and d not in batch)
  perm = tuple(batch) + free + tuple(contract)
  b_shape = tuple(x.shape[d] for d in batch)
  xm = jnp.transpose(x, perm)
  moved = xm.shape
  xm = xm.reshape(b_shape + (math.prod(x.shape[d] for d in free), math.prod(x.shape[d] for d in contract)))

  def one(a):                                                  # (M, K) -> (M, K) f32
    codes, scale = quantize_activations(a, fmt, per_token=act.per_token)
    return codes.astype(jnp.float32) * scale

  f = one
  for _ in batch:
    f = jax.vmap(f)
  fq = jnp.transpose(f(xm).reshape(moved), tuple(perm.index(d) for d in range(x.ndim))).astype(x.dtype)
  return x + jax.lax.stop_gradient(fq - x)


class SiteHandler(WeightHandler):
  """Analysis semantics for Tagged weights, knowing which dots are their sites: the base of the handlers that change
  what happens at a selected weight's dots (activation fake quant here, FP8 in `lowbit_jax.fp8_training`).

  Args:
    layouts: {key path: WeightLayout} of the selected weights (their traced contraction axes).
  """

  def __init__(self, layouts: dict):
    super().__init__(warn=False)
    self.layouts = layouts

  def _site_of(self, w, dims) -> bool:
    """Whether `w` is a selected weight contracted over its own contraction block at this site."""
    if not isinstance(w, Tagged) or w.origin.path not in self.layouts:
      return False
    lay = orig.contraction_layout(w.origin, dims)
    return lay is not None and lay[0] == self.layouts[w.origin.path].contract_axes


class ActFakeQuantHandler(SiteHandler):
  """Analysis semantics for Tagged weights plus fake-quantized activations at their contracting sites.

  Args:
    layouts: {key path: WeightLayout} of the selected weights (their traced contraction axes).
    weight_format: the weights' format (picks int8 or FP8 E4M3 activations, as `kernels.w8a8_matmul` does).
    act: the spec's `ActQuant` (per-token or per-tensor; no outlier threshold).
  """

  def __init__(self, layouts: dict, weight_format: Format, act: ActQuant):
    super().__init__(layouts)
    self.weight_format, self.act = weight_format, act

  def _dot(self, eqn, invals, ctx):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract, batch = (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))
    invals = list(invals)
    for side in (0, 1):
      w, x = invals[side], invals[1 - side]
      if self._site_of(w, contract[side]) and not self.is_special(x):
        invals[1 - side] = fake_activations(x, contract=contract[1 - side], batch=batch[1 - side],
                                            weight_format=self.weight_format, act=self.act)
        break
    return super()._dot(eqn, invals, ctx)

  def _ragged(self, eqn, invals, ctx):
    dn = eqn.params["ragged_dot_dimension_numbers"]
    (lc, rc), _ = dn.dot_dimension_numbers
    x, w, sizes = invals
    if self._site_of(w, tuple(rc)) and not self.is_special(x) and not self.is_special(sizes):
      x = fake_activations(x, contract=tuple(lc), batch=(), weight_format=self.weight_format, act=self.act)
    return super()._ragged(eqn, [x, w, sizes], ctx)
