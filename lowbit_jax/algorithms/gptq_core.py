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

How it runs (the same arithmetic as the reference, arranged to stay near its flop count):

  * the sweep works on W in the Flax layout (K, N): a paper column is a contiguous row here, and the codes come
    out in the QArray's layout without a transpose;
  * without act-order nothing is permuted (no gather of W or H, no un-permutation); with it, W and H are gathered
    once and the codes un-permuted once;
  * dampening is a select on H's diagonal; Hinv comes from one Cholesky of the flipped H and one triangular
    inverse (`hessian.upper_cholesky_of_inverse`), not Cholesky + inverse + Cholesky;
  * K is padded only when it is not whole blocks (and groups);
  * lazy updates touch only the later rows (`hessian.lazy_update`), N K² / 2 multiply-adds over the sweep, in
    three levels: inside a block the rank-1 updates touch a segment of 16 rows (or gcd(blocksize, group)) and
    the block's later rows get each segment's errors in one product; after a block, the later rows of its
    superblock (up to 1024 rows); after a superblock, all later rows, in products 1024 deep, which run much
    nearer the machine's matmul rate than the reference's 128-deep ones. The reference applies every block's
    update to all later columns at once; the sums are the same, grouped differently (so float32 rounding
    differs), and each group start sees W exactly as updated as in the reference;
  * quantizer parameters are found or looked up once per segment (every group start is one): dynamic groups at
    group starts only (`lax.cond`), on W as it was at the block's start (as the reference does); static groups
    and per-channel from one RTN pass up front, which dynamic groups skip.

The quantization grid is the spec's (`lowbit_jax.formats.integer`): `SymGrid.FULL` is the reference's symmetric
grid (2*absmax / (2**bits - 1), zero 2**(b-1)); the default SIGNED_MAX, RESTRICTED, float offsets and the
`ClipSearch` of the reference's `mse=True` are found by the same `compute_params` RTN uses. Loops are
`lax.fori_loop`s inside one `jit`: the trace has one column step, whatever K is, and compiles once per (shape,
spec, options). `gptq_solve` is the whole algorithm as one traceable function (dampening retries included, as a
`lax.while_loop`), so a stack of layers is one `lax.map` / `vmap` of it; `gptq_core` wraps it for one weight with
host-side validation, warnings and errors.

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


def _params(rows, spec):
  """Quantizer parameters of a (g, N) slice of W (rows = inputs): scale (N,) rounded to the storage dtype, zero (N,)
  or None (a float offset as float32)."""
  scale, zero = integer.compute_params(rows, None, (0,), spec)                  # (1, N) each
  scale = scale[0].astype(spec.scale_dtype).astype(jnp.float32)
  return scale, None if zero is None else zero[0]


_SUPERBLOCK = 1024   # rows per superblock (at most; a multiple of lcm(blocksize, group) dividing Kr)
_SEGMENT = 16   # column-loop rows per in-block lazy update (when the block's segments are multiples of it)


@functools.partial(jax.jit, static_argnames=("spec", "blocksize", "dynamic_groups"))
def _gptq_loop(W, Hinv, perm, S, Z, *, spec: QuantSpec, blocksize: int, dynamic_groups: bool):
  """The column sweep. W (Kr, N) rows = inputs in processing order, padded; Hinv (Kr, Kr) upper; perm (Kr,)
  processing -> original input, or None (act-order off); S/Z (G, N) the static / per-channel parameters (with
  `dynamic_groups`, placeholders each group start overwrites). Returns codes (Kr, N) in processing order, the
  (G, N) parameters used and the loss.

  Superblocks of SB rows (a multiple of lcm(B, g) dividing Kr, at most _SUPERBLOCK when possible), of blocks of
  B, of segments of gcd(B, g) (B without groups; then _SEGMENT if that divides them). Every group start is a
  segment start and every group lies in one superblock, so a segment's parameters are fixed: found (dynamic
  groups: on W as it was at the block's start, as the reference does, at group starts only) or looked up once
  per segment, except with act-order, where each input looks up its own static group. The column loop's rank-1
  updates touch only the segment's rows; the block's later rows get the segment's errors in one product after
  it, the superblock's later rows the block's errors (`lazy_update`), and all later rows the superblock's: the
  reference's updates, grouped differently."""
  kr, n = W.shape
  n_groups = S.shape[0]
  g = spec.group_size
  seg = math.gcd(blocksize, g or blocksize)
  seg = _SEGMENT if seg % _SEGMENT == 0 else seg
  step = math.lcm(blocksize, g or 1)                      # Kr is a multiple of it
  sb = max(m * step for m in range(1, max(1, _SUPERBLOCK // step) + 1) if kr % (m * step) == 0)
  asym = Z is not None

  def column(i, c, Hs, s, z, p0):
    Ws, codes_s, err_s, loss = c                          # Ws (seg, N): the segment's rows; Hs (seg, seg)
    if perm is not None and g:                            # act-order + static groups: per input
      grow = jnp.minimum(perm[p0 + i] // g, n_groups - 1)
      s, z = S[grow], (Z[grow] if asym else None)
    w = Ws[i]                                             # (N,)
    d = Hs[i, i]
    code = integer.encode(w, s, z, spec)
    q = formats.dequantize(code, s, z, spec)
    err = (w - q) / d
    Ws = Ws - Hs[i][:, None] * err[None, :]               # Hs upper: only rows >= i change
    codes_s = lax.dynamic_update_index_in_dim(codes_s, code, i, 0)    # in place (no bounds-check select)
    err_s = lax.dynamic_update_index_in_dim(err_s, err, i, 0)
    return Ws, codes_s, err_s, loss + jnp.sum((w - q) ** 2) / d ** 2 / 2

  def segment(t, c, i1, j1, W_outer, Hinv1):
    W1, codes1, err1, S, Z, s, z, loss = c
    r0 = t * seg                                          # the segment's first row in the block
    p0 = i1 + r0                                          # ... and its processing position
    if dynamic_groups:                                    # W_outer: the superblock's rows, from j1
      def found():
        s, z = _params(lax.dynamic_slice(W_outer, (p0 - j1, 0), (g, n)), spec)   # (g, N) -> (N,)
        row = p0 // g                                     # past G (block padding): dropped
        return (S.at[row].set(s, mode="drop"), Z.at[row].set(z, mode="drop") if asym else None, s, z)
      S, Z, s, z = lax.cond(p0 % g == 0, found, lambda: (S, Z, s, z))
    elif g and perm is None:
      grow = jnp.minimum(p0 // g, n_groups - 1)
      s, z = S[grow], (Z[grow] if asym else None)
    Ws = lax.dynamic_slice(W1, (r0, 0), (seg, n))                       # (seg, N)
    Hs = lax.dynamic_slice(Hinv1, (r0, r0), (seg, seg))                 # (seg, seg)
    init = (Ws, jnp.zeros((seg, n), jnp.uint8), jnp.zeros((seg, n), jnp.float32), loss)
    body = functools.partial(column, Hs=Hs, s=s, z=z, p0=p0)
    _, codes_s, err_s, loss = lax.fori_loop(0, seg, body, init)
    codes1 = lax.dynamic_update_slice(codes1, codes_s, (r0, 0))
    err1 = lax.dynamic_update_slice(err1, err_s, (r0, 0))
    if seg < blocksize:                                   # the block's rows after the segment
      h = lax.dynamic_slice(Hinv1, (r0, 0), (seg, blocksize))           # (seg, B)
      h = jnp.where(jnp.arange(blocksize)[None, :] >= r0 + seg, h, 0.0)
      W1 = W1 - h.T @ err_s                                             # (B, N)
    return W1, codes1, err1, S, Z, s, z, loss

  def block(b, c, j1, Hsb):
    Wsb, codes_sb, err_sb, S, Z, s, z, loss = c           # the superblock's rows, from j1
    i1 = b * blocksize                                    # the block's first row in the superblock
    W1 = lax.dynamic_slice(Wsb, (i1, 0), (blocksize, n))                # (B, N)
    Hinv1 = lax.dynamic_slice(Hsb, (i1, i1), (blocksize, blocksize))    # (B, B)
    init = (W1, jnp.zeros((blocksize, n), jnp.uint8), jnp.zeros((blocksize, n), jnp.float32), S, Z, s, z, loss)
    body = functools.partial(segment, i1=j1 + i1, j1=j1, W_outer=Wsb, Hinv1=Hinv1)
    _, codes1, err1, S, Z, s, z, loss = lax.fori_loop(0, blocksize // seg, body, init)
    codes_sb = lax.dynamic_update_slice(codes_sb, codes1, (i1, 0))
    err_sb = lax.dynamic_update_slice(err_sb, err1, (i1, 0))
    if sb > blocksize:                                    # (static: no loop to compile for one block)
      Wsb = lazy_update(Wsb, err1, Hsb, i1, blocksize, axis=0)          # the superblock's later rows
    return Wsb, codes_sb, err_sb, S, Z, s, z, loss

  def superblock(u, c):
    W, codes, S, Z, s, z, loss = c
    j1 = u * sb
    Wsb = lax.dynamic_slice(W, (j1, 0), (sb, n))                        # (SB, N)
    Hsb = lax.dynamic_slice(Hinv, (j1, j1), (sb, sb))                   # (SB, SB)
    init = (Wsb, jnp.zeros((sb, n), jnp.uint8), jnp.zeros((sb, n), jnp.float32), S, Z, s, z, loss)
    body = functools.partial(block, j1=j1, Hsb=Hsb)
    _, codes_sb, err_sb, S, Z, s, z, loss = lax.fori_loop(0, sb // blocksize, body, init)
    codes = lax.dynamic_update_slice(codes, codes_sb, (j1, 0))
    if kr > sb:
      W = lazy_update(W, err_sb, Hinv, j1, sb, axis=0)                  # all later rows, in (SB, N) products
    return W, codes, S, Z, s, z, loss

  init = (W, jnp.zeros((kr, n), jnp.uint8), S, Z, S[0], Z[0] if asym else None, jnp.float32(0))
  _, codes, S, Z, _, _, loss = lax.fori_loop(0, kr // sb, superblock, init)
  return codes, S, Z, loss


@functools.partial(jax.jit, static_argnames=("spec", "blocksize", "act_order", "static_groups"))
def gptq_solve(W, H, fracs, *, spec: QuantSpec, blocksize: int, act_order: bool, static_groups: bool):
  """GPTQ of one (K, N) weight with its (K, K) Hessian, traceable end to end (vmap / `lax.map` it over layers).

  `fracs`: (T,) float32 dampings to try in order. Inputs must be validated (`check_inputs`). Returns the QArray
  (K, N) along -2 (dtype of W), the loss, the index of the dampening used and whether H + damp was positive
  definite at some level (if not, the codes are garbage and the caller must raise)."""
  k, n = W.shape
  g = spec.group_size
  Wk, H = kill_dead(W.astype(jnp.float32), H, axis=0)              # (K, N): rows = inputs
  dynamic = bool(g) and not static_groups
  rtn = quantize(Wk, spec)        # static / per-channel parameters; unused (so never computed) with dynamic groups
  k_pad = rtn.k_pad
  S0 = rtn.scale.astype(jnp.float32)                               # (G, N) or (1, N)
  Z0 = rtn.zero if rtn.zero is None or not spec.float_offset else rtn.zero.astype(jnp.float32)
  if dynamic:                                                      # found at each group start instead
    S0, Z0 = jnp.zeros_like(S0), None if Z0 is None else jnp.zeros_like(Z0)
  perm = None
  if act_order:
    perm = jnp.argsort(-jnp.diag(H), stable=True)
    Wk, H = Wk[perm], H[perm[:, None], perm[None, :]]   # one 2-D gather (rows then columns: 10x slower here)
  Hinv, tries, ok = damped_inverse(H, fracs)

  step = math.lcm(blocksize, g or 1)
  kr = -(-k_pad // step) * step
  Wk, Hinv = pad_sweep(Wk, Hinv, kr, axis=0)                        # padding = dead inputs, no coupling
  if perm is not None and kr > k:
    perm = jnp.concatenate([perm, jnp.arange(k, kr)])
  codes, S, Z, loss = _gptq_loop(Wk, Hinv, perm, S0, Z0, spec=spec, blocksize=blocksize, dynamic_groups=dynamic)
  if perm is not None:
    codes = codes[jnp.argsort(perm)]                               # (Kr, N), original input order
  codes = codes[:k_pad]                                            # (K_pad, N)
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
