"""lowbit_jax.fp8_training (Micikevicius et al. 2022; flax.linen.fp8_ops' delayed scaling): the amax-history state
updates as documented (hand-computed), sites of a scanned weight combine by max, training under jit tracks f32, an
8-device data-parallel step (amaxes reduced over the data axis) equal to the one-device step, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowbit_jax as lb
from lowbit_jax.models.llama import Llama, LlamaConfig
from passhelpers import assert_trees_close, data_parallel, optax_step
from seeds import stable_seed

KEY = "params['w']"


def _e4m3(v, scale):
  return np.asarray(jnp.clip(jnp.asarray(v, jnp.float32) / scale, -448, 448).astype(jnp.float8_e4m3fn)
                    .astype(jnp.float32)) * scale


def test_history_and_scales_hand_computed():
  """One linear y = x @ W, loss sum(y * c), history length 3, four steps with different amaxes."""
  f = lambda p, x: x @ p["w"]
  fp8 = lb.fp8_training(f, lb.Fp8Options(history_len=3))
  w = jnp.asarray(np.linspace(-0.7, 0.9, 12, dtype=np.float32).reshape(4, 3))
  xs = [jnp.full((2, 4), a, jnp.float32).at[0, 0].set(-a) for a in (1.5, 3.0, 0.5, 2.0)]
  c = jnp.asarray([[0.25, -1.0, 0.5], [2.0, 0.125, -0.5]], jnp.float32)
  step = jax.jit(lb.fp8_value_and_grad(lambda p, s, x: jnp.sum(fp8(p, s, x) * c)))
  state = fp8.init({"w": w}, xs[0])
  assert list(state) == [KEY]
  np.testing.assert_array_equal(state[KEY].x_history, np.zeros(3))
  x_amax, hist, scales = [], [], []
  for x in xs:
    m = state[KEY]
    scales.append(float(m.x_scale))
    loss, grads, state = step({"w": w}, state, x)
    # forward: x and W quantize-dequantized to E4M3 with the scale of the previous histories
    xq, wq = _e4m3(x, float(np.max(m.x_history)) / 448 if np.max(m.x_history) > 0 else float(m.x_scale)), \
        _e4m3(w, float(np.max(m.w_history)) / 448 if np.max(m.w_history) > 0 else float(m.w_scale))
    np.testing.assert_allclose(float(loss), float(np.sum((xq @ wq) * np.asarray(c))), rtol=1e-5)
    x_amax.append(float(np.max(np.abs(x))))
    hist.append(np.asarray(state[KEY].x_history))
  a1, a2, a3, a4 = x_amax
  # roll(-1) then write slot 0 (flax's compute_amax_history): the window of the 3 most recent amaxes
  np.testing.assert_array_equal(hist[0], [a1, 0, 0])
  np.testing.assert_array_equal(hist[1], [a2, 0, a1])
  np.testing.assert_array_equal(hist[2], [a3, a1, a2])
  np.testing.assert_array_equal(hist[3], [a4, a2, a3])
  # the state returned after step t holds the scale step t used: 1 (empty history), then max(history) / 448
  np.testing.assert_allclose(scales, [1.0, 1.0, a1 / 448, max(a1, a2) / 448], rtol=1e-6)
  np.testing.assert_allclose(float(state[KEY].x_scale), max(a1, a2, a3) / 448, rtol=1e-6)
  # gradient side: dL/dy = c, E5M2 scale from its own history (max 57344)
  np.testing.assert_array_equal(np.asarray(state[KEY].g_history), [2.0, 2.0, 2.0])
  np.testing.assert_allclose(float(state[KEY].g_scale), 2.0 / 57344, rtol=1e-6)
  np.testing.assert_allclose(float(state[KEY].w_history[0]), 0.9, rtol=1e-6)


def test_scan_sites_combine_by_max():
  """A weight stack contracted at every step of a scan: one state, the amax over the layers (not their sum)."""
  def f(p, x):
    y, _ = jax.lax.scan(lambda h, w: (h @ w, None), x, p["w"])
    return y
  w = jnp.stack([2.0 * jnp.eye(4)] * 3)                        # layer inputs: amax 2, 4, 8 (exact in E4M3)
  x = jnp.asarray([[1.0, 2.0, 1.0, 1.0]])
  fp8 = lb.fp8_training(f, lb.Fp8Options(history_len=2))
  _, _, state = lb.fp8_value_and_grad(lambda p, s: jnp.sum(fp8(p, s, x)))({"w": w}, fp8.init({"w": w}, x))
  m = state[KEY]
  np.testing.assert_array_equal(np.asarray(m.x_history), [8.0, 0.0])   # sum would be 14
  np.testing.assert_array_equal(np.asarray(m.g_history), [4.0, 0.0])   # dL/dy per layer 1, 2, 4; sum 7
  np.testing.assert_array_equal(np.asarray(m.w_history), [2.0, 0.0])


def test_training_tracks_f32(stories260k):
  """25 adamw steps on fresh TinyStories batches from one init: FP8 and f32 losses on the same batches agree."""
  cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=96, max_seq_len=64)
  model = Llama(cfg, scan_layers=True)
  f = lambda p, t: model.apply({"params": p}, t)
  n_steps = 25
  batches = jnp.asarray(stories260k.train[:n_steps * 16 * 33].reshape(n_steps, 16, 33))
  params = model.init(jax.random.key(stable_seed("fp8", "init")), batches[0, :, :-1])["params"]
  fp8 = lb.fp8_training(f, lb.Fp8Options(history_len=4))
  xent = lambda logits, t: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:]))
  opt = optax.adamw(1e-2)
  vg8 = lb.fp8_value_and_grad(lambda p, s, t: xent(fp8(p, s, t[:, :-1]), t))

  def update(g, o, p):
    with jax.numpy_dtype_promotion("standard"):   # optax's own code relies on standard promotion
      u, o = opt.update(g, o, p)
      return optax.apply_updates(p, u), o

  @jax.jit
  def run(p, s, o, q, oq):
    def one(c, t):
      p, s, o, q, oq = c
      l8, g, s = vg8(p, s, t)
      p, o = update(g, o, p)
      l32, gq = jax.value_and_grad(lambda q: xent(f(q, t[:, :-1]), t))(q)
      q, oq = update(gq, oq, q)
      return (p, s, o, q, oq), (l8, l32)
    return jax.lax.scan(one, (p, s, o, q, oq), batches)

  with jax.numpy_dtype_promotion("standard"):
    o = opt.init(params)
  _, (l8, l32) = run(params, fp8.init(params, batches[0, :, :-1]), o, params, o)
  l8, l32 = np.asarray(l8), np.asarray(l32)
  assert l8[-5:].mean() < l8[0] - 1.0 and l32[-5:].mean() < l32[0] - 1.0, (l8, l32)
  rel = abs(l8[-5:].mean() - l32[-5:].mean()) / l32[-5:].mean()
  assert rel < 0.03, (rel, l8, l32)


def test_data_parallel_steps_equal_one_device():
  """Two optax steps of a model with a scanned stack, the batch split over 8 devices (shard_map,
  `axis_name="data"`): loss, params and FP8 state (histories and scales) equal the one-device steps on the whole
  batch; the recorded x amax is the global batch's, which no single shard holds."""
  def f(p, x):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x @ p["inp"], p["layers"])
    return h @ p["head"]
  rng = np.random.default_rng(stable_seed("fp8", "dp"))
  normal = lambda *shape, scale=1.0: (scale * rng.normal(size=shape)).astype(np.float32)
  xs, ys = normal(2, 8, 3, 12), normal(2, 8, 3, 8)                     # two steps' batches, numpy
  params = {k: jnp.asarray(normal(*shape, scale=0.3)) for k, shape in
            (("inp", (12, 16)), ("layers", (2, 16, 16)), ("head", (16, 8)))}
  fp8 = lb.fp8_training(f, lb.Fp8Options(history_len=3))
  loss = lambda p, s, x, y: jnp.mean((fp8(p, s, x) - y) ** 2)
  opt = optax.sgd(0.5, momentum=0.9)

  def stepper(vg):
    def step(p, s, o, x, y):
      val, g, s = vg(p, s, x, y)
      p, o = optax_step(opt, g, o, p)
      return val, p, s, o
    return step

  one = jax.jit(stepper(lb.fp8_value_and_grad(loss)))
  dp = data_parallel(stepper(lb.fp8_value_and_grad(loss, axis_name="data")), 3, 2)
  with jax.numpy_dtype_promotion("standard"):
    o = opt.init(params)
  a = b = (params, fp8.init(params, xs[0]), o)
  for x, y in zip(xs, ys):
    loss_one, *a = one(*a, x, y)
    loss_dp, *b = dp(*b, x, y)
    np.testing.assert_allclose(float(loss_dp), float(loss_one), rtol=1e-6)
    assert_trees_close(b, a, 1e-5)
  state = a[1]
  inp = state["params['inp']"]
  shard_amax = np.max(np.abs(xs[1].reshape(8, -1)), axis=1)
  assert float(inp.x_history[0]) == np.max(shard_amax) > np.min(shard_amax)
  np.testing.assert_allclose(float(inp.x_scale), np.max(np.abs(xs[0])) / 448, rtol=1e-6)   # step 1's amax
  assert all(float(m.g_scale) != 1.0 for m in state.values())


def test_bad_input():
  f = lambda p, x: x @ p["w"]
  with pytest.raises(ValueError, match="history_len"):
    lb.Fp8Options(history_len=0)
  with pytest.raises(ValueError, match="options"):
    lb.fp8_training(f, "e4m3")
  for bad in (3, (), ("data", 0)):
    with pytest.raises(ValueError, match="axis_name must be None, a str or a non-empty tuple of str"):
      lb.fp8_value_and_grad(f, axis_name=bad)
  fp8 = lb.fp8_training(f, lb.Fp8Options(history_len=2))
  p, x = {"w": jnp.ones((3, 2))}, jnp.ones((1, 3))
  with pytest.raises(ValueError, match="state"):
    fp8(p, {}, x)
  with pytest.raises(ValueError, match=r"history_len"):
    fp8(p, lb.fp8_training(f, lb.Fp8Options(history_len=3)).init(p, x), x)
