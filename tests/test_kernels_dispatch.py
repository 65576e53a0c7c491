"""The dispatchers: AUTO falls back (recording why) and never errors on a valid QArray; PALLAS raises a clear error
when the kernel cannot run; bad inputs raise; every fallback reason is inspectable."""
import functools

import jax
import jax.numpy as jnp
import pytest

import lowbit_jax as lb
from lowbit_jax import kernels
from lowbit_jax.kernels import Backend, BlockSizes, Platform
from lowbit_jax.kernels.qmatmul import reference as qm_ref
from lowbit_jax.kernels.w8a8 import reference as w8_ref
from qhelpers import REGISTRY

OPS = {"qmatmul": kernels.qmatmul, "w8a8_matmul": kernels.w8a8_matmul}


@functools.lru_cache(maxsize=None)
def _w(spec, k=256, n=128, seed=0):
  return jax.jit(functools.partial(lb.quantize, spec=spec))(jax.random.normal(jax.random.PRNGKey(seed), (k, n)))


def test_auto_on_cpu_uses_the_reference_and_says_why():
  w = _w(lb.int_spec(4, group_size=64))
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 256))
  for op, fn in OPS.items():
    out = fn(x, w)
    d = kernels.last_decision()
    assert (d.op, d.backend, d.platform) == (op, Backend.REFERENCE, None)
    assert "interpret=True" in d.reason and "cpu" in d.reason
    ref = qm_ref.qmatmul(x, w) if op == "qmatmul" else w8_ref.w8a8_matmul(x, w)
    assert jnp.allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_pallas_without_a_device_or_interpret_raises():
  w, x = _w(lb.int_spec(8)), jnp.ones((2, 256))
  for fn in OPS.values():
    with pytest.raises(ValueError, match="Backend.PALLAS requested but the kernel cannot run"):
      fn(x, w, backend=Backend.PALLAS)
    with pytest.raises(ValueError, match="without interpret=True"):
      fn(x, w, backend=Backend.PALLAS, platform=Platform.GPU)


@pytest.mark.parametrize("platform", list(Platform))
def test_unsupported_format_falls_back_under_auto_and_raises_under_pallas(platform):
  x = jnp.ones((2, 256))
  int3 = _w(lb.int_spec(3, group_size=64))
  out = kernels.qmatmul(x, int3, platform=platform, interpret=True)
  d = kernels.last_decision()
  assert d.backend is Backend.REFERENCE and d.platform is platform and "bit planes" in d.reason
  assert jnp.array_equal(out, qm_ref.qmatmul(x, int3))
  with pytest.raises(ValueError, match="bit planes"):
    kernels.qmatmul(x, int3, backend=Backend.PALLAS, platform=platform, interpret=True)
  int4 = _w(lb.int_spec(4, group_size=64))
  kernels.w8a8_matmul(x, int4, platform=platform, interpret=True)
  assert "8-bit INT or FP8" in kernels.last_decision().reason
  with pytest.raises(ValueError, match="8-bit INT or FP8"):
    kernels.w8a8_matmul(x, int4, backend=Backend.PALLAS, platform=platform, interpret=True)
  asym = _w(lb.int_spec(8, symmetric=False))
  with pytest.raises(ValueError, match="symmetric"):
    kernels.w8a8_matmul(x, asym, backend=Backend.PALLAS, platform=platform, interpret=True)


def test_illegal_tiles_fall_back_with_the_reason():
  w, x = _w(lb.int_spec(4, group_size=64)), jnp.ones((2, 256), jnp.bfloat16)
  kernels.qmatmul(x, w, platform=Platform.GPU, interpret=True, blocks=BlockSizes(16, 48, 64))
  assert "block_n 48 does not divide" in kernels.last_decision().reason
  kernels.qmatmul(x, w, platform=Platform.GPU, interpret=True, blocks=BlockSizes(16, 32, 32, 3))
  assert "split_k 3" in kernels.last_decision().reason
  kernels.qmatmul(x, w, platform=Platform.TPU, interpret=True, blocks=BlockSizes(16, 128, 64))
  assert "block_k % 128" in kernels.last_decision().reason
  kernels.qmatmul(x, w, platform=Platform.TPU, interpret=True, blocks=BlockSizes(16, 128, 128, 2))
  assert "split-K is GPU-only" in kernels.last_decision().reason
  odd = _w(lb.int_spec(8), k=250, n=200)   # GPU: no power-of-two tile of K = 250 or N = 200
  kernels.qmatmul(jnp.ones((1, 250), jnp.float32), odd, platform=Platform.GPU, interpret=True)
  assert "power-of-two" in kernels.last_decision().reason
  kernels.qmatmul(jnp.ones((1, 250), jnp.float16), odd, platform=Platform.TPU, interpret=True)
  assert "float16" in kernels.last_decision().reason


@pytest.mark.parametrize("platform", list(Platform))
@pytest.mark.parametrize("op", sorted(OPS))
def test_auto_never_errors_on_a_valid_qarray(op, platform):
  # Every registry format (and odd K, N, M): trace only (eval_shape), so this stays fast.
  x = jax.ShapeDtypeStruct((3, 172), jnp.bfloat16)
  for name, spec in REGISTRY.items():
    w = _w(spec, k=172, n=48)
    out = jax.eval_shape(functools.partial(OPS[op], platform=platform, interpret=True), x, w)
    assert out.shape == (3, 48) and out.dtype == jnp.bfloat16, name


def test_bad_inputs_raise():
  w = _w(lb.int_spec(8), k=64, n=8)
  for op, fn in OPS.items():
    with pytest.raises(ValueError, match="does not contract"):
      fn(jnp.ones((2, 63)), w)
    with pytest.raises(ValueError, match="floating activations"):
      fn(jnp.ones((2, 64), jnp.int32), w)
    with pytest.raises(ValueError, match="QArray"):
      fn(jnp.ones((2, 64)), jnp.ones((64, 8)))
    with pytest.raises(ValueError, match="2-D QArray"):
      fn(jnp.ones((2, 64)), lb.quantize(jnp.ones((3, 64, 8)), lb.int_spec(8)))
    with pytest.raises(ValueError, match="Backend"):
      fn(jnp.ones((2, 64)), w, backend="pallas")
    with pytest.raises(ValueError, match="Platform"):
      fn(jnp.ones((2, 64)), w, platform="tpu")
  with pytest.raises(ValueError, match="per_token"):
    kernels.w8a8_matmul(jnp.ones((2, 64)), w, per_token="yes")


def test_reference_backend_is_recorded():
  w, x = _w(lb.nf4_spec()), jnp.ones((1, 256))
  kernels.clear_decisions()
  kernels.qmatmul(x, w, backend=Backend.REFERENCE, platform=Platform.TPU, interpret=True)
  assert [d.reason for d in kernels.decisions()] == ["reference requested"]


def test_auto_waits_for_hardware_verification(monkeypatch):
  """On a device, AUTO keeps to the reference until that platform's kernels are verified on hardware."""
  from lowbit_jax.kernels import common
  monkeypatch.setattr(common, "detect_platform", lambda: Platform.GPU)
  w = lb.quantize(jax.random.normal(jax.random.PRNGKey(0), (256, 128)), lb.int_spec(4, group_size=128))
  x = jax.ShapeDtypeStruct((16, 256), jnp.float32)
  jax.eval_shape(lambda x: kernels.qmatmul(x, w), x)
  d = kernels.last_decision()
  assert d.backend is Backend.REFERENCE and "not yet verified on hardware" in d.reason
  monkeypatch.setattr(common, "VERIFIED_ON_HARDWARE", frozenset({Platform.GPU}))
  jax.eval_shape(lambda x: kernels.qmatmul(x, w), x)
  assert kernels.last_decision().backend is Backend.PALLAS
