"""Kernels over QArrays: dispatchers that use a Pallas kernel when it is legal and fall back to the reference.

    kernels.qmatmul(x, w)        weight-only: x (..., K) float @ QArray (K, N)   (kernels/qmatmul/)
    kernels.w8a8_matmul(x, w)    8-bit activations x 8-bit weights, int8 or FP8  (kernels/w8a8/)

Each op lives in `kernels/<op>/` with `reference.py` (the spec, pure jnp), `pallas_gpu.py` (Pallas Triton) and
`pallas_tpu.py` (Pallas Mosaic TPU); `blocks.py` holds the tiling, `dispatch.py` the selection rules. Every kernel
equals its reference on random inputs (tests/test_kernels_*.py, interpret mode) and lowers for CUDA and TPU.
`last_decision()` says which implementation the latest call used and why.
"""
from __future__ import annotations

from lowbit_jax.kernels.blocks import BlockSizes
from lowbit_jax.kernels.common import (Backend, Decision, Platform, clear_decisions, decisions, last_decision)
from lowbit_jax.kernels.dispatch import llm_int8_matmul, qmatmul, w8a8_matmul

__all__ = ["Backend", "Platform", "BlockSizes", "Decision", "qmatmul", "w8a8_matmul", "llm_int8_matmul", "last_decision",
           "decisions", "clear_decisions"]
