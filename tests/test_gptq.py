"""lowbit_jax.gptq on the real stories260K model: beats RTN against fp32, runs quantized through the passes,
handles scanned stacks and sequential re-capture, and rejects bad calibrations naming the key path."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import eval as lbeval
from lowbit_jax.assets import asset_path
from lowbit_jax.io.gguf import load_gguf
from lowbit_jax.models.llama import Llama, stack_layers


@functools.lru_cache(maxsize=None)
def _model():
  m = load_gguf(asset_path("stories260K_gguf/stories260K.gguf"))
  train = asset_path("tinystories/tinystories_train_first2MiB.txt").read_text()[:60_000]
  val = asset_path("tinystories/tinystories_val_part1.txt").read_text()[:30_000]
  ids = np.asarray(m.tokenizer.encode(train))[: 8 * 128].reshape(8, 128)
  held = np.asarray(m.tokenizer.encode(val))[: 4 * 128].reshape(4, 128)
  return m, [jnp.asarray(ids[i:i + 2]) for i in range(0, 8, 2)], jnp.asarray(held)


def _kl(apply, fp_params, qparams, tokens):
  ref = apply(fp_params, tokens)
  out = jax.jit(lb.quantized(apply))(qparams, tokens)
  return float(lbeval.kl_divergence(ref, out))


def test_gptq_beats_rtn_on_the_real_model():
  m, batches, held = _model()
  model = Llama(m.config)
  apply = lambda p, t: model.apply({"params": p}, t)
  calib = lb.calibrate(apply, m.params, batches)
  q_gptq = lb.gptq(m.params, calib, bits=4, group_size=32)
  q_rtn = lb.rtn(m.params, lb.int_spec(4, group_size=32))
  kl_gptq, kl_rtn = _kl(apply, m.params, q_gptq, held), _kl(apply, m.params, q_rtn, held)
  assert 0 < kl_gptq < 0.8 * kl_rtn, (kl_gptq, kl_rtn)
  assert isinstance(q_gptq["layers_0"]["attention"]["wq"]["kernel"], lb.QArray)
  assert not isinstance(q_gptq["tok_embeddings"]["embedding"], lb.QArray)
  assert not isinstance(m.params["layers_0"]["attention"]["wq"]["kernel"], lb.QArray)   # input untouched


def test_scanned_stack_and_sequential_mode():
  m, batches, held = _model()
  model = Llama(m.config, scan_layers=True)
  apply = lambda p, t: model.apply({"params": p}, t)
  params = stack_layers(m.params, m.config.n_layers)
  calib = lb.calibrate(apply, params, batches[:2])
  assert calib["layers/attention/wq/kernel"].hessian.shape == (5, 64, 64)
  q = lb.gptq(params, calib, bits=3, group_size=32, true_sequential=True)
  wq = q["layers"]["attention"]["wq"]["kernel"]
  assert isinstance(wq, lb.QArray) and wq.shape == (5, 64, 64)
  q_rtn = lb.rtn(params, lb.int_spec(3, group_size=32))
  assert _kl(apply, params, q, held) < _kl(apply, params, q_rtn, held)


def test_bad_calibrations_name_the_path():
  m, batches, _ = _model()
  model = Llama(m.config)
  apply = lambda p, t: model.apply({"params": p}, t)
  calib = lb.calibrate(apply, m.params, batches[:1], where=r"layers_0/attention/w[qk]/kernel")
  with pytest.raises(ValueError, match=r"params\['layers_0'\]\['attention'\]\['wv'\]\['kernel'\].*no statistics"):
    lb.gptq(m.params, calib, where=r"layers_0/attention/w[qkv]/kernel")
  other = jax.tree.map(lambda x: x, m.params)
  other["layers_0"]["attention"]["wq"]["kernel"] = jnp.ones((32, 64))   # another model: K = 32
  with pytest.raises(ValueError, match=r"params\['layers_0'\]\['attention'\]\['wq'\]\['kernel'\].*does not match"):
    lb.gptq(other, calib)
  with pytest.raises(ValueError, match="bits"):
    lb.gptq(m.params, calib, bits=5)
  with pytest.raises(ValueError, match="Calibration"):
    lb.gptq(m.params, {"not": "a calibration"})
