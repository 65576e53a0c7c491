"""Views of a QArray applied to its packed leaves: transpose, reshape, slice, leaf-wise identity ops.

Each function returns a valid `QArray` (see `lowbit_jax/qarray.py`) whose `dequantize()` equals the same view of
the input's `dequantize()`, without ever forming the float weight:

  * codes, scale and zero all have the QArray's rank; a non-contraction axis of a scale / zero leaf is either
    full (the logical length) or 1 (broadcast: per-tensor scales), and a view keeps it so;
  * the contraction axis (`q.axis`, where codes are packed and groups are cut) must survive as one whole axis:
    it may move (transpose) but not merge, split or be sliced. A view that would touch it raises `ViewError`,
    and the caller dequantizes instead (recording why);
  * a double-quantized scale (itself a QArray) is viewed recursively; if its own packing axis would be touched,
    the scale is resolved to float32 (`resolve_scales`; size K/g x N, never the weight) and the view goes on.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from lowbit_jax.qarray import QArray


class ViewError(Exception):
  """The view cannot be applied to the packed leaves (it touches the contraction axis)."""


def _with(q: QArray, codes, scale, zero, axis: int | None = None, dtype=None, in_scale=None) -> QArray:
  spec = q.spec
  if axis is not None and axis != spec.axis:
    spec = dataclasses.replace(spec, granularity=dataclasses.replace(spec.granularity, axis=axis))
  return QArray.tree_unflatten((spec, q.k, q.dtype if dtype is None else dtype), (codes, scale, zero, in_scale))


def with_dtype(q: QArray, dtype) -> QArray:
  """The same QArray, dequantizing to `dtype` (a float `convert_element_type` of the weight)."""
  return _with(q, q.codes, q.scale, q.zero, dtype=dtype, in_scale=q.in_scale)


def resolve_scales(q: QArray) -> QArray:
  """Replace a double-quantized scale by its float32 values (the spec no longer claims double quantization)."""
  if not isinstance(q.scale, QArray):
    return q
  spec = dataclasses.replace(q.spec, double_quant=False, scale_dtype=jnp.float32)
  return QArray.tree_unflatten((spec, q.k, q.dtype), (q.codes, q.scale_values(), q.zero, q.in_scale))


def _scale_view(q: QArray, view, leaf_fn):
  """Apply `view` (a QArray -> QArray function) to a nested scale, or `leaf_fn` to a plain one."""
  if isinstance(q.scale, QArray):
    try:
      return view(q.scale), q
    except ViewError:
      q = resolve_scales(q)
  return leaf_fn(q.scale), q


def transpose(q: QArray, perm) -> QArray:
  nd = q.ndim
  perm = tuple(int(p) % nd for p in perm)
  new_axis = perm.index(nd + q.axis) - nd
  scale, q = _scale_view(q, lambda s: transpose(s, perm), lambda s: jnp.transpose(s, perm))
  zero = None if q.zero is None else jnp.transpose(q.zero, perm)
  ins = None if q.in_scale is None else jnp.transpose(q.in_scale, perm)
  return _with(q, jnp.transpose(q.codes, perm), scale, zero, axis=new_axis, in_scale=ins)


def _split_target(shape, axis, new_shape) -> int:
  """Index of the contraction axis in `new_shape`, if it survives as a whole axis with the same blocks around."""
  i = len(shape) + axis
  a, k, b = math.prod(shape[:i]), shape[i], math.prod(shape[i + 1:])
  for j, n in enumerate(new_shape):
    if n == k and math.prod(new_shape[:j]) == a and math.prod(new_shape[j + 1:]) == b:
      return j
  raise ViewError(f"reshape {tuple(shape)} -> {tuple(new_shape)} merges or splits the contraction axis {axis}")


def _part(leaf_part, logical_part, new_part):
  if tuple(leaf_part) == tuple(logical_part):
    return tuple(new_part)
  if all(n == 1 for n in leaf_part):
    return (1,) * len(new_part)
  raise ViewError("a scale axis is neither full nor broadcast")


def reshape(q: QArray, new_shape) -> QArray:
  shape, new_shape = q.shape, tuple(int(n) for n in new_shape)
  i = q.ndim + q.axis
  j = _split_target(shape, q.axis, new_shape)

  def leaf_shape(leaf_s):
    return (_part(leaf_s[:i], shape[:i], new_shape[:j]) + (leaf_s[i],)
            + _part(leaf_s[i + 1:], shape[i + 1:], new_shape[j + 1:]))

  def leaf(arr):
    return arr.reshape(leaf_shape(arr.shape))

  scale, q = _scale_view(q, lambda s: reshape(s, leaf_shape(s.shape)), leaf)
  zero = None if q.zero is None else leaf(q.zero)
  ins = None if q.in_scale is None else leaf(q.in_scale)
  return _with(q, leaf(q.codes), scale, zero, axis=j - len(new_shape), in_scale=ins)


def slice_axis(q: QArray, dim: int, start, size: int, *, dynamic: bool) -> QArray:
  """Entries [start, start + size) of axis `dim` (not the contraction axis); `start` may be traced if dynamic."""
  nd = q.ndim
  dim %= nd
  if dim == nd + q.axis:
    raise ViewError("slice of the contraction axis")
  full = q.shape[dim]

  def leaf(arr):
    if arr.shape[dim] == 1 and full != 1:
      return arr
    if arr.shape[dim] != full:
      raise ViewError("a scale axis is neither full nor broadcast")
    if dynamic:
      return lax.dynamic_slice_in_dim(arr, start, size, axis=dim)
    return lax.slice_in_dim(arr, start, start + size, axis=dim)

  scale, q = _scale_view(q, lambda s: slice_axis(s, dim, start, size, dynamic=dynamic), leaf)
  zero = None if q.zero is None else leaf(q.zero)
  ins = None if q.in_scale is None else leaf(q.in_scale)
  return _with(q, leaf(q.codes), scale, zero, in_scale=ins)


def leafwise(q: QArray, fn) -> QArray:
  """An identity-valued op (`copy`, `pvary`, ...) applied to every leaf."""
  return jax.tree.map(fn, q)


def broadcast_leading(q: QArray) -> QArray:
  """Give every leaf the full leading axis, so that `scan` slices scales along with codes (per-tensor scales
  are stored with a length-1 leading axis)."""
  if q.ndim + q.axis == 0:
    raise ViewError("the leading axis is the contraction axis")
  n = q.shape[0]
  return jax.tree.map(lambda a: a if a.shape[0] == n else jnp.broadcast_to(a, (n,) + a.shape[1:]), q)


def as_matrix(q: QArray, contract_dim: int) -> tuple[QArray, tuple[int, ...]]:
  """(K, N) view with contraction axis -2 for `kernels.qmatmul`, plus the free shape N unflattens to."""
  nd = q.ndim
  contract_dim %= nd
  if contract_dim != nd + q.axis:
    raise ViewError(f"the dot contracts axis {contract_dim - nd}, the QArray is quantized along {q.axis}")
  perm = (contract_dim,) + tuple(d for d in range(nd) if d != contract_dim)
  t = transpose(q, perm) if perm != tuple(range(nd)) else q
  free = tuple(t.shape[1:])
  return reshape(t, (t.shape[0], math.prod(free))), free
