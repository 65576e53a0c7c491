"""Every quantization transform under one signature, by name.

    for name, transform in ALGORITHMS.items():
      qparams = transform(params, calib)                 # each with its default spec
      qparams = transform(params, calib, spec, where=r"layers/.*")

The contract every entry keeps (checked for all of them by `tests/test_algorithms_contract.py`):

  * `transform(params, calib, spec=<its default>, *, where=None, <its own options as keywords>)`;
  * the result is a new tree of the same structure whose selected float weights are `QArray`s of the input's
    shapes and dtypes; `lowbit_jax.quantized(apply_fn)` runs it under `jax.jit`, equal to `apply_fn` on the
    dequantized tree; the input tree is never modified;
  * every layout the trace records works: scanned stacks (layer axis in any position), several contraction axes,
    experts; weights without calibration statistics (convolutions) are quantized round-to-nearest, with a warning.
"""
from __future__ import annotations

from typing import Callable

from lowbit_jax import select as sel
from lowbit_jax.algorithms.awq import awq
from lowbit_jax.algorithms.gptq import DEFAULT_SPEC, gptq
from lowbit_jax.algorithms.llm_int8 import llm_int8
from lowbit_jax.algorithms.magnitude import magnitude_prune
from lowbit_jax.algorithms.sparsegpt import sparsegpt
from lowbit_jax.algorithms.smoothquant import smoothquant
from lowbit_jax.spec import QuantSpec


def rtn(params, calib=None, spec: QuantSpec = DEFAULT_SPEC, *, where: sel.Where = None):
  """`lowbit_jax.rtn.rtn` (round-to-nearest: the baseline every other entry is measured against), imported on
  call; `calib`: a Calibration, an Analysis or None."""
  from lowbit_jax.rtn import rtn as _rtn
  return _rtn(params, calib, spec, where=where)


ALGORITHMS: dict[str, Callable] = {
    "rtn": rtn,
    "gptq": gptq,
    "awq": awq,
    "smoothquant": smoothquant,
    "llm_int8": llm_int8,
}

# Pruning transforms: `transform(params, calib, options=Sparsity(), *, where=None, ..., strict=False)`; the selected
# weights stay float arrays (exact zeros) unless a quantization `spec` is given. They return floats, not QArrays,
# so they keep their own contract (tests/test_sparsity.py: signature, shapes/dtypes, input untouched, sparsity).
PRUNERS: dict[str, Callable] = {
    "magnitude": magnitude_prune,
    "sparsegpt": sparsegpt,
}

__all__ = ["ALGORITHMS", "PRUNERS"]
