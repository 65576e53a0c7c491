"""AWQ as a pytree transform: `lowbit_jax.awq(params, calib, ...)` maps `awq_core` over the calibrated weights.

    calib = lowbit_jax.calibrate(apply_fn, params, batches)
    qparams = lowbit_jax.awq(params, calib, bits=4, group_size=128)
    logits = lowbit_jax.quantized(apply_fn)(qparams, tokens)

Paper: Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration", MLSys 2024.
Reference implementation: mit-han-lab/llm-awq, `awq/quantize/auto_scale.py` (scale search over the linears that
share an input) and `awq/quantize/auto_clip.py` (clip search per linear).

For every group of weights fed by the same input X (T, K) (q/k/v after one norm; gate/up after another; any
single linear otherwise), and for every layer of a scanned stack separately:

    s* = argmin_{α ∈ {0, 1/n_grid, ..., (n_grid-1)/n_grid}}  Σ_{W in group} || X W − (X / s) Q(s ⊙ W) ||² / numel,
         s(α) = mean|x|^α / sqrt(max · min)                                             (K,)
    W_c  = clip search on s* ⊙ W with the statistics of X / s*  (per (group, output) block, optional)
    Q    = QArray of Q(W_c) with in_scale s*, standing for W_c / s*: ``x @ W ≈ (x / s*) @ Q(W_c)``

Weights are grouped by their input: two weights whose calibration statistics (Hessian and mean |x|, per layer)
are bitwise identical were fed by the same activation (`calibrate` computes both from the traced operand). The
layouts are those of `gptq`: (in, out) kernels, optionally stacked over leading axes (one s per layer), and 2-D
(out, in) weights.

Deliberate deviations from the reference (see also `awq_core`):
  * losses are scored per linear with the calibration Hessian (output MSE of each linear, summed over the group)
    instead of re-running the enclosing block (attention / MLP) for every candidate;
  * with `fold=True`, s is folded into the preceding per-channel parameter (a norm's scale: p' = p / s, see
    `passes/fold.py`) when the group is exactly the set of linears that parameter's output feeds; otherwise (and
    by default) it is kept on the QArray as `in_scale` (the kernels divide the activations by it). The float
    function is unchanged either way. The reference's v -> o and up -> down pairs (folding into a preceding
    linear) are not folded: o and down get their own searched scale on their own input, kept as `in_scale`;
  * every selected linear is clipped (the reference skips q and k, whose error is amplified by softmax; we have no
    model-specific names), and the output head is treated like any other selected linear.

Nothing is modified in place: every weight and statistic is validated before any search runs, and the result is a
new tree.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lowbit_jax import select as sel
from lowbit_jax.algorithms.common import calibrated_leaves, replace_leaves
from lowbit_jax.algorithms import awq_core
from lowbit_jax.passes.calibration import Calibration, WeightCalibration
from lowbit_jax.passes.fold import FoldTarget, fold_scales, fold_targets, group_target
from lowbit_jax.qarray import QArray, check_quantizable, with_in_scale
from lowbit_jax.spec import QuantSpec, int_spec


@dataclasses.dataclass(frozen=True)
class _Target:
  where: str
  path: tuple
  leaf: object
  layout: str                    # "kn": (*stack, K, N); "nk": 2-D (N, K)
  stack: tuple[int, ...]         # the stack shape (leading axes) of a "kn" leaf
  wc: WeightCalibration

  def kn(self) -> jax.Array:
    """The weight as float32 (layers, K, N)."""
    w = jnp.asarray(self.leaf, jnp.float32)
    w = w.T if self.layout == "nk" else w
    return w.reshape((-1,) + w.shape[-2:])


def _target(where: str, path: tuple, leaf, wc: WeightCalibration, spec: QuantSpec) -> _Target:
  """Validate one weight and its statistics; every failure is a ValueError naming `where`."""
  shape = tuple(np.shape(leaf))
  nd = len(shape)
  stack = shape[:-2]
  if wc.contract_axes == (nd - 2,) and tuple(wc.stacked_axes) == tuple(range(nd - 2)):
    layout = "kn"
  elif nd == 2 and wc.contract_axes == (1,) and not wc.stacked_axes:
    layout, stack = "nk", ()
  else:
    raise ValueError(f"{where}: AWQ supports (in, out) weights, optionally stacked over leading axes, and 2-D "
                     f"(out, in) ones; this leaf of shape {shape} is contracted over axes {wc.contract_axes} "
                     f"with stacked axes {wc.stacked_axes}")
  if wc.stats.xtx is None or wc.stats.abs_sum is None:
    raise ValueError(f"{where}: the calibration lacks the Hessian or mean |x| of this weight's input; expected "
                     f"statistics collected with Stat.HESSIAN and Stat.ABS_MEAN")
  k = shape[wc.contract_axes[0]]
  h_shape, m_shape = tuple(np.shape(wc.hessian)), tuple(np.shape(wc.abs_mean))
  if h_shape != stack + (k, k) or m_shape != stack + (k,):
    raise ValueError(f"{where}: the calibration does not match this weight (Hessian of shape {h_shape} and mean "
                     f"|x| of shape {m_shape} for a leaf of shape {shape}); expected {stack + (k, k)} and "
                     f"{stack + (k,)}, statistics from the same model")
  if not (bool(jnp.all(jnp.isfinite(wc.hessian))) and bool(jnp.all(jnp.isfinite(wc.abs_mean)))):
    raise ValueError(f"{where}: the calibration statistics contain NaN/inf; expected finite statistics")
  if int(np.max(np.asarray(wc.count))) == 0:
    raise ValueError(f"{where}: the calibration saw no rows for this weight; expected a non-empty calibration")
  kn_view = jax.ShapeDtypeStruct(shape[::-1] if layout == "nk" else shape, leaf.dtype)
  check_quantizable(kn_view, spec, where)
  if not bool(jnp.all(jnp.isfinite(jnp.asarray(leaf)))):
    raise ValueError(f"{where}: expected finite weights, found NaN/inf")
  return _Target(where=where, path=path, leaf=leaf, layout=layout, stack=stack, wc=wc)


def _input_key(t: _Target) -> tuple:
  """A cheap host key (the small mean |x| vector, bitwise); equal inputs have equal keys."""
  m = np.ascontiguousarray(np.asarray(t.wc.abs_mean, np.float32))
  return (t.stack, tuple(np.shape(t.wc.hessian)), hashlib.sha256(m.tobytes()).hexdigest())


def same_input_groups(targets: list[_Target]) -> list[list[_Target]]:
  """The targets partitioned by input, in first-use order (the order of `targets`): equal mean |x| and
  bitwise-equal Hessians (compared on device, so the K x K statistics never travel to the host)."""
  buckets: dict[tuple, list[list[_Target]]] = {}
  groups: list[list[_Target]] = []
  for t in targets:
    bucket = buckets.setdefault(_input_key(t), [])
    for g in bucket:
      if bool(jnp.array_equal(g[0].wc.hessian, t.wc.hessian)):
        g.append(t)
        break
    else:
      bucket.append([t])
      groups.append(bucket[-1])
  return groups


@functools.partial(jax.jit, static_argnames=("spec",))
def _with_in_scale(w, s, spec: QuantSpec) -> QArray:
  return with_in_scale(w, s, spec)     # the weights were validated by `_target`


def _transpose_2d(q: QArray) -> QArray:
  """A (K, N) QArray quantized along axis -2 as the (N, K) one quantized along axis -1 (same bytes)."""
  spec = dataclasses.replace(q.spec, granularity=dataclasses.replace(q.spec.granularity, axis=-1))
  T = lambda a: None if a is None else a.T
  return QArray(q.codes.T, q.scale.T, T(q.zero), spec=spec, k=q.k, dtype=q.dtype, in_scale=T(q.in_scale))


def _quantize_group(group: list[_Target], spec: QuantSpec, *, n_grid: int, clip: bool, max_shrink: float,
                    bar, folded: bool) -> tuple[dict[str, QArray], jax.Array]:
  """Search s per layer for the group, clip and quantize each member: ({where: QArray}, s (layers, K)); the
  QArrays carry in_scale s, or none when `folded` (then they stand for s ⊙ W_c and s goes into the norm)."""
  ws = [t.kn() for t in group]                                                  # each (layers, K, N_i)
  hs = jnp.reshape(group[0].wc.hessian, (-1,) + np.shape(group[0].wc.hessian)[-2:]).astype(jnp.float32)
  ms = jnp.reshape(group[0].wc.abs_mean, (-1, hs.shape[-1])).astype(jnp.float32)
  scales, kept = [], [[] for _ in group]
  for layer in range(hs.shape[0]):
    s, _, clipped = awq_core.awq_layer(tuple(w[layer] for w in ws), hs[layer], ms[layer], spec=spec,
                                       n_grid=n_grid, clip=clip, max_shrink=float(max_shrink))
    for i, w in enumerate(clipped):
      kept[i].append(w)
    scales.append(s)
    bar.update()
  s_all = jnp.stack(scales)                                                     # (layers, K)
  out = {}
  for t, w_list in zip(group, kept):
    w = jnp.stack(w_list)                                                       # (layers, K, N)
    if t.layout == "nk":
      q = _transpose_2d(_with_in_scale(w[0], s_all[0], spec))
    else:
      q = _with_in_scale(w.reshape(t.stack + w.shape[1:]), s_all.reshape(t.stack + s_all.shape[1:]), spec)
    out[t.where] = QArray(q.codes, q.scale, q.zero, spec=q.spec, k=q.k, dtype=np.dtype(t.leaf.dtype),
                          in_scale=None if folded else q.in_scale)
  return out, s_all


def _fold_target(group: list[_Target], targets: dict[str, FoldTarget]) -> FoldTarget | None:
  """The norm-like parameter the group's scale folds into, when the group is exactly its consumers and the
  per-layer scale has its shape."""
  t = group_target(targets, [m.where for m in group])
  if t is None or t.stack != group[0].stack:
    return None
  return t


def _check_options(n_grid, clip, max_shrink, fold) -> None:
  if not isinstance(fold, bool):
    raise ValueError(f"awq: fold must be a bool, got {fold!r}")
  if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
    raise ValueError(f"awq: n_grid must be a positive int, got {n_grid!r}")
  if not isinstance(clip, bool):
    raise ValueError(f"awq: clip must be a bool, got {clip!r}")
  if isinstance(max_shrink, bool) or not isinstance(max_shrink, (int, float)) or not 0.0 <= max_shrink < 1.0:
    raise ValueError(f"awq: max_shrink must be a float in [0, 1), got {max_shrink!r}")


def awq(params, calib: Calibration, *, bits: int = 4, group_size: int | None = 128, sym: bool = True,
        n_grid: int = 20, clip: bool = True, max_shrink: float = 0.5, scale_dtype=jnp.float32,
        where: sel.Where = None, fold: bool = True):
  """Quantize the calibrated weights of `params` with AWQ; returns a new tree with QArray leaves.

  Args:
    params: the parameters `calib` was collected on.
    calib: `lowbit_jax.calibrate(apply_fn, params, batches)` (with Stat.HESSIAN and Stat.ABS_MEAN).
    bits, group_size, sym: the integer grid (`lowbit_jax.int_spec`; group_size None = per channel). The
      reference's default is 4-bit, groups of 128, asymmetric (sym=False); sym=True keeps this package's default.
    n_grid: candidates α = i / n_grid, i < n_grid, for the scale search, and the clip search's shrink step.
    clip: run the clip search after the scale search.
    max_shrink: the clip search tries clamp ranges down to (1 - max_shrink) of each block's absmax.
    scale_dtype: dtype of the stored quantization scales (the in_scale is always float32).
    where: which calibrated weights to quantize (default: all of them).
    fold: fold s into the preceding per-channel parameter where the graph allows (norm -> linears; traced once
      from `calib.apply_fn` on the first calibration batch, see `passes/fold.py`).

  Returns:
    A tree like `params` with the selected weights replaced by QArrays whose `in_scale` is the searched s; with
    `fold`, the weights whose s was folded carry no in_scale and their norm's parameter is divided by s.

  Raises:
    ValueError: naming the key path, for a calibration from another model, missing or NaN statistics, an
      unsupported layout, NaN weights, or unsupported bits/group combinations.
  """
  _check_options(n_grid, clip, max_shrink, fold)
  spec = int_spec(bits, group_size=group_size, symmetric=sym, scale_dtype=scale_dtype)
  targets = [_target(w, path, leaf, calib[w], spec) for w, path, leaf in calibrated_leaves(params, calib, where, "awq")]

  groups = same_input_groups(targets)
  foldable = fold_targets(calib.apply_fn, params, calib.batches[0], where=calib.options["where"]) if fold else {}
  done: dict[str, QArray] = {}
  folded: dict[tuple, jax.Array] = {}
  bar = tqdm(total=sum(int(np.prod(g[0].stack, dtype=int)) for g in groups), desc="awq", leave=False)
  for group in groups:
    ft = _fold_target(group, foldable)
    q, s = _quantize_group(group, spec, n_grid=n_grid, clip=clip, max_shrink=max_shrink, bar=bar,
                           folded=ft is not None)
    done.update(q)
    if ft is not None:
      folded[ft.leaf_path] = s.reshape(ft.leaf_shape)
  bar.close()
  out = replace_leaves(params, done)
  return fold_scales(out, folded) if folded else out
