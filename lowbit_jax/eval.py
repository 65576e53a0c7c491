"""Evaluation: perplexity over non-overlapping windows, greedy decoding, and reference-vs-quantized comparisons.

All metrics are computed in f32 on device and accumulated in f64 on the host. Every function validates its inputs
and raises `ValueError` with the offending shape/dtype instead of computing something silently wrong.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lowbit_jax.checks import as_int
from lowbit_jax.models.llama import KVCache, Llama, LlamaConfig, init_cache

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]  # (params, tokens (batch, seq) int32) -> logits (batch, seq, vocab)


class Segmentation(enum.Enum):
  """How a text file becomes one token stream (llama2.c pretokenizes every TinyStories story as BOS + story)."""
  BOS_PER_BLOCK = "each blank-line-separated block stripped, BOS + block, concatenated"
  ONE_DOCUMENT = "the whole text as one string, one BOS in front"


def token_stream(text: str, tokenizer: Any, segmentation: Segmentation) -> np.ndarray:
  """The text's token stream, (N,) int32 (see `Segmentation`); `tokenizer` is any `io.loaded.TextTokenizer`."""
  if segmentation is Segmentation.ONE_DOCUMENT:
    return np.asarray(tokenizer.encode(text, bos=True, eos=False), np.int32)
  blocks = [b.strip() for b in text.split("\n\n")]
  return np.concatenate([np.asarray(tokenizer.encode(b, bos=True, eos=False), np.int32) for b in blocks if b])


def sample_windows(stream: np.ndarray, *, n: int, length: int, batch: int, seed: int) -> list[jax.Array]:
  """`n` windows of `length` tokens of `stream` at sorted random starts (numpy `default_rng(seed)`), in batches of
  `batch`: calibration data. Raises ValueError when the stream is shorter than one window."""
  if stream.shape[0] < length:
    raise ValueError(f"sample_windows: the stream has {stream.shape[0]} tokens, fewer than one window of {length}")
  starts = np.sort(np.random.default_rng(seed).integers(0, stream.shape[0] - length + 1, n))
  windows = np.stack([stream[s:s + length] for s in starts])  # (n, length)
  return [jnp.asarray(windows[i:i + batch]) for i in range(0, n, batch)]


class CachedApplyFn(Protocol):
  """A model step on a KV cache: `Llama.__call__`'s contract (tokens in slots start_pos + [0, seq), rows
  left-padded by left_pad, last_only: logits of the last slot only), as a function of the params.
  `CachedApply(model=...)` is one; `lowbit_jax.quantized(...)` of one is another (the same step on QArray params).
  """

  def __call__(self, params: Params, tokens: jax.Array, *, cache: KVCache, start_pos: jax.Array,
               left_pad: jax.Array, last_only: bool) -> tuple[jax.Array, KVCache]: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class CachedApply:
  """`model.apply` with a KV cache, as a `CachedApplyFn`. Frozen and hashable: equal models give equal apply
  functions, so `generate_greedy_batch` reuses its compilation across calls.

      step = CachedApply(model=Llama(config))
      generate_greedy_batch(config, params, prompts, max_new_tokens=32)                   # step is the default
      qstep = lowbit_jax.quantized(step)                                                # keep this object: jit
      generate_greedy_batch(config, qparams, prompts, max_new_tokens=32, apply_fn=qstep)  # caches by identity
  """
  model: Llama

  def __call__(self, params: Params, tokens: jax.Array, *, cache: KVCache, start_pos: jax.Array,
               left_pad: jax.Array, last_only: bool) -> tuple[jax.Array, KVCache]:
    return self.model.apply({"params": params}, tokens, cache=cache, start_pos=start_pos, left_pad=left_pad,
                            last_only=last_only)


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  """ppl = exp(nll); nll is the mean negative log-likelihood (nats) over the n_tokens scored tokens."""
  ppl: float
  nll: float
  n_tokens: int
  n_windows: int


def _as_token_stream(tokens: Any) -> np.ndarray:
  arr = np.asarray(tokens)
  if arr.shape == (0,):
    arr = arr.astype(np.int32)  # np.asarray([]) is float64
  if arr.ndim != 1:
    raise ValueError(f"tokens must be a 1-D token stream, got shape {arr.shape}")
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
  return arr.astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _window_nll(apply_fn: ApplyFn, params: Params, batch: jax.Array, weight: jax.Array) -> jax.Array:
  """batch: (B, seq_len) int32, weight: (B,) -> summed nll of the scored tokens of each window, (B,) f32.

  Jitted with apply_fn static, so repeated calls with the same apply_fn object (e.g. over quantized params) reuse
  the compiled function.
  """
  logits = apply_fn(params, batch)[:, :-1].astype(jnp.float32)  # (B, seq_len-1, V): predicts offsets 1..
  target = batch[:, 1:]  # (B, seq_len-1)
  picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]  # (B, seq_len-1)
  nll = jax.nn.logsumexp(logits, axis=-1) - picked
  return jnp.sum(nll, axis=1) * weight


def perplexity(apply_fn: ApplyFn, params: Params, tokens: Any, *, seq_len: int, batch_size: int,
               progress: bool = True) -> PerplexityResult:
  """Perplexity of a token stream over non-overlapping windows (the GPTQ paper's evaluation).

  The stream (N tokens) is cut into n_windows = floor(N / seq_len) windows tokens[w*seq_len : (w+1)*seq_len]; the
  N mod seq_len trailing tokens are dropped. Each window is run independently from an empty context, and in each
  window the tokens at offsets 1 .. seq_len-1 are scored, each predicted from the window's tokens before it; the
  window's first token (offset 0) has no context and is not scored. Hence n_tokens = n_windows * (seq_len - 1),
  nll = (sum of -log p(scored token)) / n_tokens and ppl = exp(nll) -- identical to GPTQ's
  exp(mean over windows of the per-window mean loss), as every window has the same length.

  Windows run in jitted batches of `batch_size` (the last batch is padded with masked-out windows, so one shape is
  compiled), with a tqdm bar over batches.

  Args:
    apply_fn: (params, tokens (batch, seq_len) int32) -> logits (batch, seq_len, vocab), any float dtype.
    tokens: 1-D integer token stream, every id < vocab.

  Raises:
    ValueError: tokens not 1-D integers, seq_len < 2, batch_size < 1 (or not ints), fewer than seq_len tokens, ids
      out of the vocabulary, apply_fn returning logits of the wrong shape/dtype, or a window whose log-likelihood
      is NaN/inf (naming the window).
  """
  stream = _as_token_stream(tokens)
  if not callable(apply_fn):
    raise ValueError(f"perplexity: apply_fn must be a callable (params, tokens) -> logits, got {apply_fn!r}")
  seq_len = as_int(seq_len, "perplexity: seq_len (a window's first token is never scored)", low=2)
  batch_size = as_int(batch_size, "perplexity: batch_size", low=1)
  n_windows = stream.shape[0] // seq_len
  if n_windows == 0:
    raise ValueError(f"{stream.shape[0]} tokens are too few for one window of seq_len={seq_len}")
  if stream.min() < 0:
    raise ValueError(f"negative token id {stream.min()}")

  windows = stream[:n_windows * seq_len].reshape(n_windows, seq_len)  # (n_windows, seq_len)
  n_batches = math.ceil(n_windows / batch_size)
  n_pad = n_batches * batch_size - n_windows
  windows = np.concatenate([windows, np.zeros((n_pad, seq_len), np.int32)])  # (n_batches * batch_size, seq_len)
  weights = np.concatenate([np.ones(n_windows, np.float32), np.zeros(n_pad, np.float32)])

  out = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32))
  if len(out.shape) != 3 or out.shape[:2] != (batch_size, seq_len) or not jnp.issubdtype(out.dtype, jnp.floating):
    raise ValueError(f"apply_fn must return float logits (batch={batch_size}, seq={seq_len}, vocab), "
                     f"got {out.dtype}{out.shape}")
  vocab = out.shape[2]
  if stream.max() >= vocab:
    raise ValueError(f"token id {stream.max()} is outside the vocabulary of {vocab}")

  total = 0.0
  for i in tqdm(range(n_batches), desc=f"perplexity ({n_windows} x {seq_len} tokens)", disable=not progress):
    sl = slice(i * batch_size, (i + 1) * batch_size)
    nll = np.asarray(_window_nll(apply_fn, params, jnp.asarray(windows[sl]), jnp.asarray(weights[sl])), np.float64)
    real = nll[:max(0, min(batch_size, n_windows - i * batch_size))]   # padded windows are masked out
    if not np.all(np.isfinite(real)):
      w = i * batch_size + int(np.flatnonzero(~np.isfinite(real))[0])
      raise ValueError(f"perplexity: window {w} (tokens {w * seq_len}:{(w + 1) * seq_len}) has a non-finite "
                       f"negative log-likelihood ({real[w - i * batch_size]}); expected finite logits from apply_fn "
                       f"(NaN/inf logits)")
    total += float(np.sum(real))
  n_tokens = n_windows * (seq_len - 1)
  nll = total / n_tokens
  return PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=n_tokens, n_windows=n_windows)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _greedy(model: Llama, params: Params, prompt: jax.Array, max_new_tokens: int) -> jax.Array:
  """prompt: (P,) int32 -> (max_new_tokens,) int32 greedy continuation; P + max_new_tokens - 1 positions run."""
  n_prompt = prompt.shape[0]
  n_pos = n_prompt + max_new_tokens - 1
  cache = init_cache(model.config, 1, n_pos)
  logits, cache = model.apply({"params": params}, prompt[None, :], cache=cache, start_pos=0)  # (1, P, V)
  first = jnp.argmax(logits[0, -1]).astype(jnp.int32)

  def step(carry: tuple[jax.Array, KVCache], pos: jax.Array) -> tuple[tuple[jax.Array, KVCache], jax.Array]:
    token, cache = carry
    logits, cache = model.apply({"params": params}, token.reshape(1, 1), cache=cache, start_pos=pos)
    nxt = jnp.argmax(logits[0, -1]).astype(jnp.int32)
    return (nxt, cache), nxt

  positions = jnp.arange(n_prompt, n_pos, dtype=jnp.int32)  # where each fed-back token sits
  _, rest = jax.lax.scan(step, (first, cache), positions)
  return jnp.concatenate([first[None], rest])


def generate_greedy(model: Llama | LlamaConfig, params: Params, prompt_ids: Any, *, max_new_tokens: int,
                    stop_token: int | None = None) -> np.ndarray:
  """Greedy (argmax, temperature 0) decoding with the KV cache, in one jitted prefill + `lax.scan`.

  The prompt (1-D ids, at least one, e.g. [BOS]) is run in one pass; then each step feeds the previous argmax
  token at the next position. As in llama2.c's run.c (which, from BOS with `-n steps`, prints `steps` tokens), the
  last new token is never fed back, so prompt + max_new_tokens - 1 <= max_seq_len positions are run. With
  `stop_token` set (run.c stops at BOS), the output is cut just before its first occurrence, which is exactly what
  a loop that stops there would produce (decoding is deterministic; the remaining steps are wasted, not wrong).
  Compiled once per (model, prompt length, max_new_tokens).

  Returns:
    the new token ids, (<= max_new_tokens,) int32, excluding the prompt and the stop token.
  Raises:
    ValueError: empty / non-1-D / non-integer prompt, max_new_tokens < 1, or more positions than max_seq_len.
  """
  if isinstance(model, LlamaConfig):
    model = Llama(model)
  config = model.config
  prompt = _as_token_stream(prompt_ids)
  if prompt.shape[0] == 0:
    raise ValueError("the prompt must hold at least one token (llama2.c starts from BOS)")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  total = prompt.shape[0] + max_new_tokens  # the last new token is never fed back: total - 1 positions are run
  if total - 1 > config.max_seq_len:
    raise ValueError(f"prompt ({prompt.shape[0]}) + max_new_tokens ({max_new_tokens}) - 1 exceeds max_seq_len "
                     f"{config.max_seq_len}")

  return _cut(np.asarray(_greedy(model, params, jnp.asarray(prompt), max_new_tokens)), stop_token)


@functools.partial(jax.jit, static_argnums=(0, 1, 5))
def _greedy_batch(apply_fn: CachedApplyFn, config: LlamaConfig, params: Params, tokens: jax.Array,
                  left_pad: jax.Array, max_new_tokens: int) -> jax.Array:
  """tokens: (B, P) int32, right-aligned prompts; left_pad: (B,) -> (B, max_new_tokens) int32 greedy tokens."""
  batch, n_prompt = tokens.shape
  n_pos = n_prompt + max_new_tokens - 1
  cache = init_cache(config, batch, n_pos)
  start = jnp.zeros((), jnp.int32)
  logits, cache = apply_fn(params, tokens, cache=cache, start_pos=start, left_pad=left_pad, last_only=True)  # (B,1,V)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # (B,): every row's last prompt token is in slot P-1

  def step(carry: tuple[jax.Array, KVCache], pos: jax.Array) -> tuple[tuple[jax.Array, KVCache], jax.Array]:
    token, cache = carry  # (B,)
    logits, cache = apply_fn(params, token[:, None], cache=cache, start_pos=pos, left_pad=left_pad, last_only=True)
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    return (nxt, cache), nxt

  slots = jnp.arange(n_prompt, n_pos, dtype=jnp.int32)  # where each fed-back token sits
  _, rest = jax.lax.scan(step, (first, cache), slots)  # (max_new_tokens - 1, B)
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate_greedy_batch(model: Llama | LlamaConfig, params: Params, prompts: Sequence[Any], *,
                          max_new_tokens: int, stop_token: int | None = None,
                          apply_fn: CachedApplyFn | None = None) -> list[np.ndarray]:
  """`generate_greedy` for many prompts at once: row i of the result is what `generate_greedy` gives prompts[i].

  The prompts (each 1-D ids, at least one) are right-aligned in P = max length slots (left-padded with id 0) and
  run as one batch: one prefill of (B, P) tokens, then a `lax.scan` of max_new_tokens - 1 decode steps that feed
  each row's argmax back at the next shared slot. `left_pad` gives every row its own positions (0 at its first
  real token) and keeps its padding slots out of attention and the KV cache reads, so each row is computed as
  if alone, up to float rounding. Compiled once per (apply_fn, config, B, P, max_new_tokens).

  Args:
    model: the architecture; its config sizes the KV cache.
    params: whatever `apply_fn` takes: float params for the default `CachedApply(model=model)`, QArray params for
      `lowbit_jax.quantized(CachedApply(model=model))` (reuse that object: jit caches the compilation by identity).
    stop_token: as in `generate_greedy`, each row is cut just before its first occurrence.

  Returns:
    one (<= max_new_tokens,) int32 array of new ids per prompt, in order.
  Raises:
    ValueError: no prompts, an empty / non-1-D / non-integer prompt, max_new_tokens < 1, or more positions than
      max_seq_len.
  """
  if isinstance(model, LlamaConfig):
    model = Llama(model)
  config = model.config
  rows = [_as_token_stream(p) for p in prompts]
  if not rows:
    raise ValueError("generate_greedy_batch needs at least one prompt")
  empty = [i for i, r in enumerate(rows) if r.shape[0] == 0]
  if empty:
    raise ValueError(f"prompts {empty} are empty; every prompt must hold at least one token")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  n_prompt = max(r.shape[0] for r in rows)
  if n_prompt + max_new_tokens - 1 > config.max_seq_len:
    raise ValueError(f"longest prompt ({n_prompt}) + max_new_tokens ({max_new_tokens}) - 1 exceeds max_seq_len "
                     f"{config.max_seq_len}")
  left_pad = np.asarray([n_prompt - r.shape[0] for r in rows], np.int32)
  tokens = np.zeros((len(rows), n_prompt), np.int32)
  for i, r in enumerate(rows):
    tokens[i, left_pad[i]:] = r
  apply_fn = CachedApply(model=model) if apply_fn is None else apply_fn
  out = np.asarray(_greedy_batch(apply_fn, config, params, jnp.asarray(tokens), jnp.asarray(left_pad),
                                 max_new_tokens))
  return [_cut(row, stop_token) for row in out]


def _cut(out: np.ndarray, stop_token: int | None) -> np.ndarray:
  """`out` up to (excluding) its first `stop_token`, or all of it."""
  hits = np.flatnonzero(out == stop_token) if stop_token is not None else np.zeros(0, np.int64)
  return out[:hits[0]] if hits.size else out


def _check_pair(logits_p: Any, logits_q: Any) -> tuple[jax.Array, jax.Array]:
  p, q = jnp.asarray(logits_p), jnp.asarray(logits_q)
  if p.shape != q.shape:
    raise ValueError(f"logits shapes differ: {p.shape} vs {q.shape}")
  if p.ndim < 1 or p.shape[-1] < 1:
    raise ValueError(f"logits must have a non-empty vocabulary axis last, got shape {p.shape}")
  for name, x in (("logits_p", p), ("logits_q", q)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {x.dtype}")
  return p.astype(jnp.float32), q.astype(jnp.float32)


@jax.jit
def _token_kl(p: jax.Array, q: jax.Array) -> jax.Array:
  logp, logq = jax.nn.log_softmax(p, axis=-1), jax.nn.log_softmax(q, axis=-1)
  prob = jnp.exp(logp)
  return jnp.sum(jnp.where(prob > 0, prob * (logp - logq), 0.0), axis=-1)


def token_kl_divergence(logits_p: Any, logits_q: Any) -> jax.Array:
  """KL(p || q) in nats at every position, p = softmax(logits_p), q = softmax(logits_q) over the last axis.

  logits_p, logits_q: (..., vocab), same shape, any float dtype (computed in f32). Returns (...,) f32, >= 0
  up to rounding.
  """
  return _token_kl(*_check_pair(logits_p, logits_q))


def kl_divergence(logits_p: Any, logits_q: Any) -> jax.Array:
  """Mean over positions of KL(p || q) (see `token_kl_divergence`); a f32 scalar. p is the reference model."""
  return jnp.mean(token_kl_divergence(logits_p, logits_q))


def top1_agreement(logits_p: Any, logits_q: Any) -> jax.Array:
  """Fraction of positions where both logits pick the same argmax token; a f32 scalar in [0, 1]."""
  p, q = _check_pair(logits_p, logits_q)
  return jnp.mean((jnp.argmax(p, axis=-1) == jnp.argmax(q, axis=-1)).astype(jnp.float32))
