"""The jnp reference qmatmul (the spec every kernel must match) equals x @ w.dequantize()."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.kernels import Backend, qmatmul
from passhelpers import dequantized
from qhelpers import REGISTRY, quantize, tol
from seeds import stable_seed


@pytest.mark.parametrize("x_shape", [(1, 172), (5, 172), (2, 3, 172)])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_reference_equals_dequantized_dot(name, x_shape):
  kw, kx = jax.random.split(jax.random.PRNGKey(stable_seed(name)))
  w = quantize(jax.random.normal(kw, (172, 48)), REGISTRY[name])
  x = jax.random.normal(kx, x_shape)
  out = jax.jit(qmatmul)(x, w)
  ref = jnp.matmul(x, dequantized(w), precision=jax.lax.Precision.HIGHEST)
  assert out.shape == x_shape[:-1] + (48,) and out.dtype == x.dtype
  assert float(jnp.max(jnp.abs(ref))) > 0
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref))))


def test_bf16_activations_accumulate_in_f32():
  w = lb.quantize(jax.random.normal(jax.random.PRNGKey(0), (256, 64)), lb.int_spec(4, group_size=64))
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 256)).astype(jnp.bfloat16)
  out = qmatmul(x, w, backend=Backend.REFERENCE)
  assert out.dtype == jnp.bfloat16
  ref = x.astype(jnp.float32) @ w.dequantize()
  np.testing.assert_allclose(out.astype(jnp.float32), ref, **tol(jnp.bfloat16))


def test_bad_input():
  w = lb.quantize(jnp.ones((64, 8)), lb.int_spec(8))
  with pytest.raises(ValueError, match="contract"):
    qmatmul(jnp.ones((2, 63)), w)
  with pytest.raises(ValueError, match="QArray"):
    qmatmul(jnp.ones((2, 64)), jnp.ones((64, 8)))
  with pytest.raises(ValueError, match="floating"):
    qmatmul(jnp.ones((2, 64), jnp.int32), w)
  with pytest.raises(ValueError, match="2-D"):
    qmatmul(jnp.ones((2, 64)), lb.quantize(jnp.ones((3, 64, 8)), lb.int_spec(8)))
