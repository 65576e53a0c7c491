"""Streamed quantization through a `scan` over stacked weights: the body is a `Level` of its own (built once per
scan block), stepped one layer at a time with each step's slice of the stacked weights, and the per-layer results
are stacked back into the leaf with the views (transposes, casts) the scan saw it through undone. See
`passes/streamed.py`, which runs each step's level.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from lowbit_jax import qviews
from lowbit_jax import select as sel
from lowbit_jax.passes.segments import Block, Kind, Level, Ref, run_ops
from lowbit_jax.qarray import QArray, dequantize
from lowbit_jax.sparse import Sparse24

_VIEWS = frozenset({"transpose", "convert_element_type"})   # how a stacked weight may enter a scan


def packed(x) -> bool:
  return isinstance(x, (QArray, Sparse24))


def float_view(v):
  return dequantize(v) if packed(v) else v


@dataclasses.dataclass(frozen=True)
class _Source:
  """Where a static input of a scan comes from: a parameter leaf (`path`) seen through `views` (ops applied in
  order, each a transpose or a cast), or nothing nameable (`path` None: a constant table)."""
  path: tuple | None
  views: tuple = ()


# --- scans: one layer at a time ---------------------------------------------------------------------------------

def _source_of(level: Level, r, names: dict) -> _Source:
  """Follow a static Ref back through transposes / casts to a named parameter (or give up: path None)."""
  views = []
  producer = {o: op for op in level.ops for o in op.outs if o is not None}
  while r in producer:
    op = producer[r]
    ins = [x for x in op.ins if isinstance(x, Ref)]
    if op.eqn.primitive.name not in _VIEWS or len(ins) != 1:
      return _Source(None)
    views.append(op)
    r = ins[0]
  return _Source(names.get(r), tuple(reversed(views)) if names.get(r) is not None else ())


def _static_value(level: Level, r, values: dict):
  if r in values:
    return values[r]
  env = dict(level.consts)
  env.update({k: float_view(v) for k, v in values.items()})
  run_ops(level.ops, level.static_closure([r]), env)
  return env[r]


def _body(job, level: Level, block: Block, names: dict):
  """The scan body as a Level (built once per scan block), with where each static input comes from."""
  if "body" in block.cache:
    return block.cache["body"]
  op = level.ops[block.ops[0]]
  p = op.eqn.params
  n_const, n_in = p["num_consts"], p["num_consts"] + p["num_carry"]
  srcs, static_in = {}, {}
  for j, r in enumerate(op.ins):
    if not level.is_static(r) or n_const <= j < n_in:
      continue
    s = _source_of(level, r, names) if isinstance(r, Ref) else _Source(None)
    deps = (level.static.get(r, frozenset()) if isinstance(r, Ref) else frozenset()) & job.selected.keys()
    if deps and (s.path is None or j < n_const):
      w = sel.path_repr(sorted(deps, key=str)[0])
      how = ("is shared by every step of a scan (a scan constant)" if j < n_const else
             "enters a scan through an op other than a transpose or a cast")
      raise ValueError(f"streamed: {w} {how}; a layer-by-layer walk cannot quantize it. Quantize it with the "
                       f"whole-model mode (lowbit_jax.calibrate, then the method) or leave it out with `where`")
    srcs[j] = s
    static_in[j] = frozenset({s.path}) if s.path is not None else frozenset()
  body = Level.build(p["jaxpr"], static_in, job.selected)
  block.cache["body"] = (body, srcs)
  return body, srcs


def count(job, level: Level, names: dict) -> int:
  """QUANT blocks in all (scan bodies once per step): the progress bar's length."""
  total = 0
  for block in level.blocks:
    if block.kind is Kind.QUANT:
      total += 1
    elif block.kind is Kind.SCAN:
      body, srcs = _body(job, level, block, names)
      inner = {body.in_refs[j]: s.path for j, s in srcs.items()}
      total += level.ops[block.ops[0]].eqn.params["length"] * count(job, body, inner)
  return total


def run_scan(job, level: Level, block: Block, values: dict, names: dict, env: dict, layer: tuple,
             run_level: Callable):
  """Step a scan over stacked weights one layer at a time (the body a Level of its own, run by `run_level`);
  returns its outputs per batch and {path: new stacked leaf}."""
  op = level.ops[block.ops[0]]
  p = op.eqn.params
  n_const, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
  body, srcs = _body(job, level, block, names)
  statics = {j: _static_value(level, r, values) if isinstance(r, Ref) else r.val
             for j, r in enumerate(op.ins) if level.is_static(r) and not n_const <= j < n_const + n_carry}
  stacked = {j: _static_value(level, op.ins[j], values) for j in statics if j >= n_const + n_carry
             and srcs[j].path is not None}   # a stacked weight as the scan sees it (packed if no view applies)
  carry = [env[r] if not level.is_static(r) else [statics.get(j, _static_value(level, r, values))] * job.width
           for j, r in enumerate(op.ins[n_const:n_const + n_carry], n_const)]
  steps = range(length - 1, -1, -1) if p["reverse"] else range(length)
  ys: list = [None] * length
  per_step: dict = {}
  for i in steps:
    vals, inner, dyn = {}, {}, {}
    for j, r in enumerate(op.ins):
      br = body.in_refs[j]
      if n_const <= j < n_const + n_carry:
        dyn[br] = carry[j - n_const]
      elif j in statics:
        v = stacked.get(j, statics[j])
        vals[br] = _index(v, i) if j >= n_const + n_carry else v
        inner[br] = srcs[j].path
      else:
        dyn[br] = [x[i] for x in env[r]] if j >= n_const + n_carry else env[r]
    outs, new = run_level(job, body, vals, inner, dyn, top=False, layer=layer + (i,))
    carry = outs[:n_carry]
    ys[i] = outs[n_carry:]
    for path, v in new.items():
      per_step.setdefault(path, {})[i] = v
  outs = {r: carry[k] for k, r in enumerate(op.outs[:n_carry]) if r is not None}
  for k, r in enumerate(op.outs[n_carry:]):
    if r is not None:
      outs[r] = [jnp.stack([ys[i][k][b] for i in range(length)]) for b in range(job.width)]
  return outs, _write_back(stacked, srcs, per_step, length)


def _index(v, i):
  return jax.tree.map(lambda a: a[i], v) if packed(v) else v[i]


def _write_back(stacked: dict, srcs: dict, per_step: dict, length: int) -> dict:
  """{path: new stacked leaf} from the per-layer results, undoing the views the scan saw it through."""
  out = {}
  for path, steps in per_step.items():
    j = next(j for j, s in srcs.items() if s.path == path)
    whole = stacked[j]
    layers = [steps.get(i, _index(whole, i)) for i in range(length)]
    if any(packed(x) for x in layers) and not all(isinstance(x, type(layers[0])) for x in layers):
      raise ValueError(f"streamed: {sel.path_repr(path)}: the method quantized some layers of the stack and "
                       f"left others float; expected every layer quantized alike")
    value = jax.tree.map(lambda *a: jnp.stack(a), *layers) if packed(layers[0]) else jnp.stack(layers)
    for view in reversed(srcs[j].views):
      value = _undo(view, value)
    out[path] = value
  return out


def _undo(view, value):
  """The inverse of one view (a transpose or a cast) on a stacked result."""
  name = view.eqn.primitive.name
  if name == "transpose":
    perm = view.eqn.params["permutation"]
    inv = tuple(perm.index(a) for a in range(len(perm)))
    return qviews.transpose(value, inv) if isinstance(value, QArray) else jnp.transpose(value, inv)
  dtype = view.ins[0].var.aval.dtype
  return qviews.with_dtype(value, dtype) if isinstance(value, QArray) else value.astype(dtype)
