"""What every calibrated pytree transform (gptq, awq, smoothquant, llm_int8) shares: finding the calibrated,
selected weights of a tree with validation that names the key path, and putting quantized leaves back."""
from __future__ import annotations

import jax

from lowbit_jax import select as sel
from lowbit_jax.passes.calibration import Calibration
from lowbit_jax.qarray import QArray


def leaves_by_path(params) -> dict:
  """{path_repr: (key path, leaf)} with QArrays as leaves."""
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))[0]
  return {sel.path_repr(p): (p, leaf) for p, leaf in flat}


def calibrated_leaves(params, calib, where: sel.Where, op: str) -> list[tuple[str, tuple, object]]:
  """[(path_repr, key path, leaf)] of the float weights `calib` has statistics for and `where` selects, in
  calibration (first-use) order.

  Raises:
    ValueError: `calib` is not a Calibration; it has statistics for a leaf `params` lack (another model); `where`
      selects a weight without statistics; nothing is selected.
  """
  if not isinstance(calib, Calibration):
    raise ValueError(f"{op}: expected a lowbit_jax.Calibration, got {type(calib).__name__}")
  leaves = leaves_by_path(params)
  pred = sel.as_predicate(where)
  out = []
  for w in calib:
    if w not in leaves:
      raise ValueError(f"{w}: the calibration has statistics for a leaf that params lack; expected a "
                       f"calibration from the same model")
    path, leaf = leaves[w]
    if isinstance(leaf, QArray) or not hasattr(leaf, "shape") or not pred(sel.path_str(path), leaf):
      continue
    out.append((w, path, leaf))
  if where is not None:
    for p in sel.select(params, where):
      if sel.path_repr(p) not in calib:
        raise ValueError(f"{sel.path_repr(p)}: selected by `where` but the calibration has no statistics for it; "
                         f"expected a calibration that covers every selected weight")
  if not out:
    raise ValueError(f"{op}: no calibrated weight is selected (calibration covers {list(calib)[:6]}...)")
  return out


def replace_leaves(params, done: dict):
  """`params` with the leaves named in `done` (by `path_repr`) replaced; a new tree."""
  return jax.tree_util.tree_map_with_path(lambda p, l: done.get(sel.path_repr(p), l), params,
                                          is_leaf=lambda x: isinstance(x, QArray))
