"""lowbit_jax.bitnet (BitNet b1.58, Ma et al. 2024): the paper's absmean ternary weights and per-token absmax int8
activations, the plain STE, training under jit, conversion to packed ternary QArrays equal to the training forward,
an 8-device data-parallel step, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowbit_jax as lb
from lowbit_jax.models.llama import Llama, LlamaConfig
from passhelpers import assert_close, assert_mse_step_is_data_parallel, is_q
from seeds import stable_seed

CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64, max_seq_len=32)
LINEAR = r".*layers.*kernel"          # the blocks' linears; the head stays float (module docstring of bitnet)


@pytest.fixture(scope="module")
def tiny():
  m = Llama(CFG, scan_layers=True)
  tokens = jax.random.randint(jax.random.key(stable_seed("bitnet", "tokens")), (4, 17), 0, CFG.vocab_size)
  params = m.init(jax.random.key(stable_seed("bitnet", "init")), tokens[:, :-1])["params"]
  return (lambda p, t: m.apply({"params": p}, t)), params, tokens


def _act_quant(x):
  """The reference implementation's activation_quant (Training Tips, Code and FAQ), in numpy."""
  x = np.asarray(x, np.float64)
  s = 127.0 / np.maximum(np.max(np.abs(x), axis=-1, keepdims=True), 1e-5)
  return np.clip(np.round(x * s), -128, 127) / s


def _paper(w, x):
  """The reference implementation's BitLinear forward (weight_quant, activation_quant), in numpy."""
  w = np.asarray(w, np.float64)
  gamma = max(np.mean(np.abs(w)), 1e-5)
  return _act_quant(x) @ (np.clip(np.round(w / gamma), -1, 1) * gamma)


def test_single_linear_matches_the_paper_and_identity_ste():
  w = jax.random.normal(jax.random.key(stable_seed("bitnet", "w")), (48, 16)) * 0.2
  x = jax.random.normal(jax.random.key(stable_seed("bitnet", "x")), (5, 48))
  f = lambda p, x: x @ p["w"]
  bn = lb.bitnet(f)
  assert bn.spec.format is lb.Format.TERNARY and isinstance(bn.spec.granularity, lb.PerTensor)
  assert bn.spec.activations == lb.ActQuant(bits=8, per_token=True)
  np.testing.assert_allclose(np.asarray(jax.jit(bn)({"w": w}, x)), _paper(w, x), rtol=1e-5, atol=1e-5)
  c = jax.random.normal(jax.random.key(stable_seed("bitnet", "c")), (5, 16))
  g = jax.grad(lambda p: jnp.sum(bn(p, x) * c))({"w": w})["w"]
  xq = _act_quant(x)                                          # the fake-quantized activations
  np.testing.assert_allclose(np.asarray(g), xq.T @ np.asarray(c), rtol=1e-4, atol=1e-4)   # identity STE: no clip
  q = lb.rtn({"w": w}, bn.analysis({"w": w}, x), bn.spec)
  assert is_q(q["w"]) and q["w"].spec == bn.spec
  assert_close(jax.jit(lb.quantized(f))(q, x), jax.jit(bn)({"w": w}, x), 1e-5)


def test_train_under_jit_then_convert(tiny):
  f, params, tokens = tiny
  bn = lb.bitnet(f, where=LINEAR)
  x, y = tokens[:, :-1], tokens[:, 1:]
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 8))
  loss = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(bn(p, x), y))

  @jax.jit
  def step(p, s):
    val, g = jax.value_and_grad(loss)(p)
    with jax.numpy_dtype_promotion("standard"):   # optax's own code relies on standard promotion
      u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), s, val

  with jax.numpy_dtype_promotion("standard"):
    state = opt.init(params)
  p, losses = params, []
  for _ in range(8):
    p, state, val = step(p, state)
    losses.append(float(val))
  assert losses[-1] < losses[0] - 0.3, losses
  q = lb.rtn(p, bn.analysis(p, x), bn.spec)
  lays = bn.layouts(p, x)
  assert len(lays) == 7 and all(is_q(q["layers"][m][n]["kernel"]) for m, ns in
                                (("attention", ("wq", "wk", "wv", "wo")), ("feed_forward", ("w1", "w2", "w3")))
                                for n in ns)
  assert not is_q(q["output"]["kernel"])
  # Equal up to f32 accumulation order (codes x scale vs x @ deq(W)); a difference in the last bit upstream can move
  # an activation across an int8 rounding boundary, which changes that token's later values by one int8 step.
  a, b = np.asarray(jax.jit(lb.quantized(f))(q, x)), np.asarray(jax.jit(bn)(p, x))
  off = np.abs(a - b) > 1e-4 * max(1.0, np.max(np.abs(b)))
  assert off.mean() < 0.03 and np.max(np.abs(a - b)) < 0.05, (off.mean(), np.max(np.abs(a - b)))
  assert np.mean(np.argmax(a, -1) == np.argmax(b, -1)) > 0.98




def test_data_parallel_step_equals_one_device():
  """One optax step with 8 sequences split over 8 devices (shard_map, the pmean of the shard losses) equals the
  one-device step: each weight's absmean comes from the replicated weights, activations are quantized per token."""
  rng = np.random.default_rng(stable_seed("bitnet", "dp"))
  normal = lambda *shape, scale=1.0: jnp.asarray((scale * rng.normal(size=shape)).astype(np.float32))
  params = {"w": normal(24, 32, scale=0.2), "v": normal(32, 6, scale=0.2)}
  x, y = normal(8, 5, 24), normal(8, 5, 6)
  assert_mse_step_is_data_parallel(lb.bitnet(lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]), params, x, y)

def test_bad_input():
  f = lambda p, x: x @ p["w"]
  with pytest.raises(ValueError, match="spec"):
    lb.bitnet(f, lb.int_spec(4))
  with pytest.raises(ValueError, match="per_channel"):
    lb.bitnet_spec(per_channel="yes")
  with pytest.raises(ValueError, match="outlier_threshold"):
    lb.QuantSpec(format=lb.Format.TERNARY, activations=lb.ActQuant(outlier_threshold=6.0))
  with pytest.raises(ValueError, match="ste"):
    lb.qat(f, lb.ternary_spec(), ste="identity")
