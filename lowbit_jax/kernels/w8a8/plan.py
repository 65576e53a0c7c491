"""Legality and operands of the w8a8 kernels (shared by `pallas_gpu.py` and `pallas_tpu.py`).

Kernel coverage: symmetric INT8 weights (implicit zero 128: the kernel turns code ^ 0x80 into int8) or FP8 weights
(E4M3 / E5M2), with one scale row (per-channel or per-tensor); activations are quantized by the reference's
quantizer outside the kernel (an XLA fusion over the small activation tensor). Grouped or asymmetric 8-bit
weights, and 2/3/4-bit weights with 8-bit activations, stay on the reference.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from lowbit_jax.kernels import blocks as blk
from lowbit_jax.kernels.common import Platform, pad_to, round_up
from lowbit_jax.kernels.w8a8 import reference
from lowbit_jax.qarray import QArray
from lowbit_jax.spec import Format

_FP8 = (Format.FP8_E4M3, Format.FP8_E5M2)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static description of one w8a8 matmul: weight format, activation format, shapes and tiling."""
  w_fmt: Format
  act_fmt: Format
  per_token: bool
  k_pad: int
  n: int
  m: int
  m_pad: int
  blocks: blk.BlockSizes

  @property
  def steps(self) -> int:
    return self.k_pad // self.blocks.block_k

  @property
  def acc_dtype(self):
    return jnp.int32 if self.act_fmt is Format.INT else jnp.float32


def make_plan(platform: Platform, x_shape, x_dtype, w: QArray, blocks: blk.BlockSizes | None,
              per_token: bool) -> Plan | str:
  """A legal Plan for `w8a8_matmul(x, w)` on `platform`, or the reason there is none."""
  spec = w.spec
  if not (spec.format in _FP8 or (spec.format is Format.INT and spec.bits == 8)):
    return f"the w8a8 kernel reads 8-bit INT or FP8 weights, got {spec.format.name} with {spec.bits} bits"
  if w.zero is not None:
    return "the w8a8 kernel needs symmetric INT8 weights (no zero points)"
  if w.n_groups != 1:
    return f"the w8a8 kernel needs one scale row (per-channel or per-tensor), got {w.n_groups} groups"
  if np.dtype(x_dtype) not in (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16)):
    return f"activations of dtype {np.dtype(x_dtype)} are not supported"
  m, n = math.prod(x_shape[:-1]), w.shape[1]
  b = blk.choose(platform, blocks, m=m, n=n, kc=w.k_pad, p=1, group=None, x_bytes=1)
  if isinstance(b, str):
    return b
  return Plan(w_fmt=spec.format, act_fmt=reference.act_format(w), per_token=per_token, k_pad=w.k_pad, n=n, m=m,
              m_pad=round_up(max(m, 1), b.block_m), blocks=b)


def operands(x, w: QArray, plan: Plan):
  """(xq (M_pad, K_pad) int8/float8, sx f32 (M_pad, 1), codes (K_pad, N), sw f32 (1, N))."""
  x2 = x.reshape(plan.m, x.shape[-1])
  xq, sx = reference.quantize_activations(x2, plan.act_fmt, per_token=plan.per_token)
  xq = pad_to(xq, (plan.m_pad, plan.k_pad))
  sx = pad_to(jnp.broadcast_to(sx, (plan.m, 1)), (plan.m_pad, 1))
  sw = jnp.broadcast_to(w.scale_values(), (1, plan.n))
  return xq, sx, w.codes, sw


def weight_tile(codes, plan: Plan, act_dtype):
  """The weight tile as the dot's right operand: int8 for INT8 (code - 128), the FP8 codes when they match the
  activations' format, else bfloat16 (exact for both FP8 formats)."""
  if plan.w_fmt is Format.INT:
    return (codes.astype(jnp.int32) - 128).astype(jnp.int8)
  if codes.dtype == act_dtype:
    return codes
  return codes.astype(jnp.float32).astype(jnp.bfloat16)


def act_tile(xq, codes_dtype, plan: Plan):
  """The activation tile: unchanged unless the weight tile was widened to bfloat16 (mixed FP8 formats)."""
  if plan.act_fmt is Format.INT or codes_dtype == xq.dtype:
    return xq
  return xq.astype(jnp.float32).astype(jnp.bfloat16)
