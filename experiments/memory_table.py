"""Memory of Llama-2 7B / 13B / 70B in every format, from abstract shapes (nothing is allocated).

    python experiments/memory_table.py

Writes experiments/results/memory_table.md and memory_table.png. Linear kernels (attention, MLP, and the untied
classifier) are quantized; the token embedding and the norm scales stay bf16, as every method in the table does.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

import lowbit_jax as lb
from lowbit_jax.models.llama import Llama, LlamaConfig

# Frozen configuration of this table.
MODELS = {"Llama-2-7B": LlamaConfig.llama2_7b(), "Llama-2-13B": LlamaConfig.llama2_13b(),
          "Llama-2-70B": LlamaConfig.llama2_70b()}
FORMATS = {
    "bf16": None,
    "int8 per-channel": lb.int_spec(8, scale_dtype=jnp.bfloat16),
    "int4 g128": lb.int_spec(4, group_size=128, scale_dtype=jnp.bfloat16),
    "int4 g128 asym": lb.int_spec(4, group_size=128, symmetric=False, scale_dtype=jnp.bfloat16),
    "int3 g128": lb.int_spec(3, group_size=128, scale_dtype=jnp.bfloat16),
    "NF4 + DQ": lb.nf4_spec(),
    "FP8 E4M3": lb.fp8_spec(lb.Format.FP8_E4M3),
    "ternary (b1.58)": lb.ternary_spec(),
}
OUT = pathlib.Path(__file__).resolve().parent / "results"


def abstract_params(config: LlamaConfig):
  """The model's parameter shapes, in bf16, from `jax.eval_shape` of its init: no memory is allocated."""
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda t: Llama(config).init(jax.random.PRNGKey(0), t), tokens)["params"]
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), shapes)


def reports() -> dict[tuple[str, str], lb.MemoryReport]:
  out = {}
  for model, config in MODELS.items():
    params = abstract_params(config)
    for fmt, spec in FORMATS.items():
      tree = params if spec is None else jax.eval_shape(lambda p, spec=spec: lb.rtn(p, None, spec), params)
      out[model, fmt] = lb.memory_report(tree)
  return out


def markdown(reps) -> str:
  lines = ["| model | format | params (B) | GB | GiB | bits/weight | GB per B params | vs bf16 |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  for (model, fmt), r in reps.items():
    lines.append(f"| {model} | {fmt} | {r.total_params / 1e9:.3f} | {r.gb:.2f} | {r.total_bytes / 2**30:.2f} | "
                 f"{r.bits_per_weight:.3f} | {r.gb_per_billion_params:.3f} | {r.compression_vs_bf16:.2f}x |")
  return "\n".join(lines)


def plot(reps, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(9, 4.5))
  width = 0.8 / len(MODELS)
  for j, model in enumerate(MODELS):
    xs = [i + j * width for i in range(len(FORMATS))]
    ax.bar(xs, [reps[model, f].gb for f in FORMATS], width, label=model)
  ax.set_xticks([i + width for i in range(len(FORMATS))], list(FORMATS), rotation=20, ha="right")
  ax.set_ylabel("GB (1e9 bytes)")
  ax.set_yscale("log")
  ax.set_title("Weight memory by format (embeddings and norms in bf16)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  reps = reports()
  table = markdown(reps)
  print(table)
  OUT.mkdir(exist_ok=True)
  (OUT / "memory_table.md").write_text(
      "# Weight memory of Llama-2 shapes by format\n\nComputed by `python experiments/memory_table.py` from "
      "abstract shapes (`jax.eval_shape`); bytes are what a QArray stores: codes (with padding), scales and "
      "zero points. Token embeddings and norms stay bf16.\n\n" + table + "\n")
  plot(reps, OUT / "memory_table.png")
  print(f"\nwrote {OUT / 'memory_table.md'} and {OUT / 'memory_table.png'}")


if __name__ == "__main__":
  main()
