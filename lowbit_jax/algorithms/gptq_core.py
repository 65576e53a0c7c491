"""GPTQ on arrays: one weight matrix and its Hessian in, one QArray out.

Paper: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (Algorithm 1). Reference implementation: IST-DASLab/gptq, `gptq.py`,
`GPTQ.fasterquant`; this core matches its numerics step by step:

  * notation: W has rows = output features and columns = input features (the paper's layout; a Flax kernel
    `(K, N) = (in, out)` is its transpose), H = 2 X Xᵀ / n_samples is K x K;
  * dead inputs (H_kk == 0): H_kk := 1 and W[:, k] := 0;
  * act-order: columns processed by decreasing H_kk, results un-permuted at the end;
  * dampening: H += percdamp * mean(diag(H)) * I;
  * Hinv = upper Cholesky factor of H^-1 (H^-1 = Hinvᵀ Hinv);
  * lazy batch updates: blocks of `blocksize` columns; inside a block each column i is quantized,
    err = (w - q) / Hinv_ii, the rest of the block gets -err ⊗ Hinv[i, i:]; after the block the remaining columns
    get -Err1 @ Hinv[block, rest];
  * groups: quantizer parameters are found on the (error-updated) weights when a group starts, or, with
    `static_groups`, once up front on the original weights (which is what makes act-order + groups storable);
  * per-channel (no groups): parameters found once on the original weights.

The Hessian preprocessing (dead inputs, dampening, the Cholesky factor of the inverse, padding, the lazy block
update) lives in `hessian.py`, shared with SparseGPT (`sparsegpt_core.py`); `damp_levels` is re-exported here.

The quantization grid is the spec's (`lowbit_jax.formats.integer`): `SymGrid.FULL` is the reference's symmetric
grid (2*absmax / (2**bits - 1), zero 2**(b-1)); the default SIGNED_MAX, RESTRICTED, float offsets and the
`ClipSearch` of the reference's `mse=True` are found by the same `compute_params` RTN uses, at group starts only
(`lax.cond`). Loops are `lax.fori_loop`s inside one `jit`: the trace
has one column step, whatever K is. `gptq_solve` is the whole algorithm as one traceable function (dampening
retries included, as a `lax.while_loop`), so a stack of layers is one `lax.map` / `vmap` of it; `gptq_core` wraps
it for one weight with host-side validation, warnings and errors.

Deviation: act-order with dynamic groups (the reference's default, which needs a per-column group index `g_idx`)
is not representable by a QArray's contiguous groups; it raises and asks for `static_groups=True`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax

from lowbit_jax import formats
from lowbit_jax.checks import as_bool, as_float, as_int
from lowbit_jax.formats import integer
from lowbit_jax.algorithms.hessian import damp_levels, damped_inverse, kill_dead, lazy_update, pad_sweep
from lowbit_jax.qarray import QArray, check_quantizable, from_codes, quantize
from lowbit_jax.spec import Format, QuantSpec


@dataclasses.dataclass(frozen=True)
class GPTQResult:
  q: QArray            # the quantized weight, logical shape (K, N) like the input
  loss: float          # sum over columns of (w - q)^2 / Hinv_kk^2 / 2, as the reference reports
  percdamp: float      # the dampening that made H positive definite


def _round_scale(scale, spec):
  return scale.astype(spec.scale_dtype).astype(jnp.float32)


def _params(cols, spec):
  """Quantizer parameters of a (N, g) slice of W (rows = outputs): scale (N,), zero (N,) or None (a float offset
  as float32)."""
  scale, zero = integer.compute_params(cols, None, (1,), spec)
  return _round_scale(scale[:, 0], spec), None if zero is None else zero[:, 0]


@functools.partial(jax.jit, static_argnames=("spec", "blocksize", "dynamic_groups"))
def _gptq_loop(Wt, Hinv, perm, S0, Z0, *, spec: QuantSpec, blocksize: int, dynamic_groups: bool):
  """The column loop. Wt (N, Kr) permuted & padded; Hinv (Kr, Kr) upper; perm (Kr,) processing -> original
  column; S0/Z0 (G, N) initial (static / per-channel) parameters. Returns codes (N, Kr) in processing order,
  the (G, N) parameters used, and the loss."""
  n, kr = Wt.shape
  n_groups = S0.shape[0]
  g = kr if spec.group_size is None else spec.group_size
  asym = Z0 is not None

  def column(i, c, i1, W_outer):
    W1, codes, err1, S, Z, cur_s, cur_z, loss, Hinv1 = c
    p = i1 + i                                      # position in processing order
    if dynamic_groups:
      start = (p % g) == 0
      cur_s, cur_z = lax.cond(start, lambda: _params(lax.dynamic_slice(W_outer, (0, p), (n, g)), spec),
                              lambda: (cur_s, cur_z))
      store = start & (p // g < n_groups)             # block padding past K_pad has no stored group
      grow = jnp.minimum(p // g, n_groups - 1)
      S = jnp.where(store, S.at[grow].set(cur_s), S)
      Z = jnp.where(store, Z.at[grow].set(cur_z), Z) if asym else None
    else:
      grow = jnp.minimum(perm[p] // g, n_groups - 1) if n_groups > 1 else 0
      cur_s, cur_z = S[grow], (Z[grow] if asym else None)
    w = W1[:, i]                                    # (N,)
    d = Hinv1[i, i]
    code = integer.encode(w, cur_s, cur_z, spec)
    q = formats.dequantize(code, cur_s, cur_z, spec)
    err = (w - q) / d
    W1 = W1 - err[:, None] * Hinv1[i][None, :]      # Hinv1 is upper triangular: only columns >= i change
    codes = lax.dynamic_update_slice(codes, code[:, None], (0, p))
    err1 = err1.at[:, i].set(err)
    loss = loss + jnp.sum((w - q) ** 2) / d ** 2 / 2
    return W1, codes, err1, S, Z, cur_s, cur_z, loss, Hinv1

  def block(b, c):
    W, codes, S, Z, cur_s, cur_z, loss = c
    i1 = b * blocksize
    W1 = lax.dynamic_slice(W, (0, i1), (n, blocksize))                   # (N, B)
    Hinv1 = lax.dynamic_slice(Hinv, (i1, i1), (blocksize, blocksize))   # (B, B)
    err1 = jnp.zeros((n, blocksize), jnp.float32)
    body = functools.partial(column, i1=i1, W_outer=W)
    _, codes, err1, S, Z, cur_s, cur_z, loss, _ = lax.fori_loop(
        0, blocksize, body, (W1, codes, err1, S, Z, cur_s, cur_z, loss, Hinv1))
    W = lazy_update(W, err1, Hinv, i1, blocksize)
    return W, codes, S, Z, cur_s, cur_z, loss

  codes = jnp.zeros((n, kr), jnp.uint8)
  init = (Wt, codes, S0, Z0, S0[0], Z0[0] if asym else None, jnp.float32(0))
  _, codes, S, Z, _, _, loss = lax.fori_loop(0, kr // blocksize, block, init)
  return codes, S, Z, loss


@functools.partial(jax.jit, static_argnames=("spec", "blocksize", "act_order", "static_groups"))
def gptq_solve(W, H, fracs, *, spec: QuantSpec, blocksize: int, act_order: bool, static_groups: bool):
  """GPTQ of one (K, N) weight with its (K, K) Hessian, traceable end to end (vmap / `lax.map` it over layers).

  `fracs`: (T,) float32 dampings to try in order. Inputs must be validated (`check_inputs`). Returns the QArray
  (K, N) along -2 (dtype of W), the loss, the index of the dampening used and whether H + damp was positive
  definite at some level (if not, the codes are garbage and the caller must raise)."""
  k, n = W.shape
  g = spec.group_size
  Wt = W.astype(jnp.float32).T                                      # (N, K): rows = outputs
  Wt, H = kill_dead(Wt, H)
  rtn = quantize(Wt.T, spec)                                       # static / per-channel parameters
  k_pad = rtn.k_pad
  S0 = rtn.scale.astype(jnp.float32)                               # (G, N) or (1, N)
  Z0 = rtn.zero if rtn.zero is None or not spec.float_offset else rtn.zero.astype(jnp.float32)
  perm = jnp.argsort(-jnp.diag(H), stable=True) if act_order else jnp.arange(k)
  Wt, H = Wt[:, perm], H[perm][:, perm]
  Hinv, tries, ok = damped_inverse(H, fracs)

  kr = -(-k_pad // math.lcm(blocksize, g or 1)) * math.lcm(blocksize, g or 1)
  Wt, Hinv = pad_sweep(Wt, Hinv, kr)                                # padding = dead columns, no coupling
  perm_full = jnp.concatenate([perm, jnp.arange(k, kr)])
  dynamic = bool(g) and not static_groups
  codes, S, Z, loss = _gptq_loop(Wt, Hinv, perm_full, S0, Z0, spec=spec,
                                 blocksize=blocksize, dynamic_groups=dynamic)
  codes = codes[:, jnp.argsort(perm_full)][:, :k_pad].T           # (K_pad, N), original column order
  scale = S.astype(spec.scale_dtype)
  if Z is not None and spec.float_offset:
    Z = Z.astype(spec.scale_dtype)
  q = from_codes(codes, scale, Z, spec=rtn.spec, k=k, dtype=W.dtype)
  return q, loss, tries, ok


def check_options(*, act_order, static_groups, blocksize, percdamp, max_damp_tries, op: str) -> None:
  """The options' types and ranges, before anything runs; ValueError naming the option (prefixed by `op`).
  `percdamp` is the fraction of mean(diag(H)) added to H's diagonal: (0, 1] (0.01 in the paper); 0 would leave
  a singular H singular at every retry, and more than the mean diagonal drowns the statistics."""
  as_bool(act_order, f"{op}: act_order")
  as_bool(static_groups, f"{op}: static_groups")
  as_int(blocksize, f"{op}: blocksize", low=1)
  as_float(percdamp, f"{op}: percdamp", low=0.0, high=1.0, low_open=True,
           note=" (the fraction of mean(diag(H)) added to the Hessian's diagonal; 0.01 in the paper)")
  as_int(max_damp_tries, f"{op}: max_damp_tries", low=0)


def check_inputs(w_shape, h_shape, spec: QuantSpec, *, act_order: bool, static_groups: bool,
                 where: str = "") -> None:
  """Everything `gptq_solve` needs that shapes and (validated, `check_options`) options decide; ValueError
  prefixed by `where`."""
  if spec.format is not Format.INT or spec.double_quant:
    raise ValueError(f"{where}GPTQ needs an integer QuantSpec without double quantization, got {spec}")
  if len(w_shape) != 2 or spec.axis not in (-2, 0):
    raise ValueError(f"{where}GPTQ expects a 2-D (in, out) weight quantized along axis -2, got shape "
                     f"{tuple(w_shape)} and axis {spec.axis}")
  k = w_shape[0]
  if tuple(h_shape) != (k, k):
    raise ValueError(f"{where}Hessian of shape {tuple(h_shape)} does not match the weight's {k} inputs; expected "
                     f"({k}, {k})")
  g = spec.group_size
  if act_order and g and not static_groups:
    raise ValueError(f"{where}act_order with group_size={g} needs static_groups=True: QArray groups are contiguous "
                     f"in the original column order (no per-column group index)")


def gptq_core(W, H, spec: QuantSpec, *, blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
              static_groups: bool = False, max_damp_tries: int = 5, path: str | None = None) -> GPTQResult:
  """Quantize one weight with GPTQ.

  Args:
    W: (K, N) float weight in Flax layout (inputs x outputs).
    H: (K, K) Hessian proxy X Xᵀ of the inputs (any positive multiple: only its shape matters to GPTQ).
    spec: an integer QuantSpec (per-channel or per-group along axis -2, symmetric or not).
    blocksize, percdamp, act_order, static_groups: as in the reference implementation.
    max_damp_tries: if H + damp is not positive definite, damp is multiplied by 10 (with a warning), up to
      this many times, then a ValueError is raised. The retries run on device (`gptq_solve`).
    path: labels errors.

  Returns:
    GPTQResult with `q.dequantize() ≈ W`, same shape and dtype.
  """
  where = f"{path}: " if path else ""
  W = jnp.asarray(W)
  H = jnp.asarray(H, jnp.float32)
  check_options(act_order=act_order, static_groups=static_groups, blocksize=blocksize, percdamp=percdamp,
                max_damp_tries=max_damp_tries, op="gptq_core")
  check_inputs(W.shape, H.shape, spec, act_order=act_order, static_groups=static_groups, where=where)
  if not bool(jnp.all(jnp.isfinite(H))):
    raise ValueError(f"{where}expected a finite Hessian, found NaN/inf")
  check_quantizable(W, spec, path)
  fracs = damp_levels(percdamp, max_damp_tries)
  q, loss, tries, ok = gptq_solve(W, H, jnp.asarray(fracs, jnp.float32), spec=spec, blocksize=blocksize,
                                  act_order=act_order, static_groups=static_groups)
  tries = int(tries)
  if not bool(ok):
    raise ValueError(f"{where}Hessian is not positive definite even with percdamp={fracs[-1]:g}; "
                     f"expected a Hessian from real activations (check the calibration data)")
  if tries:
    warnings.warn(f"{where}Hessian not positive definite with percdamp={percdamp:g}; needed "
                  f"{fracs[tries]:g}", RuntimeWarning, stacklevel=2)
  return GPTQResult(q=q, loss=float(loss), percdamp=fracs[tries])
