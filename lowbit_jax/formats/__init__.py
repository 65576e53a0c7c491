"""Per-format quantizers: one module per value set, all with the same four functions.

    compute_params(xg, valid, red_axes, spec) -> (scale, zero | None)   float32 statistics, keepdims
    encode(xg, scale, zero, spec)             -> codes                    uint8 (float8 for FP8), unpacked
    decode(codes, zero, spec)                 -> float32                  multiply by the scale to dequantize

`xg` is the weight in float32 with the contraction axis cut into (groups, group_len); `valid` masks the padding.
Packing (`packing.py`) and the grouping/scales bookkeeping (`lowbit_jax.qarray`) are shared by all formats.
"""
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
