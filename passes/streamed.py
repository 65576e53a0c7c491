"""Streamed quantization: calibrate and quantize a model one block at a time, feeding each block the outputs of the
already-quantized blocks before it, as the reference GPTQ does (IST-DASLab/gptq `llama.py`, `llama_sequential`).

    qparams = lowbit_jax.streamed(lowbit_jax.gptq, apply_fn, params, batches, lowbit_jax.int_spec(4, group_size=128))
    qparams = lowbit_jax.streamed(lowbit_jax.awq, apply_fn, params, batches)
    qparams = lowbit_jax.streamed(lowbit_jax.sparsegpt, apply_fn, params, batches, lowbit_jax.NM(2, 4))

The function is traced once and cut into blocks (`passes/segments.py`): a scanned stack of layers is stepped one
layer at a time; an unrolled model is cut after each group of weights that read one activation (q/k/v, o,
gate/up, down). For each block, on every calibration batch, only the block's input activations are cached; the
block is calibrated with the public `calibrate` (statistics of its own weights only: peak statistics memory is one
block's), quantized with `method(block_params, calib, *args, **options)` (any calibrated transform: gptq, awq,
smoothquant, sparsegpt, llm_int8), and run again on its quantized weights (dequantized, as the reference's fake
quantization) to give the next block its inputs. Cost: two passes of each block over the batches, linear in depth.

The whole-model mode (`calibrate` then the method) stays for small models; the two agree on a model of one group
and differ otherwise because streamed statistics see quantized inputs. Error messages name the weight's key path
in `params` (a layer of a stack: the stacked leaf's path and the layer index).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Collection, Iterable

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from lowbit_jax import select as sel
from lowbit_jax.checks import third_party_errors
from lowbit_jax.passes import calibration as cal
from lowbit_jax.passes.capture import ALL_STATS, Stat
from lowbit_jax.passes.segments import Block, Kind, Level, Ref, live_after, run_ops
from lowbit_jax.passes.values import is_array
from lowbit_jax.qarray import QArray, dequantize
from lowbit_jax import qviews
from lowbit_jax.sparse import Sparse24

_VIEWS = frozenset({"transpose", "convert_element_type"})   # how a stacked weight may enter a scan


def _packed(x) -> bool:
  return isinstance(x, (QArray, Sparse24))


@dataclasses.dataclass(frozen=True)
class _Source:
  """Where a static input of a scan comes from: a parameter leaf (`path`) seen through `views` (ops applied in
  order, each a transpose or a cast), or nothing nameable (`path` None: a constant table)."""
  path: tuple | None
  views: tuple = ()


@dataclasses.dataclass
class _Job:
  method: Callable
  args: tuple
  options: dict
  stats: frozenset
  outlier_threshold: float
  tree: Any                  # treedef of params (QArray leaves as leaves)
  paths: list                # key paths of its leaves, in order
  selected: dict             # key path -> True
  n: int                     # calibration batches
  bar: Any = None

  def skeleton(self, values: dict):
    """A params-shaped tree holding `values` {key path: value} and None elsewhere (so key paths, and the messages
    that name them, are those of the user's tree)."""
    return jax.tree_util.tree_unflatten(self.tree, [values.get(p) for p in self.paths])


def streamed(method: Callable, apply_fn: Callable, params, batches: Iterable, *args,
             stats: Collection[Stat] = ALL_STATS, where: sel.Where = None, outlier_threshold: float = 6.0,
             **options):
  """Quantize `params` with `method`, block by block on quantized inputs; returns a new tree like `method`'s.

  Args:
    method: a calibrated transform `method(params, calib, *args, **options)` (`lowbit_jax.gptq`, `awq`,
      `smoothquant`, `sparsegpt`, `llm_int8`), called once per block on that block's weights.
    apply_fn, params, batches, stats, where, outlier_threshold: as in `lowbit_jax.calibrate`; `where` selects
      the weights over the whole model (default: by use).
    *args, **options: passed to `method` (its spec, its options).

  Raises:
    ValueError: as `calibrate` and `method` do (naming the weight), and for a weight that a scanned stack shares
      between all of its steps (a scan constant), which a layer-by-layer walk cannot quantize.
  """
  if not callable(method):
    raise ValueError(f"streamed: method must be a calibrated transform such as lowbit_jax.gptq, got {method!r}")
  batches = tuple(batches) if isinstance(batches, Iterable) and not isinstance(batches, (str, bytes)) else None
  if not batches:
    raise ValueError("streamed: batches must be a non-empty iterable of batches (e.g. a list of arrays)")
  ref = cal._structure(batches[0])
  for i, b in enumerate(batches):
    cal._check_batch(i, b, ref)
  found = cal.analyze(apply_fn, params, batches[0], where=where)
  selected = {p: True for p in found.selected}

  p_flat, p_tree = jax.tree_util.tree_flatten_with_path(params, is_leaf=_packed)
  paths = [p for p, _ in p_flat]
  leaves = [l for _, l in p_flat]
  dyn = [i for i, l in enumerate(leaves) if _packed(l) or is_array(l)]
  b_flat, b_tree = jax.tree_util.tree_flatten(batches[0])

  def flat_fn(pl, bl):
    full = list(leaves)
    for i, v in zip(dyn, pl):
      full[i] = v
    with third_party_errors("streamed: apply_fn(params, batch) failed while tracing; expected params and batches "
                            "that match the function"):
      return apply_fn(jax.tree_util.tree_unflatten(p_tree, full), jax.tree_util.tree_unflatten(b_tree, bl))

  abstract = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) for i in dyn]
  closed = jax.make_jaxpr(flat_fn)(abstract, b_flat)
  static_in = {j: frozenset({paths[i]}) for j, i in enumerate(dyn)}
  level = Level.build(closed, static_in, selected)
  names = {level.in_refs[j]: paths[i] for j, i in enumerate(dyn)}
  values = {level.in_refs[j]: leaves[i] for j, i in enumerate(dyn)}
  n_p = len(dyn)
  batch_vals = {r: [jax.tree_util.tree_leaves(b)[k] for b in batches] for k, r in enumerate(level.in_refs[n_p:])}
  job = _Job(method, args, options, frozenset(stats), float(outlier_threshold), p_tree, paths, selected,
             len(batches))
  total = _count(job, level, names)
  job.bar = tqdm(total=total, desc=f"streamed {getattr(method, '__name__', 'method')}", leave=False,
                 disable=total < 16)
  try:
    changed = _run_level(job, level, values, names, batch_vals, top=True)[1]
  finally:
    job.bar.close()
  return jax.tree_util.tree_map_with_path(lambda p, l: changed.get(p, l), params, is_leaf=_packed)


# --- one level --------------------------------------------------------------------------------------------------

def _run_level(job: _Job, level: Level, values: dict, names: dict, dyn: dict, *, top: bool, layer: tuple = ()):
  """Run every block of `level`. values: {static input Ref: value}; names: {static input Ref: the key path of
  the parameter it is, or None};
  dyn: {dynamic input Ref: [value per batch]}; layer: the enclosing scans' step indices (for messages).
  Returns ([per-batch values] for each output, {path: new value})."""
  env = dict(dyn)
  values = dict(values)
  changed: dict = {}
  last = max((b for b, blk in enumerate(level.blocks) if blk.kind is not Kind.RUN), default=-1)
  for b, block in enumerate(level.blocks):
    if top and b > last:
      break                                  # the tail after the last weight: its outputs are not needed
    if block.kind is Kind.SCAN:
      outs, new = _run_scan(job, level, block, values, names, env, layer)
    else:
      new = _quantize_block(job, level, block, values, names, env, layer) if block.kind is Kind.QUANT else {}
    changed.update(new)
    values.update({r: new[p] for r, p in names.items() if p in new})
    if block.kind is not Kind.SCAN:
      outs = None if top and b == last else _propagate(level, block, values, env, job.n)
    if outs is not None:
      env.update(outs)
    keep = live_after(level, b)
    for r in [r for r in env if r not in keep and r not in dyn]:
      del env[r]
  if top:
    return None, changed
  outs = [env[r] if r in env else _static_out(level, r, values, job.n) for r in level.out_refs]
  return outs, changed


def _static_out(level: Level, r, values: dict, n: int) -> list:
  if not isinstance(r, Ref):
    return [r.val] * n
  env = dict(level.consts)
  env.update({k: _float(v) for k, v in values.items()})
  run_ops(level.ops, level.static_closure([r]), env)
  return [env[r]] * n


def _float(v):
  return dequantize(v) if _packed(v) else v


def _block_fn(level: Level, block: Block, named: list, paths: list, others: list):
  """fn(sub, (dynamic inputs, anonymous statics)) -> the block's live outputs: the block as a function of a
  params-shaped tree `sub` (its `named` params at `paths`) and a batch (the `others`: constant tables)."""
  order = sorted(set(block.statics) | set(block.ops))

  def fn(sub, batch):
    dyn_vals, anon = batch
    flat = dict(jax.tree_util.tree_flatten_with_path(sub, is_leaf=_packed)[0])
    env = dict(level.consts)
    env.update((r, flat[p]) for r, p in zip(named, paths))
    env.update(zip(others, anon))
    env.update(zip(block.inputs, dyn_vals))
    run_ops(level.ops, order, env)
    return tuple(env[r] for r in block.outputs)
  return fn


def _quantize_block(job: _Job, level: Level, block: Block, values: dict, names: dict, env: dict,
                    layer: tuple) -> dict:
  """Calibrate the block on its cached inputs and quantize its weights with the method; {path: new leaf}."""
  named = [r for r in block.params if names.get(r) is not None]
  others = [r for r in block.params if names.get(r) is None]
  paths = [names[r] for r in named]
  if len(set(paths)) != len(paths):
    raise ValueError(f"streamed: {sel.path_repr(paths[0])} enters one block twice; expected each parameter once")
  sub = job.skeleton({p: values[r] for r, p in zip(named, paths)})
  anon = tuple(values[r] for r in others)
  batches = [(tuple(env[r][k] for r in block.inputs), anon) for k in range(job.n)]
  want = frozenset(sel.path_str(p) for p in block.weights)
  with _at_layer(layer):
    calib = cal.calibrate(_block_fn(level, block, named, paths, others), sub, batches, stats=job.stats,
                          where=lambda path, _: path in want, outlier_threshold=job.outlier_threshold)
    out = job.method(sub, calib, *job.args, **job.options)
  flat = dict(jax.tree_util.tree_flatten_with_path(out, is_leaf=_packed)[0])
  job.bar.update()
  return {p: flat[p] for r, p in zip(named, paths) if flat.get(p) is not values[r]}


@contextlib.contextmanager
def _at_layer(layer: tuple):
  """A ValueError raised inside names the scan step (the layer of a stacked weight) too."""
  try:
    yield
  except ValueError as err:
    if not layer:
      raise
    raise ValueError(f"{err} (layer {', '.join(map(str, layer))} of the stack)") from err


def _propagate(level: Level, block: Block, values: dict, env: dict, n: int) -> dict:
  """The block's outputs per batch, on the float view of its (quantized) params."""
  fn = block.cache.get("run")
  if fn is None:
    order = sorted(set(block.statics) | set(block.ops))

    def run(params, dyn_vals):
      e = dict(level.consts)
      e.update(zip(block.params, params))
      e.update(zip(block.inputs, dyn_vals))
      run_ops(level.ops, order, e)
      return tuple(e[r] for r in block.outputs)
    fn = block.cache["run"] = jax.jit(run)
  params = tuple(_float(values[r]) for r in block.params)
  outs = [fn(params, tuple(env[r][k] for r in block.inputs)) for k in range(n)]
  return {r: [o[j] for o in outs] for j, r in enumerate(block.outputs)}


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
  env.update({k: _float(v) for k, v in values.items()})
  run_ops(level.ops, level.static_closure([r]), env)
  return env[r]


def _body(job: _Job, level: Level, block: Block, names: dict):
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


def _count(job: _Job, level: Level, names: dict) -> int:
  """QUANT blocks in all (scan bodies once per step): the progress bar's length."""
  total = 0
  for block in level.blocks:
    if block.kind is Kind.QUANT:
      total += 1
    elif block.kind is Kind.SCAN:
      body, srcs = _body(job, level, block, names)
      inner = {body.in_refs[j]: s.path for j, s in srcs.items()}
      total += level.ops[block.ops[0]].eqn.params["length"] * _count(job, body, inner)
  return total


def _run_scan(job: _Job, level: Level, block: Block, values: dict, names: dict, env: dict, layer: tuple):
  """Step a scan over stacked weights one layer at a time (the body a Level of its own); returns its outputs
  per batch and {path: new stacked leaf}."""
  op = level.ops[block.ops[0]]
  p = op.eqn.params
  n_const, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
  body, srcs = _body(job, level, block, names)
  statics = {j: _static_value(level, r, values) if isinstance(r, Ref) else r.val
             for j, r in enumerate(op.ins) if level.is_static(r) and not n_const <= j < n_const + n_carry}
  stacked = {j: _static_value(level, op.ins[j], values) for j in statics if j >= n_const + n_carry
             and srcs[j].path is not None}   # a stacked weight as the scan sees it (packed if no view applies)
  carry = [env[r] if not level.is_static(r) else [statics.get(j, _static_value(level, r, values))] * job.n
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
    outs, new = _run_level(job, body, vals, inner, dyn, top=False, layer=layer + (i,))
    carry = outs[:n_carry]
    ys[i] = outs[n_carry:]
    for path, v in new.items():
      per_step.setdefault(path, {})[i] = v
  outs = {r: carry[k] for k, r in enumerate(op.outs[:n_carry]) if r is not None}
  for k, r in enumerate(op.outs[n_carry:]):
    if r is not None:
      outs[r] = [jnp.stack([ys[i][k][b] for i in range(length)]) for b in range(job.n)]
  return outs, _write_back(stacked, srcs, per_step, length)


def _index(v, i):
  return jax.tree.map(lambda a: a[i], v) if _packed(v) else v[i]


def _write_back(stacked: dict, srcs: dict, per_step: dict, length: int) -> dict:
  """{path: new stacked leaf} from the per-layer results, undoing the views the scan saw it through."""
  out = {}
  for path, steps in per_step.items():
    j = next(j for j, s in srcs.items() if s.path == path)
    whole = stacked[j]
    layers = [steps.get(i, _index(whole, i)) for i in range(length)]
    if any(_packed(x) for x in layers) and not all(isinstance(x, type(layers[0])) for x in layers):
      raise ValueError(f"streamed: {sel.path_repr(path)}: the method quantized some layers of the stack and "
                       f"left others float; expected every layer quantized alike")
    value = jax.tree.map(lambda *a: jnp.stack(a), *layers) if _packed(layers[0]) else jnp.stack(layers)
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
