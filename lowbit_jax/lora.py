"""QLoRA: low-rank adapters trained on a frozen packed base (Dettmers et al. 2023, "QLoRA: Efficient Finetuning
of Quantized LLMs"; LoRA: Hu et al. 2021).

    an = lowbit_jax.analyze(apply_fn, params, example)
    base = lowbit_jax.rtn(params, an, lowbit_jax.nf4_spec())              # packed NF4 + double quantization
    qlora = lowbit_jax.lora(apply_fn, lowbit_jax.LoraOptions(rank=8, alpha=16.0, dropout=0.05))
    adapters = qlora.init(jax.random.key(0), base, an)                    # a tree shaped like params
    loss = lambda ad, x, key: xent(qlora(base, ad, x, rng=key), ...)      # grad w.r.t. the adapters only
    merged = lowbit_jax.merge(base, adapters)                             # float weights, to requantize

Objective: minimise ``L(f(x; W_q + (alpha / r) A B))`` over the adapters (A, B) of the selected weights, with the
packed base W_q frozen. The forward is `quantized(apply_fn)` on the base with ``(alpha / r) * (x @ A) @ B`` added
at every dot site of an adapted weight (`passes/lora.py`): the base weight is never decoded to float (the packed
matmul decodes one K tile at a time, forward and backward), and its codes and scales get no gradient (the base
enters through `stop_gradient`). Each weight's adapter lives in its (*M, K, N) layout (`WeightLayout`: K its
traced contraction axes flattened, M its scanned-layer / expert axes): ``A (*M, K, r)``, ``B (*M, r, N)``.

Initialisation (the paper; PEFT's default): A ~ U(-1/sqrt(K), 1/sqrt(K)) (kaiming-uniform with a = sqrt(5)),
B = 0, so training starts exactly at the quantized model. Dropout (rate `LoraOptions.dropout`) is applied to the
adapter's input only, with an explicit PRNG key (`rng=`), one independent key per adapted weight and map entry.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import GetAttrKey, register_pytree_with_keys_class

from lowbit_jax import kernels
from lowbit_jax import select as sel
from lowbit_jax.layout import WeightLayout
from lowbit_jax.passes import trace
from lowbit_jax.passes.lora import LoraHandler, LoraMeta, LoraValue
from lowbit_jax.qarray import QArray, dequantize


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraOptions:
  """Attributes:
    rank: r, the adapters' inner dimension (<= min(K, N) of every adapted weight).
    alpha: the update is scaled by alpha / r (the paper's 16 with r = 8..64 for QLoRA's runs).
    dropout: dropout rate on the adapter's input in training (QLoRA: 0.05 to 0.1); 0 disables it.
  """
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LoraOptions.rank must be an int >= 1, got {self.rank!r}")
    for name in ("alpha", "dropout"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        raise ValueError(f"LoraOptions.{name} must be a finite float, got {v!r}")
      object.__setattr__(self, name, float(v))
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraOptions.dropout must lie in [0, 1), got {self.dropout!r}")


@register_pytree_with_keys_class
class Adapter:
  """The adapter of one weight leaf: `a` (*M, K, r), `b` (*M, r, N) in `layout`'s (*B, K, N) order; `scale` is
  alpha / r. A pytree (children a, b), so optax states and `memory_report` see two float arrays."""

  def __init__(self, a, b, *, layout: WeightLayout, scale: float):
    self.a, self.b, self.layout, self.scale = a, b, layout, scale

  def tree_flatten_with_keys(self):
    return ((GetAttrKey("a"), self.a), (GetAttrKey("b"), self.b)), (self.layout, self.scale)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, layout=aux[0], scale=aux[1])

  def delta(self):
    """(alpha / r) * A @ B in the leaf's layout, float32 (a float copy of the weight: `merge` only)."""
    return self.layout.kn_to_leaf(jnp.float32(self.scale) * jnp.matmul(self.a.astype(jnp.float32),
                                                                       self.b.astype(jnp.float32)))

  def __repr__(self):
    return f"Adapter(a={getattr(self.a, 'shape', self.a)}, b={getattr(self.b, 'shape', self.b)}, scale={self.scale})"


def _is_node(x) -> bool:
  return isinstance(x, (QArray, Adapter))


def _flat(tree) -> dict:
  return dict(jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_node)[0])


class LoraFn:
  """`apply_fn` on a packed base plus adapters: ``qlora(base, adapters, *args, rng=None, train=True, **kwargs)``.

  `rng`: a PRNG key, required when `options.dropout > 0` and `train`; `train=False` disables dropout.
  """

  def __init__(self, apply_fn: Callable, options: LoraOptions, backend: kernels.Backend):
    self.apply_fn, self.options, self.backend = apply_fn, options, backend
    functools.update_wrapper(self, apply_fn)

  def init(self, key, base, analysis, *, where: sel.Where = None):
    """Adapters for the selected weights of `base`: a tree of `base`'s structure whose adapted leaves are
    `Adapter`s and every other leaf None (an empty subtree for optax).

    Args:
      key: PRNG key for A.
      base: the params tree with the weights to adapt as QArrays (e.g. `rtn(params, analysis, nf4_spec())`).
      analysis: the `Analysis` (or `Calibration`) of apply_fn on the float params: the weights' layouts.
      where: None for every weight the analysis selects that `base` holds as a QArray; a key-path regex or a
        predicate `(path, leaf) -> bool` to narrow it.

    Raises:
      ValueError (naming the key path): a selected weight that is not a QArray in `base`, whose shape differs
        from the traced one, or whose K or N is smaller than the rank; an empty selection.
    """
    uses = getattr(analysis, "uses", None)
    if uses is None:
      raise ValueError(f"lora.init: expected a lowbit_jax Analysis or Calibration, got {type(analysis).__name__}")
    chosen = getattr(analysis, "selected", None)
    chosen = list(analysis.weights) if chosen is None else list(chosen)
    leaves = _flat(base)
    pred = None if where is None else sel.as_predicate(where)
    chosen = [p for p in chosen if p in leaves and (pred is None or pred(sel.path_str(p), leaves[p]))]
    if where is None:
      chosen = [p for p in chosen if isinstance(leaves[p], QArray)]
    if not chosen:
      raise ValueError(f"lora.init: empty selection (where={where!r}); expected at least one QArray weight of "
                       f"base that the analysed function contracts")
    r = self.options.rank
    out = {}
    for i, p in enumerate(chosen):
      q, lay = leaves[p], uses[p].layout()
      if not isinstance(q, QArray):
        raise ValueError(f"{sel.path_repr(p)}: expected a QArray (the frozen base) to adapt, got "
                         f"{type(q).__name__}; quantize it first (rtn / nf4_spec) or leave it out with `where`")
      if tuple(q.shape) != lay.shape:
        raise ValueError(f"{sel.path_repr(p)}: shape {tuple(q.shape)} differs from the traced {lay.shape}; "
                         f"expected the analysis of the params the base was made from")
      if r > min(lay.k, lay.n):
        raise ValueError(f"{sel.path_repr(p)}: LoRA rank {r} exceeds the weight's dims (K={lay.k}, N={lay.n}); "
                         f"expected rank <= {min(lay.k, lay.n)} (lower the rank or leave it out with `where`)")
      bound = 1.0 / math.sqrt(lay.k)
      a = jax.random.uniform(jax.random.fold_in(key, i), lay.b_shape + (lay.k, r), jnp.float32, -bound, bound)
      out[p] = Adapter(a, jnp.zeros(lay.b_shape + (r, lay.n), jnp.float32), layout=lay,
                       scale=self.options.alpha / r)
    return jax.tree_util.tree_map_with_path(lambda p, x: out.get(p), base, is_leaf=_is_node)

  def __call__(self, base, adapters, *args, rng=None, train: bool = True, **kwargs):
    dropout = self.options.dropout if train else 0.0
    if dropout > 0.0 and rng is None:
      raise ValueError(f"lora: dropout={dropout} needs an explicit PRNG key: call with rng=jax.random.key(...) "
                       f"(or train=False)")
    found = {p: a for p, a in _flat(adapters).items() if isinstance(a, Adapter)}
    frozen = jax.tree.map(jax.lax.stop_gradient, base)
    leaves = _flat(frozen)
    for p, ad in found.items():
      if not isinstance(leaves.get(p), QArray):
        raise ValueError(f"{sel.path_repr(p)}: has an adapter but the base leaf is "
                         f"{type(leaves.get(p)).__name__}; expected a QArray of shape {ad.layout.shape}")
    index = {p: i for i, p in enumerate(found)}

    def wrap(path, v):
      ad = found.get(path)
      if ad is None:
        return v
      keys = None
      if dropout > 0.0:
        n = math.prod(ad.layout.b_shape)
        k = jax.random.split(jax.random.fold_in(rng, index[path]), max(n, 1))
        keys = jax.random.key_data(k).reshape(ad.layout.b_shape + jax.random.key_data(k).shape[1:])
      meta = LoraMeta(layout=ad.layout, scale=ad.scale, dropout=dropout, axes=ad.layout.map_axes)
      return LoraValue(v.q, v.origin, ad.a, ad.b, keys, meta)

    handler = LoraHandler(backend=self.backend, train=train)
    out, _ = trace.evaluate(self.apply_fn, frozen, args, kwargs, handler, wrap=wrap)
    return out


def lora(apply_fn: Callable, options: LoraOptions = LoraOptions(), *,
         backend: kernels.Backend = kernels.Backend.AUTO) -> LoraFn:
  """QLoRA training of `apply_fn(params, *args, **kwargs)` on a packed base (module docstring)."""
  if not callable(apply_fn):
    raise ValueError(f"lora: expected a callable apply_fn(params, *args), got {apply_fn!r}")
  if not isinstance(options, LoraOptions):
    raise ValueError(f"lora: expected a lowbit_jax.LoraOptions, got {options!r}")
  if not isinstance(backend, kernels.Backend):
    raise ValueError(f"lora: backend must be a lowbit_jax.kernels.Backend, got {backend!r}")
  return LoraFn(apply_fn, options, backend)


def merge(base, adapters):
  """Float weights: every QArray of `base` dequantized, plus ``(alpha / r) A B`` where it has an adapter (to
  requantize with `rtn` / `gptq` after fine-tuning). Float leaves of `base` pass through."""
  found = {p: a for p, a in _flat(adapters).items() if isinstance(a, Adapter)}
  flat = _flat(base)
  for p, ad in found.items():
    if p not in flat or tuple(np.shape(flat[p]) if not isinstance(flat[p], QArray) else flat[p].shape) \
        != ad.layout.shape:
      raise ValueError(f"{sel.path_repr(p)}: the adapter (weight shape {ad.layout.shape}) has no matching leaf "
                       f"in base; expected the base the adapters were made for")
  dense = dequantize(base)

  def one(p, x):
    ad = found.get(p)
    return x if ad is None else (x.astype(jnp.float32) + ad.delta()).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(one, dense)


__all__ = ["lora", "LoraFn", "LoraOptions", "Adapter", "merge"]
