"""Views of a QArray applied to its packed leaves: transpose, reshape, slice, take, leaf-wise identity ops.

Each function returns a valid `QArray` (see `lowbit_jax/qarray.py`) whose `dequantize()` equals the same view of
the input's `dequantize()`, without ever forming the float weight. Views are written in *logical* axes (the
weight's shape, `q.shape`); the contraction block (`q.k_axes`: one or several consecutive logical axes, stored
flattened as one packed axis) is what constrains them:

  * codes, scale and zero all have the stored rank; a non-contraction axis of a scale / zero leaf is either
    full (the logical length) or 1 (broadcast: per-tensor scales), and a view keeps it so;
  * the contraction block must survive whole and in order: it may move (transpose), be merged into one axis or
    split along a reshape (its product stays K), but not be sliced, indexed or interleaved with other axes. A view
    that would do so raises `ViewError`, and the caller dequantizes instead (recording why);
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
  """The view cannot be applied to the packed leaves (it touches the contraction block)."""


def _with(q: QArray, codes, scale, zero, *, axis: int | None = None, k_shape=None, dtype=None,
          in_scale=None, perm=False) -> QArray:
  spec = q.spec
  if axis is not None and axis != spec.axis:
    spec = dataclasses.replace(spec, granularity=dataclasses.replace(spec.granularity, axis=axis))
  aux = (spec, q.k_shape if k_shape is None else tuple(k_shape), q.dtype if dtype is None else dtype,
         q.perm if perm is False else perm)
  return QArray.tree_unflatten(aux, (codes, scale, zero, in_scale))


def physical(q: QArray) -> QArray:
  """`q` with `perm` applied to the stored leaves (perm None), possible when the contraction block is
  consecutive in the logical order; a QArray whose block is interleaved with other axes raises `ViewError`."""
  if q.perm is None:
    return q
  ka = q.k_axes
  if ka != tuple(range(ka[0], ka[0] + len(ka))):
    raise ViewError(f"the contraction block {ka} is interleaved with other axes (transpose them out first)")
  flat = QArray.tree_unflatten((q.spec, q.k_shape, q.dtype, None), (q.codes, q.scale, q.zero, q.in_scale))
  return _transpose_physical(flat, q.perm)


def with_dtype(q: QArray, dtype) -> QArray:
  """The same QArray, dequantizing to `dtype` (a float `convert_element_type` of the weight)."""
  return _with(q, q.codes, q.scale, q.zero, dtype=dtype, in_scale=q.in_scale)


def with_k_shape(q: QArray, k_shape) -> QArray:
  """The same stored bytes with the contraction block unflattened to `k_shape` (product K)."""
  q = physical(q)
  if math.prod(k_shape) != q.k:
    raise ViewError(f"k_shape {tuple(k_shape)} does not multiply to K={q.k}")
  return _with(q, q.codes, q.scale, q.zero, k_shape=k_shape, in_scale=q.in_scale)


def resolve_scales(q: QArray) -> QArray:
  """Replace a double-quantized scale by its float32 values (the spec no longer claims double quantization)."""
  if not isinstance(q.scale, QArray):
    return q
  spec = dataclasses.replace(q.spec, double_quant=False, scale_dtype=jnp.float32)
  return QArray.tree_unflatten((spec, q.k_shape, q.dtype, q.perm), (q.codes, q.scale_values(), q.zero, q.in_scale))


def _scale_view(q: QArray, view, leaf_fn):
  """Apply `view` (a QArray -> QArray function) to a nested scale, or `leaf_fn` to a plain one."""
  if isinstance(q.scale, QArray):
    try:
      return view(q.scale), q
    except ViewError:
      q = resolve_scales(q)
  return leaf_fn(q.scale), q


def _leaves(q: QArray, fn, scale_view):
  scale, q = _scale_view(q, scale_view, fn)
  zero = None if q.zero is None else fn(q.zero)
  ins = None if q.in_scale is None else fn(q.in_scale)
  return q, fn(q.codes), scale, zero, ins


def _stored_dim(q: QArray, dim: int) -> int:
  """The stored axis of logical axis `dim` (outside the contraction block)."""
  ka = q.k_axes
  if dim in ka:
    raise ViewError(f"axis {dim} is part of the contraction block {ka}")
  return dim if dim < ka[0] else dim - len(ka) + 1


def transpose(q: QArray, perm) -> QArray:
  """A logical transpose: applied to the stored leaves when the contraction block stays consecutive, else kept
  as `perm` metadata (no data moves) until a later view brings the block together again."""
  nd = q.ndim
  perm = tuple(int(p) % nd for p in perm)
  base = tuple(range(nd)) if q.perm is None else q.perm
  composed = tuple(base[p] for p in perm)
  flat = QArray.tree_unflatten((q.spec, q.k_shape, q.dtype, None), (q.codes, q.scale, q.zero, q.in_scale))
  try:
    return _transpose_physical(flat, composed)
  except ViewError:
    return _with(flat, flat.codes, flat.scale, flat.zero, in_scale=flat.in_scale,
                 perm=None if composed == tuple(range(nd)) else composed)


def _transpose_physical(q: QArray, perm) -> QArray:
  nd = q.ndim
  perm = tuple(int(p) % nd for p in perm)
  ka = q.k_axes
  pos = perm.index(ka[0])
  if perm[pos:pos + len(ka)] != ka:
    raise ViewError(f"transpose {perm} reorders or separates the contraction block {ka}")
  stored_perm = []
  for a in perm:
    if a in ka[1:]:
      continue
    stored_perm.append(ka[0] if a == ka[0] else _stored_dim(q, a))
  stored_perm = tuple(stored_perm)
  sp = lambda s: _transpose_physical(s, stored_perm)   # a nested scale has the stored rank and a 1-axis block
  q, codes, scale, zero, ins = _leaves(q, lambda a: jnp.transpose(a, stored_perm), sp)
  return _with(q, codes, scale, zero, axis=pos - len(stored_perm), in_scale=ins)


def _k_run(shape, ka, new_shape) -> tuple[int, int]:
  """[j0, j1): the axes of `new_shape` that the contraction block `ka` of `shape` becomes, if it survives whole
  (same products before, inside and after it)."""
  a, k, b = math.prod(shape[:ka[0]]), math.prod(shape[ka[0]:ka[-1] + 1]), math.prod(shape[ka[-1] + 1:])
  best = None
  for j0 in range(len(new_shape)):
    if math.prod(new_shape[:j0]) != a:
      continue
    for j1 in range(j0 + 1, len(new_shape) + 1):
      if math.prod(new_shape[j0:j1]) == k and math.prod(new_shape[j1:]) == b:
        if best is None or j1 - j0 < best[1] - best[0]:
          best = (j0, j1)
  if best is None:
    raise ViewError(f"reshape {tuple(shape)} -> {tuple(new_shape)} merges or splits the contraction block {ka} "
                    f"with other axes")
  return best


def _part(leaf_part, logical_part, new_part):
  if tuple(leaf_part) == tuple(logical_part):
    return tuple(new_part)
  if all(n == 1 for n in leaf_part):
    return (1,) * len(new_part)
  raise ViewError("a scale axis is neither full nor broadcast")


def reshape(q: QArray, new_shape) -> QArray:
  q = physical(q)
  shape, new_shape = q.shape, tuple(int(n) for n in new_shape)
  ka = q.k_axes
  j0, j1 = _k_run(shape, ka, new_shape)
  i = ka[0]                                                  # stored index of the block
  pre, post = shape[:i], shape[ka[-1] + 1:]

  def leaf_shape(leaf_s):
    return _part(leaf_s[:i], pre, new_shape[:j0]) + (leaf_s[i],) + _part(leaf_s[i + 1:], post, new_shape[j1:])

  def leaf(arr):
    return arr.reshape(leaf_shape(arr.shape))

  q, codes, scale, zero, ins = _leaves(q, leaf, lambda s: reshape(s, leaf_shape(s.shape)))
  stored_nd = j0 + 1 + len(new_shape) - j1
  return _with(q, codes, scale, zero, axis=j0 - stored_nd, k_shape=new_shape[j0:j1], in_scale=ins)


def slice_axis(q: QArray, dim: int, start, size: int, *, dynamic: bool) -> QArray:
  """Entries [start, start + size) of logical axis `dim` (not in the contraction block); `start` may be traced
  if dynamic."""
  q = physical(q)
  dim %= q.ndim
  full = q.shape[dim]
  sd = _stored_dim(q, dim)

  def leaf(arr):
    if arr.shape[sd] == 1 and full != 1:
      return arr
    if arr.shape[sd] != full:
      raise ViewError("a scale axis is neither full nor broadcast")
    if dynamic:
      return lax.dynamic_slice_in_dim(arr, start, size, axis=sd)
    return lax.slice_in_dim(arr, start, start + size, axis=sd)

  q, codes, scale, zero, ins = _leaves(q, leaf, lambda s: slice_axis(s, sd, start, size, dynamic=dynamic))
  return _with(q, codes, scale, zero, in_scale=ins)


def take(q: QArray, dim: int, indices) -> QArray:
  """`jnp.take(w, indices, axis=dim)` on the packed leaves: rows of a lookup table, gathered experts. Only the
  gathered entries are ever decoded by a consumer. `dim` must not be in the contraction block."""
  q = physical(q)
  dim %= q.ndim
  sd = _stored_dim(q, dim)
  full = q.shape[dim]

  def leaf(arr):
    if arr.shape[sd] != full:
      arr = jnp.broadcast_to(arr, arr.shape[:sd] + (full,) + arr.shape[sd + 1:])
    return jnp.take(arr, indices, axis=sd, mode="clip")

  q, codes, scale, zero, ins = _leaves(q, leaf, lambda s: take(s, sd, indices))
  nd_new = codes.ndim
  k_stored = q.codes.ndim + q.axis
  new_k = k_stored + (jnp.ndim(indices) - 1 if k_stored > sd else 0)
  return _with(q, codes, scale, zero, axis=new_k - nd_new, in_scale=ins)


def leafwise(q: QArray, fn) -> QArray:
  """An identity-valued op (`copy`, `pvary`, ...) applied to every leaf."""
  return jax.tree.map(fn, q)


def move_to_front(q: QArray, dim: int) -> QArray:
  """Logical axis `dim` (not contracted) moved to the front, with every leaf full along it, so that `scan` /
  `vmap` over the leaves slice scales along with codes (per-tensor scales are stored broadcast)."""
  dim %= q.ndim
  if dim in q.k_axes:
    raise ViewError(f"axis {dim} is in the contraction block")
  perm = (dim,) + tuple(a for a in range(q.ndim) if a != dim)
  t = physical(transpose(q, perm) if dim else q)
  n = t.shape[0]
  return jax.tree.map(lambda a: a if a.shape[0] == n else jnp.broadcast_to(a, (n,) + a.shape[1:]), t)


def broadcast_leading(q: QArray) -> QArray:
  """`move_to_front(q, 0)`: what a scan over the leading axis needs."""
  return move_to_front(q, 0)


def as_matrix(q: QArray, contract_dims) -> tuple[QArray, tuple[int, ...], tuple[int, ...]]:
  """(K, N) view with contraction axis -2 for `kernels.qmatmul`; returns it, the free shape N unflattens to, and
  the order in which `contract_dims` (logical axes, in a dot's order) enumerate the flattened K (row-major)."""
  nd = q.ndim
  dims = tuple(int(d) % nd for d in contract_dims)
  if tuple(sorted(dims)) != q.k_axes:
    raise ViewError(f"the dot contracts axes {tuple(d - nd for d in dims)}, the QArray is quantized along "
                    f"{tuple(a - nd for a in q.k_axes)}")
  order = tuple(sorted(range(len(dims)), key=lambda i: dims[i]))
  ka = q.k_axes
  perm = ka + tuple(d for d in range(nd) if d not in ka)
  t = transpose(q, perm) if perm != tuple(range(nd)) else q
  free = tuple(t.shape[len(ka):])
  return reshape(t, (q.k, math.prod(free))), free, order
