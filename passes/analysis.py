"""Weight-use analysis: which leaves a function consumes as weights, where and how (abstractly: nothing computed).

    found = lowbit_jax.analyze(apply_fn, params, batch)
    found.selected                      # the default selection: every float weight contracted against an activation
    found.uses[path]                    # its `WeightUse`: dot sites in leaf coordinates, contraction axes, layout
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax import select as sel
from lowbit_jax.passes import trace
from lowbit_jax.passes.origin import DotSite, Note
from lowbit_jax.passes.uses import weight_uses
from lowbit_jax.passes.values import WeightHandler, is_array
from lowbit_jax.qarray import QArray


@dataclasses.dataclass(frozen=True)
class Analysis:
  """What one abstract trace of a function says about its weights.

  `sites`: every consumer (dot, ragged dot, conv, lookup) of a candidate float leaf or a QArray leaf, in leaf
  coordinates; `notes`: where candidates left the view chain; `uses`: {key path: WeightUse}; `candidates`:
  {key path: leaf} traced; `selected`: the key paths `where` picks (default: by use, see `calibrate`).
  """
  sites: tuple[DotSite, ...]
  notes: tuple[Note, ...]
  uses: dict = dataclasses.field(default_factory=dict, repr=False)
  candidates: dict = dataclasses.field(default_factory=dict, repr=False)
  selected: tuple = ()

  def by_path(self) -> dict[str, list[DotSite]]:
    out: dict[str, list[DotSite]] = {}
    for s in self.sites:
      out.setdefault(s.where, []).append(s)
    return out


def _candidates(params, where: sel.Where) -> dict:
  """Leaves to trace: every float leaf of >= 2 dims (selection by use), or what `where` selects."""
  if where is not None:
    return sel.select(params, where)
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))[0]
  return {p: l for p, l in flat if not isinstance(l, QArray) and hasattr(l, "shape") and hasattr(l, "dtype")
          and len(np.shape(l)) >= 2 and jnp.issubdtype(l.dtype, jnp.floating)}


def analyze(apply_fn: Callable, params, *args, where: sel.Where = None, **kwargs) -> Analysis:
  """Weight-use analysis of `apply_fn(params, *args, **kwargs)`, abstractly (nothing is computed): every
  consumer of a candidate float leaf or a QArray leaf, in leaf coordinates, the `WeightUse` of each leaf and
  the default selection.

  Raises:
    ValueError: `where` selects nothing, or a leaf `where` selects explicitly is never used by the function
      (naming it and what consumed it instead). A weight contracted in two incompatible ways is reported when
      it is calibrated or quantized (`WeightUse.conflict`).
  """
  cand = _candidates(params, where)
  has_q = any(isinstance(l, QArray) for l in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray)))
  if not cand and not has_q:
    raise ValueError("empty selection: params has no floating leaf of >= 2 dims to quantize")
  box: dict[str, Any] = {}
  leaves, tree = jax.tree.flatten((params, args, kwargs), is_leaf=lambda x: isinstance(x, QArray))
  dynamic = [isinstance(x, QArray) or is_array(x) for x in leaves]

  def run(*dyn):
    it = iter(dyn)
    p, a, kw = jax.tree.unflatten(tree, [next(it) if d else x for x, d in zip(leaves, dynamic)])
    out, ctx = trace.evaluate(apply_fn, p, a, kw, WeightHandler(warn=False), tagged=frozenset(cand))
    box["ctx"] = ctx
    return out

  jax.eval_shape(run, *[x for x, d in zip(leaves, dynamic) if d])
  ctx = box["ctx"]
  uses = weight_uses(ctx.sites, cand)
  if where is None:
    selected = tuple(p for p in cand if p in uses and uses[p].contracted and not uses[p].embedding)
    if not selected and not has_q:
      raise ValueError(f"empty selection: no float leaf of params is contracted against an activation by the "
                       f"function (traced {len(cand)} candidate leaves); select weights with `where`")
  else:
    missing = [p for p in cand if p not in uses]
    if missing:
      lines = []
      for p in missing:
        w = sel.path_repr(p)
        why = [f"{n.primitive}: {n.reason}" for n in ctx.notes if n.where == w] or ["it is never used"]
        lines.append(f"{w} (shape {tuple(np.shape(cand[p]))}): {'; '.join(dict.fromkeys(why))}")
      raise ValueError("selected weight(s) feed no dot_general, ragged_dot, conv or lookup, so they cannot be "
                       "calibrated (narrow `where`, or check that params match the function):\n  "
                       + "\n  ".join(lines))
    selected = tuple(cand)
  return Analysis(sites=tuple(ctx.sites), notes=tuple(ctx.notes), uses=uses, candidates=cand, selected=selected)
