"""A straightforward NumPy GPTQ, written line by line after the reference implementation (IST-DASLab/gptq,
`GPTQ.fasterquant`), with the spec's integer grid. It is the baseline of `benchmarks/gptq.py` and the oracle
`tests/test_gptq_core.py` compares the JAX core against. float64 throughout, Python loops over columns."""
from __future__ import annotations

import numpy as np


def _params(cols, bits, sym):
  """(scale, zero) per row of `cols` (N, g) on the spec's grid (lowbit_jax.formats.integer)."""
  if sym:
    scale = np.abs(cols).max(axis=1) / (2 ** (bits - 1) - 1)
    scale = np.where(scale > 0, scale, 1.0)
    return scale, np.full_like(scale, 2 ** (bits - 1))
  lo, hi = np.minimum(cols.min(axis=1), 0), np.maximum(cols.max(axis=1), 0)
  scale = (hi - lo) / (2 ** bits - 1)
  scale = np.where(scale > 0, scale, 1.0)
  return scale, np.clip(np.round(-lo / scale), 0, 2 ** bits - 1)


def _quant(w, scale, zero, bits):
  q = np.clip(np.round(w / scale) + zero, 0, 2 ** bits - 1)
  return scale * (q - zero)


def gptq_numpy(W, H, *, bits, group_size=None, sym=True, blocksize=128, percdamp=0.01, act_order=False,
               static_groups=False):
  """W: (K, N) Flax layout; H: (K, K). Returns the dequantized GPTQ weight, (K, N) float64."""
  W = np.array(W, np.float64).T                      # (N, K): rows = outputs, as the reference
  H = np.array(H, np.float64)
  ncol = W.shape[1]
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  g = group_size
  if static_groups and g:
    groups = [_params(W[:, i:i + g], bits, sym) for i in range(0, ncol, g)]
  if not g:
    scale, zero = _params(W, bits, sym)
  perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(ncol)
  W, H = W[:, perm], H[perm][:, perm]
  H[np.diag_indices(ncol)] += percdamp * np.mean(np.diag(H))
  Hinv = np.linalg.cholesky(np.linalg.inv(H)).T      # upper factor: H^-1 = Hinvᵀ Hinv
  Q = np.zeros_like(W)
  for i1 in range(0, ncol, blocksize):
    i2 = min(i1 + blocksize, ncol)
    W1 = W[:, i1:i2].copy()
    Err1 = np.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
      w, d = W1[:, i], Hinv1[i, i]
      if g and not static_groups and (i1 + i) % g == 0:
        scale, zero = _params(W[:, i1 + i:i1 + i + g], bits, sym)
      if g and static_groups:
        scale, zero = groups[perm[i1 + i] // g]
      q = _quant(w, scale, zero, bits)
      Q[:, i1 + i] = q
      err = (w - q) / d
      W1[:, i:] -= np.outer(err, Hinv1[i, i:])
      Err1[:, i] = err
    W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
  return Q[:, np.argsort(perm)].T
