"""The inverse-Hessian machinery shared by GPTQ and SparseGPT (one place, both cores import it).

Both papers solve the same layer-wise problem, min ||W X - Ŵ X||² with W (N outputs, K inputs), by the Optimal Brain
Surgeon sweep over the columns of W in blocks, with the upper Cholesky factor of the damped inverse Hessian:

  * Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ", ICLR 2023 (Algorithm 1; IST-DASLab/gptq `gptq.py`
    `fasterquant`);
  * Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023
    (Algorithm 1; IST-DASLab/sparsegpt `sparsegpt.py` `fasterprune`), which copies the same preprocessing.

Shared here (`axis` says which axis of the weight indexes the K inputs: 1 for SparseGPT's (N, K) rows-are-outputs
layout, 0 for GPTQ's (K, N)):
  * dead inputs (H_kk == 0): H_kk := 1 and W[:, k] := 0 (`kill_dead`);
  * dampening H + frac * mean(diag(H)) * I, a select on the diagonal, retried at larger fracs on device
    (`damped_inverse`, `damp_levels`);
  * Hinv = upper Cholesky factor of H^-1 (`upper_cholesky_of_inverse`), without forming H^-1: one Cholesky of the
    flipped H and one triangular inverse, where the references take a Cholesky, `cholesky_inverse` and a second
    Cholesky;
  * padding of the sweep to whole blocks with dead, uncoupled columns, when K is not already whole blocks
    (`pad_sweep`);
  * the lazy batch update after a block: only the later columns get -Err1 @ Hinv[block, rest], in chunks of the
    block's width (`lazy_update`; GPTQ also applies it to superblocks of blocks), the reference's N K² / 2
    multiply-adds over a sweep instead of N K².
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.linalg import solve_triangular

_LEAF = 512   # `_flipped_lower_inverse` halves down to blocks of at most this size, then solves against the identity


def _on_diag(k: int):
  """(k, k) bool, True on the diagonal: for selects that touch the diagonal in one fused pass (no scatter, no
  identity matrix in memory)."""
  return lax.broadcasted_iota(jnp.int32, (k, k), 0) == lax.broadcasted_iota(jnp.int32, (k, k), 1)


def _flipped_lower_inverse(L):
  """J L^-1 J (upper triangular) of a lower triangular L, J the exchange matrix, built flipped (no pass to flip
  it afterwards): with L = [[A, 0], [C, D]], L^-1 = [[A^-1, 0], [X, D^-1]] with X = -D^-1 C A^-1, so
  J L^-1 J = [[J D^-1 J, J X J], [0, J A^-1 J]] and J X J = -(J D^-1 J)(J C J)(J A^-1 J). Halved recursively (a
  static depth, log2(K / _LEAF)) so that the work runs as matrix products (about 2 K³ / 3 flops, the triangles
  not exploited) instead of one triangular solve against the identity (K³ flops, slower per flop on CPU); the
  floor is K³ / 3."""
  k = L.shape[0]
  if k <= _LEAF or k % 2:
    return solve_triangular(L, jnp.eye(k, dtype=L.dtype), lower=True)[::-1, ::-1]
  h = k // 2
  Af, Df = _flipped_lower_inverse(L[:h, :h]), _flipped_lower_inverse(L[h:, h:])  # (h, h) each
  Xf = -(Df @ (L[h:, :h][::-1, ::-1] @ Af))                                       # (h, h)
  return jnp.block([[Df, Xf], [jnp.zeros((h, h), L.dtype), Af]])


def upper_cholesky_of_inverse(H):
  """Hinv upper triangular with H^-1 = Hinvᵀ Hinv (the references' `cholesky(cholesky_inverse(cholesky(H)),
  upper=True)`), from one Cholesky: with J the exchange matrix and J H J = M Mᵀ (M lower), H = R Rᵀ with
  R = J M J upper, so H^-1 = (R^-1)ᵀ R^-1 and R^-1 = J M^-1 J is upper with a positive diagonal: the unique
  upper Cholesky factor of H^-1. Like the references' `torch.linalg.cholesky`, only H's lower triangle is read
  (no symmetrization): factoring (J H J)ᵀ, whose lower triangle is H's, hands LAPACK its column-major operand
  without a transpose. A failed factorization gives NaNs."""
  M = lax.linalg.cholesky(H[::-1, ::-1].T, symmetrize_input=False)
  return _flipped_lower_inverse(M)


def damped(H, frac):
  """H + frac * mean(diag(H)) * I, as a select on the diagonal (no identity matrix, no scatter)."""
  return jnp.where(_on_diag(H.shape[0]), H + frac * jnp.mean(jnp.diagonal(H)), H)


def damped_inverse(H, fracs):
  """Hinv of H + frac * mean(diag(H)) * I for the first frac of `fracs` (percdamp, x10, x100, ...) that makes it
  positive definite: the first level directly, the retries as a `lax.while_loop` that runs no step when the first
  level works (one trace, vmappable: each layer stops at its own level). Returns Hinv, the number of extra
  dampings used and whether any level worked.

  The dampening is a select on the diagonal (no identity matrix, no scatter); success is a finite diagonal of
  Hinv: a failed Cholesky is all NaN, and a successful one of a finite H has a finite inverse."""
  def attempt(i):
    Hinv = upper_cholesky_of_inverse(damped(H, fracs[i]))
    return i + 1, Hinv, jnp.all(jnp.isfinite(jnp.diagonal(Hinv)))

  def cond(c):
    i, _, ok = c
    return (~ok) & (i < fracs.shape[0])

  i, Hinv, ok = lax.while_loop(cond, lambda c: attempt(c[0]), attempt(jnp.int32(0)))
  return Hinv, i - 1, ok


def damp_levels(percdamp: float, max_damp_tries: int) -> list[float]:
  """percdamp, then x10 per retry: the max_damp_tries + 1 dampings `damped_inverse` tries (pass them as float32)."""
  fracs, f = [], float(percdamp)
  for _ in range(max_damp_tries + 1):
    fracs.append(f)
    f *= 10
  return fracs


def kill_dead(W, H, axis: int = 1):
  """(W, H) with dead inputs (H_kk == 0) removed from the problem: H_kk := 1, W's input k := 0. W: (N, K) with
  axis=1, (K, N) with axis=0."""
  k = H.shape[0]
  dead = jnp.diagonal(H) == 0
  H = jnp.where(_on_diag(k) & dead[None, :], 1.0, H)
  return jnp.where(jnp.expand_dims(dead, 1 - axis), 0.0, W), H


def pad_sweep(W, Hinv, kr: int, axis: int = 1):
  """W and Hinv (K, K) padded to kr inputs (W's `axis`): padding inputs are zero, dead and uncoupled (Hinv = I
  there), so they change nothing. No copy when K == kr."""
  k = Hinv.shape[0]
  if k == kr:
    return W, Hinv
  pad = [(0, 0), (0, 0)]
  pad[axis] = (0, kr - k)
  Hinv = jnp.pad(Hinv, ((0, kr - k), (0, kr - k)))                              # (kr, kr)
  Hinv = jnp.where(_on_diag(kr) & (jnp.arange(kr) >= k)[None, :], 1.0, Hinv)
  return jnp.pad(W, pad), Hinv


def lazy_update(W, err1, Hinv, i1, blocksize: int, axis: int = 1):
  """After the block of inputs [i1, i1 + B): W minus err1 @ Hinv[block, later inputs], on the later inputs only.

  W: (N, Kr) with err1 (N, B) (axis=1), or (Kr, N) with err1 (B, N) (axis=0); Kr a multiple of B. The later
  inputs go by in chunks of B (a `fori_loop` with a traced trip count), each one (N, B) x (B, B) product."""
  kr = W.shape[axis]
  i2 = i1 + blocksize

  def chunk(c, W):
    j = i2 + c * blocksize
    h = lax.dynamic_slice(Hinv, (i1, j), (blocksize, blocksize))                 # (B, B): block x chunk
    if axis == 1:
      start = (0, j)
      upd = err1 @ h                                                              # (N, B)
    else:
      start = (j, 0)
      upd = h.T @ err1                                                            # (B, N)
    cur = lax.dynamic_slice(W, start, upd.shape)
    return lax.dynamic_update_slice(W, cur - upd, start)

  return lax.fori_loop(0, (kr - i2) // blocksize, chunk, W)
