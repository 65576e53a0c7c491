"""What the weight-only kernels need to know about a QArray, decided once in Python before tracing a kernel.

`make_plan` checks legality (format, dtype, tiling) and returns a `Plan` or the reason there is none; `operands`
turns (x, w) into the kernel's arrays. Both Pallas families (`pallas_gpu.py`, `pallas_tpu.py`) share it, so
their fallback reasons agree.

Kernel coverage: INT with 8/4/2-bit codes (symmetric, zero points or float offsets; per-channel, per-tensor or
per-group), ternary (2-bit), NF4 (4-bit, double-quantized scales resolved outside the kernel) and FP8 weights
(E4M3/E5M2 codes, no packing). 3-bit INT is stored as two bit planes of different chunk counts, so a K tile of one
plane does not line up with a K tile of the other: it stays on the reference. Activations: float32 / bfloat16 (and
float16 on the GPU).
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from lowbit_jax.formats import packing
from lowbit_jax.kernels import blocks as blk
from lowbit_jax.kernels.common import Platform, pad_to, round_up
from lowbit_jax.qarray import QArray
from lowbit_jax.spec import Format

_X_DTYPES = {Platform.GPU: (jnp.float32, jnp.bfloat16, jnp.float16), Platform.TPU: (jnp.float32, jnp.bfloat16)}
_FP8 = (Format.FP8_E4M3, Format.FP8_E5M2)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static description of one weight-only matmul: the weight's layout and the tiling.

  `p` chunks of `kc` code rows each (the fields of a packed byte, `width` bits apiece), `group` code rows per
  scale (None when there is one scale row: per-channel / per-tensor, applied once to the f32 accumulator).
  """
  fmt: Format
  bits: int
  symmetric: bool
  p: int
  width: int
  kc: int
  k_pad: int
  n: int
  group: int | None
  m: int
  m_pad: int
  blocks: blk.BlockSizes

  @property
  def steps(self) -> int:
    """K steps (byte-row tiles) over the whole chunk."""
    return self.kc // self.blocks.block_k

  @property
  def rows_per_tile(self) -> int:
    """Scale rows one K tile of one chunk spans (1 when the tile lies inside a group)."""
    return max(1, self.blocks.block_k // self.group) if self.group else 1


def make_plan(platform: Platform, x_shape, x_dtype, w: QArray, blocks: blk.BlockSizes | None) -> Plan | str:
  """A legal Plan for `x @ w` on `platform`, or the reason there is none."""
  spec = w.spec
  if np.dtype(x_dtype) not in [np.dtype(d) for d in _X_DTYPES[platform]]:
    return f"activations of dtype {np.dtype(x_dtype)} are not supported on {platform.name}"
  if spec.format in _FP8:
    p, width = 1, 8
  else:
    planes = packing.planes(spec.bits)
    if len(planes) != 1:
      return f"{spec.bits}-bit codes are stored as {len(planes)} bit planes; no kernel reads them"
    width = planes[0]
    p = 8 // width
  k_pad, n = w.k_pad, w.shape[1]
  group = w.group_len if w.n_groups > 1 else None
  m = math.prod(x_shape[:-1])
  problem = dict(m=m, n=n, kc=k_pad // p, p=p, group=group, x_bytes=np.dtype(x_dtype).itemsize)
  b = blk.choose(platform, blocks, **problem)
  if isinstance(b, str):
    return b
  return Plan(fmt=spec.format, bits=spec.bits, symmetric=w.zero is None, p=p, width=width, kc=k_pad // p,
              k_pad=k_pad, n=n, group=group, m=m, m_pad=round_up(max(m, 1), b.block_m), blocks=b)


def operands(x, w: QArray, plan: Plan):
  """(x (M_pad, K_pad) in x.dtype, codes, scale f32 (G, N), zero f32 (G, N) or None). Kernels compute
  ``(code - zero) * scale``; a float offset m (``code * scale + m``) enters as the float zero ``-m / scale``
  (scales are never 0, see formats/integer.py), equal to the reference's decode up to float rounding."""
  x2 = pad_to(x.reshape(plan.m, x.shape[-1]), (plan.m_pad, plan.k_pad))
  g = w.n_groups
  scale = jnp.broadcast_to(w.scale_values(), (g, plan.n))
  zero = None if w.zero is None else jnp.broadcast_to(w.zero.astype(jnp.float32), (g, plan.n))
  if zero is not None and w.spec.float_offset:
    zero = -zero / scale
  return x2, w.codes, scale, zero
