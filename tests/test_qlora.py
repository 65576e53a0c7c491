"""lowbit_jax.lora (QLoRA): adapters on a frozen packed NF4 base at the dot sites, gradients equal to the dequantized
base's, a frozen base under optax, no float copy of a base weight in the training step, zoo layouts, 8-device data
parallelism, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as PS

import lowbit_jax as lb
from passhelpers import ScanModel, assert_close, float_shapes, is_q, random_like
from seeds import stable_seed
from test_passes_core import _decoded_shapes
from zoo_layouts import ZOO

NF4 = lb.nf4_spec(block_size=8)
OPTS = lb.LoraOptions(rank=4, alpha=8.0)


def _perturb(adapters, name):
  """Non-zero B (and A) so that the low-rank term is exercised."""
  key = jax.random.key(stable_seed("qlora", name))
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def setup():
  m = ScanModel(n_layers=3)
  x = jax.random.normal(jax.random.key(stable_seed("qlora", "x")), (8, 5, 12))
  params = random_like(jax.eval_shape(m.init, jax.random.key(0), x)["params"], seed=stable_seed("qlora"), scale=0.3)
  f = lambda p, x: m.apply({"params": p}, x)
  an = lb.analyze(f, params, x)
  base = lb.rtn(params, an, NF4)
  ql = lb.lora(f, OPTS)
  adapters = _perturb(ql.init(jax.random.key(stable_seed("qlora", "init")), base, an), "p")
  return f, base, ql, adapters, x


def _loss(fn, x):
  target = jnp.cos(jnp.arange(8.0))
  return lambda *a: jnp.mean((fn(*a, x) - target) ** 2)


def test_init_forward_and_gradient_equal_dequantized_base(setup):
  f, base, ql, adapters, x = setup
  fresh = ql.init(jax.random.key(1), base, lb.analyze(f, lb.dequantize(base), x))
  assert all(np.all(np.asarray(a.b) == 0) for a in jax.tree.leaves(fresh, is_leaf=lambda n: isinstance(n, lb.Adapter)))
  assert_close(jax.jit(ql)(base, fresh, x), jax.jit(lb.quantized(f))(base, x), 1e-5)     # B = 0: the base model
  assert_close(jax.jit(ql)(base, adapters, x), jax.jit(f)(lb.merge(base, adapters), x), 1e-5)
  g = jax.jit(jax.grad(_loss(lambda ad, x: ql(base, ad, x), x)))(adapters)
  ref = jax.jit(jax.grad(_loss(lambda ad, x: f(lb.merge(base, ad), x), x)))(adapters)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
    assert_close(a, b, 1e-5)


def test_frozen_base_under_adam(setup):
  f, base, ql, adapters, x = setup
  g_base = jax.jit(jax.grad(_loss(lambda b, x: ql(b, adapters, x), x), allow_int=True))(base)
  for path, leaf in jax.tree_util.tree_flatten_with_path(g_base)[0]:
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert not np.any(np.asarray(leaf)), path                           # scales (and float leaves): zero
    else:
      assert leaf.dtype == jax.dtypes.float0, path                        # codes: float0
  before = jax.tree.map(np.array, base)
  opt = optax.adam(1e-2)
  loss = _loss(lambda ad, x: ql(base, ad, x), x)

  @jax.jit
  def step(ad, s):
    l, g = jax.value_and_grad(loss)(ad)
    with jax.numpy_dtype_promotion("standard"):
      u, s = opt.update(g, s, ad)
      return optax.apply_updates(ad, u), s, l

  with jax.numpy_dtype_promotion("standard"):
    s = opt.init(adapters)
  ad, losses = adapters, []
  for _ in range(6):
    ad, s, l = step(ad, s)
    losses.append(float(l))
  assert losses[-1] < losses[0]
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(base)):
    np.testing.assert_array_equal(a, np.asarray(b))                       # codes and scales never change
  rep = lb.memory_report((base, ad, s))
  kinds = {l.path: l for l in rep.leaves}
  nf4 = [l for p, l in kinds.items() if p.startswith("0/") and "NF4" in l.kind and "+DQ" in l.kind]
  qs = [l for l in jax.tree.leaves(base, is_leaf=is_q) if is_q(l)]
  assert sorted(l.nbytes for l in nf4) == sorted(q.nbytes for q in qs)     # the base at its packed NF4 bytes
  assert any(p.startswith("1/") and l.kind == "float32" for p, l in kinds.items())        # adapters
  assert any(p.startswith("2/") and l.kind == "float32" for p, l in kinds.items())        # adam moments


def test_training_step_holds_no_float_base_weight(setup):
  """The jaxpr of value_and_grad of the QLoRA loss (forward and backward, scan and remat included) computes no
  float array of a base weight's full shape: the packed matmul decodes one tile at a time in both directions."""
  f, base, ql, adapters, x = setup
  loss = _loss(lambda ad, x: ql(base, ad, x), x)
  shapes = set(float_shapes(jax.make_jaxpr(jax.value_and_grad(loss))(adapters)))
  dense = set(float_shapes(jax.make_jaxpr(jax.value_and_grad(_loss(lambda ad, x: f(lb.merge(base, ad), x), x)))(
      adapters)))
  for w in [l for l in jax.tree.leaves(base, is_leaf=is_q) if is_q(l)]:
    assert _decoded_shapes(w) & dense, w.shape                            # the check can fail
    assert not _decoded_shapes(w) & shapes, (w.shape, _decoded_shapes(w) & shapes)


@pytest.mark.parametrize("name", ["maxtext_scan", "gemma_style"])
def test_zoo_layouts(name):
  zoo = ZOO[name]()
  an = lb.analyze(zoo.apply, zoo.params, zoo.batch)
  base = lb.rtn(zoo.params, an, lb.nf4_spec(block_size=32))
  ql = lb.lora(zoo.apply, OPTS)
  ad = _perturb(ql.init(jax.random.key(0), base, an), name)
  assert_close(jax.jit(ql)(base, ad, zoo.batch), jax.jit(zoo.apply)(lb.merge(base, ad), zoo.batch), 1e-5)


def test_data_parallel_step_equals_one_device(setup):
  f, base, ql, adapters, x = setup
  n = 8
  assert jax.device_count() >= n
  one = jax.jit(jax.grad(lambda ad, x: _loss(lambda a, xx: ql(base, a, xx), x)(ad)))(adapters, x)
  mesh = Mesh(np.array(jax.devices()[:n]), ("data",))

  def local(ad, xs):   # the adapters are replicated: shard_map's transpose already sums their cotangents
    g = jax.grad(lambda a: _loss(lambda aa, xx: ql(base, aa, xx), xs)(a))(ad)
    return jax.tree.map(lambda t: t / n, g)                               # mean of the 8 shard means

  sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(PS(), PS("data")), out_specs=PS()))(adapters, x)
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(one)):
    assert_close(a, b, 1e-5)


def test_dropout_needs_a_key_and_is_off_in_eval(setup):
  f, base, _, adapters, x = setup
  ql = lb.lora(f, lb.LoraOptions(rank=4, alpha=8.0, dropout=0.5))
  with pytest.raises(ValueError, match="PRNG key"):
    ql(base, adapters, x)
  run = jax.jit(lambda k: ql(base, adapters, x, rng=k))
  a, b = run(jax.random.key(1)), run(jax.random.key(2))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(np.asarray(run(jax.random.key(1))), np.asarray(a))
  assert_close(jax.jit(lambda: ql(base, adapters, x, train=False))(), jax.jit(lb.lora(f, OPTS))(base, adapters, x))


def test_bad_input(setup):
  f, base, ql, adapters, x = setup
  an = lb.analyze(f, lb.dequantize(base), x)
  with pytest.raises(ValueError, match=r"params\['head'\]\['kernel'\]: LoRA rank 13 exceeds"):
    lb.lora(f, lb.LoraOptions(rank=13)).init(jax.random.key(0), base, an)
  with pytest.raises(ValueError, match="rank"):
    lb.LoraOptions(rank=0)
  with pytest.raises(ValueError, match=r"params\['head'\]\['kernel'\]: expected a QArray"):
    ql.init(jax.random.key(0), lb.dequantize(base), an, where=r"head/kernel$")
  grads = jax.jit(jax.grad(_loss(lambda ad, x: ql(base, ad, x), x)))(adapters)
  bad = jax.tree.map(lambda g: g, grads)
  bad["layers"]["up"]["kernel"].a = bad["layers"]["up"]["kernel"].a.at[0, 0, 0].set(jnp.nan)
  lb.check_finite(grads)
  with pytest.raises(ValueError, match=r"params\['layers'\]\['up'\]\['kernel'\]\.a"):
    lb.check_finite(bad)
  new = jax.tree.map(lambda a: a + 1.0, adapters)
  kept, ok = jax.jit(lb.skip_nonfinite)(bad, adapters, new)
  assert not bool(ok)
  for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(adapters)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))           # the step is skipped, nothing corrupted


def test_conv_use_raises_naming_the_weight():
  zoo = ZOO["conv"]()
  an = lb.analyze(zoo.apply, zoo.params, zoo.batch, where=r"kernel$")
  base = lb.rtn(zoo.params, an, lb.nf4_spec(block_size=32))
  ql = lb.lora(zoo.apply, OPTS)
  ad = ql.init(jax.random.key(0), base, an)
  with pytest.raises(ValueError, match=r"params\['conv1'\]\['kernel'\]: a LoRA adapter cannot attach"):
    ql(base, ad, zoo.batch)
