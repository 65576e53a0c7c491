"""lowbit_jax: low-bit LLM quantization as functional transforms over JAX parameter pytrees and jaxprs.

    qparams = lowbit_jax.rtn(params, lowbit_jax.int_spec(4, group_size=128))
    print(lowbit_jax.memory_report(qparams))
"""
from lowbit_jax.memory import MemoryReport, memory_report
from lowbit_jax.qarray import QArray, qarray_sharding, quantize
from lowbit_jax.rtn import rtn
from lowbit_jax.spec import (Format, PerChannel, PerGroup, PerTensor, QuantSpec, fp8_spec, int_spec, nf4_spec,
                             ternary_spec)

__all__ = [
    "Format", "PerChannel", "PerGroup", "PerTensor", "QuantSpec", "int_spec", "nf4_spec", "fp8_spec",
    "ternary_spec", "QArray", "quantize", "qarray_sharding", "rtn", "memory_report", "MemoryReport",
]
