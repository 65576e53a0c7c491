"""passes/fold.py: which norm-like parameters a per-input-channel scale folds into (reference Llama unrolled and
scanned, flax's RMSNorm, residual / extra uses / no norm that must not fold), the float identity of folding with
random scales, and AWQ with `fold=True` on the real stories260K model (same KL as the in_scale path)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import eval as lbeval
from lowbit_jax.algorithms.awq import awq
from lowbit_jax.algorithms.smoothquant import smoothquant
from lowbit_jax.models.llama import Llama, LlamaConfig
from lowbit_jax.passes.fold import fold, fold_scales, fold_targets, group_target
from passhelpers import assert_close, dequantized, random_like

CFG = LlamaConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=32, hidden_dim=24, tie_embeddings=False)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 8)), jnp.int32)


@functools.lru_cache(maxsize=None)
def _llama(scan: bool):
  model = Llama(CFG, scan_layers=scan)
  apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
  params = random_like(jax.eval_shape(model.init, jax.random.PRNGKey(0), TOKENS)["params"], seed=1, scale=0.3)
  return apply, params


def _random_scales(targets, seed=0):
  rng = np.random.default_rng(seed)
  leaves = {t.where: t for t in targets.values()}
  return {w: jnp.asarray(np.exp(rng.normal(0.0, 0.5, t.leaf_shape)), jnp.float32) for w, t in leaves.items()}


def test_unrolled_llama_folds_norms_into_qkv_gate_up_and_head():
  apply, params = _llama(False)
  targets = fold_targets(apply, params, TOKENS)
  expected = {}
  for i in range(CFG.n_layers):
    layer = f"params['layers_{i}']"
    for mod, norm, names in (("attention", "attention_norm", "wq wk wv"), ("feed_forward", "ffn_norm", "w1 w3")):
      for n in names.split():
        expected[f"{layer}['{mod}']['{n}']['kernel']"] = f"{layer}['{norm}']['scale']"
  expected["params['output']['kernel']"] = "params['norm']['scale']"
  assert {w: t.where for w, t in targets.items()} == expected                     # wo / w2: inputs are not norms
  t = targets["params['layers_0']['attention']['wk']['kernel']"]
  assert t.weights == tuple(f"params['layers_0']['attention']['{n}']['kernel']" for n in ("wq", "wk", "wv"))
  assert t.leaf_shape == (16,) and t.contract_axes == (0, 0, 0)
  assert group_target(targets, list(t.weights)) is t
  assert group_target(targets, list(t.weights[:2])) is None                       # not every consumer
  assert group_target(targets, ["params['layers_0']['attention']['wo']['kernel']"]) is None
  folded = fold(params, targets, _random_scales(targets))
  assert not np.allclose(folded["layers_0"]["attention_norm"]["scale"], params["layers_0"]["attention_norm"]["scale"])
  assert_close(apply(folded, TOKENS), apply(params, TOKENS), 1e-5)


def test_scanned_llama_folds_per_layer():
  apply, params = _llama(True)
  targets = fold_targets(apply, params, TOKENS)
  t = targets["params['layers']['feed_forward']['w3']['kernel']"]
  assert t.where == "params['layers']['ffn_norm']['scale']" and t.leaf_shape == (2, 16) and t.stack == (2,)
  assert t.contract_axes == (1, 1)
  expected = [f"params['layers']['attention']['{n}']['kernel']" for n in ("wq", "wk", "wv")]
  expected += [f"params['layers']['feed_forward']['{n}']['kernel']" for n in ("w1", "w3")]
  assert sorted(targets) == sorted(expected + ["params['output']['kernel']"])
  scales = _random_scales(targets, seed=1)
  folded = fold(params, targets, scales)
  assert_close(apply(folded, TOKENS), apply(params, TOKENS), 1e-5)
  # the stacked scale is per layer: folding layer 1 only leaves layer 0's norm alone
  s = scales["params['layers']['ffn_norm']['scale']"].at[0].set(1.0)
  one = fold_scales(params, {"params['layers']['ffn_norm']['scale']": s})
  np.testing.assert_array_equal(one["layers"]["ffn_norm"]["scale"][0], params["layers"]["ffn_norm"]["scale"][0])


class _Residual(nn.Module):
  """flax's RMSNorm feeding two Dense; `residual` adds the norm output to the result too (must not fold);
  `reuse` adds the norm's scale to it, `relu`
  applies a relu to the norm's output (neither may fold); the last Dense sees no norm (in_scale kept)."""
  residual: bool = False
  reuse: bool = False
  relu: bool = False

  @nn.compact
  def __call__(self, x):
    norm = nn.RMSNorm(name="norm")
    h = jax.nn.relu(norm(x)) if self.relu else norm(x)             # relu: a custom_jvp function of h
    y = nn.Dense(16, use_bias=False, name="a")(h) * nn.Dense(16, use_bias=False, name="b")(h)
    if self.residual:
      y = y + h
    if self.reuse:
      y = y + norm.variables["params"]["scale"]
    return nn.Dense(8, use_bias=False, name="out")(y)


def _toy(**kw):
  m = _Residual(**kw)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5, 16)), jnp.float32)
  params = random_like(jax.eval_shape(m.init, jax.random.PRNGKey(0), x)["params"], seed=3, scale=0.5)
  return jax.jit(lambda p, x: m.apply({"params": p}, x)), params, x


def test_flax_rmsnorm_folds_and_float_identity():
  apply, params, x = _toy()
  targets = fold_targets(apply, params, x)
  assert {w: t.where for w, t in targets.items()} == {
      "params['a']['kernel']": "params['norm']['scale']", "params['b']['kernel']": "params['norm']['scale']"}
  assert "params['out']['kernel']" not in targets                                  # no norm before it
  assert_close(apply(fold(params, targets, _random_scales(targets, seed=4)), x), apply(params, x), 1e-5)


@pytest.mark.parametrize("kw", [dict(residual=True), dict(reuse=True), dict(relu=True)])
def test_other_consumers_block_folding(kw):
  apply, params, x = _toy(**kw)
  assert fold_targets(apply, params, x) == {}
  # partly selected consumers do not fold either (the unselected Dense would see x / s)
  apply, params, x = _toy()
  assert fold_targets(apply, params, x, where=r"a/kernel") == {}


def test_fold_scales_rejects_bad_scales_naming_the_path():
  _, params, _ = _toy()
  with pytest.raises(ValueError, match=r"params\['norm'\]\['scale'\].*shape"):
    fold_scales(params, {"params['norm']['scale']": jnp.ones((3,))})
  with pytest.raises(ValueError, match=r"params\['norm'\]\['scale'\].*positive"):
    fold_scales(params, {"params['norm']['scale']": -jnp.ones((16,))})
  with pytest.raises(ValueError, match=r"params\['nope'\].*lack"):
    fold_scales(params, {"params['nope']": jnp.ones((16,))})


def test_awq_folds_into_norms_on_the_real_model(stories260k, stories260k_calib, stories260k_awq4):
  m, apply, held, calib = stories260k.loaded, stories260k.apply, stories260k.held, stories260k_calib
  q = awq(m.params, calib, lb.int_spec(4, group_size=32), fold=True)
  ref = stories260k_awq4
  for i in range(m.config.n_layers):
    layer, before = q[f"layers_{i}"], m.params[f"layers_{i}"]
    for mod, names in (("attention", ("wq", "wk", "wv")), ("feed_forward", ("w1", "w3"))):
      for n in names:
        assert layer[mod][n]["kernel"].in_scale is None, (i, n)
        np.testing.assert_array_equal(layer[mod][n]["kernel"].codes, ref[f"layers_{i}"][mod][n]["kernel"].codes)
    assert layer["attention"]["wo"]["kernel"].in_scale is not None
    assert layer["feed_forward"]["w2"]["kernel"].in_scale is not None
    s = np.asarray(ref[f"layers_{i}"]["attention"]["wq"]["kernel"].in_scale)[:, 0]
    np.testing.assert_allclose(layer["attention_norm"]["scale"], np.asarray(before["attention_norm"]["scale"]) / s,
                               rtol=1e-6)
  np.testing.assert_array_equal(q["norm"]["scale"], m.params["norm"]["scale"])         # tied head: not selected
  # the float functions the two trees stand for (one compile)
  run = jax.jit(apply)
  fp = run(m.params, held)
  kl_fold = float(lbeval.kl_divergence(fp, run(dequantized(q), held)))
  kl_in = float(lbeval.kl_divergence(fp, run(dequantized(ref), held)))
  assert 0 < kl_fold and abs(kl_fold - kl_in) <= 1e-4 * kl_in + 1e-6, (kl_fold, kl_in)
  out = jax.jit(lb.quantized(apply))(q, held)                                       # kernels, no in_scale
  np.testing.assert_allclose(out, run(dequantized(q), held), rtol=1e-3, atol=1e-3)


def test_smoothquant_folds_into_the_norm():
  apply, params, x = _toy()
  calib = lb.calibrate(apply, params, [x])
  ref = smoothquant(params, calib, fold=False)
  q = smoothquant(params, calib, fold=True)
  assert q["a"]["kernel"].in_scale is None and q["b"]["kernel"].in_scale is None
  assert q["out"]["kernel"].in_scale is not None                                      # no norm before it
  s = np.asarray(ref["a"]["kernel"].in_scale)[:, 0]
  np.testing.assert_allclose(q["norm"]["scale"], np.asarray(params["norm"]["scale"]) / s, rtol=1e-6)
  run = jax.jit(lb.quantized(apply))
  np.testing.assert_allclose(run(q, x), run(ref, x), rtol=1e-4, atol=1e-4)
