"""SparseGPT on arrays: one (K, N) weight and its (K, K) Hessian in, the pruned (optionally quantized) weight out.

Paper: Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023
(Algorithm 1). Reference implementation: IST-DASLab/sparsegpt, `sparsegpt.py`, `SparseGPT.fasterprune`, matched
step by step (W has rows = outputs, columns = inputs, the transpose of a Flax (K, N) kernel):

  * the Hessian preprocessing of GPTQ, shared with it (`hessian.py`): dead inputs, dampening
    H += percdamp * mean(diag(H)) * I (retried x10 on device), Hinv = upper Cholesky factor of H^-1;
  * blocks of `blocksize` (128) columns; unstructured: at the start of a block, the mask prunes the lowest
    w² / Hinv_ii² of the block (its error-updated weights), `fraction` of the block's entries;
    N:M: every m columns, the m - n lowest w² / Hinv_ii² of those m columns in each row (`prunen`/`prunem`);
  * column i: q = w with the pruned entries set to 0 (then quantized, with a `spec`), err = (w - q) / Hinv_ii,
    the rest of the block gets -err ⊗ Hinv[i, i:], and after the block the later columns get -Err1 @ Hinv[block,
    rest] (GPTQ's lazy batch updates, `hessian.lazy_update`);
  * joint quantization (the paper's Section 3.5; the reference's `--wbits`): the quantizer's parameters are found
    once on the original weights (per channel, or static groups), every kept weight is quantized as the sweep
    reaches it, and a pruned entry gets the code of 0 (the implicit zero or the zero point), so it decodes to
    exactly 0.

Deviations: the unstructured mask prunes exactly floor(fraction * entries) of each block (a stable ranking; the
reference's `tmp <= thresh` may prune more on ties, and prunes one entry at fraction 0); padding columns of the last
block are never counted (the reference needs K % blocksize == 0). No act-order (the reference has none).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from lowbit_jax import formats
from lowbit_jax.algorithms.hessian import damped_inverse, kill_dead, lazy_update, pad_sweep
from lowbit_jax.algorithms.sparsity import NM, Pattern, lowest, nm_pruned
from lowbit_jax.formats import integer
from lowbit_jax.qarray import from_codes, quantize
from lowbit_jax.spec import QuantSpec


def _sweep(Wt, Hinv, S, Z, *, pattern: Pattern, spec: QuantSpec | None, blocksize: int, k: int):
  """The column loop. Wt (N, Kr), Hinv (Kr, Kr) upper, S/Z (G, N) the quantizer parameters (spec only). Returns
  the values (N, Kr) float32 (exact zeros where pruned), codes (N, Kr) uint8 (spec) or None, the pruned mask and
  the loss."""
  n, kr = Wt.shape
  g = kr if spec is None or spec.group_size is None else spec.group_size
  n_groups = 1 if S is None else S.shape[0]

  def column(i, c, i1):
    W1, Q1, codes, err1, M1, loss, Hinv1 = c
    if isinstance(pattern, NM):
      start = i % pattern.m == 0
      j = jnp.minimum(i, blocksize - pattern.m)
      tmp = lax.dynamic_slice(W1, (0, j), (n, pattern.m)) ** 2 / lax.dynamic_slice(
          jnp.diag(Hinv1), (j,), (pattern.m,))[None, :] ** 2
      M1 = jnp.where(start, lax.dynamic_update_slice(M1, nm_pruned(tmp, pattern.n, pattern.m, -1), (0, j)), M1)
    w = W1[:, i]
    d = Hinv1[i, i]
    pruned = M1[:, i]
    q = jnp.where(pruned, 0.0, w)
    if spec is not None:
      grow = jnp.minimum((i1 + i) // g, n_groups - 1)
      s, z = S[grow], (None if Z is None else Z[grow])
      zero_code = (jnp.uint8(integer.implicit_zero(spec.bits)) if z is None else z.astype(jnp.uint8))
      code = jnp.where(pruned, zero_code, integer.encode(q, s, z, spec))
      q = formats.dequantize(code, s, z, spec)
      codes = lax.dynamic_update_slice(codes, code[:, None], (0, i1 + i))
    err = (w - q) / d
    W1 = W1 - err[:, None] * Hinv1[i][None, :]
    Q1 = Q1.at[:, i].set(q)
    err1 = err1.at[:, i].set(err)
    loss = loss + jnp.sum((w - q) ** 2) / d ** 2 / 2
    return W1, Q1, codes, err1, M1, loss, Hinv1

  def block(b, c):
    W, Q, codes, M, loss = c
    i1 = b * blocksize
    W1 = lax.dynamic_slice(W, (0, i1), (n, blocksize))
    Hinv1 = lax.dynamic_slice(Hinv, (i1, i1), (blocksize, blocksize))
    if isinstance(pattern, NM):
      M1 = jnp.zeros((n, blocksize), bool)
    else:
      valid = (i1 + jnp.arange(blocksize)) < k
      tmp = jnp.where(valid[None, :], W1 ** 2 / jnp.diag(Hinv1)[None, :] ** 2, jnp.inf)
      n_valid = n * jnp.clip(k - i1, 0, blocksize)
      M1 = lowest(tmp, jnp.floor(pattern.fraction * n_valid.astype(jnp.float32)).astype(jnp.int32))
    init = (W1, jnp.zeros((n, blocksize), jnp.float32), codes, jnp.zeros((n, blocksize), jnp.float32), M1, loss,
            Hinv1)
    _, Q1, codes, err1, M1, loss, _ = lax.fori_loop(0, blocksize, functools.partial(column, i1=i1), init)
    W = lazy_update(W, err1, Hinv, i1, blocksize)
    Q = lax.dynamic_update_slice(Q, Q1, (0, i1))
    M = lax.dynamic_update_slice(M, M1, (0, i1))
    return W, Q, codes, M, loss

  codes = None if spec is None else jnp.zeros((n, kr), jnp.uint8)
  init = (Wt, jnp.zeros((n, kr), jnp.float32), codes, jnp.zeros((n, kr), bool), jnp.float32(0))
  _, Q, codes, M, loss = lax.fori_loop(0, kr // blocksize, block, init)
  return Q, codes, M, loss


@functools.partial(jax.jit, static_argnames=("pattern", "spec", "blocksize"))
def sparsegpt_solve(W, H, fracs, *, pattern: Pattern, spec: QuantSpec | None, blocksize: int):
  """SparseGPT of one (K, N) weight with its (K, K) Hessian, traceable end to end (`lax.map` it over layers).

  Inputs must be validated (`sparsegpt.py`): `spec` an integer QuantSpec along -2 whose grid holds 0 (no float
  offset) or None; an N:M pattern needs K % m == 0 and blocksize % m == 0. `fracs`: (T,) float32 dampings.
  Returns (pruned, mask, loss, tries, ok): `pruned` the (K, N) weight in W's dtype with exact zeros, or (spec) a
  QArray whose pruned entries decode to 0; `mask` (K, N) bool, True where pruned; the reference's loss; the index
  of the dampening used; whether any dampening made H positive definite (if not, the result is garbage)."""
  k, n = W.shape
  Wt, H = kill_dead(W.astype(jnp.float32).T, H)
  S = Z = None
  k_pad, g = k, 1
  if spec is not None:
    rtn = quantize(Wt.T, spec)                                     # parameters from the original weights
    k_pad, g = rtn.k_pad, spec.group_size or 1
    S = rtn.scale.astype(jnp.float32)
    Z = rtn.zero
  Hinv, tries, ok = damped_inverse(H, fracs)
  step = math.lcm(blocksize, g)
  kr = -(-k_pad // step) * step
  Wt, Hinv = pad_sweep(Wt, Hinv, kr)
  Q, codes, M, loss = _sweep(Wt, Hinv, S, Z, pattern=pattern, spec=spec, blocksize=blocksize, k=k)
  mask = M[:, :k].T
  if spec is None:
    return Q[:, :k].T.astype(W.dtype), mask, loss, tries, ok
  q = from_codes(codes[:, :k_pad].T, S.astype(spec.scale_dtype), Z, spec=rtn.spec, k=k, dtype=W.dtype)
  return q, mask, loss, tries, ok
