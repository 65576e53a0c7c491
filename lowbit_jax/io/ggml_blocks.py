"""ggml's block formats in NumPy: quantize to raw blocks, decode them, and map them to and from QArrays.

Raw blocks are what a GGUF file stores: a float32 tensor of numpy shape (..., K), K a multiple of the type's block
size, becomes uint8 (..., K / block * type_size). Per block (all little-endian, f16 = IEEE half):

    Q8_0   32 values, 34 bytes   f16 d, 32 int8 q                      x = d * q
    Q4_0   32 values, 18 bytes   f16 d, 16 bytes of nibbles            x = d * (q - 8)
    Q4_1   32 values, 20 bytes   f16 d, f16 m, 16 bytes of nibbles     x = d * q + m
    TQ1_0 256 values, 54 bytes   48 bytes of base-3 digits, f16 d       x = d * (q - 1), q in {0, 1, 2}
    TQ2_0 256 values, 66 bytes   64 bytes of 2-bit fields, f16 d        x = d * (q - 1)
    Q6_K  256 values, 210 bytes  see `ggml_kquants`
    BF16, F16, F32               one value per element

Nibbles: byte j of a 32-block holds element j (low nibble) and element j + 16 (high nibble). TQ2_0: byte 32h + l
holds elements 128h + 32s + l at bits 2s. TQ1_0: bytes 0..31 hold elements j + 32k, 32..47 elements 160 + j + 16k
(k = 0..4), 48..51 elements 240 + j + 4k (k = 0..3), each byte ``ceil(256 * sum_k q_k 3^(4-k) / 243)``.

`quantize` ports gguf-py's (and llama.cpp's reference) numerics exactly and is byte-identical to
`gguf.quants.quantize` for Q8_0, Q4_0, Q4_1, TQ1_0, TQ2_0 and BF16 (Q8_0 rounds half away from zero, C's roundf;
Q4_0 / Q4_1 truncate x * id + 8.5 / + 0.5); Q6_K ports `quantize_row_q6_K_ref` (`ggml_kquants`). `dequantize` is
bit-identical to `gguf.quants.dequantize` for every type here.

QArray mapping (`to_qarray` / `from_qarray`): a block type maps when some QuantSpec decodes its stored fields with
the same float32 arithmetic and stores exactly its bytes. Each product such a decode forms (a code of at most 8 bits
times an f16 scale, at most 19 significant bits) is exact in float32, so the QArray's `dequantize` gives the same
bits op by op or compiled, where XLA may fuse Q4_1's ``d * q + m`` into one fused multiply-add. The grid of a
symmetric spec only decides how codes are chosen, not how they decode: any grid maps.

    Q8_0   `q8_0_spec()`: int8, groups of 32, float16 scales, symmetric (code = q + 128; grid RESTRICTED)
    Q4_0   `q4_0_spec()`: int4, groups of 32, float16 scales, symmetric (code = q; grid SIGNED_MAX)
    Q4_1   `q4_1_spec()`: int4, groups of 32, float16 scale d and float16 offset m (ZeroPoint.FLOAT)
    TQ2_0  ternary, groups of 256, float16 scales (code = q)

TQ1_0 (1.6875 bits per weight in base 3) and Q6_K (6-bit codes under two-level int8 x f16 scales) have no QArray
that stores their bytes: `to_qarray` returns None and callers decode them to float32 with `dequantize`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax import qarray as qa
from lowbit_jax.io import ggml_kquants as kq
from lowbit_jax.spec import Format, PerGroup, QuantSpec, q4_0_spec, q4_1_spec, q8_0_spec

Kind = gguf.GGMLQuantizationType
_T = Kind
_TRITS = np.array([81, 27, 9, 3, 1], np.uint8)        # TQ1_0 packs 5 (or 4) base-3 digits, most significant first


# --- byte fields ------------------------------------------------------------------------------------------------

def _half(b: np.ndarray) -> np.ndarray:
  """(n, 2) bytes -> (n,) float16."""
  return np.ascontiguousarray(b).view("<f2")[:, 0]


def _half_bytes(h: np.ndarray) -> np.ndarray:
  """(n,) or (n, 1) float values -> (n, 2) bytes of their float16 (round to nearest even)."""
  return np.ascontiguousarray(h, "<f2").reshape(-1, 1).view(np.uint8)


def _nibbles(b: np.ndarray) -> np.ndarray:
  """(n, 16) bytes -> (n, 32) codes 0..15: the low nibbles (elements 0..15), then the high nibbles (16..31)."""
  return np.concatenate([b & 0x0F, b >> 4], axis=1)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
  """(n, 32) codes 0..15 -> (n, 16) bytes, the inverse of `_nibbles`."""
  return (codes[:, :16] | (codes[:, 16:] << 4)).astype(np.uint8)


def _crumbs(b: np.ndarray) -> np.ndarray:
  """TQ2_0's (n, 64) bytes -> (n, 256) 2-bit codes (module docstring layout)."""
  n = b.shape[0]
  fields = b.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)   # (n, half, s, l)
  return (fields & 0x03).reshape(n, 256)


def _pack_crumbs(codes: np.ndarray) -> np.ndarray:
  """(n, 256) codes 0..3 -> (n, 64) bytes, the inverse of `_crumbs`."""
  n = codes.shape[0]
  shifted = codes.reshape(n, 2, 4, 32) << np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
  return np.bitwise_or.reduce(shifted, axis=2).reshape(n, 64).astype(np.uint8)


# --- quantizers: (n, block) float32 -> (n, type_size) uint8, gguf-py's arithmetic ---------------------------------

def _round_away(v: np.ndarray) -> np.ndarray:
  """C's roundf (half away from zero), exactly: gguf-py's `np_roundf`."""
  a = np.abs(v)
  floored = np.floor(a)
  return np.sign(v) * (floored + np.floor(2 * (a - floored)))


def _inverse(d: np.ndarray) -> np.ndarray:
  """1 / d, 0 where d == 0 (the reference's ``d ? 1.0f/d : 0.0f``)."""
  with np.errstate(divide="ignore"):
    return np.where(d == 0, np.float32(0), np.float32(1) / d)


def _quantize_q8_0(b: np.ndarray) -> np.ndarray:
  d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
  q = _round_away(b * _inverse(d)).astype(np.int8)
  return np.concatenate([_half_bytes(d), q.view(np.uint8)], axis=1)


def _quantize_q4_0(b: np.ndarray) -> np.ndarray:
  signed_max = np.take_along_axis(b, np.abs(b).argmax(axis=1)[:, None], axis=1)    # (n, 1), first of largest |x|
  d = signed_max / np.float32(-8)
  q = np.trunc(b * _inverse(d) + np.float32(8.5)).astype(np.uint8).clip(0, 15)
  return np.concatenate([_half_bytes(d), _pack_nibbles(q)], axis=1)


def _quantize_q4_1(b: np.ndarray) -> np.ndarray:
  lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
  d = (hi - lo) / np.float32(15)
  q = np.trunc((b - lo) * _inverse(d) + np.float32(0.5)).astype(np.uint8).clip(0, 15)
  return np.concatenate([_half_bytes(d), _half_bytes(lo), _pack_nibbles(q)], axis=1)


def _ternary(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """TQ1_0 / TQ2_0's codes q + 1 in {0, 1, 2} (n, 256) with d = max |x| (n, 1)."""
  d = np.abs(b).max(axis=1, keepdims=True)
  return (_round_away(b * _inverse(d)).astype(np.int8) + np.int8(1)).astype(np.uint8), d


def _base3(q: np.ndarray, digits: int) -> np.ndarray:
  """(n, digits * w) trits -> (n, w) integers sum_k q[k * w + j] 3^(4-k)."""
  n = q.shape[0]
  return (q.reshape(n, digits, -1).astype(np.int64) * _TRITS[:digits, None]).sum(axis=1)


def _quantize_tq1_0(b: np.ndarray) -> np.ndarray:
  q, d = _ternary(b)
  v = np.concatenate([_base3(q[:, :160], 5), _base3(q[:, 160:240], 5), _base3(q[:, 240:], 4)], axis=1)
  return np.concatenate([((v * 256 + 242) // 243).astype(np.uint8), _half_bytes(d)], axis=1)


def _quantize_tq2_0(b: np.ndarray) -> np.ndarray:
  q, d = _ternary(b)
  return np.concatenate([_pack_crumbs(q), _half_bytes(d)], axis=1)


def _quantize_bf16(b: np.ndarray) -> np.ndarray:
  """Round to nearest even, NaN kept quiet (ggml_compute_fp32_to_bf16)."""
  n = np.ascontiguousarray(b).view(np.uint32)
  n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n)
  n = (n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16
  return n.astype("<u2").view(np.uint8)


# --- decoders: (n, type_size) uint8 -> (n, block) float32, gguf-py's arithmetic -----------------------------------

def _decode_tq1_0(b: np.ndarray) -> np.ndarray:
  n = b.shape[0]
  powers = _TRITS[::-1].reshape(1, 5, 1)                                  # 1, 3, 9, 27, 81 (uint8 products wrap)
  shifted = [(b[:, :32].reshape(n, 1, 32) * powers).reshape(n, 160),
             (b[:, 32:48].reshape(n, 1, 16) * powers).reshape(n, 80),
             (b[:, 48:52].reshape(n, 1, 4) * powers[:, :4]).reshape(n, 16)]
  q = ((np.concatenate(shifted, axis=1).astype(np.uint16) * 3) >> 8).astype(np.int8) - np.int8(1)
  return _half(b[:, 52:])[:, None].astype(np.float32) * q.astype(np.float32)


def _decode_bf16(b: np.ndarray) -> np.ndarray:
  """bfloat16 is the top half of a float32: widen each little-endian uint16 by 16 zero bits."""
  return (np.ascontiguousarray(b).view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)


def _scaled(d: np.ndarray, q: np.ndarray) -> np.ndarray:
  """float32 d (n,) times codes (n, block)."""
  return d.astype(np.float32)[:, None] * q.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _Codec:
  encode: Callable[[np.ndarray], np.ndarray]   # (n, block) float32 -> (n, type_size) uint8
  decode: Callable[[np.ndarray], np.ndarray]   # (n, type_size) uint8 -> (n, block) float32


_CODECS: dict[Kind, _Codec] = {
    _T.F32: _Codec(lambda b: np.ascontiguousarray(b, "<f4").view(np.uint8),
                   lambda b: np.ascontiguousarray(b).view("<f4").astype(np.float32)),
    _T.F16: _Codec(lambda b: np.ascontiguousarray(b, "<f2").view(np.uint8),
                   lambda b: np.ascontiguousarray(b).view("<f2").astype(np.float32)),
    _T.BF16: _Codec(_quantize_bf16, _decode_bf16),
    _T.Q8_0: _Codec(_quantize_q8_0, lambda b: _scaled(_half(b[:, :2]), np.ascontiguousarray(b[:, 2:]).view(np.int8))),
    _T.Q4_0: _Codec(_quantize_q4_0,
                    lambda b: _scaled(_half(b[:, :2]), _nibbles(b[:, 2:]).astype(np.int8) - np.int8(8))),
    _T.Q4_1: _Codec(_quantize_q4_1, lambda b: _scaled(_half(b[:, :2]), _nibbles(b[:, 4:]))
                    + _half(b[:, 2:4]).astype(np.float32)[:, None]),
    _T.TQ1_0: _Codec(_quantize_tq1_0, _decode_tq1_0),
    _T.TQ2_0: _Codec(_quantize_tq2_0, lambda b: _scaled(_half(b[:, 64:]), _crumbs(b[:, :64]).astype(np.int8)
                                                        - np.int8(1))),
    _T.Q6_K: _Codec(kq.quantize_q6_k, kq.decode_q6_k),
}
KINDS = frozenset(_CODECS)   # the types `quantize` and `dequantize` handle


def _check_kind(kind: Kind) -> None:
  if kind not in _CODECS:
    raise ValueError(f"ggml type {Kind(kind).name} is not supported; supported: "
                     f"{', '.join(k.name for k in _CODECS)}")


def byte_shape(shape: tuple[int, ...], kind: Kind) -> tuple[int, ...]:
  """The numpy shape of the raw blocks of a tensor of numpy shape `shape`: (..., K / block * type_size)."""
  block, size = gguf.GGML_QUANT_SIZES[kind]
  if not shape or shape[-1] % block:
    raise ValueError(f"{Kind(kind).name}: rows of shape {tuple(shape)} are not whole blocks of {block} values")
  return tuple(shape[:-1]) + (shape[-1] // block * size,)


def quantize(x: np.ndarray, kind: Kind) -> np.ndarray:
  """x (..., K) as float32 -> uint8 raw blocks (..., K / block * type_size) of ggml type `kind`."""
  _check_kind(kind)
  x = np.asarray(x, np.float32)
  out_shape = byte_shape(x.shape, kind)
  block = gguf.GGML_QUANT_SIZES[kind][0]
  return _CODECS[kind].encode(x.reshape(-1, block)).reshape(out_shape)   # (n, block) -> (n, type_size)


def _blocks(raw: np.ndarray, kind: Kind, shape: tuple[int, ...]) -> np.ndarray:
  """The bytes of `raw` as (n_blocks, type_size), checked against a tensor of numpy shape `shape`."""
  _check_kind(kind)
  want = byte_shape(tuple(shape), kind)
  data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
  if data.size != math.prod(want):
    raise ValueError(f"{Kind(kind).name} data of {data.size} bytes for a tensor of shape {tuple(shape)}; expected "
                     f"{math.prod(want)}")
  return data.reshape(-1, gguf.GGML_QUANT_SIZES[kind][1])


def dequantize(raw: np.ndarray, kind: Kind, shape: tuple[int, ...]) -> np.ndarray:
  """Raw blocks of ggml type `kind` (any dtype, read as bytes) -> a new float32 array of numpy shape `shape`."""
  return _CODECS[kind].decode(_blocks(raw, kind, shape)).reshape(shape)


# --- QArray mapping -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Fields:
  """The stored fields of n blocks, as a QArray holds them."""
  codes: np.ndarray            # (n, block) uint8, the QArray's unsigned codes
  scale: np.ndarray            # (n,) float16
  offset: np.ndarray | None    # (n,) float16 (Q4_1's m), else None


@dataclasses.dataclass(frozen=True)
class _Mapping:
  spec: Callable[[int], QuantSpec]           # contraction axis -> the spec that decodes the fields like ggml
  split: Callable[[np.ndarray], _Fields]     # (n, type_size) bytes -> fields
  join: Callable[[_Fields], np.ndarray]      # fields -> (n, type_size) bytes


_F16 = jnp.float16
_MAPPINGS: dict[Kind, _Mapping] = {
    _T.Q8_0: _Mapping(
        lambda a: q8_0_spec(axis=a),
        lambda b: _Fields(b[:, 2:] ^ np.uint8(0x80), _half(b[:, :2]), None),
        lambda f: np.concatenate([_half_bytes(f.scale), f.codes ^ np.uint8(0x80)], axis=1)),
    _T.Q4_0: _Mapping(
        lambda a: q4_0_spec(axis=a),
        lambda b: _Fields(_nibbles(b[:, 2:]), _half(b[:, :2]), None),
        lambda f: np.concatenate([_half_bytes(f.scale), _pack_nibbles(f.codes)], axis=1)),
    _T.Q4_1: _Mapping(
        lambda a: q4_1_spec(axis=a),
        lambda b: _Fields(_nibbles(b[:, 4:]), _half(b[:, :2]), _half(b[:, 2:4])),
        lambda f: np.concatenate([_half_bytes(f.scale), _half_bytes(f.offset), _pack_nibbles(f.codes)], axis=1)),
    _T.TQ2_0: _Mapping(
        lambda a: QuantSpec(format=Format.TERNARY, granularity=PerGroup(size=256, axis=a), scale_dtype=_F16),
        lambda b: _Fields(_crumbs(b[:, :64]), _half(b[:, 64:]), None),
        lambda f: np.concatenate([_pack_crumbs(f.codes), _half_bytes(f.scale)], axis=1)),
}


def _decode_key(spec: QuantSpec) -> tuple:
  """What decides how a spec's stored fields decode and are laid out (not how they were chosen: grid, clipping)."""
  return (spec.format, spec.bits, spec.symmetric, spec.zero_point, spec.group_size, np.dtype(spec.scale_dtype),
          spec.double_quant)


def to_qarray(raw: np.ndarray, kind: Kind, shape: tuple[int, ...], *, transpose: bool) -> qa.QArray | None:
  """The QArray of a tensor of numpy shape `shape` stored as raw ggml blocks, or None when `kind` does not map
  (module docstring). Its `dequantize()` is bit-identical to `dequantize(raw, kind, shape)` (swapped in its last two
  axes when `transpose`) and its `nbytes` equal the raw bytes.

  transpose=False: groups along the last axis (spec axis -1; an embedding (vocab, dim)). transpose=True: a GGUF
  Linear weight (out, in) becomes the Flax kernel (in, out), groups along `in` (spec axis -2).
  Leaves are C-contiguous numpy arrays that own their memory.
  """
  mapping = _MAPPINGS.get(kind)
  if mapping is None:
    return None
  shape = tuple(int(s) for s in shape)
  fields = mapping.split(_blocks(raw, kind, shape))
  k = shape[-1]
  stats_shape = shape[:-1] + (k // gguf.GGML_QUANT_SIZES[kind][0],)
  codes = fields.codes.reshape(shape)                                           # (..., K)
  scale = fields.scale.reshape(stats_shape)                                     # (..., G)
  offset = None if fields.offset is None else fields.offset.reshape(stats_shape)
  axis = -1
  if transpose:
    if len(shape) < 2:
      raise ValueError(f"transpose needs a matrix, got shape {shape}")
    codes, scale = np.swapaxes(codes, -1, -2), np.swapaxes(scale, -1, -2)       # (..., K, rows), (..., G, rows)
    offset = None if offset is None else np.swapaxes(offset, -1, -2)
    axis = -2
  q = qa.from_codes(codes, scale, offset, spec=mapping.spec(axis), k=k, dtype=np.float32)
  return jax.tree.map(lambda a: np.array(a, order="C"), q)


def from_qarray(q: qa.QArray) -> tuple[Kind, np.ndarray] | None:
  """The ggml type and raw blocks (numpy order: (..., rows, K / block * type_size)) that store `q` exactly, or None
  when its spec does not map (module docstring), or it has an `in_scale`, a permutation, a multi-axis contraction
  block, double-quantized scales or padding. A spec axis -2 (Flax kernel (in, out)) is written as the (out, in)
  ggml matrix, -1 as it is. The blocks decode to the QArray's float32 values before its cast to `q.dtype`;
  ``from_qarray(to_qarray(raw, kind, shape, transpose=t)) == (kind, raw)`` byte for byte."""
  if not isinstance(q, qa.QArray) or q.perm is not None or q.in_scale is not None or len(q.k_shape) != 1:
    return None
  axis = q.axis if q.axis < 0 else q.axis - q.codes.ndim
  if isinstance(q.scale, qa.QArray) or axis not in (-1, -2) or q.k_pad != q.k:
    return None
  kind = next((t for t, m in _MAPPINGS.items() if _decode_key(m.spec(-1)) == _decode_key(q.spec)), None)
  if kind is None:
    return None
  stats = [np.asarray(q.unpacked_codes()), np.asarray(q.scale), None if q.zero is None else np.asarray(q.zero)]
  if axis == -2:
    stats = [None if a is None else np.swapaxes(a, -1, -2) for a in stats]   # (..., rows, K), (..., rows, G)
  codes, scale, offset = stats
  block = gguf.GGML_QUANT_SIZES[kind][0]
  fields = _Fields(np.ascontiguousarray(codes, np.uint8).reshape(-1, block), scale.reshape(-1),
                   None if offset is None else offset.reshape(-1))
  return kind, _MAPPINGS[kind].join(fields).reshape(byte_shape(codes.shape, kind))
