"""Every Pallas kernel lowers for CUDA (Pallas Triton) and TPU (Mosaic) on a CPU-only host, at decode and prefill
shapes with the heuristic's tilings (split-K included). Abstract weights (eval_shape): nothing is allocated.

Lowering runs JAX's Pallas lowering and its checks (block-shape rules, supported primitives and dtypes); it does not
run Triton's or Mosaic's own compilers, which need the device.
"""
import functools

import jax
import jax.numpy as jnp
import pytest

import lowbit_jax as lb
from lowbit_jax.kernels import blocks as blk
from lowbit_jax.kernels import Platform
from lowbit_jax.kernels.qmatmul import pallas_gpu as qm_gpu, pallas_tpu as qm_tpu, plan as qm_plan
from lowbit_jax.kernels.w8a8 import pallas_gpu as w8_gpu, pallas_tpu as w8_tpu
from lowbit_jax.spec import Format

LOWERING = {Platform.GPU: "cuda", Platform.TPU: "tpu"}
CUSTOM_CALL = {Platform.GPU: "__gpu$xla.gpu.triton", Platform.TPU: "tpu_custom_call"}
WEIGHT_ONLY = {
    "w8a16_channel": lb.int_spec(8),
    "w4a16_g128": lb.int_spec(4, group_size=128),
    "w4a16_g128_asym": lb.int_spec(4, group_size=128, symmetric=False),
    "w4a16_g32": lb.int_spec(4, group_size=32),
    "w2a16_g64_asym": lb.int_spec(2, group_size=64, symmetric=False),
    "ternary": lb.ternary_spec(),
    "nf4_dq": lb.nf4_spec(),
    "fp8_e4m3": lb.fp8_spec(Format.FP8_E4M3),
}
W8A8 = {
    "int8_channel": lb.int_spec(8),
    "fp8_e4m3_tensor": lb.fp8_spec(Format.FP8_E4M3),
    "fp8_e5m2_channel": lb.fp8_spec(Format.FP8_E5M2, per_channel=True),
}
SHAPES = {"decode": (1, 4096, 4096), "prefill": (512, 4096, 11008), "down_proj": (16, 11008, 4096)}


def _abstract(spec, k, n):
  return jax.eval_shape(functools.partial(lb.quantize, spec=spec), jax.ShapeDtypeStruct((k, n), jnp.float32))


def _lower(fn, platform, x, w):
  text = jax.jit(fn).trace(x, w).lower(lowering_platforms=(LOWERING[platform],)).as_text()
  assert CUSTOM_CALL[platform] in text


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("platform", list(Platform))
@pytest.mark.parametrize("name", sorted(WEIGHT_ONLY))
def test_weight_only_lowers(name, platform, shape):
  m, k, n = SHAPES[shape]
  w = _abstract(WEIGHT_ONLY[name], k, n)
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
  mod = {Platform.GPU: qm_gpu, Platform.TPU: qm_tpu}[platform]
  assert mod.why_not(x, w) is None, mod.why_not(x, w)
  _lower(mod.qmatmul, platform, x, w)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("platform", list(Platform))
@pytest.mark.parametrize("name", sorted(W8A8))
def test_w8a8_lowers(name, platform, shape):
  m, k, n = SHAPES[shape]
  w = _abstract(W8A8[name], k, n)
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
  mod = {Platform.GPU: w8_gpu, Platform.TPU: w8_tpu}[platform]
  assert mod.why_not(x, w) is None, mod.why_not(x, w)
  _lower(mod.w8a8_matmul, platform, x, w)


def test_decode_uses_split_k_on_gpu_and_big_tiles_on_tpu():
  w = _abstract(lb.int_spec(4, group_size=128), 4096, 4096)
  x = jax.ShapeDtypeStruct((1, 4096), jnp.bfloat16)
  gpu = qm_plan.make_plan(Platform.GPU, x.shape, x.dtype, w, None)
  tpu = qm_plan.make_plan(Platform.TPU, x.shape, x.dtype, w, None)
  assert gpu.blocks.split_k > 1 and (4096 // gpu.blocks.block_n) * gpu.blocks.split_k >= blk.GPU_SMS
  assert tpu.blocks.split_k == 1 and tpu.blocks.block_k >= 512
  prefill = qm_plan.make_plan(Platform.GPU, (4096, 4096), x.dtype, w, None)
  assert prefill.blocks.split_k == 1 and prefill.blocks.block_m == 128


def test_gradient_lowers():
  w = _abstract(lb.int_spec(4, group_size=128), 1024, 512)
  x = jax.ShapeDtypeStruct((8, 1024), jnp.bfloat16)
  for platform, mod in ((Platform.GPU, qm_gpu), (Platform.TPU, qm_tpu)):
    grad = jax.grad(lambda x, w: jnp.sum(mod.qmatmul(x, w).astype(jnp.float32)))
    jax.jit(grad).trace(x, w).lower(lowering_platforms=(LOWERING[platform],))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_other_activation_dtypes_lower(dtype):
  w = _abstract(lb.int_spec(4, group_size=32, symmetric=False), 2048, 1024)
  x = jax.ShapeDtypeStruct((4, 2048), dtype)
  _lower(qm_gpu.qmatmul, Platform.GPU, x, w)
  if dtype == jnp.float32:
    _lower(qm_tpu.qmatmul, Platform.TPU, x, w)
  else:
    assert "float16" in qm_tpu.why_not(x, w)
