"""lowbit_jax.llm_int8 on the real stories260K model: runs through `quantized(apply)` under jit within 1% of the fp32
perplexity and closer to fp32 than W8A8 without the float outlier path; the calibrated variant quantizes the same
weights; `outlier_report` counts outlier columns from a calibration; bad inputs raise naming the key path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import eval as lbeval
from lowbit_jax.algorithms.llm_int8 import llm_int8, llm_int8_spec, outlier_report
from lowbit_jax.spec import ActQuant

WQ = "params['layers_1']['attention']['wq']['kernel']"
HELD = 4096   # validation tokens (32 windows of 128) the perplexities and KLs are measured on


def _kl(apply, params, qapply, qparams, held):
  tokens = jnp.asarray(held.reshape(-1, 8, 128))
  fapply = jax.jit(apply)
  return float(np.mean([lbeval.kl_divergence(fapply(params, t), qapply(qparams, t)) for t in tokens]))


def test_llm_int8_on_the_real_model(stories260k):
  m, apply, held = stories260k.loaded, stories260k.apply, stories260k.val[:HELD]
  q = llm_int8(m.params)
  no_outliers = llm_int8(m.params, None, llm_int8_spec(threshold=1e30))     # every column int8: plain W8A8
  qapply = jax.jit(lb.quantized(apply))
  ppl_fp = lbeval.perplexity(apply, m.params, held, seq_len=128, batch_size=8, progress=False).ppl
  ppl_q = lbeval.perplexity(qapply, q, held, seq_len=128, batch_size=8, progress=False).ppl
  kl_q, kl_plain = _kl(apply, m.params, qapply, q, held), _kl(apply, m.params, qapply, no_outliers, held)
  print(f"stories260K, {held.size} held-out tokens: ppl fp32 {ppl_fp:.4f}, LLM.int8() (t=6) {ppl_q:.4f}; KL to fp32: "
        f"LLM.int8() {kl_q:.3e}, all-int8 (t=inf) {kl_plain:.3e}")
  assert abs(ppl_q / ppl_fp - 1) < 0.01
  assert 0 < kl_q < kl_plain
  w = q["layers_1"]["attention"]["wq"]["kernel"]
  assert isinstance(w, lb.QArray) and w.spec.activations == ActQuant(outlier_threshold=6.0) and w.in_scale is None
  assert w.spec.bits == 8 and w.zero is None and w.scale.shape == (1, 64)   # symmetric, per output channel
  assert not isinstance(m.params["layers_1"]["attention"]["wq"]["kernel"], lb.QArray)   # input untouched


def test_calibrated_variant_quantizes_the_same_weights(stories260k, stories260k_calib):
  m, calib = stories260k.loaded, stories260k_calib
  a, b = llm_int8(m.params), llm_int8(m.params, calib)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  sub = llm_int8(m.params, calib, llm_int8_spec(threshold=4.0), where=r"attention/wq")
  assert isinstance(sub["layers_0"]["attention"]["wq"]["kernel"], lb.QArray)
  assert not isinstance(sub["layers_0"]["attention"]["wk"]["kernel"], lb.QArray)
  assert sub["layers_0"]["attention"]["wq"]["kernel"].spec.activations.outlier_threshold == 4.0


def test_outlier_report(stories260k_calib):
  calib = stories260k_calib
  r = outlier_report(calib)
  assert len(r.rows) == len(calib) == 35 and r.threshold == r.calibration_threshold == 6.0
  row = next(x for x in r.rows if x.where == WQ)
  absmax = np.asarray(calib[WQ].absmax)
  assert row.k == 64 and row.outlier_columns == int(np.sum(absmax > 6.0)) > 0
  assert row.max_abs == pytest.approx(float(absmax.max()))
  assert row.entry_fraction == pytest.approx(float(np.mean(np.asarray(calib[WQ].outlier_fraction))))
  assert 0 < r.layers_with_outliers < len(r.rows)
  md = r.markdown()
  assert md.startswith("| weight | K | outlier columns") and WQ in md and str(r) == md
  print(md)
  assert outlier_report(calib, threshold=1e9).total_outlier_columns == 0
  assert outlier_report(calib, threshold=0.0).total_outlier_columns == sum(x.k for x in r.rows)


def test_bad_inputs_name_the_path(stories260k, stories260k_calib):
  m, calib = stories260k.loaded, stories260k_calib
  for t in (-1.0, float("nan"), None, "6"):
    with pytest.raises(ValueError, match="threshold"):
      llm_int8_spec(threshold=t)
  with pytest.raises(ValueError, match=r"llm_int8: expected an 8-bit integer QuantSpec with ActQuant\(outlier"):
    llm_int8(m.params, None, lb.int_spec(8))
  other = jax.tree.map(lambda x: x, m.params)
  other["layers_1"]["attention"]["wq"]["kernel"] = jnp.ones((32, 64))   # another model: K = 32
  with pytest.raises(ValueError, match=r"params\['layers_1'\]\['attention'\]\['wq'\]\['kernel'\].*does not match"):
    llm_int8(other, calib)
  with pytest.raises(ValueError, match=r"params\['norm'\]\['scale'\].*contraction axis"):
    llm_int8(m.params, where=r"^norm/")
  with pytest.raises(ValueError, match=r"params\['tok_embeddings'\]\['embedding'\].*no statistics"):
    llm_int8(m.params, calib, where=r"tok_embeddings")
  with pytest.raises(ValueError, match="Calibration"):
    outlier_report({"not": "a calibration"})
