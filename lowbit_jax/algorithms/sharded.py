"""Column-parallel solves: a weight sharded over a device mesh on its output features, solved one shard per device.

GPTQ's (K, N) problem, and SparseGPT's under an N:M pattern, is independent across the N output columns given the
(K, K) Hessian: act-order, the dead inputs, the dampening retries and the inverse-Hessian factor depend on H alone,
and the quantizer parameters (per channel or per group along K) and N:M masks are per column. So when a weight leaf
is a `jax.Array` whose `NamedSharding` splits the first output axis of its layout over mesh axes (tensor-parallel
q/k/v, gate/up, a head: `(K, N)` kernels sharded as `P(None, "model")`, stacks as `P(None, None, "model")`) and
nothing else, `solve` runs the stack solver under `jax.shard_map`: W's N split over those mesh axes, H replicated,
every device solving its N / devices columns (replicas along the mesh's other axes solve the same columns). Outputs
are combined over the devices (losses summed, dampening tries maxed, "positive definite" and-ed) and `place` puts
the result in the leaf's sharding: codes, scales and zero points split on the same output axis. The result equals
one device's up to float rounding (the lazy block updates are matmuls over shards of another width).

Anything else returns None from `columns`, and the caller runs its one-program path, whose result is the same (jit
partitions or gathers what it needs): a sharded contraction block (row-parallel o_proj / down_proj), several
sharded axes, an inner output axis sharded (its columns are not contiguous in N), a non-consecutive contraction
block, per-tensor scales (one scale over all columns), unstructured SparseGPT (its block-wide threshold ranks every
column together).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lowbit_jax.algorithms.common import Target
from lowbit_jax.qarray import QArray
from lowbit_jax.spec import PerTensor, QuantSpec

COLS, SUM, MAX, ALL = "cols", "sum", "max", "all"   # what each output of a solver is (see `solve`)


@dataclasses.dataclass(frozen=True)
class Columns:
  """How a leaf's output features are split: over mesh axes `axes` (of size > 1) of `mesh`, along leaf axis
  `leaf_axis` (the layout's first output axis)."""
  mesh: Mesh
  axes: tuple[str, ...]
  leaf_axis: int

  @property
  def entry(self):
    """The PartitionSpec entry of the split axis."""
    return self.axes[0] if len(self.axes) == 1 else self.axes

  @property
  def count(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.axes)


def _names(entry, mesh: Mesh) -> tuple[str, ...] | None:
  """The mesh axes of size > 1 in one PartitionSpec entry; None for an entry this module does not handle."""
  if entry is None:
    return ()
  names = (entry,) if isinstance(entry, str) else entry
  if not isinstance(names, tuple) or not all(isinstance(n, str) and n in mesh.shape for n in names):
    return None
  return tuple(n for n in names if mesh.shape[n] > 1)


def columns(t: Target, spec: QuantSpec | None = None) -> Columns | None:
  """The column split of `t`'s leaf when it is one a column-parallel solve handles exactly (see the module
  docstring), else None. `spec`: the quantization spec, if any (per-tensor scales are not split)."""
  leaf = t.leaf
  sharding = getattr(leaf, "sharding", None)
  if not isinstance(leaf, jax.Array) or not isinstance(sharding, NamedSharding) or not isinstance(sharding.mesh,
                                                                                                  Mesh):
    return None
  if spec is not None and isinstance(spec.granularity, PerTensor):
    return None
  lay, mesh = t.layout, sharding.mesh
  c = lay.contract_axes
  if c != tuple(range(c[0], c[-1] + 1)) or not lay.out_axes:
    return None
  entries = tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))
  split = {}
  for axis, entry in enumerate(entries):
    names = _names(entry, mesh)
    if names is None:
      return None
    if names:
      split[axis] = names
  if len(split) != 1:
    return None
  ((axis, names),) = split.items()
  cols = Columns(mesh, names, axis)
  if axis != lay.out_axes[0] or leaf.shape[axis] % cols.count:
    return None
  return cols


def _combine(x, how: str, axes: tuple[str, ...]):
  if how == COLS:
    return x
  if how == SUM:
    return lax.psum(x, axes)
  if how == MAX:
    return lax.pmax(x, axes)
  if how == ALL:
    return lax.pmin(x.astype(jnp.int32), axes) > 0
  raise ValueError(f"sharded.solve: unknown reduction {how!r}; expected one of {COLS, SUM, MAX, ALL}")


@functools.partial(jax.jit, static_argnames=("fn", "cols", "reduce", "options"))
def solve(W, H, fracs, *, fn, cols: Columns, reduce: tuple[str, ...], options: tuple):
  """`fn(W, H, fracs, **dict(options))`, a stack solver of W (L, K, N), H (L, K, K) and dampings `fracs`, with
  W's N split over `cols`'s mesh axes and H, `fracs` replicated: every device solves its columns. `reduce` says
  what each output of `fn` is: COLS (every leaf's last axis is N: stays split), or SUM / MAX / ALL (per-layer
  values combined over the devices)."""
  kw = dict(options)
  n_spec = PartitionSpec(None, None, cols.entry)

  def local(w, h, f):
    out = fn(w, h, f, **kw)
    return tuple(_combine(o, how, cols.axes) for o, how in zip(out, reduce, strict=True))

  out_specs = tuple(n_spec if how == COLS else PartitionSpec() for how in reduce)
  # check_vma=False: the solvers' loops start their carries from constants (replicated) that become per-device;
  # every output is either split on N or combined over the devices above, so it is the same on every replica.
  return jax.shard_map(local, mesh=cols.mesh, in_specs=(n_spec, PartitionSpec(), PartitionSpec()),
                       out_specs=out_specs, check_vma=False)(W, H, fracs)


def place(result, t: Target, cols: Columns | None):
  """`result` in `t`'s leaf layout (a float leaf, or a QArray whose contraction block is flattened into one stored
  axis) with every leaf split over `cols` along the output axis; leaves whose axis does not divide are
  replicated. Returned as it is without `cols`, or for a QArray with a pending axis permutation."""
  if cols is None:
    return result
  axis = cols.leaf_axis
  if isinstance(result, QArray):
    if result.perm is not None:
      return result
    c = t.layout.contract_axes
    axis -= len(c) - 1 if axis > c[-1] else 0

  def one(a):
    s = [None] * a.ndim
    if a.shape[axis] % cols.count == 0:
      s[axis] = cols.entry
    return jax.device_put(a, NamedSharding(cols.mesh, PartitionSpec(*s)))

  return jax.tree.map(one, result)
