"""W8A8 (int8 x int8 -> int32) and FP8 x FP8 Pallas kernels equal the jnp reference (interpret mode on the CPU),
and the reference's activation quantizer meets its bounds."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import kernels
from lowbit_jax.kernels import Backend, BlockSizes, Platform
from lowbit_jax.kernels.qmatmul import reference as weight_only
from lowbit_jax.kernels.w8a8 import pallas_gpu, pallas_tpu, reference
from lowbit_jax.spec import Format
from seeds import random_case

# As a fraction of max |reference|: the int32 contraction is exact, f32 FP8 products are exact; what remains is
# the order of the f32 scale products (f32) and the output rounding (bf16).
REL_TOL = {np.dtype(jnp.float32): 1e-5, np.dtype(jnp.bfloat16): 1e-2}
SPECS = {
    "int8_channel": lb.int_spec(8),
    "int8_tensor_bf16": lb.QuantSpec(format=Format.INT, bits=8, granularity=lb.PerTensor(),
                                     scale_dtype=jnp.bfloat16),
    "fp8_e4m3_tensor": lb.fp8_spec(Format.FP8_E4M3),
    "fp8_e4m3_channel": lb.fp8_spec(Format.FP8_E4M3, per_channel=True),
    "fp8_e5m2_channel": lb.fp8_spec(Format.FP8_E5M2, per_channel=True),
}
MODULES = {Platform.GPU: pallas_gpu, Platform.TPU: pallas_tpu}
_reference = jax.jit(reference.w8a8_matmul, static_argnames="per_token")   # one compile per case


def _case(name, k, n, x_shape, dtype, seed=0):
  return random_case(SPECS[name], k, n, x_shape, dtype, name, seed)


def assert_matches(got, ref, dtype, rel=None):
  got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
  scale = float(np.max(np.abs(ref)))
  assert scale > 0 and np.all(np.isfinite(got))
  np.testing.assert_allclose(got, ref, rtol=0, atol=(rel or REL_TOL[np.dtype(dtype)]) * scale)


@pytest.mark.parametrize("platform", list(Platform))
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_kernel_equals_reference(name, per_token, platform):
  dtype = jnp.bfloat16 if per_token else jnp.float32
  x, w = _case(name, 512, 144, (2, 5), dtype)
  mod = MODULES[platform]
  assert mod.why_not(x, w, per_token=per_token) is None
  got = mod.w8a8_matmul(x, w, per_token=per_token, interpret=True)
  assert got.shape == (2, 5, 144) and got.dtype == dtype
  assert_matches(got, _reference(x, w, per_token=per_token), dtype)


@pytest.mark.parametrize("platform,blocks", [(Platform.GPU, BlockSizes(16, 64, 64, 2)),
                                             (Platform.TPU, BlockSizes(32, 128, 128, 1))])
def test_multistep_tiling(platform, blocks):
  x, w = _case("int8_channel", 512, 256, (40,), jnp.bfloat16, seed=1)
  got = MODULES[platform].w8a8_matmul(x, w, blocks=blocks, interpret=True)
  assert_matches(got, _reference(x, w), jnp.bfloat16)


def test_reference_is_close_to_the_weight_only_product():
  for name in SPECS:
    x, w = _case(name, 512, 64, (8,), jnp.float32, seed=2)
    # int8 activations: ~1/254 of absmax per element; E4M3: 2**-4 relative.
    rel = 2e-2 if SPECS[name].format is Format.INT else 6e-2
    assert_matches(_reference(x, w), jax.jit(weight_only.qmatmul)(x, w), jnp.float32, rel=rel)


def test_activation_quantizer():
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 64)) * jnp.array([[1.0], [10.0], [0.0], [1e-3]])
  q, s = reference.quantize_activations(x, Format.INT)
  assert q.dtype == jnp.int8 and s.shape == (4, 1)
  assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 127
  assert np.all(np.abs(np.asarray(q, np.float32) * np.asarray(s) - np.asarray(x)) <= np.asarray(s) / 2 + 1e-7)
  assert float(s[2, 0]) == 1.0   # an all-zero row stays finite
  q8, s8 = reference.quantize_activations(x * 1e4, Format.FP8_E4M3, per_token=False)
  assert q8.dtype == jnp.float8_e4m3fn and s8.shape == (1, 1) and np.all(np.isfinite(np.asarray(q8, np.float32)))


@pytest.mark.parametrize("platform", list(Platform))
def test_grad_is_the_straight_through_reference(platform):
  x, w = _case("fp8_e4m3_channel", 256, 128, (3,), jnp.float32, seed=4)
  f = lambda x: jnp.sum(jnp.tanh(kernels.w8a8_matmul(x, w, backend=Backend.PALLAS, platform=platform,
                                                       interpret=True)))
  r = lambda x: jnp.sum(jnp.tanh(reference.w8a8_matmul(x, w)))
  assert_matches(jax.grad(f)(x), jax.grad(r)(x), jnp.float32)
  assert kernels.last_decision().backend is Backend.PALLAS
