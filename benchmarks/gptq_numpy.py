"""A straightforward NumPy GPTQ, written line by line after the reference implementation (IST-DASLab/gptq,
`GPTQ.fasterquant`, `quant.py`), with the spec's integer grids: the reference's own symmetric grid (FULL), Q4_0's
SIGNED_MAX, the RESTRICTED one, integer zero points or float offsets, and the reference's `mse` clipping search.
It is the baseline of `benchmarks/gptq.py` and the oracle
`tests/test_gptq_core.py` compares the JAX core against. float64 throughout, Python loops over columns."""
from __future__ import annotations

import numpy as np

from lowbit_jax.spec import DEFAULT_SYM_GRID, SymGrid


def _range(cols, bits, sym, grid, float_offset, ratio=1.0):
  """(scale, zero) per row of `cols` (N, g) for the range shrunk by `ratio`. Symmetric FULL is written as the
  reference's `Quantizer.find_params` writes it: xmax = max(|xmin|, xmax), xmin = -xmax,
  scale = (xmax - xmin) / maxq, zero = (maxq + 1) / 2."""
  maxq = 2 ** bits - 1
  if sym:
    if grid is SymGrid.FULL:
      xmax = np.maximum(-cols.min(axis=1), cols.max(axis=1)) * ratio
      scale, zero = (2 * xmax) / maxq, np.full(cols.shape[0], (maxq + 1) / 2)
    elif grid is SymGrid.SIGNED_MAX:   # llama.cpp quantize_row_q4_0_ref: d = max / -8 (max: signed, largest |x|)
      hi, lo = cols.max(axis=1), cols.min(axis=1)
      scale, zero = np.where(-lo > hi, lo, hi) * ratio / -(2 ** (bits - 1)), np.full(cols.shape[0], 2 ** (bits - 1))
    else:                              # RESTRICTED: absmax / (2**(b-1) - 1)
      scale = np.abs(cols).max(axis=1) * ratio / (2 ** (bits - 1) - 1)
      zero = np.full(cols.shape[0], 2 ** (bits - 1))
    return np.where(scale != 0, scale, 1.0), zero
  if float_offset:                     # llama.cpp Q4_1: d = (max - min) / maxq, m = min; shrunk about the midpoint
    mid, half = (cols.max(axis=1) + cols.min(axis=1)) / 2, (cols.max(axis=1) - cols.min(axis=1)) / 2 * ratio
    scale = 2 * half / maxq
    return np.where(scale != 0, scale, 1.0), mid - half
  lo, hi = np.minimum(cols.min(axis=1), 0) * ratio, np.maximum(cols.max(axis=1), 0) * ratio
  scale = (hi - lo) / maxq
  scale = np.where(scale > 0, scale, 1.0)
  return scale, np.clip(np.round(-lo / scale), 0, maxq)


def _params(cols, bits, sym, grid=DEFAULT_SYM_GRID, float_offset=False, mse=False, grid_steps=100, maxshrink=0.8,
            norm=2.4):
  """(scale, zero) per row; with `mse`, the reference's search: ratios p = 1 - i / grid_steps for
  i < maxshrink * grid_steps, keeping the p of least sum |q - x|**norm per row."""
  best = _range(cols, bits, sym, grid, float_offset)
  if not mse:
    return best
  best_err = np.full(cols.shape[0], np.inf)
  for i in range(int(maxshrink * grid_steps)):
    p = 1 - i / grid_steps
    scale, zero = _range(cols, bits, sym, grid, float_offset, p)
    err = (np.abs(_quant(cols, scale[:, None], zero[:, None], bits, float_offset) - cols) ** norm).sum(axis=1)
    take = err < best_err
    best_err = np.where(take, err, best_err)
    best = (np.where(take, scale, best[0]), np.where(take, zero, best[1]))
  return best


def _quant(w, scale, zero, bits, float_offset=False):
  if float_offset:
    return scale * np.clip(np.round((w - zero) / scale), 0, 2 ** bits - 1) + zero
  q = np.clip(np.round(w / scale) + zero, 0, 2 ** bits - 1)
  return scale * (q - zero)


def gptq_numpy(W, H, *, bits, group_size=None, sym=True, blocksize=128, percdamp=0.01, act_order=False,
               static_groups=False, grid=DEFAULT_SYM_GRID, float_offset=False, mse=False):
  """W: (K, N) Flax layout; H: (K, K). Returns the dequantized GPTQ weight, (K, N) float64."""
  grid_args = dict(grid=grid, float_offset=float_offset, mse=mse)
  W = np.array(W, np.float64).T                      # (N, K): rows = outputs, as the reference
  H = np.array(H, np.float64)
  ncol = W.shape[1]
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  g = group_size
  if static_groups and g:
    groups = [_params(W[:, i:i + g], bits, sym, **grid_args) for i in range(0, ncol, g)]
  if not g:
    scale, zero = _params(W, bits, sym, **grid_args)
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
        scale, zero = _params(W[:, i1 + i:i1 + i + g], bits, sym, **grid_args)
      if g and static_groups:
        scale, zero = groups[perm[i1 + i] // g]
      q = _quant(w, scale, zero, bits, float_offset)
      Q[:, i1 + i] = q
      err = (w - q) / d
      W1[:, i:] -= np.outer(err, Hinv1[i, i:])
      Err1[:, i] = err
    W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
  return Q[:, np.argsort(perm)].T
