"""The spec of `qmatmul`: ``x @ W`` with W a 2-D QArray, dequantized tile by tile, f32 accumulation.

    out[..., n] = sum_g  scale[g, n] * sum_{k in group g} x[..., k] * (code[k, n] - zero[g, n])
               (float offsets: sum_g sum_{k in g} x[..., k] * (code[k, n] * scale[g, n] + offset[g, n]))

The result equals ``x @ w.dequantize()`` up to float rounding and is cast back to ``x.dtype``. Padding of the
contraction axis meets zero-padded activations, so it contributes nothing. Pallas kernels must match this function.

Evaluation never holds a float copy of the whole weight: a loop over K-tiles (`for_each_tile`) reads the packed
bytes of one tile, decodes them (`lowbit_jax.formats.dequantize`: zero point, scale, offset) into a float (rows, N)
tile, and accumulates ``x[..., tile rows] @ tile`` in float32. Tiles follow the split-chunk packing
(formats/packing.py): with `p` codes per byte of the finest plane, the padded axis is `p` chunks of ``C = K_pad /
p`` code rows; one step reads the byte rows ``m * C + r0 + [0, rows)`` of every plane (``m`` below p / that plane's
codes per byte: 3-bit reads two row ranges of its 2-bit plane, one of its 1-bit plane) and gets the code rows ``c *
C + r0 + [0, rows)`` of each chunk `c`, decoded as one float tile per chunk. Tiles are group-aligned (whole groups,
or a part of one group) and hold at most ``max(group length, K_pad / 8)`` rows (``max(K_pad / 8, 128)`` with one
scale row along K), so a big K makes at least 8 tiles. `w8a8/reference.py` reuses the loop.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowbit_jax.formats import PACKED, dequantize, packing
from lowbit_jax.qarray import QArray

_MIN_ROWS = 128   # per-channel / per-tensor tiles need not be smaller than this (small K: one tile)


@dataclasses.dataclass(frozen=True)
class TilePlan:
  """Static tiling of the padded contraction axis of a 2-D QArray (see the module docstring)."""
  chunks: int      # p: code-row chunks of the packed axis (codes per byte of the finest plane; 1 unpacked)
  chunk_len: int   # C = K_pad / chunks
  rows: int        # code rows of one tile (byte rows read from each plane range per tile)
  steps: int       # tiles per chunk, ceil(C / rows) (the last overlaps the previous one when rows does not
                   # divide C); the loop makes chunks * steps trips
  granules: int    # scale rows per tile: rows / group (whole groups), or 1 (one group, or one scale row for all)
  group: int       # group length (K_pad when there is one scale row along K)

  @property
  def exact(self) -> bool:
    return self.steps * self.rows == self.chunk_len


def _divisors(n: int) -> list[int]:
  small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
  return sorted(set(small + [n // d for d in small]))


def plan(w: QArray) -> TilePlan:
  """The tiling `for_each_tile` uses for w: group-aligned tiles of at most max(group, K_pad / 8) code rows
  (per-channel / per-tensor: max(K_pad / 8, 128), the last tile overlapping when no divisor of C fits)."""
  k_pad, n_groups = w.k_pad, w.n_groups
  packed = w.spec.format in PACKED and w.spec.bits < 8
  chunks = packing.pack_multiple(w.spec.bits) if packed else 1
  c = k_pad // chunks
  g = k_pad // n_groups
  if n_groups > 1:
    limit = max(g, k_pad // 8)
    # Group-aligned divisors of C: whole groups (C a multiple of g) or a part of one group (a divisor of g).
    ok = [d for d in _divisors(c) if d <= limit and (g % d == 0 or (d % g == 0 and c % g == 0))]
    rows = max(ok)   # never empty: 1 divides everything
    return TilePlan(chunks, c, rows, c // rows, rows // g if rows >= g else 1, g)
  limit = max(k_pad // 8, min(k_pad, _MIN_ROWS))
  best = max(d for d in _divisors(c) if d <= limit)
  if 2 * best >= min(limit, c):
    rows = best
  else:   # C has no usable divisor (a prime-ish K): balanced tiles, the last one overlapping
    rows = -(-c // -(-c // limit))
  return TilePlan(chunks, c, rows, -(-c // rows), 1, g)


def decode_tile(w: QArray, p: TilePlan, chunk, r0, scale):
  """Code rows ``chunk * C + r0 + [0, rows)`` of w, unpacked (uint8, or float8 for FP8) of shape (granules,
  rows / granules, N), with the matching rows of `scale` (``w.scale_values()``, (G, N) or (1, 1)) and of `zero`
  (None, or (granules, 1, N)), both broadcastable to (granules, 1, N). `chunk` and `r0` may be traced int32
  scalars."""
  spec, n = w.spec, w.codes.shape[-1]
  if spec.format in PACKED and spec.bits < 8:
    codes, start, low = None, 0, 0
    for width in packing.planes(spec.bits):
      ratio = p.chunks // (8 // width)        # chunks of this plane's byte rows
      j, m = chunk // ratio, chunk % ratio    # field j of byte rows start + m*C + r0 + [0, rows)
      b = lax.dynamic_slice_in_dim(w.codes, start + m * p.chunk_len + r0, p.rows, axis=0)   # (rows, N) uint8
      shift = (j * width).astype(jnp.uint8)
      field = ((b >> shift) & np.uint8((1 << width) - 1)) << np.uint8(low)
      codes = field if codes is None else codes | field
      start += ratio * p.chunk_len
      low += width
  else:
    codes = lax.dynamic_slice_in_dim(w.codes, r0, p.rows, axis=0)                           # (rows, N)
  codes = codes.reshape(p.granules, p.rows // p.granules, n)                                 # (R, rows/R, N)
  zero = w.zero
  if w.n_groups > 1:
    g0 = (chunk * p.chunk_len + r0) // p.group                                               # first scale row
    scale = lax.dynamic_slice_in_dim(scale, g0, p.granules, axis=0)                          # (R, N)
    if zero is not None:
      zero = lax.dynamic_slice_in_dim(zero, g0, p.granules, axis=0)                          # (R, N)
  zero = None if zero is None else zero[:, None, :]                                          # (R, 1, N)
  return codes, scale[:, None, :], zero                                                      # scale (R, 1, N)


def for_each_tile(w: QArray, xp, step, acc):
  """Fold ``acc = step(acc, x_tile, codes, scale, zero)`` over every tile of w (`decode_tile`), one tile per trip
  of a `fori_loop` (chunk-major), so one float tile is live at a time.

  xp: (M, K_pad) activations (any dtype), zero-padded; x_tile: (M, rows) the matching columns (zeroed where the
  last, overlapping tile repeats rows). The loop body is rematerialized under differentiation, so reverse mode
  saves no decoded tile either."""
  p = plan(w)
  scale = w.scale_values()                                                                   # (G, N) or (1, 1)

  @jax.checkpoint
  def body(i, acc):
    chunk, t = i // p.steps, i % p.steps
    r0 = t * p.rows if p.exact else jnp.minimum(t * p.rows, p.chunk_len - p.rows)
    xt = lax.dynamic_slice_in_dim(xp, chunk * p.chunk_len + r0, p.rows, axis=1)             # (M, rows)
    if not p.exact:   # rows before t * rows were covered by the previous tile
      fresh = r0 + jnp.arange(p.rows) >= t * p.rows
      xt = jnp.where(fresh, xt, jnp.zeros((), xt.dtype))
    codes, rows_scale, rows_zero = decode_tile(w, p, chunk, r0, scale)
    return step(acc, xt, codes, rows_scale, rows_zero)

  trips = p.chunks * p.steps
  acc = body(jnp.int32(0), acc)   # the first trip peeled: the carry then has x's type (varying under shard_map)
  return acc if trips == 1 else lax.fori_loop(1, trips, body, acc)


def qmatmul(x, w: QArray):
  """x: (..., K) float; w: QArray of logical shape (K, N) with contraction axis -2. Returns (..., N), x.dtype.
  Decodes w one K-tile at a time (module docstring): no float temporary larger than one tile of the weight."""
  n = w.codes.shape[-1]
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)                                       # (M, K)
  xp = jnp.pad(x2, [(0, 0), (0, w.k_pad - w.k)])                                            # (M, K_pad)

  def step(acc, xt, codes, scale, zero):
    tile = dequantize(codes, scale, zero, w.spec).reshape(-1, n)                             # (rows, N) f32
    return acc + jnp.dot(xt, tile, preferred_element_type=jnp.float32)

  out = for_each_tile(w, xp, step, jnp.zeros((xp.shape[0], n), jnp.float32))               # (M, N)
  return out.reshape(x.shape[:-1] + (n,)).astype(x.dtype)
