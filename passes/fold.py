"""Scale folding: which per-channel float parameter scales the input of which linears, so that a per-input-channel
scale s of those linears can be folded into it (``x @ W == (x / s) @ (s ⊙ W)`` with ``x / s`` computed for free).

    targets = fold_targets(apply_fn, params, batch)         # {weight path repr: FoldTarget}
    t = group_target(targets, ["params['l']['wq']['kernel']", ...])   # the shared target of a group, or None
    params = fold_scales(params, {t.leaf_path: s})           # p' = p / s (per layer for a scanned stack)

The analysis traces `apply_fn(params, *args)` once, abstractly (`jax.eval_shape`), through the interpreter of
`passes/interpreter.py`. Selected weights (`where`, default the linear weights) enter as `Tagged` values (views
followed by the view table, `passes/views.py`); every other float leaf of rank >= 1 is a *candidate* p (its last axis the channel):

  * `Chan`: a view of p whose axis `axis` enumerates p's channel (entries along other axes are copies; `lead`
    lists the value axes still holding p's unscanned leading axes, which must be consumed by scans first);
  * `Scaled`: an activation that is ``f ⊙ p`` channel-wise along `axis` (a `mul` of a Chan by a plain array, then
    further muls / divisions by plain arrays, and channel-preserving views);
  * a `dot_general` of a Scaled and a selected weight that contracts exactly the channel, with no batch axes and in
    the same scans as p, records (weight -> p); every other use of a Chan / Scaled marks p *not foldable*, every
    other use of a weight (or a dot with an input that is not Scaled) marks the weight not foldable.

Invariants of the result: a weight appears iff every one of its uses contracts a Scaled of the same p over one leaf
axis; p appears (as `FoldTarget`) iff it is foldable and every weight its Scaled values feed appears, so
`FoldTarget.weights` is exactly the set of consumers of the scaled activation (folding changes nothing else).
A stacked p (scanned over its leading axes) has shape stack + (K,) and the stack axes of its weights are their
leading axes, in the same scan order: a per-layer s of shape stack + (K,) folds layer by layer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import register_pytree_node_class

from lowbit_jax import select as sel
from lowbit_jax.passes import origin as orig
from lowbit_jax.passes import trace, views
from lowbit_jax.passes.interpreter import Handler, bind
from lowbit_jax.passes.values import Tagged, is_array
from lowbit_jax.qarray import QArray


@register_pytree_node_class
class Chan:
  """A view of candidate leaf `path`: axis `axis` enumerates its channel; `lead` the value axes of its unscanned
  leading leaf axes (in leaf order); `levels` the scans that consumed the others (outermost first)."""

  def __init__(self, array, path: tuple, axis: int, lead: tuple[int, ...], levels: tuple[str, ...]):
    self.array, self.path, self.axis, self.lead, self.levels = array, path, axis, lead, levels

  @property
  def origin(self) -> orig.Origin:
    """The leaf it comes from (the interpreter names it in notes)."""
    return orig.Origin.of_leaf(self.path, ())

  def tree_flatten(self):
    return (self.array,), (self.path, self.axis, self.lead, self.levels)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], *aux)


@register_pytree_node_class
class Scaled:
  """An activation equal to ``f ⊙ p`` along axis `axis` (p: the leaf at `path`, inside scans `levels`)."""

  def __init__(self, array, path: tuple, axis: int, levels: tuple[str, ...]):
    self.array, self.path, self.axis, self.levels = array, path, axis, levels

  @property
  def origin(self) -> orig.Origin:
    return orig.Origin.of_leaf(self.path, ())

  def tree_flatten(self):
    return (self.array,), (self.path, self.axis, self.levels)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], *aux)


@dataclasses.dataclass(frozen=True)
class FoldTarget:
  """A foldable per-channel parameter p (`leaf_path`, shape stack + (K,)) and every weight its scaled activation
  feeds (`weights`, path reprs in first-use order), each contracting that channel over leaf axis
  `contract_axes[i]` (its leading len(stack) axes are the same stack)."""
  leaf_path: tuple
  leaf_shape: tuple[int, ...]
  weights: tuple[str, ...]
  contract_axes: tuple[int, ...]

  @property
  def where(self) -> str:
    return sel.path_repr(self.leaf_path)

  @property
  def stack(self) -> tuple[int, ...]:
    return self.leaf_shape[:-1]


def _float(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


class _FoldHandler(Handler):
  """Tracks candidates (Chan / Scaled) and selected weights (Tagged); records uses on the host while tracing."""

  def __init__(self, weights: frozenset):
    self.weights = weights
    self.uses: dict[str, set] = {}               # weight where -> {(leaf path, contracted leaf axis)}
    self.consumers: dict[tuple, dict] = {}       # leaf path -> {weight where: None} (first-use order)
    self.bad_w: dict[str, str] = {}
    self.bad_p: dict[tuple, str] = {}
    self.paths: dict[str, tuple] = {}

  def is_special(self, v) -> bool:
    return isinstance(v, (Tagged, Chan, Scaled))

  def _lift(self, v):
    if isinstance(v, Tagged) and v.origin.path not in self.weights:
      n = len(v.origin.leaf_shape)
      return Chan(v.array, v.origin.path, n - 1, tuple(range(n - 1)), ())
    return v

  def _mark(self, v, why: str) -> None:
    v = self._lift(v)
    if isinstance(v, Tagged):
      self.bad_w.setdefault(v.origin.where, why)
    elif isinstance(v, (Chan, Scaled)):
      self.bad_p.setdefault(v.path, why)

  def materialize(self, v, ctx, primitive: str, reason: str):
    self._mark(v, f"{primitive}: {reason}")
    return v.array

  def first_order(self, eqn, invals, ctx):
    invals = [self._lift(v) for v in invals]
    name = eqn.primitive.name
    if name == "dot_general":
      return self._dot(eqn, invals)
    special = [i for i, v in enumerate(invals) if self.is_special(v)]
    out_aval = eqn.outvars[0].aval
    if len(special) != 1:
      return None
    (i,), v = special, invals[special[0]]
    if name in ("mul", "div") and isinstance(v, (Chan, Scaled)) and (name == "mul" or i == 0):
      if (isinstance(v, Chan) and v.lead) or not _float(out_aval.dtype):
        return None
      if out_aval.shape[v.axis] != np.shape(v.array)[v.axis]:
        return None
      out = bind(eqn, [x.array if j == i else x for j, x in enumerate(invals)])
      return [Scaled(out, v.path, v.axis, v.levels)]
    if i != 0:
      return None
    rest = invals[1:]
    if isinstance(v, Tagged):
      o = views.origin(v.origin, views.View.of(eqn, rest))
      return None if o is None else [Tagged(bind(eqn, [v.array, *rest]), o)]
    if isinstance(v, Chan) and v.lead and name not in views.WHOLE:
      return None
    axis = views.channel(v.axis, views.View.of(eqn, rest))
    if axis is None:
      return None
    out = bind(eqn, [v.array, *rest])
    if isinstance(v, Chan):
      return [Chan(out, v.path, axis, v.lead, v.levels)]
    return [Scaled(out, v.path, axis, v.levels)]

  def _dot(self, eqn, invals):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract = (tuple(lc), tuple(rc))
    batched = bool(lb) or bool(rb)
    for side in (0, 1):
      w, x = invals[side], invals[1 - side]
      if isinstance(w, Tagged):
        why = self._check(w, x, contract[side], contract[1 - side], batched)
        if why is None:
          (a,) = orig.leaf_axes(w.origin, contract[side])
          self.uses.setdefault(w.origin.where, set()).add((x.path, a))
          self.paths[w.origin.where] = w.origin.path
          self.consumers.setdefault(x.path, {})[w.origin.where] = None
        else:
          self._mark(w, f"dot_general: {why}")
          self._mark(x, f"dot_general with {w.origin.where}: {why}")
      elif not isinstance(x, Tagged):
        self._mark(w, "dot_general: the other operand is not a selected weight")
    return [bind(eqn, [v.array if self.is_special(v) else v for v in invals])]

  @staticmethod
  def _check(w: Tagged, x, w_dims, x_dims, batched: bool) -> str | None:
    if not isinstance(x, Scaled):
      return "the input is not a per-channel scaled activation"
    if batched:
      return "batched dot"
    if x_dims != (x.axis,) or len(w_dims) != 1:
      return "the dot does not contract exactly the scaled channel"
    o = w.origin
    axes = orig.leaf_axes(o, w_dims)
    if axes is None or len(axes) != 1 or axes[0] in o.cut or o.indexed:
      return "the contraction is not one whole leaf axis of the weight"
    levels = tuple(level for level, _ in o.stacked)
    if levels != x.levels or tuple(a for _, a in o.stacked) != tuple(range(len(levels))):
      return "the weight and the scale are not stacked over the same scans"
    return None

  def prepare_scan_xs(self, v, ctx):
    v = self._lift(v)
    if isinstance(v, Scaled):
      return self.materialize(v, ctx, "scan", "scanned over")
    return v

  def enter_scan(self, v, level, length, ctx):
    if isinstance(v, Tagged):
      o = orig.enter_scan(v.origin, level, length)
      if o is None:
        return self.materialize(v, ctx, "scan", "scanned over an axis that is not a leaf axis")
      return Tagged(v.array, o)
    if not v.lead or v.lead[0] != 0 or v.axis == 0:
      return self.materialize(v, ctx, "scan", "scanned over an axis that is not its leading leaf axis")
    return Chan(v.array, v.path, v.axis - 1, tuple(a - 1 for a in v.lead[1:]), v.levels + (level,))

  def targets(self, leaf_shapes: dict) -> dict[str, FoldTarget]:
    ok_w = {w: next(iter(u)) for w, u in self.uses.items() if w not in self.bad_w and len(u) == 1}
    out: dict[str, FoldTarget] = {}
    for path, ws in self.consumers.items():
      if path in self.bad_p or not all(w in ok_w and ok_w[w][0] == path for w in ws):
        continue
      t = FoldTarget(leaf_path=path, leaf_shape=leaf_shapes[path], weights=tuple(ws),
                     contract_axes=tuple(ok_w[w][1] for w in ws))
      out.update({w: t for w in ws})
    return out


def _is_q(x) -> bool:
  return isinstance(x, QArray)


def fold_targets(apply_fn: Callable, params, *args, where: sel.Where = None, **kwargs) -> dict[str, FoldTarget]:
  """{weight path repr: FoldTarget} for every selected weight whose input is a foldable per-channel parameter
  times an activation (see the module docstring). Abstract: nothing is computed. QArray leaves count as plain
  (unselected) arrays, so a scale feeding one is not foldable."""
  chosen = sel.select(params, where)
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_q)[0]
  candidates = {p: tuple(np.shape(l)) for p, l in flat if p not in chosen and not _is_q(l) and hasattr(l, "dtype")
                and _float(l.dtype) and np.ndim(l) >= 1}
  handler = _FoldHandler(frozenset(chosen))
  leaves, tree = jax.tree.flatten((params, args, kwargs), is_leaf=_is_q)
  dynamic = [_is_q(x) or is_array(x) for x in leaves]

  def run(*dyn):
    it = iter(dyn)
    p, a, kw = jax.tree.unflatten(tree, [next(it) if d else x for x, d in zip(leaves, dynamic)])
    out, _ = trace.evaluate(apply_fn, p, a, kw, handler, tagged=frozenset(chosen) | frozenset(candidates))
    return out

  abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) if _is_q(x) else x for x, d in zip(leaves, dynamic) if d]
  jax.eval_shape(run, *abstract)
  return handler.targets(candidates)


def group_target(targets: Mapping[str, FoldTarget], group: Sequence[str]) -> FoldTarget | None:
  """The target every weight of `group` (path reprs) folds into, when they share one whose consumers are
  exactly `group`; None otherwise (keep the scale as an input scale)."""
  found = {targets[w] for w in group if w in targets}
  if len(found) != 1 or any(w not in targets for w in group):
    return None
  (t,) = found
  return t if set(t.weights) == set(group) else None


def _key(k) -> str:
  return k if isinstance(k, str) else sel.path_repr(k)


def fold_scales(params, scales: Mapping[Any, Any]):
  """`params` with each leaf p named in `scales` (key path or path repr) replaced by p / s (s: positive, finite,
  of p's shape, e.g. stack + (K,) for a scanned norm; computed in float32, stored in p's dtype).

  Raises:
    ValueError: naming the key path, for a missing or non-float leaf, or an s of another shape or not positive.
  """
  want = {_key(k): v for k, v in scales.items()}
  flat, tree = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_q)
  out = []
  for path, leaf in flat:
    where = sel.path_repr(path)
    if where not in want:
      out.append(leaf)
      continue
    s = jnp.asarray(want.pop(where), jnp.float32)
    if _is_q(leaf) or not hasattr(leaf, "dtype") or not _float(leaf.dtype):
      raise ValueError(f"{where}: fold_scales needs a float leaf to fold a scale into, got {type(leaf).__name__}")
    if tuple(s.shape) != tuple(np.shape(leaf)):
      raise ValueError(f"{where}: scale of shape {tuple(s.shape)} does not fit the leaf of shape "
                       f"{tuple(np.shape(leaf))}; expected the leaf's shape (stack + (K,))")
    if not bool(jnp.all(jnp.isfinite(s) & (s > 0))):
      raise ValueError(f"{where}: expected a finite, positive scale")
    out.append((jnp.asarray(leaf, jnp.float32) / s).astype(leaf.dtype))
  if want:
    raise ValueError(f"{next(iter(want))}: fold_scales got a scale for a leaf that params lack")
  return jax.tree_util.tree_unflatten(tree, out)


def scale_weight(w, s, target: FoldTarget, where: str):
  """s ⊙ w along the channel (`target.contract_axes` of `where`), layer by layer: the float weight that,
  with p folded to p / s, leaves the function unchanged."""
  a = target.contract_axes[target.weights.index(where)]
  n = len(target.stack)
  s = jnp.asarray(s, jnp.float32)
  shape = target.stack + (1,) * (a - n) + (s.shape[-1],) + (1,) * (np.ndim(w) - a - 1)
  return (jnp.asarray(w, jnp.float32) * s.reshape(shape)).astype(w.dtype)


def fold(params, targets: Mapping[str, FoldTarget], scales: Mapping[Any, Any]):
  """The float transform ``x @ W == (x / s) @ (s ⊙ W)`` with x / s folded: every leaf p in `scales` becomes
  p / s and every weight of its target s ⊙ W. The function of the result equals the original's (up to
  rounding)."""
  by_leaf = {t.where: t for t in targets.values()}
  weights = {}
  for k, s in scales.items():
    if _key(k) not in by_leaf:
      raise ValueError(f"{_key(k)}: no FoldTarget for this leaf; expected a leaf returned by fold_targets")
    t = by_leaf[_key(k)]
    weights.update({w: (t, s) for w in t.weights})
  params = fold_scales(params, scales)

  def one(path, leaf):
    where = sel.path_repr(path)
    return scale_weight(leaf, weights[where][1], weights[where][0], where) if where in weights else leaf
  return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_q)
