"""GPTQ as a pytree transform: `lowbit_jax.gptq(params, calib, spec)` maps `gptq_core` over the calibrated weights.

    calib = lowbit_jax.calibrate(apply_fn, params, batches)
    qparams = lowbit_jax.gptq(params, calib)                                  # int_spec(4, group_size=128)
    qparams = lowbit_jax.gptq(params, calib, lowbit_jax.int_spec(3, group_size=64), act_order=True,
                              static_groups=True)
    logits = lowbit_jax.quantized(apply_fn)(qparams, tokens)

Every weight is solved in the layout the trace recorded for it (`WeightCalibration.layout`): the leaf as
(*B, K, N) with B its scanned-layer / expert axes (in any position), K its contraction block (one axis, or several
for e.g. an (H, Dh, D) out-projection) and N the rest, each (K, N) problem with its own (K, K) Hessian. The
problems of one leaf are one `lax.map` of `gptq_core.gptq_solve` (dampening retries included, on device); a
warning names the layers that needed more dampening, an error the ones no dampening fixed.

With `true_sequential=True` the weights are visited in the order the model first uses them, and after each group
of weights that share one input (the trace's `input_ids`: q/k/v; gate/up) the statistics of the remaining weights
are re-captured from the model with the already-quantized weights in place, as the reference implementation feeds
each block the outputs of the quantized blocks before it (IST-DASLab/gptq, `llama.py`, `--true-sequential`). A
scanned stack is one leaf, so its layers are quantized together from one capture.

Sharded weights: a leaf whose `NamedSharding` splits its output features over mesh axes (tensor-parallel q/k/v,
gate/up: `P(None, "model")`) is solved under `shard_map`, each device quantizing only its output columns (GPTQ's
columns are independent given H), and comes back as a QArray whose codes, scales and zero points are split the same
way; any other sharding runs as one program. Either way the result equals one device's (`lowbit_jax.algorithms.
sharded`).

Weights without calibration statistics (convolutions) are quantized round-to-nearest, with one warning naming them.
Nothing is modified in place: all weights and statistics are validated before any is quantized, and the result is
a new tree.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from lowbit_jax import select as sel
from lowbit_jax.algorithms import common, sharded
from lowbit_jax.algorithms.common import Target
from lowbit_jax.algorithms.gptq_core import check_inputs, check_options, damp_levels, gptq_solve
from lowbit_jax.checks import as_bool, check_finite_outputs
from lowbit_jax.passes.calibration import Calibration
from lowbit_jax.spec import QuantSpec, int_spec

DEFAULT_SPEC = int_spec(4, group_size=128)


@functools.partial(jax.jit, static_argnames=("spec", "blocksize", "act_order", "static_groups"))
def _solve_stack(W, H, fracs, *, spec: QuantSpec, blocksize: int, act_order: bool, static_groups: bool):
  """`gptq_solve` over the leading axis of W (L, K, N) and H (L, K, K), one layer after the other on device."""
  solve = functools.partial(gptq_solve, spec=spec, blocksize=blocksize, act_order=act_order,
                            static_groups=static_groups)
  return lax.map(lambda wh: solve(wh[0], wh[1], fracs), (W, H))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Options:
  act_order: bool
  static_groups: bool
  blocksize: int
  percdamp: float
  max_damp_tries: int
  strict: bool

  def __post_init__(self):
    check_options(act_order=self.act_order, static_groups=self.static_groups, blocksize=self.blocksize,
                  percdamp=self.percdamp, max_damp_tries=self.max_damp_tries, op="gptq")
    common.check_strict(self.strict, "gptq")


def _check(t: Target, spec: QuantSpec, o: _Options) -> None:
  common.check_weight(t, spec, "gptq")
  if not t.has_stats:
    return
  lay = t.layout
  common.check_stat(t, "Hessian", t.wc.stats.xtx, lay.b_shape + (lay.k, lay.k), "Stat.HESSIAN", "gptq",
                    inf_ok=True)
  check_inputs((lay.k, lay.n), (lay.k, lay.k), common.kn_spec(spec), act_order=o.act_order,
               static_groups=o.static_groups, where=f"{t.where}: ")


def _quantize(t: Target, hessian, spec: QuantSpec, o: _Options):
  """One weight: every (K, N) problem of its layout solved in one `lax.map`; warns / raises naming the layers
  that needed more dampening / that no dampening fixed. Layers whose Hessian is all zero (no signal: GPTQ would
  zero every weight) or inf (overflowing activations) are round-to-nearest instead, with a warning (`strict`:
  an error)."""
  lay = t.layout
  kspec = common.kn_spec(spec)
  fracs = damp_levels(o.percdamp, o.max_damp_tries)
  H = jnp.reshape(jnp.asarray(hessian, jnp.float32), (-1, lay.k, lay.k))
  diag = np.diagonal(np.asarray(H), axis1=-2, axis2=-1)
  bad = common.degenerate([t], {"its activations are all zero (an all-zero Hessian)": common.all_zero(diag),
                                "its activations overflow float32 (an inf Hessian)": common.overflowing(H, 2)},
                          "gptq", o.strict)
  cols = sharded.columns(t, spec)
  finish = lambda q: sharded.place(common.unflatten_q(q, t), t, cols)   # in the leaf's sharding, if split
  if bad.all():
    return finish(common.rtn_kn(t, kspec))
  H = jnp.where(jnp.asarray(bad)[:, None, None], jnp.eye(lay.k, dtype=jnp.float32), H)
  static = dict(spec=kspec, blocksize=o.blocksize, act_order=o.act_order, static_groups=o.static_groups)
  args = (t.kn(), H, jnp.asarray(fracs, jnp.float32))
  if cols is None:
    q, _, tries, ok = _solve_stack(*args, **static)
  else:   # each device solves its output columns (see `sharded`)
    q, _, tries, ok = sharded.solve(*args, fn=_solve_stack, cols=cols, reduce=(sharded.COLS, sharded.SUM,
                                    sharded.MAX, sharded.ALL), options=tuple(sorted(static.items())))
  if bad.any():
    q = common.where_layers(bad, common.rtn_kn(t, kspec), q)
  tries, ok = np.asarray(tries), np.asarray(ok)
  label = lambda idx: common.layer_names(t, idx)
  if not ok.all():
    raise ValueError(f"{label(np.flatnonzero(~ok))}: Hessian is not positive definite even with "
                     f"percdamp={fracs[-1]:g}; expected a Hessian from real activations (check the calibration "
                     f"data)")
  if tries.any():
    bad = np.flatnonzero(tries)
    warnings.warn(f"{label(bad)}: Hessian not positive definite with percdamp={fracs[0]:g}; needed up to "
                  f"{fracs[int(tries.max())]:g}", RuntimeWarning, stacklevel=3)
  return finish(q)


def gptq(params, calib: Calibration, spec: QuantSpec = DEFAULT_SPEC, *, where: sel.Where = None,
         act_order: bool = True, static_groups: bool = True, blocksize: int = 128, percdamp: float = 0.01,
         max_damp_tries: int = 5, true_sequential: bool = False, strict: bool = False):
  """Quantize the calibrated weights of `params` with GPTQ; returns a new tree with QArray leaves.

  Args:
    params: the parameters `calib` was collected on; leaves split over a mesh on their output features are solved
      one shard per device and stay split (see the module docstring), with the one-device result.
    calib: `lowbit_jax.calibrate(apply_fn, params, batches)` (with Stat.HESSIAN, collected by default).
    spec: an integer QuantSpec (`lowbit_jax.int_spec(bits, group_size=..., symmetric=..., scale_dtype=...)`);
      its axis is ignored: each weight is quantized along the contraction block the trace recorded.
    where: which calibrated weights to quantize (default: all of them).
    act_order, static_groups, blocksize, percdamp: as in the reference implementation (see `gptq_core`), except
      that act-order is on by default, with static groups (so grouped weights stay contiguous QArray groups):
      the reference recommends it for LLaMA models, and on SmolLM2-135M GPTQ without it is worse than RTN end to
      end although its per-layer error is lower (experiments/results/gptq_order_smollm2.md). `gptq_core` keeps
      the reference's defaults (both off).
    max_damp_tries: how many times dampening is multiplied by 10 for a layer whose Hessian is not positive
      definite (with a warning) before raising.
    true_sequential: re-capture statistics after each group of same-input weights (see the module docstring).
    strict: raise instead of warning (`lowbit_jax.DegenerateStatisticsWarning`) and quantizing round-to-nearest
      a weight (or layer of a stack) whose calibration is degenerate: all-zero activations (GPTQ would zero
      every weight) or activations whose squares overflow float32.

  Raises:
    ValueError: naming the key path, for a non-integer spec, a calibration from another model, missing or NaN
      statistics, NaN weights, unsupported bits/group combinations or a Hessian no dampening makes positive
      definite (naming the layers); a `percdamp` outside (0, 1] before anything runs; a result with NaN/inf.

  Example (on the calibration inputs, GPTQ's output error is below round-to-nearest's at the same bytes)::

    >>> import jax, jax.numpy as jnp
    >>> import lowbit_jax as lb
    >>> k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    >>> params = {"l1": {"kernel": jax.random.normal(k1, (64, 64)) / 8},
    ...           "l2": {"kernel": jax.random.normal(k2, (64, 64)) / 8}}
    >>> apply = lambda p, x: jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]
    >>> x = jax.random.normal(k3, (64, 64))
    >>> calib = lb.calibrate(apply, params, [x])
    >>> spec = lb.int_spec(4, group_size=32)
    >>> qgptq, qrtn = lb.gptq(params, calib, spec), lb.rtn(params, calib, spec)
    >>> qgptq["l1"]["kernel"].nbytes == qrtn["l1"]["kernel"].nbytes
    True
    >>> err = lambda q: float(jnp.mean((apply(lb.dequantize(q), x) - apply(params, x)) ** 2))
    >>> bool(err(qgptq) < 0.75 * err(qrtn))
    True
  """
  common.check_calibration(calib, "gptq")
  common.check_spec(spec, "gptq", integer=True)
  opts = _Options(act_order=act_order, static_groups=static_groups, blocksize=blocksize, percdamp=percdamp,
                  max_damp_tries=max_damp_tries, strict=strict)
  as_bool(true_sequential, "gptq: true_sequential")
  targets = common.calibrated_leaves(params, calib, where, "gptq")
  for t in targets:
    _check(t, spec, opts)
  done = common.rtn_fallback([t for t in targets if not t.has_stats], spec, "gptq")
  targets = [t for t in targets if t.has_stats]
  groups = common.input_groups(targets) if true_sequential else [targets]

  stats = calib
  bar = tqdm(total=len(targets), desc="gptq", leave=False, disable=len(targets) < 16)
  for i, group in enumerate(groups):
    if i and true_sequential:   # the statistics of what is left, with every earlier group quantized
      stats = calib.recalibrate(common.replace_leaves(params, done))
    for t in group:
      hessian = stats[t.path].hessian
      if stats is not calib:
        common.check_stat(t, "Hessian", hessian, tuple(np.shape(t.wc.hessian)), "Stat.HESSIAN", "gptq",
                          inf_ok=True)
      done[t.path] = _quantize(t, hessian, spec, opts)
      bar.update()
  bar.close()
  check_finite_outputs(((sel.path_repr(p), q) for p, q in done.items()), "gptq")
  return common.replace_leaves(params, done)
