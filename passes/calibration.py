"""`calibrate` (-> `Calibration`): activation statistics of every selected weight (which: `passes/analysis.py`).

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
from typing import Callable, Collection, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lowbit_jax import select as sel
from lowbit_jax.checks import as_float, third_party_errors
from lowbit_jax.passes import capture
from lowbit_jax.passes.capture import ALL_STATS, Stat, Stats
from lowbit_jax.passes.analysis import Analysis, analyze
from lowbit_jax.passes.interpreter import Ctx
from lowbit_jax.layout import WeightLayout
from lowbit_jax.passes.origin import DotSite, Note, SiteKind
from lowbit_jax.passes.uses import WeightUse


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
  reference: tuple | None = dataclasses.field(repr=False, default=None)

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
                     outlier_threshold=o.outlier_threshold, reference=self.reference)


def _structure(batch):
  flat, tree = jax.tree_util.tree_flatten_with_path(batch)
  return tree, [(path, tuple(np.shape(x)), np.dtype(getattr(x, "dtype", np.asarray(x).dtype)))
                for path, x in flat]


def _check_batch(i: int, batch, ref, what: str = "batch") -> None:
  tree, leaves = _structure(batch)
  for path, shape, _ in leaves:
    if 0 in shape:
      where = f"batches[{i}]" if what == "batch" else f"{what} {i}"
      raise ValueError(f"calibrate: {where}{jax.tree_util.keystr(path)} has shape {shape} (no rows); "
                       f"expected non-empty batches")
  if tree != ref[0]:
    raise ValueError(f"calibrate: {what} {i} has structure {tree}; expected the structure of batch 0: {ref[0]}")
  for (path, shape, dtype), (_, rshape, rdtype) in zip(leaves, ref[1]):
    if shape != rshape or dtype != rdtype:
      raise ValueError(f"calibrate: batch{jax.tree_util.keystr(path)} of {what} {i} has shape {shape} and dtype "
                       f"{dtype}; expected shape {rshape} and dtype {rdtype} like batch 0 (all batches must "
                       f"share one shape so the traced function is reused)")


def check_options(stats, outlier_threshold, op: str) -> tuple[frozenset, float]:
  """`stats` as a non-empty frozenset of `Stat`s and `outlier_threshold` as a float >= 0, or a ValueError."""
  stats = frozenset(stats) if isinstance(stats, Iterable) and not isinstance(stats, (str, bytes)) else stats
  if not isinstance(stats, frozenset) or not stats or not all(isinstance(s, Stat) for s in stats):
    raise ValueError(f"{op}: stats must be a non-empty collection of lowbit_jax.passes.Stat, got {stats!r}")
  return stats, as_float(outlier_threshold, f"{op}: outlier_threshold", low=0.0)


def calibrate(apply_fn: Callable, params, batches: Iterable, *, stats: Collection[Stat] = ALL_STATS,
              where: sel.Where = None, outlier_threshold: float = 6.0, reference: Iterable | None = None
              ) -> Calibration:
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
    reference: optional reference batches, one per batch and shaped like it (e.g. the same tokens' activations in
      the float model, where `batches` are those of the quantized one): each weight's `stats.xtd` is then
      Σ xᵀ(x_ref − x) over the rows of both runs, position by position (asymmetric calibration, as in
      `lowbit_jax.streamed(..., objective=Objective.ASYMMETRIC)`); every other statistic is of `batches`. Rows
      are paired by position, so both runs must route tokens alike: a weight fed by a `ragged_dot` (rows sorted
      by the data) is refused, and a model that dispatches tokens by the data into slots pairs different tokens.

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
  stats, outlier_threshold = check_options(stats, outlier_threshold, "calibrate")
  if not callable(apply_fn):
    raise ValueError(f"calibrate: apply_fn must be a callable apply_fn(params, batch), got {apply_fn!r}")
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

  if reference is not None:
    reference = tuple(reference) if isinstance(reference, Iterable) and not isinstance(reference, (str, bytes)) else ()
    if len(reference) != len(batches):
      raise ValueError(f"calibrate: reference must hold one batch per batch ({len(batches)}), got "
                       f"{len(reference)}")
  return run(plan(guarded, params, batches[0], stats=stats, where=where, outlier_threshold=outlier_threshold,
                  apply_fn=apply_fn), params, batches, reference)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The traced half of `calibrate` for one function and one structure (shapes, dtypes) of params and batches:
  the weight-use analysis and the jitted per-batch step. It calibrates any params and batches of that structure
  (`run`); `streamed` keeps one per block and reuses it across the layers of a scan."""
  apply_fn: Callable            # as the user gave it (recorded in the Calibration)
  found: Analysis
  chosen: dict                  # key path -> leaf (for its shape): the weights calibrated
  step: Callable                # jitted (params, batch, reference batch or None) -> {emit key: Stats}
  traced: dict                  # "ctx": the trace's sites and notes, filled when `step` traces
  batch: tuple                  # `_structure` of a batch
  options: CalibrationOptions


def plan(fn: Callable, params, batch, *, stats: frozenset, where: sel.Where, outlier_threshold: float,
         apply_fn: Callable | None = None) -> Plan:
  """Analyze `fn(params, batch)` and build its jitted calibration step (nothing runs until `run`)."""
  found = analyze(fn, params, batch, where=where)
  chosen = {p: leaf for p, leaf in found.candidates.items() if p in found.selected}
  for p in chosen:
    found.uses[p].check()
  tagged = frozenset(chosen)
  traced: dict[str, Ctx] = {}

  def step(p, b, ref):
    _, emitted, ctx = capture.collect(fn, p, b, tagged=tagged, stats=stats, outlier_threshold=outlier_threshold,
                                      reference=ref)
    traced["ctx"] = ctx
    return emitted

  options = CalibrationOptions(stats=stats, where=where, outlier_threshold=float(outlier_threshold))
  return Plan(apply_fn or fn, found, chosen, jax.jit(step), traced, _structure(batch), options)


_merge = jax.jit(capture.merge)


def run(plan: Plan, params, batches: tuple, reference: tuple | None = None) -> Calibration:
  """Calibrate `params` on `batches` (and their `reference` batches) with a `Plan` of their structure."""
  total = None
  for i, batch in enumerate(tqdm(batches, desc="calibrate", leave=False, disable=len(batches) < 8)):
    _check_batch(i, batch, plan.batch)
    if reference is not None:
      _check_batch(i, reference[i], plan.batch, "reference batch")
    emitted = plan.step(params, batch, None if reference is None else reference[i])
    counts = jax.device_get({k: s.nonfinite for k, s in emitted.items()})
    bad = {k[0]: np.asarray(v) for k, v in counts.items() if np.any(np.asarray(v) > 0)}
    if bad:
      first = next((s.where for s in plan.traced["ctx"].sites if s.where in bad), next(iter(bad)))
      n = bad[first]
      layers = f" (per-layer counts {n.tolist()})" if n.ndim else ""
      raise ValueError(f"{first}: the activations feeding this weight contain {int(n.sum())} NaN/inf value(s) in "
                       f"batch {i}{layers}; expected finite activations (check the batch and the float "
                       f"parameters upstream)")
    total = emitted if total is None else _merge(total, emitted)
  ctx = plan.traced["ctx"]
  weights = _assemble(plan.chosen, total or {}, ctx, plan.found.uses)
  return Calibration(weights=weights, notes=tuple(ctx.notes), n_batches=len(batches), apply_fn=plan.apply_fn,
                     batches=batches, options=plan.options, uses=plan.found.uses, reference=reference)


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
