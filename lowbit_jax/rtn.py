"""Round-to-nearest (RTN) quantization as a pytree transform: the baseline every other method is measured by.

    qparams = lowbit_jax.rtn(params, spec)          # selected leaves become QArrays, everything else is kept

Every leaf is quantized independently with `lowbit_jax.quantize` (round to nearest, clamp to the code range).
All selected leaves are validated before any is quantized, so an error leaves nothing half-done; the input tree
is never modified (a new tree is returned).
"""
from __future__ import annotations

import functools

import jax
from tqdm.auto import tqdm

from lowbit_jax import select as sel
from lowbit_jax.qarray import QArray, check_quantizable, quantize
from lowbit_jax.spec import QuantSpec


@functools.partial(jax.jit, static_argnames=("spec",))
def _quantize_jit(x, spec):
  return quantize(x, spec)


def rtn(params, spec: QuantSpec, *, where: sel.Where = None):
  """Quantize the selected leaves of `params` to `spec` by rounding to nearest.

  Args:
    params: any pytree of arrays (Flax linen params, an NNX `State`, a transformers Flax params dict).
    spec: the target format (`QuantSpec`).
    where: which leaves: None for the linear weights (`select.is_linear_weight`), a key-path regex matched
      against "a/b/kernel" paths, or a predicate `(path, leaf) -> bool`.

  Returns:
    A tree of the same structure with the selected leaves replaced by `QArray`s.

  Raises:
    ValueError: naming the key path, for an empty selection, non-float leaves, a missing contraction axis,
      a non-dividing group size under `strict`, or NaN/inf weights.
  """
  if not isinstance(spec, QuantSpec):
    raise ValueError(f"rtn: expected a QuantSpec, got {spec!r}")
  chosen = sel.select(params, where)
  for path, leaf in chosen.items():
    check_quantizable(leaf, spec, sel.path_repr(path))
  bar = tqdm(total=len(chosen), desc="rtn", leave=False, disable=len(chosen) < 16)

  def one(path, leaf):
    if path not in chosen:
      return leaf
    bar.update()
    return _quantize_jit(leaf, spec)

  out = jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, QArray))
  bar.close()
  return out
