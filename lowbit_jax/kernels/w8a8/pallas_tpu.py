"""w8a8 matmul as a Pallas Mosaic TPU kernel: int8 x int8 -> int32 (or FP8 x FP8 -> f32) on the MXU.

Grid (N tiles, M tiles, K steps), K last and sequential, an int32 / f32 VMEM accumulator; at the last step the
accumulator is scaled by the per-token activation scale (a (block_m, 1) column) and the per-channel weight scale
(a (1, block_n) row). INT8 weights are stored with the implicit zero 128 and become int8 in VMEM. FP8 dots need
an MXU with FP8 support (v7); mixed E4M3 x E5M2 is widened to bfloat16 (exact).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lowbit_jax.kernels import common
from lowbit_jax.kernels.blocks import BlockSizes
from lowbit_jax.kernels.common import Platform
from lowbit_jax.kernels.qmatmul import reference as weight_only
from lowbit_jax.kernels.w8a8 import plan as plan_mod
from lowbit_jax.qarray import QArray

PLATFORM = Platform.TPU


def _kernel(x_ref, sx_ref, c_ref, sw_ref, o_ref, acc_ref, *, plan: plan_mod.Plan):
  """One (n, m, k) grid step: acc += xq_tile @ w_tile; at the last step out = acc * sx * sw."""
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  codes = c_ref[...]
  wt = plan_mod.weight_tile(codes, plan, x_ref.dtype)
  xt = plan_mod.act_tile(x_ref[...], wt.dtype, plan)
  acc_ref[...] += jnp.dot(xt, wt, preferred_element_type=plan.acc_dtype)

  @pl.when(k == plan.steps - 1)
  def _out():
    out = acc_ref[...].astype(jnp.float32) * sx_ref[...] * sw_ref[...]
    o_ref[...] = out.astype(o_ref.dtype)


def _forward(x, w: QArray, *, plan: plan_mod.Plan, interpret: bool):
  """The pallas_call: x (..., K) float -> (..., N) in x.dtype."""
  xq, sx, codes, sw = plan_mod.operands(x, w, plan)
  b = plan.blocks
  bm, bn, tk = b.block_m, b.block_n, b.block_k
  out = pl.pallas_call(
      functools.partial(_kernel, plan=plan),
      out_shape=jax.ShapeDtypeStruct((plan.m_pad, plan.n), x.dtype),
      grid=(plan.n // bn, plan.m_pad // bm, plan.steps),
      in_specs=[pl.BlockSpec((bm, tk), lambda n, i, k: (i, k)),
                pl.BlockSpec((bm, 1), lambda n, i, k: (i, 0)),
                pl.BlockSpec((tk, bn), lambda n, i, k: (k, n)),
                pl.BlockSpec((1, bn), lambda n, i, k: (0, n))],
      out_specs=pl.BlockSpec((bm, bn), lambda n, i, k: (i, n)),
      scratch_shapes=[pltpu.VMEM((bm, bn), plan.acc_dtype)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(xq, sx, codes, sw)
  return out[:plan.m].reshape(x.shape[:-1] + (plan.n,))


def why_not(x, w: QArray, blocks: BlockSizes | None = None, *, per_token: bool = True) -> str | None:
  """None when the kernel handles (x, w) with `blocks` (None: the heuristic's), else the reason."""
  made = plan_mod.make_plan(PLATFORM, x.shape, x.dtype, w, blocks, per_token)
  return made if isinstance(made, str) else None


def w8a8_matmul(x, w: QArray, *, per_token: bool = True, blocks: BlockSizes | None = None,
                interpret: bool = False):
  """`reference.w8a8_matmul` with the TPU kernel; STE gradient. Raises ValueError when the kernel does not apply."""
  made = plan_mod.make_plan(PLATFORM, x.shape, x.dtype, w, blocks, per_token)
  if isinstance(made, str):
    raise ValueError(f"w8a8_matmul (Pallas TPU): {made}")
  fwd = functools.partial(_forward, plan=made, interpret=interpret)
  return common.with_reference_vjp(fwd, weight_only.qmatmul)(x, w)
