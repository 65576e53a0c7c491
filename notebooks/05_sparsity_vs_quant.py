# %% [markdown]
# # Sparsity against quantization at equal bytes
#
# Pruning half the weights and quantizing them to half the bits both halve the bytes: which loses less? Here on
# stories260K, with every row's cost counted from what is stored (bits per linear weight):
#
# * dense quantization, round-to-nearest only: int8 per channel, NF4 (double-quantized scales), int4 and int3 in
#   groups of 32;
# * 50 % unstructured pruning, magnitude (`lb.magnitude_prune`) or SparseGPT (`lb.sparsegpt`, Frantar & Alistarh
#   2023: the mask chosen from w² / diag(H⁻¹)², the kept weights updated to absorb the error), kept weights in
#   float16. The library stores these dense; they are placed at the bits of a bitmap format (kept values plus a
#   1-bit mask per weight: 0.5 x 16 + 1 = 9), a formula marked †;
# * SparseGPT 2:4 (2 of every 4 weights along the contraction axis) with its kept values quantized to int4 g32 in
#   the same pass, stored by `lb.compress_24` as `Sparse24`: kept codes and scales plus 2-bit positions (a
#   float16 2:4 row would cost 9 bits/weight, like the 50 % rows).
#
# The full protocol (GPTQ rows, 64 windows, WikiText-2, SmolLM2) is `experiments/sparsity_vs_quant.py`; this is
# its quick version: one calibration (8 x 256 TinyStories training tokens), 16 x 256 validation tokens, and the
# dense rows round-to-nearest only (GPTQ would only widen their lead).

# %% tags=["deterministic"]
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import lowbit_jax as lb
from lowbit_jax import eval as ev
from lowbit_jax.assets import asset_path
from lowbit_jax.io.gguf import load_gguf
from lowbit_jax.models.llama import Llama

m = load_gguf(asset_path("stories260K_gguf/stories260K.gguf"))
model = Llama(m.config)
apply = lambda p, tokens: model.apply({"params": p}, tokens)
stories = ev.Segmentation.BOS_PER_BLOCK
train = ev.token_stream(asset_path("tinystories/tinystories_train_first2MiB.txt").read_text()[:100_000], m.tokenizer,
                        stories)
val = ev.token_stream(asset_path("tinystories/tinystories_val_part1.txt").read_text()[:60_000], m.tokenizer,
                      stories)[:16 * 256]
calib = lb.calibrate(apply, m.params, ev.sample_windows(train, n=8, length=256, batch=4, seed=0))
LINEAR = r"^layers_\d+/.*/kernel$"      # the 35 projections; the embedding (tied head) and norms stay float32
print(calib)

# %% [markdown]
# ## The rows
#
# Every row is evaluated on its float view (`lb.dequantize`: QArrays decoded, Sparse24 densified, cast to float32),
# so one compiled perplexity program serves them all; the packed run of a 2:4 row is checked below.

# %% tags=["deterministic"]
to_f16 = lambda tree: jax.tree_util.tree_map_with_path(
    lambda p, x: x.astype(jnp.float16) if "kernel" in jax.tree_util.keystr(p) else x, tree)
half, two_four, int4 = lb.Sparsity(fraction=0.5), lb.NM(n=2, m=4), lb.int_spec(4, group_size=32)
rows = {  # label: (family, stored tree)
    "fp32": ("float", m.params),
    "float16": ("float", to_f16(m.params)),
    "RTN int8 per-channel": ("dense quant", lb.rtn(m.params, calib, lb.int_spec(8))),
    "RTN int4 g32": ("dense quant", lb.rtn(m.params, calib, int4)),
    "RTN NF4 (DQ)": ("dense quant", lb.rtn(m.params, calib, lb.nf4_spec())),
    "RTN int3 g32": ("dense quant", lb.rtn(m.params, calib, lb.int_spec(3, group_size=32))),
    "magnitude 50 % fp16 †": ("sparse", to_f16(lb.magnitude_prune(m.params, calib, half))),
    "SparseGPT 50 % fp16 †": ("sparse", to_f16(lb.sparsegpt(m.params, calib, half))),
    "SparseGPT 2:4 + int4 g32": ("sparse", lb.compress_24(lb.sparsegpt(m.params, calib, two_four, spec=int4),
                                                           where=LINEAR)),
}


def linear_bits(label, tree) -> float:
  """Bits per linear weight: stored bytes, or for the † rows the bitmap formula (kept values + 1-bit mask)."""
  leaves = [leaf for leaf in lb.memory_report(tree).leaves if "kernel" in leaf.path]
  n = sum(leaf.params for leaf in leaves)
  if "†" not in label:
    return 8 * sum(leaf.nbytes for leaf in leaves) / n
  kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(tree) if "kernel" in jax.tree_util.keystr(p)]
  nnz = sum(int(jnp.count_nonzero(x)) for x in kernels)
  return (16 * nnz + n) / n


as_f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), lb.dequantize(tree))
results = {label: (family, linear_bits(label, tree),
                   ev.perplexity(apply, as_f32(tree), val, seq_len=256, batch_size=8, progress=False).ppl)
           for label, (family, tree) in rows.items()}
print("| row | family | bits/weight (linear) | ppl TinyStories val |\n| --- | --- | ---: | ---: |")
for label, (family, bits, ppl) in results.items():
  print(f"| {label} | {family} | {bits:.3f} | {ppl:.3f} |")

# %% [markdown]
# ## The Pareto front, and the winner per budget
#
# A row is on the front when no other row has fewer (or equal) bits and a lower perplexity; the cheapest row is on
# it by default. Per budget, the row of lowest perplexity at or below it, and the best sparse row there.

# %% tags=["deterministic"]
def pareto_front(points: dict) -> list:
  front, best = [], np.inf
  for label, (_, bits, ppl) in sorted(points.items(), key=lambda kv: (kv[1][1], kv[1][2])):
    if ppl < best:
      front.append(label)
      best = ppl
  return front


def best_within(budget: float, family: str | None = None) -> str:
  ok = [label for label, (f, bits, _) in results.items() if bits <= budget and family in (None, f)]
  return min(ok, key=lambda label: results[label][2])


front = pareto_front(results)
print("front, by increasing bits:", " -> ".join(front))
BUDGETS = (9.25, 6.0, 4.5)
print("\n| budget (bits/weight) | best row | best sparse row |\n| --- | --- | --- |")
for budget in BUDGETS:
  best, sparse = best_within(budget), best_within(budget, "sparse")
  print(f"| {budget} | {best} ({results[best][2]:.3f}) | {sparse} ({results[sparse][2]:.3f}) |")

# %%
from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

fig, ax = plt.subplots(figsize=(6.5, 4))
below = {"RTN NF4 (DQ)", "RTN int8 per-channel", "fp32", "float16"}       # labels under their points
for family, marker in (("float", "D"), ("dense quant", "o"), ("sparse", "^")):
  pts = [(b, p, label) for label, (f, b, p) in results.items() if f == family]
  ax.scatter([b for b, _, _ in pts], [p for _, p, _ in pts], marker=marker, label=family, s=40)
  for b, p, label in pts:
    ax.annotate(label, (b, p), fontsize=6.5, xytext=(4, -9 if label in below else 3), textcoords="offset points")
fb = [(results[label][1], results[label][2]) for label in front]
ax.step([b for b, _ in fb], [p for _, p in fb], where="post", color="gray", lw=1, ls="--", label="Pareto front")
ax.set(xscale="log", yscale="log", xlabel="bits per linear weight (stored; † bitmap formula)",
       ylabel="perplexity, TinyStories val", title="stories260K: sparsity vs quantization")
for axis, ticks in ((ax.xaxis, [4, 5, 6, 8, 9, 12, 16, 24, 32]), (ax.yaxis, [4, 5, 7, 10, 15, 20, 30])):
  axis.set_major_locator(FixedLocator(ticks))
  axis.set_major_formatter(ScalarFormatter())
  axis.set_minor_locator(NullLocator())
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## A 2:4 row runs packed
#
# `Sparse24` leaves run through `lb.quantized(apply)` like QArrays: tile by tile, the kept values (here int4
# codes) and their 2-bit positions decoded inside the matmul. The run report (an abstract trace) says so:

# %% tags=["deterministic"]
tokens = jnp.asarray(val[:2 * 256].reshape(2, 256))
report = lb.quantized(apply).report(rows["SparseGPT 2:4 + int4 g32"][1], tokens)
print("\n".join(str(report).splitlines()[:6]))

# %% [markdown]
# ## Checks
#
# SparseGPT beats magnitude pruning at 50 %; dense quantization wins at every budget (int8 against
# 50 % float16 at about 9 bits, int3 against 2:4 + int4 at 4.5) and the front holds no sparse row above the
# cheapest point; the 2:4 row runs packed.

# %% tags=["deterministic"]
ppl = {label: p for label, (_, _, p) in results.items()}
assert ppl["SparseGPT 50 % fp16 †"] < ppl["magnitude 50 % fp16 †"], ppl
assert all(results[best_within(budget)][0] == "dense quant" for budget in BUDGETS), results
assert all(results[label][0] != "sparse" for label in front[1:]), front
assert results["SparseGPT 50 % fp16 †"][1] == 9.0 and results["SparseGPT 2:4 + int4 g32"][1] < 4.5, results
assert not report.dequantized and not report.unused and len(report.weights) == 35, report
print(f"checks passed: SparseGPT 50 % {ppl['SparseGPT 50 % fp16 †']:.3f} < magnitude "
      f"{ppl['magnitude 50 % fp16 †']:.3f}; dense wins at {', '.join(map(str, BUDGETS))} bits; "
      "2:4 + int4 runs packed")
