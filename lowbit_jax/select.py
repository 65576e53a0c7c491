"""Which leaves a transform touches: the default "linear weights" rule, a key-path regex, or a predicate.

Key paths are written two ways: `path_str` ("layers_3/mlp/kernel", what a regex is matched against; NNX's trailing
`.value` is dropped) and `path_repr` (`params['layers_3']['mlp']['kernel']`, what error messages show).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from lowbit_jax.qarray import QArray

Where = Union[None, str, "re.Pattern[str]", Callable[[str, Any], bool]]

_WRAPPER_ATTRS = ("value", "raw_value")   # nnx.Variable / VariableState hold the array under `.value`
LINEAR_NAMES = ("kernel", "weight")


def _key_name(k) -> str:
  if isinstance(k, DictKey):
    return str(k.key)
  if isinstance(k, GetAttrKey):
    return k.name
  if isinstance(k, SequenceKey):
    return str(k.idx)
  if isinstance(k, FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(path) -> str:
  names = [_key_name(k) for k in path]
  while names and isinstance(path[len(names) - 1], GetAttrKey) and names[-1] in _WRAPPER_ATTRS:
    names.pop()
  return "/".join(names)


def path_repr(path) -> str:
  return "params" + jax.tree_util.keystr(path)


def is_linear_weight(path: str, leaf) -> bool:
  """The default selection: float leaves of >= 2 dims named `kernel` or `weight`, outside any embedding.

  Embedding tables, norm scales and biases stay in float (select them explicitly to quantize them). A tied
  classifier that reuses the embedding is therefore left alone; an untied `lm_head`/`output` kernel is selected.
  """
  parts = path.split("/")
  return (jnp.issubdtype(leaf.dtype, jnp.floating) and len(leaf.shape) >= 2
          and parts[-1] in LINEAR_NAMES and not any("embed" in p.lower() for p in parts))


def as_predicate(where: Where) -> Callable[[str, Any], bool]:
  """None -> `is_linear_weight`; a str or compiled regex -> `re.search` on `path_str`; a callable as is."""
  if where is None:
    return is_linear_weight
  if isinstance(where, str):
    try:
      where = re.compile(where)
    except re.error as e:
      raise ValueError(f"where: {where!r} is not a valid key-path regex ({e}); expected a regex matched against "
                       f"'a/b/kernel' paths, None or a predicate (path, leaf) -> bool") from e
  if isinstance(where, re.Pattern):
    pattern = where
    return lambda path, leaf: pattern.search(path) is not None
  if callable(where):
    return where
  raise ValueError(f"where: expected None, a key-path regex or a predicate (path, leaf) -> bool, got {where!r}")


def select(params, where: Where = None) -> dict[tuple, Any]:
  """The selected leaves as {key path: leaf}. Existing QArrays are never selected.

  Raises:
    ValueError: when nothing is selected (the message lists a few key paths that exist).
  """
  pred = as_predicate(where)
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))[0]
  chosen = {path: leaf for path, leaf in flat
            if not isinstance(leaf, QArray) and hasattr(leaf, "shape") and pred(path_str(path), leaf)}
  if not chosen:
    sample = ", ".join(path_str(p) for p, _ in flat[:6])
    raise ValueError(f"empty selection: where={where!r} selects no leaf of the params tree; expected at least "
                     f"one weight (the tree has {len(flat)} leaves, e.g. {sample})")
  return chosen
