"""Kernels over QArrays. `qmatmul(x, w, backend=...)` dispatches to an implementation after legality checks.

Each op lives in `kernels/<op>/` with `reference.py` (the spec, pure jnp); Pallas GPU/TPU kernels are added
beside it and must equal the reference on random inputs.
"""
from __future__ import annotations

import enum

import jax.numpy as jnp

from lowbit_jax.kernels.qmatmul import reference
from lowbit_jax.qarray import QArray


class Backend(enum.Enum):
  AUTO = "auto"            # the fastest legal implementation for the platform (today: the reference)
  REFERENCE = "reference"  # the pure-jnp spec


def qmatmul(x, w: QArray, *, backend: Backend = Backend.AUTO):
  """``x @ w`` for a 2-D QArray `w` of logical shape (K, N) (contraction axis -2), x of shape (..., K).

  Returns (..., N) in x.dtype, accumulated in float32.
  """
  if not isinstance(w, QArray):
    raise ValueError(f"qmatmul: expected w to be a QArray, got {type(w).__name__}")
  if w.ndim != 2 or w.axis != -2:
    raise ValueError(f"qmatmul: expected a 2-D QArray with contraction axis -2 (K, N), got shape {w.shape} "
                     f"with axis {w.axis}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"qmatmul: expected floating activations, got {x.dtype}")
  if x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"qmatmul: x of shape {tuple(x.shape)} does not contract with w of shape {w.shape}; "
                     f"expected x.shape[-1] == {w.shape[0]}")
  if not isinstance(backend, Backend):
    raise ValueError(f"qmatmul: backend must be a lowbit_jax.kernels.Backend, got {backend!r}")
  return reference.qmatmul(x, w)
