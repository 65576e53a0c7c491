"""The reference Llama on random small configs: layout, RoPE/RMSNorm math, GQA, scan vs unrolled, KV cache."""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.io.loaded import expected_shapes
from lowbit_jax.models.llama import (KVCache, Llama, LlamaConfig, RMSNorm, init_cache, rope, stack_layers,
                                     unstack_layers)

CFG = LlamaConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=61, hidden_dim=40, max_seq_len=64)


@functools.cache
def forward(config: LlamaConfig, scan: bool = False, dtype: type = jnp.float32) -> Callable:
  """Jitted (params, tokens) -> logits, one per (config, scan, dtype)."""
  model = Llama(config, scan_layers=scan, dtype=dtype)
  return jax.jit(lambda p, t: model.apply({"params": p}, t))


def random_params(config: LlamaConfig, seed: int = 0) -> dict:
  """Random f32 params in the model's layout, made in numpy (no compilation): kernels N(0, 1/fan_in), embeddings
  N(0, 1), norm scales 1 + N(0, 0.2^2) so that nothing is trivially 1."""
  shapes = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  rng = np.random.default_rng(seed)

  def leaf(path: tuple, x: jax.ShapeDtypeStruct) -> np.ndarray:
    z = rng.standard_normal(x.shape, dtype=np.float32)
    name = path[-1].key
    return {"scale": 1.0 + 0.2 * z, "kernel": z / np.sqrt(x.shape[0]), "embedding": z}[name].astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture(scope="module")
def params() -> dict:
  return random_params(CFG)


@pytest.fixture(scope="module")
def tokens() -> jax.Array:
  return jax.random.randint(jax.random.key(7), (2, 12), 0, CFG.vocab_size, jnp.int32)


def flat_shapes(params: dict) -> dict[str, tuple[int, ...]]:
  return {"/".join(k.key for k in path): tuple(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize("tie", [False, True])
def test_param_layout_matches_docstring(tie: bool) -> None:
  config = dataclasses.replace(CFG, tie_embeddings=tie)
  tokens = jnp.zeros((1, 3), jnp.int32)
  params = jax.eval_shape(Llama(config).init, jax.random.key(0), tokens)["params"]
  assert flat_shapes(params) == expected_shapes(config)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  scanned = jax.eval_shape(Llama(config, scan_layers=True).init, jax.random.key(0), tokens)["params"]
  stacked = jax.eval_shape(functools.partial(stack_layers, n_layers=config.n_layers), params)
  assert flat_shapes(scanned) == flat_shapes(stacked)


def test_gqa_shapes_and_logits_dtype(params: dict, tokens: jax.Array) -> None:
  hd = CFG.head_dim
  attn = params["layers_0"]["attention"]
  assert attn["wq"]["kernel"].shape == (CFG.dim, CFG.n_heads * hd)
  assert attn["wk"]["kernel"].shape == attn["wv"]["kernel"].shape == (CFG.dim, CFG.n_kv_heads * hd)
  assert attn["wo"]["kernel"].shape == (CFG.n_heads * hd, CFG.dim)
  logits = forward(CFG)(params, tokens)
  assert logits.shape == (2, 12, CFG.vocab_size) and logits.dtype == jnp.float32
  cache = init_cache(CFG, 2, 16)
  assert cache.k.shape == cache.v.shape == (CFG.n_layers, 2, 16, CFG.n_kv_heads, hd)


def test_gqa_equals_mha_with_shared_kv(params: dict, tokens: jax.Array) -> None:
  """Query head h reads kv head h // (n_heads / n_kv_heads): a GQA model equals the MHA model whose wk/wv copy
  each kv head's columns to every query head of its group."""
  mha_config = dataclasses.replace(CFG, n_kv_heads=CFG.n_heads)
  g, hd = CFG.n_heads // CFG.n_kv_heads, CFG.head_dim

  def widen(kernel: jax.Array) -> jax.Array:
    heads = kernel.reshape(CFG.dim, CFG.n_kv_heads, 1, hd)  # (dim, kvh, 1, hd)
    return jnp.broadcast_to(heads, (CFG.dim, CFG.n_kv_heads, g, hd)).reshape(CFG.dim, CFG.n_heads * hd)

  mha = jax.tree.map(lambda x: x, params)
  for i in range(CFG.n_layers):
    for name in ("wk", "wv"):
      mha[f"layers_{i}"]["attention"][name] = {"kernel": widen(params[f"layers_{i}"]["attention"][name]["kernel"])}
  np.testing.assert_allclose(forward(mha_config)(mha, tokens), forward(CFG)(params, tokens), rtol=1e-5, atol=1e-5)


def test_rope_rotates_interleaved_pairs() -> None:
  """Pair (2i, 2i+1) of head_dim d at position p rotates by p * theta^(-2i/d), as a complex product (llama2.c)."""
  d, theta = 8, 10000.0
  x = np.asarray(jax.random.normal(jax.random.key(0), (1, 5, 3, d), jnp.float32))
  positions = np.array([0, 1, 2, 7, 100])
  got = np.asarray(jax.jit(rope, static_argnums=2)(jnp.asarray(x), jnp.asarray(positions, jnp.int32), theta))
  freqs = theta ** (-np.arange(0, d, 2) / d)  # (d/2,)
  rot = np.exp(1j * positions[:, None] * freqs[None, :])  # (s, d/2)
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * rot[None, :, None, :]
  want = np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[:, 0], x[:, 0])  # position 0 is the identity


def test_rmsnorm_matches_numpy() -> None:
  x = np.asarray(jax.random.normal(jax.random.key(1), (3, 16), jnp.float32)) * 3.0
  scale = np.linspace(0.5, 2.0, 16, dtype=np.float32)
  got = RMSNorm(1e-5).apply({"params": {"scale": jnp.asarray(scale)}}, jnp.asarray(x))
  want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-5) * scale
  np.testing.assert_allclose(got, want, rtol=1e-5)
  bf = RMSNorm(1e-5).apply({"params": {"scale": jnp.asarray(scale)}}, jnp.asarray(x, jnp.bfloat16))
  assert bf.dtype == jnp.bfloat16


def test_causal(params: dict, tokens: jax.Array) -> None:
  changed = tokens.at[:, 8:].set((tokens[:, 8:] + 1) % CFG.vocab_size)
  a, b = forward(CFG)(params, tokens), forward(CFG)(params, changed)
  np.testing.assert_array_equal(a[:, :8], b[:, :8])
  assert not np.allclose(a[:, 8:], b[:, 8:])


def test_scan_layers_equals_unrolled(params: dict, tokens: jax.Array) -> None:
  stacked = stack_layers(params, CFG.n_layers)
  assert stacked["layers"]["attention"]["wq"]["kernel"].shape == (CFG.n_layers, CFG.dim, CFG.dim)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), unstack_layers(stacked), params))
  np.testing.assert_allclose(forward(CFG, scan=True)(stacked, tokens), forward(CFG)(params, tokens),
                             rtol=1e-5, atol=1e-5)


def test_clear_errors(params: dict, tokens: jax.Array) -> None:
  with pytest.raises(ValueError, match="unrolled layout"):
    Llama(CFG, scan_layers=True).apply({"params": params}, tokens)
  with pytest.raises(ValueError, match="scanned layout"):
    Llama(CFG).apply({"params": stack_layers(params, CFG.n_layers)}, tokens)
  with pytest.raises(ValueError, match="stack_layers: expected"):
    stack_layers(params, CFG.n_layers + 1)
  with pytest.raises(ValueError, match="stack_layers: expected"):
    stack_layers(params, CFG.n_layers - 1)
  with pytest.raises(ValueError, match="do not fit"):
    Llama(CFG).apply({"params": params}, tokens, cache=init_cache(CFG, 2, 8))


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decoding_equals_full_forward(scan: bool, params: dict, tokens: jax.Array) -> None:
  """Prefill 5 tokens, then a chunk of 3, then one token at a time: every logit equals the full pass's."""
  model = Llama(CFG, scan_layers=scan)
  p = stack_layers(params, CFG.n_layers) if scan else params
  full = forward(CFG)(params, tokens)  # (2, 12, V)
  step = jax.jit(lambda p, t, c, pos: model.apply({"params": p}, t, cache=c, start_pos=pos))
  cache = init_cache(CFG, 2, 16)
  pieces = []
  for start, stop in [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, 12)]:
    logits, cache = step(p, tokens[:, start:stop], cache, start)
    assert isinstance(cache, KVCache) and cache.k.shape == (CFG.n_layers, 2, 16, CFG.n_kv_heads, CFG.head_dim)
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)


def test_compute_dtype_bfloat16(params: dict, tokens: jax.Array) -> None:
  logits = forward(CFG, dtype=jnp.bfloat16)(params, tokens)
  assert logits.dtype == jnp.float32
  ref = forward(CFG)(params, tokens)
  assert float(jnp.mean(jnp.abs(logits - ref))) < 0.1 * float(jnp.mean(jnp.abs(ref)))


def test_bad_token_rank() -> None:
  with pytest.raises(ValueError, match="batch, seq"):
    Llama(CFG).init(jax.random.key(0), jnp.zeros((4,), jnp.int32))
