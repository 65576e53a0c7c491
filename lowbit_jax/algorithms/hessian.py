"""The inverse-Hessian machinery shared by GPTQ and SparseGPT (one place, both cores import it).

Both papers solve the same layer-wise problem, min ||W X - Ŵ X||² with W (N outputs, K inputs), by the Optimal Brain
Surgeon sweep over the columns of W in blocks, with the upper Cholesky factor of the damped inverse Hessian:

  * Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ", ICLR 2023 (Algorithm 1; IST-DASLab/gptq `gptq.py`
    `fasterquant`);
  * Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023
    (Algorithm 1; IST-DASLab/sparsegpt `sparsegpt.py` `fasterprune`), which copies the same preprocessing.

Shared here, bit for bit what `gptq_core` did before the split:
  * dead inputs (H_kk == 0): H_kk := 1 and W[:, k] := 0 (`kill_dead`);
  * dampening H + frac * mean(diag(H)) * I, retried at larger fracs on device (`damped_inverse`, `damp_levels`);
  * Hinv = upper Cholesky factor of H^-1 (`upper_cholesky_of_inverse`);
  * padding of the sweep to whole blocks with dead, uncoupled columns (`pad_sweep`);
  * the lazy batch update after a block: the later columns get -Err1 @ Hinv[block, rest] (`lazy_update`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def upper_cholesky_of_inverse(H):
  """Hinv upper triangular with H^-1 = Hinvᵀ Hinv (the references' `cholesky(cholesky_inverse(cholesky(H)),
  upper=True)`)."""
  L = jnp.linalg.cholesky(H)
  Hi = jax.scipy.linalg.cho_solve((L, True), jnp.eye(H.shape[0], dtype=H.dtype))
  return jnp.linalg.cholesky(Hi).T


def damped_inverse(H, fracs):
  """Hinv of H + frac * mean(diag(H)) * I for the first frac of `fracs` (percdamp, x10, x100, ...) that makes it
  positive definite, as a `lax.while_loop` (one trace, vmappable: each layer stops at its own level). Returns
  Hinv, the number of extra dampings used and whether any level worked."""
  k = H.shape[0]
  mean_diag = jnp.mean(jnp.diag(H))
  eye = jnp.eye(k, dtype=jnp.float32)

  def cond(c):
    i, _, ok = c
    return (~ok) & (i < fracs.shape[0])

  def body(c):
    i, _, _ = c
    Hinv = upper_cholesky_of_inverse(H + (fracs[i] * mean_diag) * eye)
    return i + 1, Hinv, jnp.all(jnp.isfinite(Hinv))

  i, Hinv, ok = lax.while_loop(cond, body, (jnp.int32(0), jnp.zeros((k, k), jnp.float32), jnp.bool_(False)))
  return Hinv, i - 1, ok


def damp_levels(percdamp: float, max_damp_tries: int) -> list[float]:
  """percdamp, then x10 per retry: the max_damp_tries + 1 dampings `damped_inverse` tries (pass them as float32)."""
  fracs, f = [], float(percdamp)
  for _ in range(max_damp_tries + 1):
    fracs.append(f)
    f *= 10
  return fracs


def kill_dead(Wt, H):
  """(Wt, H) with dead inputs (H_kk == 0) removed from the problem: H_kk := 1, Wt[:, k] := 0. Wt: (N, K)."""
  dead = jnp.diag(H) == 0
  H = H + jnp.diag(dead.astype(jnp.float32))
  return jnp.where(dead[None, :], 0.0, Wt), H


def pad_sweep(Wt, Hinv, kr: int):
  """Wt (N, K) and Hinv (K, K) padded to kr columns: padding columns are zero, dead and uncoupled (Hinv = I there),
  so they change nothing."""
  k = Wt.shape[1]
  Wt = jnp.pad(Wt, ((0, 0), (0, kr - k)))
  Hinv = jnp.pad(Hinv, ((0, kr - k), (0, kr - k))) + jnp.diag((jnp.arange(kr) >= k).astype(jnp.float32))
  return Wt, Hinv


def lazy_update(W, err1, Hinv, i1, blocksize: int):
  """After the block of columns [i1, i1 + blocksize): W (N, Kr) minus err1 (N, B) @ Hinv[block, later columns]."""
  kr = W.shape[1]
  rows = lax.dynamic_slice(Hinv, (i1, 0), (blocksize, kr))             # (B, Kr), zero left of the block
  later = (jnp.arange(kr) >= i1 + blocksize)[None, :]
  return W - jnp.where(later, err1 @ rows, 0.0)
