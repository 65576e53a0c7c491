"""llama.cpp's Q6_K super-blocks in NumPy: quantization (a port of ggml-quants.c's `quantize_row_q6_K_ref` with
`make_qx_quants`, which gguf-py cannot do) and decoding.

A Q6_K block holds 256 values in 210 bytes (6.5625 bits per weight):

    ql      128 bytes   the low 4 bits of the 256 6-bit codes L (0..63)
    qh       64 bytes   their high 2 bits
    scales   16 int8    one scale per sub-block of 16 values
    d         f16       the super-block scale

and decodes as ``x = (d * scales[j]) * (L - 32)`` for sub-block j, in float32, in that order.
Layout of a block's codes, in two halves of 128 values h = 0, 1 and l = 0..31 (as the reference):
``ql[64h + l] = L[128h + l] & 15 | (L[128h + l + 64] & 15) << 4``,
``ql[64h + 32 + l] = L[128h + l + 32] & 15 | (L[128h + l + 96] & 15) << 4`` and
``qh[32h + l] = sum_k (L[128h + l + 32k] >> 4) << 2k``.

The quantizer follows the reference's float32 arithmetic operation by operation (sums accumulated in element order,
no fused multiply-adds: the C code compiled with -ffp-contract=off); a build that contracts its sums into FMAs
can pick another candidate scale in rare near-ties. `nearest_int` is round-half-to-even (`np.rint`) over the
range the reference asserts (|v| <= 4194303).

Error bound: in sub-block j with ``d_j = d * scales[j] != 0``, ``|x - deq| <= |d_j| / 2`` inside the code range
``d_j * [-32, 31]`` and the distance to its nearest end outside it (clipping); a sub-block with ``d_j == 0`` decodes
to 0. Clipping stays below ``2 |d_j| + 19 |d|``: the candidate grids map a sub-block's largest |x| to at most 32.9
steps of its scale s_j, and the int8 rounding of s_j / d (plus d's float16 rounding) moves d_j from s_j by at most
about 0.56 |d| (17 |d| over 33 steps).
"""
from __future__ import annotations

import numpy as np

QK_K = 256          # values per super-block
SUB = 16            # values per sub-block (one int8 scale each)
Q6_K_BYTES = 210    # QK_K / 2 + QK_K / 4 + QK_K / 16 + 2
_GROUP_MAX_EPS = np.float32(1e-15)
_NMAX = 32          # 6-bit codes are l + 32 with l in [-32, 31]


def _nearest_int(v: np.ndarray) -> np.ndarray:
  """llama.cpp's `nearest_int`: round half to even, as float32 (exact integers)."""
  return np.rint(v)


def _trial(x: np.ndarray, w: np.ndarray, iscale: np.ndarray):
  """One candidate of `make_qx_quants`: codes l = clamp(nearest_int(iscale * x)) and the float32 sums
  sum(w x l), sum(w l l), accumulated in element order. x, w: (n, 16); iscale: (n, 1) -> l (n, 16), (n,), (n,)."""
  l = np.clip(_nearest_int(iscale * x), -_NMAX, _NMAX - 1)
  sumlx = np.zeros(x.shape[0], np.float32)
  suml2 = np.zeros(x.shape[0], np.float32)
  for i in range(x.shape[1]):
    sumlx = sumlx + w[:, i] * x[:, i] * l[:, i]
    suml2 = suml2 + w[:, i] * l[:, i] * l[:, i]
  return l, sumlx, suml2


def make_qx_quants(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`make_qx_quants(16, 32, x, L, rmse_type=1, qw=NULL)` on every row of x (n, 16) float32: the least-squares
  scale (weights x^2) over 19 candidate grids ``-(32 + 0.1 is) / max``, is in -9..9, and its stored codes L + 32.

  Returns (scale (n,) float32, codes (n, 16) int32 in [0, 63]); an all-but-zero row (max |x| < 1e-15) gets scale
  0 and codes 0, as in the reference.
  """
  n = x.shape[0]
  mx = x[np.arange(n), np.abs(x).argmax(axis=1)][:, None]             # (n, 1): first value of largest |x|
  zero = np.abs(mx[:, 0]) < _GROUP_MAX_EPS
  mx = np.where(zero[:, None], np.float32(1), mx)
  w = x * x
  with np.errstate(divide="ignore", invalid="ignore"):
    codes, sumlx, suml2 = _trial(x, w, np.float32(-_NMAX) / mx)
    scale = np.where(suml2 != 0, sumlx / suml2, np.float32(0))
    best = scale * sumlx
    for step in range(-9, 10):
      if step == 0:
        continue
      iscale = -(np.float32(_NMAX) + np.float32(0.1) * np.float32(step)) / mx
      l, sumlx, suml2 = _trial(x, w, iscale)
      better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
      codes = np.where(better[:, None], l, codes)
      scale = np.where(better, sumlx / suml2, scale)
      best = np.where(better, scale * sumlx, best)
  codes = (codes + _NMAX).astype(np.int32)
  codes[zero] = 0
  scale[zero] = 0
  return scale.astype(np.float32), codes


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
  """`quantize_row_q6_K_ref`: (n, 256) float32 -> (n, 210) uint8 Q6_K blocks."""
  n = blocks.shape[0]
  x = blocks.reshape(n, QK_K // SUB, SUB)                                # (n, 16 sub-blocks, 16)
  scales, codes = make_qx_quants(x.reshape(-1, SUB))
  scales, codes = scales.reshape(n, -1), codes.reshape(x.shape)          # (n, 16), (n, 16, 16)
  max_scale = scales[np.arange(n), np.abs(scales).argmax(axis=1)][:, None]   # (n, 1)
  empty = np.abs(max_scale[:, 0]) < _GROUP_MAX_EPS
  iscale = np.float32(-128) / np.where(empty[:, None], np.float32(1), max_scale)
  d = (np.float32(1) / iscale).astype(np.float16)                         # (n, 1)
  sc = np.minimum(127, _nearest_int(iscale * scales)).astype(np.int8)   # (n, 16)
  dj = d.astype(np.float32) * sc.astype(np.float32)                     # (n, 16)
  with np.errstate(divide="ignore", invalid="ignore"):
    requant = np.clip(_nearest_int(x / dj[..., None]), -_NMAX, _NMAX - 1) + _NMAX
  codes = np.where((dj != 0)[..., None], requant, codes).astype(np.uint8).reshape(n, QK_K)
  out = np.concatenate([_pack_codes(codes), sc.view(np.uint8), d.view(np.uint8)], axis=1)
  out[empty] = 0
  return out


def _pack_codes(codes: np.ndarray) -> np.ndarray:
  """(n, 256) codes 0..63 -> (n, 192) bytes: ql (128) then qh (64), the module docstring's layout."""
  n = codes.shape[0]
  q = codes.reshape(n, 2, 4, 32)                                         # (n, half, quarter k, l)
  ql = (q[:, :, 0:2] & 0x0F) | ((q[:, :, 2:4] & 0x0F) << 4)              # (n, half, 2, 32)
  shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
  qh = np.bitwise_or.reduce((q >> 4) << shifts, axis=2)                  # (n, half, 32)
  return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64)], axis=1).astype(np.uint8)


def decode_q6_k(blocks: np.ndarray) -> np.ndarray:
  """(n, 210) uint8 Q6_K blocks -> (n, 256) float32, ``(d * scales[j]) * (L - 32)``."""
  n = blocks.shape[0]
  ql, qh, sc, d = np.split(blocks, [128, 192, 208], axis=1)
  d = np.ascontiguousarray(d).view("<f2").astype(np.float32)            # (n, 1)
  dj = (d * np.ascontiguousarray(sc).view(np.int8).astype(np.float32))[..., None]   # (n, 16, 1)
  low = ql.reshape(n, 2, 1, 2, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1, 1)   # (n, half, hi/lo, 2, l)
  low = (low & 0x0F).reshape(n, 2, 4, 32)                                # quarter k = 2 * nibble + ql half
  high = qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
  q = (low | ((high & 0x03) << 4)).astype(np.int8) - np.int8(_NMAX)     # (n, half, k, l)
  return (dj * q.reshape(n, QK_K // SUB, SUB).astype(np.float32)).reshape(n, QK_K)
