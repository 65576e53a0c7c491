"""The reference Llama in Flax linen, in one readable file (nanoGPT style).

Parameter layout (Flax names, kernels stored (in, out), i.e. the transpose of the GGUF / llama2.c (out, in)):

  tok_embeddings/embedding            (vocab_size, dim)
  layers_{i}/attention_norm/scale     (dim,)
  layers_{i}/attention/wq/kernel      (dim, n_heads * head_dim)
  layers_{i}/attention/wk/kernel      (dim, n_kv_heads * head_dim)
  layers_{i}/attention/wv/kernel      (dim, n_kv_heads * head_dim)
  layers_{i}/attention/wo/kernel      (n_heads * head_dim, dim)
  layers_{i}/ffn_norm/scale           (dim,)
  layers_{i}/feed_forward/w1/kernel   (dim, hidden_dim)    gate
  layers_{i}/feed_forward/w3/kernel   (dim, hidden_dim)    up
  layers_{i}/feed_forward/w2/kernel   (hidden_dim, dim)    down
  norm/scale                          (dim,)
  output/kernel                       (dim, vocab_size)    absent when tie_embeddings

RoPE uses the interleaved-pair convention of Meta's original code and llama2.c (pairs (0,1), (2,3), ...), which is
also the layout GGUF stores wq/wk in.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  vocab_size: int
  hidden_dim: int
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_seq_len: int = 2048
  tie_embeddings: bool = False

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  @classmethod
  def llama2_7b(cls) -> "LlamaConfig":
    return cls(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, hidden_dim=11008,
               max_seq_len=4096)

  @classmethod
  def llama2_13b(cls) -> "LlamaConfig":
    return cls(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, vocab_size=32000, hidden_dim=13824,
               max_seq_len=4096)

  @classmethod
  def llama2_70b(cls) -> "LlamaConfig":
    return cls(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, hidden_dim=28672,
               max_seq_len=4096)


# ----------------------------------------------------------------------------------------------------------------
# Model

Params = Any  # a nested dict of arrays in the layout above


class KVCache(NamedTuple):
  """Keys and values of every layer, written at their slots.

  k, v: (n_layers, batch, max_len, n_kv_heads, head_dim). Slot t holds the (RoPE-rotated) key / the value of the
  token in slot t, whose position is t (t - left_pad[row] in left-padded rows, see `Llama`); slots at or past the
  next write position, and padding slots, hold garbage that the mask never reads.
  """
  k: jax.Array
  v: jax.Array


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> KVCache:
  """An all-zeros cache for `batch` sequences of up to `max_len` positions."""
  shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.head_dim)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in f32 and returned in x's dtype."""
  eps: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, interleaved-pair convention: dims (2i, 2i+1) rotate by positions * theta^(-2i/d).

  x: (batch, seq, heads, head_dim); positions: (seq,) int, or (batch, seq) for per-row positions. Angles and
  rotation in f32; returns x's dtype.
  """
  b, s, h, d = x.shape
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # (d/2,)
  rows = positions if positions.ndim == 2 else positions[None, :]  # (b or 1, s)
  angles = rows.astype(jnp.float32)[..., None] * inv_freq  # (b or 1, s, d/2)
  cos = jnp.cos(angles)[:, :, None, :]  # (b or 1, s, 1, d/2)
  sin = jnp.sin(angles)[:, :, None, :]
  xp = x.astype(jnp.float32).reshape(b, s, h, d // 2, 2)  # (b, s, h, d/2, 2): the pairs (2i, 2i+1)
  x0, x1 = xp[..., 0], xp[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)  # (b, s, h, d/2, 2)
  return out.reshape(b, s, h, d).astype(x.dtype)


def _dense(features: int, name: str, dtype: jnp.dtype) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32, name=name)


class Attention(nn.Module):
  """Causal grouped-query attention: query head h reads kv head h // (n_heads // n_kv_heads) (as llama2.c)."""
  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, start_pos: jax.Array, cache: tuple[jax.Array, jax.Array] | None,
               left_pad: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """x: (b, s, dim), tokens in slots start_pos + [0, s). cache: this layer's (k, v), each
    (b, max_len, n_kv_heads, head_dim), or None to attend within x only. left_pad: None, or (b,) int: row r's
    slots below left_pad[r] are padding (see `Llama`). Returns (out (b, s, dim), new cache)."""
    c = self.config
    b, s, _ = x.shape
    hd, kvh = c.head_dim, c.n_kv_heads
    g = c.n_heads // kvh  # query heads per kv head
    slots = start_pos + jnp.arange(s, dtype=jnp.int32)  # (s,)
    positions = slots if left_pad is None else slots[None, :] - left_pad[:, None]  # (s,) or (b, s)
    q = _dense(c.n_heads * hd, "wq", self.dtype)(x).reshape(b, s, c.n_heads, hd)
    k = _dense(kvh * hd, "wk", self.dtype)(x).reshape(b, s, kvh, hd)
    v = _dense(kvh * hd, "wv", self.dtype)(x).reshape(b, s, kvh, hd)
    q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
    if cache is None:
      key_slots = slots  # (t=s,)
    else:
      ck, cv = cache
      zero = jnp.zeros((), jnp.int32)
      start = (zero, jnp.asarray(start_pos, jnp.int32), zero, zero)
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)  # (b, max_len, kvh, hd)
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
      cache = (k, v)
      key_slots = jnp.arange(k.shape[1], dtype=jnp.int32)  # (t=max_len,)
    q = q.reshape(b, s, kvh, g, hd)  # (b, s, kvh, g, hd): head h = kv_head * g + group
    scores = jnp.einsum("bskgd,btkd->bkgst", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(hd)
    mask = key_slots[None, :] <= slots[:, None]  # (s, t) causal
    if left_pad is not None:  # (b, 1, 1, s, t): no padding slot is a key, except a padding query's own slot
      real = key_slots[None, None, :] >= left_pad[:, None, None]  # (b, 1, t)
      mask = ((mask[None] & real) | (key_slots[None, :] == slots[:, None])[None])[:, None, None]
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)  # (b, kvh, g, s, t) f32
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v.astype(jnp.float32)).reshape(b, s, c.n_heads * hd)
    return _dense(c.dim, "wo", self.dtype)(out.astype(self.dtype)), cache


class FeedForward(nn.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x)."""
  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.config.hidden_dim
    gate = _dense(h, "w1", self.dtype)(x)
    up = _dense(h, "w3", self.dtype)(x)
    return _dense(self.config.dim, "w2", self.dtype)(nn.silu(gate) * up)


class Block(nn.Module):
  """One pre-norm transformer layer. Signature (carry, per-layer input) -> (carry, per-layer output) for nn.scan."""
  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: tuple[jax.Array, jax.Array] | None, start_pos: jax.Array,
               left_pad: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    c = self.config
    h, cache = Attention(c, self.dtype, name="attention")(
        RMSNorm(c.norm_eps, name="attention_norm")(x), start_pos, cache, left_pad)
    x = x + h
    x = x + FeedForward(c, self.dtype, name="feed_forward")(RMSNorm(c.norm_eps, name="ffn_norm")(x))
    return x, cache


class Llama(nn.Module):
  """Llama decoder. `Llama(config).apply({'params': params}, tokens)` -> logits (batch, seq, vocab) f32.

  Attributes:
    config: the architecture.
    scan_layers: run the layers with `nn.scan`; params then live under `layers/...` with a leading n_layers axis
      (see `stack_layers` / `unstack_layers`) and the trace holds one layer instead of n_layers.
    dtype: compute dtype of the matmuls (params stay f32); norms, RoPE and softmax are always f32.
  """
  config: LlamaConfig
  scan_layers: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, *, cache: KVCache | None = None, start_pos: jax.Array | int = 0,
               left_pad: jax.Array | None = None, last_only: bool = False) -> jax.Array | tuple[jax.Array, KVCache]:
    """tokens: (batch, seq) int, in slots start_pos + [0, seq); a token's position (its RoPE angle) is its slot.

    Without a cache: returns logits (batch, seq, vocab) f32, attending causally within `tokens`.
    With a cache (see `init_cache`): writes this chunk's keys/values at slots [start_pos, start_pos + seq), attends
    to every earlier cached slot, and returns (logits, new cache). The caller keeps start_pos + seq <= max_len:
    start_pos may be traced, so it is not checked, and `dynamic_update_slice` would clamp the write.

    left_pad (batch,) int, for a batch of sequences of different lengths, right-aligned (left-padded) in shared
    slots: row r's first left_pad[r] slots hold padding. Its tokens sit at positions slot - left_pad[r] (so each row
    is computed as if it were alone, from position 0), and no padding slot is ever attended to (a padding query
    attends to itself only, to stay finite; its output is meaningless). Must be the same for every call that
    fills one cache.

    last_only: return the logits of the last slot only, (batch, 1, vocab): all a generation needs from its prefill,
    without the (batch, seq, vocab) classifier product.
    """
    c = self.config
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be (batch, seq), got shape {tokens.shape}")
    if self.has_variable("params", "layers_0" if self.scan_layers else "layers"):
      raise ValueError(f"params are in the {'unrolled' if self.scan_layers else 'scanned'} layout but scan_layers="
                       f"{self.scan_layers}; convert with stack_layers / unstack_layers")
    if cache is not None and tokens.shape[1] > cache.k.shape[2]:
      raise ValueError(f"{tokens.shape[1]} tokens do not fit a cache of max_len {cache.k.shape[2]}")
    start_pos = jnp.asarray(start_pos, jnp.int32)
    embed = nn.Embed(c.vocab_size, c.dim, dtype=self.dtype, param_dtype=jnp.float32, name="tok_embeddings")
    x = embed(tokens)  # (b, s, dim)
    layer_cache = None if cache is None else (cache.k, cache.v)
    if left_pad is not None:
      left_pad = jnp.asarray(left_pad, jnp.int32)
      if left_pad.shape != (tokens.shape[0],):
        raise ValueError(f"left_pad must be (batch,) = ({tokens.shape[0]},), got shape {left_pad.shape}")
    if self.scan_layers:
      layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(0, nn.broadcast, nn.broadcast), length=c.n_layers)
      x, layer_cache = layers(c, self.dtype, name="layers")(x, layer_cache, start_pos, left_pad)
    else:
      new = []
      for i in range(c.n_layers):
        li = None if layer_cache is None else (layer_cache[0][i], layer_cache[1][i])
        x, li = Block(c, self.dtype, name=f"layers_{i}")(x, li, start_pos, left_pad)
        new.append(li)
      if layer_cache is not None:
        layer_cache = (jnp.stack([k for k, _ in new]), jnp.stack([v for _, v in new]))
    x = RMSNorm(c.norm_eps, name="norm")(x[:, -1:] if last_only else x)
    if c.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = _dense(c.vocab_size, "output", self.dtype)(x)
    logits = logits.astype(jnp.float32)
    if cache is None:
      return logits
    return logits, KVCache(k=layer_cache[0], v=layer_cache[1])


def stack_layers(params: Params, n_layers: int) -> Params:
  """Unrolled layout (`layers_{i}/...`) -> scanned layout (`layers/...`, leading axis n_layers). Other keys kept."""
  missing = [f"layers_{i}" for i in range(n_layers) if f"layers_{i}" not in params]
  n_found = sum(k.startswith("layers_") for k in params)
  if missing or n_found != n_layers:
    raise ValueError(f"stack_layers: expected layers_0..layers_{n_layers - 1}, found {n_found} layers_* entries, "
                     f"missing {missing}")
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(n_layers)])
  return out


def unstack_layers(params: Params) -> Params:
  """Scanned layout (`layers/...`, leading axis n_layers) -> unrolled layout (`layers_{i}/...`)."""
  if "layers" not in params:
    raise ValueError("unstack_layers: params have no 'layers' entry")
  stacked = params["layers"]
  n_layers = jax.tree.leaves(stacked)[0].shape[0]
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(n_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out
