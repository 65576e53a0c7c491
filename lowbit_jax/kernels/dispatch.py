"""The dispatchers: validate inputs, pick the Pallas kernel when it is legal, else the reference, and record why.

Selection, for `backend`:
  REFERENCE  the pure-jnp spec, always.
  AUTO       the kernel of the target platform when it can run, is legal for (x, w, blocks) and that platform's
             kernels are verified on hardware (`common.VERIFIED_ON_HARDWARE`), else the reference; never raises
             for a valid 2-D QArray and matching activations.
  PALLAS     the kernel, or a ValueError saying why it cannot run.
The target platform is `platform` if given, else the default backend's (GPU -> Triton, TPU -> Mosaic). A kernel
runs on its own platform, or anywhere with `interpret=True` (how the CPU tests exercise it). Every call records a
`Decision` (see `common.last_decision`) at trace time.

`qmatmul` follows the weight's spec: a QArray whose `spec.activations` is an `ActQuant` runs as `w8a8_matmul`
(per-token or per-tensor dynamic 8-bit activations), or as `llm_int8_matmul` when `ActQuant.outlier_threshold` is
set; every other QArray is weight-only. So `lowbit_jax.quantized(apply_fn)`, which calls `qmatmul`, runs W8A8 and
LLM.int8() models unchanged.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from lowbit_jax.kernels import blocks as blk
from lowbit_jax.kernels import common
from lowbit_jax.kernels.common import Backend, Decision, Platform
from lowbit_jax.kernels.qmatmul import pallas_gpu as qm_gpu, pallas_tpu as qm_tpu, reference as qm_ref
from lowbit_jax.kernels.w8a8 import llm_int8 as int8_ref
from lowbit_jax.kernels.w8a8 import pallas_gpu as w8_gpu, pallas_tpu as w8_tpu, reference as w8_ref
from lowbit_jax.qarray import QArray
from lowbit_jax.spec import ActQuant


def _validate(op: str, x, w) -> None:
  if not isinstance(w, QArray):
    raise ValueError(f"{op}: expected w to be a QArray, got {type(w).__name__}")
  if w.ndim != 2 or w.axis != -2:
    raise ValueError(f"{op}: expected a 2-D QArray with contraction axis -2 (K, N), got shape {w.shape} "
                     f"with axis {w.axis}")
  if not hasattr(x, "dtype") or not hasattr(x, "shape"):
    raise ValueError(f"{op}: expected x to be an array, got {type(x).__name__}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{op}: expected floating activations, got {x.dtype}")
  if x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"{op}: x of shape {tuple(x.shape)} does not contract with w of shape {w.shape}; "
                     f"expected x.shape[-1] == {w.shape[0]}")


def _apply_in_scale(x, w: QArray):
  """``x @ W == (x / s) @ (s ⊙ W)``: divide the activations by a QArray's per-input-channel `in_scale`."""
  if w.in_scale is None:
    return x, w
  s = w.in_scale.reshape(w.shape[0]).astype(jnp.float32)                  # (K, 1) -> (K,)
  return (x.astype(jnp.float32) / s).astype(x.dtype), w.without_in_scale()


def _select(op: str, backend, platform: Platform | None, interpret: bool, why_not: dict) -> Decision:
  """Which implementation runs; `why_not[platform]()` is the kernel's legality check (None: legal)."""
  if not isinstance(backend, Backend):
    raise ValueError(f"{op}: backend must be a lowbit_jax.kernels.Backend, got {backend!r}")
  if platform is not None and not isinstance(platform, Platform):
    raise ValueError(f"{op}: platform must be a lowbit_jax.kernels.Platform or None, got {platform!r}")
  if backend is Backend.REFERENCE:
    return common.record(Decision(op, Backend.REFERENCE, None, "reference requested"))
  detected = common.detect_platform()
  target = platform if platform is not None else detected
  if target is None:
    why = (f"no Pallas kernel family for the {jax.default_backend()!r} backend; kernels run there only with "
           f"interpret=True and an explicit platform=Platform.GPU or Platform.TPU")
  elif target is not detected and not interpret:
    why = (f"the {target.name} kernel cannot run on the {jax.default_backend()!r} backend without "
           f"interpret=True")
  elif backend is Backend.AUTO and not interpret and target not in common.VERIFIED_ON_HARDWARE:
    why = (f"the {target.name} Pallas kernels are not yet verified on hardware (benchmarks/RESULTS.md: device "
           f"table pending); Backend.PALLAS opts in")
  else:
    why = why_not[target]()
  if why is None:
    return common.record(Decision(op, Backend.PALLAS, target, "kernel legal"))
  if backend is Backend.PALLAS:
    raise ValueError(f"{op}: Backend.PALLAS requested but the kernel cannot run: {why}")
  return common.record(Decision(op, Backend.REFERENCE, target, why))


def qmatmul(x, w: QArray, *, backend: Backend = Backend.AUTO, platform: Platform | None = None,
            interpret: bool = False, blocks: blk.BlockSizes | None = None):
  """``x @ w`` for a 2-D QArray `w` of logical shape (K, N) (contraction axis -2), x of shape (..., K) float.

  Weight-only (W8A16, W4A16, W2A16, ternary, NF4, FP8 weights): returns (..., N) in x.dtype, accumulated in float32;
  the spec is `kernels.qmatmul.reference.qmatmul`. Differentiable w.r.t. x (and w's scales) on every path.
  `platform`, `interpret` and `blocks` choose and tile the Pallas kernel (see the module docstring).
  A weight whose `spec.activations` is set runs as `w8a8_matmul` or `llm_int8_matmul` (module docstring).
  """
  _validate("qmatmul", x, w)
  act = w.spec.activations
  if act is not None and act.outlier_threshold is None:
    return w8a8_matmul(x, w, per_token=act.per_token, backend=backend, platform=platform, interpret=interpret,
                       blocks=blocks)
  if act is not None:
    return llm_int8_matmul(x, w, threshold=act.outlier_threshold, per_token=act.per_token, backend=backend,
                           platform=platform)
  x, w = _apply_in_scale(x, w)
  kernels: dict[Platform, Callable] = {Platform.GPU: qm_gpu, Platform.TPU: qm_tpu}
  why_not = {p: (lambda m=m: m.why_not(x, w, blocks)) for p, m in kernels.items()}
  d = _select("qmatmul", backend, platform, interpret, why_not)
  if d.backend is Backend.REFERENCE:
    return qm_ref.qmatmul(x, w)
  return kernels[d.platform].qmatmul(x, w, blocks=blocks, interpret=interpret)


def w8a8_matmul(x, w: QArray, *, per_token: bool = True, backend: Backend = Backend.AUTO,
                platform: Platform | None = None, interpret: bool = False, blocks: blk.BlockSizes | None = None):
  """``quantize_activations(x) @ w``: activations quantized dynamically to 8 bits (int8 for INT/ternary/NF4
  weights, FP8 E4M3 for FP8 weights; a scale per token, or per tensor with `per_token=False`) and contracted with
  the 8-bit weight codes (W8A8: SmoothQuant / LLM.int8()'s int8 path; FP8 x FP8). Returns (..., N) in x.dtype;
  the spec is `kernels.w8a8.reference.w8a8_matmul` (gradient: straight-through activation quantizer).
  """
  _validate("w8a8_matmul", x, w)
  x, w = _apply_in_scale(x, w)
  if not isinstance(per_token, bool):
    raise ValueError(f"w8a8_matmul: per_token must be a bool, got {per_token!r}")
  kernels: dict[Platform, Callable] = {Platform.GPU: w8_gpu, Platform.TPU: w8_tpu}
  why_not = {p: (lambda m=m: m.why_not(x, w, blocks, per_token=per_token)) for p, m in kernels.items()}
  d = _select("w8a8_matmul", backend, platform, interpret, why_not)
  if d.backend is Backend.REFERENCE:
    return w8_ref.w8a8_matmul(x, w, per_token=per_token)
  return kernels[d.platform].w8a8_matmul(x, w, per_token=per_token, blocks=blocks, interpret=interpret)


def llm_int8_matmul(x, w: QArray, *, threshold: float = int8_ref.DEFAULT_THRESHOLD, per_token: bool = True,
                    backend: Backend = Backend.AUTO, platform: Platform | None = None):
  """LLM.int8(): the input columns of x with any |x| > `threshold` (over all tokens of this call) are multiplied
  in float32 with the dequantized weight rows, the others as int8 x int8 -> int32 with per-token activation and
  per-output-channel weight scales; the two parts are summed. Returns (..., N) in x.dtype; the spec is
  `kernels.w8a8.llm_int8.llm_int8_matmul` (jit-friendly masks, straight-through gradient). There is no Pallas
  kernel: AUTO and REFERENCE record that the reference runs, PALLAS raises.
  """
  _validate("llm_int8_matmul", x, w)
  x, w = _apply_in_scale(x, w)
  try:
    act = ActQuant(per_token=per_token, outlier_threshold=threshold)
  except ValueError as e:
    raise ValueError(f"llm_int8_matmul: {e}") from None
  if act.outlier_threshold is None:
    raise ValueError("llm_int8_matmul: threshold must be a finite float >= 0, got None (use w8a8_matmul)")
  if not isinstance(backend, Backend):
    raise ValueError(f"llm_int8_matmul: backend must be a lowbit_jax.kernels.Backend, got {backend!r}")
  if platform is not None and not isinstance(platform, Platform):
    raise ValueError(f"llm_int8_matmul: platform must be a lowbit_jax.kernels.Platform or None, got {platform!r}")
  why = "no Pallas kernel for LLM.int8()'s mixed-precision decomposition; the jnp reference runs"
  if backend is Backend.PALLAS:
    raise ValueError(f"llm_int8_matmul: Backend.PALLAS requested but the kernel cannot run: {why}")
  reason = "reference requested" if backend is Backend.REFERENCE else why
  common.record(Decision("llm_int8_matmul", Backend.REFERENCE, platform, reason))
  return int8_ref.llm_int8_matmul(x, w, threshold=act.outlier_threshold, per_token=act.per_token)
