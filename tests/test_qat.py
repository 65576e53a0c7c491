"""lowbit_jax.qat: fake-quantized forward == the converted (rtn) model through `quantized`, the clipped STE, W8A8
activations, zoo layouts, optax training under jit, an 8-device data-parallel step, bad specs and NaN weights."""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
import pytest

import lowbit_jax as lb
from lowbit_jax.qat import fake_quant
from lowbit_jax.layout import WeightLayout
from passhelpers import ScanModel, assert_close, assert_mse_step_is_data_parallel, quantized_jit, random_like
from seeds import stable_seed
from zoo_layouts import ZOO

SPEC = lb.int_spec(4, group_size=8)


@pytest.fixture(scope="module")
def scan_setup():
  m = ScanModel(n_layers=3)
  x = jax.random.normal(jax.random.key(stable_seed("qat", "x")), (2, 5, 12))
  params = random_like(jax.eval_shape(m.init, jax.random.key(0), x)["params"], seed=stable_seed("qat"), scale=0.3)
  return (lambda p, x: m.apply({"params": p}, x)), params, x


def test_ste_identity_inside_zero_outside():
  """Signed-max int4 per channel: the level -8 * s sits on each column's signed max m, so the other end is
  7/8 |m|: entries beyond it are clipped and get zero gradient; all others get the upstream gradient exactly."""
  w = jax.random.normal(jax.random.key(stable_seed("ste", "w")), (32, 6))
  c = jax.random.normal(jax.random.key(stable_seed("ste", "c")), (32, 6))
  spec = lb.int_spec(4)
  lay = WeightLayout(shape=(32, 6), contract_axes=(0,))
  g = jax.grad(lambda w: jnp.sum(fake_quant(w, spec, lay) * c))(w)
  wn = np.asarray(w)
  m = wn[np.argmax(np.abs(wn), axis=0), np.arange(6)]                   # signed max per column
  s = m / -8.0
  lo, hi = np.minimum(-8 * s, 7 * s), np.maximum(-8 * s, 7 * s)
  inside = (wn >= lo - 1e-6) & (wn <= hi + 1e-6)
  assert 0 < np.sum(~inside) < wn.size                                 # both cases occur
  np.testing.assert_array_equal(np.asarray(g), np.where(inside, np.asarray(c), 0.0))
  np.testing.assert_array_equal(np.asarray(fake_quant(w, spec, lay)), np.asarray(lay.quantize(w, spec).dequantize()))


def test_ste_nf4_double_quant_and_clip_search():
  """Inside the representable range the gradient is the identity for every format (NF4 with double quantization,
  INT with ClipSearch): the mask is 1 exactly where the value lies in [deq(min code), deq(max code)]."""
  w = jax.random.normal(jax.random.key(stable_seed("ste", "nf4")), (64, 8))
  lay = WeightLayout(shape=(64, 8), contract_axes=(0,))
  for spec in (lb.nf4_spec(block_size=16), lb.int_spec(4, group_size=16, clip=lb.ClipSearch(steps=20))):
    fq, g = jax.jit(lambda w: (fake_quant(w, spec, lay), jax.grad(lambda v: jnp.sum(fake_quant(v, spec, lay)))(w)))(w)
    fq, g = np.asarray(fq), np.asarray(g)
    assert set(np.unique(g)) <= {0.0, 1.0}
    # an element far from its quantized value (beyond any rounding gap) must be clipped: zero gradient
    gap = np.abs(np.asarray(w) - fq)
    assert np.all(g[gap > 0.5] == 0.0)
    assert g.mean() > 0.5


def test_forward_equals_converted_model(scan_setup):
  f, params, x = scan_setup
  for spec in (SPEC, lb.W8A8_SPEC):
    q = lb.qat(f, spec)
    qparams = lb.rtn(params, q.analysis(params, x), spec)
    got = jax.jit(q)(params, x)
    assert_close(got, quantized_jit(f)(qparams, x), 1e-5)
    if spec.activations is not None:   # the activation fake quant matters: weight-only fake quant differs
      weight_only = jax.jit(lambda p, x: f(q.fake_quantize(p, x), x))(params, x)
      assert np.max(np.abs(np.asarray(weight_only) - np.asarray(got))) > 1e-4


@pytest.mark.parametrize("name", ["maxtext_scan", "linen_einsum"])
def test_zoo_layouts(name):
  zoo = ZOO[name]()
  spec = lb.int_spec(4, group_size=32)
  q = lb.qat(zoo.apply, spec)
  qparams = lb.rtn(zoo.params, q.analysis(zoo.params, zoo.batch), spec)
  assert_close(jax.jit(q)(zoo.params, zoo.batch), jax.jit(lb.quantized(zoo.apply))(qparams, zoo.batch), 1e-5)


def test_adam_steps_decrease_loss_and_convert(scan_setup):
  f, params, x = scan_setup
  q = lb.qat(f, SPEC)
  target = jnp.sin(jnp.arange(8.0))
  loss = lambda p: jnp.mean((q(p, x) - target) ** 2)
  opt = optax.adam(3e-3)

  @jax.jit
  def step(p, s):
    l, g = jax.value_and_grad(loss)(p)
    with jax.numpy_dtype_promotion("standard"):   # optax's own code relies on standard promotion
      u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), s, l

  with jax.numpy_dtype_promotion("standard"):
    p, s = params, opt.init(params)
  losses = []
  for _ in range(8):
    p, s, l = step(p, s)
    losses.append(float(l))
  assert losses[-1] < losses[0]
  qparams = lb.rtn(p, q.analysis(p, x), SPEC)
  assert_close(quantized_jit(f)(qparams, x), jax.jit(q)(p, x), 1e-5)


def test_where_and_bad_specs(scan_setup):
  f, params, x = scan_setup
  q = lb.qat(f, SPEC, where=r"layers/up/kernel$")
  assert [lb.select.path_str(p) for p in q.layouts(params, x)] == ["layers/up/kernel"]
  with pytest.raises(ValueError, match="outlier"):
    lb.qat(f, lb.llm_int8_spec())
  with pytest.raises(ValueError, match="QuantSpec"):
    lb.qat(f, "int4")
  with pytest.raises(ValueError, match=r"params\['head'\]\['bias'\]"):
    lb.qat(f, SPEC, where=r"head/bias$")(params, x)



class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(16)(x)                                                # Dense_0
    return nn.Dense(8)(jax.nn.relu(h))                                 # Dense_1


@pytest.fixture(scope="module")
def mlp_setup():
  m = MLP()
  rng = np.random.default_rng(stable_seed("qat", "mlp"))
  x, y = (jnp.asarray(rng.normal(size=shape).astype(np.float32)) for shape in ((8, 12), (8, 8)))
  params = random_like(jax.eval_shape(m.init, jax.random.key(0), x)["params"], seed=stable_seed("qat", "mlp"),
                       scale=0.3)
  return (lambda p, x: m.apply({"params": p}, x)), params, x, y


def test_data_parallel_step_equals_one_device(mlp_setup):
  """One optax step with the batch split over 8 devices (shard_map) equals the one-device step on the whole batch."""
  f, params, x, y = mlp_setup
  assert_mse_step_is_data_parallel(lb.qat(f, SPEC), params, x, y)


def test_nan_weight_raises_naming_the_key_path(mlp_setup):
  f, params, x, _ = mlp_setup
  bad = jax.tree.map(lambda a: a, params)
  bad["Dense_0"]["kernel"] = bad["Dense_0"]["kernel"].at[1, 2].set(jnp.nan)
  for fn in (lb.qat(f, SPEC), lb.bitnet(f)):
    for call in (lambda: fn(bad, x), lambda: jax.grad(lambda p: jnp.sum(fn(p, x)))(bad)):
      with pytest.raises(ValueError, match=r"params\['Dense_0'\]\['kernel'\]: expected finite weights, found 1 NaN"):
        call()


def test_nan_weight_under_jit_reaches_the_output(mlp_setup):
  """Under `jit` nothing can raise: a NaN weight must not be quantized to a finite code (training on with it
  frozen at NaN), but reach the output, where the loss and `check_finite` see it."""
  f, params, x, _ = mlp_setup
  bad = jax.tree.map(lambda a: a, params)
  bad["Dense_0"]["kernel"] = bad["Dense_0"]["kernel"].at[1, 2].set(jnp.nan)
  for fn in (lb.qat(f, SPEC), lb.bitnet(f)):
    assert bool(jnp.all(jnp.isfinite(jax.jit(fn)(params, x))))
    assert not bool(jnp.all(jnp.isfinite(jax.jit(fn)(bad, x))))
