"""An independent float64 NumPy Llama forward pass, read straight from a GGUF file (test oracle).

Nothing here comes from lowbit_jax: tensors are read with `gguf.GGUFReader` and dequantized with gguf-py's own
`gguf.quants.dequantize`, and the forward follows Hugging Face's `LlamaForCausalLM` conventions rather than ours:

  * llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) stores attn_q / attn_k with each head's
    rows reordered so that RoPE rotates adjacent pairs (2i, 2i+1); `_unpermute` restores the Hugging Face row
    order, and RoPE is then applied the Hugging Face way (`rotate_half`: dims i and i + head_dim/2 form a pair);
  * matrices are used in the file's (out, in) orientation, x @ W.T;
  * grouped-query attention repeats each kv head for its n_heads / n_kv_heads query heads (`repeat_kv`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class GGUFLlama:
  n_layers: int
  n_heads: int
  n_kv_heads: int
  eps: float
  rope_base: float
  tensors: dict[str, np.ndarray]  # GGUF name -> float64, numpy order ((out, in) for matrices)
  metadata: dict[str, object]


def read_gguf_llama(path: str | Path) -> GGUFLlama:
  reader = gguf.GGUFReader(path)
  meta = {name: field.contents() for name, field in reader.fields.items()}
  tensors = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64) for t in reader.tensors}
  return GGUFLlama(n_layers=int(meta["llama.block_count"]), n_heads=int(meta["llama.attention.head_count"]),
                   n_kv_heads=int(meta["llama.attention.head_count_kv"]),
                   eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
                   rope_base=float(meta["llama.rope.freq_base"]), tensors=tensors, metadata=meta)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's permute(w, n_heads): w.reshape(n, 2, hd/2, in).swapaxes(1, 2) -> HF row order."""
  out, d_in = w.shape
  return w.reshape(n_heads, out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rotate_half(x: np.ndarray) -> np.ndarray:
  half = x.shape[-1] // 2
  return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def forward(model: GGUFLlama, tokens: list[int]) -> np.ndarray:
  """Logits (len(tokens), vocab), float64, of one sequence from position 0 (causal, no cache)."""
  t = model.tensors
  emb = t["token_embd.weight"]  # (vocab, dim)
  x = emb[np.asarray(tokens)]  # (s, dim)
  s, dim = x.shape
  hd = dim // model.n_heads
  group = model.n_heads // model.n_kv_heads
  inv_freq = 1.0 / model.rope_base ** (np.arange(0, hd, 2, dtype=np.float64) / hd)  # (hd/2,)
  angles = np.arange(s, dtype=np.float64)[:, None] * inv_freq[None, :]  # (s, hd/2)
  cos = np.cos(np.concatenate([angles, angles], axis=-1))[None]  # (1, s, hd)
  sin = np.sin(np.concatenate([angles, angles], axis=-1))[None]
  causal = np.tril(np.ones((s, s), bool))
  for i in range(model.n_layers):
    b = f"blk.{i}."
    h = _rms_norm(x, t[b + "attn_norm.weight"], model.eps)
    q = (h @ _unpermute(t[b + "attn_q.weight"], model.n_heads).T).reshape(s, model.n_heads, hd).transpose(1, 0, 2)
    k = (h @ _unpermute(t[b + "attn_k.weight"], model.n_kv_heads).T).reshape(s, model.n_kv_heads, hd)
    k = k.transpose(1, 0, 2)
    v = (h @ t[b + "attn_v.weight"].T).reshape(s, model.n_kv_heads, hd).transpose(1, 0, 2)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)  # (n_heads, s, hd)
    scores = np.where(causal, q @ k.transpose(0, 2, 1) / np.sqrt(hd), -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + (probs @ v).transpose(1, 0, 2).reshape(s, dim) @ t[b + "attn_output.weight"].T
    h = _rms_norm(x, t[b + "ffn_norm.weight"], model.eps)
    gate, up = h @ t[b + "ffn_gate.weight"].T, h @ t[b + "ffn_up.weight"].T
    x = x + (gate / (1.0 + np.exp(-gate)) * up) @ t[b + "ffn_down.weight"].T
  x = _rms_norm(x, t["output_norm.weight"], model.eps)
  return x @ t.get("output.weight", emb).T
