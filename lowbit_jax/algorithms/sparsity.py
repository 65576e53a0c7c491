"""What to prune: `Sparsity` (unstructured, a fraction per layer or over all selected weights) or `NM` (N:M
semi-structured along the contraction axis), and the masks magnitude pruning keeps, on (K, N) arrays.

Conventions, as in Mishra et al., "Accelerating Sparse Deep Neural Networks" (NVIDIA, 2021) and SparseGPT (Frantar &
Alistarh, ICML 2023): `NM(n=2, m=4)` keeps the `n` largest of every `m` consecutive weights along the contraction
axis K (the input features, what NVIDIA's 2:4 sparse tensor cores require), for every output column; the reference
implementation's `prunen` is the number *pruned*, m - n. K must be a multiple of m: the transforms raise (naming the
key path) rather than pad, because padded groups would not be real N:M groups of the stored weight.

Unstructured masks prune exactly floor(fraction * count) entries: entries are ranked by their score (stable order
breaks ties by position), where IST-DASLab/sparsegpt thresholds with `<=` and may prune more on ties (deviation).
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Union

import jax.numpy as jnp

from lowbit_jax.checks import as_float, as_int, check_enum


class Scope(enum.Enum):
  """Over what an unstructured `Sparsity.fraction` is counted."""
  LAYER = "layer"    # every (K, N) problem (a weight, or one layer of a stack) loses `fraction` of its entries
  GLOBAL = "global"  # `fraction` of all selected entries, the smallest magnitudes anywhere (magnitude pruning only)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sparsity:
  """Unstructured sparsity: `fraction` in [0, 1) of the weights set to exactly zero."""
  fraction: float = 0.5
  scope: Scope = Scope.LAYER

  def __post_init__(self):
    object.__setattr__(self, "fraction", as_float(self.fraction, "Sparsity.fraction", low=0.0, high=1.0,
                                                  high_open=True, note=" (the fraction of weights set to zero)"))
    check_enum(self.scope, Scope, "Sparsity.scope")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NM:
  """N:M semi-structured sparsity: keep `n` of every `m` consecutive weights along the contraction axis."""
  n: int = 2
  m: int = 4

  def __post_init__(self):
    object.__setattr__(self, "m", as_int(self.m, "NM.m", low=1))
    object.__setattr__(self, "n", as_int(self.n, "NM.n (weights kept per group of m)", low=0))
    if self.n > self.m:
      raise ValueError(f"NM.n must be <= NM.m (keep n of every m weights), got n={self.n} > m={self.m}")


Pattern = Union[Sparsity, NM]


def check_pattern(pattern, op: str) -> None:
  if not isinstance(pattern, (Sparsity, NM)):
    raise ValueError(f"{op}: expected lowbit_jax.Sparsity(fraction=...) or lowbit_jax.NM(n=..., m=...) for the "
                     f"sparsity options, got {pattern!r}")


def check_k(pattern, k: int, where: str) -> None:
  """An N:M pattern needs K (the flattened contraction block) divisible by m; ValueError naming `where`."""
  if isinstance(pattern, NM) and k % pattern.m:
    raise ValueError(f"{where}: contraction length {k} is not divisible by m={pattern.m} of {pattern.n}:"
                     f"{pattern.m} sparsity; expected a multiple of {pattern.m} (N:M groups are not padded)")


def lowest(scores, n_prune):
  """Bool mask of the `n_prune` lowest entries of `scores` (any shape; ties by flat position). `n_prune` may be
  traced."""
  flat = scores.reshape(-1)
  rank = jnp.argsort(jnp.argsort(flat, stable=True), stable=True)
  return (rank < n_prune).reshape(scores.shape)


def nm_pruned(scores, n: int, m: int, axis: int):
  """Bool mask pruning the m - n lowest of every m consecutive entries of `scores` along `axis` (length % m == 0)."""
  s = jnp.moveaxis(scores, axis, -1)
  g = s.reshape(s.shape[:-1] + (s.shape[-1] // m, m))
  rank = jnp.argsort(jnp.argsort(g, axis=-1, stable=True), axis=-1, stable=True)
  return jnp.moveaxis((rank < m - n).reshape(s.shape), -1, axis)


def magnitude_pruned(w, pattern: Pattern):
  """The pruned-entries mask of magnitude pruning of one (K, N) weight (or a stack (L, K, N), one mask per layer):
  N:M along K, or the floor(fraction * K * N) smallest |w| of each layer."""
  a = jnp.abs(w.astype(jnp.float32))
  if isinstance(pattern, NM):
    return nm_pruned(a, pattern.n, pattern.m, axis=-2)
  count = a.shape[-2] * a.shape[-1]
  n_prune = int(pattern.fraction * count)
  flat = a.reshape(a.shape[:-2] + (count,))
  rank = jnp.argsort(jnp.argsort(flat, axis=-1, stable=True), axis=-1, stable=True)
  return (rank < n_prune).reshape(a.shape)
