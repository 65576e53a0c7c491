"""memory_report: what a (quantized) parameter tree really costs in bytes.

Works on concrete arrays and on abstract shapes alike (`jax.ShapeDtypeStruct`, e.g. the output of
`jax.eval_shape(lambda p: lowbit_jax.rtn(p, None, spec), abstract_params)`), so a 70B-parameter model is reported
without allocating it. Bytes are what is stored: QArray codes with their padding, scales and zero points; a Sparse24's kept values
and its 2-bit position metadata (`lowbit_jax.sparse`).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from lowbit_jax import select as sel
from lowbit_jax.qarray import QArray

GB = 1e9   # decimal gigabytes, as model sizes are usually quoted; GiB are shown beside them


def human_bytes(n: float) -> str:
  """Decimal units, as model sizes are quoted: 512 B, 8.39 MB, 3.67 GB."""
  for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if abs(n) >= size:
      return f"{n / size:.3g} {unit}"
  return f"{int(n)} B"


def human_count(n: float) -> str:
  """Parameter counts as they are quoted: 512, 260K, 135M, 1.1B."""
  for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= size:
      return f"{n / size:.3g}{unit}"
  return f"{int(n)}"


@dataclasses.dataclass(frozen=True)
class LeafMemory:
  path: str
  shape: tuple[int, ...]
  kind: str          # "float32", "bfloat16", ... or e.g. "INT4 PerGroup(size=128, axis=-2)"
  params: int
  nbytes: int

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.nbytes / self.params if self.params else 0.0


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  leaves: tuple[LeafMemory, ...]

  @property
  def total_bytes(self) -> int:
    return sum(l.nbytes for l in self.leaves)

  @property
  def total_params(self) -> int:
    return sum(l.params for l in self.leaves)

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.total_bytes / self.total_params

  @property
  def gb(self) -> float:
    return self.total_bytes / GB

  @property
  def gb_per_billion_params(self) -> float:
    return self.total_bytes / GB / (self.total_params / 1e9)

  @property
  def compression_vs_bf16(self) -> float:
    return 2.0 * self.total_params / self.total_bytes

  def table(self, *, max_rows: int = 40) -> str:
    """A markdown table: one row per leaf (the first `max_rows`), then the total."""
    rows = ["| leaf | shape | stored as | params | bytes | bits/weight |", "|---|---|---|---:|---:|---:|"]
    for l in self.leaves[:max_rows]:
      rows.append(f"| {l.path} | {l.shape} | {l.kind} | {l.params:,} | {l.nbytes:,} | {l.bits_per_weight:.3f} |")
    if len(self.leaves) > max_rows:
      rows.append(f"| ... {len(self.leaves) - max_rows} more leaves | | | | | |")
    rows.append(f"| **total** | | | {self.total_params:,} | {self.total_bytes:,} | {self.bits_per_weight:.3f} |")
    return "\n".join(rows)

  def summary(self) -> str:
    """One line in units that fit the model: "135M params, 91.6 MB (87.4 MiB), 5.425 bits/weight, 0.678 GB per
    billion params, 2.95x smaller than bf16"."""
    return (f"{human_count(self.total_params)} params, {human_bytes(self.total_bytes)} "
            f"({self.total_bytes / 2**20:.3g} MiB), {self.bits_per_weight:.3f} bits/weight, "
            f"{self.gb_per_billion_params:.3f} GB per billion params, {self.compression_vs_bf16:.2f}x smaller than bf16")

  def __str__(self):
    return self.table() + "\n" + self.summary()


def _kind(q: QArray) -> str:
  s = q.spec
  extra = "" if s.symmetric else " asym"
  extra += " +DQ" if s.double_quant else ""
  return f"{s.format.name}{s.bits if s.format.name == 'INT' else ''} {s.granularity}{extra} ({s.scale_dtype})"


def memory_report(tree) -> MemoryReport:
  """Per-leaf and total bytes of a pytree of arrays, abstract shapes and QArrays.

  Example (concrete leaves; `.table()` is one row per leaf, `.summary()` one line)::

    >>> import jax, jax.numpy as jnp
    >>> import lowbit_jax as lb
    >>> params = {"dense": {"kernel": jnp.ones((256, 64))}, "norm": {"scale": jnp.ones(64)}}
    >>> report = lb.memory_report(lb.rtn(params, None, lb.int_spec(4, group_size=128)))
    >>> report.total_bytes, round(report.bits_per_weight, 3)
    (8960, 4.358)
    >>> print(report.table())
    | leaf | shape | stored as | params | bytes | bits/weight |
    |---|---|---|---:|---:|---:|
    | dense/kernel | (256, 64) | INT4 PerGroup(size=128, axis=-2) (float32) | 16,384 | 8,704 | 4.250 |
    | norm/scale | (64,) | float32 | 64 | 256 | 32.000 |
    | **total** | | | 16,448 | 8,960 | 4.358 |

  Abstract shapes (`jax.eval_shape`) cost nothing: a 4096 x 4096 weight in NF4, never allocated::

    >>> big = {"w": {"kernel": jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)}}
    >>> print(lb.memory_report(jax.eval_shape(lambda p: lb.rtn(p, None, lb.nf4_spec()), big)).summary())
    16.8M params, 8.66 MB (8.25 MiB), 4.127 bits/weight, 0.516 GB per billion params, 3.88x smaller than bf16
  """
  from lowbit_jax.sparse import Sparse24
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, (QArray, Sparse24)))[0]
  leaves = []
  for path, leaf in flat:
    if isinstance(leaf, Sparse24):
      v = leaf.values
      kind = "2:4 sparse " + (_kind(v) if isinstance(v, QArray) else np.dtype(v.dtype).name)
      leaves.append(LeafMemory(sel.path_str(path), leaf.shape, kind, leaf.size, leaf.nbytes))
    elif isinstance(leaf, QArray):
      leaves.append(LeafMemory(sel.path_str(path), leaf.shape, _kind(leaf), leaf.size, leaf.nbytes))
    elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      n = math.prod(leaf.shape)
      leaves.append(LeafMemory(sel.path_str(path), tuple(leaf.shape), np.dtype(leaf.dtype).name, n,
                               n * np.dtype(leaf.dtype).itemsize))
    else:
      raise ValueError(f"memory_report: {sel.path_repr(path)} is a {type(leaf).__name__}; expected an array, "
                       f"a jax.ShapeDtypeStruct or a QArray")
  if not leaves:
    raise ValueError("memory_report: the tree has no array leaves")
  return MemoryReport(tuple(leaves))
