"""lowbit_jax: low-bit LLM quantization as functional transforms over JAX parameter pytrees and jaxprs.

    calib = lowbit_jax.calibrate(apply_fn, params, batches)      # statistics of every weight the function contracts
    qparams = lowbit_jax.gptq(params, calib)                     # int4, group 128; or rtn / awq / ... (ALGORITHMS)
    logits = lowbit_jax.quantized(apply_fn)(qparams, tokens)     # the unmodified model on packed weights
    print(lowbit_jax.quantized(apply_fn).report(qparams, tokens))   # what runs packed, per weight
    print(lowbit_jax.memory_report(qparams))
"""
from lowbit_jax.checks import ApplyFnError, DegenerateStatisticsWarning
from lowbit_jax.memory import MemoryReport, memory_report
from lowbit_jax.qarray import QArray, dequantize, qarray_sharding, quantize
from lowbit_jax.rtn import rtn
from lowbit_jax.spec import (DEFAULT_SYM_GRID, ActQuant, ClipSearch, Format, PerChannel, PerGroup, PerTensor,
                             QuantSpec, SymGrid, ZeroPoint, fp8_spec, int_spec, nf4_spec, q4_0_spec, q4_1_spec, q8_0_spec,
                             ternary_spec)
from lowbit_jax.passes import Calibration, Objective, Stat, analyze, calibrate, quantized, streamed  # noqa: E402  (after the core)
from lowbit_jax.algorithms.awq import awq  # noqa: E402
from lowbit_jax.algorithms.gptq import gptq  # noqa: E402
from lowbit_jax.algorithms.llm_int8 import OutlierReport, llm_int8, llm_int8_spec, outlier_report  # noqa: E402
from lowbit_jax.algorithms.smoothquant import W8A8_SPEC, smoothquant  # noqa: E402
from lowbit_jax.algorithms.registry import ALGORITHMS, PRUNERS  # noqa: E402
from lowbit_jax.algorithms.sparsity import NM, Scope, Sparsity  # noqa: E402
from lowbit_jax.algorithms.magnitude import magnitude_prune  # noqa: E402
from lowbit_jax.algorithms.sparsegpt import sparsegpt  # noqa: E402
from lowbit_jax.sparse import Sparse24, compress_24  # noqa: E402
from lowbit_jax.allocate import Allocation, Sensitivity, allocate  # noqa: E402
from lowbit_jax import checkpoint  # noqa: E402  (save / restore; orbax is imported on first use)
from lowbit_jax.qat import QATFn, qat  # noqa: E402
from lowbit_jax.lora import Adapter, LoraFn, LoraOptions, lora, merge  # noqa: E402
from lowbit_jax.finite import check_finite, skip_nonfinite  # noqa: E402
from lowbit_jax.qat import Ste  # noqa: E402
from lowbit_jax.bitnet import bitnet, bitnet_spec  # noqa: E402
from lowbit_jax.fp8_training import Fp8Fn, Fp8Meta, Fp8Options, fp8_training, fp8_value_and_grad  # noqa: E402

__all__ = [
    "Format", "PerChannel", "PerGroup", "PerTensor", "QuantSpec", "int_spec", "nf4_spec", "fp8_spec",
    "ternary_spec", "q4_0_spec", "q4_1_spec", "q8_0_spec", "SymGrid", "ZeroPoint", "ClipSearch", "DEFAULT_SYM_GRID", "QArray", "quantize",
    "dequantize", "qarray_sharding", "rtn", "memory_report", "MemoryReport",
    "calibrate", "Calibration", "Stat", "analyze", "quantized", "streamed", "Objective", "gptq", "awq",
    "smoothquant", "llm_int8", "outlier_report", "OutlierReport", "ActQuant", "llm_int8_spec", "W8A8_SPEC",
    "ALGORITHMS", "allocate", "Allocation", "Sensitivity", "DegenerateStatisticsWarning", "ApplyFnError",
    "qat", "QATFn", "lora", "LoraFn", "LoraOptions", "Adapter", "merge", "check_finite", "skip_nonfinite",
    "PRUNERS", "Sparsity", "NM", "Scope", "magnitude_prune", "sparsegpt", "Sparse24", "compress_24",
    "Ste", "bitnet", "bitnet_spec", "fp8_training", "fp8_value_and_grad", "Fp8Fn", "Fp8Meta", "Fp8Options",
]
