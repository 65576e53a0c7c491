"""Perplexity windowing, KL / top-1 metrics, greedy decoding (random model and the real stories260K)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.assets import asset_path
from lowbit_jax.eval import (generate_greedy, kl_divergence, perplexity, token_kl_divergence, top1_agreement)
from lowbit_jax.models.llama import Llama, LlamaConfig

VOCAB = 7
BIGRAM = np.asarray(jax.random.normal(jax.random.key(0), (VOCAB, VOCAB), jnp.float32)) * 2.0


def bigram_apply(params: jax.Array, tokens: jax.Array) -> jax.Array:
  """A 'model' whose logits at a position depend only on that position's token: logits = params[token]."""
  return params[tokens]


def log_softmax_np(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_perplexity_equals_hand_computation(batch_size: int) -> None:
  stream = np.asarray(jax.random.randint(jax.random.key(1), (23,), 0, VOCAB, jnp.int32))
  seq_len = 5  # 4 windows of 5 (3 tokens dropped); 4 scored tokens per window
  logp = log_softmax_np(BIGRAM)
  nll = 0.0
  for w in range(4):
    win = stream[w * seq_len:(w + 1) * seq_len]
    nll -= sum(logp[win[i - 1], win[i]] for i in range(1, seq_len))  # win[0] is never scored
  result = perplexity(bigram_apply, jnp.asarray(BIGRAM), stream, seq_len=seq_len, batch_size=batch_size,
                      progress=False)
  assert (result.n_windows, result.n_tokens) == (4, 16)
  assert result.nll == pytest.approx(nll / 16, rel=1e-6)
  assert result.ppl == pytest.approx(math.exp(nll / 16), rel=1e-6)


def test_perplexity_of_uniform_model_is_vocab_size() -> None:
  result = perplexity(bigram_apply, jnp.zeros((VOCAB, VOCAB), jnp.float32), np.arange(40) % VOCAB, seq_len=8,
                      batch_size=2, progress=False)
  assert result.ppl == pytest.approx(VOCAB, rel=1e-6)


@pytest.mark.parametrize("stream, kwargs, match", [
    (np.arange(4) % VOCAB, dict(seq_len=5, batch_size=1), "too few"),
    (np.zeros((2, 10), np.int32), dict(seq_len=5, batch_size=1), "1-D"),
    (np.zeros(10, np.float32), dict(seq_len=5, batch_size=1), "integers"),
    (np.zeros(10, np.int32), dict(seq_len=1, batch_size=1), "seq_len"),
    (np.zeros(10, np.int32), dict(seq_len=5, batch_size=0), "batch_size"),
    (np.full(10, VOCAB, np.int32), dict(seq_len=5, batch_size=1), "vocabulary"),
    (np.full(10, -1, np.int32), dict(seq_len=5, batch_size=1), "negative"),
])
def test_perplexity_rejects_bad_input(stream: np.ndarray, kwargs: dict, match: str) -> None:
  with pytest.raises(ValueError, match=match):
    perplexity(bigram_apply, jnp.asarray(BIGRAM), stream, progress=False, **kwargs)


def test_perplexity_rejects_bad_logits() -> None:
  with pytest.raises(ValueError, match="logits"):
    perplexity(lambda p, t: p[t][:, :-1], jnp.asarray(BIGRAM), np.zeros(10, np.int32), seq_len=5, batch_size=1,
               progress=False)
  with pytest.raises(ValueError, match="logits"):
    perplexity(lambda p, t: t, jnp.asarray(BIGRAM), np.zeros(10, np.int32), seq_len=5, batch_size=1,
               progress=False)


def test_kl_divergence() -> None:
  p = np.asarray(jax.random.normal(jax.random.key(2), (3, 5, 11), jnp.float32)) * 3.0
  q = p + np.asarray(jax.random.normal(jax.random.key(3), p.shape, jnp.float32))
  assert float(kl_divergence(p, p)) == pytest.approx(0.0, abs=1e-6)
  lp, lq = log_softmax_np(p), log_softmax_np(q)
  want = np.sum(np.exp(lp) * (lp - lq), axis=-1)  # (3, 5)
  per_token = token_kl_divergence(p, q)
  assert per_token.shape == (3, 5) and per_token.dtype == jnp.float32
  np.testing.assert_allclose(per_token, want, rtol=1e-5, atol=1e-7)
  assert float(kl_divergence(p, q)) == pytest.approx(want.mean(), rel=1e-5)
  assert float(kl_divergence(p, q)) > 0.0
  assert float(kl_divergence(jnp.asarray(p, jnp.bfloat16), jnp.asarray(p, jnp.bfloat16))) == pytest.approx(0, abs=1e-6)
  # A masked (-inf) entry in p contributes nothing instead of nan.
  masked = np.where(np.arange(11) == 0, -np.inf, p).astype(np.float32)
  assert np.isfinite(float(kl_divergence(masked, q)))


def test_top1_agreement() -> None:
  p = np.zeros((4, 3), np.float32)
  p[np.arange(4), [0, 1, 2, 0]] = 1.0
  q = np.zeros((4, 3), np.float32)
  q[np.arange(4), [0, 1, 2, 1]] = 1.0
  assert float(top1_agreement(p, q)) == pytest.approx(0.75)
  assert float(top1_agreement(p, p)) == 1.0


@pytest.mark.parametrize("fn", [kl_divergence, token_kl_divergence, top1_agreement])
def test_metrics_reject_bad_input(fn) -> None:
  with pytest.raises(ValueError, match="shapes differ"):
    fn(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match="floating"):
    fn(np.zeros((2, 3), np.int32), np.zeros((2, 3), np.int32))


SMALL = LlamaConfig(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=23, hidden_dim=24, max_seq_len=32)


def test_generate_greedy_tokens_are_argmaxes_of_the_full_forward() -> None:
  model = Llama(SMALL)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
  rng = np.random.default_rng(0)  # N(0, 1) everywhere: sharp distributions, few near-ties
  params = jax.tree.map(lambda x: rng.standard_normal(x.shape, dtype=np.float32), shapes)
  prompt = [1, 5, 9]
  out = generate_greedy(model, params, prompt, max_new_tokens=10)
  assert out.shape == (10,) and out.dtype == np.int32
  # By causality, one full forward pass over prompt + output checks every step: each new token must be the argmax
  # of the logits at the position before it.
  full = jax.jit(model.apply)({"params": params}, jnp.asarray([prompt + out.tolist()], jnp.int32))  # (1, 13, V)
  np.testing.assert_array_equal(np.argmax(full[0, 2:-1], axis=-1), out)
  stop = int(out[4])
  cut = generate_greedy(SMALL, params, prompt, max_new_tokens=10, stop_token=stop)
  np.testing.assert_array_equal(cut, out[:int(np.flatnonzero(out == stop)[0])])


def test_generate_greedy_rejects_bad_input() -> None:
  params = jax.eval_shape(Llama(SMALL).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
  with pytest.raises(ValueError, match="at least one"):
    generate_greedy(SMALL, params, [], max_new_tokens=3)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate_greedy(SMALL, params, [1], max_new_tokens=0)
  with pytest.raises(ValueError, match="max_seq_len"):
    generate_greedy(SMALL, params, [1, 2], max_new_tokens=32)


def test_stories260k_greedy_reproduces_documented_output(stories260k) -> None:
  """llama2.c `run stories260K.bin -z tok512.bin -t 0.0` prints 256 greedy tokens after BOS (its default 256 steps):
  our first 256 tokens decode to exactly that text and equal its encoding. Decoding on, the model emits BOS a
  little later (at step ~345), where run.c -- and we, with stop_token -- stop."""
  loaded = stories260k.loaded
  tok = loaded.tokenizer
  md = asset_path("stories260K_gguf/stories260K.md").read_text(encoding="utf-8")
  documented = md.split("-t 0.0\n", 1)[1].split("```", 1)[0].rstrip("\n")
  assert documented.startswith("Once upon a time") and len(documented) > 500
  out = generate_greedy(Llama(loaded.config), loaded.params, [tok.bos_id], max_new_tokens=400,
                        stop_token=tok.bos_id)
  assert 256 <= len(out) < 400 and tok.bos_id not in out
  assert tok.decode([tok.bos_id] + out[:256].tolist()) == documented
  np.testing.assert_array_equal(out[:256], tok.encode(documented, bos=False))
