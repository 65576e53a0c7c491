"""Packed execution of the matmuls that consume a QArray: `dot_general` (any contraction block, batch / expert
axes, either operand side) and `ragged_dot` (grouped experts), all through `kernels.qmatmul`.

Every function here takes the QArray in its logical layout and raises `qviews.ViewError` when the dot does not
contract exactly its contraction block (the caller then dequantizes and records why). Results equal the float
dot of the dequantized weight up to float rounding (f32 accumulation, cast to the activations' dtype).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from lowbit_jax import kernels, qviews
from lowbit_jax.qarray import QArray
from lowbit_jax.sparse import Sparse24, sparse24_matmul


def _full_leading(q: QArray, n: int) -> QArray:
  """Every leaf full along the first `n` axes (per-tensor scales are stored broadcast), so vmap/scan slice all."""
  shape = q.shape[:n]
  return jax.tree.map(lambda a: jnp.broadcast_to(a, shape + a.shape[n:]), q)


def dot_general(x, q: QArray, *, x_contract, w_contract, x_batch, w_batch, w_is_lhs: bool,
                backend: kernels.Backend):
  """`lax.dot_general` of activations `x` with the weight `q` (its dimension numbers split by operand).

  Output layout as `dot_general`: batch axes, then the lhs free axes, then the rhs free axes."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise qviews.ViewError(f"activations of dtype {x.dtype}")
  if isinstance(q, Sparse24):
    return _sparse_dot(x, q, x_contract=x_contract, w_contract=w_contract, w_batch=w_batch, w_is_lhs=w_is_lhs)
  nd = q.ndim
  wc = tuple(d % nd for d in w_contract)
  wb = tuple(d % nd for d in w_batch)
  order = sorted(range(len(wc)), key=lambda i: wc[i])
  xc = tuple(x_contract[i] for i in order)                      # x's contracted axes in the weight's K order
  if tuple(wc[i] for i in order) != q.k_axes:
    raise qviews.ViewError(f"the dot contracts weight axes {tuple(d - nd for d in wc)}, the QArray is quantized "
                           f"along {tuple(a - nd for a in q.k_axes)}")
  wfree = tuple(d for d in range(nd) if d not in wc and d not in wb)
  xfree = tuple(d for d in range(x.ndim) if d not in x_contract and d not in x_batch)
  bshape = tuple(q.shape[d] for d in wb)
  nshape = tuple(q.shape[d] for d in wfree)
  mshape = tuple(x.shape[d] for d in xfree)
  perm = wb + q.k_axes + wfree
  t = qviews.transpose(q, perm) if perm != tuple(range(nd)) else q
  t = qviews.reshape(t, bshape + (q.k, math.prod(nshape)))                    # (*B, K, N)
  t = _full_leading(t, len(bshape))
  xm = jnp.transpose(x, tuple(x_batch) + xfree + xc)
  xm = xm.reshape(bshape + (math.prod(mshape), q.k))                          # (*B, M, K)
  f = lambda xx, ww: kernels.qmatmul(xx, ww, backend=backend)
  for _ in bshape:
    f = jax.vmap(f)
  out = f(xm, t).reshape(bshape + mshape + nshape)                            # (*B, *M, *N)
  if w_is_lhs:
    nb, nm, nn = len(bshape), len(mshape), len(nshape)
    out = jnp.transpose(out, tuple(range(nb)) + tuple(range(nb + nm, nb + nm + nn)) + tuple(range(nb, nb + nm)))
  return out


def _sparse_dot(x, q: Sparse24, *, x_contract, w_contract, w_batch, w_is_lhs: bool):
  """A 2-D Sparse24 (K, N) contracted over K with one axis of x, no batch axes: `sparse.sparse24_matmul`."""
  if q.ndim != 2 or w_batch or tuple(d % 2 for d in w_contract) != (0,) or w_is_lhs:
    raise qviews.ViewError("a 2:4 sparse weight runs packed only as the right operand of x @ W (K, N) over K")
  xc = x_contract[0] % x.ndim
  xm = jnp.moveaxis(x, xc, -1)
  return sparse24_matmul(xm, q)


def group_ids(group_sizes, m: int):
  """The group of each of `m` rows sorted by group (`ragged_dot`'s convention); rows past the total get G."""
  ends = jnp.cumsum(group_sizes)
  return jnp.searchsorted(ends, jnp.arange(m), side="right")


def ragged_dot(x, q: QArray, group_sizes, *, x_contract: int, w_contract: int, w_group: int,
               backend: kernels.Backend, out_dtype):
  """`lax.ragged_dot(x (M, K), w (G, K, N), group_sizes)` with a packed `w`: rows of group g use expert g.

  The reference runs every expert's packed matmul over all rows and keeps each row's own (G x the dense cost,
  never a float copy of a weight); a grouped Pallas kernel is the fast path to add."""
  if isinstance(q, Sparse24) or x.ndim != 2 or q.ndim != 3 or x_contract != 1:
    raise qviews.ViewError("ragged_dot other than (M, K) x (G, K, N)")
  w_contract, w_group = w_contract % 3, w_group % 3
  if q.k_axes != (w_contract,):
    raise qviews.ViewError(f"ragged_dot contracts weight axis {w_contract}, the QArray is quantized along "
                           f"{q.k_axes}")
  t = qviews.move_to_front(q, w_group)                                        # (G, K, N)
  gid = group_ids(group_sizes, x.shape[0])                                    # (M,)
  n_groups = t.shape[0]

  def body(acc, item):
    wg, g = item
    y = kernels.qmatmul(x, wg, backend=backend).astype(jnp.float32)           # (M, N)
    return acc + jnp.where((gid == g)[:, None], y, 0.0), None

  acc0 = jnp.zeros((x.shape[0], t.shape[2]), jnp.float32)
  out, _ = lax.scan(body, acc0, (t, jnp.arange(n_groups)))
  return out.astype(out_dtype)
