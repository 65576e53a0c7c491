"""Asymmetric calibration's target: the float weight that best maps quantized inputs to the float model's outputs.

GPTQ as the reference runs it (and `lowbit_jax.streamed` by default) calibrates each block on the outputs of the
already-quantized blocks before it, X, and solves min ||X W − X Ŵ||²: it reproduces what the *float* weight would
do on the *quantized* inputs, and the error the earlier blocks made passes on. GPTAQ (Li, Yin, Liu, Gong, Panda,
"GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric Calibration", ICML 2025) asks each block for the
float model's outputs instead, min ||X_ref W − X Ŵ||² with X_ref the same tokens' activations in the float model.
With XᵀX positive definite that objective splits as

    ||X_ref W − X Ŵ||² = ||X (W* − Ŵ)||² + ||X_ref W − X W*||²,    W* = W + (XᵀX)⁻¹ Xᵀ(X_ref − X) W

(X W* is the projection of X_ref W on X's columns, so the residual is orthogonal to anything X Ŵ can be): any
method that minimizes ||X W* − X Ŵ||², GPTQ or SparseGPT exactly, minimizes the asymmetric objective when handed W*
as the float weight, with the usual statistics of X. GPTAQ fuses this into GPTQ's column sweep; computing W* first
is the same objective (up to dampening: XᵀX is damped as GPTQ damps it) for every calibrated method.

The statistics: `Stats.xtd` = Σ Xᵀ(X_ref − X), from `lowbit_jax.calibrate(..., reference=...)`. `retarget_core` is
one (K, N) problem on arrays; `retarget` maps it over a tree's calibrated weights in their recorded layouts.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import solve_triangular

from lowbit_jax import select as sel
from lowbit_jax.algorithms import common
from lowbit_jax.algorithms.hessian import damped
from lowbit_jax.passes.calibration import Calibration


@jax.jit
def retarget_core(W, xtx, xtd, percdamp):
  """W* = W + (XᵀX + λI)⁻¹ Xᵀ(X_ref − X) W for W (K, N), xtx = XᵀX and xtd = Xᵀ(X_ref − X) (K, K), λ = percdamp x
  mean(diag XᵀX) (GPTQ's dampening); returns (W*, ok). Not ok (W returned): no signal (XᵀX all zero) or a
  factorization that failed."""
  L = lax.linalg.cholesky(damped(xtx, percdamp), symmetrize_input=False)              # (K, K) lower
  y = solve_triangular(L, xtd @ W, lower=True)                                        # (K, N)
  delta = solve_triangular(L, y, lower=True, trans=1)                                 # (K, N)
  ok = (jnp.mean(jnp.diagonal(xtx)) > 0) & jnp.all(jnp.isfinite(delta))
  return jnp.where(ok, W + delta, W), ok


def retarget(params, calib: Calibration, *, where: sel.Where = None, percdamp: float = 0.01):
  """Each calibrated float weight (with `xtd`: a calibration against reference inputs) replaced by its asymmetric
  target W* (see the module docstring), in its own dtype; a new tree. Layers whose target cannot be computed keep
  their weight, with a warning naming them.

  Raises:
    ValueError: naming the key path, for a calibration without the cross statistic (not collected against
      reference inputs).
  """
  done = {}
  for t in common.calibrated_leaves(params, calib, where, "retarget"):
    if not t.has_stats:
      continue
    st = t.wc.stats
    if st.xtd is None or st.xtx is None:
      raise ValueError(f"{t.where}: the calibration has no cross statistic Xᵀ(X_ref − X) (or no XᵀX); expected "
                       f"lowbit_jax.calibrate(..., reference=...) with Stat.HESSIAN")
    lay = t.layout
    kk = (-1, lay.k, lay.k)
    new, ok = jax.vmap(retarget_core, in_axes=(0, 0, 0, None))(
        t.kn(jnp.float32), jnp.reshape(st.xtx, kk), jnp.reshape(st.xtd, kk), jnp.float32(percdamp))
    ok = np.asarray(ok)
    if not ok.all():
      warnings.warn(f"{common.layer_names(t, np.flatnonzero(~ok))}: no asymmetric target (all-zero activations or "
                    f"a failed factorization); kept the weight as the target", RuntimeWarning, stacklevel=2)
    done[t.path] = lay.kn_to_leaf(new.reshape(lay.b_shape + (lay.k, lay.n))).astype(t.leaf.dtype)
  return common.replace_leaves(params, done)
