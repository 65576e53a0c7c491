"""The special values of the passes and the handler that gives them meaning in the interpreter.

  * `Tagged(array, origin)`: a float parameter leaf (or a view of it) selected for calibration. Every op is
    computed on `array` as traced; views carry the `Origin` along; a `dot_general` reports a `DotSite` and, when a
    `Collector` is set, emits statistics of the other operand keyed by the leaf.
  * `QValue(q, origin)`: a QArray leaf (or a view of it, applied to codes and scales by `qviews`). A
    `dot_general` that contracts the quantized axis calls `kernels.qmatmul`; anything else dequantizes, and the
    reason is recorded as a `Note`.

Both are pytrees (children: the arrays; aux: the static origin), so they cross `scan`, `checkpoint`, `cond` and
`shard_map` boundaries as arguments.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import register_pytree_node_class

from lowbit_jax import kernels
from lowbit_jax.passes import origin as orig
from lowbit_jax.passes import qviews
from lowbit_jax.passes.interpreter import Ctx, Handler, bind
from lowbit_jax.qarray import QArray


@register_pytree_node_class
class Tagged:
  def __init__(self, array, origin: orig.Origin):
    self.array, self.origin = array, origin

  def tree_flatten(self):
    return (self.array,), self.origin

  @classmethod
  def tree_unflatten(cls, origin, children):
    return cls(children[0], origin)


@register_pytree_node_class
class QValue:
  def __init__(self, q: QArray, origin: orig.Origin):
    self.q, self.origin = q, origin

  def tree_flatten(self):
    return (self.q,), self.origin

  @classmethod
  def tree_unflatten(cls, origin, children):
    return cls(children[0], origin)


class Collector(Protocol):
  """Statistics of the activations `x` (rows, K) feeding one weight (see `passes/capture.py`)."""

  def stats(self, x): ...
  def merge(self, a, b): ...
  def reduce_leading(self, a): ...
  def psum(self, a, axis_names): ...


def emit_key(origin: orig.Origin) -> tuple:
  """Statistics of one leaf are kept apart per enclosing scan level set and per static index."""
  return (origin.where, tuple(level for level, _ in origin.stacked), origin.indexed)


def _float(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


class WeightHandler(Handler):
  """Tagged and QValue semantics; `collector` None disables statistics (origin analysis, rewrite)."""

  def __init__(self, *, collector: Collector | None = None, backend=kernels.Backend.AUTO):
    self.collector = collector
    self.backend = backend
    self.emits = collector is not None

  def is_special(self, v) -> bool:
    return isinstance(v, (Tagged, QValue))

  def materialize(self, v, ctx: Ctx, primitive: str, reason: str):
    if isinstance(v, Tagged):
      ctx.note(orig.Note(v.origin.where, primitive, f"origin ends: {reason}", ctx.nesting))
      return v.array
    ctx.note(orig.Note(v.origin.where, primitive, f"dequantized: {reason}", ctx.nesting))
    return v.q.dequantize()

  # --- first-order rules ----------------------------------------------------------------------------------
  def first_order(self, eqn, invals, ctx):
    name = eqn.primitive.name
    if name == "dot_general":
      return self._dot(eqn, invals, ctx)
    if not self.is_special(invals[0]) or any(self.is_special(v) for v in invals[1:]):
      return None
    v, rest = invals[0], invals[1:]
    in_aval, out_aval = eqn.invars[0].aval, eqn.outvars[0].aval
    new_origin = orig.propagate(v.origin, name, eqn.params, in_aval.shape, out_aval.shape,
                                in_aval.dtype, out_aval.dtype)
    if isinstance(v, Tagged):
      if new_origin is None:
        return None
      return [Tagged(bind(eqn, [v.array, *rest]), new_origin)]
    try:
      q = self._qview(v.q, eqn, rest)
    except qviews.ViewError as e:
      return [bind(eqn, [self.materialize(v, ctx, name, str(e)), *rest])]
    if tuple(q.shape) != tuple(out_aval.shape) or np.dtype(q.dtype) != np.dtype(out_aval.dtype):
      return [bind(eqn, [self.materialize(v, ctx, name, "view changed shape unexpectedly"), *rest])]
    if new_origin is None:
      new_origin = dataclasses.replace(v.origin, axes=(None,) * len(q.shape),
                                            views=v.origin.views + (name,))
    return [QValue(q, new_origin)]

  def _qview(self, q: QArray, eqn, rest) -> QArray:
    name, p = eqn.primitive.name, eqn.params
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if name == "convert_element_type":
      if not _float(p["new_dtype"]):
        raise qviews.ViewError(f"converted to non-float {np.dtype(p['new_dtype'])}")
      return qviews.with_dtype(q, p["new_dtype"])
    if name == "transpose":
      return qviews.transpose(q, p["permutation"])
    if name == "reshape" and p.get("dimensions") is None or name == "squeeze":
      return qviews.reshape(q, out_shape)
    if name == "broadcast_in_dim":
      bdims = tuple(p["broadcast_dimensions"])
      if list(bdims) != sorted(bdims) or math.prod(out_shape) != math.prod(q.shape):
        raise qviews.ViewError("broadcast that copies entries")
      return qviews.reshape(q, out_shape)
    if name in ("slice", "dynamic_slice"):
      if name == "slice" and p.get("strides") is not None and any(s != 1 for s in p["strides"]):
        raise qviews.ViewError("strided slice")
      for d, (a, b) in enumerate(zip(q.shape, out_shape)):
        if a != b:
          start = p["start_indices"][d] if name == "slice" else rest[d]
          q = qviews.slice_axis(q, d, start, b, dynamic=name == "dynamic_slice")
      return q
    if name in ("copy", "copy_p", "pvary"):
      return qviews.leafwise(q, lambda a: bind(eqn, [a]))
    if name in orig.IDENTITY_VIEWS:
      return q   # sharding annotations of the logical weight do not apply to packed leaves; dropped
    raise qviews.ViewError("not a view of the weight")

  # --- dot_general ----------------------------------------------------------------------------------------
  def _dot(self, eqn, invals, ctx):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = invals
    contract, batch = (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))
    for side in (0, 1):
      w, x = invals[side], invals[1 - side]
      if self.is_special(w):
        self._record(w, x, contract[side], contract[1 - side], batch[side], side, ctx)
    quantized = [isinstance(v, QValue) for v in invals]
    if quantized[0] != quantized[1] and not batch[0] and len(contract[0]) == 1:
      side = 0 if quantized[0] else 1
      w, x = invals[side], invals[1 - side]
      if isinstance(x, Tagged):
        x = x.array
      try:
        if not _float(x.dtype):
          raise qviews.ViewError(f"activations of dtype {x.dtype}")
        w2, free = qviews.as_matrix(w.q, contract[side][0])
      except qviews.ViewError as e:
        operands = [x, self.materialize(w, ctx, "dot_general", str(e))]
        return [bind(eqn, operands if side == 1 else operands[::-1])]
      xm = jnp.moveaxis(x, contract[1 - side][0], -1)
      out = kernels.qmatmul(xm, w2, backend=self.backend).reshape(xm.shape[:-1] + free)
      if side == 0:
        nx, nf = xm.ndim - 1, len(free)
        out = jnp.transpose(out, tuple(range(nx, nx + nf)) + tuple(range(nx)))
      return [out.astype(eqn.outvars[0].aval.dtype)]
    if any(quantized):
      why = ("batched dot (the weight has batch dimensions)" if batch[0] else
             "both operands are quantized" if all(quantized) else "contracts several axes of the weight")
      return [bind(eqn, [self.materialize(v, ctx, "dot_general", why) if self.is_special(v) else v
                         for v in invals])]
    return [bind(eqn, [v.array if isinstance(v, Tagged) else v for v in invals])]

  def _record(self, w, x, w_dims, x_dims, w_batch, side, ctx):
    o = w.origin
    layout = orig.contraction_layout(o, w_dims)
    batch_axes = orig.leaf_axes(o, w_batch) or ()
    ctx.site(orig.DotSite(path=o.path, side=orig.Side(side), contract_axes=layout[0] if layout else (),
                          batch_axes=batch_axes, stacked_axes=tuple(a for _, a in o.stacked), indexed=o.indexed,
                          views=o.views, nesting=ctx.nesting, leaf_shape=o.leaf_shape))
    if self.collector is None or not isinstance(w, Tagged):
      return
    why = ("the weight has dot batch dimensions" if w_batch else
           "a contraction axis is not traceable to a leaf axis" if layout is None else
           "a contraction axis is sliced" if set(layout[0]) & set(o.cut) else None)
    if why:
      ctx.note(orig.Note(o.where, "dot_general", f"no statistics: {why}", ctx.nesting))
      return
    if isinstance(x, (Tagged, QValue)):
      x = x.array if isinstance(x, Tagged) else x.q.dequantize()
    axes, order = layout
    entries = orig.leaf_axes(o, w_dims)
    xm = jnp.moveaxis(x, x_dims, tuple(range(x.ndim - len(x_dims), x.ndim)))
    rows = math.prod(xm.shape[:x.ndim - len(x_dims)])
    xs = xm.reshape((rows,) + tuple(o.leaf_shape[a] for a in entries))
    if order != list(range(len(order))):
      xs = jnp.transpose(xs, (0,) + tuple(1 + i for i in order))
    xs = xs.reshape(rows, orig.flat_size(o, axes)).astype(jnp.float32)
    key = emit_key(o)
    st = self.collector.stats(xs)
    ctx.emitted[key] = self.collector.merge(ctx.emitted[key], st) if key in ctx.emitted else st

  # --- crossing boundaries --------------------------------------------------------------------------------
  def prepare_scan_xs(self, v, ctx):
    if isinstance(v, QValue):
      try:
        return QValue(qviews.broadcast_leading(v.q), v.origin)
      except qviews.ViewError as e:
        return self.materialize(v, ctx, "scan", str(e))
    return v

  def enter_scan(self, v, level, length, ctx):
    o = orig.enter_scan(v.origin, level, length)
    if o is None:
      return self.materialize(v, ctx, "scan", "scanned over an axis that is not a leaf axis")
    return Tagged(v.array, o) if isinstance(v, Tagged) else QValue(v.q, o)

  def shardable(self, v, spec) -> bool:
    return all(s is None for s in spec)

  def merge(self, a, b):
    return self.collector.merge(a, b)

  def reduce_leading(self, a):
    return self.collector.reduce_leading(a)

  def psum(self, a, axis_names):
    return self.collector.psum(a, axis_names)


def is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or isinstance(x, jax.core.Tracer)

