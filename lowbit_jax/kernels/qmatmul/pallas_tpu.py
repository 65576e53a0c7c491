"""Weight-only qmatmul as a Pallas Mosaic TPU kernel: packed codes are read from HBM and decoded in VMEM.

Grid (N tiles, M tiles, K steps), K last and sequential: each step reads `block_k` packed byte rows, splits every
byte into its `p` fields (field j holds code rows j * K_pad/p + i, the split-chunk layout) and accumulates
``x_j @ dequant(field_j)`` into an f32 VMEM accumulator, where `x_j` is the matching contiguous chunk of the
activations (x is passed once per chunk with an offset index map, so nothing is interleaved; when the chunk length
K_pad/p has no 128-multiple tile, one K step covers the chunk and x goes in as a (p, M, K_pad/p) copy).
Per-group scales (and zero points) are applied to the decoded tile; a single scale row (per-channel /
per-tensor) is applied once to the accumulator at the last step. Numerics: the tile is decoded in f32 and cast
to x.dtype for the MXU (integer codes are exact in bfloat16; NF4 levels times scales round to bfloat16),
accumulation in f32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lowbit_jax.kernels import common
from lowbit_jax.kernels.blocks import BlockSizes
from lowbit_jax.kernels.common import Platform
from lowbit_jax.kernels.qmatmul import plan as plan_mod, reference
from lowbit_jax.qarray import QArray

PLATFORM = Platform.TPU


def _kernel(*refs, plan: plan_mod.Plan, grouped_refs: int):
  """One (n, m, k) grid step; refs = x chunks (p), codes, scale refs (p or 1), zero refs (0, p or 1), out, acc."""
  p, tk = plan.p, plan.blocks.block_k
  x_refs, c_ref = refs[:p], refs[p]
  s_refs = refs[p + 1:p + 1 + grouped_refs]
  z_refs = refs[p + 1 + grouped_refs:-2]
  o_ref, acc_ref = refs[-2], refs[-1]
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  packed = c_ref[...]
  acc = acc_ref[...]
  prec = lax.Precision.HIGHEST if x_refs[0].dtype == jnp.float32 else None
  for j in range(p):
    codes = packed if packed.dtype != jnp.uint8 else common.plane_field(packed, j, plan.width)   # FP8: as is
    vals = common.decode_codes(codes, plan.fmt, plan.bits, plan.symmetric)
    if z_refs:
      vals = vals - common.expand_rows(z_refs[j if plan.group else 0][...], tk)
    if plan.group:
      vals = vals * common.expand_rows(s_refs[j][...], tk)
    xj = x_refs[j][...]
    acc = acc + jnp.dot(xj, vals.astype(xj.dtype), preferred_element_type=jnp.float32, precision=prec)
  acc_ref[...] = acc

  @pl.when(k == plan.steps - 1)
  def _out():
    out = acc_ref[...]
    if not plan.group:
      out = out * s_refs[0][...]
    o_ref[...] = out.astype(o_ref.dtype)


def _forward(x, w: QArray, *, plan: plan_mod.Plan, interpret: bool):
  """The pallas_call: x (..., K) @ w -> (..., N) in x.dtype."""
  x2, codes, scale, zero = plan_mod.operands(x, w, plan)
  b, p, kc, steps = plan.blocks, plan.p, plan.kc, plan.steps
  bm, bn, tk = b.block_m, b.block_n, b.block_k
  if tk % 128 == 0:   # x once per chunk, each with the chunk's offset: no copy of x
    x_args = [x2] * p
    x_specs = [pl.BlockSpec((bm, tk), lambda n, i, k, j=j: (i, j * steps + k)) for j in range(p)]
  else:                # block_k == K_pad/p, not lane-aligned: (p, M, K_pad/p) makes it a full-dim block
    x_args = [x2.reshape(plan.m_pad, p, kc).transpose(1, 0, 2)] * p
    x_specs = [pl.BlockSpec((pl.squeezed, bm, tk), lambda n, i, k, j=j: (j, i, k)) for j in range(p)]
  c_spec = pl.BlockSpec((tk, bn), lambda n, i, k: (k, n))
  if plan.group:
    r = plan.rows_per_tile
    span = r * plan.group   # code rows per reshaped scale block

    def row_spec(j):
      return pl.BlockSpec((pl.squeezed, r, bn), lambda n, i, k, j=j: (lax.div(j * kc + k * tk, span), 0, n))

    g = scale.shape[0]
    side = [scale.reshape(g // r, r, plan.n)] * p
    specs = [row_spec(j) for j in range(p)]
    if zero is not None:
      side += [zero.reshape(g // r, r, plan.n)] * p
      specs += [row_spec(j) for j in range(p)]
    n_scale_refs = p
  else:
    side = [scale] + ([] if zero is None else [zero])
    specs = [pl.BlockSpec((1, bn), lambda n, i, k: (0, n))] * len(side)
    n_scale_refs = 1
  out = pl.pallas_call(
      functools.partial(_kernel, plan=plan, grouped_refs=n_scale_refs),
      out_shape=jax.ShapeDtypeStruct((plan.m_pad, plan.n), x.dtype),
      grid=(plan.n // bn, plan.m_pad // bm, steps),
      in_specs=x_specs + [c_spec] + specs,
      out_specs=pl.BlockSpec((bm, bn), lambda n, i, k: (i, n)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(*x_args, codes, *side)
  return out[:plan.m].reshape(x.shape[:-1] + (plan.n,))


def why_not(x, w: QArray, blocks: BlockSizes | None = None) -> str | None:
  """None when the kernel handles (x, w) with `blocks` (None: the heuristic's), else the reason."""
  made = plan_mod.make_plan(PLATFORM, x.shape, x.dtype, w, blocks)
  return made if isinstance(made, str) else None


def qmatmul(x, w: QArray, *, blocks: BlockSizes | None = None, interpret: bool = False):
  """``x @ w`` (the spec: `reference.qmatmul`) with the TPU kernel; differentiable (the reference's VJP).

  Raises ValueError naming the reason when the kernel does not handle (x, w, blocks).
  """
  made = plan_mod.make_plan(PLATFORM, x.shape, x.dtype, w, blocks)
  if isinstance(made, str):
    raise ValueError(f"qmatmul (Pallas TPU): {made}")
  fwd = functools.partial(_forward, plan=made, interpret=interpret)
  return common.with_reference_vjp(fwd, reference.qmatmul)(x, w)
