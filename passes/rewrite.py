"""Rewrite pass: run an unmodified apply function on parameters whose selected leaves are QArrays.

    qapply = lowbit_jax.quantized(apply_fn)
    logits = qapply(qparams, tokens)          # same signature as apply_fn; works under jit/grad/vmap/pmap

`apply_fn(params, *args, **kwargs)` is traced with every QArray replaced by an abstract float of its logical shape;
the jaxpr is then evaluated with the QArrays flowing through as `QValue`s: views (`transpose`, `reshape`,
`convert_element_type`, `slice`, scan slicing of stacked layers, ...) are applied to codes and scales alike, and a
`dot_general` contracting the quantized axis calls `lowbit_jax.kernels.qmatmul(x, w, backend=...)`, so under `jit`
no float copy of such a weight is formed. Any other consumer gets `q.dequantize()`; each such place is recorded
(`last_notes`). Results equal `apply_fn(dequantized params)` up to float rounding (qmatmul accumulates in float32
and returns the activation dtype).
"""
from __future__ import annotations

import functools
from typing import Callable

from lowbit_jax import kernels
from lowbit_jax.passes import trace
from lowbit_jax.passes.values import WeightHandler


class QuantizedFn:
  """`apply_fn` with QArray leaves executed through `kernels.qmatmul`. Callable like `apply_fn`.

  Attributes:
    last_notes: the `Note`s (where a weight was dequantized, and why) of the most recent trace.
    last_sites: the `DotSite`s of quantized weights of the most recent trace.
  """

  def __init__(self, apply_fn: Callable, backend: kernels.Backend):
    self.apply_fn = apply_fn
    self.backend = backend
    self.last_notes: list = []
    self.last_sites: list = []
    functools.update_wrapper(self, apply_fn)

  def __call__(self, params, *args, **kwargs):
    handler = WeightHandler(backend=self.backend)
    out, ctx = trace.evaluate(self.apply_fn, params, args, kwargs, handler)
    self.last_notes, self.last_sites = list(ctx.notes), list(ctx.sites)
    return out


def quantized(apply_fn: Callable, *, backend: kernels.Backend = kernels.Backend.AUTO) -> QuantizedFn:
  """Wrap `apply_fn(params, *args, **kwargs)` so that QArray leaves of `params` run as quantized matmuls."""
  if not callable(apply_fn):
    raise ValueError(f"quantized: expected a callable apply_fn(params, *args), got {apply_fn!r}")
  if not isinstance(backend, kernels.Backend):
    raise ValueError(f"quantized: backend must be a lowbit_jax.kernels.Backend, got {backend!r}")
  return QuantizedFn(apply_fn, backend)
