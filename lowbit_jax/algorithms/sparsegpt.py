"""SparseGPT as a pytree transform: `lowbit_jax.sparsegpt(params, calib, options)` maps `sparsegpt_core` over the
calibrated weights.

    calib = lowbit_jax.calibrate(apply_fn, params, batches)
    pruned = lowbit_jax.sparsegpt(params, calib)                                  # 50 % unstructured
    pruned = lowbit_jax.sparsegpt(params, calib, lowbit_jax.NM(n=2, m=4))          # 2:4 along K
    both = lowbit_jax.sparsegpt(params, calib, lowbit_jax.NM(), spec=lowbit_jax.int_spec(4))   # 2:4 + int4, one pass

Paper: Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023;
reference implementation IST-DASLab/sparsegpt (`sparsegpt.py` `fasterprune`, see `sparsegpt_core`). As in
`gptq.py`, every weight is solved in the layout the trace recorded (`WeightCalibration.layout`): (*B, K, N) with B
its scanned-layer / expert axes, one (K, N) problem with its own Hessian per layer, all layers of a leaf in one
`lax.map` on device (dampening retries included). Without `spec` the result keeps float leaves (exact zeros); with
an integer `spec` the pruned weights are QArrays whose pruned entries decode to exactly 0.

Sharded weights: under an N:M pattern, a leaf whose `NamedSharding` splits its output features over mesh axes is
pruned under `shard_map`, each device solving its own output columns, and comes back split the same way
(`lowbit_jax.algorithms.sharded`); unstructured sparsity ranks a whole block of columns at once, so it (and any
other sharding) runs as one program. Either way the result equals one device's.

Fallbacks, each with a warning (`strict=True` raises for degenerate statistics): weights without calibration
statistics (convolutions) and layers with an all-zero or overflowing Hessian are pruned by magnitude (then
round-to-nearest quantized with `spec`). Deviation: the reference prunes layers sequentially, feeding each the
outputs of the already-pruned ones; like `gptq` without `true_sequential`, all statistics come from the one dense
calibration here.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowbit_jax import select as sel
from lowbit_jax.algorithms import common, sharded
from lowbit_jax.algorithms.hessian import damp_levels
from lowbit_jax.algorithms.magnitude import check_prunable, to_leaf
from lowbit_jax.algorithms.sparsegpt_core import sparsegpt_solve
from lowbit_jax.algorithms.sparsity import NM, Scope, Sparsity, check_pattern, magnitude_pruned
from lowbit_jax.checks import as_float, as_int, check_finite_outputs
from lowbit_jax.passes.calibration import Calibration
from lowbit_jax.qarray import QArray
from lowbit_jax.rtn import quantize_jit
from lowbit_jax.spec import QuantSpec

OP = "sparsegpt"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Options:
  pattern: Sparsity | NM
  spec: QuantSpec | None
  blocksize: int
  percdamp: float
  max_damp_tries: int
  strict: bool

  def __post_init__(self):
    check_pattern(self.pattern, OP)
    if isinstance(self.pattern, Sparsity) and self.pattern.scope is not Scope.LAYER:
      raise ValueError(f"{OP}: Sparsity.scope must be Scope.LAYER (SparseGPT prunes `fraction` of every block of "
                       f"columns, as the reference does); got {self.pattern.scope}")
    as_int(self.blocksize, f"{OP}: blocksize", low=1)
    if isinstance(self.pattern, NM) and self.blocksize % self.pattern.m:
      raise ValueError(f"{OP}: blocksize {self.blocksize} must be a multiple of NM.m={self.pattern.m}")
    as_float(self.percdamp, f"{OP}: percdamp", low=0.0, high=1.0, low_open=True,
             note=" (the fraction of mean(diag(H)) added to the Hessian's diagonal; 0.01 in the paper)")
    as_int(self.max_damp_tries, f"{OP}: max_damp_tries", low=0)
    common.check_strict(self.strict, OP)
    if self.spec is not None:
      common.check_spec(self.spec, OP, integer=True)


def check_holds_zero(spec: QuantSpec, where: str) -> None:
  """A pruned entry must decode to exactly 0: integer grids with an implicit zero or an integer zero point do;
  a float offset (ZeroPoint.FLOAT, llama.cpp Q4_1) does not."""
  if spec.float_offset:
    raise ValueError(f"{where}: the spec cannot hold exact zeros (an asymmetric spec with a float offset, "
                     f"x ≈ code * scale + offset); expected a symmetric or integer-zero-point spec for pruned weights")


def _check(t: common.Target, o: _Options) -> None:
  check_prunable(t, o.pattern, OP)
  if o.spec is not None:
    check_holds_zero(o.spec, t.where)
    common.check_weight(t, o.spec, OP)
  if t.has_stats:
    lay = t.layout
    common.check_stat(t, "Hessian", t.wc.stats.xtx, lay.b_shape + (lay.k, lay.k), "Stat.HESSIAN", OP, inf_ok=True)


def _magnitude(t: common.Target, o: _Options):
  """Magnitude pruning (L, K, N) of `t`, round-to-nearest quantized with `o.spec` (pruned entries stay 0)."""
  w = t.kn()
  pruned = jnp.where(magnitude_pruned(w, o.pattern), jnp.zeros((), w.dtype), w)
  if o.spec is None:
    return pruned
  return quantize_jit(pruned, common.kn_spec(o.spec), None)


def _finish(t: common.Target, r, cols: sharded.Columns | None = None):
  return sharded.place(common.unflatten_q(r, t) if isinstance(r, QArray) else to_leaf(t, r), t, cols)


@functools.partial(jax.jit, static_argnames=("pattern", "spec", "blocksize"))
def _solve_stack(W, H, fracs, *, pattern, spec, blocksize):
  solve = functools.partial(sparsegpt_solve, pattern=pattern, spec=spec, blocksize=blocksize)
  return lax.map(lambda wh: solve(wh[0], wh[1], fracs), (W, H))


def _prune(t: common.Target, o: _Options):
  lay = t.layout
  fracs = damp_levels(o.percdamp, o.max_damp_tries)
  H = jnp.reshape(jnp.asarray(t.wc.stats.xtx, jnp.float32), (-1, lay.k, lay.k))
  diag = np.diagonal(np.asarray(H), axis1=-2, axis2=-1)
  bad = common.degenerate([t], {"its activations are all zero (an all-zero Hessian)": common.all_zero(diag),
                                "its activations overflow float32 (an inf Hessian)": common.overflowing(H, 2)},
                          OP, o.strict, instead=("prunes by magnitude", "pruned by magnitude"))
  cols = sharded.columns(t, o.spec) if isinstance(o.pattern, NM) else None   # unstructured couples all columns
  if bad.all():
    return _finish(t, _magnitude(t, o), cols)
  H = jnp.where(jnp.asarray(bad)[:, None, None], jnp.eye(lay.k, dtype=jnp.float32), H)
  kspec = None if o.spec is None else common.kn_spec(o.spec)
  static = dict(pattern=o.pattern, spec=kspec, blocksize=o.blocksize)
  args = (t.kn(), H, jnp.asarray(fracs, jnp.float32))
  if cols is None:
    r, _, _, tries, ok = _solve_stack(*args, **static)
  else:   # N:M: each device prunes its output columns (see `sharded`)
    r, _, _, tries, ok = sharded.solve(*args, fn=_solve_stack, cols=cols, reduce=(
        sharded.COLS, sharded.COLS, sharded.SUM, sharded.MAX, sharded.ALL), options=tuple(sorted(static.items())))
  if bad.any():
    r = common.where_layers(bad, _magnitude(t, o), r)
  tries, ok = np.asarray(tries), np.asarray(ok)
  if not ok.all():
    raise ValueError(f"{common.layer_names(t, np.flatnonzero(~ok))}: Hessian is not positive definite even with "
                     f"percdamp={fracs[-1]:g}; expected a Hessian from real activations (check the calibration data)")
  if tries.any():
    warnings.warn(f"{common.layer_names(t, np.flatnonzero(tries))}: Hessian not positive definite with "
                  f"percdamp={fracs[0]:g}; needed up to {fracs[int(tries.max())]:g}", RuntimeWarning, stacklevel=3)
  return _finish(t, r, cols)


def sparsegpt(params, calib: Calibration, options: Sparsity | NM = Sparsity(), *, where: sel.Where = None,
              spec: QuantSpec | None = None, blocksize: int = 128, percdamp: float = 0.01, max_damp_tries: int = 5,
              strict: bool = False):
  """Prune (and with `spec`, quantize in the same pass) the calibrated weights of `params` with SparseGPT.

  Args:
    params: the parameters `calib` was collected on.
    calib: `lowbit_jax.calibrate(apply_fn, params, batches)` (with Stat.HESSIAN, collected by default).
    options: `Sparsity(fraction=...)` (unstructured, `fraction` of every block of columns; Scope.LAYER only) or
      `NM(n, m)` (keep n of every m along the contraction axis; 2:4 is what sparse tensor cores run).
    where: which calibrated weights to prune (default: all of them).
    spec: an integer QuantSpec that holds zero (symmetric, or an integer zero point) for joint pruning and
      quantization (the paper's Section 3.5), or None for float results.
    blocksize, percdamp: as in the reference (128, 0.01); max_damp_tries: x10 dampening retries before raising.
    strict: raise instead of warning and pruning by magnitude a layer whose Hessian is all zero or inf.

  Raises:
    ValueError: naming the key path, for a spec that cannot hold zeros (a float offset), a contraction length not
      divisible by m, NaN weights, missing / mismatched statistics, a Hessian no dampening fixes; for options of
      the wrong type or range before anything runs.
  """
  common.check_calibration(calib, OP)
  o = _Options(pattern=options, spec=spec, blocksize=blocksize, percdamp=percdamp, max_damp_tries=max_damp_tries,
               strict=strict)
  targets = common.calibrated_leaves(params, calib, where, OP)
  for t in targets:
    _check(t, o)
  done = {}
  no_stats = [t for t in targets if not t.has_stats]
  if no_stats:
    names = ", ".join(f"{t.where} ({common._why_no_stats(t)})" for t in no_stats)
    warnings.warn(f"{OP}: no calibration statistics for {names}; pruned by magnitude", RuntimeWarning, stacklevel=2)
    done.update({t.path: _finish(t, _magnitude(t, o)) for t in no_stats})
  for t in [t for t in targets if t.has_stats]:
    done[t.path] = _prune(t, o)
  check_finite_outputs(((sel.path_repr(p), q) for p, q in done.items()), OP)
  return common.replace_leaves(params, done)
