"""lowbit_jax.algorithms.awq on the real stories260K model and on a small linen model: beats RTN against fp32,
runs quantized through the passes (jit), handles scanned stacks and (out, in) weights, shares one scale between
weights fed by the same input, and rejects bad inputs naming the key path without touching the input params."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.algorithms import common
from lowbit_jax.algorithms.awq import awq
from lowbit_jax.models.llama import Llama, stack_layers
from passhelpers import quantized_jit, quantized_kl


@pytest.fixture(scope="module")
def kl_rtn4(stories260k):
  """The KL to fp32 of RTN int4 g32 on the held-out tokens: the error AWQ must beat."""
  s = stories260k
  return quantized_kl(s.apply, s.params, lb.rtn(s.params, None, lb.int_spec(4, group_size=32)), s.held)


def _host(tree):
  return jax.tree.map(np.array, tree)


def test_awq_beats_rtn_on_the_real_model(stories260k, stories260k_awq4, kl_rtn4):
  s = stories260k
  before = _host(s.params)
  q = stories260k_awq4   # in_scale everywhere: the grouping shows
  kl_awq = quantized_kl(s.apply, s.params, q, s.held)
  assert 0 < kl_awq < 0.85 * kl_rtn4, (kl_awq, kl_rtn4)
  wq = q["layers_0"]["attention"]["wq"]["kernel"]
  assert isinstance(wq, lb.QArray) and wq.in_scale.shape == (64, 1) and wq.dtype == np.float32
  assert not isinstance(q["tok_embeddings"]["embedding"], lb.QArray)
  jax.tree.map(np.testing.assert_array_equal, _host(s.params), before)                   # input untouched
  # the QArray stands for the (clipped) float weight: x @ W ≈ (x / s) @ Q(s ⊙ W)
  w = np.asarray(s.params["layers_0"]["attention"]["wq"]["kernel"])
  assert np.abs(np.asarray(wq.dequantize()) - w).max() < 0.5 * np.abs(w).max()


def test_one_scale_per_input(stories260k, stories260k_calib, stories260k_awq4):
  q = stories260k_awq4
  for i in range(5):
    att, ffn = q[f"layers_{i}"]["attention"], q[f"layers_{i}"]["feed_forward"]
    s_q = np.asarray(att["wq"]["kernel"].in_scale)
    np.testing.assert_array_equal(np.asarray(att["wk"]["kernel"].in_scale), s_q)        # q/k/v: one norm
    np.testing.assert_array_equal(np.asarray(att["wv"]["kernel"].in_scale), s_q)
    np.testing.assert_array_equal(np.asarray(ffn["w3"]["kernel"].in_scale),             # gate/up
                                  np.asarray(ffn["w1"]["kernel"].in_scale))
    assert not np.array_equal(np.asarray(att["wo"]["kernel"].in_scale), s_q)             # other inputs
    assert not np.array_equal(np.asarray(ffn["w1"]["kernel"].in_scale), s_q)
  targets = common.calibrated_leaves(stories260k.params, stories260k_calib, r"layers_1/.*kernel", "awq")
  names = [[t.path[-2].key for t in g] for g in common.input_groups(targets)]
  assert names == [["wq", "wk", "wv"], ["wo"], ["w1", "w3"], ["w2"]]       # from the trace's input ids


def test_scanned_stack(stories260k, kl_rtn4):
  m = stories260k.loaded
  model = Llama(m.config, scan_layers=True)
  apply = lambda p, t: model.apply({"params": p}, t)
  params = stack_layers(m.params, m.config.n_layers)
  calib = lb.calibrate(apply, params, stories260k.batches[:2])
  q = awq(params, calib, lb.int_spec(4, group_size=32), fold=False)
  wq, wk = q["layers"]["attention"]["wq"]["kernel"], q["layers"]["attention"]["wk"]["kernel"]
  assert isinstance(wq, lb.QArray) and wq.shape == (5, 64, 64) and wq.in_scale.shape == (5, 64, 1)
  np.testing.assert_array_equal(np.asarray(wk.in_scale), np.asarray(wq.in_scale))
  assert not np.array_equal(np.asarray(wq.in_scale[0]), np.asarray(wq.in_scale[1]))     # one s per layer
  assert quantized_kl(apply, params, q, stories260k.held) < 0.85 * kl_rtn4      # the same function as unrolled


class _Toy(nn.Module):
  """A norm feeding two (in, out) kernels (one shared scale) and a 2-D (out, in) weight used as x @ w.T.
  Shaped like a stories260K MLP so that the searches' compiled functions are shared with the tests above."""

  @nn.compact
  def __call__(self, x):
    h = nn.RMSNorm(name="norm")(x)
    gate = nn.Dense(172, use_bias=False, name="gate")(h)
    up = nn.Dense(172, use_bias=False, name="up")(h)
    w = self.param("weight", nn.initializers.normal(0.1), (64, 172))                      # (out, in)
    return (jax.nn.silu(gate) * up) @ w.T


def _toy():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 64, 64)).astype(np.float32)
  x *= np.where(np.arange(64) % 11 == 0, 25.0, 1.0).astype(np.float32)                  # salient channels
  params = _Toy().init(jax.random.PRNGKey(0), x[:1])["params"]
  apply = lambda p, x: _Toy().apply({"params": p}, x)
  return params, apply, [jnp.asarray(b) for b in x]


def test_any_linen_model_and_out_in_weights():
  params, apply, batches = _toy()
  calib = lb.calibrate(apply, params, batches)
  before = _host(params)
  q = awq(params, calib, lb.int_spec(4, group_size=32), fold=False)
  jax.tree.map(np.testing.assert_array_equal, _host(params), before)
  assert q["weight"].shape == (64, 172) and q["weight"].in_scale.shape == (1, 172)
  np.testing.assert_array_equal(np.asarray(q["up"]["kernel"].in_scale), np.asarray(q["gate"]["kernel"].in_scale))
  x = jnp.concatenate(batches)
  ref = apply(params, x)
  deq = jax.tree.map(lambda l: l.dequantize() if isinstance(l, lb.QArray) else l, q,
                     is_leaf=lambda l: isinstance(l, lb.QArray))
  out = quantized_jit(apply)(q, x)
  np.testing.assert_allclose(out, apply(deq, x), rtol=1e-3, atol=1e-3)
  rtn = quantized_jit(apply)(lb.rtn(params, calib, lb.int_spec(4, group_size=32)), x)   # traced axes
  assert float(jnp.mean((out - ref) ** 2)) < float(jnp.mean((rtn - ref) ** 2))


def test_bad_inputs_name_the_path_and_leave_params_alone():
  params, apply, batches = _toy()
  before = _host(params)
  calib = lb.calibrate(apply, params, batches[:1])
  gate = r"params\['gate'\]\['kernel'\]"
  other = jax.tree.map(lambda x: x, params)
  other["gate"]["kernel"] = jnp.ones((32, 172))                                           # another model: K = 32
  with pytest.raises(ValueError, match=gate + ".*does not match"):
    awq(other, calib)
  bad = dict(calib.weights)
  bad[calib["gate/kernel"].path] = dataclasses.replace(
      calib["gate/kernel"], stats=dataclasses.replace(calib["gate/kernel"].stats,
                                                      abs_sum=jnp.full((64,), jnp.nan)))
  with pytest.raises(ValueError, match=gate + ".*NaN"):
    awq(params, dataclasses.replace(calib, weights=bad))
  no_mean = lb.calibrate(apply, params, batches[:1], stats={lb.Stat.HESSIAN})
  with pytest.raises(ValueError, match=gate + ".*ABS_MEAN"):
    awq(params, no_mean)
  partial = lb.calibrate(apply, params, batches[:1], where=r"gate/kernel")
  with pytest.raises(ValueError, match=r"params\['up'\]\['kernel'\].*no statistics"):
    awq(params, partial, where=r"(gate|up)/kernel")
  nan_w = jax.tree.map(lambda x: x, params)
  nan_w["up"]["kernel"] = params["up"]["kernel"].at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match=r"params\['up'\]\['kernel'\].*finite"):
    awq(nan_w, calib)
  with pytest.raises(ValueError, match=r"awq: needs an integer QuantSpec.*FP8"):
    awq(params, calib, lb.fp8_spec())
  with pytest.raises(ValueError, match="QuantSpec"):
    awq(params, calib, 4)
  with pytest.raises(ValueError, match="n_grid"):
    awq(params, calib, n_grid=0)
  with pytest.raises(ValueError, match="max_shrink"):
    awq(params, calib, max_shrink=1.0)
  with pytest.raises(ValueError, match="Calibration"):
    awq(params, {"not": "a calibration"})
  jax.tree.map(np.testing.assert_array_equal, _host(params), before)
