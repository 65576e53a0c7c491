# %% [markdown]
# # GGUF round trip: quantize, export, re-import, compare
#
# A GGUF file is what llama.cpp runs. `lowbit_jax.io.gguf_export.export_gguf` writes a Llama (float or quantized)
# as GGUF v3, and when a `QArray`'s format *is* a ggml block type it writes the QArray's own codes and scales: so
# what GPTQ chose is what llama.cpp runs, not a requantization of it. The block types and their specs:
#
# | ggml type | block (bytes) | lowbit_jax spec (`lb.int_spec(bits, group_size=32, scale_dtype=jnp.float16, grid=...)`) |
# | --- | --- | --- |
# | Q4_0 | 32 4-bit codes + a float16 scale (18) | `lb.q4_0_spec()`: bits 4, `lb.SymGrid.SIGNED_MAX` (-8 * scale = the signed max) |
# | Q8_0 | 32 int8 codes + a float16 scale (34) | `lb.q8_0_spec()`: bits 8, `lb.SymGrid.RESTRICTED` (127 * scale = the absmax) |
#
# `load_gguf` reads Q4_0 / Q8_0 tensors back as packed QArrays holding the file's bytes, so the re-imported model
# runs packed too. Here: stories260K, GPTQ to Q4_0 and RTN to Q8_0, each exported, re-imported and compared with
# the in-memory model it came from. (From a shell, `python -m lowbit_jax.export --model stories260k --method gptq
# --type Q4_0 --out stories260K.Q4_0.gguf` does the same in one command.)

# %% tags=["deterministic"]
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import lowbit_jax as lb
from lowbit_jax import eval as ev
from lowbit_jax.assets import asset_path
from lowbit_jax.io.gguf import load_gguf
from lowbit_jax.io.gguf_export import export_gguf
from lowbit_jax.models.llama import Llama

m = load_gguf(asset_path("stories260K_gguf/stories260K.gguf"))
model = Llama(m.config)
apply = lambda p, tokens: model.apply({"params": p}, tokens)
stories = ev.Segmentation.BOS_PER_BLOCK
train = ev.token_stream(asset_path("tinystories/tinystories_train_first2MiB.txt").read_text()[:100_000], m.tokenizer,
                        stories)
val = ev.token_stream(asset_path("tinystories/tinystories_val_part1.txt").read_text()[:60_000], m.tokenizer, stories)
tokens = jnp.asarray(val[:4 * 256].reshape(4, 256))
calib = lb.calibrate(apply, m.params, ev.sample_windows(train, n=8, length=256, batch=4, seed=0))

Q4_0, Q8_0 = lb.q4_0_spec(), lb.q8_0_spec()
ours = {"Q4_0": lb.gptq(m.params, calib, Q4_0), "Q8_0": lb.rtn(m.params, calib, Q8_0)}
for kind, tree in ours.items():
  print(kind, tree["layers_0"]["attention"]["wq"]["kernel"])      # 64 x 64: 128 blocks of 32

# %% [markdown]
# ## Export
#
# The report lists every tensor's type and where its bytes came from. Two things differ from the in-memory tree,
# both llama.cpp's own rules (`llama-quant.cpp`): the tied embedding (float here) is written as Q8_0 (in a Q4_0
# file as the fallback of Q6_K, whose 256-blocks a 64-wide row cannot fill), and the FFN's down projection, whose
# 172 inputs are not whole blocks of 32, falls back to F16 (its dequantized values, rounded).

# %% tags=["deterministic"]
folder = tempfile.TemporaryDirectory()
reports = {kind: export_gguf(Path(folder.name) / f"stories260K.{kind}.gguf", m.config, tree, m.tokenizer,
                             tensor_type=kind, name=f"stories260K {kind} (lowbit_jax notebook)")
           for kind, tree in ours.items()}
for kind, report in reports.items():
  print(f"{kind}: {report.file_size:,} bytes, {report.linear_bits_per_weight:.3f} bits/weight over the linear "
        f"weights; fallbacks: {', '.join(report.fallbacks)}; requantized: {', '.join(report.requantized) or 'none'}")
print()
table = reports["Q4_0"].table().splitlines()
print("\n".join(table[5:7] + [line for line in table if line.startswith(("| token_embd", "| blk.0."))]))

# %% [markdown]
# ## Re-import and compare
#
# Every projection that maps onto a block comes back decoding to exactly our values (the file holds our codes and
# scales); the logits of the re-imported model, run packed through `lb.quantized(apply)`, differ from the
# in-memory model's only through the two rules above.

# %% tags=["deterministic"]
def flat(tree):
  is_leaf = lambda x: isinstance(x, lb.QArray)
  return {jax.tree_util.keystr(p, simple=True, separator="/"): x
          for p, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}


qapply = jax.jit(lb.quantized(apply))
reference = jax.jit(apply)(m.params, tokens)
rows, identical = {}, {}
for kind, tree in ours.items():
  back = load_gguf(Path(folder.name) / f"stories260K.{kind}.gguf")
  mine, theirs = flat(tree), flat(back.params)
  blocks = [k for k, x in theirs.items() if isinstance(x, lb.QArray) and "embedding" not in k]
  identical[kind] = (len(blocks), all(np.array_equal(theirs[k].dequantize(), mine[k].dequantize()) for k in blocks))
  a, b = qapply(tree, tokens), qapply(back.params, tokens)
  rows[kind] = dict(
      packed=sum(isinstance(x, lb.QArray) for x in theirs.values()),
      delta=float(jnp.max(jnp.abs(a - b)) / jnp.std(a)),
      kl=float(ev.kl_divergence(a, b)), top1=float(ev.top1_agreement(a, b)),
      kl_fp32=float(ev.kl_divergence(reference, a)))
folder.cleanup()

print("| type | tensors re-imported packed | projections equal to ours | max abs logit diff / std | "
      "KL(ours, file) | top-1 agreement | KL(fp32, ours) |\n|---|---:|---:|---:|---:|---:|---:|")
for kind, r in rows.items():
  n, same = identical[kind]
  print(f"| {kind} | {r['packed']} | {n if same else 'NO'} | {r['delta']:.1e} | {r['kl']:.1e} | {r['top1']:.4f} | "
        f"{r['kl_fp32']:.1e} |")

# %% [markdown]
# The file's model is as close to ours as the F16 / Q8_0 rounding allows. At Q4_0 that is far closer than ours is
# to the float model: the quantization that reaches llama.cpp is GPTQ's. At Q8_0 the two are of one order: the
# Q8_0 embedding and the F16 rounding cost a third of what all the int8 projections cost.
#
# ## Checks

# %% tags=["deterministic"]
for kind, r in rows.items():
  n, same = identical[kind]
  assert same and n == 30, (kind, identical)                      # 6 projections x 5 layers; ffn_down is F16
  assert r["packed"] == 31, (kind, r)                             # ... plus the Q8_0 embedding
  down = {f"blk.{i}.ffn_down.weight" for i in range(5)}
  assert reports[kind].requantized == () and down <= set(reports[kind].fallbacks), reports[kind].table()
  assert r["kl"] < 1e-3 and r["top1"] > 0.97, (kind, r)
assert rows["Q4_0"]["kl"] < rows["Q4_0"]["kl_fp32"] / 5, rows
print("checks passed: Q4_0 (GPTQ) and Q8_0 (RTN) exported as their own codes, re-imported packed, logits KL",
      ", ".join(f"{r['kl']:.1e}" for r in rows.values()))
