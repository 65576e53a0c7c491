"""Model-zoo adapter: our Llama params <-> transformers' `FlaxLlamaForCausalLM` (transformers 4.57; Flax is gone in v5).

Name map (ours -> HF `params`, kernels are (in, out) on both sides):

  tok_embeddings/embedding            model/embed_tokens/embedding
  layers_{i}/attention_norm/scale     model/layers/{i}/input_layernorm/weight
  layers_{i}/attention/w{q,k,v,o}     model/layers/{i}/self_attn/{q,k,v,o}_proj/kernel     (wq, wk permuted, below)
  layers_{i}/ffn_norm/scale           model/layers/{i}/post_attention_layernorm/weight
  layers_{i}/feed_forward/w1, w3, w2  model/layers/{i}/mlp/gate_proj, up_proj, down_proj/kernel
  norm/scale                          model/norm/weight
  output/kernel                       lm_head/kernel    (for a tied model: tok_embeddings/embedding transposed)

RoPE layouts: we rotate interleaved pairs (2i, 2i+1) of each head; HF rotates half-split pairs (i, i + head_dim/2),
with the same frequency theta^(-2i/head_dim) for pair i. So within every head the output features (kernel columns)
of wq and wk are reordered [0, 2, 4, ..., 1, 3, 5, ...] on the way to HF -- the permutation Meta -> HF of
transformers' convert_llama_weights_to_hf, applied to our transposed kernels -- and back on the way home. The
attention scores q.k are unchanged because q and k get the same permutation.

`FlaxLlamaForCausalLM` always has its own `lm_head` (it does not tie weights itself) and hard-codes RoPE theta 10000,
so a tied model gets an explicit lm_head copy and any other theta is refused.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax.models.llama import LlamaConfig, unstack_layers

if TYPE_CHECKING:
  import transformers

Params = dict[str, Any]

# Our per-layer leaf -> HF per-layer path.
_LAYER_MAP: dict[tuple[str, ...], tuple[str, ...]] = {
    ("attention_norm", "scale"): ("input_layernorm", "weight"),
    ("attention", "wq", "kernel"): ("self_attn", "q_proj", "kernel"),
    ("attention", "wk", "kernel"): ("self_attn", "k_proj", "kernel"),
    ("attention", "wv", "kernel"): ("self_attn", "v_proj", "kernel"),
    ("attention", "wo", "kernel"): ("self_attn", "o_proj", "kernel"),
    ("ffn_norm", "scale"): ("post_attention_layernorm", "weight"),
    ("feed_forward", "w1", "kernel"): ("mlp", "gate_proj", "kernel"),
    ("feed_forward", "w3", "kernel"): ("mlp", "up_proj", "kernel"),
    ("feed_forward", "w2", "kernel"): ("mlp", "down_proj", "kernel"),
}
_ROPE_PERMUTED = {("attention", "wq", "kernel"), ("attention", "wk", "kernel")}
_HF_THETA = 10000.0  # FlaxLlamaRotaryEmbedding ignores config.rope_theta


def interleaved_to_half_split(kernel: np.ndarray, head_dim: int) -> np.ndarray:
  """Reorder each head's output columns [0, 2, 4, ..., 1, 3, 5, ...]. kernel: (in, n_heads * head_dim)."""
  d_in, d_out = kernel.shape
  perm = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
  heads = kernel.reshape(d_in, d_out // head_dim, head_dim)  # (in, n_heads, head_dim)
  return np.ascontiguousarray(heads[:, :, perm].reshape(d_in, d_out))


def half_split_to_interleaved(kernel: np.ndarray, head_dim: int) -> np.ndarray:
  """Inverse of `interleaved_to_half_split`."""
  d_in, d_out = kernel.shape
  inv = np.argsort(np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)]))
  heads = kernel.reshape(d_in, d_out // head_dim, head_dim)  # (in, n_heads, head_dim)
  return np.ascontiguousarray(heads[:, :, inv].reshape(d_in, d_out))


def hf_llama_config(config: LlamaConfig) -> "transformers.LlamaConfig":
  """The `transformers.LlamaConfig` with the same architecture. Raises ValueError for rope_theta != 10000."""
  import transformers
  if config.rope_theta != _HF_THETA:
    raise ValueError(f"FlaxLlamaForCausalLM hard-codes RoPE theta {_HF_THETA}; this model uses {config.rope_theta}")
  if config.dim % config.n_heads or config.n_heads % config.n_kv_heads or config.head_dim % 2:
    raise ValueError(f"heads do not divide evenly: dim {config.dim}, n_heads {config.n_heads}, "
                     f"n_kv_heads {config.n_kv_heads}")
  return transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
      num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
      num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, hidden_act="silu",
      max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
      tie_word_embeddings=config.tie_embeddings, attention_bias=False, mlp_bias=False,
      bos_token_id=1, eos_token_id=2)


def _f32(x: Any) -> np.ndarray:
  return np.asarray(x, dtype=np.float32)


def _get(tree: Params, path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def to_hf_llama_params(config: LlamaConfig, params: Params) -> Params:
  """Our params (unrolled or scanned layout) -> `FlaxLlamaForCausalLM` params (numpy float32)."""
  if "layers" in params:
    params = unstack_layers(params)
  embedding = _f32(params["tok_embeddings"]["embedding"])
  out: Params = {}
  _set(out, ("model", "embed_tokens", "embedding"), embedding)
  for i in range(config.n_layers):
    layer = params[f"layers_{i}"]
    for ours, theirs in _LAYER_MAP.items():
      value = _f32(_get(layer, ours))
      if ours in _ROPE_PERMUTED:
        value = interleaved_to_half_split(value, config.head_dim)
      _set(out, ("model", "layers", str(i)) + theirs, value)
  _set(out, ("model", "norm", "weight"), _f32(params["norm"]["scale"]))
  lm_head = embedding.T if config.tie_embeddings else _f32(params["output"]["kernel"])
  _set(out, ("lm_head", "kernel"), np.ascontiguousarray(lm_head))
  return out


def to_hf_llama(config: LlamaConfig, params: Params) -> tuple["transformers.FlaxLlamaForCausalLM", Params]:
  """(model, hf_params); `hf_logits(model, hf_params, tokens)` runs it.

  transformers' Flax code relies on implicit dtype promotion, so it is built (and must be called) under
  `jax.numpy_dtype_promotion("standard")`.
  """
  import transformers
  with jax.numpy_dtype_promotion("standard"):
    model = transformers.FlaxLlamaForCausalLM(hf_llama_config(config), _do_init=False)
  return model, to_hf_llama_params(config, params)


def hf_logits(model: "transformers.FlaxLlamaForCausalLM", hf_params: Params, tokens: Any) -> jax.Array:
  """tokens (batch, seq) int -> the HF model's logits (batch, seq, vocab) f32, positions 0..seq-1, no padding."""
  def run(params: Params, tokens: jax.Array) -> jax.Array:
    return model(tokens, params=params).logits.astype(jnp.float32)

  with jax.numpy_dtype_promotion("standard"):  # trace time is when promotion rules apply
    return jax.jit(run)(hf_params, jnp.asarray(tokens, jnp.int32))


def from_hf_llama(hf_config: "transformers.LlamaConfig", hf_params: Params,
                  *, max_seq_len: int | None = None) -> tuple[LlamaConfig, Params]:
  """`FlaxLlamaForCausalLM` config + params -> our LlamaConfig + unrolled params (numpy float32).

  A tied HF model (tie_word_embeddings) gives a tied config and drops lm_head.
  """
  head_dim = hf_config.hidden_size // hf_config.num_attention_heads
  if getattr(hf_config, "head_dim", None) not in (None, head_dim):
    raise ValueError(f"head_dim {hf_config.head_dim} != hidden_size / num_attention_heads = {head_dim}")
  config = LlamaConfig(
      dim=hf_config.hidden_size, n_layers=hf_config.num_hidden_layers, n_heads=hf_config.num_attention_heads,
      n_kv_heads=hf_config.num_key_value_heads, vocab_size=hf_config.vocab_size,
      hidden_dim=hf_config.intermediate_size, norm_eps=float(hf_config.rms_norm_eps),
      rope_theta=_HF_THETA, max_seq_len=max_seq_len or hf_config.max_position_embeddings,
      tie_embeddings=bool(hf_config.tie_word_embeddings))
  params: Params = {"tok_embeddings": {"embedding": _f32(_get(hf_params, ("model", "embed_tokens", "embedding")))}}
  for i in range(config.n_layers):
    layer: Params = {}
    for ours, theirs in _LAYER_MAP.items():
      value = _f32(_get(hf_params, ("model", "layers", str(i)) + theirs))
      if ours in _ROPE_PERMUTED:
        value = half_split_to_interleaved(value, config.head_dim)
      _set(layer, ours, value)
    params[f"layers_{i}"] = layer
  params["norm"] = {"scale": _f32(_get(hf_params, ("model", "norm", "weight")))}
  if not config.tie_embeddings:
    params["output"] = {"kernel": _f32(_get(hf_params, ("lm_head", "kernel")))}
  return config, params
