"""A jaxpr interpreter with per-primitive rules, for passes whose values are not all plain arrays.

`eval_jaxpr(jaxpr, consts, args, handler, ctx)` evaluates equation by equation. Environment values are jax arrays
(or tracers of an enclosing `jit` / `grad` / `vmap` / `pmap` / `shard_map`) or *special* values owned by the
`Handler` (a float weight tagged with its origin, a QArray seen through views). Rules:

  * no special operand: the equation is bound unchanged (`primitive.bind`), so user code, custom derivative rules
    and jit boundaries are kept exactly as traced;
  * first-order primitive with a special operand: `handler.first_order` (views, `dot_general`); if it declines,
    every special operand is materialised (`handler.materialize`, with the reason recorded) and the equation bound;
  * higher-order primitive with a special operand: the sub-jaxprs are interpreted and the primitive is *rebuilt*
    through its public API (`lax.scan`, `lax.while_loop`, `lax.switch`, `jax.checkpoint`, `jax.shard_map`), so the
    result still composes with `jit`, `grad`, `vmap`, `pmap` and `shard_map`. `jit` / `pjit` / `closed_call` are
    inlined (shardings they carry are dropped). `custom_jvp_call` / `custom_vjp_call` are inlined too: a custom
    derivative rule whose operands include a special value is **dropped** and the primal computation is
    differentiated instead (rules of functions that see only activations, e.g. `relu`, `softmax`, are kept
    because those equations have no special operand). Unknown higher-order primitives get materialised operands.

Handlers may *emit* pytrees (calibration statistics) keyed by `(leaf, scan levels, static index)`: emissions inside
a scan come out stacked along a leading axis (kept when the key names that scan level, reduced otherwise), inside
`while` / `cond` they are threaded through the carry / branch outputs, inside `shard_map` they are summed over
the manual mesh axes (`handler.psum`). Primitive names are matched by sets so renames across jax versions
(`pjit`/`jit`, `remat2`/`checkpoint`) keep working.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax import lax
from jax.extend import core as jcore

from lowbit_jax.passes.origin import Note

CALL = frozenset({"jit", "pjit", "closed_call", "core_call", "core_closed_call"})
CHECKPOINT = frozenset({"remat2", "checkpoint", "remat"})
CUSTOM = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"})
SCAN, WHILE, COND, SHARD_MAP = "scan", "while", "cond", "shard_map"
# Ops whose output is the same activation for input-identity purposes (one activation feeding q/k/v).
ALIASES = frozenset({"convert_element_type", "copy", "copy_p", "reshape", "squeeze", "expand_dims",
                     "broadcast_in_dim", "pvary", "sharding_constraint", "reduce_precision"})


@dataclasses.dataclass
class Ctx:
  """Where evaluation is (`nesting`, outermost first; `prefix` a stable id of the position) and what it emitted.
  `notes`, `sites` and `recording` are shared with children; `emitted` is per scope."""
  nesting: tuple[str, ...] = ()
  prefix: str = ""
  emitted: dict = dataclasses.field(default_factory=dict)
  notes: list = dataclasses.field(default_factory=list)
  sites: list = dataclasses.field(default_factory=list)
  runs: list = dataclasses.field(default_factory=list)
  roots: dict = dataclasses.field(default_factory=dict)   # jaxpr var -> the var it is a view of (ALIASES)
  ids: dict = dataclasses.field(default_factory=dict)     # root var -> small int, in first-use order
  recording: bool = True

  def child(self, label: str | None, pos: str, *, recording: bool | None = None) -> "Ctx":
    return Ctx(nesting=self.nesting + ((label,) if label else ()), prefix=f"{self.prefix}/{pos}",
               notes=self.notes, sites=self.sites, runs=self.runs, roots=self.roots, ids=self.ids,
               recording=self.recording if recording is None else recording)

  def input_id(self, var) -> int | None:
    """A stable small id of the activation `var` (a jaxpr variable), seen through value-preserving views, so
    that two dots fed by one activation (q/k/v; gate/up) get the same id. None for literals."""
    if not isinstance(var, jcore.Var):
      return None
    root = self.roots.get(var, var)
    return self.ids.setdefault(root, len(self.ids))

  def run(self, item) -> None:
    if self.recording:
      self.runs.append(item)

  def note(self, item) -> None:
    if self.recording:
      self.notes.append(item)

  def site(self, item) -> None:
    if self.recording:
      self.sites.append(item)


class Handler:
  """Mode-specific rules. Subclasses define what a special value is; defaults describe a pass with none."""
  emits = False

  def is_special(self, v) -> bool:
    return False

  def materialize(self, v, ctx: Ctx, primitive: str, reason: str):
    return v

  def first_order(self, eqn, invals: list, ctx: Ctx) -> list | None:
    return None

  def prepare_scan_xs(self, v, ctx: Ctx):
    """Before a scan slices `v` along its leading axis: return a pytree that slices correctly (or materialise)."""
    return self.materialize(v, ctx, "scan", "scanned over")

  def enter_scan(self, v, level: str, length: int, ctx: Ctx):
    """Inside the scan body: the slice of a value returned by `prepare_scan_xs`."""
    return v

  def shardable(self, v, spec) -> bool:
    return False

  # emitted pytrees
  def merge(self, a, b):
    raise NotImplementedError

  def reduce_leading(self, a):
    raise NotImplementedError

  def psum(self, a, axis_names):
    raise NotImplementedError


def eval_closed(closed: jcore.ClosedJaxpr, args, handler: Handler, ctx: Ctx) -> list:
  return eval_jaxpr(closed.jaxpr, closed.consts, args, handler, ctx)


def eval_jaxpr(jaxpr: jcore.Jaxpr, consts, args, handler: Handler, ctx: Ctx) -> list:
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  def write(v, val):
    if not isinstance(v, jcore.DropVar):
      env[v] = val

  if len(args) != len(jaxpr.invars):
    raise ValueError(f"interpreter: jaxpr expects {len(jaxpr.invars)} inputs, got {len(args)}")
  for v, c in zip(jaxpr.constvars, consts):
    write(v, c)
  for v, a in zip(jaxpr.invars, args):
    write(v, a)
  for i, eqn in enumerate(jaxpr.eqns):
    if eqn.primitive.name in ALIASES and isinstance(eqn.invars[0], jcore.Var):
      ctx.roots[eqn.outvars[0]] = ctx.roots.get(eqn.invars[0], eqn.invars[0])
    invals = [read(v) for v in eqn.invars]
    outs = eval_eqn(eqn, invals, handler, ctx, str(i))
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for v, o in zip(eqn.outvars, outs):
      write(v, o)
  return [read(v) for v in jaxpr.outvars]


def bind(eqn, invals):
  """Bind `eqn`'s primitive on new operands, as `jax.core.eval_jaxpr` does (both `get_bind_params` styles)."""
  got = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = got if isinstance(got, tuple) else ((), got)
  manager = getattr(getattr(eqn, "ctx", None), "manager", None)
  if manager is None:
    return eqn.primitive.bind(*subfuns, *invals, **params)
  with manager:
    return eqn.primitive.bind(*subfuns, *invals, **params)


def eval_eqn(eqn, invals: list, handler: Handler, ctx: Ctx, pos: str):
  if not any(handler.is_special(v) for v in invals):
    return bind(eqn, invals)
  name = eqn.primitive.name
  rule = _HIGHER_ORDER.get(name)
  if rule is None:
    for names, r in _HIGHER_ORDER_SETS:
      if name in names:
        rule = r
  if rule is not None:
    outs = rule(eqn, invals, handler, ctx, pos)
    return outs if eqn.primitive.multiple_results else outs[0]
  if not _has_subjaxpr(eqn):
    outs = handler.first_order(eqn, invals, ctx)
    if outs is not None:
      return outs if eqn.primitive.multiple_results else outs[0]
    reason = "not a view or matmul of the weight"
  else:
    reason = "unknown higher-order primitive"
  return bind(eqn, materialize_all(invals, handler, ctx, name, reason))


def materialize_all(vals, handler: Handler, ctx: Ctx, primitive: str, reason: str) -> list:
  return [handler.materialize(v, ctx, primitive, reason) if handler.is_special(v) else v for v in vals]


def _has_subjaxpr(eqn) -> bool:
  for v in eqn.params.values():
    if any(isinstance(x, (jcore.Jaxpr, jcore.ClosedJaxpr)) for x in (v if isinstance(v, (tuple, list)) else (v,))):
      return True
  return False


def _merge_into(ctx: Ctx, emitted: dict, handler: Handler, transform: Callable[[Any, Any], Any] = None):
  for k, v in emitted.items():
    if transform is not None:
      v = transform(k, v)
    ctx.emitted[k] = handler.merge(ctx.emitted[k], v) if k in ctx.emitted else v


# --- rules ------------------------------------------------------------------------------------------------

def _link(ctx: Ctx, inner_vars, outer_vars) -> None:
  """Inner variables of an inlined / rebuilt sub-jaxpr stand for the outer ones (input identity)."""
  for i, o in zip(inner_vars, outer_vars):
    if isinstance(o, jcore.Var):
      ctx.roots[i] = ctx.roots.get(o, o)


def _call(eqn, invals, handler, ctx, pos):
  closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if isinstance(closed, jcore.Jaxpr):
    closed = jcore.ClosedJaxpr(closed, ())
  _link(ctx, closed.jaxpr.invars, eqn.invars)
  name = eqn.params.get("name", eqn.primitive.name)
  return _inline(closed, invals, handler, ctx, f"{eqn.primitive.name}({name})", pos)


def _inline(closed, invals, handler, ctx, label, pos):
  sub = ctx.child(label, pos)
  outs = eval_closed(closed, invals, handler, sub)
  _merge_into(ctx, sub.emitted, handler)
  return outs


def _custom(eqn, invals, handler, ctx, pos):
  closed = eqn.params["call_jaxpr"]
  name = eqn.params.get("name", eqn.primitive.name)
  if not isinstance(closed, jcore.ClosedJaxpr):
    closed = jcore.ClosedJaxpr(closed, ())
  _link(ctx, closed.jaxpr.invars, eqn.invars)
  ctx.note(_note(handler, invals, eqn.primitive.name,
                 f"custom derivative rule of {name!r} dropped (the primal computation is differentiated)", ctx))
  return _inline(closed, invals, handler, ctx, f"{eqn.primitive.name}({name})", pos)


def _note(handler, invals, primitive, reason, ctx):
  where = next((getattr(v, "origin").where for v in invals if handler.is_special(v)), "?")
  return Note(where, primitive, reason, ctx.nesting)


def _checkpoint(eqn, invals, handler, ctx, pos):
  closed = eqn.params["jaxpr"]
  if not isinstance(closed, jcore.ClosedJaxpr):
    closed = jcore.ClosedJaxpr(closed, ())
  _link(ctx, closed.jaxpr.invars, eqn.invars)
  sub_ctx = ctx.child(eqn.primitive.name, pos)

  def body(*args):
    sub = dataclasses.replace(sub_ctx, emitted={})
    outs = eval_closed(closed, list(args), handler, sub)
    return materialize_all(outs, handler, sub, eqn.primitive.name, "returned from the checkpointed function"), \
        sub.emitted

  outs, emitted = jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True),
                                 policy=eqn.params.get("policy"))(*invals)
  _merge_into(ctx, emitted, handler)
  return outs


def _scan(eqn, invals, handler, ctx, pos):
  p = eqn.params
  nc, ncarry, length = p["num_consts"], p["num_carry"], p["length"]
  closed = p["jaxpr"]
  _link(ctx, closed.jaxpr.invars[:nc], eqn.invars[:nc])
  consts, init, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]
  init = materialize_all(init, handler, ctx, "scan", "carried through a scan (not a constant view)")
  special_x = [handler.is_special(v) for v in xs]
  xs = [handler.prepare_scan_xs(v, ctx) if s else v for v, s in zip(xs, special_x)]
  level = f"{ctx.prefix}/{pos}"
  sub_ctx = ctx.child(f"scan(length={length})", pos)

  def body(carry, x):
    sub = dataclasses.replace(sub_ctx, emitted={})
    x = [handler.enter_scan(v, level, length, sub) if s and handler.is_special(v) else v
         for v, s in zip(x, special_x)]
    outs = eval_closed(closed, [*consts, *carry, *x], handler, sub)
    outs = materialize_all(outs, handler, sub, "scan", "returned from a scan body")
    return outs[:ncarry], (outs[ncarry:], sub.emitted)

  carry, (ys, emitted) = lax.scan(body, list(init), list(xs), length=length, reverse=p["reverse"],
                                  unroll=p.get("unroll", 1))
  _merge_into(ctx, emitted, handler, lambda k, v: v if level in k[1] else handler.reduce_leading(v))
  return [*carry, *ys]


def _discover(fn, *args) -> dict:
  """Shapes of what `fn(*args)` emits, by an abstract evaluation that records nothing."""
  return jax.eval_shape(fn, *args)


def _zeros(shapes):
  return jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), shapes)


def _while(eqn, invals, handler, ctx, pos):
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
  init = materialize_all(init, handler, ctx, "while", "carried through a while loop (not a constant view)")
  sub_ctx = ctx.child("while", pos)

  def cond_fn(carry):
    return eval_closed(p["cond_jaxpr"], [*cconsts, *carry[0]], handler, sub_ctx.child(None, "cond"))[0]

  def run_body(carry, recording):
    sub = dataclasses.replace(sub_ctx.child(None, "body", recording=recording), nesting=sub_ctx.nesting)
    outs = eval_closed(p["body_jaxpr"], [*bconsts, *carry], handler, sub)
    return materialize_all(outs, handler, sub, "while", "returned from a while body"), sub.emitted

  shapes = _discover(lambda c: run_body(c, False)[1], list(init)) if handler.emits else {}

  def body_fn(carry):
    outs, em = run_body(carry[0], True)
    return outs, {k: handler.merge(carry[1][k], v) for k, v in em.items()}

  out, emitted = lax.while_loop(cond_fn, body_fn, (list(init), _zeros(shapes)))
  _merge_into(ctx, emitted, handler)
  return out


def _cond(eqn, invals, handler, ctx, pos):
  branches = eqn.params["branches"]
  index, ops = invals[0], invals[1:]
  if handler.is_special(index):
    index = handler.materialize(index, ctx, "cond", "used as a branch index")

  def make(i, recording):
    def fn():
      sub = dataclasses.replace(ctx.child(None, f"{pos}/{i}", recording=recording), nesting=ctx.nesting + (
          f"cond(branch {i})",))
      outs = eval_closed(branches[i], list(ops), handler, sub)
      return materialize_all(outs, handler, sub, "cond", "returned from a cond branch"), sub.emitted
    return fn

  shapes = {}
  if handler.emits:
    for i in range(len(branches)):
      shapes.update(_discover(lambda i=i: make(i, False)()[1]))

  def full(i):
    def fn():
      outs, em = make(i, True)()
      zeros = _zeros(shapes)
      zeros.update(em)
      return outs, zeros
    return fn

  outs, emitted = lax.switch(index, [full(i) for i in range(len(branches))])
  _merge_into(ctx, emitted, handler)
  return outs


def _shard_map(eqn, invals, handler, ctx, pos):
  p = eqn.params
  jaxpr = p["jaxpr"]
  closed = jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(jaxpr, ())
  in_specs = list(p["in_specs"])
  args = []
  for v, spec in zip(invals, in_specs):
    if handler.is_special(v) and not handler.shardable(v, spec):
      v = handler.materialize(v, ctx, "shard_map", f"enters shard_map with in_spec {spec}")
    args.append(v)
  axes = tuple(p.get("newly_manual_axes", p.get("manual_axes", p.get("axis_names", frozenset()))))
  sub_ctx = ctx.child("shard_map", pos)

  def body(*a):
    sub = dataclasses.replace(sub_ctx, emitted={})
    outs = eval_closed(closed, list(a), handler, sub)
    outs = materialize_all(outs, handler, sub, "shard_map", "returned from shard_map")
    emitted = {k: handler.psum(v, axes) for k, v in sub.emitted.items()}
    return outs, emitted

  out_spec_fn = lambda: (list(p["out_specs"]), jax.sharding.PartitionSpec())
  kw = dict(mesh=p["mesh"], in_specs=tuple(in_specs), out_specs=out_spec_fn(),
            check_vma=p.get("check_vma", p.get("check_rep", True)))
  if axes and set(axes) != set(p["mesh"].axis_names):
    kw["axis_names"] = frozenset(axes)
  outs, emitted = jax.shard_map(body, **kw)(*args)
  _merge_into(ctx, emitted, handler)
  return outs


_HIGHER_ORDER = {SCAN: _scan, WHILE: _while, COND: _cond, SHARD_MAP: _shard_map}
_HIGHER_ORDER_SETS = ((CALL, _call), (CHECKPOINT, _checkpoint), (CUSTOM, _custom))
