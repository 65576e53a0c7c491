"""Round-to-nearest (RTN) quantization as a pytree transform: the baseline every other method is measured by.

    qparams = lowbit_jax.rtn(params, calib, spec)     # each weight along the axes the function contracts
    qparams = lowbit_jax.rtn(params, None, spec)      # no trace: the name rule and the spec's axis

Given a `Calibration` or an `Analysis` (`lowbit_jax.analyze(apply_fn, params, example)`, no statistics needed), the
default selection is by use (every float weight the traced function contracts against an activation) and every
weight is quantized along its own contraction axes, whatever its layout (DenseGeneral's (H, K, D), gemma's
(N, D, H), maxtext's (in, layers, out), experts). Without one (`calib=None`), the linear weights are found by
name (`select.is_linear_weight`) and quantized along the spec's axis. Every leaf is quantized independently
(round to nearest, clamp to the code range); all are validated before any is quantized; the input tree is never
modified.
"""
from __future__ import annotations

import functools

import jax
from tqdm.auto import tqdm

from lowbit_jax import select as sel
from lowbit_jax.checks import check_finite_outputs
from lowbit_jax.layout import WeightLayout
from lowbit_jax.qarray import QArray, check_quantizable, quantize
from lowbit_jax.spec import QuantSpec, int_spec

DEFAULT_SPEC = int_spec(4, group_size=128)


@functools.partial(jax.jit, static_argnames=("spec", "layout"))
def quantize_jit(x, spec, layout):
  """Round-to-nearest of one leaf: along the spec's axis (`layout` None) or along a `WeightLayout`'s block."""
  return quantize(x, spec) if layout is None else layout.quantize(x, spec)


def layouts(params, calib, where: sel.Where, op: str) -> dict:
  """{key path: WeightLayout | None} of the leaves a transform touches: by use from `calib` (a Calibration or an
  Analysis), else by `where` / the name rule (layout None: the spec's axis)."""
  if calib is None:
    return {p: None for p in sel.select(params, where)}
  uses = getattr(calib, "uses", None)
  if uses is None:
    raise ValueError(f"{op}: expected a lowbit_jax.Calibration, a lowbit_jax.passes.Analysis or None as calib, "
                     f"got {type(calib).__name__}")
  if where is None:
    chosen = getattr(calib, "selected", None)
    chosen = list(calib.weights) if chosen is None else list(chosen)
  else:
    chosen = list(sel.select(params, where))
  out = {}
  for p in chosen:
    use = uses.get(p)
    if use is None:
      raise ValueError(f"{sel.path_repr(p)}: selected but the traced function never uses it; expected a weight "
                       f"that {op} can lay out (narrow `where`, or trace the function that uses it)")
    wc = getattr(calib, "weights", {}).get(p)
    out[p] = wc.layout if wc is not None else use.layout()
  return out


def rtn(params, calib=None, spec: QuantSpec = DEFAULT_SPEC, *, where: sel.Where = None):
  """Quantize the selected leaves of `params` to `spec` by rounding to nearest.

  Args:
    params: any pytree of arrays (Flax linen params, an NNX `State`, a transformers Flax params dict).
    calib: a `Calibration` or `Analysis` of the function that uses `params` (selection by use, each weight along
      its own contraction axes), or None (the name rule, along `spec`'s axis).
    spec: the target format (`QuantSpec`); its granularity's axis is replaced by each weight's contraction
      block when `calib` is given.
    where: which leaves: None for the default (see above), a key-path regex matched against "a/b/kernel"
      paths, or a predicate `(path, leaf) -> bool`.

  Returns:
    A tree of the same structure with the selected leaves replaced by `QArray`s.

  Raises:
    ValueError: naming the key path, for an empty selection, non-float leaves, a missing contraction axis,
      a non-dividing group size under `strict`, NaN/inf weights, weights the function never uses, or a result
      whose scales overflow to NaN/inf (checked with one reduction per leaf).

  Example (no trace: the name rule picks the `kernel` leaves and leaves the norm's `scale` float)::

    >>> import jax, jax.numpy as jnp
    >>> import lowbit_jax as lb
    >>> k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    >>> params = {"l1": {"kernel": jax.random.normal(k1, (64, 64))}, "norm": {"scale": jnp.ones(64)},
    ...           "l2": {"kernel": jax.random.normal(k2, (64, 64))}}
    >>> qparams = lb.rtn(params, None, lb.int_spec(4, group_size=32))
    >>> is_q = lambda x: isinstance(x, lb.QArray)
    >>> jax.tree.map(is_q, qparams, is_leaf=is_q)
    {'l1': {'kernel': True}, 'l2': {'kernel': True}, 'norm': {'scale': False}}
    >>> w, q = params["l1"]["kernel"], qparams["l1"]["kernel"]
    >>> bool(jnp.max(jnp.abs(q.dequantize() - w)) < 0.1 * jnp.max(jnp.abs(w)))
    True

  With a trace (`lb.analyze`, no statistics), selection is by use: whatever the function contracts::

    >>> apply = lambda p, x: jnp.tanh(x @ p["l1"]["kernel"] * p["norm"]["scale"]) @ p["l2"]["kernel"]
    >>> qparams = lb.rtn(params, lb.analyze(apply, params, jnp.ones((8, 64))), lb.int_spec(8))
    >>> qparams["l2"]["kernel"].spec.bits, qparams["l2"]["kernel"].spec.granularity
    (8, PerChannel(axis=-2))
  """
  if not isinstance(spec, QuantSpec):
    raise ValueError(f"rtn: expected a QuantSpec, got {spec!r}")
  chosen = layouts(params, calib, where, "rtn")
  leaves = dict(jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))[0])
  for path, lay in chosen.items():
    leaf = leaves[path]
    if isinstance(leaf, QArray):
      raise ValueError(f"{sel.path_repr(path)}: already quantized; expected a float leaf")
    if lay is not None and tuple(leaf.shape) != lay.shape:
      raise ValueError(f"{sel.path_repr(path)}: shape {tuple(leaf.shape)} differs from the traced {lay.shape}; "
                       f"expected the params the calibration was made on")
    check_quantizable(leaf if lay is None else leaf.reshape(lay.merged_shape),
                      spec if lay is None else lay.spec_for(spec), sel.path_repr(path))
  bar = tqdm(total=len(chosen), desc="rtn", leave=False, disable=len(chosen) < 16)

  def one(path, leaf):
    if path not in chosen:
      return leaf
    bar.update()
    return quantize_jit(leaf, spec, chosen[path])

  out = jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, QArray))
  bar.close()
  flat = dict(jax.tree_util.tree_flatten_with_path(out, is_leaf=lambda x: isinstance(x, QArray))[0])
  check_finite_outputs(((sel.path_repr(p), flat[p]) for p in chosen), "rtn")
  return out


__all__ = ["rtn", "layouts", "quantize_jit", "DEFAULT_SPEC", "WeightLayout"]
