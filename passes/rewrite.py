"""Rewrite pass: run an unmodified apply function on parameters whose selected leaves are QArrays.

    qapply = lowbit_jax.quantized(apply_fn)
    logits = qapply(qparams, tokens)          # same signature as apply_fn; works under jit/grad/vmap/pmap
    print(qapply.report(qparams, tokens))     # per weight: what runs there, and the bytes really packed

`apply_fn(params, *args, **kwargs)` is traced with every QArray replaced by an abstract float of its logical shape;
the jaxpr is then evaluated with the QArrays flowing through as `QValue`s: views (`transpose`, `reshape`,
`convert_element_type`, `slice`, scan slicing of stacked layers, `take` of rows or experts, ...) are applied to codes
and scales alike (`lowbit_jax.qviews`), and every `dot_general` / `ragged_dot` that contracts a weight's
contraction block (one or several axes, any position, with batch / expert axes) calls
`lowbit_jax.kernels.qmatmul` (`passes/qdot.py`): a Pallas kernel where one is verified, else the reference, which
decodes one K tile at a time, so no float copy of the weight is formed. A lookup (`take` / `w[idx]`) gathers
codes, and only the gathered rows are decoded when they are used as activations. Any other consumer (a convolution, an
elementwise use, a dot over other axes) gets `q.dequantize()`: it warns once per weight (`DequantizedWarning`)
and the report counts it. Results equal `apply_fn(dequantized params)` up to float rounding.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax

from lowbit_jax import kernels
from lowbit_jax.memory import human_bytes
from lowbit_jax.passes import trace
from lowbit_jax.passes.values import Impl, SiteRun, WeightHandler, is_array
from lowbit_jax.qarray import QArray
from lowbit_jax.sparse import Sparse24
from lowbit_jax.select import path_repr


@dataclasses.dataclass(frozen=True)
class WeightRun:
  """One quantized weight in a run: the implementations at its sites, its stored bytes, and whether they stay
  packed (no site dequantizes it)."""
  path: tuple
  nbytes: int
  float_nbytes: int
  runs: tuple[SiteRun, ...]

  @property
  def where(self) -> str:
    return path_repr(self.path)

  @property
  def impls(self) -> frozenset:
    return frozenset(r.impl for r in self.runs)

  @property
  def packed(self) -> bool:
    return bool(self.runs) and Impl.DEQUANTIZED not in self.impls


@dataclasses.dataclass(frozen=True)
class RunReport:
  """What `quantized(apply_fn)` runs for each QArray leaf of `qparams` (from one abstract trace)."""
  weights: tuple[WeightRun, ...]

  @property
  def dequantized(self) -> tuple[WeightRun, ...]:
    return tuple(w for w in self.weights if Impl.DEQUANTIZED in w.impls)

  @property
  def unused(self) -> tuple[WeightRun, ...]:
    return tuple(w for w in self.weights if not w.runs)

  @property
  def packed_bytes(self) -> int:
    """Bytes of the weights that stay packed at run time (every site runs a kernel or the tiled reference)."""
    return sum(w.nbytes for w in self.weights if w.packed)

  def table(self) -> str:
    lines = ["| weight | runs as | stored | float |", "| --- | --- | --- | --- |"]
    for w in self.weights:
      how = ", ".join(sorted(i.value for i in w.impls)) or "unused"
      lines.append(f"| {w.where} | {how} | {human_bytes(w.nbytes)} | {human_bytes(w.float_nbytes)} |")
    return "\n".join(lines)

  def __str__(self):
    total = sum(w.nbytes for w in self.weights)
    return (f"{len(self.weights)} quantized weights, {len(self.dequantized)} dequantized at run time; "
            f"{human_bytes(self.packed_bytes)} of {human_bytes(total)} stay packed\n" + self.table())


class QuantizedFn:
  """`apply_fn` with QArray leaves executed through `kernels.qmatmul`. Callable like `apply_fn`.

  Attributes:
    last_notes: the `Note`s (where a weight was dequantized, and why) of the most recent trace.
    last_sites: the `DotSite`s of quantized weights of the most recent trace.
  """

  def __init__(self, apply_fn: Callable, backend: kernels.Backend):
    self.apply_fn = apply_fn
    self.backend = backend
    self.last_notes: list = []
    self.last_sites: list = []
    functools.update_wrapper(self, apply_fn)

  def __call__(self, params, *args, **kwargs):
    handler = WeightHandler(backend=self.backend)
    out, ctx = trace.evaluate(self.apply_fn, params, args, kwargs, handler, op="quantized")
    self.last_notes, self.last_sites = list(ctx.notes), list(ctx.sites)
    return out

  def report(self, qparams, *args, **kwargs) -> RunReport:
    """Trace `self(qparams, *args, **kwargs)` abstractly (nothing runs) and say, for every QArray leaf, which
    implementation runs at each of its sites and whether its bytes stay packed."""
    box = {}
    packed = lambda x: isinstance(x, (QArray, Sparse24))
    leaves, tree = jax.tree.flatten((qparams, args, kwargs), is_leaf=packed)
    dynamic = [packed(x) or is_array(x) for x in leaves]

    def run(*dyn):
      it = iter(dyn)
      p, a, kw = jax.tree.unflatten(tree, [next(it) if d else x for x, d in zip(leaves, dynamic)])
      out, ctx = trace.evaluate(self.apply_fn, p, a, kw, WeightHandler(backend=self.backend, warn=False),
                                op="quantized(...).report")
      box["ctx"] = ctx
      return out

    jax.eval_shape(run, *[x for x, d in zip(leaves, dynamic) if d])
    runs: dict[str, list] = {}
    for r in box["ctx"].runs:
      runs.setdefault(r.where, []).append(r)
    flat = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=packed)[0]
    weights = tuple(WeightRun(p, q.nbytes, q.size * q.dtype.itemsize, tuple(runs.get(path_repr(p), ())))
                    for p, q in flat if packed(q))
    return RunReport(weights)


def quantized(apply_fn: Callable, *, backend: kernels.Backend = kernels.Backend.AUTO) -> QuantizedFn:
  """Wrap `apply_fn(params, *args, **kwargs)` so that QArray leaves of `params` run as quantized matmuls.

  Example (the unmodified function on packed weights, equal to the function on the dequantized ones)::

    >>> import jax, jax.numpy as jnp
    >>> import lowbit_jax as lb
    >>> k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    >>> params = {"l1": {"kernel": jax.random.normal(k1, (64, 64)) / 8},
    ...           "l2": {"kernel": jax.random.normal(k2, (64, 64)) / 8}}
    >>> apply = lambda p, x: jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]
    >>> qparams = lb.rtn(params, None, lb.int_spec(4, group_size=32))
    >>> x = jax.random.normal(k3, (16, 64))
    >>> y = jax.jit(lb.quantized(apply))(qparams, x)
    >>> y.shape, y.dtype
    ((16, 64), dtype('float32'))
    >>> bool(jnp.allclose(y, apply(lb.dequantize(qparams), x), atol=1e-4))
    True
    >>> print(str(lb.quantized(apply).report(qparams, x)).splitlines()[0])
    2 quantized weights, 0 dequantized at run time; 5.12 kB of 5.12 kB stay packed
  """
  if not callable(apply_fn):
    raise ValueError(f"quantized: expected a callable apply_fn(params, *args), got {apply_fn!r}")
  if not isinstance(backend, kernels.Backend):
    raise ValueError(f"quantized: backend must be a lowbit_jax.kernels.Backend, got {backend!r}")
  return QuantizedFn(apply_fn, backend)
