"""A traced function cut into blocks for streamed (layer-by-layer) quantization.

`Level.build(closed_jaxpr, ...)` flattens one jaxpr into `Op`s (calls that consume selected weights are inlined, so
a weight hidden in a `jit`, `remat` or custom-derivative function is seen where it is used) and classifies every
value:

  static    computed from parameters and constants only (a weight, its transpose, a rope table); never cached:
            each block recomputes the static ops it reads, so a weight always enters a block as itself
  dynamic   depends on the batch (activations); these are what a block caches per calibration batch

A *consumer* is a dynamic op with a static input that depends on a selected weight (a `dot_general` against a
kernel, an einsum call, a `scan` over a stack of layers). Consumers are grouped as the reference GPTQ groups its
sequential steps: consecutive consumers that read the same activation (q/k/v after one norm, gate/up after
another; the activation is followed back through reshapes and casts) form one group, and the level is cut after
the last consumer of each group:

    Block(QUANT, ops (last_{k-1}, last_k])     the group's weights are calibrated on its inputs and quantized,
                                                then the block runs on the quantized weights to feed the next
    Block(SCAN, one scan op)                    a stack of layers: stepped one layer at a time (`Level.build`
                                                of the body, recursively), when selected weights enter as `xs`
    Block(RUN, ops)                             no weight to quantize (before a scan, or the tail)

A scan whose selected weights enter only as constants (a loop over time steps reusing one weight) is one QUANT
consumer, calibrated as a whole. Loops over ops are Python loops over the *jaxpr* (a trace-time structure), not
over data.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any

from jax.extend import core as jcore

from lowbit_jax.passes.interpreter import ALIASES, CALL, CHECKPOINT, CUSTOM, SCAN, bind

@dataclasses.dataclass(frozen=True)
class Ref:
  """A value of the flattened level: a jaxpr variable inside one inlining `frame` (a sub-jaxpr inlined twice
  gets two frames, so its variables do not collide)."""
  frame: int
  var: Any = dataclasses.field(compare=True, hash=True)


@dataclasses.dataclass(frozen=True, eq=False)
class Op:
  eqn: Any
  ins: tuple      # Ref or jcore.Literal
  outs: tuple     # Ref or None (a dropped output)


class Kind(enum.Enum):
  RUN = "run"
  QUANT = "quant"
  SCAN = "scan"


@dataclasses.dataclass(eq=False)
class Block:
  kind: Kind
  ops: list                 # indices into Level.ops: the dynamic ops of the block, in order
  weights: tuple = ()       # key paths of the selected weights this block quantizes (QUANT, SCAN)
  statics: list = dataclasses.field(default_factory=list)   # indices of the static ops it recomputes
  inputs: tuple = ()        # dynamic Refs it reads that earlier blocks / the level's inputs defined
  params: tuple = ()        # static input Refs of the level it reads (weights and other parameters)
  outputs: tuple = ()       # dynamic Refs it defines that later blocks or the level's outputs read
  cache: dict = dataclasses.field(default_factory=dict)   # compiled functions, reused across scan steps


def _closed(eqn):
  c = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  return jcore.ClosedJaxpr(c, ()) if isinstance(c, jcore.Jaxpr) else c


def read(env: dict, r):
  return r.val if isinstance(r, jcore.Literal) else env[r]


def run_ops(ops: list, order, env: dict) -> None:
  """Evaluate `ops[i]` for i in `order` (ascending) into `env` {Ref: value}."""
  for i in order:
    op = ops[i]
    outs = bind(op.eqn, [read(env, r) for r in op.ins])
    if not op.eqn.primitive.multiple_results:
      outs = [outs]
    for r, o in zip(op.outs, outs):
      if r is not None:
        env[r] = o


@dataclasses.dataclass(eq=False)
class Level:
  """One flattened jaxpr: its ops, inputs, outputs and constants, the static/dynamic split and the blocks."""
  ops: list
  in_refs: tuple
  out_refs: tuple
  consts: dict                  # Ref -> value (constvars of the jaxpr and of inlined calls)
  static: dict                  # Ref -> key paths of the parameters it depends on (static values only)
  blocks: list

  @staticmethod
  def build(closed, static_in: dict, selected: dict) -> "Level":
    """`closed`: a ClosedJaxpr; `static_in`: {invar index: frozenset of key paths} for the static inputs (the
    key paths of the parameter leaves each is, or depends on); `selected`: {key path: anything} the weights to
    quantize. Every other input is dynamic."""
    frame = object()
    in_refs = tuple(Ref(frame, v) for v in closed.jaxpr.invars)
    consts = {Ref(frame, v): c for v, c in zip(closed.jaxpr.constvars, closed.consts)}
    paths = {in_refs[i]: frozenset(p) for i, p in static_in.items()}
    static = dict(paths)
    static.update({r: frozenset() for r in consts})
    ops: list[Op] = []

    def dep(r):   # the paths a static value depends on; None for a dynamic one
      return frozenset() if isinstance(r, jcore.Literal) else static.get(r)

    def flatten(jaxpr, frame, sub):
      ref = lambda v: v if isinstance(v, jcore.Literal) else sub.get(v, Ref(frame, v))
      for eqn in jaxpr.eqns:
        ins = tuple(ref(v) for v in eqn.invars)
        deps = [dep(r) for r in ins]
        weights = frozenset().union(*(d for d in deps if d)) & selected.keys()
        name = eqn.primitive.name
        inner = None
        if weights and any(d is None for d in deps) and (name in CALL or name in CHECKPOINT or name in CUSTOM):
          inner = _closed(eqn)
        if inner is not None and len(inner.jaxpr.invars) == len(ins):   # inline: see the weight where used
          f = object()
          isub = dict(zip(inner.jaxpr.invars, ins))
          for v, c in zip(inner.jaxpr.constvars, inner.consts):
            consts[Ref(f, v)] = c
            static[Ref(f, v)] = frozenset()
          outs = flatten(inner.jaxpr, f, isub)
          for v, o in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
              sub[v] = o
          continue
        outs = tuple(None if isinstance(v, jcore.DropVar) else Ref(frame, v) for v in eqn.outvars)
        if all(d is not None for d in deps):
          for o in outs:
            if o is not None:
              static[o] = frozenset().union(*deps)
        ops.append(Op(eqn, ins, outs))
      return [ref(v) for v in jaxpr.outvars]

    out_refs = tuple(flatten(closed.jaxpr, frame, {}))
    level = Level(ops=ops, in_refs=in_refs, out_refs=out_refs, consts=consts, static=static, blocks=[])
    level.blocks = _cut(level, selected)
    return level

  def is_static(self, r) -> bool:
    return isinstance(r, jcore.Literal) or r in self.static

  def weights_of(self, op: Op, selected) -> frozenset:
    """Selected key paths a dynamic op reads through its static inputs."""
    return frozenset().union(*(self.static[r] for r in op.ins if isinstance(r, Ref) and r in self.static)) \
        & selected.keys()

  def static_closure(self, refs) -> list:
    """Indices of the static ops that compute `refs` (transitively), in order."""
    producer = {o: i for i, op in enumerate(self.ops) for o in op.outs if o is not None and o in self.static}
    need, todo = set(), [r for r in refs if isinstance(r, Ref)]
    while todo:
      r = todo.pop()
      i = producer.get(r)
      if i is None or i in need:
        continue
      need.add(i)
      todo.extend(x for x in self.ops[i].ins if isinstance(x, Ref))
    return sorted(need)

  def param_inputs(self, refs) -> tuple:
    """The level's static inputs (parameters) that `refs` are computed from."""
    order = self.static_closure(refs)
    used = {r for i in order for r in self.ops[i].ins if isinstance(r, Ref)} | {r for r in refs if
                                                                                 isinstance(r, Ref)}
    return tuple(r for r in self.in_refs if r in used and r in self.static)


def _root(level: Level, producers: dict, r):
  """The activation `r` is a view of (through casts / reshapes), for grouping consumers by input."""
  while isinstance(r, Ref) and r in producers:
    op = level.ops[producers[r]]
    dyn = [x for x in op.ins if isinstance(x, Ref) and not level.is_static(x)]
    if op.eqn.primitive.name not in ALIASES or len(dyn) != 1:
      break
    r = dyn[0]
  return r


def _steps_over_weights(level: Level, op: Op, selected) -> bool:
  """A scan that slices selected weights from its `xs` (a stack of layers), as opposed to reusing them."""
  n_in = op.eqn.params["num_consts"] + op.eqn.params["num_carry"]
  return any(level.static.get(r, frozenset()) & selected.keys() for r in op.ins[n_in:] if isinstance(r, Ref))


def _cut(level: Level, selected) -> list:
  ops = level.ops
  dynamic = [i for i, op in enumerate(ops) if not all(level.is_static(r) for r in op.ins)]
  producers = {o: i for i in dynamic for o in ops[i].outs if o is not None}
  blocks: list[Block] = []
  run: list[int] = []          # ops since the last group's last consumer
  group: Block | None = None   # the open QUANT group
  roots: set = set()
  pending: list[int] = []      # ops after the open group's last consumer
  assigned: set = set()
  for i in dynamic:
    op = ops[i]
    weights = level.weights_of(op, selected) - assigned
    if weights and op.eqn.primitive.name == SCAN and _steps_over_weights(level, op, selected):
      if group is not None:
        blocks.append(group)
        run, group = pending, None
      if run:
        blocks.append(Block(Kind.RUN, run))
      blocks.append(Block(Kind.SCAN, [i], tuple(sorted(weights, key=str))))
      assigned |= weights
      run, pending = [], []
      continue
    if weights:
      dyn = [r for r in op.ins if isinstance(r, Ref) and not level.is_static(r)]
      root = _root(level, producers, dyn[0]) if dyn else None
      if group is not None and root in roots:
        group.ops.extend(pending + [i])
        group.weights = group.weights + tuple(sorted(weights, key=str))
        pending = []
      else:
        if group is not None:
          blocks.append(group)
          run = pending
        group = Block(Kind.QUANT, run + [i], tuple(sorted(weights, key=str)))
        roots, run, pending = {root}, [], []
      assigned |= weights
      continue
    (pending if group is not None else run).append(i)
  if group is not None:
    blocks.append(group)
    run = pending
  if run:
    blocks.append(Block(Kind.RUN, run))
  _wire(level, blocks)
  return blocks


def _wire(level: Level, blocks: list) -> None:
  """Each block's static ops, dynamic inputs, parameter inputs and live outputs."""
  defined_in = {}
  for b, block in enumerate(blocks):
    for i in block.ops:
      for o in level.ops[i].outs:
        if o is not None:
          defined_in[o] = b
  last_use = {r: len(blocks) for r in level.out_refs if isinstance(r, Ref)}
  for b, block in enumerate(blocks):
    for i in block.ops:
      for r in level.ops[i].ins:
        if isinstance(r, Ref) and not level.is_static(r):
          last_use[r] = max(last_use.get(r, -1), b)
  for b, block in enumerate(blocks):
    reads = [r for i in block.ops for r in level.ops[i].ins if isinstance(r, Ref)]
    block.inputs = tuple(dict.fromkeys(r for r in reads if not level.is_static(r) and defined_in.get(r) != b))
    static_reads = [r for r in reads if level.is_static(r)]
    block.statics = level.static_closure(static_reads)
    block.params = level.param_inputs(static_reads)
    block.outputs = tuple(r for r, d in defined_in.items() if d == b and last_use.get(r, -1) > b)


def live_after(level: Level, b: int) -> set:
  """Dynamic Refs that blocks after `b` or the level's outputs still read."""
  keep = {r for r in level.out_refs if isinstance(r, Ref)}
  for block in level.blocks[b + 1:]:
    keep.update(block.inputs)
  return keep
