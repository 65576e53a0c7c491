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
import enum
import warnings
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import register_pytree_node_class

from lowbit_jax import kernels, qviews
from lowbit_jax.passes import origin as orig
from lowbit_jax.passes import qdot, views
from lowbit_jax.passes.interpreter import Ctx, Handler, bind
from lowbit_jax.qarray import QArray
from lowbit_jax.sparse import Sparse24


@register_pytree_node_class
class Tagged:
  """A float parameter leaf (or a view of it); `index`: the indices of a gather that took `origin.gathered`."""

  def __init__(self, array, origin: orig.Origin, index=None):
    self.array, self.origin, self.index = array, origin, index

  def tree_flatten(self):
    return (self.array, self.index), self.origin

  @classmethod
  def tree_unflatten(cls, origin, children):
    return cls(children[0], origin, children[1])


@register_pytree_node_class
class QValue:
  def __init__(self, q: QArray, origin: orig.Origin):
    self.q, self.origin = q, origin

  def tree_flatten(self):
    return (self.q,), self.origin

  @classmethod
  def tree_unflatten(cls, origin, children):
    return cls(children[0], origin)


class Impl(enum.Enum):
  """What runs at a site of a quantized weight."""
  PALLAS = "pallas kernel"
  REFERENCE = "reference (tiled)"
  DEQUANTIZED = "dequantized"
  ROWS = "gathered rows decoded"   # a lookup: only the gathered rows (embedding tokens) are decoded


@dataclasses.dataclass(frozen=True)
class SiteRun:
  """One consumer of a quantized weight in a traced run: which implementation ran there, and why."""
  where: str
  primitive: str
  impl: Impl
  detail: str
  nesting: tuple[str, ...] = ()


class DequantizedWarning(UserWarning):
  """A quantized weight ran as a float copy somewhere (see `QuantizedFn.report`)."""


class Collector(Protocol):
  """Statistics of the activations `x` (rows, K) feeding one weight (see `passes/capture.py`)."""

  def stats(self, x): ...
  def segmented(self, x, segment, n): ...
  def merge(self, a, b): ...
  def reduce_leading(self, a): ...
  def psum(self, a, axis_names): ...


def emit_key(origin: orig.Origin, per_entry: tuple[int, ...] = ()) -> tuple:
  """Statistics of one leaf are kept apart per enclosing scan level set, per static index and per set of leaf
  axes (experts) they carry one entry for."""
  return (origin.where, tuple(level for level, _ in origin.stacked), origin.indexed, per_entry)


def _float(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


def _plain(v):
  if isinstance(v, Tagged):
    return v.array
  if isinstance(v, QValue):
    return v.q.dequantize()
  return v


class WeightHandler(Handler):
  """Tagged and QValue semantics; `collector` None disables statistics (origin analysis, rewrite)."""

  def __init__(self, *, collector: Collector | None = None, backend=kernels.Backend.AUTO, warn: bool = True):
    self.collector = collector
    self.backend = backend
    self.emits = collector is not None
    self.warn = warn

  def is_special(self, v) -> bool:
    return isinstance(v, (Tagged, QValue))

  def materialize(self, v, ctx: Ctx, primitive: str, reason: str):
    if isinstance(v, Tagged):
      ctx.note(orig.Note(v.origin.where, primitive, f"origin ends: {reason}", ctx.nesting))
      return v.array
    if v.origin.gathered:   # rows of a lookup used as activations: decoding them is what a lookup means
      ctx.run(SiteRun(v.origin.where, primitive, Impl.ROWS, reason, ctx.nesting))
      return v.q.dequantize()
    ctx.note(orig.Note(v.origin.where, primitive, f"dequantized: {reason}", ctx.nesting))
    ctx.run(SiteRun(v.origin.where, primitive, Impl.DEQUANTIZED, reason, ctx.nesting))
    if self.warn and ctx.recording:
      warnings.warn(f"{v.origin.where}: the quantized weight runs dequantized to float at {primitive} ({reason})",
                    DequantizedWarning, stacklevel=2)
    return v.q.dequantize()

  # --- first-order rules ----------------------------------------------------------------------------------
  def first_order(self, eqn, invals, ctx):
    name = eqn.primitive.name
    if name == "dot_general":
      return self._dot(eqn, invals, ctx)
    if name == "ragged_dot_general":
      return self._ragged(eqn, invals, ctx)
    if name == "conv_general_dilated" and self.is_special(invals[1]) and not self.is_special(invals[0]):
      self._conv(eqn, invals[1], ctx)
      return None
    if not self.is_special(invals[0]) or any(self.is_special(v) for v in invals[1:]):
      return None
    v, rest = invals[0], invals[1:]
    out_aval = eqn.outvars[0].aval
    if name == "gather":
      return self._gather(eqn, v, rest[0], ctx)
    view = views.View.of(eqn, rest, bind=lambda a: bind(eqn, [a]))
    new_origin = views.origin(v.origin, view)
    if isinstance(v, Tagged):
      if new_origin is None or v.index is not None and name not in views.WHOLE:
        return None
      return [Tagged(bind(eqn, [v.array, *rest]), new_origin, v.index)]
    if isinstance(v.q, Sparse24):   # whole-weight views (identities, a float cast) keep the 2:4 format; any other
      #                               view of it is a float copy, recorded
      if (name in views.WHOLE and new_origin is not None and tuple(out_aval.shape) == tuple(v.q.shape)
          and jnp.issubdtype(out_aval.dtype, jnp.floating)):
        return [QValue(Sparse24(v.q.values, v.q.meta, k=v.q.k, dtype=out_aval.dtype), new_origin)]
      return [bind(eqn, [self.materialize(v, ctx, name, "a view of a 2:4 sparse weight"), *rest])]
    try:
      q = views.qarray(v.q, view)
    except qviews.ViewError as e:
      return [bind(eqn, [self.materialize(v, ctx, name, str(e)), *rest])]
    if tuple(q.shape) != tuple(out_aval.shape) or np.dtype(q.dtype) != np.dtype(out_aval.dtype):
      return [bind(eqn, [self.materialize(v, ctx, name, "view changed shape unexpectedly"), *rest])]
    if new_origin is None:
      new_origin = dataclasses.replace(v.origin, axes=(None,) * len(q.shape), views=v.origin.views + (name,))
    return [QValue(q, new_origin)]

  # --- gather: lookups of rows (embeddings) and of experts --------------------------------------------------
  def _gather(self, eqn, v, idx, ctx):
    dim = _take_dim(eqn, eqn.invars[0].aval.shape, idx)
    entry = None if dim is None else v.origin.axes[dim]
    leaf_axis = entry[0] if entry is not None and len(entry) == 1 else None
    ctx.site(orig.DotSite(path=v.origin.path, side=orig.Side.LHS, contract_axes=(), batch_axes=(),
                          stacked_axes=tuple(a for _, a in v.origin.stacked), indexed=v.origin.indexed,
                          views=v.origin.views, nesting=ctx.nesting, leaf_shape=v.origin.leaf_shape,
                          kind=orig.SiteKind.LOOKUP))
    if dim is None or isinstance(v, Tagged) and (leaf_axis is None or v.index is not None):
      return None
    out_axes = list(v.origin.axes[:dim]) + [None] * (np.ndim(idx) - 1) + list(v.origin.axes[dim + 1:])
    o = dataclasses.replace(v.origin, axes=tuple(out_axes), views=v.origin.views + ("gather",),
                            gathered=v.origin.gathered + ((leaf_axis,) if leaf_axis is not None else ()))
    if isinstance(v, Tagged):
      return [Tagged(bind(eqn, [v.array, idx]), o, idx[..., 0])]
    if isinstance(v.q, Sparse24):
      return [bind(eqn, [self.materialize(v, ctx, "gather", "a lookup of a 2:4 sparse weight"), idx])]
    try:
      q = qviews.take(v.q, dim, idx[..., 0])
    except qviews.ViewError as e:
      return [bind(eqn, [self.materialize(v, ctx, "gather", str(e)), idx])]
    return [QValue(q, o)]

  # --- dots -----------------------------------------------------------------------------------------------
  def _dot(self, eqn, invals, ctx):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract, batch = (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))
    for side in (0, 1):
      w, x = invals[side], invals[1 - side]
      if self.is_special(w):
        self._record(eqn, w, x, side, contract, batch, ctx)
    quantized = [isinstance(v, QValue) for v in invals]
    if all(quantized) and bool(invals[0].origin.gathered) != bool(invals[1].origin.gathered):
      rows = 0 if invals[0].origin.gathered else 1   # looked-up rows meet a weight: decode the rows only
      invals = list(invals)
      invals[rows] = self.materialize(invals[rows], ctx, "dot_general", "looked-up rows used as activations")
      quantized[rows] = False
    if quantized[0] != quantized[1]:
      side = 0 if quantized[0] else 1
      w, x = invals[side], _plain(invals[1 - side])
      try:
        out = qdot.dot_general(x, w.q, x_contract=contract[1 - side], w_contract=contract[side],
                               x_batch=batch[1 - side], w_batch=batch[side], w_is_lhs=side == 0,
                               backend=self.backend)
      except qviews.ViewError as e:
        operands = [x, self.materialize(w, ctx, "dot_general", str(e))]
        return [bind(eqn, operands if side == 1 else operands[::-1])]
      self._ran(w, "dot_general", ctx)
      return [out.astype(eqn.outvars[0].aval.dtype)]
    if any(quantized):
      return [bind(eqn, [self.materialize(v, ctx, "dot_general", "both operands are quantized")
                         if self.is_special(v) else v for v in invals])]
    return [bind(eqn, [_plain(v) for v in invals])]

  def _ran(self, w: QValue, primitive: str, ctx):
    if isinstance(w.q, Sparse24):
      ctx.run(SiteRun(w.origin.where, primitive, Impl.REFERENCE, "2:4 sparse reference", ctx.nesting))
      return
    d = kernels.last_decision()
    impl = Impl.PALLAS if d is not None and d.backend is kernels.Backend.PALLAS else Impl.REFERENCE
    ctx.run(SiteRun(w.origin.where, primitive, impl, "" if d is None else d.reason, ctx.nesting))

  def _ragged(self, eqn, invals, ctx):
    dn = eqn.params["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = dn.dot_dimension_numbers
    x, w, sizes = invals
    simple = (not lb and not rb and len(lc) == 1 and len(rc) == 1 and tuple(dn.lhs_ragged_dimensions) == (0,)
              and len(dn.rhs_group_dimensions) == 1 and not self.is_special(x) and not self.is_special(sizes))
    if not self.is_special(w) or not simple:
      return None
    g = dn.rhs_group_dimensions[0]
    self._record_sites(w, x, (rc[0],), (g,), 1, eqn.invars[0], ctx, orig.SiteKind.RAGGED_DOT)
    if isinstance(w, Tagged):
      if getattr(self.collector, "pair_axis", None) is not None:
        raise ValueError(f"{w.origin.where}: a ragged_dot feeds this weight rows sorted by the data (experts), so "
                         f"its rows cannot be paired with those of reference inputs position by position; expected "
                         f"a calibration without reference inputs for expert layers")
      if self.collector is not None:
        gid = qdot.group_ids(sizes, x.shape[0])
        self._emit(w, x, (lc[0],), (), gid, (g,), ctx, w_dims=(rc[0],))
      return [bind(eqn, [x, w.array, sizes])]
    try:
      out = qdot.ragged_dot(x, w.q, sizes, x_contract=lc[0], w_contract=rc[0], w_group=g, backend=self.backend,
                            out_dtype=eqn.outvars[0].aval.dtype)
    except qviews.ViewError as e:
      return [bind(eqn, [x, self.materialize(w, ctx, "ragged_dot", str(e)), sizes])]
    self._ran(w, "ragged_dot", ctx)
    return [out]

  def _conv(self, eqn, w, ctx):
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec          # (out, in, *spatial)
    self._record_sites(w, None, tuple(rhs_spec[1:]), (), 0, eqn.invars[0], ctx, orig.SiteKind.CONV)
    if isinstance(w, Tagged) and self.collector is not None:
      ctx.note(orig.Note(w.origin.where, "conv_general_dilated", "no statistics: a convolution (quantized "
                         "round-to-nearest along (spatial, in))", ctx.nesting))

  def _record_sites(self, w, x, w_dims, w_batch, side, x_var, ctx, kind):
    o = w.origin
    against = self.is_special(x) and not x.origin.gathered    # looked-up rows are activations
    layout = orig.contraction_layout(o, w_dims)
    batch_axes = orig.leaf_axes(o, w_batch) or tuple(o.gathered)
    ctx.site(orig.DotSite(path=o.path, side=orig.Side(side), contract_axes=layout[0] if layout else (),
                          batch_axes=batch_axes, stacked_axes=tuple(a for _, a in o.stacked), indexed=o.indexed,
                          views=o.views, nesting=ctx.nesting, leaf_shape=o.leaf_shape,
                          input_id=None if against else ctx.input_id(x_var), kind=kind,
                          against_param=against, gathered=o.gathered))

  def _record(self, eqn, w, x, side, contract, batch, ctx):
    self._record_sites(w, x, contract[side], batch[side], side, eqn.invars[1 - side], ctx, orig.SiteKind.DOT)
    if self.collector is None or not isinstance(w, Tagged):
      return
    o = w.origin
    w_batch = batch[side]
    entries = [o.axes[d] for d in w_batch]
    if w_batch and all(e is not None and len(e) == 1 for e in entries):
      per_entry, seg = tuple(e[0] for e in entries), None           # experts as dot batch dims
    elif w_batch and w.index is not None and len(w_batch) == np.ndim(w.index) and all(e is None for e in entries):
      per_entry, seg = tuple(o.gathered), w.index                   # gathered experts: one index per batch entry
    elif w_batch:
      ctx.note(orig.Note(o.where, "dot_general", "no statistics: batch dimensions that are not leaf axes",
                         ctx.nesting))
      return
    else:
      per_entry, seg = (), None
    self._emit(w, _plain(x), contract[1 - side], batch[1 - side], seg, per_entry, ctx,
               w_dims=contract[side])

  def _emit(self, w, x, x_dims, x_batch, seg, per_entry, ctx, *, w_dims):
    """Statistics of `x`'s rows in the weight's flattened K order: per batch entry (`x_batch` leading), or
    per segment id `seg` over the rows (gathered / ragged experts)."""
    o = w.origin
    layout = orig.contraction_layout(o, w_dims)
    why = ("a contraction axis is not traceable to a leaf axis" if layout is None else
           "a contraction axis is sliced" if set(layout[0]) & set(o.cut) else None)
    if why:
      ctx.note(orig.Note(o.where, "dot_general", f"no statistics: {why}", ctx.nesting))
      return
    axes, order = layout
    entries = orig.leaf_axes(o, w_dims)
    nb = len(x_batch)
    xm = jnp.moveaxis(x, tuple(x_batch) + tuple(x_dims), tuple(range(nb)) + tuple(range(x.ndim - len(x_dims),
                                                                                          x.ndim)))
    lead = xm.shape[:nb]
    xs = xm.reshape(lead + (-1,) + tuple(o.leaf_shape[a] for a in entries))   # (*B, rows, *K leaf order...)
    if order != list(range(len(order))):
      xs = jnp.transpose(xs, tuple(range(nb + 1)) + tuple(nb + 1 + i for i in order))
    xs = xs.reshape(lead + (xs.shape[nb], orig.flat_size(o, axes))).astype(jnp.float32)   # (*B, rows, K)
    if seg is not None:
      n = int(np.prod([o.leaf_shape[a] for a in per_entry]))
      rows_per = xs.shape[nb]
      seg_rows = jnp.repeat(jnp.reshape(seg, (-1,)), rows_per) if nb else jnp.reshape(seg, (-1,))
      st = self.collector.segmented(xs.reshape(-1, xs.shape[-1]), seg_rows, n)
    else:
      f = self.collector.stats
      for _ in range(nb):
        f = jax.vmap(f)
      st = f(xs)
    key = emit_key(o, per_entry)
    ctx.emitted[key] = self.collector.merge(ctx.emitted[key], st) if key in ctx.emitted else st

  # --- crossing boundaries --------------------------------------------------------------------------------
  def prepare_scan_xs(self, v, ctx):
    if isinstance(v, QValue) and isinstance(v.q, Sparse24):   # every leaf has the stack axis leading
      vals = v.q.values
      vals = qviews.broadcast_leading(vals) if isinstance(vals, QArray) else vals
      return QValue(Sparse24(vals, v.q.meta, k=v.q.k, dtype=v.q.dtype), v.origin)
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
    return Tagged(v.array, o, v.index) if isinstance(v, Tagged) else QValue(v.q, o)

  def shardable(self, v, spec) -> bool:
    return all(s is None for s in spec)

  def merge(self, a, b):
    return self.collector.merge(a, b)

  def reduce_leading(self, a):
    return self.collector.reduce_leading(a)

  def psum(self, a, axis_names):
    return self.collector.psum(a, axis_names)


def _take_dim(eqn, shape, idx) -> int | None:
  """The operand axis of a gather that is `jnp.take(w, idx, axis=d)` / `w[idx]` (index dims placed at d), or
  None for any other gather."""
  dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
  if len(dn.start_index_map) != 1 or tuple(dn.collapsed_slice_dims) != tuple(dn.start_index_map):
    return None
  if dn.operand_batching_dims or np.shape(idx)[-1:] != (1,):
    return None
  d = dn.start_index_map[0]
  if any(s != (1 if i == d else n) for i, (s, n) in enumerate(zip(sizes, shape))):
    return None
  nb = np.ndim(idx) - 1
  expected = tuple(range(d)) + tuple(range(d + nb, len(shape) - 1 + nb))
  return d if tuple(dn.offset_dims) == expected else None


def is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or isinstance(x, jax.core.Tracer)

