"""w8a8: 8-bit weights times 8-bit activations. `reference.py` is the spec.

One folder for INT8 x INT8 -> int32 (SmoothQuant, LLM.int8()'s int8 path) and FP8 x FP8 -> f32 (E4M3): both
quantize the activations dynamically (a scale per token or per tensor), feed two 8-bit operands to the matrix
units and apply the row (activation) and column (weight) scales to the accumulator, so one kernel body serves
both; only the code dtypes and the accumulator differ. Weight-only formats live in `kernels/qmatmul/`.
`llm_int8.py` is the spec of LLM.int8()'s mixed-precision decomposition (float outlier columns + this int8 path);
it has no Pallas kernel yet.
"""
