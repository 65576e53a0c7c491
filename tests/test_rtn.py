"""rtn as a pytree transform: linen and NNX trees, selection rules, bad input, inputs never modified."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit_jax as lb
from lowbit_jax.select import path_str


class Block(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(50, 32, name="embed")(tokens)
    h = nn.RMSNorm(name="norm")(h)
    h = nn.Dense(64, name="up")(h)
    return nn.Dense(50, use_bias=False, name="head")(jax.nn.gelu(h))


def _linen_params():
  return Block().init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]


def _qpaths(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda l: isinstance(l, lb.QArray))[0]
  return sorted(path_str(p) for p, l in flat if isinstance(l, lb.QArray))


def test_default_selects_linear_kernels_only():
  q = lb.rtn(_linen_params(), None, lb.int_spec(4, group_size=32))
  assert _qpaths(q) == ["head/kernel", "up/kernel"]


def test_linen_model_runs_on_dequantized_rtn_params():
  params = _linen_params()
  tokens = jnp.arange(8).reshape(2, 4)
  q = lb.rtn(params, None, lb.int_spec(8))
  deq = jax.tree.map(lambda l: l.dequantize() if isinstance(l, lb.QArray) else l, q,
                     is_leaf=lambda l: isinstance(l, lb.QArray))
  out, ref = Block().apply({"params": deq}, tokens), Block().apply({"params": params}, tokens)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.max(jnp.abs(ref))))
  assert float(jnp.max(jnp.abs(out - ref))) > 0   # it really was quantized


def test_regex_and_predicate_selection():
  params = _linen_params()
  assert _qpaths(lb.rtn(params, None, lb.int_spec(8), where=r"^up/kernel$")) == ["up/kernel"]
  assert _qpaths(lb.rtn(params, None, lb.int_spec(8), where=re.compile(r"embed"))) == ["embed/embedding"]
  pred = lambda path, leaf: leaf.ndim == 2 and leaf.shape[-1] == 50
  assert _qpaths(lb.rtn(params, None, lb.int_spec(8), where=pred)) == ["head/kernel"]


def test_nnx_state():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(20, 16, rngs=rngs)
      self.fc1 = nnx.Linear(16, 64, rngs=rngs)
      self.norm = nnx.RMSNorm(64, rngs=rngs)
      self.fc2 = nnx.Linear(64, 8, use_bias=False, rngs=rngs)

    def __call__(self, t):
      return self.fc2(self.norm(self.fc1(self.embed(t))))

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  q = lb.rtn(state, None, lb.nf4_spec())
  assert _qpaths(q) == ["fc1/kernel", "fc2/kernel"]
  assert isinstance(q, nnx.State) and isinstance(q["fc1"]["kernel"], nnx.Param)   # wrappers kept
  assert isinstance(q["fc1"]["kernel"].value, lb.QArray)
  deq = jax.tree.map(lambda l: l.dequantize() if isinstance(l, lb.QArray) else l, q,
                     is_leaf=lambda l: isinstance(l, lb.QArray))
  assert jax.tree.structure(deq) == jax.tree.structure(state)
  model = nnx.merge(graphdef, deq)
  ref = nnx.merge(graphdef, state)
  t = jnp.arange(6).reshape(2, 3)
  np.testing.assert_allclose(model(t), ref(t), atol=0.2 * float(jnp.max(jnp.abs(ref(t)))))


def _bad(params, spec=None, **kw):
  return lb.rtn(params, None, spec or lb.int_spec(4, group_size=32), **kw)


@pytest.mark.parametrize("params, kw, match", [
    ({"a": {"kernel": np.ones((4, 8), np.int32)}}, dict(where="kernel"), r"params\['a'\]\['kernel'\].*floating"),
    ({"a": {"kernel": np.ones((4, 8), np.bool_)}}, dict(where="kernel"), r"params\['a'\]\['kernel'\].*floating"),
    ({"a": {"kernel": np.ones((4, 8), np.complex64)}}, dict(where="kernel"), "floating"),
    ({"a": {"bias": np.ones((8,), np.float32)}}, dict(where="bias"), r"params\['a'\]\['bias'\].*axis -2 .*missing"),
    ({"a": {"bias": np.ones((8,), np.float32)}}, {}, "empty selection"),
    ({"a": {"kernel": np.ones((4, 8), np.float32)}}, dict(where="nothing_matches"), "empty selection"),
    ({"a": {"kernel": np.array([[1.0, np.nan], [0.0, 1.0]], np.float32)}}, {}, r"params\['a'\]\['kernel'\].*NaN"),
    ({"a": {"kernel": np.array([[1.0, np.inf], [0.0, 1.0]], np.float32)}}, {}, "finite"),
])
def test_bad_input_names_the_path(params, kw, match):
  with pytest.raises(ValueError, match=match):
    _bad(params, **kw)


def test_strict_group_error_names_the_path():
  params = {"ffn": {"w2": {"kernel": np.ones((172, 64), np.float32)}}}
  with pytest.raises(ValueError, match=r"params\['ffn'\]\['w2'\]\['kernel'\].*group size 32"):
    lb.rtn(params, None, lb.int_spec(4, group_size=32, strict=True))
  assert lb.rtn(params, None, lb.int_spec(4, group_size=32))["ffn"]["w2"]["kernel"].k_pad == 192


def test_failed_quantization_leaves_input_untouched():
  good = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
  bad = good.copy()
  bad[0, 0] = np.nan
  params = {"a": {"kernel": good}, "b": {"kernel": bad}}
  before = {k: v["kernel"].copy() for k, v in params.items()}
  with pytest.raises(ValueError, match=r"params\['b'\]"):
    lb.rtn(params, None, lb.int_spec(4))
  for k in params:   # nothing replaced, nothing written
    assert isinstance(params[k]["kernel"], np.ndarray)
    np.testing.assert_array_equal(params[k]["kernel"], before[k])
  q = lb.rtn({"a": {"kernel": good}}, None, lb.int_spec(4))
  np.testing.assert_array_equal(good, before["a"])
  assert isinstance(q["a"]["kernel"], lb.QArray)


def test_rtn_under_eval_shape_is_abstract():
  abstract = {"w": {"kernel": jax.ShapeDtypeStruct((4096, 11008), jnp.bfloat16)}}
  q = jax.eval_shape(lambda p: lb.rtn(p, None, lb.int_spec(4, group_size=128)), abstract)
  assert isinstance(q["w"]["kernel"].codes, jax.ShapeDtypeStruct)
  assert q["w"]["kernel"].shape == (4096, 11008)


def test_rtn_rejects_non_spec():
  with pytest.raises(ValueError, match="QuantSpec"):
    lb.rtn({"a": {"kernel": np.ones((4, 4), np.float32)}}, None, "int4")
