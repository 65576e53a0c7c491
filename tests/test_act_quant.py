"""Activation quantization in the spec (`QuantSpec.activations = ActQuant(...)`): validation, routing of
`kernels.qmatmul` to W8A8 / LLM.int8(), equality with the jnp references, the LLM.int8() limits (huge threshold =
W8A8, threshold 0 = float), gradients, the rewrite pass, and an orbax round trip that keeps the spec."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import lowbit_jax as lb
from lowbit_jax import kernels
from lowbit_jax.kernels import Backend, Platform
from lowbit_jax.kernels.dispatch import llm_int8_matmul
from lowbit_jax.kernels.qmatmul import reference as qm_ref
from lowbit_jax.kernels.w8a8 import llm_int8 as int8_ref, reference as w8_ref
from lowbit_jax.qarray import with_in_scale
from lowbit_jax.spec import ActQuant, Format, PerGroup, QuantSpec

W8A8 = QuantSpec(format=Format.INT, bits=8, activations=ActQuant())
W8A8_TENSOR = QuantSpec(format=Format.INT, bits=8, activations=ActQuant(per_token=False))
INT8 = QuantSpec(format=Format.INT, bits=8, activations=ActQuant(outlier_threshold=6.0))
FP8 = lb.QuantSpec(format=Format.FP8_E4M3, granularity=lb.PerChannel(), activations=ActQuant())


def _with_outliers(shape, k, cols=(3, 17, 40), seed=1, dtype=jnp.float32):
  x = jax.random.normal(jax.random.PRNGKey(seed), shape + (k,))
  x = x.at[..., jnp.asarray(cols)].multiply(15.0)            # a few systematic outlier feature columns
  return x.astype(dtype)


@functools.lru_cache(maxsize=None)
def _w(spec, k=96, n=48, seed=0):
  return lb.quantize(jax.random.normal(jax.random.PRNGKey(seed), (k, n)) * 0.1, spec)


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# --- spec -------------------------------------------------------------------------------------------------

def test_act_quant_defaults_and_hashing():
  a = ActQuant()
  assert (a.bits, a.per_token, a.outlier_threshold) == (8, True, None)
  assert ActQuant(outlier_threshold=6).outlier_threshold == 6.0
  assert hash(INT8) == hash(QuantSpec(format=Format.INT, bits=8, activations=ActQuant(outlier_threshold=6.0)))
  assert lb.int_spec(8).activations is None and W8A8 != lb.int_spec(8)
  with pytest.raises(TypeError):
    ActQuant(8)   # keyword-only


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=4), "only 8-bit"), (dict(bits=True), "only 8-bit"), (dict(per_token=1), "per_token"),
    (dict(outlier_threshold=-1.0), "outlier_threshold"), (dict(outlier_threshold=float("nan")), "outlier_threshold"),
    (dict(outlier_threshold="6"), "outlier_threshold"), (dict(outlier_threshold=True), "outlier_threshold"),
])
def test_invalid_act_quant(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ActQuant(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(format=Format.INT, bits=4), "8-bit INT or FP8"),
    (dict(format=Format.NF4, granularity=PerGroup(size=64)), "8-bit INT or FP8"),
    (dict(format=Format.TERNARY, act=ActQuant(outlier_threshold=6.0)), "needs 8-bit INT"),   # W1.58A8 is legal
    (dict(format=Format.FP8_E4M3, act=ActQuant(outlier_threshold=6.0)), "needs 8-bit INT"),
    (dict(format=Format.INT, bits=8, act="int8"), "ActQuant"),
])
def test_activations_need_8bit_weights(kwargs, match):
  act = kwargs.pop("act", ActQuant())
  with pytest.raises(ValueError, match=match):
    QuantSpec(activations=act, **kwargs)


def test_existing_specs_and_views_keep_activations():
  assert FP8.activations == ActQuant()
  q = _w(W8A8)
  assert q.spec.activations == ActQuant() and q.without_in_scale().spec.activations == ActQuant()
  np.testing.assert_allclose(q.dequantize(), _w(lb.int_spec(8)).dequantize())   # dequantize is weight-only


# --- qmatmul routing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [W8A8, W8A8_TENSOR, FP8], ids=["per_token", "per_tensor", "fp8"])
def test_qmatmul_routes_w8a8_to_its_reference(spec):
  w, x = _w(spec), _with_outliers((2, 5), 96)
  out = kernels.qmatmul(x, w)
  d = kernels.last_decision()
  assert d.op == "w8a8_matmul" and d.backend is Backend.REFERENCE
  np.testing.assert_array_equal(out, w8_ref.w8a8_matmul(x, w, per_token=spec.activations.per_token))
  assert 0 < _rel(out, x @ w.dequantize()) < 0.05
  assert _rel(out, x @ w.dequantize()) > 0   # activations really are quantized


def test_qmatmul_routes_llm_int8_to_its_reference():
  w, x = _w(INT8), _with_outliers((2, 5), 96)
  out = kernels.qmatmul(x, w)
  d = kernels.last_decision()
  assert (d.op, d.backend) == ("llm_int8_matmul", Backend.REFERENCE) and "no Pallas kernel" in d.reason
  np.testing.assert_array_equal(out, int8_ref.llm_int8_matmul(x, w, threshold=6.0))
  plain = kernels.qmatmul(x, _w(W8A8))
  exact = x @ w.dequantize()
  assert _rel(out, exact) < 0.01 < _rel(plain, exact)     # outlier columns in float: far closer than W8A8
  assert np.asarray(int8_ref.outlier_columns(x, 6.0)).nonzero()[0].tolist() == [3, 17, 40]


def test_llm_int8_limits():
  w8, x = _w(W8A8), _with_outliers((4, 3), 96, dtype=jnp.bfloat16)
  huge = llm_int8_matmul(x, w8, threshold=1e30)
  np.testing.assert_array_equal(huge, kernels.w8a8_matmul(x, w8))
  zero = llm_int8_matmul(x, w8, threshold=0.0)
  np.testing.assert_array_equal(zero, qm_ref.qmatmul(x, w8))
  xf = x.astype(jnp.float32)
  np.testing.assert_allclose(llm_int8_matmul(xf, w8, threshold=0.0), xf @ w8.dequantize(), rtol=1e-5, atol=1e-5)
  assert huge.dtype == zero.dtype == jnp.bfloat16 and huge.shape == (4, 3, 48)


def test_llm_int8_is_jittable_and_straight_through():
  w, x = _w(INT8), _with_outliers((6,), 96)
  f = jax.jit(kernels.qmatmul)
  np.testing.assert_allclose(f(x, w), kernels.qmatmul(x, w), rtol=1e-6, atol=1e-6)
  g = jax.grad(lambda x: jnp.sum(jnp.sin(kernels.qmatmul(x, w))))(x)
  ref = jax.grad(lambda x: jnp.sum(jnp.sin(x @ w.dequantize())))(x)
  assert _rel(g, ref) < 0.02


def test_in_scale_is_applied_before_activation_quantization():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((96, 48)).astype(np.float32) * 0.1
  s = np.exp(rng.standard_normal(96)).astype(np.float32)
  x = _with_outliers((3,), 96)
  for spec in (W8A8, INT8):
    q = with_in_scale(w, s, spec)
    out = kernels.qmatmul(x, q)
    expect = kernels.qmatmul((x / s).astype(jnp.float32), q.without_in_scale())
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-6)
    assert _rel(out, x @ w) < 0.1


def test_backend_choices():
  w, x = _w(W8A8), _with_outliers((2,), 96)
  out = kernels.qmatmul(x, w, backend=Backend.PALLAS, platform=Platform.GPU, interpret=True)
  d = kernels.last_decision()
  assert (d.op, d.backend, d.platform) == ("w8a8_matmul", Backend.PALLAS, Platform.GPU)
  np.testing.assert_allclose(out, w8_ref.w8a8_matmul(x, w), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="no Pallas kernel for LLM.int8"):
    kernels.qmatmul(x, _w(INT8), backend=Backend.PALLAS)
  kernels.qmatmul(x, _w(INT8), backend=Backend.REFERENCE)
  assert kernels.last_decision().reason == "reference requested"
  with pytest.raises(ValueError, match="outlier_threshold"):
    llm_int8_matmul(x, w, threshold=-2.0)
  with pytest.raises(ValueError, match="expected x.shape"):
    kernels.qmatmul(jnp.ones((2, 95)), _w(INT8))


# --- through the rewrite pass, and on disk ---------------------------------------------------------------------

class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(96, use_bias=False, name="up")(x)
    return nn.Dense(32, use_bias=False, name="down")(jax.nn.gelu(h))


@pytest.mark.parametrize("spec", [W8A8, INT8], ids=["w8a8", "llm_int8"])
def test_rewrite_pass_runs_activation_quantized_weights(spec):
  x = _with_outliers((4, 7), 64, cols=(5, 9))
  params = _MLP().init(jax.random.PRNGKey(0), x)["params"]
  apply = lambda p, x: _MLP().apply({"params": p}, x)
  kernels.clear_decisions()
  q = lb.rtn(params, None, spec)
  out = jax.jit(lb.quantized(apply))(q, x)
  ops = {d.op for d in kernels.decisions()}
  assert ops == {"w8a8_matmul" if spec is W8A8 else "llm_int8_matmul"}
  up, down = q["up"]["kernel"], q["down"]["kernel"]
  manual = kernels.qmatmul(jax.nn.gelu(kernels.qmatmul(x, up)), down)
  np.testing.assert_allclose(out, manual, rtol=1e-4, atol=1e-4)
  assert _rel(out, apply(params, x)) < 0.05


def test_orbax_round_trip_keeps_the_spec(tmp_path):
  rng = np.random.default_rng(0)
  q = {"w": with_in_scale(rng.standard_normal((64, 32)).astype(np.float32), np.linspace(0.5, 2, 64), INT8),
       "v": _w(W8A8)}
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "c", q)
  ckpt.wait_until_finished()
  back = ckpt.restore(tmp_path / "c", jax.tree.map(lambda l: jax.ShapeDtypeStruct(l.shape, l.dtype), q))
  assert back["w"].spec == INT8 and back["v"].spec == W8A8
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(q)):
    np.testing.assert_array_equal(a, b)
  x = _with_outliers((2,), 64)
  np.testing.assert_array_equal(kernels.qmatmul(x, back["w"]), kernels.qmatmul(x, q["w"]))
