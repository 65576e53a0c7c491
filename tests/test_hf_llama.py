"""Our Llama == transformers' FlaxLlamaForCausalLM on converted params (random configs and the real stories260K)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.assets import asset_path
from lowbit_jax.io.hf_llama import (from_hf_llama, half_split_to_interleaved, hf_llama_config, hf_logits,
                                    interleaved_to_half_split, to_hf_llama)
from lowbit_jax.models.llama import Llama, LlamaConfig, stack_layers

CFG = LlamaConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=67, hidden_dim=56, max_seq_len=64)


def rel_err(got: jax.Array, want: jax.Array) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def random_params(config: LlamaConfig, seed: int) -> dict:
  """Random f32 params in our layout, in numpy: kernels N(0, 1/fan_in), embeddings N(0, 1), scales 1 + N(0, 0.2^2)."""
  shapes = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  rng = np.random.default_rng(seed)

  def leaf(path: tuple, x: jax.ShapeDtypeStruct) -> np.ndarray:
    z = rng.standard_normal(x.shape, dtype=np.float32)
    return {"scale": 1.0 + 0.2 * z, "kernel": z / np.sqrt(x.shape[0]), "embedding": z}[path[-1].key].astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def test_rope_permutation() -> None:
  kernel = np.arange(2 * 12, dtype=np.float32).reshape(2, 12)  # 2 heads of head_dim 6
  hf = interleaved_to_half_split(kernel, 6)
  np.testing.assert_array_equal(hf[0], [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11])
  np.testing.assert_array_equal(half_split_to_interleaved(hf, 6), kernel)


def test_random_config_matches_flax_llama() -> None:
  """Untied classifier and GQA (3 query heads per kv head); the real model below covers the tied case."""
  config = CFG
  params = random_params(config, seed=0)
  tokens = jax.random.randint(jax.random.key(5), (2, 20), 0, config.vocab_size, jnp.int32)
  model, hf_params = to_hf_llama(config, params)
  assert not model.config.tie_word_embeddings and model.config.num_key_value_heads == 2
  theirs = hf_logits(model, hf_params, tokens)
  ours = jax.jit(Llama(config).apply)({"params": params}, tokens)
  assert rel_err(ours, theirs) <= 1e-5
  # The scanned layout converts too, and the way back is exact.
  _, from_stacked = to_hf_llama(config, stack_layers(params, config.n_layers))
  assert jax.tree.all(jax.tree.map(np.array_equal, from_stacked, hf_params))
  back_config, back = from_hf_llama(model.config, hf_params)
  assert back_config == config
  assert jax.tree.all(jax.tree.map(np.array_equal, back, params))


def test_unsupported_rope_theta() -> None:
  with pytest.raises(ValueError, match="theta"):
    hf_llama_config(dataclasses.replace(CFG, rope_theta=500000.0))


def test_stories260k_matches_flax_llama(stories260k) -> None:
  loaded = stories260k.loaded
  text = asset_path("tinystories/tinystories_val_part1.txt").read_text(encoding="utf-8")[:600]
  tokens = np.asarray(loaded.tokenizer.encode(text, bos=True))[None, :128]  # (1, 128)
  assert tokens.shape == (1, 128)
  model, hf_params = to_hf_llama(loaded.config, loaded.params)
  assert model.config.tie_word_embeddings
  ours = jax.jit(Llama(loaded.config).apply)({"params": loaded.params}, jnp.asarray(tokens, jnp.int32))
  assert rel_err(ours, hf_logits(model, hf_params, tokens)) <= 1e-5
