"""Zero model-code edits: the reference Llama (unrolled and nn.scan layouts) and transformers' Flax Llama / GPT-2.

For each model the capture pass finds every weight-consuming dot (count asserted) and
`quantized(apply)(rtn(params))` equals `apply(dequantized params)`.
"""
import jax
import pytest
import transformers  # a dev dependency (pyproject): the zoo tests must run, never skip

import lowbit_jax as lb
from lowbit_jax import passes as P
from lowbit_jax.models import llama
from passhelpers import assert_close, dequantized, random_like

SPEC = lb.int_spec(4, group_size=16)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_reference_llama(scan_layers):
  cfg = llama.LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48)
  model = llama.Llama(cfg, scan_layers=scan_layers)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
  params = random_like(jax.eval_shape(model.init, jax.random.key(1), tokens)["params"])
  f = lambda p, t: model.apply({"params": p}, t)
  cal = P.calibrate(f, params, [tokens, tokens[::-1]])
  n_dots = 7 * (1 if scan_layers else cfg.n_layers) + 1             # wq wk wv wo w1 w3 w2 per layer, output
  dots = [s for s in P.analyze(f, params, tokens).sites if s.kind is P.SiteKind.DOT]
  assert len(cal) == n_dots and len(dots) == n_dots
  wq = cal["layers/attention/wq/kernel" if scan_layers else "layers_1/attention/wq/kernel"]
  assert wq.hessian.shape == ((2, 32, 32) if scan_layers else (32, 32))
  q = lb.rtn(params, None, SPEC)
  qf = P.quantized(f)
  assert_close(jax.jit(qf)(q, tokens), jax.jit(f)(dequantized(q), tokens), 1e-4)
  assert qf.last_notes == []


def _hf(cls, cfg, ids):
  with jax.numpy_dtype_promotion("standard"):
    model = cls(cfg, _do_init=False, input_shape=ids.shape)    # eval_shape of the init: abstract, no compile
  return model, random_like(model.params_shape_tree)


def test_transformers_llama():
  cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
  ids = jax.random.randint(jax.random.key(2), (2, 8), 0, 64)
  model, params = _hf(transformers.FlaxLlamaForCausalLM, cfg, ids)
  f = lambda p, ids: model(ids, params=p).logits
  with jax.numpy_dtype_promotion("standard"):
    cal = P.calibrate(f, params, [ids])
    assert len(cal) == 7 * 2 + 1
    q = lb.rtn(params, None, SPEC)
    qf = P.quantized(f)
    assert_close(jax.jit(qf)(q, ids), jax.jit(f)(dequantized(q), ids), 1e-4)
  assert qf.last_notes == []


def test_transformers_gpt2_conv1d_and_tied_head():
  cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)
  ids = jax.random.randint(jax.random.key(3), (2, 8), 0, 64)
  model, params = _hf(transformers.FlaxGPT2LMHeadModel, cfg, ids)
  f = lambda p, ids: model(ids, params=p).logits
  where = r"(kernel|wte/embedding)$"
  with jax.numpy_dtype_promotion("standard"):
    cal = P.calibrate(f, params, [ids], where=where)
    assert len(cal) == 4 * 2 + 1                                     # c_attn c_proj c_fc c_proj, tied lm head
    # Conv1D kernels are stored (out, in): the analysis reports the contraction on leaf axis 1
    assert cal["transformer/h/0/attn/c_attn/kernel"].contract_axes == (1,)
    assert cal["transformer/wte/embedding"].contract_axes == (1,)
    q = lb.rtn(params, None, lb.int_spec(8, axis=-1), where=where)     # quantize along the contraction axis
    qf = P.quantized(f)
    assert_close(jax.jit(qf)(q, ids), jax.jit(f)(dequantized(q), ids), 1e-4)
    runs = {w.where: w.impls for w in qf.report(q, ids).weights}
  assert not qf.last_notes                                     # the token lookup gathers codes: nothing dequantized
  assert runs["params['transformer']['wte']['embedding']"] == {P.Impl.ROWS, P.Impl.REFERENCE}
