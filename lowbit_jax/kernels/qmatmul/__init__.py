"""qmatmul: float activations times a packed low-bit weight (weight-only quantization). `reference.py` is the spec.

One folder for every weight-only format (W8A16, W4A16, W2A16, ternary, NF4, FP8 weights): they share the kernel
structure (read packed bytes, split them into the split-chunk fields, decode in registers/VMEM, dot with the
matching activation chunk, scale per group) and differ only in the decode of a field (`kernels.common`).
`plan.py` decides legality and tiling once for both kernel families; `pallas_gpu.py` (Triton) and
`pallas_tpu.py` (Mosaic TPU) hold the kernels.
"""
