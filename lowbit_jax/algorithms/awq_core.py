"""AWQ on arrays: the per-input-channel scale search and the clip search, scored by output error.

Paper: Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration", MLSys 2024. Reference implementation: mit-han-lab/llm-awq,
`awq/quantize/auto_scale.py` (`_search_module_scale`) and `auto_clip.py` (`auto_clip_layer`).

Scale search (one or more linears sharing the input X, e.g. q/k/v after one norm):

    s(α) = mean|x|^α,  normalised by sqrt(max(s) * min(s));   α in {0, 1/n_grid, ..., (n_grid-1)/n_grid}
    loss(α) = Σ_linears || X W − (X / s) Q(s ⊙ W) ||² / numel           (s scales the rows = inputs of W)
    s* = argmin loss

Clip search (per linear): for each group and output channel, the clamp range max|w| * (1 − i/n_grid),
i < max_shrink * n_grid, minimising that group's output error.

Deviation: the reference runs the calibration tokens through the module for every candidate; we score with
the Hessian proxy H = XᵀX / n from calibration, which gives the same output MSE for a linear map,
``|| X ΔW ||² / n = Σ_n ΔW[:, n]ᵀ H ΔW[:, n]``, without keeping activations (for the clip search, the
block-diagonal part of H per group, as the reference's per-group error). A candidate s never changes the float
function: x @ W = (x / s) @ (s ⊙ W); the caller folds 1/s into the preceding op or keeps it as an input scale.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowbit_jax.qarray import quantize
from lowbit_jax.spec import QuantSpec


def _fake_quant(w, spec):
  return quantize(w, spec).dequantize().astype(jnp.float32)


def output_error(dw, H):
  """Σ_n dw[:, n]ᵀ H dw[:, n], the squared output error per token of a weight error dw (K, N)."""
  return jnp.sum(dw * (H @ dw))


@dataclasses.dataclass(frozen=True)
class ScaleSearch:
  scale: jax.Array        # (K,) the chosen s
  alpha: float            # its exponent
  losses: np.ndarray      # (n_grid,) loss per candidate α


def candidate_scale(abs_mean, alpha):
  """s(α) = max(mean|x|^α, 1e-4) / sqrt(max · min), as the reference normalises it. abs_mean (K,) -> (K,)."""
  s = jnp.maximum(jnp.asarray(abs_mean, jnp.float32) ** alpha, 1e-4)
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("spec", "n_grid"))
def _scale_losses(Ws: tuple, H, x_mean, *, spec: QuantSpec, n_grid: int):
  """(n_grid,) losses and (n_grid, K) candidate scales; compiled once per shapes and spec (reused across layers)."""
  numel = sum(w.shape[1] for w in Ws)

  def loss_of(alpha):
    s = candidate_scale(x_mean, alpha)
    total = jnp.float32(0)
    for w in Ws:   # the few linears of one group (static)
      dw = w - _fake_quant(w * s[:, None], spec) / s[:, None]
      total = total + output_error(dw, H)
    return total / numel, s

  alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid
  return lax.map(loss_of, alphas)


def search_scale(Ws, H, abs_mean, spec: QuantSpec, *, n_grid: int = 20) -> ScaleSearch:
  """The AWQ scale s (K,) for linears `Ws` (each (K, N_i), Flax layout) fed by the same input.

  H: (K, K) XᵀX / n of that input (any positive multiple gives the same s); abs_mean: (K,) mean |x| per input
  channel.
  """
  K = H.shape[0]
  for w in Ws:
    if w.ndim != 2 or w.shape[0] != K:
      raise ValueError(f"AWQ: every weight must be (K={K}, N), got {w.shape}")
  if np.shape(abs_mean) != (K,):
    raise ValueError(f"AWQ: abs_mean must be (K={K},), got {np.shape(abs_mean)}")
  Ws = tuple(jnp.asarray(w, jnp.float32) for w in Ws)
  losses, scales = _scale_losses(Ws, jnp.asarray(H, jnp.float32), jnp.asarray(abs_mean, jnp.float32),
                                 spec=spec, n_grid=int(n_grid))
  losses = np.asarray(losses)
  best = int(np.argmin(losses))
  return ScaleSearch(scale=scales[best], alpha=best / n_grid, losses=losses)


@functools.partial(jax.jit, static_argnames=("spec", "n_grid", "n_steps"))
def _clip(W, H, *, spec: QuantSpec, n_grid: int, n_steps: int):
  K, N = W.shape
  g = spec.group_size or K
  kp = -(-K // g) * g
  G = kp // g
  Wp = jnp.pad(W, ((0, kp - K), (0, 0)))
  Hp = jnp.pad(H, ((0, kp - K), (0, kp - K))).reshape(G, g, G, g)
  idx = jnp.arange(G)
  Hb = Hp[idx, :, idx, :]                                                            # (G, g, g) diagonal blocks
  wg = Wp.reshape(G, g, N)                                                           # (G, g, N)
  org_max = jnp.max(jnp.abs(wg), axis=1, keepdims=True)                              # (G, 1, N)

  def block_err(w_clipped):
    dq = _fake_quant(w_clipped.reshape(kp, N)[:K], spec)
    dq = jnp.pad(dq, ((0, kp - K), (0, 0))).reshape(G, g, N)
    dw = wg - dq
    return jnp.einsum("gkn,gkl,gln->gn", dw, Hb, dw)                                 # (G, N)

  def step(i, carry):
    best_err, best_max = carry
    max_val = org_max * (1 - i.astype(jnp.float32) / n_grid)
    err = block_err(jnp.clip(wg, -max_val, max_val))
    better = err < best_err
    return jnp.where(better, err, best_err), jnp.where(better[:, None, :], max_val, best_max)

  init = (jnp.full((G, N), jnp.inf, jnp.float32), org_max)
  _, best_max = lax.fori_loop(0, n_steps, step, init)
  return jnp.clip(wg, -best_max, best_max).reshape(kp, N)[:K]


def search_clip(W, H, spec: QuantSpec, *, n_grid: int = 20, max_shrink: float = 0.5):
  """The AWQ-clipped weight (K, N): each (group, output) block clamped to the shrink of its absmax range that
  minimises that block's output error (group = spec's group size, or all of K for per-channel specs)."""
  W = jnp.asarray(W, jnp.float32)
  H = jnp.asarray(H, jnp.float32)
  if W.ndim != 2 or np.shape(H) != (W.shape[0],) * 2:
    raise ValueError(f"AWQ clip: expected W (K, N) and H (K, K), got {W.shape} and {np.shape(H)}")
  return _clip(W, H, spec=spec, n_grid=int(n_grid), n_steps=max(1, int(max_shrink * n_grid)))


@functools.partial(jax.jit, static_argnames=("spec", "n_grid", "clip", "max_shrink"))
def awq_layer(Ws: tuple, H, abs_mean, *, spec: QuantSpec, n_grid: int = 20, clip: bool = True,
              max_shrink: float = 0.5):
  """Scale search then (optionally) clip search for linears `Ws` (each (K, N_i)) fed by one input, as one
  compiled function (reused across layers of equal shapes).

  Returns (s (K,), index of the chosen α, the weights W_c (K, N_i)): the clipped weights in the original
  coordinates, so that ``with_in_scale(W_c, s, spec)`` quantizes s ⊙ W_c (whose clip search saw the statistics
  of X / s, H / (s sᵀ), as the reference clips after applying the scales).
  """
  Ws = tuple(jnp.asarray(w, jnp.float32) for w in Ws)
  H = jnp.asarray(H, jnp.float32)
  losses, scales = _scale_losses(Ws, H, jnp.asarray(abs_mean, jnp.float32), spec=spec, n_grid=n_grid)
  best = jnp.argmin(losses)
  s = scales[best]
  h_scaled = H / (s[:, None] * s[None, :])
  out = []
  for w in Ws:
    ws = w * s[:, None]
    if clip:
      ws = _clip(ws, h_scaled, spec=spec, n_grid=n_grid, n_steps=max(1, int(max_shrink * n_grid)))
    out.append(ws / s[:, None])
  return s, best, tuple(out)
