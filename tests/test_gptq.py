"""lowbit_jax.gptq on the real stories260K model: beats RTN against fp32, runs quantized through the passes,
handles scanned stacks and sequential re-capture, and rejects bad calibrations naming the key path; on a small
scanned model, dampening retries per layer on device."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.models.llama import Llama, stack_layers
from passhelpers import ScanModel, quantized_kl, random_like


def test_gptq_beats_rtn_on_the_real_model(stories260k, stories260k_calib):
  s = stories260k
  q_gptq = lb.gptq(s.params, stories260k_calib, lb.int_spec(4, group_size=32))
  q_rtn = lb.rtn(s.params, None, lb.int_spec(4, group_size=32))
  kl_gptq, kl_rtn = quantized_kl(s.apply, s.params, q_gptq, s.held), quantized_kl(s.apply, s.params, q_rtn, s.held)
  assert 0 < kl_gptq < 0.8 * kl_rtn, (kl_gptq, kl_rtn)
  assert isinstance(q_gptq["layers_0"]["attention"]["wq"]["kernel"], lb.QArray)
  assert not isinstance(q_gptq["tok_embeddings"]["embedding"], lb.QArray)
  assert not isinstance(s.params["layers_0"]["attention"]["wq"]["kernel"], lb.QArray)   # input untouched


def test_scanned_stack_and_sequential_mode(stories260k):
  m = stories260k.loaded
  model = Llama(m.config, scan_layers=True)
  apply = lambda p, t: model.apply({"params": p}, t)
  params = stack_layers(m.params, m.config.n_layers)
  calib = lb.calibrate(apply, params, stories260k.batches[:2])
  assert calib["layers/attention/wq/kernel"].hessian.shape == (5, 64, 64)
  q = lb.gptq(params, calib, lb.int_spec(3, group_size=32), true_sequential=True)
  wq = q["layers"]["attention"]["wq"]["kernel"]
  assert isinstance(wq, lb.QArray) and wq.shape == (5, 64, 64)
  q_rtn = lb.rtn(params, None, lb.int_spec(3, group_size=32))
  assert quantized_kl(apply, params, q, stories260k.held) < quantized_kl(apply, params, q_rtn, stories260k.held)


def test_bad_calibrations_name_the_path(stories260k):
  s = stories260k
  calib = lb.calibrate(s.apply, s.params, s.batches[:1], where=r"layers_0/attention/w[qk]/kernel")
  with pytest.raises(ValueError, match=r"params\['layers_0'\]\['attention'\]\['wv'\]\['kernel'\].*no statistics"):
    lb.gptq(s.params, calib, where=r"layers_0/attention/w[qkv]/kernel")
  other = jax.tree.map(lambda x: x, s.params)
  other["layers_0"]["attention"]["wq"]["kernel"] = jnp.ones((32, 64))   # another model: K = 32
  with pytest.raises(ValueError, match=r"params\['layers_0'\]\['attention'\]\['wq'\]\['kernel'\].*does not match"):
    lb.gptq(other, calib)
  with pytest.raises(ValueError, match=r"gptq: needs an integer QuantSpec.*NF4"):
    lb.gptq(s.params, calib, lb.nf4_spec())
  with pytest.raises(ValueError, match="Calibration"):
    lb.gptq(s.params, {"not": "a calibration"})


def test_dampening_retries_per_layer_of_a_scanned_stack():
  """A stack's layers are one `lax.map` on device: a layer whose Hessian needs more dampening gets it alone (a
  warning names it), a hopeless one raises naming it."""
  m = ScanModel()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 5)).astype(np.float32))
  params = random_like(jax.eval_shape(m.init, jax.random.PRNGKey(0), x)["params"], seed=1, scale=0.3)
  apply = lambda p, x: m.apply({"params": p}, x)
  calib = lb.calibrate(apply, params, [x], where=r"layers/up/kernel")
  wc = calib["layers/up/kernel"]
  assert wc.hessian.shape == (3, 16, 16)

  def with_layer(i, mat):
    stats = dataclasses.replace(wc.stats, xtx=wc.stats.xtx.at[i].set(mat))
    return dataclasses.replace(calib, weights={wc.path: dataclasses.replace(wc, stats=stats)})

  fixable = np.full((16, 16), 1e-6, np.float32) + np.eye(16, dtype=np.float32) * (1e-3 - 1e-6)
  fixable[0, 1] = fixable[1, 0] = 5e-3          # indefinite; fixed by percdamp 10 (three retries)
  hopeless = -np.eye(16, dtype=np.float32)        # negative mean diagonal: no dampening helps
  hopeless[0, 0] = 10.0
  spec, up = lb.int_spec(4), r"params\['layers'\]\['up'\]\['kernel'\]"
  ref = lb.gptq(params, calib, spec)["layers"]["up"]["kernel"]
  with pytest.warns(RuntimeWarning, match=up + r"\[1\]: Hessian not positive definite with percdamp=0.01; needed"):
    q = lb.gptq(params, with_layer(1, fixable), spec)["layers"]["up"]["kernel"]
  codes, ref_codes = np.asarray(q.codes), np.asarray(ref.codes)
  np.testing.assert_array_equal(codes[[0, 2]], ref_codes[[0, 2]])                  # the other layers: unchanged
  assert not np.array_equal(codes[1], ref_codes[1])
  with pytest.raises(ValueError, match=up + r"\[2\]: Hessian is not positive definite even with percdamp=1000"):
    lb.gptq(params, with_layer(2, hopeless), spec)
