"""Sparse24: a 2:4 sparse weight stored compressed, kept values plus 2-bit positions, as a JAX pytree.

The format of NVIDIA's sparse tensor cores (Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021;
cuSPARSELt): along the contraction axis K, every group of 4 consecutive weights holds at most 2 nonzeros; only 2
values per group are stored, with each one's position (0..3) in its group.

    logical shape (*B, K, N), contraction axis -2 (a Flax (in, out) kernel, or a stack of them)
    values : (*B, K/2, N) float (float16 / bfloat16 / float32), or a QArray of that logical shape quantized along
             -2 (2:4 x int8, 2:4 x int4: the kept codes of the source QArray, groups of g/2 kept entries)
    meta   : (*B, ceil(K/8), N) uint8: kept slot j (0 <= j < K/2, group j // 2) has its position in its group in
             bits 2 * (j % 4) .. + 1 of byte row j // 4 (4 positions per byte); slots past K/2 hold 0

    nbytes = values.nbytes + prod(B) * ceil(K / 8) * N
           = prod(B) * N * (K/2 * itemsize + ceil(K/8))          float values: 9 bits per weight at float16
           (a QArray's nbytes: its codes at bits / 2 per weight, plus its scales, plus 2 bits of metadata / weight)

A group with fewer than 2 nonzeros stores zeros (positions of the first zero entries); `densify()` restores the
exact dense weight. `sparse24_matmul` is the reference ``x @ W``: a loop over tiles of kept rows that decodes one
tile of values (through `kernels.qmatmul.reference.decode_tile` for a QArray) and scatters it into its K positions
(an (M, rows) x (rows, N) product per position), f32 accumulation: never a float copy of the whole weight.
`lowbit_jax.quantized(apply_fn)` runs it at dot sites that contract K of a 2-D (or scanned-stack) Sparse24.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.tree_util import GetAttrKey, register_pytree_with_keys_class

from lowbit_jax import select as sel
from lowbit_jax.formats import dequantize as decode_values
from lowbit_jax.qarray import QArray, from_codes
from lowbit_jax.spec import PerGroup


@register_pytree_with_keys_class
class Sparse24:
  """Compressed 2:4 weight: see the module docstring for the layout and the bytes formula."""

  def __init__(self, values, meta, *, k: int, dtype):
    self.values, self.meta = values, meta
    self.k = int(k)
    self.dtype = np.dtype(dtype)

  def tree_flatten_with_keys(self):
    return ((GetAttrKey("values"), self.values), (GetAttrKey("meta"), self.meta)), (self.k, self.dtype)

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    obj.values, obj.meta = children
    obj.k, obj.dtype = aux
    return obj

  @property
  def shape(self) -> tuple[int, ...]:
    s = tuple(self.values.shape)
    return s[:-2] + (self.k, s[-1])

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """values.nbytes (a QArray's codes, scales and zeros) + the metadata bytes (see the module docstring)."""
    v = self.values.nbytes if isinstance(self.values, QArray) else math.prod(self.values.shape) * np.dtype(
        self.values.dtype).itemsize
    return v + math.prod(self.meta.shape) * np.dtype(self.meta.dtype).itemsize

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.nbytes / self.size

  def __repr__(self):
    kind = repr(self.values) if isinstance(self.values, QArray) else np.dtype(self.values.dtype).name
    return f"Sparse24(shape={self.shape}, dtype={self.dtype.name}, values={kind}, nbytes={self.nbytes})"

  def positions(self):
    """(*B, K/2, N) uint8: the position in its group of 4 of every kept value."""
    kh = self.values.shape[-2]
    j = jnp.arange(kh)
    b = jnp.take(self.meta, j // 4, axis=-2)
    shift = (2 * (j % 4)).astype(jnp.uint8)[:, None]
    return (b >> shift) & np.uint8(3)

  def kept_values(self):
    v = self.values.dequantize() if isinstance(self.values, QArray) else self.values
    return v.astype(jnp.float32)

  def densify(self):
    """The dense (*B, K, N) weight (exact: the stored values at their positions, zeros elsewhere)."""
    v, p = self.kept_values(), self.positions()
    lead, n = v.shape[:-2], v.shape[-1]
    v = v.reshape(lead + (self.k // 4, 2, 1, n))
    p = p.reshape(lead + (self.k // 4, 2, 1, n))
    dense = jnp.sum(jnp.where(p == jnp.arange(4, dtype=jnp.uint8)[:, None], v, 0.0), axis=-3)   # (.., K/4, 4, N)
    return dense.reshape(lead + (self.k, n)).astype(self.dtype)

  dequantize = densify   # what a consumer that needs a float weight calls (QArray's name)


def _where(path):
  return f"{path}: " if path else ""


def compress(w, *, path: str | None = None) -> Sparse24:
  """`w` (*B, K, N) as a Sparse24: a float array, or a QArray quantized along -2 (its kept codes and scales are
  kept as they are, so values decode bit-identically). K % 4 == 0 and at most 2 nonzeros in every group of 4
  along K, else ValueError naming `path` (prune first: `magnitude_prune` / `sparsegpt` with `NM(n=2, m=4)`)."""
  q = w if isinstance(w, QArray) else None
  if q is not None and (q.k_axes != (q.ndim - 2,) or q.perm is not None or q.in_scale is not None):
    raise ValueError(f"{_where(path)}Sparse24 needs a QArray quantized along axis -2 without in_scale or "
                     f"permuted axes, got {q!r}")
  shape = tuple(w.shape)
  if len(shape) < 2:
    raise ValueError(f"{_where(path)}Sparse24 needs a (..., K, N) weight, got shape {shape}")
  k, n = shape[-2], shape[-1]
  if k % 4:
    raise ValueError(f"{_where(path)}contraction length {k} is not divisible by 4; expected a 2:4 weight")
  dense = (q.dequantize() if q is not None else jnp.asarray(w)).astype(jnp.float32)
  lead = shape[:-2]
  g = dense.reshape(lead + (k // 4, 4, n))
  nz = g != 0
  over = int(jnp.sum(jnp.sum(nz, axis=-2) > 2))
  if over:
    raise ValueError(f"{_where(path)}{over} groups of 4 along K hold more than 2 nonzeros; expected a 2:4 sparse "
                     f"weight (prune with lowbit_jax.NM(n=2, m=4) first)")
  order = jnp.argsort(~nz, axis=-2, stable=True)[..., :2, :]                  # nonzeros first, by position
  pos = jnp.sort(order, axis=-2).astype(jnp.uint8)                            # (*B, K/4, 2, N) ascending
  pos = pos.reshape(lead + (k // 2, n))
  kh = k // 2
  slots = -(-kh // 4) * 4
  pp = jnp.pad(pos, [(0, 0)] * len(lead) + [(0, slots - kh), (0, 0)]).reshape(lead + (slots // 4, 4, n))
  meta = jnp.sum(pp << (2 * jnp.arange(4, dtype=jnp.uint8))[:, None], axis=-2, dtype=jnp.uint8)
  rows = (4 * (jnp.arange(kh) // 2))[:, None] + pos.astype(jnp.int32)          # (*B, K/2, N) dense row index
  if q is None:
    values = jnp.take_along_axis(jnp.asarray(w), rows, axis=-2)
    return Sparse24(values, meta, k=k, dtype=w.dtype)
  spec = q.spec
  if isinstance(spec.granularity, PerGroup):
    if spec.group_size % 4:
      raise ValueError(f"{_where(path)}group size {spec.group_size} is not divisible by 4; expected groups of whole "
                       f"2:4 groups")
    spec = dataclasses.replace(spec, granularity=dataclasses.replace(spec.granularity, size=spec.group_size // 2))
  codes = jnp.take_along_axis(q.unpacked_codes()[..., :k, :], rows, axis=-2)
  half_pad = q.k_pad // 2
  codes = jnp.pad(codes, [(0, 0)] * len(lead) + [(0, half_pad - kh), (0, 0)])
  try:
    values = from_codes(codes, q.scale, q.zero, spec=spec, k=kh, dtype=q.dtype)
  except ValueError as e:
    raise ValueError(f"{_where(path)}the kept codes cannot be packed ({e}); expected K / 2 a multiple of the "
                     f"packing multiple") from None
  return Sparse24(values, meta, k=k, dtype=q.dtype)


def compress_24(params, *, where: sel.Where = None):
  """`params` with every selected 2:4-sparse leaf as a Sparse24 (`compress`); `where` (default: every float or
  QArray leaf with at least 2 dims whose groups of 4 along axis -2 hold at most 2 nonzeros) selects leaves, and a
  selected leaf that is not 2:4 raises naming its key path."""
  is_q = lambda x: isinstance(x, QArray)
  pred = None if where is None else sel.as_predicate(where)

  def one(path, leaf):
    if not hasattr(leaf, "shape") or len(leaf.shape) < 2 or isinstance(leaf, Sparse24):
      return leaf
    if not is_q(leaf) and not jnp.issubdtype(np.dtype(leaf.dtype), jnp.floating):
      return leaf
    if pred is not None:
      return compress(leaf, path=sel.path_repr(path)) if pred(sel.path_str(path), leaf) else leaf
    try:
      return compress(leaf, path=sel.path_repr(path))
    except ValueError:
      return leaf
  return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_q)


def _float_plan(kh: int):
  from lowbit_jax.kernels.qmatmul.reference import TilePlan, _divisors
  limit = max(kh // 8, min(kh, 128))
  best = max(d for d in _divisors(kh) if d <= limit)
  rows = best if 2 * best >= min(limit, kh) else -(-kh // -(-kh // limit))
  return TilePlan(1, kh, rows, -(-kh // rows), 1, kh)


def sparse24_matmul(x, w: Sparse24):
  """x (..., K) @ w (K, N) (2-D Sparse24), f32 accumulation, cast to x.dtype; one tile of values decoded at a
  time (module docstring)."""
  from lowbit_jax.kernels.qmatmul.reference import decode_tile, plan
  v = w.values
  kh, n = v.shape[-2], v.shape[-1]
  quant = isinstance(v, QArray)
  p = plan(v) if quant else _float_plan(kh)
  kh_pad = v.k_pad if quant else kh
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  xp = jnp.pad(x2, [(0, 0), (0, 2 * kh_pad - w.k)])                            # (M, 2 * kh_pad)
  scale = v.scale_values() if quant else None
  meta = w.meta

  @jax.checkpoint
  def body(i, acc):
    chunk, t = i // p.steps, i % p.steps
    r0 = t * p.rows if p.exact else jnp.minimum(t * p.rows, p.chunk_len - p.rows)
    if quant:
      codes, s, z = decode_tile(v, p, chunk, r0, scale)
      vals = decode_values(codes, s, z, v.spec).reshape(-1, n)                # (rows, N) f32
    else:
      vals = lax.dynamic_slice_in_dim(v, r0, p.rows, axis=0).astype(jnp.float32)
    j = chunk * p.chunk_len + r0 + jnp.arange(p.rows)                          # kept slots of this tile
    if not p.exact:
      vals = jnp.where((r0 + jnp.arange(p.rows) >= t * p.rows)[:, None], vals, 0.0)
    pos = (jnp.take(meta, jnp.minimum(j // 4, meta.shape[0] - 1), axis=0) >> (2 * (j % 4)).astype(jnp.uint8)[:, None]
           ) & np.uint8(3)                                                     # (rows, N)
    for q in range(4):
      xq = jnp.take(xp, 4 * (j // 2) + q, axis=1)                              # (M, rows)
      acc = acc + jnp.dot(xq, jnp.where(pos == q, vals, 0.0), preferred_element_type=jnp.float32)
    return acc

  acc = body(jnp.int32(0), jnp.zeros((x2.shape[0], n), jnp.float32))
  trips = p.chunks * p.steps
  acc = acc if trips == 1 else lax.fori_loop(1, trips, body, acc)
  return acc.reshape(x.shape[:-1] + (n,)).astype(x.dtype)
