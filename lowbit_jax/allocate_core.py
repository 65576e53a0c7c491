"""Pure pieces of `lowbit_jax.allocate`: the round-to-nearest output error of one weight under several specs
(jitted, one compile per layout and candidate tuple), the stored bytes of a spec (abstract), and the
multiple-choice knapsack that picks one candidate per unit under a byte budget.

Error of a weight W (*B, K, N) with input second moment H (*B, K, K) (the calibration's Hessian proxy
2 XᵀX / T) under spec s, for every problem l of its layout (scanned layer, expert):

    err_l(s)  = tr(ΔW_lᵀ H_l ΔW_l),   ΔW = dequantize(quantize(W, s)) - W   (along the leaf's contraction block,
                                                                            exactly as `lowbit_jax.rtn` stores it)
    norm_l    = tr(W_lᵀ H_l W_l)                                           (the output's energy)

Knapsack: units u with candidates c, bytes b[u, c] (ints) and errors e[u, c] (floats); minimise Σ e[u, x_u]
subject to Σ b[u, x_u] <= limit. `solve` runs the greedy on each unit's lower convex hull of (bytes, error) in
order of error saved per byte (the Lagrangian relaxation's solution up to the break item), then a fix-up pass that
spends the leftover bytes on the single-unit upgrades that save most; then an exact dynamic programme over the
Pareto front of (bytes, error) partial sums, used when the front stays under `max_states` (the result says
whether it is proven optimal).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowbit_jax.layout import WeightLayout
from lowbit_jax.spec import QuantSpec

MAX_STATES = 1 << 18


@functools.partial(jax.jit, static_argnames=("layout",))
def output_errors(leaf, quantized, hessian, *, layout: WeightLayout):
  """(errors (C, L), norms (L,)) of one leaf: tr(ΔWᵀ H ΔW) for each of the C float arrays in `quantized` (the
  leaf's values as some quantizer stores them, in the leaf's layout), and tr(Wᵀ H W), for each of its
  L = prod(B) problems (one `lax.map` over them). `hessian` (*B, K, K), or None for the identity (a weight without
  statistics: plain squared error)."""
  k, n = layout.k, layout.n
  w = layout.to_kn(jnp.asarray(leaf, jnp.float32)).reshape((-1, k, n))                  # (L, K, N)
  h = None if hessian is None else jnp.reshape(jnp.asarray(hessian, jnp.float32), (-1, k, k))

  def quad(d):                                                   # (L, K, N) -> (L,)
    if h is None:
      return jnp.sum(d * d, axis=(1, 2))
    return lax.map(lambda dh: jnp.sum(dh[0] * jnp.matmul(dh[1], dh[0], precision=lax.Precision.HIGHEST)), (d, h))

  errs = [quad(layout.to_kn(jnp.asarray(q, jnp.float32)).reshape((-1, k, n)) - w) for q in quantized]
  return jnp.stack(errs), quad(w)


@functools.partial(jax.jit, static_argnames=("specs", "layout"))
def rtn_errors(leaf, hessian, *, specs: tuple[QuantSpec, ...], layout: WeightLayout):
  """`output_errors` of round-to-nearest with each of `specs` along `layout`'s contraction block."""
  return output_errors(leaf, [layout.quantize(leaf, spec).dequantize() for spec in specs], hessian, layout=layout)


def stored_nbytes(shape, dtype, spec: QuantSpec, layout: WeightLayout) -> int:
  """`QArray.nbytes` of `layout.quantize(leaf, spec)` (codes with padding, scales, zeros), abstractly."""
  q = jax.eval_shape(lambda x: layout.quantize(x, spec), jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype)))
  return int(q.nbytes)


def lower_hull(b: np.ndarray, e: np.ndarray) -> list[int]:
  """Indices of the lower convex hull of the points (b, e), by increasing bytes and strictly decreasing error
  (dominated points and points above a chord between their neighbours dropped)."""
  pts, best = [], np.inf
  for i in np.lexsort((e, b)):                                   # by bytes, then error
    if e[i] < best:
      pts.append(int(i))
      best = e[i]
  hull: list[int] = []
  for i in pts:
    while len(hull) >= 2:
      a, c = hull[-2], hull[-1]                                  # drop c unless it lies strictly below a -> i
      if (e[c] - e[a]) * (b[i] - b[a]) < (e[i] - e[a]) * (b[c] - b[a]):
        break
      hull.pop()
    hull.append(i)
  return hull


def greedy(b: np.ndarray, e: np.ndarray, limit: int) -> np.ndarray:
  """Greedy on the lower convex hulls (steepest error drop per byte first), then fix-up with the leftover bytes;
  b, e: (U, C). Assumes the cheapest choice of every unit fits."""
  hulls = [lower_hull(b[u], e[u]) for u in range(b.shape[0])]
  pos = np.zeros(len(hulls), int)
  x = np.asarray([h[0] for h in hulls])
  used = int(b[np.arange(len(x)), x].sum())
  segs = sorted((float((e[u, h[j]] - e[u, h[j - 1]]) / (b[u, h[j]] - b[u, h[j - 1]])), u, j)
                for u, h in enumerate(hulls) for j in range(1, len(h)))
  blocked = np.zeros(len(hulls), bool)
  for _, u, j in segs:
    if blocked[u] or j != pos[u] + 1:
      continue
    step = int(b[u, hulls[u][j]] - b[u, hulls[u][j - 1]])
    if used + step > limit:
      blocked[u] = True                                          # its later segments are flatter: skip them
      continue
    used += step
    pos[u], x[u] = j, hulls[u][j]
  while True:                                                    # fix-up: best single-unit upgrade that fits
    rows = np.arange(len(x))
    extra = b - b[rows, x][:, None]
    gain = np.where((extra <= limit - used) & (e < e[rows, x][:, None]), e[rows, x][:, None] - e, 0.0)
    if not np.any(gain > 0):
      return x
    u, c = np.unravel_index(int(np.argmax(gain)), gain.shape)
    used += int(extra[u, c])
    x[u] = c


def pareto(b: np.ndarray, e: np.ndarray, limit: int, max_states: int = MAX_STATES) -> np.ndarray | None:
  """The exact optimum by dynamic programming over the Pareto front of (bytes, error) partial sums (states that
  cannot fit with the cheapest choice of every later unit pruned); None when a front exceeds `max_states`."""
  rest = np.concatenate([np.cumsum(b.min(axis=1)[::-1])[::-1], [0]])
  sb, se = np.zeros(1, np.int64), np.zeros(1)
  back = []
  for u in range(b.shape[0]):
    nb = (sb[:, None] + b[u][None, :]).ravel()
    ne = (se[:, None] + e[u][None, :]).ravel()
    idx = np.flatnonzero(nb <= limit - rest[u + 1])
    idx = idx[np.lexsort((ne[idx], nb[idx]))]
    prev_min = np.concatenate([[np.inf], np.minimum.accumulate(ne[idx])[:-1]])
    idx = idx[ne[idx] < prev_min]                                # strictly better than every cheaper state
    if idx.size > max_states:
      return None
    back.append(idx)
    sb, se = nb[idx], ne[idx]
  x = np.zeros(b.shape[0], int)
  s = int(np.argmin(se))
  for u in range(b.shape[0] - 1, -1, -1):
    s, x[u] = divmod(int(back[u][s]), b.shape[1])
  return x


def solve(b, e, limit: int, *, max_states: int = MAX_STATES) -> tuple[np.ndarray, bool]:
  """(choice per unit, proven optimal) minimising Σ e subject to Σ b <= limit; b ints, e floats, both (U, C)."""
  b, e = np.asarray(b, np.int64), np.asarray(e, np.float64)
  x = greedy(b, e, limit)
  exact = pareto(b, e, limit, max_states)
  if exact is None:
    return x, False
  rows = np.arange(b.shape[0])
  return (exact if e[rows, exact].sum() <= e[rows, x].sum() else x), True


def mean_kl(ref_logits, logits):
  """Mean over positions of KL(softmax(ref) ‖ softmax(logits)) along the last axis, accurate for tiny
  divergences: with d = logits - ref and p = softmax(ref), KL = log E_p[exp(d - E_p d)] (no cancellation of two
  log-softmaxes, so a 1e-9 divergence is not float32 rounding noise)."""
  ref = jnp.asarray(ref_logits, jnp.float32)
  d = jnp.asarray(logits, jnp.float32) - ref
  p = jax.nn.softmax(ref, axis=-1)
  c = d - jnp.sum(p * d, axis=-1, keepdims=True)
  return jnp.mean(jnp.log1p(jnp.sum(p * jnp.expm1(jnp.minimum(c, 60.0)), axis=-1)))
