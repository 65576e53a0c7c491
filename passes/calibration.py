"""Public API of the passes: `calibrate` (-> `Calibration`) and `analyze` (-> the weight-consuming dots).

    calib = lowbit_jax.calibrate(lambda p, x: model.apply({'params': p}, x), params, batches)
    calib['layers/attention/wq/kernel'].hessian      # (n_layers, K, K) for a scanned stack, (K, K) otherwise

`apply_fn(params, batch)` is traced once (under `jax.jit`) and re-run on every batch; statistics stream in float32
(see `passes/capture.py`). Batches and params may be sharded `jax.Array`s, e.g. on a (data, model) mesh the batches
split over "data" and tensor-parallel weights over "model": the jitted step follows their `NamedSharding`s (XLA
reduces over the shards), so every statistic equals a one-device run up to float rounding; statistics come back
placed as XLA chose (a Hessian may be split over "model" on one axis).

Invariants of a `Calibration`: every selected leaf has an entry (otherwise `calibrate` raises, naming it and why);
entries are in the order the trace first consumes the weights (the order sequential algorithms visit layers);
stacked statistics have one leading axis per `stacked_axes` entry of the leaf (outermost scan first).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Collection, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lowbit_jax import select as sel
from lowbit_jax.checks import as_float, third_party_errors
from lowbit_jax.passes import capture, trace
from lowbit_jax.passes.capture import ALL_STATS, Stat, Stats
from lowbit_jax.passes.interpreter import Ctx
from lowbit_jax.layout import WeightLayout
from lowbit_jax.passes.origin import DotSite, Note, SiteKind
from lowbit_jax.passes.uses import WeightUse, weight_uses
from lowbit_jax.passes.values import WeightHandler, is_array
from lowbit_jax.qarray import QArray


@dataclasses.dataclass(frozen=True)
class WeightCalibration:
  """Statistics of the activations feeding one weight leaf (see `capture.Stats` for the fields); `stats` is None
  for a weight used without traceable statistics (a convolution, a lookup table)."""
  path: tuple
  stats: Stats | None = dataclasses.field(repr=False)
  use: WeightUse = dataclasses.field(repr=False)
  contract_axes: tuple[int, ...]   # leaf axes the statistics' K enumerates (ascending, row-major)
  stacked_axes: tuple[int, ...]    # leaf axes matching the statistics' leading axes (layers, experts)

  @property
  def sites(self) -> tuple[DotSite, ...]:
    return self.use.sites

  @property
  def layout(self) -> WeightLayout:
    return self.use.layout(self.stacked_axes if self.stats is not None else None)

  @property
  def where(self) -> str:
    return sel.path_repr(self.path)

  @property
  def hessian(self):
    return self.stats.hessian

  @property
  def xtx(self):
    return self.stats.xtx

  @property
  def count(self):
    return self.stats.count

  @property
  def absmax(self):
    return self.stats.absmax

  @property
  def abs_mean(self):
    return self.stats.abs_mean

  @property
  def outlier_fraction(self):
    return self.stats.outlier_fraction


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationOptions:
  """What `calibrate` was asked for (replayed by `Calibration.recalibrate`)."""
  stats: frozenset
  where: sel.Where
  outlier_threshold: float


@dataclasses.dataclass(frozen=True)
class Calibration:
  """{key path: WeightCalibration} in first-use order (the jax key path of each leaf; `calib[path]` also takes
  the "a/b/kernel" form that `where=` regexes match, for interactive use). `uses` has the `WeightUse` of every
  weight the trace saw, calibrated or not.

  Keeps what a sequential algorithm needs to re-run later layers on its partly quantized parameters:
  `recalibrate(params)` re-runs the same apply function on the same batches with the same options.
  """
  weights: dict = dataclasses.field(repr=False)
  notes: tuple[Note, ...] = dataclasses.field(repr=False)
  n_batches: int
  apply_fn: Callable = dataclasses.field(repr=False)
  batches: tuple = dataclasses.field(repr=False)
  options: CalibrationOptions = dataclasses.field(repr=False)
  uses: dict = dataclasses.field(repr=False, default_factory=dict)

  def __repr__(self):
    names = [sel.path_str(p) for p in self.weights]
    return (f"Calibration({len(self.weights)} weights, {self.n_batches} batches, {len(self.notes)} notes: "
            f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")

  def _lookup(self, key) -> tuple:
    if isinstance(key, tuple) and key in self.weights:
      return key
    for p in self.weights:
      if key in (sel.path_str(p), sel.path_repr(p)):
        return p
    raise KeyError(f"Calibration has no statistics for {key!r}; it has "
                   f"{[sel.path_str(p) for p in self.weights][:8]}...")

  def __getitem__(self, key) -> WeightCalibration:
    return self.weights[self._lookup(key)]

  def __contains__(self, key) -> bool:
    try:
      self._lookup(key)
      return True
    except KeyError:
      return False

  def __iter__(self) -> Iterator[tuple]:
    return iter(self.weights)

  def __len__(self) -> int:
    return len(self.weights)

  @property
  def order(self) -> list[tuple]:
    """Key paths in the order the function first consumes them."""
    return list(self.weights)

  def recalibrate(self, params) -> "Calibration":
    """Statistics of `params` (e.g. with earlier layers already quantized) on the stored batches."""
    o = self.options
    return calibrate(self.apply_fn, params, self.batches, stats=o.stats, where=o.where,
                     outlier_threshold=o.outlier_threshold)


def _structure(batch):
  flat, tree = jax.tree_util.tree_flatten_with_path(batch)
  return tree, [(path, tuple(np.shape(x)), np.dtype(getattr(x, "dtype", np.asarray(x).dtype)))
                for path, x in flat]


def _check_batch(i: int, batch, ref) -> None:
  tree, leaves = _structure(batch)
  for path, shape, _ in leaves:
    if 0 in shape:
      raise ValueError(f"calibrate: batches[{i}]{jax.tree_util.keystr(path)} has shape {shape} (no rows); "
                       f"expected non-empty batches")
  if tree != ref[0]:
    raise ValueError(f"calibrate: batch {i} has structure {tree}; expected the structure of batch 0: {ref[0]}")
  for (path, shape, dtype), (_, rshape, rdtype) in zip(leaves, ref[1]):
    if shape != rshape or dtype != rdtype:
      raise ValueError(f"calibrate: batch{jax.tree_util.keystr(path)} of batch {i} has shape {shape} and dtype "
                       f"{dtype}; expected shape {rshape} and dtype {rdtype} like batch 0 (all batches must "
                       f"share one shape so the traced function is reused)")


def calibrate(apply_fn: Callable, params, batches: Iterable, *, stats: Collection[Stat] = ALL_STATS,
              where: sel.Where = None, outlier_threshold: float = 6.0) -> Calibration:
  """Collect activation statistics for every selected weight, streaming over `batches`.

  Args:
    apply_fn: `apply_fn(params, batch)`; any Flax linen / NNX / transformers function, unmodified.
    params: the parameter pytree (QArray leaves run quantized and are not calibrated).
    batches: an iterable of batches (all with one structure, shape and dtype); sharded batches and params (data
      and model mesh axes) give the statistics of a one-device run (see the module docstring).
    stats: which `Stat`s to collect (the Hessian costs K² per weight).
    where: which leaves (see `lowbit_jax.select`); default: by use, every float weight the function contracts
      against an activation (`dot_general` / einsum / `ragged_dot` / conv), whatever its name or layout;
      embedding tables (looked up, tied to a head or not) are left out: select them explicitly to quantize them.
    outlier_threshold: |x| above which an entry counts as an LLM.int8 outlier.

  Weights used without traceable statistics (convolutions, lookup tables, dots whose batch axes are not leaf
  axes) get an entry with `stats=None` and a note; algorithms quantize those round-to-nearest and say so.

  Raises:
    ValueError: naming the leaf or batch, when the selector matches nothing, a selected leaf is never used by the
      function, a weight is contracted in two incompatible ways, batches differ in structure/shape/dtype,
      `apply_fn` fails on `params`, or the activations feeding a weight contain NaN/inf.

  Example (a 2-layer MLP in plain jnp; any Flax apply function works the same way)::

    >>> import jax, jax.numpy as jnp
    >>> import lowbit_jax as lb
    >>> k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    >>> params = {"l1": {"kernel": jax.random.normal(k1, (64, 64)) / 8},
    ...           "l2": {"kernel": jax.random.normal(k2, (64, 64)) / 8}}
    >>> apply = lambda p, x: jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]
    >>> batches = list(jax.random.normal(k3, (2, 16, 64)))        # two batches of 16 rows
    >>> calib = lb.calibrate(apply, params, batches)
    >>> calib
    Calibration(2 weights, 2 batches, 0 notes: l1/kernel, l2/kernel)
    >>> wc = calib["l2/kernel"]
    >>> wc.contract_axes, wc.hessian.shape, int(wc.count)           # H = 2 XᵀX / T over the T = 32 rows feeding l2
    ((0,), (64, 64), 32)
    >>> bool(jnp.all(wc.absmax <= 1.0))                             # |tanh| <= 1
    True
  """
  stats = frozenset(stats)
  if not stats or not all(isinstance(s, Stat) for s in stats):
    raise ValueError(f"calibrate: stats must be a non-empty collection of lowbit_jax.passes.Stat, got {stats!r}")
  if not callable(apply_fn):
    raise ValueError(f"calibrate: apply_fn must be a callable apply_fn(params, batch), got {apply_fn!r}")
  outlier_threshold = as_float(outlier_threshold, "calibrate: outlier_threshold", low=0.0)
  if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
    raise ValueError(f"calibrate: batches must be an iterable of batches (e.g. a list of arrays), got "
                     f"{type(batches).__name__}")
  batches = tuple(batches)
  if not batches:
    raise ValueError("calibrate: batches is empty; expected at least one batch")
  ref = _structure(batches[0])
  _check_batch(0, batches[0], ref)
  described = [(jax.tree_util.keystr(p), shape, str(d)) for p, shape, d in ref[1]]

  def guarded(p, batch):
    with third_party_errors(f"calibrate: apply_fn(params, batch) failed while tracing (batch leaves {described}); "
                            f"expected params and batches that match the function"):
      return apply_fn(p, batch)

  found = analyze(guarded, params, batches[0], where=where)
  chosen = {p: leaf for p, leaf in found.candidates.items() if p in found.selected}
  for p in chosen:
    found.uses[p].check()
  tagged = frozenset(chosen)
  traced: dict[str, Ctx] = {}

  def step(p, batch):
    _, emitted, ctx = capture.collect(guarded, p, batch, tagged=tagged, stats=stats,
                                      outlier_threshold=outlier_threshold)
    traced["ctx"] = ctx
    return emitted

  step = jax.jit(step)
  merge = jax.jit(capture.merge)
  total = None
  for i, batch in enumerate(tqdm(batches, desc="calibrate", leave=False, disable=len(batches) < 8)):
    _check_batch(i, batch, ref)
    emitted = step(params, batch)
    counts = jax.device_get({k: s.nonfinite for k, s in emitted.items()})
    bad = {k[0]: np.asarray(v) for k, v in counts.items() if np.any(np.asarray(v) > 0)}
    if bad:
      first = next((s.where for s in traced["ctx"].sites if s.where in bad), next(iter(bad)))
      n = bad[first]
      layers = f" (per-layer counts {n.tolist()})" if n.ndim else ""
      raise ValueError(f"{first}: the activations feeding this weight contain {int(n.sum())} NaN/inf value(s) in "
                       f"batch {i}{layers}; expected finite activations (check the batch and the float "
                       f"parameters upstream)")
    total = emitted if total is None else merge(total, emitted)
  ctx = traced["ctx"]
  weights = _assemble(chosen, total or {}, ctx, found.uses)
  options = CalibrationOptions(stats=stats, where=where, outlier_threshold=float(outlier_threshold))
  return Calibration(weights=weights, notes=tuple(ctx.notes), n_batches=len(batches), apply_fn=apply_fn,
                     batches=batches, options=options, uses=found.uses)


def _assemble(chosen: dict, total: dict, ctx: Ctx, uses: dict) -> dict:
  by_path: dict = {}
  for key, st in total.items():
    by_path.setdefault(key[0], []).append((key, st))
  order = list(dict.fromkeys(s.path for s in ctx.sites if s.path in chosen))
  order += [p for p in chosen if p not in order]
  out = {}
  for path in order:
    use = uses[path]
    entries = by_path.get(sel.path_repr(path))
    if not entries:
      out[path] = WeightCalibration(path=path, stats=None, use=use, contract_axes=use.contract_axes,
                                    stacked_axes=())
      continue
    st = _stack_indexed(entries, chosen[path])
    levels, indexed, per_entry = entries[0][0][1:]
    first = next(s for s in use.sites if s.contract_axes and s.kind is not SiteKind.LOOKUP)
    stacked = first.stacked_axes if levels else ()
    if len(entries) > 1 and all(k[2] for k, _ in entries):
      stacked = (entries[0][0][2][0][0],)
    out[path] = WeightCalibration(path=path, stats=st, use=use, contract_axes=use.contract_axes,
                                  stacked_axes=tuple(stacked) + tuple(per_entry))
  return out


def _stack_indexed(entries, leaf) -> Stats:
  """One leaf used through static indices (`w[0]`, `w[1]`, ...): stack the per-index statistics."""
  if len(entries) == 1:
    return entries[0][1]
  axes = {k[2][0][0] if len(k[2]) == 1 else None for k, _ in entries}
  if len(axes) == 1 and None not in axes and not any(k[1] for k, _ in entries):
    (axis,) = axes
    n = np.shape(leaf)[axis]
    by_index = {k[2][0][1]: st for k, st in entries}
    zero = jax.tree.map(jnp.zeros_like, entries[0][1])
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[by_index.get(i, zero) for i in range(n)])
  c = capture.Collector()
  out = entries[0][1]
  for _, st in entries[1:]:
    out = c.merge(out, st)
  return out


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
