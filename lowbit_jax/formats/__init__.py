"""Per-format quantizers: one module per value set, all with the same four functions.

    compute_params(xg, valid, red_axes, spec) -> (scale, zero | None)   float32 statistics, keepdims
    encode(xg, scale, zero, spec)             -> codes                    uint8 (float8 for FP8), unpacked
    decode(codes, zero, spec)                 -> float32                  multiply by the scale to dequantize

`xg` is the weight in float32 with the contraction axis cut into (groups, group_len); `valid` masks the padding.
`dequantize` below is the one place the decode rule (scale, and a float offset where the spec has one) is written.
Packing (`packing.py`) and the grouping/scales bookkeeping (`lowbit_jax.qarray`) are shared by all formats;
`clip.py` is the clipping-ratio search of `QuantSpec.clip`.
"""
import jax.numpy as jnp

from lowbit_jax.formats import fp8, integer, nf4, ternary
from lowbit_jax.spec import Format

FORMATS = {
    Format.INT: integer,
    Format.TERNARY: ternary,
    Format.NF4: nf4,
    Format.FP8_E4M3: fp8,
    Format.FP8_E5M2: fp8,
}
PACKED = (Format.INT, Format.TERNARY, Format.NF4)   # codes bit-packed into uint8; FP8 codes are float8 bytes


def dequantize(codes, scale, zero, spec):
  """Float32 values of unpacked `codes` with broadcastable `scale` (float32) and `zero` (the stored zero point or
  float offset, or None): ``decode(code, zero) * scale``, plus the offset when `spec.float_offset`."""
  vals = FORMATS[spec.format].decode(codes, zero, spec) * scale
  if spec.float_offset:
    vals = vals + zero.astype(jnp.float32)
  return vals
