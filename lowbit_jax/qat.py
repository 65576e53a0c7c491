"""Quantization-aware training (QAT): the forward pass sees the weights as `quantize -> dequantize` would leave them,
the optimizer updates the float weights (Jacob et al. 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference"; the straight-through estimator of Bengio et al. 2013).

    qat_apply = lowbit_jax.qat(apply_fn, lowbit_jax.int_spec(4, group_size=32))
    loss = lambda p, batch: xent(qat_apply(p, batch.x), batch.y)          # any optax loop, under jit
    ...
    qparams = lowbit_jax.rtn(params, qat_apply.analysis(params, x), spec)  # the conversion: round-to-nearest
    logits = lowbit_jax.quantized(apply_fn)(qparams, x)                    # == qat_apply(params, x) (f32 rounding)

Objective: minimise ``L(apply_fn(Q(W), x))`` over the float weights W, where Q is round-to-nearest to `spec` along
each weight's own contraction axes (`WeightLayout`, from an abstract `analyze` of apply_fn, cached per params
structure and shapes), so the trained weights lose nothing when `rtn` converts them: `rtn` of the same spec and
selection produces exactly the codes and scales Q used, which is why there is no separate `convert`.

Gradient (straight-through estimator with clipping, as PACT / TF's `fake_quant_with_min_max` / PyTorch's
`FakeQuantize`): ``dL/dW = dL/dQ(W) * 1[lo <= W <= hi]``, where [lo, hi] is the closed interval of values the
weight's granule can represent (the dequantized smallest and largest codes at its scale, zero point or offset):
identity inside the clipping range, zero outside. The scales are treated as constants (no gradient through the
absmax; LSQ-style learned scales are not implemented). Elements beyond [lo, hi] occur only where a spec clips: the
signed-max grid's short end, `SymGrid.FULL`'s absmax, `ClipSearch`, double-quantized scales.

Weights-and-activations specs (`activations=ActQuant(...)`, W8A8 / FP8xFP8) also fake-quantize the activations
at every dot site of a selected weight, through the jaxpr passes (`passes/fakequant.py`), with the identity
gradient; LLM.int8()'s data-dependent outlier split (`outlier_threshold`) is not simulated and raises. Under data
parallelism a per-token activation scale is the same on any device split; a per-tensor one (`per_token=False`) is
the absmax of each device's shard, so replicas see slightly different activation grids than one device would.

Why params-side fake quantization is exact for weights: a weight-only quantized dot computes ``x @ deq(W)`` at
every site of W (`quantized` runs `qmatmul`, equal to the dot with the dequantized weight up to f32 rounding), and
views (transposes, scan slices, reshapes) commute with an elementwise replacement of the leaf, so substituting
``deq(quantize(W))`` for W before apply_fn gives every site the same operand the converted model uses.
"""
from __future__ import annotations

import enum
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax import formats
from lowbit_jax import select as sel
from lowbit_jax.checks import check_enum
from lowbit_jax.formats import FORMATS
from lowbit_jax.layout import WeightLayout
from lowbit_jax.passes import analyze, trace
from lowbit_jax.passes.fakequant import ActFakeQuantHandler
from lowbit_jax.qarray import QArray, quantize
from lowbit_jax.rtn import layouts as rtn_layouts
from lowbit_jax.spec import QuantSpec

class Ste(enum.Enum):
  """The weight gradient of the fake quantizer."""
  CLIPPED = "clipped"     # identity inside the clipping range [lo, hi], zero outside (PACT / FakeQuantize; default)
  IDENTITY = "identity"   # identity everywhere (Bengio et al. 2013; BitNet b1.58's `w + (q(w) - w).detach()`)


_PROBE = np.float32(2.0 ** 20)   # |probe| / |scale|: far beyond every format's largest code, so encode saturates


def check_trainable(spec) -> QuantSpec:
  """Raise ValueError unless QAT can simulate `spec` exactly."""
  if not isinstance(spec, QuantSpec):
    raise ValueError(f"qat: expected a lowbit_jax.QuantSpec, got {spec!r}")
  if spec.activations is not None and spec.activations.outlier_threshold is not None:
    raise ValueError(f"qat: cannot simulate LLM.int8()'s outlier decomposition (ActQuant.outlier_threshold="
                     f"{spec.activations.outlier_threshold}); expected a weight-only spec or plain W8A8 "
                     f"(outlier_threshold=None)")
  return spec


def _clip_range(q: QArray):
  """(lo, hi): the smallest and largest value each entry's granule can represent, float32, shape of
  `q.dequantize()` (a plain QArray: no perm, no in_scale)."""
  spec, axis = q.spec, q.axis
  scale = jnp.expand_dims(q.scale_values(), q.codes.ndim + axis + 1)               # (..., G, 1, ...)
  zero = None if q.zero is None else jnp.expand_dims(q.zero, q.codes.ndim + axis + 1)
  probe = _PROBE * jnp.where(scale != 0, jnp.abs(scale), np.float32(1.0))
  fmt = FORMATS[spec.format]
  ends = [formats.dequantize(fmt.encode(s * probe, scale, zero, spec), scale, zero, spec) for s in (1.0, -1.0)]
  lo, hi = jnp.minimum(*ends), jnp.maximum(*ends)
  i = q.codes.ndim + axis
  full = lo.shape[:i] + (q.n_groups, q.group_len) + lo.shape[i + 2:]
  out = []
  for e in (lo, hi):                                                               # -> (..., K_pad, ...) -> K
    e = jnp.broadcast_to(e, full).reshape(full[:i] + (q.k_pad,) + full[i + 2:])
    out.append(jax.lax.slice_in_dim(e, 0, q.k, axis=i))
  return out


def _to_stored(x, layout: WeightLayout):
  order = layout.stored_order
  xs = jnp.transpose(x, order) if order != tuple(range(len(order))) else x
  return jnp.reshape(xs, layout.merged_shape)


def _from_stored(xs, layout: WeightLayout):
  order = layout.stored_order
  xs = jnp.reshape(xs, tuple(layout.shape[a] for a in order))
  return jnp.transpose(xs, tuple(order.index(a) for a in range(len(order))))


def _fake(x, spec: QuantSpec, layout: WeightLayout, path: str | None = None):
  """(deq(quantize(x)), inside-the-clipping-range mask), both in x's layout; `path` labels errors. A NaN/inf
  entry of a traced `x` passes through as itself (the quantizers would map it to a finite code), so a corrupted
  weight shows up in the loss and `check_finite` / `skip_nonfinite` see it instead of training on silently."""
  xs = _to_stored(x, layout)
  q = quantize(xs, layout.spec_for(spec), path=path)
  lo, hi = _clip_range(q)
  xf = xs.astype(jnp.float32)
  inside = (xf >= lo) & (xf <= hi)
  deq = q.dequantize()
  deq = jnp.where(jnp.isfinite(xs), deq, xs.astype(deq.dtype))
  return _from_stored(deq, layout), _from_stored(inside, layout)


def fake_quant(x, spec: QuantSpec, layout: WeightLayout, ste: Ste = Ste.CLIPPED, *, path: str | None = None):
  """``deq(quantize(x, spec))`` along `layout`'s contraction block, with the straight-through gradient `ste`
  (module docstring). `spec`, `layout` and `ste` are static; `path` (the key path, `params['a']['kernel']`) labels
  errors: NaN/inf in a concrete `x` raises ValueError naming it (under `jit` nothing can be checked)."""
  check_enum(ste, Ste, "fake_quant: ste")
  return _fake_quant(x, spec, layout, ste, path)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _fake_quant(x, spec: QuantSpec, layout: WeightLayout, ste: Ste, path: str | None):
  return _fake(x, spec, layout, path)[0]


def _fake_fwd(x, spec, layout, ste, path):
  out, inside = _fake(x, spec, layout, path)
  return out, (inside if ste is Ste.CLIPPED else None)


def _fake_bwd(spec, layout, ste, path, inside, g):
  return (g if ste is Ste.IDENTITY else jnp.where(inside, g, jnp.zeros((), g.dtype)),)


_fake_quant.defvjp(_fake_fwd, _fake_bwd)


def _abstract(tree):
  """Shapes and dtypes of a tree's array leaves; other leaves (static) as they are, if hashable."""
  def one(x):
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      return (tuple(x.shape), np.dtype(x.dtype).str)
    try:
      hash(x)
      return x
    except TypeError:
      return id(x)
  leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: isinstance(x, QArray))
  return treedef, tuple(one(x) for x in leaves)


class QATFn:
  """`apply_fn` with the selected weights fake-quantized (see the module docstring). Callable like apply_fn.

  Attributes:
    apply_fn, spec, where, ste: as given to `qat`.
  """

  def __init__(self, apply_fn: Callable, spec: QuantSpec, where: sel.Where, ste: Ste = Ste.CLIPPED):
    self.apply_fn, self.spec, self.where, self.ste = apply_fn, spec, where, ste
    self._cache: dict = {}
    functools.update_wrapper(self, apply_fn)

  def analysis(self, params, *args, **kwargs):
    """The abstract `lowbit_jax.analyze` of apply_fn on these shapes (cached): pass it to `lowbit_jax.rtn` to
    convert trained weights with exactly the selection and layouts training simulated."""
    return self._entry(params, args, kwargs)[0]

  def layouts(self, params, *args, **kwargs) -> dict:
    """{key path: WeightLayout} of the fake-quantized weights."""
    return self._entry(params, args, kwargs)[1]

  def _entry(self, params, args, kwargs):
    key = (_abstract(params), _abstract((args, kwargs)))
    if key not in self._cache:
      box = {}
      abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
                                        if hasattr(x, "shape") and hasattr(x, "dtype") else x, t)

      def run(p, a, kw):        # inside eval_shape the leaves are tracers: nothing is computed
        an = analyze(self.apply_fn, p, *a, where=self.where, **kw)
        box["entry"] = (an, rtn_layouts(p, an, self.where, "qat"))
        return 0

      jax.eval_shape(run, abstract(params), *abstract((args, kwargs)))
      an, lays = box["entry"]
      for path, lay in lays.items():
        leaf = _leaf(params, path)
        if isinstance(leaf, QArray):
          raise ValueError(f"{sel.path_repr(path)}: already quantized; expected float weights to train")
        if lay is None:
          raise ValueError(f"{sel.path_repr(path)}: no traced layout; expected a weight the function contracts")
      self._cache[key] = (an, lays)
    return self._cache[key]

  def fake_quantize(self, params, *args, **kwargs):
    """The params tree the forward pass sees: every selected weight replaced by ``deq(quantize(W))``."""
    lays = self.layouts(params, *args, **kwargs)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fake_quant(x, self.spec, lays[p], self.ste, path=sel.path_repr(p)) if p in lays else x, params,
        is_leaf=lambda x: isinstance(x, QArray))

  def __call__(self, params, *args, **kwargs):
    fq = self.fake_quantize(params, *args, **kwargs)
    act = self.spec.activations
    if act is None:
      return self.apply_fn(fq, *args, **kwargs)
    lays = self.layouts(params, *args, **kwargs)
    handler = ActFakeQuantHandler(lays, self.spec.format, act)
    out, _ = trace.evaluate(self.apply_fn, fq, args, kwargs, handler, tagged=frozenset(lays))
    return out


def _leaf(tree, path):
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, QArray))[0]
  return dict(flat)[path]


def qat(apply_fn: Callable, spec: QuantSpec, *, where: sel.Where = None, ste: Ste = Ste.CLIPPED) -> QATFn:
  """Quantization-aware training of `apply_fn(params, *args, **kwargs)` (module docstring).

  Args:
    apply_fn: the unmodified model function.
    spec: the target `QuantSpec` (its granularity's axis is replaced by each weight's traced contraction block).
    where: which weights: None for every float weight the function contracts against an activation (the
      default of `analyze` / `rtn`), a key-path regex or a predicate `(path, leaf) -> bool`.
    ste: the weight gradient: `Ste.CLIPPED` (the module docstring) or `Ste.IDENTITY` (BitNet b1.58's plain STE,
      `lowbit_jax.bitnet`).

  Returns:
    A `QATFn`, callable like apply_fn; works under `jit`, `grad`, `vmap` and with any optax optimizer.

  Raises:
    ValueError: a spec QAT cannot simulate (LLM.int8() outlier thresholds), an empty selection, or (naming the
      key path) a selected leaf the function never contracts or that is already a QArray, and (at a call outside
      `jit`, naming the key path) a selected weight holding NaN/inf.
  """
  if not callable(apply_fn):
    raise ValueError(f"qat: expected a callable apply_fn(params, *args), got {apply_fn!r}")
  sel.as_predicate(where)
  check_enum(ste, Ste, "qat: ste")
  return QATFn(apply_fn, check_trainable(spec), where, ste)


__all__ = ["qat", "QATFn", "Ste", "fake_quant", "check_trainable"]
