"""Capture pass: statistics of the activations that feed every weight-consuming `dot_general`.

For a weight whose dot contracts leaf axes of total size K, the other operand is flattened to rows X (T, K) in the
leaf's coordinates (contraction axes ascending, row-major) and these sums are kept, all in float32 / int32:

  xtx       (K, K)  XᵀX                      -> `hessian` = 2 XᵀX / T (GPTQ's H = 2/n Σ x xᵀ, n counted in rows)
  count     ()      T, the rows seen
  absmax    (K,)    max_t |X[t, k]|          (AWQ / SmoothQuant activation scales)
  abs_sum   (K,)    Σ_t |X[t, k]|            -> `abs_mean` (AWQ's mean |x|)
  outliers  (K,)    #{t : |X[t, k]| > threshold}  (LLM.int8 outlier columns; threshold 6.0 as in the paper)
  nonfinite ()      NaN/inf entries seen (checked by `calibrate`, which names the leaf)
  xtd       (K, K)  Xᵀ(X_ref − X), only against reference inputs: the function runs on a batch and on its reference
                    batch side by side (`collect(..., reference=...)`: `vmap` over the pair, whose collector
                    gathers both activations of a dot, so row t of X_ref is the same position as row t of X);
                    every other statistic is of X. Asymmetric calibration's cross term (GPTAQ).

Every statistic is a sum, a count or a max, so it streams over batches (`merge`), stacks per layer inside a
`scan` (a leading axis per enclosing scan over the leaf), and reduces across data-parallel shards (`psum`).
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, Collection

import jax
import jax.numpy as jnp
from jax import lax
from jax.tree_util import register_dataclass

from lowbit_jax.passes import trace
from lowbit_jax.passes.interpreter import Ctx
from lowbit_jax.passes.values import WeightHandler


class Stat(enum.Enum):
  HESSIAN = "hessian"      # XᵀX (the expensive one: K² per weight)
  ABSMAX = "absmax"
  ABS_MEAN = "abs_mean"
  OUTLIERS = "outliers"


ALL_STATS = frozenset(Stat)


@register_dataclass
@dataclasses.dataclass
class Stats:
  """Sums over the rows seen; fields not requested are None. Leading axes, if any, are per-layer (scan)."""
  count: Any
  nonfinite: Any
  xtx: Any = None
  absmax: Any = None
  abs_sum: Any = None
  outliers: Any = None
  xtd: Any = None       # Σ xᵀ(x_ref − x): against reference inputs (`calibrate(..., reference=...)`)

  @property
  def hessian(self):
    """GPTQ's Hessian proxy 2 XᵀX / T (leading per-layer axes kept)."""
    return 2.0 * self.xtx / self._denominator(2)

  @property
  def abs_mean(self):
    return self.abs_sum / self._denominator(1)

  @property
  def outlier_fraction(self):
    return self.outliers.astype(jnp.float32) / self._denominator(1)

  def _denominator(self, trailing: int):
    c = jnp.maximum(jnp.asarray(self.count, jnp.float32), 1.0)
    return c.reshape(c.shape + (1,) * trailing)


@dataclasses.dataclass(frozen=True)
class Collector:
  """Computes and combines `Stats` (the `values.Collector` protocol)."""
  stats_wanted: frozenset = ALL_STATS
  outlier_threshold: float = 6.0
  pair_axis: str | None = None     # set: running under `vmap` over (inputs, reference), see `collect`

  def stats(self, x) -> Stats:
    """x: (T, K) float32 rows."""
    x, ref = self._pair(x)
    ax = jnp.abs(x)
    want = self.stats_wanted
    return Stats(
        count=jnp.asarray(x.shape[0], jnp.int32),
        nonfinite=jnp.sum(~jnp.isfinite(x if ref is None else jnp.stack([x, ref])), dtype=jnp.int32),
        xtx=(jnp.einsum("tk,tl->kl", x, x, precision=lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32) if Stat.HESSIAN in want else None),
        absmax=jnp.max(ax, axis=0) if Stat.ABSMAX in want else None,
        abs_sum=jnp.sum(ax, axis=0) if Stat.ABS_MEAN in want else None,
        outliers=(jnp.sum(ax > self.outlier_threshold, axis=0, dtype=jnp.int32)
                  if Stat.OUTLIERS in want else None),
        xtd=None if ref is None else jnp.einsum("tk,tl->kl", x, ref - x, precision=lax.Precision.HIGHEST,
                                                 preferred_element_type=jnp.float32))

  def _pair(self, x):
    """(x, None), or under the pair `vmap` (the inputs' x, the reference's x) gathered across it."""
    if self.pair_axis is None:
      return x, None
    both = lax.all_gather(x, self.pair_axis)        # (2, T, K): the same op on the batch and on its reference
    return both[0], both[1]

  def segmented(self, x, segment, n: int) -> Stats:
    """Stats per segment: x (T, K) rows, `segment` (T,) ids in [0, n) (rows with other ids are dropped); a
    leading axis of length n (gathered experts, `ragged_dot` groups). Against a reference, rows are assigned by
    the inputs' segments (rows are tokens here: gathered experts; ragged rows are refused by the handler)."""
    if self.pair_axis is not None:
      segment = lax.all_gather(segment, self.pair_axis)[0]
    def one(e):
      mask = segment == e
      st = self.stats(jnp.where(mask[:, None], x, 0.0))
      return dataclasses.replace(st, count=jnp.sum(mask, dtype=jnp.int32))
    return jax.vmap(one)(jnp.arange(n))

  def merge(self, a: Stats, b: Stats) -> Stats:
    return _combine(a, b, jnp.add, jnp.maximum)

  def reduce_leading(self, a: Stats) -> Stats:
    return _apply(a, lambda v: jnp.sum(v, axis=0), lambda v: jnp.max(v, axis=0))

  def psum(self, a: Stats, axis_names) -> Stats:
    if not axis_names:
      return a
    return _apply(a, lambda v: lax.psum(v, axis_names), lambda v: lax.pmax(v, axis_names))


def _apply(a: Stats, add_fn, max_fn) -> Stats:
  f = lambda name, v: None if v is None else (max_fn(v) if name == "absmax" else add_fn(v))
  return Stats(**{fl.name: f(fl.name, getattr(a, fl.name)) for fl in dataclasses.fields(Stats)})


def _combine(a: Stats, b: Stats, add_fn, max_fn) -> Stats:
  def f(name):
    x, y = getattr(a, name), getattr(b, name)
    if x is None:
      return y
    if y is None:
      return x
    return max_fn(x, y) if name == "absmax" else add_fn(x, y)
  return Stats(**{fl.name: f(fl.name) for fl in dataclasses.fields(Stats)})


def merge(a: dict, b: dict) -> dict:
  """Stream two batches' {key: Stats} together."""
  c = Collector()
  out = dict(a)
  for k, v in b.items():
    out[k] = c.merge(out[k], v) if k in out else v
  return out


_PAIR = "lowbit_jax_reference_pair"


def collect(apply_fn: Callable, params, batch, *, tagged: Collection, stats: Collection[Stat] = ALL_STATS,
            outlier_threshold: float = 6.0, axis_name=None, reference=None) -> tuple[Any, dict, Ctx]:
  """Run `apply_fn(params, batch)` once, collecting `Stats` for the weights whose key paths are in `tagged`.
  Returns (outputs, {emit key: Stats}, ctx with the dot sites and notes). Jit-able (the key paths are static);
  inside `pmap` / `shard_map`, `axis_name` sums the statistics over data-parallel shards. With a `reference` batch
  (the structure of `batch`), the function runs on both under one `vmap` and `Stats.xtd` is filled; the outputs
  and every other statistic are those of `batch`."""
  def run(b, pair_axis=None):
    handler = WeightHandler(collector=Collector(frozenset(stats), float(outlier_threshold), pair_axis))
    out, ctx = trace.evaluate(apply_fn, params, (b,), {}, handler, tagged=frozenset(tagged))
    emitted = ctx.emitted
    if axis_name is not None:
      emitted = {k: handler.psum(v, axis_name) for k, v in emitted.items()}
    return out, emitted, ctx

  if reference is None:
    return run(batch)
  ctxs = []

  def one(b):
    out, emitted, ctx = run(b, _PAIR)
    ctxs.append(ctx)
    return out, emitted
  pair = jax.tree.map(lambda a, r: jnp.stack([a, r]), batch, reference)
  out, emitted = jax.vmap(one, axis_name=_PAIR)(pair)
  return jax.tree.map(lambda a: a[0], (out, emitted)) + (ctxs[0],)
