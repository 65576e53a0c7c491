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

`objective=Objective.ASYMMETRIC` asks each block for the float model's outputs instead of its float weights' outputs
on the quantized inputs (GPTAQ): the float model's activations are cached and propagated beside the quantized ones,
each block is calibrated against them (`calibrate(..., reference=...)`: the cross statistic Xᵀ(X_ref − X)), and the
method is handed the least-squares target W* (`algorithms/asymmetric.py`). Blocks that route tokens by the data
(argmax / top_k / sort / ragged_dot on activations: experts) are refused, since their rows cannot be paired.
Scans are stepped in `passes/streamed_scan.py`.

The whole-model mode (`calibrate` then the method) stays for small models; the two agree on a model of one group
and differ otherwise because streamed statistics see quantized inputs. Error messages name the weight's key path
in `params` (a layer of a stack: the stacked leaf's path and the layer index).
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
from typing import Any, Callable, Collection, Iterable

import jax
from tqdm.auto import tqdm

from lowbit_jax import select as sel
from lowbit_jax.algorithms.asymmetric import retarget
from lowbit_jax.checks import third_party_errors
from lowbit_jax.passes import calibration as cal
from lowbit_jax.passes.analysis import analyze
from lowbit_jax.passes.capture import ALL_STATS, Stat
from lowbit_jax.passes.segments import Block, Kind, Level, Ref, live_after, run_ops
from lowbit_jax.passes.streamed_scan import float_view, packed, count, run_scan
from lowbit_jax.passes.values import is_array

_ROUTING = frozenset({"argmax", "argmin", "top_k", "sort", "ragged_dot_general"})   # data-dependent token routes


class Objective(enum.Enum):
  """What each block is quantized to reproduce, given its inputs X from the already-quantized blocks before it."""
  SYMMETRIC = "symmetric"     # its float weight's outputs on X: min ||X W − X Ŵ|| (the reference GPTQ)
  ASYMMETRIC = "asymmetric"   # the float model's outputs: min ||X_ref W − X Ŵ|| (GPTAQ; `algorithms/asymmetric`)


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
  width: int                 # per-batch values cached per activation: n, or 2n with the float model's after them
  percdamp: float
  bar: Any = None

  def skeleton(self, values: dict):
    """A params-shaped tree holding `values` {key path: value} and None elsewhere (so key paths, and the messages
    that name them, are those of the user's tree)."""
    return jax.tree_util.tree_unflatten(self.tree, [values.get(p) for p in self.paths])


def streamed(method: Callable, apply_fn: Callable, params, batches: Iterable, *args,
             stats: Collection[Stat] = ALL_STATS, where: sel.Where = None, outlier_threshold: float = 6.0,
             objective: Objective = Objective.SYMMETRIC, **options):
  """Quantize `params` with `method`, block by block on quantized inputs; returns a new tree like `method`'s.

  Args:
    method: a calibrated transform `method(params, calib, *args, **options)` (`lowbit_jax.gptq`, `awq`,
      `smoothquant`, `sparsegpt`, `llm_int8`), called once per block on that block's weights.
    apply_fn, params, batches, stats, where, outlier_threshold: as in `lowbit_jax.calibrate`; `where` selects
      the weights over the whole model (default: by use).
    objective: `Objective.SYMMETRIC` (the reference) or `Objective.ASYMMETRIC`: each block is handed the float
      weight W* that best maps its quantized inputs to the float model's outputs (`algorithms/asymmetric.py`,
      damped with the method's `percdamp`, default 0.01), so the error of earlier blocks is compensated instead
      of passed on. It keeps the float model's activations beside the quantized ones (twice the cached
      activations, two more passes of each block) and needs Stat.HESSIAN. W* is a least-squares fit to the
      calibration tokens: give it many more tokens than the layers are wide (on a test Llama of widths 32 / 64,
      192 tokens made held-out error worse than the reference's objective, 768 made it 30 % lower).
    *args, **options: passed to `method` (its spec, its options).

  Raises:
    ValueError: as `calibrate` and `method` do (naming the weight), and for a weight that a scanned stack shares
      between all of its steps (a scan constant), which a layer-by-layer walk cannot quantize.
  """
  if not callable(method):
    raise ValueError(f"streamed: method must be a calibrated transform such as lowbit_jax.gptq, got {method!r}")
  stats, outlier_threshold = cal.check_options(stats, outlier_threshold, "streamed")
  if not isinstance(objective, Objective):
    raise ValueError(f"streamed: objective must be a lowbit_jax.Objective, got {objective!r}")
  batches = tuple(batches) if isinstance(batches, Iterable) and not isinstance(batches, (str, bytes)) else None
  if not batches:
    raise ValueError("streamed: batches must be a non-empty iterable of batches (e.g. a list of arrays)")
  ref = cal._structure(batches[0])
  for i, b in enumerate(batches):
    cal._check_batch(i, b, ref)
  found = analyze(apply_fn, params, batches[0], where=where)
  selected = {p: True for p in found.selected}

  p_flat, p_tree = jax.tree_util.tree_flatten_with_path(params, is_leaf=packed)
  paths = [p for p, _ in p_flat]
  leaves = [l for _, l in p_flat]
  dyn = [i for i, l in enumerate(leaves) if packed(l) or is_array(l)]
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
  streams = 2 if objective is Objective.ASYMMETRIC else 1    # the float model's stream starts the same
  batch_vals = {r: [jax.tree_util.tree_leaves(b)[k] for b in batches] * streams
                for k, r in enumerate(level.in_refs[n_p:])}
  job = _Job(method, args, options, stats, outlier_threshold, p_tree, paths, selected,
             len(batches), streams * len(batches), float(options.get("percdamp", 0.01)))
  total = count(job, level, names)
  job.bar = tqdm(total=total, desc=f"streamed {getattr(method, '__name__', 'method')}", leave=False,
                 disable=total < 16)
  try:
    changed = _run_level(job, level, values, names, batch_vals, top=True)[1]
  finally:
    job.bar.close()
  return jax.tree_util.tree_map_with_path(lambda p, l: changed.get(p, l), params, is_leaf=packed)


# --- one level --------------------------------------------------------------------------------------------------

def _run_level(job: _Job, level: Level, values: dict, names: dict, dyn: dict, *, top: bool, layer: tuple = ()):
  """Run every block of `level`. values: {static input Ref: value}; names: {static input Ref: the key path of
  the parameter it is, or None};
  dyn: {dynamic input Ref: [value per batch (job.width)]}; layer: the enclosing scans' step indices (for messages).
  Returns ([per-batch values] for each output, {path: new value})."""
  env = dict(dyn)
  values = dict(values)
  floats = dict(values)           # what the float model's stream runs on
  changed: dict = {}
  last = max((b for b, blk in enumerate(level.blocks) if blk.kind is not Kind.RUN), default=-1)
  for b, block in enumerate(level.blocks):
    if top and b > last:
      break                                  # the tail after the last weight: its outputs are not needed
    if block.kind is Kind.SCAN:
      outs, new = run_scan(job, level, block, values, names, env, layer, _run_level)
    else:
      new = _quantize_block(job, level, block, values, names, env, layer) if block.kind is Kind.QUANT else {}
    changed.update(new)
    values.update({r: new[p] for r, p in names.items() if p in new})
    if block.kind is not Kind.SCAN:
      outs = None if top and b == last else _propagate(level, block, values, floats, env, job)
    if outs is not None:
      env.update(outs)
    keep = live_after(level, b)
    for r in [r for r in env if r not in keep and r not in dyn]:
      del env[r]
  if top:
    return None, changed
  outs = [env[r] if r in env else _static_out(level, r, values, job.width) for r in level.out_refs]
  return outs, changed


def _static_out(level: Level, r, values: dict, n: int) -> list:
  if not isinstance(r, Ref):
    return [r.val] * n
  env = dict(level.consts)
  env.update({k: float_view(v) for k, v in values.items()})
  run_ops(level.ops, level.static_closure([r]), env)
  return [env[r]] * n


def _block_fn(level: Level, block: Block, named: list, paths: list, others: list):
  """fn(sub, (dynamic inputs, anonymous statics)) -> the block's live outputs: the block as a function of a
  params-shaped tree `sub` (its `named` params at `paths`) and a batch (the `others`: constant tables)."""
  order = sorted(set(block.statics) | set(block.ops))

  def fn(sub, batch):
    dyn_vals, anon = batch
    flat = dict(jax.tree_util.tree_flatten_with_path(sub, is_leaf=packed)[0])
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
  batches = [(tuple(env[r][k] for r in block.inputs), anon) for k in range(job.width)]
  want = frozenset(sel.path_str(p) for p in block.weights)
  with _at_layer(layer):
    if job.width > job.n:
      _check_pairable(job, level, block)
    plan = block.cache.get("calibrate")
    if plan is None:        # one per block: the layers of a scan share its trace and compilation
      plan = block.cache["calibrate"] = cal.plan(_block_fn(level, block, named, paths, others), sub, batches[0],
                                                 stats=job.stats, where=lambda path, _: path in want,
                                                 outlier_threshold=job.outlier_threshold)
    calib = cal.run(plan, sub, tuple(batches[:job.n]), tuple(batches[job.n:]) or None)
    if calib.reference is not None:
      sub = retarget(sub, calib, percdamp=job.percdamp)
    out = job.method(sub, calib, *job.args, **job.options)
  flat = dict(jax.tree_util.tree_flatten_with_path(out, is_leaf=packed)[0])
  given = dict(jax.tree_util.tree_flatten_with_path(sub, is_leaf=packed)[0])
  job.bar.update()
  # a target the method left as it was handed (not quantized) is no result: the weight stays as it was
  return {p: flat[p] for r, p in zip(named, paths) if flat.get(p) is not values[r] and flat.get(p) is not given[p]}


def _check_pairable(job: _Job, level: Level, block: Block) -> None:
  """The asymmetric objective pairs the quantized and the float model's activations position by position: refuse a
  block whose ops route tokens by the data (the two streams may route them differently)."""
  read = {r for i in block.ops for r in level.ops[i].ins if isinstance(r, Ref)} | set(block.outputs)
  for i in block.ops:
    op = level.ops[i]
    if (op.eqn.primitive.name in _ROUTING and any(isinstance(r, Ref) and not level.is_static(r) for r in op.ins)
        and any(o in read for o in op.outs if o is not None)):
      names = ", ".join(sel.path_repr(p) for p in block.weights)
      raise ValueError(f"streamed: the block of {names} routes tokens by the data ({op.eqn.primitive.name}), so the "
                       f"quantized and the float model's activations cannot be paired position by position; "
                       f"expected Objective.SYMMETRIC for a model with routed experts")


@contextlib.contextmanager
def _at_layer(layer: tuple):
  """A ValueError raised inside names the scan step (the layer of a stacked weight) too."""
  try:
    yield
  except ValueError as err:
    if not layer:
      raise
    raise ValueError(f"{err} (layer {', '.join(map(str, layer))} of the stack)") from err


def _propagate(level: Level, block: Block, values: dict, floats: dict, env: dict, job: _Job) -> dict:
  """The block's outputs per batch, on the float view of its (quantized) params; the float model's stream (after
  the first job.n) on the float params."""
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
  params = tuple(float_view(values[r]) for r in block.params)
  ref = tuple(float_view(floats[r]) for r in block.params)
  outs = [fn(params if k < job.n else ref, tuple(env[r][k] for r in block.inputs)) for k in range(job.width)]
  return {r: [o[j] for o in outs] for j, r in enumerate(block.outputs)}
