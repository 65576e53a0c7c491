"""LoRA at the dot sites of packed weights: ``x @ W_q + (alpha / r) * (x @ A) @ B`` wherever W_q is contracted.

`LoraValue` is a `QValue` (a QArray leaf seen through views) that also carries the weight's adapter in the leaf's
(*M, K, N) layout (`WeightLayout`): ``A (*M, K, r)``, ``B (*M, r, N)``, M the leaf's map axes (scanned layers,
experts) not yet sliced. Views of the weight need nothing from the adapter: the origin maps every axis of the view
back to leaf axes, which is all the dot site needs. A scan that slices a map axis slices the adapter along the same
leaf axis (`prepare_scan_xs` moves it to the front), so the adapter of layer i meets layer i's codes.

At a `dot_general` the base product runs through `qdot.dot_general` (packed, tile by tile, `kernels.qmatmul`, whose
backward is the tiled reference's: no float copy of the weight in either direction) and the low-rank term is two
small einsums in the dot's own axes: x's contracted axes flattened in the leaf's K order, batch axes matched to
map axes, free axes of the weight to its out axes (any order, merged or split by reshapes) or to a free map axis
(experts). A use where the adapter cannot attach (a convolution, a gather of experts, a slice of the contraction,
an elementwise use) raises ValueError naming the key path: the adapter is never silently dropped.
"""
from __future__ import annotations

import dataclasses
import string

import jax
import jax.numpy as jnp
from jax.tree_util import register_pytree_node_class

from lowbit_jax import qviews
from lowbit_jax.layout import WeightLayout
from lowbit_jax.passes.values import QValue, WeightHandler


@dataclasses.dataclass(frozen=True)
class LoraMeta:
  """Static part of a `LoraValue`: the leaf layout, alpha / r, the dropout rate and the leaf map axes that the
  adapter arrays still carry (leading, in this order)."""
  layout: WeightLayout
  scale: float
  dropout: float
  axes: tuple[int, ...]


@register_pytree_node_class
class LoraValue(QValue):
  """A QValue with its adapter: `a` (*axes, K, r), `b` (*axes, r, N), `keys` (*axes, key data) or None."""

  def __init__(self, q, origin, a, b, keys, meta: LoraMeta):
    super().__init__(q, origin)
    self.a, self.b, self.keys, self.meta = a, b, keys, meta

  def tree_flatten(self):
    return (self.q, self.a, self.b, self.keys), (self.origin, self.meta)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], aux[0], *children[1:], aux[1])

  def replace(self, **kw) -> "LoraValue":
    f = dict(q=self.q, origin=self.origin, a=self.a, b=self.b, keys=self.keys, meta=self.meta)
    f.update(kw)
    return LoraValue(**f)


def _fail(v: LoraValue, why: str):
  raise ValueError(f"{v.origin.where}: a LoRA adapter cannot attach here: {why}; expected the weight to be "
                   f"contracted by dot_general over its contraction axes {v.meta.layout.contract_axes} (views, "
                   f"scan slices and static layer indices allowed); leave it out with `where`")


class LoraHandler(WeightHandler):
  """`WeightHandler` semantics for QValues, plus the low-rank term at the dot sites of `LoraValue`s."""

  def __init__(self, *, backend, train: bool):
    super().__init__(backend=backend, warn=False)
    self.train = train

  def materialize(self, v, ctx, primitive, reason):
    if isinstance(v, LoraValue) and not v.origin.gathered:
      _fail(v, f"{primitive} uses it ({reason})")
    return super().materialize(v, ctx, primitive, reason)

  def first_order(self, eqn, invals, ctx):
    out = super().first_order(eqn, invals, ctx)
    v = invals[0] if invals else None
    if isinstance(v, LoraValue) and eqn.primitive.name not in ("dot_general", "ragged_dot_general") and out \
        and type(out[0]) is QValue:
      return [v.replace(q=out[0].q, origin=out[0].origin)]
    return out

  def _ragged(self, eqn, invals, ctx):
    if isinstance(invals[1], LoraValue):
      _fail(invals[1], "ragged_dot (grouped experts) has no LoRA term yet")
    return super()._ragged(eqn, invals, ctx)

  def _dot(self, eqn, invals, ctx):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract, batch = (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))
    side = next((s for s in (0, 1) if isinstance(invals[s], LoraValue) and not self.is_special(invals[1 - s])),
                None)
    out = super()._dot(eqn, invals, ctx)
    if side is None:
      return out
    w, x = invals[side], invals[1 - side]
    delta = self._term(x, w, contract[1 - side], contract[side], batch[1 - side], batch[side], side == 0)
    aval = eqn.outvars[0].aval
    return [(out[0].astype(jnp.float32) + delta.reshape(aval.shape)).astype(aval.dtype)]

  def _term(self, x, w: LoraValue, xc, wc, xb, wb, w_is_lhs):
    """(alpha / r) * (x @ A) @ B in the dot's output layout (batch, lhs free, rhs free), float32."""
    o, meta = w.origin, w.meta
    lay = meta.layout
    if o.gathered:
      _fail(w, "its experts are gathered (w[idx]) before the dot")
    if o.cut:
      _fail(w, f"a slice cuts leaf axes {sorted(o.cut)}")
    a, b, keys, axes = w.a, w.b, w.keys, list(meta.axes)
    for leaf_axis, idx in o.indexed:                     # a static layer index (params['layers'][3]) -> same row
      if leaf_axis in axes:
        i = axes.index(leaf_axis)
        a, b = jnp.take(a, idx, axis=i), jnp.take(b, idx, axis=i)
        keys = None if keys is None else jnp.take(keys, idx, axis=i)
        axes.pop(i)
    entries = o.axes
    if any(entries[d] is None for d in range(len(entries))):
      _fail(w, f"an axis of the view is not traceable to a leaf axis (views {o.views})")
    c_dims = sorted(wc, key=lambda d: entries[d][0] if entries[d] else -1)
    if tuple(e for d in c_dims for e in entries[d]) != lay.contract_axes:
      _fail(w, f"the dot contracts leaf axes {tuple(e for d in wc for e in entries[d])}")
    x_c = tuple(xc[wc.index(d)] for d in c_dims)
    b_map = []
    for d in wb:
      if len(entries[d]) != 1 or entries[d][0] not in axes:
        _fail(w, f"dot batch axis {d} is not one of its map axes {tuple(axes)}")
      b_map.append(entries[d][0])
    free = [d for d in range(len(entries)) if d not in wc and d not in wb]
    f_map = [entries[d][0] for d in free if len(entries[d]) == 1 and entries[d][0] in axes]
    f_out = [e for d in free for e in entries[d] if e not in axes]
    if sorted(f_out) != sorted(lay.out_axes) or sorted(b_map + f_map) != sorted(axes):
      _fail(w, f"its free axes map to leaf axes {f_out + f_map}, expected out axes {lay.out_axes} and map "
               f"axes {tuple(axes)}")
    letters = iter(string.ascii_letters)
    lb_ = {ax: next(letters) for ax in b_map}
    lm = {ax: next(letters) for ax in f_map}
    lo = {ax: next(letters) for ax in lay.out_axes}
    k, r = next(letters), next(letters)
    x_free = [d for d in range(x.ndim) if d not in xc and d not in xb]
    lx = [next(letters) for _ in x_free]
    xm = jnp.transpose(x, tuple(xb) + tuple(x_free) + x_c).astype(jnp.float32)
    xm = xm.reshape(xm.shape[:len(xb) + len(x_free)] + (lay.k,))                 # (*B, *M, K)
    if self.train and meta.dropout > 0.0 and keys is not None:
      key = jax.random.wrap_key_data(keys.reshape((-1,) + keys.shape[len(axes):])[0])
      keep = jax.random.bernoulli(key, 1.0 - meta.dropout, xm.shape)
      xm = jnp.where(keep, xm / (1.0 - meta.dropout), jnp.zeros((), xm.dtype))
    order = [axes.index(ax) for ax in b_map + f_map]
    a = jnp.transpose(a, order + [len(axes), len(axes) + 1])                     # (*Bmap, *Fmap, K, r)
    b = b.reshape(b.shape[:len(axes) + 1] + tuple(lay.shape[ax] for ax in lay.out_axes))
    b = jnp.transpose(b, order + list(range(len(axes), b.ndim)))                 # (*Bmap, *Fmap, r, *out)
    sb, sm = "".join(lb_.values()), "".join(lm.values())
    so = "".join(lo[ax] for ax in lay.out_axes)
    t = jnp.einsum(f"{sb}{''.join(lx)}{k},{sb}{sm}{k}{r}->{sb}{''.join(lx)}{sm}{r}", xm, a.astype(jnp.float32))
    w_free = "".join(lm[e] if e in lm else lo[e] for d in free for e in entries[d])
    out = f"{sb}{w_free}{''.join(lx)}" if w_is_lhs else f"{sb}{''.join(lx)}{w_free}"
    y = jnp.einsum(f"{sb}{''.join(lx)}{sm}{r},{sb}{sm}{r}{so}->{out}", t, b.astype(jnp.float32))
    return y * jnp.float32(meta.scale)

  # --- scans: slice the adapter along the leaf axis the scan slices -------------------------------------------
  def prepare_scan_xs(self, v, ctx):
    if not isinstance(v, LoraValue):
      return super().prepare_scan_xs(v, ctx)
    entry = v.origin.axes[0] if v.origin.axes else None
    axes = list(v.meta.axes)
    if entry is None or len(entry) != 1 or entry[0] not in axes:
      _fail(v, f"a scan slices an axis that is not one of its map axes {tuple(axes)}")
    i = axes.index(entry[0])
    move = lambda t: None if t is None else jnp.moveaxis(t, i, 0)
    try:
      q = qviews.broadcast_leading(v.q)
    except qviews.ViewError as e:
      _fail(v, str(e))
    meta = dataclasses.replace(v.meta, axes=(entry[0],) + tuple(axes[:i] + axes[i + 1:]))
    return v.replace(q=q, a=move(v.a), b=move(v.b), keys=move(v.keys), meta=meta)

  def enter_scan(self, v, level, length, ctx):
    out = super().enter_scan(v, level, length, ctx)
    if not isinstance(v, LoraValue):
      return out
    return v.replace(q=out.q, origin=out.origin, meta=dataclasses.replace(v.meta, axes=v.meta.axes[1:]))
