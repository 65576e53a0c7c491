"""The weight-only reference decodes the weight one K-tile at a time: it still equals ``x @ w.dequantize()`` for
every format, and no float value in its jaxpr (forward, gradient, W8A8, LLM.int8()) is near the weight's size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.kernels.qmatmul import reference
from lowbit_jax.kernels.w8a8 import llm_int8, reference as w8_ref
from passhelpers import max_float_buffer
from qhelpers import REGISTRY, quantize
from seeds import stable_seed

# (name, spec, K, N): K = 512 tiles every registry format into several steps; the rest pad K (not a multiple of
# the group or of the packing) or make the last tile overlap the previous one (prime K, one scale row).
CASES = [(name, REGISTRY[name], 512, 48) for name in sorted(REGISTRY)] + [
    ("pad_int4_g128_asym", lb.int_spec(4, group_size=128, symmetric=False), 300, 40),
    ("pad_int3_g64", lb.int_spec(3, group_size=64), 300, 40),
    ("pad_nf4_dq", lb.nf4_spec(), 300, 40),
    ("pad_int2_g32_asym", lb.int_spec(2, group_size=32, symmetric=False), 172, 24),
    ("overlap_int8_channel", lb.int_spec(8), 1031, 24),
    ("overlap_fp8_e5m2", lb.fp8_spec(lb.Format.FP8_E5M2, per_channel=True), 1031, 24),
]


def _weight(name, spec, k, n):
  return quantize(jax.random.normal(jax.random.PRNGKey(stable_seed(name)), (k, n)), spec)


@jax.jit
def _both(xs, w):
  """The tiled reference and the dequantized dot, for every x in xs (one compile per case)."""
  deq = w.dequantize()
  return [(reference.qmatmul(x, w), jnp.matmul(x, deq, precision=jax.lax.Precision.HIGHEST)) for x in xs]


def _assert_close(out, ref, rtol=1e-5):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  scale = float(np.max(np.abs(ref)))
  assert scale > 0
  np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("name,spec,k,n", CASES, ids=[c[0] for c in CASES])
def test_tiled_reference_equals_dequantized_dot(name, spec, k, n):
  w = _weight(name, spec, k, n)
  xs = [jax.random.normal(jax.random.PRNGKey(stable_seed(f"{name}/x{m}")), (m, k)) for m in (1, 5)]
  for x, (out, ref) in zip(xs, _both(xs, w)):
    assert out.shape == (x.shape[0], n) and out.dtype == x.dtype
    _assert_close(out, ref)


def test_plan_is_group_aligned_and_bounded():
  for name, spec, k, n in CASES + [("big_int4", lb.int_spec(4, group_size=128), 4096, 8),
                                   ("big_int3", lb.int_spec(3, group_size=128), 11008, 8),
                                   ("big_int8", lb.int_spec(8), 4096, 8)]:
    w = jax.eval_shape(lambda s=spec, k=k, n=n: lb.quantize(jnp.zeros((k, n)), s))
    p = reference.plan(w)
    assert p.chunks * p.chunk_len == w.k_pad, name
    assert p.steps * p.rows >= p.chunk_len and (p.steps - 1) * p.rows < p.chunk_len, name
    if w.n_groups > 1:
      g = w.group_len
      assert p.exact, name
      assert p.rows <= max(g, w.k_pad // 8), name
      assert g % p.rows == 0 or (p.rows % g == 0 and p.chunk_len % g == 0), name
    else:
      assert p.rows <= max(w.k_pad // 8, 128), name
    if w.k_pad >= 4096:
      assert p.chunks * p.steps >= 8, name   # at least 8 float tiles for a big K


def test_stacked_weight_under_vmap_and_grad():
  spec = lb.int_spec(4, group_size=32, symmetric=False)
  ws = quantize(jax.random.normal(jax.random.PRNGKey(stable_seed("stack/w")), (3, 256, 40)), spec)
  xs = jax.random.normal(jax.random.PRNGKey(stable_seed("stack/x")), (3, 5, 256))
  out = jax.jit(jax.vmap(reference.qmatmul))(xs, ws)
  deq = jax.jit(lambda w: w.dequantize())(ws)                                   # (3, 256, 40)
  ref = jnp.einsum("bmk,bkn->bmn", xs, deq, precision=jax.lax.Precision.HIGHEST)
  _assert_close(out, ref)
  w0 = jax.tree.map(lambda a: a[0], ws)
  dx = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(reference.qmatmul(x, w0)))))(xs[0])
  dx_ref = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(
      jnp.matmul(x, deq[0], precision=jax.lax.Precision.HIGHEST)))))(xs[0])
  _assert_close(dx, dx_ref, rtol=1e-4)


# --- no float copy of the weight ----------------------------------------------------------------------------

def _abstract(spec, k=1024, n=1024):
  return jax.eval_shape(lambda: lb.quantize(jnp.zeros((k, n)), spec))


BIG = {"int4_g128": lb.int_spec(4, group_size=128), "nf4_dq": lb.nf4_spec(),
       "int3_g64": lb.int_spec(3, group_size=64), "int8_channel": lb.int_spec(8)}


def test_float_buffers_sees_a_dequantized_weight():
  w = _abstract(BIG["int4_g128"])
  x = jax.ShapeDtypeStruct((4, 1024), jnp.float32)
  assert max_float_buffer(jax.make_jaxpr(lambda x, w: x @ w.dequantize())(x, w)) >= w.size


@pytest.mark.parametrize("name", sorted(BIG))
def test_reference_holds_no_float_copy_of_the_weight(name):
  w = _abstract(BIG[name])
  x = jax.ShapeDtypeStruct((4, 1024), jnp.float32)
  fwd = jax.make_jaxpr(lambda x, w: reference.qmatmul(x, w))(x, w)
  assert max_float_buffer(fwd) < w.size // 4
  grad = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(reference.qmatmul(x, w))))(x, w)
  assert max_float_buffer(grad) < w.size // 4


def test_w8a8_and_llm_int8_hold_no_float_copy_of_the_weight():
  for spec in (lb.int_spec(8), lb.int_spec(8, group_size=64, symmetric=False),
               lb.fp8_spec(lb.Format.FP8_E4M3, per_channel=True)):
    w = _abstract(spec)
    x = jax.ShapeDtypeStruct((4, 1024), jnp.float32)
    for f in (w8_ref.w8a8_matmul, llm_int8.llm_int8_matmul):
      assert max_float_buffer(jax.make_jaxpr(lambda x, w, f=f: f(x, w))(x, w)) < w.size // 4


def test_compiled_temporaries_stay_below_a_quarter_of_the_float_weight():
  w = _abstract(BIG["int4_g128"])
  x = jax.ShapeDtypeStruct((4, 1024), jnp.float32)
  temp = jax.jit(reference.qmatmul).lower(x, w).compile().memory_analysis().temp_size_in_bytes
  assert temp < w.size * 4 // 4   # float32 bytes of the whole weight / 4
