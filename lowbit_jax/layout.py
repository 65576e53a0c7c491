"""WeightLayout: how one weight leaf maps onto the (*B, K, N) problems every quantizer solves.

    K = prod(shape[a] for a in contract_axes)    the axes a traced function contracts with an activation
                                                 (consecutive; one or several, e.g. (H, Dh) of an out-proj)
    B = shape[a] for a in map_axes               one independent problem each: scanned layers (any position),
                                                 experts (dot batch axes, gathered or ragged groups)
    N = prod(the remaining axes)                 output features, in leaf order

`quantize` stores the leaf with its contraction block flattened to one packed axis (no transpose: codes keep the
leaf's axis order), so group size, padding and every format work unchanged. `to_kn` / `from_kn` move a float
leaf to (*B, K, N) and a QArray solved there (GPTQ, AWQ) back to the leaf's layout, with the same bytes.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from lowbit_jax import qviews
from lowbit_jax.qarray import QArray, quantize
from lowbit_jax.spec import QuantSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightLayout:
  shape: tuple[int, ...]
  contract_axes: tuple[int, ...]
  map_axes: tuple[int, ...] = ()

  def __post_init__(self):
    nd, c = len(self.shape), self.contract_axes
    if not c or any(not 0 <= a < nd for a in c + self.map_axes):
      raise ValueError(f"WeightLayout: contract axes {c} / map axes {self.map_axes} do not fit shape {self.shape}")
    if tuple(c) != tuple(sorted(set(c))):
      raise ValueError(f"WeightLayout: contract axes {c} must be ascending and distinct")
    if set(c) & set(self.map_axes) or len(set(self.map_axes)) != len(self.map_axes):
      raise ValueError(f"WeightLayout: map axes {self.map_axes} overlap the contraction axes {c}")

  @property
  def out_axes(self) -> tuple[int, ...]:
    return tuple(a for a in range(len(self.shape)) if a not in self.contract_axes and a not in self.map_axes)

  @property
  def k(self) -> int:
    return math.prod(self.shape[a] for a in self.contract_axes)

  @property
  def k_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.contract_axes)

  @property
  def n(self) -> int:
    return math.prod(self.shape[a] for a in self.out_axes)

  @property
  def b_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.map_axes)

  @property
  def stored_order(self) -> tuple[int, ...]:
    """Leaf axes in stored order: axes interleaved with the contraction block (maxtext's layer axis inside
    (heads, layers, head_dim, embed)) are moved in front of it; the identity for a consecutive block."""
    c0, c1 = self.contract_axes[0], self.contract_axes[-1]
    inner = tuple(a for a in range(c0, c1 + 1) if a not in self.contract_axes)
    return tuple(range(c0)) + inner + self.contract_axes + tuple(range(c1 + 1, len(self.shape)))

  @property
  def merged_shape(self) -> tuple[int, ...]:
    """The stored arrays' logical shape: the leaf in `stored_order` with the contraction block flattened."""
    s = tuple(self.shape[a] for a in self.stored_order)
    i = self.stored_order.index(self.contract_axes[0])
    return s[:i] + (self.k,) + s[i + len(self.contract_axes):]

  def spec_for(self, spec: QuantSpec) -> QuantSpec:
    """`spec` with its axis set to the flattened contraction block (negative, so stacks can be sliced)."""
    axis = self.stored_order.index(self.contract_axes[0]) - len(self.merged_shape)
    return dataclasses.replace(spec, granularity=dataclasses.replace(spec.granularity, axis=axis))

  def quantize(self, x, spec: QuantSpec, *, path: str | None = None) -> QArray:
    """Round-to-nearest along the contraction block."""
    order = self.stored_order
    xs = jnp.transpose(x, order) if order != tuple(range(len(order))) else x
    q = quantize(jnp.reshape(xs, self.merged_shape), self.spec_for(spec), path=path)
    q = qviews.with_k_shape(q, self.k_shape)
    return q if order == tuple(range(len(order))) else qviews.transpose(q, tuple(order.index(a) for a in
                                                                                     range(len(order))))

  def to_kn(self, x):
    """The float leaf as (*B, K, N)."""
    perm = self.map_axes + self.contract_axes + self.out_axes
    return jnp.transpose(x, perm).reshape(self.b_shape + (self.k, self.n))     # (*B, K, N)

  def kn_to_leaf(self, x):
    """A float (*B, K, N) array back in this leaf's layout (the inverse of `to_kn`)."""
    perm = self.map_axes + self.contract_axes + self.out_axes
    x = jnp.reshape(x, tuple(self.shape[a] for a in perm))
    return jnp.transpose(x, tuple(perm.index(a) for a in range(len(self.shape))))

  def from_kn(self, q: QArray) -> QArray:
    """A QArray of logical shape (*B, K, N) quantized along -2, in this leaf's layout (same bytes)."""
    if tuple(q.shape) != self.b_shape + (self.k, self.n) or q.k_axes != (len(self.b_shape),):
      raise ValueError(f"from_kn: expected a QArray of shape {self.b_shape + (self.k, self.n)} quantized along "
                       f"-2, got {q.shape} along {q.k_axes}")
    out_shape = tuple(self.shape[a] for a in self.out_axes)
    q = qviews.reshape(q, self.b_shape + (self.k,) + out_shape)
    q = qviews.with_k_shape(q, self.k_shape)                                   # (*B, *K, *N)
    order = self.map_axes + self.contract_axes + self.out_axes                  # current axes, in leaf terms
    perm = tuple(order.index(a) for a in range(len(self.shape)))
    return qviews.transpose(q, perm) if perm != tuple(range(len(perm))) else q
