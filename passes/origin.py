"""Weight-origin analysis: which parameter leaf, seen through which views, feeds each `dot_general`.

An `Origin` travels with a value derived from a parameter leaf by *views* only (ops that move, drop or relabel
entries but never combine them: `convert_element_type` between floats, `transpose`, `reshape`, `squeeze`,
size-1 `broadcast_in_dim`, `slice`, `dynamic_slice`, identity ops such as `copy` / `pvary` / `sharding_constraint`,
and the per-iteration slicing of a stacked leaf by `scan`). Any other op ends the origin: its result is a plain
array. The per-primitive rules live in the view table (`passes/views.py`); this module holds the shape logic.

Invariants of an `Origin` for a value of shape `s`:
  * `len(axes) == len(s)`; `axes[i]` is the tuple of leaf axes that axis `i` enumerates in row-major order
    (one axis for a plain view, several after a reshape merged them, `()` for an inserted size-1 axis), or None
    when the axis cannot be expressed in leaf coordinates (a reshape split an axis at a non-leaf boundary).
  * every leaf axis appears at most once across `axes`, in `stacked` (consumed by a scan, outermost first) or in
    `indexed` (selected by a static index, e.g. `w[3]`).
  * `cut` holds the leaf axes only partly present (a slice kept some of their entries).
"""
from __future__ import annotations

import dataclasses
import enum
import math

from lowbit_jax.select import path_repr, path_str

Axes = tuple  # tuple[tuple[int, ...] | None, ...]



@dataclasses.dataclass(frozen=True)
class Origin:
  """Where a value comes from: the leaf at `path` (shape `leaf_shape`) seen through `views`."""
  path: tuple
  leaf_shape: tuple[int, ...]
  axes: Axes
  views: tuple[str, ...] = ()
  cut: frozenset = frozenset()
  stacked: tuple[tuple[int, int], ...] = ()     # (scan level id, leaf axis)
  indexed: tuple[tuple[int, int], ...] = ()     # (leaf axis, static index)
  gathered: tuple[int, ...] = ()                # leaf axis taken by a gather (its index axes are untracked)

  @staticmethod
  def of_leaf(path: tuple, shape: tuple[int, ...]) -> "Origin":
    return Origin(path=path, leaf_shape=tuple(shape), axes=tuple((i,) for i in range(len(shape))))

  @property
  def where(self) -> str:
    """`params['layers']['Dense_0']['kernel']`: how errors and reports name the leaf."""
    return path_repr(self.path)

  @property
  def name(self) -> str:
    """`layers/Dense_0/kernel`: what `where=` regexes are matched against."""
    return path_str(self.path)

  def _with(self, axes, view: str, **kw) -> "Origin":
    return dataclasses.replace(self, axes=tuple(axes), views=self.views + (view,), **kw)


class Side(enum.Enum):
  LHS = 0
  RHS = 1


class SiteKind(enum.Enum):
  """How a weight is consumed."""
  DOT = "dot_general"            # dot_general / einsum / matmul
  RAGGED_DOT = "ragged_dot"      # lax.ragged_dot (grouped experts): the group axis is a batch axis
  CONV = "conv"                  # conv_general_dilated: contracted over (spatial, in)
  LOOKUP = "gather"              # a lookup (embedding rows, gathered experts): not a contraction


@dataclasses.dataclass(frozen=True)
class DotSite:
  """One weight-consuming `dot_general`, in the weight leaf's coordinates.

  `contract_axes`: leaf axes summed over, in the row-major order statistics flatten them (ascending);
  `batch_axes`: leaf axes that are dot batch dimensions (statistics are not collected for those sites);
  `stacked_axes`: leaf axes sliced by enclosing scans (statistics carry one entry per slice, outermost first);
  `indexed`: (leaf axis, index) pairs selected statically before the dot; `nesting`: the enclosing
  higher-order primitives, outermost first, e.g. ("scan(length=4)", "remat2"); `input_id`: the activation that
  feeds the dot (equal ids: one activation, seen through value-preserving views; None: the other operand is a
  parameter or a literal); `kind`: dot, ragged dot, conv or lookup.
  """
  path: tuple
  side: Side
  contract_axes: tuple[int, ...]
  batch_axes: tuple[int, ...]
  stacked_axes: tuple[int, ...]
  indexed: tuple[tuple[int, int], ...]
  views: tuple[str, ...]
  nesting: tuple[str, ...]
  leaf_shape: tuple[int, ...]
  input_id: int | None = None
  kind: SiteKind = SiteKind.DOT
  against_param: bool = False    # the other operand is (a view of) a parameter leaf, not an activation
  gathered: tuple[int, ...] = ()  # leaf axes a gather took before this site (gathered experts)

  @property
  def where(self) -> str:
    return path_repr(self.path)

  def __str__(self):
    inside = " inside " + " > ".join(self.nesting) if self.nesting else ""
    return (f"{self.where} ({self.side.name} of {self.kind.value}, contracting leaf axes {self.contract_axes}"
            f"{', via ' + ', '.join(self.views) if self.views else ''}){inside}")


@dataclasses.dataclass(frozen=True)
class Note:
  """A place where a weight left the fast path: it was dequantized / its origin ended, and why."""
  where: str
  primitive: str
  reason: str
  nesting: tuple[str, ...] = ()

  def __str__(self):
    inside = " inside " + " > ".join(self.nesting) if self.nesting else ""
    return f"{self.where}: {self.primitive}: {self.reason}{inside}"


def leaf_axes(origin: Origin, dims) -> tuple[int, ...] | None:
  """The leaf axes that the value axes `dims` enumerate (concatenated), or None if one is untracked."""
  out = []
  for d in dims:
    entry = origin.axes[d]
    if entry is None:
      return None
    out.extend(entry)
  return tuple(out)


def enter_scan(origin: Origin, level: int, length: int) -> Origin | None:
  """The origin of one iteration's slice (leading axis removed) of a value scanned over, or None."""
  if not origin.axes or origin.axes[0] is None or len(origin.axes[0]) != 1:
    return None
  (a,) = origin.axes[0]
  return dataclasses.replace(origin, axes=origin.axes[1:], stacked=origin.stacked + ((level, a),),
                             views=origin.views + (f"scan slice of axis {a}",))


def drop_unit_axes(origin: Origin, dims: set[int], view: str) -> Origin:
  axes = [e for i, e in enumerate(origin.axes) if i not in dims]
  return origin._with(axes, view)


def follow_reshape(origin: Origin, in_shape, out_shape) -> Origin | None:
  """Follow a reshape: blocks of consecutive axes with equal products map onto each other (merges concatenate
  leaf axes; a split recovers leaf axes only when it splits a merged axis at its leaf boundaries)."""
  src = [(i, n) for i, n in enumerate(in_shape) if n != 1]
  dst = [(j, n) for j, n in enumerate(out_shape) if n != 1]
  axes: list = [()] * len(out_shape)
  si = di = 0
  while si < len(src) or di < len(dst):
    if si >= len(src) or di >= len(dst):
      return None
    s0, d0 = si, di
    ps, pd = src[si][1], dst[di][1]
    si, di = si + 1, di + 1
    while ps != pd:
      if ps < pd:
        if si >= len(src):
          return None
        ps *= src[si][1]
        si += 1
      else:
        if di >= len(dst):
          return None
        pd *= dst[di][1]
        di += 1
    s_block, d_block = src[s0:si], dst[d0:di]
    entries = [origin.axes[i] for i, _ in s_block]
    if len(d_block) == 1:
      axes[d_block[0][0]] = None if any(e is None for e in entries) else tuple(a for e in entries for a in e)
    elif len(s_block) == 1 and entries[0] is not None and len(entries[0]) == len(d_block) and all(
        origin.leaf_shape[a] == n for a, (_, n) in zip(entries[0], d_block)):
      for a, (j, _) in zip(entries[0], d_block):
        axes[j] = (a,)
    else:
      for j, _ in d_block:
        axes[j] = None
  # Leaf axes that were reduced to length 1 by a slice and are now gone count as indexed (already recorded).
  return origin._with(axes, "reshape")


def contraction_layout(origin: Origin, dims) -> tuple[tuple[int, ...], list[int]] | None:
  """For weight axes `dims` contracted by a dot: (leaf axes ascending, the permutation that reorders the
  per-leaf-axis split of the flattened contraction into ascending leaf order), or None if untracked."""
  axes = leaf_axes(origin, dims)
  if axes is None or not axes:
    return None
  order = sorted(range(len(axes)), key=lambda i: axes[i])
  return tuple(axes[i] for i in order), order


def flat_size(origin: Origin, axes: tuple[int, ...]) -> int:
  return math.prod(origin.leaf_shape[a] for a in axes)

