"""FP8 training with delayed scaling: E4M3 forward (activations and weights), E5M2 gradients, per-tensor scales from an
amax history (Micikevicius et al. 2022, "FP8 Formats for Deep Learning"; NVIDIA Transformer Engine's delayed
scaling recipe; the same math as `flax.linen.fp8_ops`, whose functions this module calls).

    fp8 = lowbit_jax.fp8_training(apply_fn, lowbit_jax.Fp8Options(history_len=16))
    state = fp8.init(params, x)                                  # {key path: Fp8Meta}, float32
    step = lowbit_jax.fp8_value_and_grad(lambda p, s, x, y: xent(fp8(p, s, x), y))
    loss, grads, state = step(params, state, x, y)               # under jit; grads feed any optax optimizer

At every dot site of a selected weight W (every float weight the function contracts, or `where`), traced through the
jaxpr passes, ``y = dot(x, W)`` becomes (flax's `Fp8DotGeneralOp`)::

    y = out_qdq(dot(in_qdq(x; x_scale, x_history), in_qdq(W; w_scale, w_history)); g_scale, g_history)

* ``in_qdq`` (forward): ``scale = amax / 448`` with ``amax = max(history)`` of the *previous* steps (delayed
  scaling; the old scale is kept where that amax is 0 or not finite, so the first step runs at the initial scale
  1), then ``x -> clip(x / scale, -448, 448)`` rounded to E4M3 and back ``* scale``; the history is updated to
  ``roll(history, -1).at[0].set(max|x|)`` (flax's `compute_amax_history`: the window of the `history_len` most
  recent amaxes, in rotated order). Its gradient w.r.t. x is the identity (straight-through).
* ``out_qdq`` (backward): the incoming gradient dL/dy is quantized the same way to E5M2 (max 57344) with
  ``g_scale`` / ``g_history``, and dL/dx, dL/dW are computed from it; the forward output is unchanged.
* margin 0 (flax's fixed `compute_scale` margin); compute in float32.

State and its update (no side channels): the state is an explicit argument. As in flax (`OVERWRITE_WITH_GRADIENT`),
the *cotangent* of the state is the updated state: `fp8_value_and_grad` differentiates with respect to (params,
state) and returns the state's cotangent as the new state. The cotangents of one weight's sites are combined by
maximum, not sum (flax's `fp32_max_grad` dtype), so a weight contracted at several sites, or at every layer of a
`scan`, gets the amax over all of them: exactly "per tensor" for a leaf.

Data parallelism (`shard_map` or `pmap` with the batch split over an axis): ``fp8_value_and_grad(loss_fn,
axis_name="data")``, with `loss_fn` the same per-example mean as on one device, run on the local shard. Each device
sees only its shard, so its new amaxes (slot 0 of the x and g histories) are local; the step takes their maximum
over the axis (`lax.pmax`), divides the local loss by the axis size and sums loss and gradients over the axis
(`lax.psum`). With equal shards every replica then holds the same state, and loss, gradients and state equal the
one-device step on the whole batch: the forward scales come from the replicated previous histories, and the
gradient amax is that of the global-mean loss's dL/dy (a per-shard mean differentiated alone would record an amax
`n` times too large). The state (and params) are cast to varying over the axis before differentiation
(`lax.pcast`), so that `shard_map` does not sum the state's cotangent as it sums a replicated input's; loss,
gradients and state come back replicated (`out_specs=P()`).

Deviations: one `Fp8Meta` per weight *leaf*: a scanned stack (layers, in, out) shares one x / W / gradient scale over
its layers (flax under `nn.scan` keeps one per layer; Transformer Engine one per GEMM). FP8 values are simulated
(quantize-dequantize around an f32 dot, flax's `Fp8DotGeneralOp`), not run on FP8 tensor cores. A state whose
cotangent is not computed (a loss that does not depend on a site) would come back as zeros: always differentiate the
loss w.r.t. the state through `fp8_value_and_grad`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import fp8_ops
from jax import lax

from lowbit_jax import select as sel
from lowbit_jax.checks import as_bool, as_int
from lowbit_jax.passes import trace
from lowbit_jax.passes.fakequant import SiteHandler
from lowbit_jax.qat import QATFn
from lowbit_jax.spec import fp8_spec

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fp8Options:
  """Attributes:
    history_len: amaxes kept per tensor (Transformer Engine's and flax's default 1024; >= 1).
  """
  history_len: int = 1024

  def __post_init__(self):
    object.__setattr__(self, "history_len", as_int(self.history_len, "Fp8Options.history_len", low=1))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Fp8Meta:
  """The delayed-scaling state of one weight leaf: scales () and amax histories (history_len,), float32, for its
  activations (x), the weight (w) and the gradients of its dot outputs (g). `x / scale` is what is cast to FP8."""
  x_scale: jax.Array
  x_history: jax.Array
  w_scale: jax.Array
  w_history: jax.Array
  g_scale: jax.Array
  g_history: jax.Array

  @classmethod
  def initial(cls, history_len: int) -> "Fp8Meta":
    """flax's initial values: scales 1, histories 0."""
    one, zeros = jnp.ones((), jnp.float32), jnp.zeros((history_len,), jnp.float32)
    return cls(one, zeros, one, zeros, one, zeros)


def _to(meta: Fp8Meta, dtype) -> Fp8Meta:
  return jax.tree.map(lambda a: lax.convert_element_type(a, dtype), meta)


class Fp8Handler(SiteHandler):
  """Analysis semantics for Tagged weights, plus FP8 quantize-dequantize at their dot sites (module docstring)."""

  def __init__(self, layouts: dict, metas: dict):
    super().__init__(layouts)
    self.metas = metas

  def _dot(self, eqn, invals, ctx):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract, batch = (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))
    for side in (0, 1):
      w, x = invals[side], invals[1 - side]
      if self._site_of(w, contract[side]) and not self.is_special(x):
        self._record(eqn, w, x, side, contract, batch, ctx)
        m = self.metas[sel.path_repr(w.origin.path)]
        cd = jnp.float32
        xq = fp8_ops.in_qdq(cd, E4M3, x.astype(cd), m.x_scale, m.x_history)
        wq = fp8_ops.in_qdq(cd, E4M3, w.array.astype(cd), m.w_scale, m.w_history)
        ops = [wq, xq] if side == 0 else [xq, wq]
        y = lax.dot_general(*ops, eqn.params["dimension_numbers"], preferred_element_type=cd)
        y = fp8_ops.out_qdq(cd, E5M2, y, m.g_scale, m.g_history)
        return [y.astype(eqn.outvars[0].aval.dtype)]
    return super()._dot(eqn, invals, ctx)


class Fp8Fn:
  """`apply_fn` with FP8 delayed-scaling simulation at the dot sites of the selected weights; called as
  ``fn(params, state, *args, **kwargs)``.

  Attributes:
    apply_fn, options, where: as given to `fp8_training`.
  """

  def __init__(self, apply_fn: Callable, options: Fp8Options, where: sel.Where):
    self.apply_fn, self.options, self.where = apply_fn, options, where
    self._sel = QATFn(apply_fn, fp8_spec(), where)       # the selection and layouts `qat` would use (cached)

  def layouts(self, params, *args, **kwargs) -> dict:
    """{key path: WeightLayout} of the weights that run in FP8."""
    return self._sel.layouts(params, *args, **kwargs)

  def init(self, params, *args, **kwargs) -> dict:
    """The initial state: {key path string (`params['layers']['wq']['kernel']`): Fp8Meta.initial}."""
    return {sel.path_repr(p): Fp8Meta.initial(self.options.history_len)
            for p in self.layouts(params, *args, **kwargs)}

  def __call__(self, params, state: dict, *args, **kwargs):
    lays = self.layouts(params, *args, **kwargs)
    names = {sel.path_repr(p) for p in lays}
    if not isinstance(state, dict) or set(state) != names:
      got = sorted(state) if isinstance(state, dict) else type(state).__name__
      raise ValueError(f"fp8_training: state must be the dict fp8.init(params, ...) returns, with keys "
                       f"{sorted(names)}; got {got}")
    for k, m in state.items():
      if not isinstance(m, Fp8Meta) or np.shape(m.x_history) != (self.options.history_len,):
        raise ValueError(f"fp8_training: state[{k!r}] must be an Fp8Meta with histories of length "
                         f"{self.options.history_len} (Fp8Options.history_len), got {m!r}")
    metas = {k: _to(m, fp8_ops.fm32) for k, m in state.items()}
    out, _ = trace.evaluate(self.apply_fn, params, args, kwargs, Fp8Handler(lays, metas), tagged=frozenset(lays))
    return out


def fp8_training(apply_fn: Callable, options: Fp8Options = Fp8Options(), *, where: sel.Where = None) -> Fp8Fn:
  """FP8 training of `apply_fn(params, *args, **kwargs)` (module docstring).

  Args:
    apply_fn: the unmodified model function.
    options: `Fp8Options` (the amax history length).
    where: which weights: None for every float weight the function contracts (as `qat`), a key-path regex or a
      predicate `(path, leaf) -> bool`.

  Returns:
    An `Fp8Fn`: `.init(params, *args)` the state, `fn(params, state, *args)` the forward pass; use
    `fp8_value_and_grad` for the step.

  Raises:
    ValueError: `options` is not an Fp8Options, `apply_fn` is not callable, or (at the first call) an empty
      selection or a leaf the function never contracts, naming the key path.
  """
  if not callable(apply_fn):
    raise ValueError(f"fp8_training: expected a callable apply_fn(params, *args), got {apply_fn!r}")
  if not isinstance(options, Fp8Options):
    raise ValueError(f"fp8_training: options must be a lowbit_jax.Fp8Options, got {options!r}")
  sel.as_predicate(where)
  return Fp8Fn(apply_fn, options, where)


def fp8_value_and_grad(loss_fn: Callable, *, has_aux: bool = False, axis_name: str | tuple[str, ...] | None = None
                       ) -> Callable:
  """``loss_fn(params, state, *args)`` -> a function returning (loss, grads, new_state) (with `has_aux`:
  ((loss, aux), grads, new_state)): the gradient w.r.t. params, and the state's cotangent, which is the updated
  FP8 state (module docstring).

  `axis_name`: the mapped axis (or axes) of a data-parallel step, under `shard_map` or `pmap`, with `loss_fn` the
  mean over the local shard: the returned loss and gradients are the means over all shards (local value / axis
  size, `lax.psum`), the new amaxes the maxima over them (`lax.pmax`), all replicated (module docstring); `aux`
  stays local. None (default): a one-device step."""
  as_bool(has_aux, "fp8_value_and_grad: has_aux")
  axes = (axis_name,) if isinstance(axis_name, str) else axis_name
  if axes is not None and not (isinstance(axes, tuple) and axes and all(isinstance(a, str) for a in axes)):
    raise ValueError(f"fp8_value_and_grad: axis_name must be None, a str or a non-empty tuple of str (the mapped "
                     f"data axis of shard_map / pmap), got {axis_name!r}")
  if axes is None:
    vg = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=has_aux)

    def step(params, state, *args, **kwargs):
      out, (grads, new_state) = vg(params, state, *args, **kwargs)
      return out, grads, new_state

    return step

  def local(params, state, *args, **kwargs):
    out = loss_fn(params, state, *args, **kwargs)
    loss, aux = out if has_aux else (out, None)
    return loss / lax.axis_size(axes), aux

  vg = jax.value_and_grad(local, argnums=(0, 1), has_aux=True)

  def dp_step(params, state, *args, **kwargs):
    (loss, aux), (grads, new_state) = vg(*_varying((params, state), axes), *args, **kwargs)
    loss, grads = lax.psum((loss, grads), axes)
    new_state = lax.pmax(new_state, axes)
    return ((loss, aux) if has_aux else loss), grads, new_state

  return dp_step


def _varying(tree, axes: tuple[str, ...]):
  """`tree` cast to varying over `axes` (shard_map's `lax.pcast`; leaves already varying are kept)."""
  def one(a):
    missing = tuple(n for n in axes if n not in getattr(jax.typeof(a), "vma", frozenset()))
    return lax.pcast(a, missing, to="varying") if missing else a
  return jax.tree.map(one, tree)


__all__ = ["fp8_training", "fp8_value_and_grad", "Fp8Fn", "Fp8Meta", "Fp8Options"]
