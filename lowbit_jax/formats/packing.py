"""Bit packing of unsigned codes into uint8, along one axis, in kernel-friendly *split chunks*.

Layout (the contract every kernel reads). A code width `b` is split into bit planes of widths 8, 4, 2 or 1
(8 -> [8], 4 -> [4], 3 -> [2, 1], 2 -> [2]). For a plane of width `w`, `p = 8 // w` codes share a byte: the
packing axis of length `L` (a multiple of `p`) is cut into `p` contiguous chunks of `L / p`, and

    packed[i] = sum_j  plane_bits(code[j * L/p + i]) << (j * w)        for i in [0, L/p)

so unpacking is `concat_j((packed >> j*w) & (2**w - 1))`, with no interleave: a kernel can instead split the
activations into the same `p` contiguous chunks and accumulate `x_j @ ((packed >> j*w) & mask)`. The planes are
concatenated along the axis (3-bit: the 2-bit plane, then the 1-bit plane), so the packed axis holds
`L * b / 8` bytes exactly and the code is `plane0 | plane1 << 2`.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_PLANES = {8: (8,), 4: (4,), 3: (2, 1), 2: (2,), 1: (1,)}


def planes(bits: int) -> tuple[int, ...]:
  """Plane widths for a code width (low bits first)."""
  try:
    return _PLANES[bits]
  except KeyError:
    raise ValueError(f"packing: unsupported code width {bits}; expected one of {sorted(_PLANES)}") from None


def pack_multiple(bits: int) -> int:
  """The packing axis length must be a multiple of this."""
  return max(8 // w for w in planes(bits))


def packed_length(length: int, bits: int) -> int:
  """Bytes along the packing axis for `length` codes (`length` a multiple of `pack_multiple(bits)`)."""
  _check_length(length, bits)
  return length * bits // 8


def _check_length(length: int, bits: int) -> None:
  m = pack_multiple(bits)
  if length % m:
    raise ValueError(f"packing: axis length {length} must be a multiple of {m} for {bits}-bit codes")


def _shifts(p: int, w: int, ndim: int):
  return (jnp.arange(p, dtype=jnp.uint8) * np.uint8(w)).reshape((p,) + (1,) * ndim)


def pack(codes, bits: int, axis: int):
  """Pack unsigned codes (`uint8`, values < 2**bits) along `axis` into uint8 with the split-chunk layout."""
  codes = jnp.moveaxis(jnp.asarray(codes, jnp.uint8), axis, 0)
  length = codes.shape[0]
  _check_length(length, bits)
  out, low = [], 0
  for w in planes(bits):
    p = 8 // w
    plane = (codes >> np.uint8(low)) & np.uint8((1 << w) - 1)
    chunks = plane.reshape((p, length // p) + codes.shape[1:])       # (p, L/p, ...)
    out.append(jnp.sum(chunks << _shifts(p, w, codes.ndim), axis=0, dtype=jnp.uint8))
    low += w
  return jnp.moveaxis(jnp.concatenate(out, axis=0), 0, axis)


def unpack(packed, bits: int, axis: int):
  """Inverse of `pack`: uint8 codes of length `packed.shape[axis] * 8 // bits` along `axis`."""
  packed = jnp.moveaxis(jnp.asarray(packed), axis, 0)
  if packed.dtype != jnp.uint8:
    raise ValueError(f"unpack: packed codes must be uint8, got {packed.dtype}")
  if (packed.shape[0] * 8) % bits:
    raise ValueError(f"unpack: {packed.shape[0]} bytes do not hold a whole number of {bits}-bit codes")
  length = packed.shape[0] * 8 // bits
  _check_length(length, bits)
  codes, start, low = None, 0, 0
  for w in planes(bits):
    p = 8 // w
    rows = packed[start:start + length // p]                          # (L/p, ...)
    fields = (rows[None] >> _shifts(p, w, rows.ndim)) & np.uint8((1 << w) - 1)   # (p, L/p, ...)
    plane = fields.reshape((length,) + rows.shape[1:]) << np.uint8(low)
    codes = plane if codes is None else codes | plane
    start += length // p
    low += w
  return jnp.moveaxis(codes, 0, axis)
