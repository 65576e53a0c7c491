"""WeightUse: how a traced function uses one weight leaf (contraction, stack and expert axes, its input), built
from the sites the passes record. Typed and frozen, keyed by jax key paths; strings only in messages."""
from __future__ import annotations

import dataclasses

import numpy as np

from lowbit_jax import select as sel
from lowbit_jax.layout import WeightLayout
from lowbit_jax.passes.origin import DotSite, SiteKind

_CONTRACTING = (SiteKind.DOT, SiteKind.RAGGED_DOT, SiteKind.CONV)


@dataclasses.dataclass(frozen=True)
class WeightUse:
  """How a traced function uses one weight leaf, from all its sites (they must agree).

  `contract_axes`: leaf axes contracted with an activation (ascending; () if the leaf is only looked up);
  `stack_axes`: leaf axes sliced by scans or indexed statically (one layer each); `batch_axes`: dot batch /
  expert / ragged-group / gathered axes; `input_ids`: the activations feeding its contracting sites (equal ids
  across weights: one shared input, e.g. q/k/v); `kinds`: how it is consumed.
  """
  path: tuple
  shape: tuple[int, ...]
  sites: tuple[DotSite, ...] = dataclasses.field(repr=False)
  contract_axes: tuple[int, ...]
  stack_axes: tuple[int, ...]
  batch_axes: tuple[int, ...]
  input_ids: tuple[int, ...]
  kinds: frozenset
  conflict: str | None = None    # two sites contract different axes: why no layout exists

  def check(self) -> None:
    """Raise the incompatible-use error, if any (naming the path and both uses)."""
    if self.conflict:
      raise ValueError(self.conflict)

  @property
  def where(self) -> str:
    return sel.path_repr(self.path)

  @property
  def contracted(self) -> bool:
    """Contracted against an activation somewhere (a dot, ragged dot or conv): a "linear" weight."""
    return bool(self.contract_axes)

  @property
  def lookup_only(self) -> bool:
    return not self.contract_axes and SiteKind.LOOKUP in self.kinds

  @property
  def embedding(self) -> bool:
    """Rows are looked up as activations (an embedding table, tied to a head or not); gathered experts, whose
    gathered rows are then contracted, are not embeddings."""
    return SiteKind.LOOKUP in self.kinds and not any(
        s.gathered for s in self.sites if s.kind is not SiteKind.LOOKUP and not s.against_param)

  def layout(self, map_axes: tuple[int, ...] | None = None) -> WeightLayout:
    """The (*B, K, N) layout; `map_axes` default: stack then batch axes (the statistics' leading axes)."""
    self.check()
    if not self.contract_axes:   # a lookup table: rows are quantized along their last axis, like llama.cpp
      return WeightLayout(shape=self.shape, contract_axes=(len(self.shape) - 1,))
    if map_axes is None:
      map_axes = tuple(dict.fromkeys(self.stack_axes + self.batch_axes))
    return WeightLayout(shape=self.shape, contract_axes=self.contract_axes, map_axes=tuple(map_axes))


def weight_uses(sites, leaves: dict) -> dict:
  """{key path: WeightUse} from the recorded sites of the leaves in `leaves` ({key path: leaf}).

  A weight contracted over different axes at two sites gets a `conflict` (naming the path and both uses): it is
  raised when the weight is selected for calibration or quantization, never for a weight that is left alone.
  """
  by_path: dict = {}
  for s in sites:
    by_path.setdefault(s.path, []).append(s)
  out = {}
  for path, ss in by_path.items():
    if path not in leaves:
      continue
    using = [s for s in ss if s.kind in _CONTRACTING and s.contract_axes and not s.against_param]
    contract = list(dict.fromkeys(s.contract_axes for s in using))
    conflict = None
    if len(contract) > 1:
      a, b = [next(s for s in using if s.contract_axes == c) for c in contract[:2]]
      conflict = (f"{sel.path_repr(path)}: used in two incompatible ways: contracted over leaf axes "
                  f"{a.contract_axes} at {a} and over {b.contract_axes} at {b}; expected one contraction layout "
                  f"per weight (exclude it with `where`, or split the parameter)")
    stack = tuple(dict.fromkeys(a for s in ss for a in s.stacked_axes + tuple(i for i, _ in s.indexed)))
    batch = tuple(dict.fromkeys(a for s in using for a in s.batch_axes))
    out[path] = WeightUse(path=path, shape=tuple(np.shape(leaves[path])), sites=tuple(ss),
                          contract_axes=contract[0] if contract else (), stack_axes=stack,
                          batch_axes=tuple(a for a in batch if a not in stack),
                          input_ids=tuple(dict.fromkeys(s.input_id for s in using if s.input_id is not None)),
                          kinds=frozenset(s.kind for s in ss), conflict=conflict)
  return out
