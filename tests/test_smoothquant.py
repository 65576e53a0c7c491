"""lowbit_jax.smoothquant on the real stories260K model: W8A8 through `quantized(apply)` under jit within 1% of the
fp32 perplexity and no worse than W8A8 without smoothing; the smoothing scales follow smooth.py; same-input weights
share one s; bad inputs raise naming the key path and leave the params untouched."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import eval as lbeval
from lowbit_jax.algorithms.smoothquant import smoothing_groups, smoothing_scales, smoothquant
from lowbit_jax.models.llama import Llama, stack_layers
from lowbit_jax.spec import ActQuant, Format, QuantSpec

WQ = "params['layers_1']['attention']['wq']['kernel']"
HELD = 4096   # validation tokens (32 windows of 128) the perplexities and KLs are measured on


def _ppl(apply, params, held):
  return lbeval.perplexity(apply, params, held, seq_len=128, batch_size=8, progress=False).ppl


def _kl(apply, params, qapply, qparams, held):
  """Mean KL(fp32 || quantized) over the held-out windows, in batches of 8 windows of 128 tokens."""
  tokens = jnp.asarray(held.reshape(-1, 8, 128))
  fapply = jax.jit(apply)
  return float(np.mean([lbeval.kl_divergence(fapply(params, t), qapply(qparams, t)) for t in tokens]))


def test_smoothquant_w8a8_matches_fp32_and_beats_plain_w8a8(stories260k, stories260k_calib):
  m, apply, calib, held = stories260k.loaded, stories260k.apply, stories260k_calib, stories260k.val[:HELD]
  q_sq = smoothquant(m.params, calib, alpha=0.5, fold=False)
  q_plain = lb.rtn(m.params, None, QuantSpec(format=Format.INT, bits=8, activations=ActQuant(per_token=True)))
  qapply = jax.jit(lb.quantized(apply))
  ppl_fp = _ppl(apply, m.params, held)
  ppl_sq, ppl_plain = _ppl(qapply, q_sq, held), _ppl(qapply, q_plain, held)
  kl_sq, kl_plain = _kl(apply, m.params, qapply, q_sq, held), _kl(apply, m.params, qapply, q_plain, held)
  print(f"stories260K, {held.size} held-out tokens: ppl fp32 {ppl_fp:.4f}, SmoothQuant a=0.5 W8A8 {ppl_sq:.4f}, "
        f"plain W8A8 {ppl_plain:.4f}; KL to fp32: SmoothQuant {kl_sq:.3e}, plain {kl_plain:.3e}")
  assert abs(ppl_sq / ppl_fp - 1) < 0.01 and abs(ppl_plain / ppl_fp - 1) < 0.01
  # KL to fp32 is the sensitive measure here; the perplexities of both differ from fp32's by < 0.1%, so their
  # difference is noise: SmoothQuant must be no worse than that noise.
  assert 0 < kl_sq < kl_plain
  assert ppl_sq <= ppl_plain * 1.001
  w = q_sq["layers_1"]["attention"]["wq"]["kernel"]
  assert isinstance(w, lb.QArray) and w.in_scale is not None and w.spec.activations == ActQuant()
  assert not isinstance(q_sq["tok_embeddings"]["embedding"], lb.QArray)
  assert not isinstance(m.params["layers_1"]["attention"]["wq"]["kernel"], lb.QArray)   # input untouched


def test_scales_follow_smooth_py_and_groups_share_them(stories260k, stories260k_calib):
  m, calib = stories260k.loaded, stories260k_calib
  groups = smoothing_groups(m.params, calib)
  assert [WQ, WQ.replace("wq", "wk"), WQ.replace("wq", "wv")] in groups
  assert [WQ.replace("wq", "wo")] in groups and len(groups) == 4 * 5
  q = smoothquant(m.params, calib, alpha=0.5, fold=False)
  att = m.params["layers_1"]["attention"]
  w_max = np.max([np.max(np.abs(np.asarray(att[n]["kernel"])), axis=1) for n in ("wq", "wk", "wv")], axis=0)
  act = np.asarray(calib[WQ].absmax)
  expect = np.maximum(np.sqrt(act) / np.sqrt(np.maximum(w_max, 1e-5)), 1e-5)
  for n in ("wq", "wk", "wv"):
    np.testing.assert_allclose(np.asarray(q["layers_1"]["attention"][n]["kernel"].in_scale).ravel(), expect,
                               rtol=1e-5)
  np.testing.assert_allclose(smoothing_scales([4.0, 0.0], [1.0, 0.0], 0.5), [2.0, 1e-5], rtol=1e-6)
  np.testing.assert_allclose(smoothing_scales([4.0], [0.25], 1.0), [4.0], rtol=1e-6)


def test_scanned_stack_gets_per_layer_scales(stories260k):
  m, held = stories260k.loaded, stories260k.val[:HELD]
  model = Llama(m.config, scan_layers=True)
  sapply = lambda p, t: model.apply({"params": p}, t)
  params = stack_layers(m.params, m.config.n_layers)
  tokens = jnp.asarray(held[:256].reshape(2, 128))
  calib = lb.calibrate(sapply, params, [tokens])
  q = smoothquant(params, calib, where=r"layers/attention/w[qkv]/kernel", fold=False)
  wq = q["layers"]["attention"]["wq"]["kernel"]
  assert wq.shape == (5, 64, 64) and wq.in_scale.shape[:2] == (5, 64)
  assert not isinstance(q["layers"]["attention"]["wo"]["kernel"], lb.QArray)
  out = jax.jit(lb.quantized(sapply))(q, tokens)
  assert float(lbeval.kl_divergence(jax.jit(sapply)(params, tokens), out)) < 5e-3


def test_bad_inputs_name_the_path_and_leave_params_untouched(stories260k, stories260k_calib):
  m, apply, calib = stories260k.loaded, stories260k.apply, stories260k_calib
  before = jax.tree.map(np.asarray, m.params)
  other = jax.tree.map(lambda x: x, m.params)
  other["layers_1"]["attention"]["wq"]["kernel"] = jnp.ones((32, 64))   # another model: K = 32
  with pytest.raises(ValueError, match=r"params\['layers_1'\]\['attention'\]\['wq'\]\['kernel'\].*does not match"):
    smoothquant(other, calib)
  nan = dataclasses.replace(calib[WQ].stats, absmax=calib[WQ].absmax.at[3].set(jnp.nan))
  bad = dataclasses.replace(calib, weights={**calib.weights, calib[WQ].path: dataclasses.replace(calib[WQ], stats=nan)})
  with pytest.raises(ValueError, match=r"params\['layers_1'\]\['attention'\]\['wq'\]\['kernel'\].*NaN"):
    smoothquant(m.params, bad)
  no_absmax = lb.calibrate(apply, m.params, list(calib.batches[:1]), stats={lb.Stat.HESSIAN},
                           where=r"layers_0/attention/wq/kernel")
  with pytest.raises(ValueError, match=r"params\['layers_0'\]\['attention'\]\['wq'\]\['kernel'\].*absmax"):
    smoothquant(m.params, no_absmax)
  with pytest.raises(ValueError, match=r"params\['layers_0'\]\['attention'\]\['wk'\]\['kernel'\].*no statistics"):
    smoothquant(m.params, no_absmax, where=r"layers_0/attention/w[qk]/kernel")
  nan_w = jax.tree.map(lambda x: x, m.params)
  w2 = jnp.asarray(nan_w["layers_4"]["feed_forward"]["w2"]["kernel"])
  nan_w["layers_4"]["feed_forward"]["w2"]["kernel"] = w2.at[0, 0].set(jnp.inf)
  with pytest.raises(ValueError, match=r"params\['layers_4'\]\['feed_forward'\]\['w2'\]\['kernel'\].*finite"):
    smoothquant(nan_w, calib)
  for alpha in (-0.1, 1.5, True, "0.5"):
    with pytest.raises(ValueError, match="alpha"):
      smoothquant(m.params, calib, alpha=alpha)
  with pytest.raises(ValueError, match="Calibration"):
    smoothquant(m.params, {"not": "a calibration"})
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(m.params)):
    np.testing.assert_array_equal(a, b)
