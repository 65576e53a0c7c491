"""Weight-only Pallas kernels (Triton and Mosaic TPU, interpret mode on the CPU) equal the jnp reference.

Fresh random weights and activations per case; odd M (partial M tiles), leading batch dims, K padded to whole
groups, N without a 128-multiple (a full-width TPU block, 16-wide GPU blocks), multi-step K with split-K, and
tiles smaller and larger than a group. Tolerances keyed by the activation dtype, relative to the output's scale.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import kernels
from lowbit_jax.kernels import Backend, BlockSizes, Platform
from lowbit_jax.kernels.qmatmul import pallas_gpu, pallas_tpu, reference
from lowbit_jax.spec import Format
from seeds import random_case

# Kernel outputs vs the reference, as a fraction of max |reference|: f32 differs by summation order only;
# bf16 by rounding the dequantized tile and the output to bf16.
REL_TOL = {np.dtype(jnp.float32): 2e-5, np.dtype(jnp.bfloat16): 2e-2}

SPECS = {
    "int8_channel": lb.int_spec(8),
    "int8_g128_asym": lb.int_spec(8, group_size=128, symmetric=False),
    "int4_g128": lb.int_spec(4, group_size=128),
    "int4_g32_asym_bf16": lb.int_spec(4, group_size=32, symmetric=False, scale_dtype=jnp.bfloat16),
    "int4_channel_asym": lb.int_spec(4, symmetric=False),
    "int2_g64_asym": lb.int_spec(2, group_size=64, symmetric=False),
    "int4_g32_q4_1": lb.q4_1_spec(),                      # float offsets enter the kernels as float zeros
    "int4_channel_float_offset": lb.int_spec(4, symmetric=False, zero_point=lb.ZeroPoint.FLOAT),
    "int4_g32_signed_max": lb.int_spec(4, group_size=32, grid=lb.SymGrid.SIGNED_MAX),   # negative scales
    "ternary_tensor": lb.ternary_spec(),
    "ternary_channel": lb.ternary_spec(per_channel=True),
    "nf4_dq": lb.nf4_spec(),
    "nf4_nodq": lb.nf4_spec(double_quant=False),
    "fp8_e4m3_tensor": lb.fp8_spec(Format.FP8_E4M3),
    "fp8_e5m2_channel": lb.fp8_spec(Format.FP8_E5M2, per_channel=True),
}
MODULES = {Platform.GPU: pallas_gpu, Platform.TPU: pallas_tpu}
_reference = jax.jit(reference.qmatmul)   # one compile per case instead of every op of the reference


def _case(name, k, n, x_shape, dtype, seed=0):
  return random_case(SPECS[name], k, n, x_shape, dtype, name, seed)


def assert_matches(got, ref, dtype):
  got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
  scale = float(np.max(np.abs(ref)))
  assert scale > 0 and np.all(np.isfinite(got))
  np.testing.assert_allclose(got, ref, rtol=0, atol=REL_TOL[np.dtype(dtype)] * scale)


# Every format in bfloat16 (the serving dtype) on both kernel families; float32 on a subset covering each decode.
F32_CASES = ("int8_g128_asym", "int2_g64_asym", "nf4_nodq", "fp8_e4m3_tensor", "int4_channel_asym",
             "int4_channel_float_offset")
CASES = [(name, jnp.bfloat16) for name in sorted(SPECS)] + [(name, jnp.float32) for name in F32_CASES]


@pytest.mark.parametrize("platform", list(Platform))
@pytest.mark.parametrize("name,dtype", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_kernel_equals_reference(name, dtype, platform):
  # Grouped: K = 1000 pads to 1024 (whole groups); one scale row: K = 1024 (an unpadded K whose chunk has no
  # legal tile falls back, see test_kernels_dispatch). N = 144 = 16 * 9: no 128-multiple.
  k = 1000 if SPECS[name].group_size else 1024
  x, w = _case(name, k, 144, (5,), dtype)
  mod = MODULES[platform]
  assert mod.why_not(x, w) is None
  got = mod.qmatmul(x, w, interpret=True)
  assert got.shape == (5, 144) and got.dtype == x.dtype
  assert_matches(got, _reference(x, w), dtype)


# Explicit tilings: several K steps, several M and N tiles, split-K, tiles inside a group and tiles of many groups.
TILINGS = [
    (Platform.GPU, "int4_g128", BlockSizes(16, 32, 64, 2)),        # block_k < group, split-K over 8 steps
    (Platform.GPU, "int4_g32_asym_bf16", BlockSizes(32, 16, 128, 1)),  # 4 groups per tile
    (Platform.GPU, "nf4_dq", BlockSizes(16, 16, 32, 4)),          # tile == group (64 -> 32: inside a group)
    (Platform.GPU, "ternary_channel", BlockSizes(16, 64, 64, 2)),
    (Platform.TPU, "int4_g128", BlockSizes(16, 128, 128, 1)),     # 4 K steps, tile == group
    (Platform.TPU, "int2_g64_asym", BlockSizes(16, 128, 128, 1)),  # 2 groups per tile
    (Platform.TPU, "int8_channel", BlockSizes(32, 128, 256, 1)),
    (Platform.TPU, "fp8_e5m2_channel", BlockSizes(16, 256, 512, 1)),
]


@pytest.mark.parametrize("platform,name,blocks", TILINGS, ids=lambda v: getattr(v, "name", str(v)))
def test_explicit_tilings(platform, name, blocks):
  x, w = _case(name, 1024, 256, (2, 17), jnp.bfloat16, seed=1)
  mod = MODULES[platform]
  assert mod.why_not(x, w, blocks) is None, mod.why_not(x, w, blocks)
  got = mod.qmatmul(x, w, blocks=blocks, interpret=True)
  assert got.shape == (2, 17, 256)
  assert_matches(got, _reference(x, w), jnp.bfloat16)


@pytest.mark.parametrize("platform", list(Platform))
def test_grad_matches_reference(platform):
  x, w = _case("int4_g32_asym_bf16", 256, 64, (3,), jnp.float32, seed=2)

  def loss(fn, x, w):
    return jnp.sum(jnp.sin(fn(x, w)))

  kern = lambda x, w: kernels.qmatmul(x, w, backend=Backend.PALLAS, platform=platform, interpret=True)
  gx, gw = jax.grad(loss, argnums=(1, 2), allow_int=True)(kern, x, w)
  rx, rw = jax.grad(loss, argnums=(1, 2), allow_int=True)(reference.qmatmul, x, w)
  assert kernels.last_decision().backend is Backend.PALLAS
  assert_matches(gx, rx, jnp.float32)
  assert gw.scale.dtype == jnp.bfloat16   # cotangents in the leaf dtype: compare at its tolerance
  assert_matches(gw.scale, rw.scale, gw.scale.dtype)


def test_jit_and_vmap_free_leading_dims():
  x, w = _case("nf4_dq", 512, 128, (2, 3), jnp.bfloat16, seed=3)
  f = jax.jit(lambda x, w: kernels.qmatmul(x, w, backend=Backend.PALLAS, platform=Platform.TPU, interpret=True))
  assert_matches(f(x, w), _reference(x, w), jnp.bfloat16)


@pytest.mark.parametrize("name", ["int4_channel_asym", "ternary_tensor"])
def test_tpu_whole_chunk_step(name):
  # K = 1000 unpadded: the chunk (500 or 250 code rows) has no 128-multiple tile; one full-chunk K step instead.
  x, w = _case(name, 1000, 256, (3,), jnp.float32, seed=5)
  assert pallas_tpu.plan_mod.make_plan(Platform.TPU, x.shape, x.dtype, w, None).blocks.block_k == w.k_pad // (
      8 // w.spec.bits)
  assert_matches(pallas_tpu.qmatmul(x, w, interpret=True), _reference(x, w), jnp.float32)
  assert "power-of-two block_k" in pallas_gpu.why_not(x, w)
