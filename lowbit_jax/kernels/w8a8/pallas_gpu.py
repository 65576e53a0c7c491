"""w8a8 matmul as a Pallas Triton kernel: int8 x int8 -> int32 (IMMA) or FP8 x FP8 -> f32 (Hopper/Ada FP8 MMA).

Grid (split_k, N tiles, M tiles), each program loops over its K steps with an int32 / f32 register accumulator,
then scales by the per-token activation scale and the per-channel weight scale. With split-K each split writes
an f32 partial (the scales distribute over the sum) and XLA adds them. INT8 weights (implicit zero 128) are
turned into int8 in registers; mixed E4M3 x E5M2 is widened to bfloat16 (exact).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lowbit_jax.kernels import common
from lowbit_jax.kernels.blocks import BlockSizes
from lowbit_jax.kernels.common import Platform
from lowbit_jax.kernels.qmatmul import reference as weight_only
from lowbit_jax.kernels.w8a8 import plan as plan_mod
from lowbit_jax.qarray import QArray

PLATFORM = Platform.GPU


def _kernel(x_ref, sx_ref, c_ref, sw_ref, o_ref, *, plan: plan_mod.Plan):
  """One (split, n, m) program: x_ref (bm, K_pad) 8-bit, sx_ref (bm, 1), c_ref (K_pad, bn), sw_ref (1, bn)."""
  b = plan.blocks
  tk, per_split = b.block_k, plan.steps // b.split_k
  first = pl.program_id(0) * per_split

  def step(t, acc):
    row = pl.multiple_of((first + t) * tk, tk)
    wt = plan_mod.weight_tile(c_ref[pl.ds(row, tk), :], plan, x_ref.dtype)
    xt = plan_mod.act_tile(x_ref[:, pl.ds(row, tk)], wt.dtype, plan)
    return acc + jnp.dot(xt, wt, preferred_element_type=plan.acc_dtype)

  acc = lax.fori_loop(0, per_split, step, jnp.zeros((b.block_m, b.block_n), plan.acc_dtype))
  out = acc.astype(jnp.float32) * sx_ref[...] * sw_ref[...]
  o_ref[...] = out.astype(o_ref.dtype)


def _forward(x, w: QArray, *, plan: plan_mod.Plan, interpret: bool):
  """The pallas_call: x (..., K) float -> (..., N) in x.dtype."""
  xq, sx, codes, sw = plan_mod.operands(x, w, plan)
  b, split = plan.blocks, plan.blocks.split_k
  bm, bn = b.block_m, b.block_n
  if split == 1:
    out_shape = jax.ShapeDtypeStruct((plan.m_pad, plan.n), x.dtype)
    out_spec = pl.BlockSpec((bm, bn), lambda s, n, i: (i, n))
  else:
    out_shape = jax.ShapeDtypeStruct((split, plan.m_pad, plan.n), jnp.float32)
    out_spec = pl.BlockSpec((pl.squeezed, bm, bn), lambda s, n, i: (s, i, n))
  out = pl.pallas_call(
      functools.partial(_kernel, plan=plan),
      out_shape=out_shape,
      grid=(split, plan.n // bn, plan.m_pad // bm),
      in_specs=[pl.BlockSpec((bm, plan.k_pad), lambda s, n, i: (i, 0)),
                pl.BlockSpec((bm, 1), lambda s, n, i: (i, 0)),
                pl.BlockSpec((plan.k_pad, bn), lambda s, n, i: (0, n)),
                pl.BlockSpec((1, bn), lambda s, n, i: (0, n))],
      out_specs=out_spec,
      compiler_params=plgpu.CompilerParams(num_warps=4 if bm * bn <= 64 * 64 else 8,
                                           num_stages=3 if plan.m <= 64 else 2),
      interpret=interpret,
  )(xq, sx, codes, sw)
  if split > 1:
    out = jnp.sum(out, axis=0).astype(x.dtype)
  return out[:plan.m].reshape(x.shape[:-1] + (plan.n,))


def why_not(x, w: QArray, blocks: BlockSizes | None = None, *, per_token: bool = True) -> str | None:
  """None when the kernel handles (x, w) with `blocks` (None: the heuristic's), else the reason."""
  made = plan_mod.make_plan(PLATFORM, x.shape, x.dtype, w, blocks, per_token)
  return made if isinstance(made, str) else None


def w8a8_matmul(x, w: QArray, *, per_token: bool = True, blocks: BlockSizes | None = None,
                interpret: bool = False):
  """`reference.w8a8_matmul` with the Triton kernel; STE gradient. Raises ValueError when it does not apply."""
  made = plan_mod.make_plan(PLATFORM, x.shape, x.dtype, w, blocks, per_token)
  if isinstance(made, str):
    raise ValueError(f"w8a8_matmul (Pallas GPU): {made}")
  fwd = functools.partial(_forward, plan=made, interpret=interpret)
  return common.with_reference_vjp(fwd, weight_only.qmatmul)(x, w)
