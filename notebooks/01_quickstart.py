# %% [markdown]
# # Quickstart: calibrate, quantize, run packed, measure
#
# The whole `lowbit_jax` loop on a real pretrained model, the 260K-parameter stories260K Llama (dim 64, 5 layers,
# GQA 8/4 heads, vocabulary 512, trained on TinyStories):
#
# 1. `lb.calibrate(apply, params, batches)` traces the unmodified apply function once and collects, for every
#    weight it contracts against an activation, the statistics the quantizers need (XᵀX, absmax, mean |x|);
# 2. `lb.rtn` / `lb.gptq` turn the float tree into a tree whose linear weights are packed `QArray`s;
# 3. `lb.quantized(apply)` runs the same apply function on the packed tree (every dot on packed codes);
# 4. `lb.memory_report` counts what is stored, `lb.quantized(apply).report` says what runs packed, and
#    `lowbit_jax.eval.perplexity` measures what it cost.
#
# Everything here is seeded; the cells tagged `deterministic` print the same numbers on every run.

# %% tags=["deterministic"]
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt

import lowbit_jax as lb
from lowbit_jax import eval as ev
from lowbit_jax.assets import asset_path
from lowbit_jax.io.gguf import load_gguf
from lowbit_jax.models.llama import Llama

m = load_gguf(asset_path("stories260K_gguf/stories260K.gguf"))     # config, float32 params, tokenizer
model = Llama(m.config)
apply = lambda p, tokens: model.apply({"params": p}, tokens)        # any Flax apply function works
print(m.config)

# %% [markdown]
# ## Data
#
# Calibration reads 8 windows of 256 tokens from the TinyStories *training* text; perplexity is measured on 16
# windows of 256 tokens of the *validation* text (never calibrated on). Both are tokenized as llama2.c
# pretokenized TinyStories: a BOS before every story.

# %% tags=["deterministic"]
train_text = asset_path("tinystories/tinystories_train_first2MiB.txt").read_text()[:100_000]
val_text = asset_path("tinystories/tinystories_val_part1.txt").read_text()[:60_000]
train = ev.token_stream(train_text, m.tokenizer, ev.Segmentation.BOS_PER_BLOCK)
val = ev.token_stream(val_text, m.tokenizer, ev.Segmentation.BOS_PER_BLOCK)[:16 * 256]
batches = ev.sample_windows(train, n=8, length=256, batch=4, seed=0)   # 2 batches of (4, 256)

calib = lb.calibrate(apply, m.params, batches)
print(calib)

# %% [markdown]
# ## RTN against GPTQ at the same format
#
# Round-to-nearest quantizes every weight on its own; GPTQ (Frantar et al. 2022) quantizes one input row at a time
# and spreads each row's rounding error over the rows not yet quantized, weighted by the calibration statistics
# XᵀX. Both store the same format: 4-bit symmetric integers in groups of 32 along the contraction axis, one float32
# scale per group. The FFN's down projection contracts 172 inputs, padded to 6 whole groups (the padding is stored
# and counted).

# %% tags=["deterministic"]
spec = lb.int_spec(4, group_size=32)
rtn = lb.rtn(m.params, calib, spec)
gptq = lb.gptq(m.params, calib, spec)     # act-order with static groups, the default

qapply = lb.quantized(apply)      # one object: perplexity jits it once per tree structure
ppl = lambda fn, p: ev.perplexity(fn, p, val, seq_len=256, batch_size=8, progress=False).ppl


def linear_bits(tree) -> float:
  """Stored bits per weight over the quantized (linear) weights: codes, padding and scales."""
  packed = [leaf for leaf in lb.memory_report(tree).leaves if not leaf.kind.startswith("float")]
  return 8 * sum(leaf.nbytes for leaf in packed) / sum(leaf.params for leaf in packed)


rows = {"fp32": (32.0, ppl(apply, m.params)), "RTN w4 g32": (linear_bits(rtn), ppl(qapply, rtn)),
        "GPTQ w4 g32": (linear_bits(gptq), ppl(qapply, gptq))}
print("| model | bits/weight (linear) | ppl TinyStories val |\n| --- | ---: | ---: |")
for label, (b, p) in rows.items():
  print(f"| {label} | {b:.3f} | {p:.4f} |")

# %% [markdown]
# Where does GPTQ's gain come from? Per weight, the output error it leaves on the calibration activations,
# tr(ΔWᵀ XᵀX ΔW) relative to the output energy tr(Wᵀ XᵀX W), against round-to-nearest's:

# %% tags=["deterministic"]
def output_error(tree) -> dict:
  errors = {}
  for path, q in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, lb.QArray)):
    if isinstance(q, lb.QArray):
      name = jax.tree_util.keystr(path, simple=True, separator="/")
      w = m.params
      for key in name.split("/"):
        w = w[key]
      xtx, dw = calib[name].xtx, q.dequantize() - w
      errors[name] = float(jnp.trace(dw.T @ xtx @ dw) / jnp.trace(w.T @ xtx @ w))
  return errors


err_rtn, err_gptq = output_error(rtn), output_error(gptq)
wins = sum(err_gptq[k] < err_rtn[k] for k in err_rtn)
print(f"GPTQ leaves less output error than RTN on {wins} of {len(err_rtn)} weights; "
      f"mean relative error {sum(err_gptq.values()) / len(err_gptq):.5f} vs {sum(err_rtn.values()) / len(err_rtn):.5f}")

# %%
fig, ax = plt.subplots(figsize=(4.5, 4.5))
kinds = sorted({k.split("/")[-2] for k in err_rtn})
for kind in kinds:
  keys = [k for k in err_rtn if k.split("/")[-2] == kind]
  ax.scatter([err_rtn[k] for k in keys], [err_gptq[k] for k in keys], label=kind, s=18)
lo, hi = min(err_gptq.values()) / 1.5, max(err_rtn.values()) * 1.5
ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--")
ax.set(xscale="log", yscale="log", xlabel="RTN relative output error", ylabel="GPTQ relative output error",
       title="stories260K, int4 g32: one point per weight")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## What is stored, and what runs
#
# `memory_report` counts the bytes of every leaf (codes with their padding, scales; the embedding and the norms stay
# float32 here). The run report traces `qapply` abstractly and says, per quantized weight, what runs at each of
# its uses: a Pallas kernel, the tiled reference (decodes one K tile at a time: no float copy of the weight) or a
# dequantized float copy (which would also warn). The packed run equals the float model evaluated on the
# dequantized weights up to float rounding (notebook 02 measures it).

# %% tags=["deterministic"]
qparams = gptq
tokens = jnp.asarray(val[:2 * 256].reshape(2, 256))
print(lb.memory_report(qparams).summary())
report = qapply.report(qparams, tokens)
print(str(report).splitlines()[0])
print("\n".join(report.table().splitlines()[:5]))

w, w_float = qparams["layers_0"]["attention"]["wq"]["kernel"], m.params["layers_0"]["attention"]["wq"]["kernel"]
print(w)      # a QArray: packed codes + scales
print(f"max |dequantized - float| = {float(jnp.max(jnp.abs(w.dequantize() - w_float))):.4f}, "
      f"max |float| = {float(jnp.max(jnp.abs(w_float))):.4f}")

# %% [markdown]
# ## Checks
#
# GPTQ must beat round-to-nearest in perplexity and in output error (summed, and on at least 30 of the 35
# weights) and stay above the float model; w4 g32 must cost between 5 bits/weight (4-bit codes + a 32-bit scale
# per 32 weights) and 5.25 (plus the padding of the 172-wide FFN input); every quantized weight must run packed.

# %% tags=["deterministic"]
assert rows["fp32"][1] < rows["GPTQ w4 g32"][1] < rows["RTN w4 g32"][1], rows
assert sum(err_gptq.values()) < sum(err_rtn.values()) and wins >= 30, (err_gptq, err_rtn)
assert 5.0 < rows["GPTQ w4 g32"][0] == rows["RTN w4 g32"][0] < 5.25, rows
assert len(report.weights) == 35 and not report.dequantized and not report.unused, report
print("checks passed: GPTQ", f'{rows["GPTQ w4 g32"][1]:.4f}', "< RTN", f'{rows["RTN w4 g32"][1]:.4f}',
      "at", f'{rows["GPTQ w4 g32"][0]:.3f}', "bits/weight; 35 weights packed")
