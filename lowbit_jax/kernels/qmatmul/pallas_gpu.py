"""Weight-only qmatmul as a Pallas Triton kernel (CUDA GPUs): packed codes decoded in registers.

Grid (split_k, N tiles, M tiles), every program independent (Triton runs the grid in parallel): a program loops
over its share of the K steps, loads `block_k` packed byte rows (`block_n` wide), splits each byte into its `p`
fields (field j holds code rows j * K_pad/p + i, the split-chunk layout) and accumulates
``x[:, chunk j rows] @ dequant(field_j)`` in f32 registers on the tensor cores. Per-group scales (and zero points)
are applied to the decoded tile; a single scale row is applied once to the accumulator. With split-K (decode:
too few N tiles to fill the SMs), each split writes an f32 partial sum and XLA adds them.

Numerics as the TPU kernel: decode in f32, cast to x.dtype for the dot (float32 activations use IEEE f32 dots,
not TF32), f32 accumulation. No Mosaic GPU (Hopper wgmma) variant yet: see benchmarks/RESULTS.md.
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
from lowbit_jax.kernels.qmatmul import plan as plan_mod, reference
from lowbit_jax.qarray import QArray

PLATFORM = Platform.GPU


def _kernel(x_ref, c_ref, s_ref, *rest, plan: plan_mod.Plan):
  """One (split, n, m) program: x_ref (bm, K_pad), c_ref (K_pad/p, bn), s_ref/z_ref (G, bn), o_ref."""
  z_ref, o_ref = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0])
  b, p, kc = plan.blocks, plan.p, plan.kc
  tk, r = b.block_k, plan.rows_per_tile
  per_split = plan.steps // b.split_k
  first = pl.program_id(0) * per_split
  prec = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

  def step(t, acc):
    row = pl.multiple_of((first + t) * tk, tk)
    packed = c_ref[pl.ds(row, tk), :]
    for j in range(p):
      start = pl.multiple_of(j * kc + row, tk)
      codes = packed if packed.dtype != jnp.uint8 else common.plane_field(packed, j, plan.width)
      vals = common.decode_codes(codes, plan.fmt, plan.bits, plan.symmetric)
      if plan.group:
        g0 = lax.div(start, plan.group)
        if z_ref is not None:
          vals = vals - common.expand_rows(z_ref[pl.ds(g0, r), :], tk)
        vals = vals * common.expand_rows(s_ref[pl.ds(g0, r), :], tk)
      elif z_ref is not None:
        vals = vals - z_ref[...]
      xj = x_ref[:, pl.ds(start, tk)]
      acc = acc + jnp.dot(xj, vals.astype(xj.dtype), preferred_element_type=jnp.float32, precision=prec)
    return acc

  acc = lax.fori_loop(0, per_split, step, jnp.zeros((b.block_m, b.block_n), jnp.float32))
  if not plan.group:
    acc = acc * s_ref[...]
  o_ref[...] = acc.astype(o_ref.dtype)


def _compiler_params(plan: plan_mod.Plan):
  b = plan.blocks
  warps = 4 if b.block_m * b.block_n <= 64 * 64 else 8
  return plgpu.CompilerParams(num_warps=warps, num_stages=3 if plan.m <= 64 else 2)


def _forward(x, w: QArray, *, plan: plan_mod.Plan, interpret: bool):
  """The pallas_call: x (..., K) @ w -> (..., N) in x.dtype."""
  x2, codes, scale, zero = plan_mod.operands(x, w, plan)
  b, split = plan.blocks, plan.blocks.split_k
  bm, bn = b.block_m, b.block_n
  side = [scale] + ([] if zero is None else [zero])
  in_specs = [pl.BlockSpec((bm, plan.k_pad), lambda s, n, i: (i, 0)),
              pl.BlockSpec((codes.shape[0], bn), lambda s, n, i: (0, n))]
  in_specs += [pl.BlockSpec((scale.shape[0], bn), lambda s, n, i: (0, n))] * len(side)
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
      in_specs=in_specs,
      out_specs=out_spec,
      compiler_params=_compiler_params(plan),
      interpret=interpret,
  )(x2, codes, *side)
  if split > 1:
    out = jnp.sum(out, axis=0).astype(x.dtype)
  return out[:plan.m].reshape(x.shape[:-1] + (plan.n,))


def why_not(x, w: QArray, blocks: BlockSizes | None = None) -> str | None:
  """None when the kernel handles (x, w) with `blocks` (None: the heuristic's), else the reason."""
  made = plan_mod.make_plan(PLATFORM, x.shape, x.dtype, w, blocks)
  return made if isinstance(made, str) else None


def qmatmul(x, w: QArray, *, blocks: BlockSizes | None = None, interpret: bool = False):
  """``x @ w`` (the spec: `reference.qmatmul`) with the Triton kernel; differentiable (the reference's VJP).

  Raises ValueError naming the reason when the kernel does not handle (x, w, blocks).
  """
  made = plan_mod.make_plan(PLATFORM, x.shape, x.dtype, w, blocks)
  if isinstance(made, str):
    raise ValueError(f"qmatmul (Pallas GPU): {made}")
  fwd = functools.partial(_forward, plan=made, interpret=interpret)
  return common.with_reference_vjp(fwd, reference.qmatmul)(x, w)
