"""The view rules: one table of the value-preserving primitives, each seen the three ways the passes need.

A *view* moves, drops or relabels entries of a weight but never combines them. For each view primitive,
`RULES[name]` says at once

  * `origin(o, v)`: the `Origin` (leaf coordinates, see `passes/origin.py`) of the output, or None when it cannot
    be followed (the weight's origin ends there);
  * `qarray(q, v)`: the same view applied to a QArray's packed leaves (`lowbit_jax.qviews`), or `ViewError`;
  * `channel(axis, v)`: the output axis that enumerates the same channel as input axis `axis` (scale folding,
    `passes/fold.py`), or None.

`v` is a `View`: the primitive's params, shapes and dtypes, and its extra operands (dynamic_slice starts). The
origin analysis (`values.py`), the QArray rewrite (`values.py`) and folding (`fold.py`) all read this table, so a
primitive is a view in one of them exactly when this table says so.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from lowbit_jax import qviews
from lowbit_jax.passes.origin import Origin, drop_unit_axes, follow_reshape
from lowbit_jax.qarray import QArray

# Ops that never change a value (applied leaf-wise to QArrays, passed through for float views).
IDENTITY = frozenset({"copy", "copy_p", "pvary", "sharding_constraint", "mesh_cast", "reshard",
                      "optimization_barrier_identity"})


@dataclasses.dataclass(frozen=True)
class View:
  """What a rule sees of one equation whose first operand is the viewed value."""
  name: str
  params: dict
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  in_dtype: Any
  out_dtype: Any
  rest: tuple = ()          # the other operands (dynamic_slice start indices)
  bind: Callable | None = None   # binds the primitive on another operand (identity ops on packed leaves)

  @staticmethod
  def of(eqn, rest=(), bind=None) -> "View":
    i, o = eqn.invars[0].aval, eqn.outvars[0].aval
    return View(eqn.primitive.name, dict(eqn.params), tuple(i.shape), tuple(o.shape), i.dtype, o.dtype,
                tuple(rest), bind)


@dataclasses.dataclass(frozen=True)
class ViewRule:
  origin: Callable[[Origin, View], Origin | None]
  qarray: Callable[[QArray, View], QArray]
  channel: Callable[[int, View], int | None]


def _float(dtype) -> bool:
  return dtype is not None and np.issubdtype(np.dtype(dtype), np.floating)


# --- identity ops -------------------------------------------------------------------------------------------
def _identity_origin(o, v):
  return o._with(o.axes, v.name) if v.in_shape == v.out_shape else None


def _identity_q(q, v):
  if v.name in ("copy", "copy_p", "pvary") and v.bind is not None:
    return qviews.leafwise(q, v.bind)
  return q   # sharding annotations of the logical weight do not apply to packed leaves; dropped


def _identity_channel(axis, v):
  return axis if v.in_shape == v.out_shape else None


# --- convert_element_type -----------------------------------------------------------------------------------
def _convert_origin(o, v):
  return o._with(o.axes, v.name) if _float(v.out_dtype) else None


def _convert_q(q, v):
  if not _float(v.out_dtype):
    raise qviews.ViewError(f"converted to non-float {np.dtype(v.out_dtype)}")
  return qviews.with_dtype(q, v.out_dtype)


# --- transpose ----------------------------------------------------------------------------------------------
def _transpose_origin(o, v):
  return o._with([o.axes[p] for p in v.params["permutation"]], v.name)


# --- squeeze / reshape --------------------------------------------------------------------------------------
def _squeeze_dims(v) -> set[int]:
  return {d % len(v.in_shape) for d in v.params["dimensions"]}


def _squeeze_channel(axis, v):
  dims = _squeeze_dims(v)
  return None if axis in dims else axis - sum(d < axis for d in dims)


def _reshape_origin(o, v):
  return None if v.params.get("dimensions") is not None else follow_reshape(o, v.in_shape, v.out_shape)


def _reshape_q(q, v):
  if v.params.get("dimensions") is not None:
    raise qviews.ViewError("reshape with a dimension order")
  return qviews.reshape(q, v.out_shape)


def _reshape_channel(axis, v):
  if v.params.get("dimensions") is not None:
    return None
  before = math.prod(v.in_shape[:axis])
  for j, n in enumerate(v.out_shape):
    if n == v.in_shape[axis] and math.prod(v.out_shape[:j]) == before:
      return j
  return None


# --- broadcast_in_dim (only size-1 axes inserted) -------------------------------------------------------------
def _bcast_unit(v) -> bool:
  bdims = tuple(v.params["broadcast_dimensions"])
  return (all(v.out_shape[j] == v.in_shape[i] for i, j in enumerate(bdims))
          and all(v.out_shape[j] == 1 for j in range(len(v.out_shape)) if j not in bdims))


def _bcast_origin(o, v):
  if not _bcast_unit(v):
    return None
  axes = [()] * len(v.out_shape)
  for i, j in enumerate(v.params["broadcast_dimensions"]):
    axes[j] = o.axes[i]
  return o._with(axes, v.name)


def _bcast_q(q, v):
  bdims = tuple(v.params["broadcast_dimensions"])
  if list(bdims) != sorted(bdims) or math.prod(v.out_shape) != math.prod(q.shape):
    raise qviews.ViewError("broadcast that copies entries")
  return qviews.reshape(q, v.out_shape)


def _bcast_channel(axis, v):
  j = tuple(v.params["broadcast_dimensions"])[axis]
  return j if v.out_shape[j] == v.in_shape[axis] else None


# --- slice / dynamic_slice ------------------------------------------------------------------------------------
def _strided(v) -> bool:
  return v.name == "slice" and v.params.get("strides") is not None and any(s != 1 for s in v.params["strides"])


def _slice_origin(o, v):
  if _strided(v):
    return None
  cut, indexed = set(o.cut), list(o.indexed)
  for i, (a, b) in enumerate(zip(v.in_shape, v.out_shape)):
    if a != b:
      entry = o.axes[i]
      if entry is None or len(entry) != 1:
        return None
      cut.add(entry[0])
      if v.name == "slice" and b == 1:
        indexed.append((entry[0], int(v.params["start_indices"][i])))
  return o._with(o.axes, v.name, cut=frozenset(cut), indexed=tuple(indexed))


def _slice_q(q, v):
  if _strided(v):
    raise qviews.ViewError("strided slice")
  for d, (a, b) in enumerate(zip(q.shape, v.out_shape)):
    if a != b:
      start = v.params["start_indices"][d] if v.name == "slice" else v.rest[d]
      q = qviews.slice_axis(q, d, start, b, dynamic=v.name == "dynamic_slice")
  return q


_IDENTITY_RULE = ViewRule(_identity_origin, _identity_q, _identity_channel)
RULES: dict[str, ViewRule] = {
    **{name: _IDENTITY_RULE for name in IDENTITY},
    "convert_element_type": ViewRule(_convert_origin, _convert_q, lambda a, v: a if _float(v.out_dtype) else None),
    "transpose": ViewRule(_transpose_origin, lambda q, v: qviews.transpose(q, v.params["permutation"]),
                          lambda a, v: tuple(v.params["permutation"]).index(a)),
    "squeeze": ViewRule(lambda o, v: drop_unit_axes(o, _squeeze_dims(v), v.name),
                        lambda q, v: qviews.reshape(q, v.out_shape), _squeeze_channel),
    "reshape": ViewRule(_reshape_origin, _reshape_q, _reshape_channel),
    "broadcast_in_dim": ViewRule(_bcast_origin, _bcast_q, _bcast_channel),
    "slice": ViewRule(_slice_origin, _slice_q, lambda a, v: None),
    "dynamic_slice": ViewRule(_slice_origin, _slice_q, lambda a, v: None),
}

# Views that keep every entry (no slicing): what may follow a lookup's gathered rows.
WHOLE = IDENTITY | {"convert_element_type"}


def origin(o: Origin, v: View) -> Origin | None:
  r = RULES.get(v.name)
  return None if r is None else r.origin(o, v)


def qarray(q: QArray, v: View) -> QArray:
  r = RULES.get(v.name)
  if r is None:
    raise qviews.ViewError("not a view of the weight")
  return r.qarray(q, v)


def channel(axis: int, v: View) -> int | None:
  r = RULES.get(v.name)
  return None if r is None else r.channel(axis, v)
