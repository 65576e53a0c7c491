"""BitNet b1.58 training: ternary absmean weights and per-token absmax int8 activations in the forward pass, with
the straight-through estimator (Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58
Bits", eq. 1-3; the recipe of Wang et al. 2023, "BitNet: Scaling 1-bit Transformers for Large Language Models", and
of the authors' "Training Tips, Code and FAQ").

    train_apply = lowbit_jax.bitnet(apply_fn)               # = qat(apply_fn, bitnet_spec(), ste=Ste.IDENTITY)
    loss = lambda p, x, y: xent(train_apply(p, x), y)       # any optax loop, under jit
    qparams = lowbit_jax.rtn(params, train_apply.analysis(params, x), bitnet_spec())   # packed 2-bit ternary
    logits = lowbit_jax.quantized(apply_fn)(qparams, x)     # == train_apply(params, x) (f32 rounding)

What is simulated, per selected weight W (every float weight the function contracts, or `where`):
  * weights: ``gamma = mean|W|`` over the tensor (`PerTensor`: one gamma per tensor, per layer of a scanned stack),
    ``W~ = RoundClip(W / gamma, -1, 1)``, the forward pass sees ``gamma * W~`` (`Format.TERNARY`,
    `formats/ternary.py`). The paper's ``gamma + eps`` is replaced by gamma = 1 for an all-zero tensor.
  * activations: at every dot site of W, x is quantized per token (each row of the contraction) to int8 with the
    absmax scale ``absmax / 127``, codes clipped to [-127, 127] and dequantized (`passes/fakequant.py`; the
    reference's ``127 / absmax``, clamp to [-128, 127]: the same values, -128 is never reached).
  * gradients: straight-through everywhere (`Ste.IDENTITY`, the reference's ``w + (quant(w) - w).detach()``), for
    weights and activations; the latent weights stay float32 and the optimizer updates them.

Deviations from the paper:
  * SubLN: BitNet normalises the input of *every* quantized linear (an extra RMSNorm before each BitLinear,
    including the attention output and FFN down projections). This transform does not edit the model: the
    reference Llama (`lowbit_jax.models.llama`) has RMSNorm before attention (q/k/v) and before the FFN (gate/up)
    only, so `wo` and `w2` see un-normalised activations. The per-token absmax scale makes int8 quantization
    scale-free, so the missing norms change the optimisation, not what is representable.
  * The classifier/embedding: BitNet keeps them in high precision. With `where=None` every contracted weight is
    selected, including an untied `output` head; pass `where` to keep it float (the experiments keep the head
    float and the embedding, a lookup, is never quantized).
  * Schedules: the paper's two-stage learning rate and weight-decay schedule is the caller's (any optax schedule).
"""
from __future__ import annotations

from typing import Callable

from lowbit_jax import select as sel
from lowbit_jax.checks import as_bool
from lowbit_jax.qat import QATFn, Ste, qat
from lowbit_jax.spec import ActQuant, Format, PerChannel, PerTensor, QuantSpec


def bitnet_spec(*, per_channel: bool = False, per_token: bool = True, axis: int = -2) -> QuantSpec:
  """W1.58A8: ternary absmean weights (per tensor as in the paper, or per output channel) with dynamic int8
  activations (per token as in the paper, or per tensor). `quantized(apply_fn)` runs it as
  `kernels.w8a8_matmul`: int8 x ternary codes, exact int32 partial sums."""
  as_bool(per_channel, "bitnet_spec: per_channel")
  as_bool(per_token, "bitnet_spec: per_token")
  gran = PerChannel(axis=axis) if per_channel else PerTensor(axis=axis)
  return QuantSpec(format=Format.TERNARY, granularity=gran, activations=ActQuant(bits=8, per_token=per_token))


def bitnet(apply_fn: Callable, spec: QuantSpec | None = None, *, where: sel.Where = None) -> QATFn:
  """BitNet b1.58 training of `apply_fn` (module docstring): `qat` with the plain straight-through estimator.

  Args:
    apply_fn: the unmodified model function.
    spec: a ternary `QuantSpec` (default `bitnet_spec()`); its `activations` may be None (W1.58A16).
    where: which weights (as `qat`).

  Returns:
    A `QATFn`: call it like apply_fn; `.analysis(params, *args)` feeds `lowbit_jax.rtn` for the conversion.

  Raises:
    ValueError: `spec` is not a ternary QuantSpec (naming `spec`), or as `qat`.
  """
  spec = bitnet_spec() if spec is None else spec
  if not isinstance(spec, QuantSpec) or spec.format is not Format.TERNARY:
    raise ValueError(f"bitnet: spec must be a ternary lowbit_jax.QuantSpec (bitnet_spec() or ternary_spec()), "
                     f"got {spec!r}")
  return qat(apply_fn, spec, where=where, ste=Ste.IDENTITY)


__all__ = ["bitnet", "bitnet_spec"]
