"""Shared test helpers: the registry of example specs (one or more per format) and dtype-keyed tolerances."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

import lowbit_jax as lb
from lowbit_jax.formats import PACKED, fp8, nf4, packing
from lowbit_jax.spec import Format, PerTensor

# Every Format appears at least once: test_contract asserts it, so a new format cannot skip the contract.
REGISTRY = {
    "int8_channel": lb.int_spec(8),
    "int8_g64_asym": lb.int_spec(8, group_size=64, symmetric=False),
    "int4_g32": lb.int_spec(4, group_size=32),
    "int4_g128_asym_bf16": lb.int_spec(4, group_size=128, symmetric=False, scale_dtype=jnp.bfloat16),
    "int3_g64": lb.int_spec(3, group_size=64),
    "int3_channel_asym": lb.int_spec(3, symmetric=False),
    "int2_g32_asym": lb.int_spec(2, group_size=32, symmetric=False),
    "int4_g32_signed_max_f16": lb.int_spec(4, group_size=32, grid=lb.SymGrid.SIGNED_MAX, scale_dtype=jnp.float16),
    "int8_channel_restricted": lb.int_spec(8, grid=lb.SymGrid.RESTRICTED),
    "int4_g32_q4_1": lb.q4_1_spec(),
    "int3_g64_clip": lb.int_spec(3, group_size=64, clip=lb.ClipSearch()),
    "int2_g64_asym_clip_bf16": lb.int_spec(2, group_size=64, symmetric=False, clip=lb.ClipSearch(steps=20),
                                           scale_dtype=jnp.bfloat16),
    "int4_channel_float_offset_clip": lb.int_spec(4, symmetric=False, zero_point=lb.ZeroPoint.FLOAT,
                                                  clip=lb.ClipSearch(steps=10, max_shrink=0.5)),
    "nf4_clip": lb.nf4_spec(double_quant=False, clip=lb.ClipSearch(steps=20)),
    "ternary_tensor": lb.ternary_spec(),
    "ternary_channel": lb.ternary_spec(per_channel=True),
    "nf4_dq": lb.nf4_spec(),
    "nf4_nodq": lb.nf4_spec(double_quant=False),
    "fp8_e4m3_tensor": lb.fp8_spec(Format.FP8_E4M3),
    "fp8_e5m2_channel": lb.fp8_spec(Format.FP8_E5M2, per_channel=True),
}

# `lb.quantize(x, spec)` under jit: one compile per (spec, shape, dtype), where an eager call compiles each op of
# the quantizer (several times faster for tests that need a QArray, not the eager path itself).
quantize = jax.jit(lb.quantize, static_argnums=1)

# Tolerances for comparing two computations of the same value, keyed by dtype.
TOL = {
    np.dtype(jnp.float32): dict(rtol=1e-5, atol=1e-5),
    np.dtype(jnp.bfloat16): dict(rtol=2e-2, atol=2e-2),
    np.dtype(jnp.float16): dict(rtol=2e-3, atol=2e-3),
}


def tol(dtype):
  return TOL[np.dtype(dtype)]


def k_pad(k: int, spec) -> int:
  pm = packing.pack_multiple(spec.bits) if spec.format in PACKED else 1
  m = math.lcm(spec.group_size, pm) if spec.group_size else pm
  return -(-k // m) * m


def expected_nbytes(shape, spec) -> int:
  """The byte formula, written independently of QArray: codes + scales + zeros (+ second-level scales)."""
  *lead, k, n = shape   # contraction axis -2
  other = math.prod(lead) * n
  kp = k_pad(k, spec)
  groups = kp // spec.group_size if spec.group_size else 1
  codes = other * kp * spec.bits // 8
  if isinstance(spec.granularity, PerTensor):
    n_scales = math.prod(lead)   # one per stacked tensor
  else:
    n_scales = other * groups
  scales = n_scales * np.dtype(spec.scale_dtype).itemsize
  zeros = 0 if spec.symmetric else n_scales * (np.dtype(spec.scale_dtype).itemsize if spec.float_offset else 1)
  if spec.double_quant:
    # 8-bit codes of the (..., G, N) scales grouped along N in blocks of dq_group_size, one f32 scale and one
    # uint8 zero per block.
    npad = -(-n // spec.dq_group_size) * spec.dq_group_size
    rows = math.prod(lead) * groups
    scales = rows * npad + rows * (npad // spec.dq_group_size) * (4 + 1)
  return codes + scales + zeros


def per_element_scale(q: lb.QArray):
  """The stored scale broadcast to the logical shape of q (numpy float64)."""
  return per_element(q, q.scale_values())


def per_element(q: lb.QArray, a):
  """A per-granule array of q (scale-shaped: scales, zero points, offsets) broadcast to q's logical shape."""
  s = np.asarray(a, np.float64)
  s = np.repeat(s, q.group_len, axis=q.ndim + q.axis) if s.shape[q.axis] > 1 else s
  s = np.take(s, np.arange(min(q.k, s.shape[q.axis])), axis=q.ndim + q.axis) if s.shape[q.axis] > 1 else s
  return np.broadcast_to(s, q.shape)


def error_bound(x, q: lb.QArray):
  """The documented per-element bound on |x - q.dequantize()| for q's format (numpy float64)."""
  x = np.asarray(x, np.float64)
  s = per_element_scale(q)
  ax = np.abs(x)
  fmt = q.spec.format
  slack = 1e-6 * ax + 1e-30
  if fmt is Format.INT:
    # half a step inside the granule's levels, plus the distance to them outside (the FULL grid's positive end,
    # SIGNED_MAX's opposite end, a clipped range), written from the invariant of formats/integer.py
    spec, top = q.spec, 2 ** q.spec.bits - 1
    if spec.symmetric:
      ends = [(c - 2 ** (spec.bits - 1)) * s for c in (0, top)]
    elif spec.float_offset:
      m = per_element(q, q.zero)
      ends = [c * s + m for c in (0, top)]
    else:
      z = per_element(q, q.zero)
      ends = [(c - z) * s for c in (0, top)]
    lo, hi = np.minimum(*ends), np.maximum(*ends)
    s = np.abs(s)
    bound = s / 2 + np.maximum(np.maximum(lo - x, x - hi), 0)
    if q.spec.scale_dtype != np.dtype(jnp.float32):   # a rounded scale can clip the top of the range
      bound = bound + (2 ** (q.spec.bits - 1)) * s * 2.0 ** -jnp.finfo(q.spec.scale_dtype).nmant
    return bound * (1 + 1e-5) + slack
  if fmt is Format.TERNARY:
    return np.where(ax <= 1.5 * s, s / 2, ax - s) * (1 + 1e-5) + slack
  if fmt is Format.NF4:
    return (s * nf4.MAX_GAP / 2 + np.maximum(ax - s, 0)) * (1 + 1e-5) + slack
  dt = fp8.DTYPES[fmt]
  info = jnp.finfo(dt)
  m = info.nmant
  sub_step = 2.0 ** (float(np.log2(float(info.smallest_normal))) - m)   # spacing of the subnormals
  return np.maximum(ax * 2.0 ** -(m + 1), s * sub_step / 2) * (1 + 1e-5) + slack
