"""Batched greedy generation (lowbit_jax.eval.generate_greedy_batch) and the left padding under it
(`Llama(..., left_pad=...)`): padded rows compute as if alone, every row equals batch-1 `generate_greedy`, one
compilation per shape, and generation on QArray params through `lowbit_jax.quantized(CachedApply(model=...))`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import eval as ev
from lowbit_jax.eval import CachedApply, generate_greedy, generate_greedy_batch
from lowbit_jax.models.llama import Llama, LlamaConfig, init_cache, stack_layers

SMALL = LlamaConfig(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=23, hidden_dim=24, max_seq_len=32)
PROMPTS = [[1, 5, 9], [1], [3, 4, 5, 6, 7, 8, 9, 10, 11], [22, 0, 7, 7, 7]]


@pytest.fixture(scope="module")
def params() -> dict:
  """N(0, 1) everywhere: sharp distributions, few near-ties between argmaxes."""
  shapes = jax.eval_shape(Llama(SMALL).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape, dtype=np.float32), shapes)


@pytest.fixture(scope="module")
def alone(params) -> list[np.ndarray]:
  """Each prompt's logits, run alone without a cache: (len(prompt), vocab)."""
  apply = jax.jit(Llama(SMALL).apply)
  return [np.asarray(apply({"params": params}, jnp.asarray([p])))[0] for p in PROMPTS]


def _left_padded(prompts: list[list[int]], filler: int) -> tuple[np.ndarray, np.ndarray]:
  width = max(map(len, prompts))
  pad = np.asarray([width - len(p) for p in prompts], np.int32)
  return np.asarray([[filler] * k + p for k, p in zip(pad, prompts)], np.int32), pad


@pytest.mark.parametrize("with_cache", [True, False])
def test_left_padded_rows_compute_as_if_alone(params, alone, with_cache):
  """Each row's logits at its real slots equal the unpadded row run alone; what the padding holds never matters."""
  model = Llama(SMALL)

  def run(tokens: np.ndarray, pad: np.ndarray) -> np.ndarray:
    kw = dict(cache=init_cache(SMALL, len(tokens), tokens.shape[1] + 3)) if with_cache else {}
    out = jax.jit(lambda p, t, lp: model.apply({"params": p}, t, left_pad=lp, **kw))(params, tokens, pad)
    return np.asarray(out[0] if with_cache else out)

  tokens, pad = _left_padded(PROMPTS, filler=0)
  logits = run(tokens, pad)
  other = run(_left_padded(PROMPTS, filler=17)[0], pad)
  assert np.all(np.isfinite(logits))
  for row, k in enumerate(pad):
    np.testing.assert_array_equal(logits[row, k:], other[row, k:])  # the padding is never read
    want = alone[row]
    np.testing.assert_allclose(logits[row, k:], want, rtol=0, atol=1e-5 * np.abs(want).max())  # float rounding


def test_rows_equal_generate_greedy(params):
  rows = generate_greedy_batch(SMALL, params, PROMPTS, max_new_tokens=10)
  assert len(rows) == len(PROMPTS)
  for prompt, row in zip(PROMPTS, rows):
    assert row.shape == (10,) and row.dtype == np.int32
    np.testing.assert_array_equal(row, generate_greedy(SMALL, params, prompt, max_new_tokens=10))
  assert len({tuple(r) for r in rows}) == len(PROMPTS)  # the rows really differ
  # Stop tokens cut each row on its own; the scanned layout gives the same tokens.
  stop = int(rows[0][3])
  cut = generate_greedy_batch(Llama(SMALL, scan_layers=True), stack_layers(params, SMALL.n_layers), PROMPTS,
                              max_new_tokens=10, stop_token=stop)
  for row, got in zip(rows, cut):
    hits = np.flatnonzero(row == stop)
    np.testing.assert_array_equal(got, row[:hits[0]] if hits.size else row)


def test_one_compilation_per_shape(params):
  generate_greedy_batch(SMALL, params, PROMPTS[:2], max_new_tokens=4)
  before = ev._greedy_batch._cache_size()
  generate_greedy_batch(Llama(SMALL), jax.tree.map(lambda x: x + 0, params), [[5], [6, 7, 8]], max_new_tokens=4)
  assert ev._greedy_batch._cache_size() == before  # same (B, P, new tokens), equal CachedApply: reused
  generate_greedy_batch(SMALL, params, PROMPTS[:2], max_new_tokens=5)
  assert ev._greedy_batch._cache_size() == before + 1


def test_rejects_bad_input(params):
  with pytest.raises(ValueError, match="at least one prompt"):
    generate_greedy_batch(SMALL, params, [], max_new_tokens=3)
  with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
    generate_greedy_batch(SMALL, params, [[1], []], max_new_tokens=3)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate_greedy_batch(SMALL, params, [[1]], max_new_tokens=0)
  with pytest.raises(ValueError, match="max_seq_len"):
    generate_greedy_batch(SMALL, params, [[1], [1, 2]], max_new_tokens=32)
  with pytest.raises(ValueError, match="integers"):
    generate_greedy_batch(SMALL, params, [[1.5]], max_new_tokens=3)
  with pytest.raises(ValueError, match="left_pad"):
    Llama(SMALL).apply({"params": params}, jnp.zeros((2, 3), jnp.int32), left_pad=jnp.zeros(3, jnp.int32))


def test_quantized_generation(params, stories260k):
  """stories260K in int4 (g32): generating through `quantized(CachedApply(model=...))` on the QArrays gives the tokens
  of the float path on the dequantized weights, and every weight stays packed."""
  m = stories260k.loaded
  qparams = lb.rtn(m.params, None, lb.int_spec(4, group_size=32))
  qstep = lb.quantized(CachedApply(model=Llama(m.config)))
  prompts = [m.tokenizer.encode(t) for t in ("Once upon a time", "Lily", "The dog ran to the park and")]
  got = generate_greedy_batch(m.config, qparams, prompts, max_new_tokens=40, apply_fn=qstep)
  want = generate_greedy_batch(m.config, lb.dequantize(qparams), prompts, max_new_tokens=40)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)
  floats = generate_greedy_batch(m.config, m.params, prompts, max_new_tokens=40)
  assert any(not np.array_equal(g, f) for g, f in zip(got, floats))  # 4-bit weights do change the text
  report = qstep.report(qparams, jnp.zeros((3, 1), jnp.int32), cache=init_cache(m.config, 3, 4),
                        start_pos=jnp.int32(0), left_pad=jnp.zeros(3, jnp.int32), last_only=True)
  assert len(report.weights) == 35 and not report.dequantized and all(w.packed for w in report.weights)
