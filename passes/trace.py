"""Trace `fn(params, *args, **kwargs)` to a jaxpr and evaluate it with special parameter leaves.

The parameter leaves enter the interpreter as `QValue`s (QArray leaves) or `Tagged` values (float leaves whose key
path is in `tagged`); every other leaf is an ordinary array. Array leaves of `args` / `kwargs` are traced inputs;
non-array leaves (Python scalars, strings, None, ...) are static and closed over, as `jax.jit` would do with
`static_argnums`. The function is traced with the QArrays replaced by abstract values of their logical shape and
dtype, so `fn` never sees a QArray (model code needs no edit).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from lowbit_jax.checks import third_party_errors
from lowbit_jax.passes import origin as orig
from lowbit_jax.passes.interpreter import Ctx, Handler, eval_jaxpr
from lowbit_jax.passes.values import QValue, Tagged, is_array
from lowbit_jax.qarray import QArray
from lowbit_jax.sparse import Sparse24


def _is_q(x) -> bool:
  return isinstance(x, (QArray, Sparse24))   # packed leaves: they enter as QValues


def evaluate(fn: Callable, params, args: tuple, kwargs: dict, handler: Handler, *,
             tagged: frozenset = frozenset(), ctx: Ctx | None = None,
             wrap: Callable[[tuple, QValue], Any] | None = None, op: str = "") -> tuple[Any, Ctx]:
  """Run `fn(params, *args, **kwargs)` through the interpreter. Returns (outputs, ctx with emitted/sites/notes).
  `wrap(path, qvalue)`, if given, may replace the `QValue` of a QArray leaf by another special value of the
  handler (LoRA attaches its adapters this way). An exception from `fn` or a library it calls is re-raised as
  `lowbit_jax.checks.ApplyFnError` naming `op` (the entry point)."""
  ctx = Ctx() if ctx is None else ctx
  p_flat, p_tree = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_q)
  r_flat, r_tree = jax.tree_util.tree_flatten((args, kwargs), is_leaf=_is_q)
  p_paths = [path for path, _ in p_flat]
  p_leaves = [leaf for _, leaf in p_flat]
  leaves = p_leaves + r_flat
  dynamic = [_is_q(x) or is_array(x) for x in leaves]
  n_p = len(p_leaves)

  def flat_fn(*dyn):
    it = iter(dyn)
    full = [next(it) if d else x for x, d in zip(leaves, dynamic)]
    p = jax.tree_util.tree_unflatten(p_tree, full[:n_p])
    a, kw = jax.tree_util.tree_unflatten(r_tree, full[n_p:])
    name = getattr(fn, "__qualname__", "apply_fn")
    with third_party_errors(f"{op + ': ' if op else ''}{name}(params, ...) failed while tracing; expected params "
                            f"and arguments that match the function"):
      return fn(p, *a, **kw)

  abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) if _is_q(x) else x for x, d in zip(leaves, dynamic) if d]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*abstract)
  vals = []
  for i, (x, d) in enumerate(zip(leaves, dynamic)):
    if not d:
      continue
    if i < n_p and _is_q(x):
      x = QValue(x, orig.Origin.of_leaf(p_paths[i], x.shape))
      x = x if wrap is None else wrap(p_paths[i], x)
    elif i < n_p and p_paths[i] in tagged:
      x = Tagged(x, orig.Origin.of_leaf(p_paths[i], np.shape(x)))
    vals.append(x)
  outs = eval_jaxpr(closed.jaxpr, closed.consts, vals, handler, ctx)
  outs = [handler.materialize(o, ctx, "output", "returned by the function") if handler.is_special(o) else o
          for o in outs]
  return jax.tree.unflatten(jax.tree.structure(out_shape), outs), ctx
