# %% [markdown]
# # Low bit during training: QAT against PTQ, and QLoRA on a packed NF4 base
#
# Two ways of training with quantized weights, each a function transform of the unmodified apply function, trained
# with optax under `jit`:
#
# * **QAT** (`lb.qat(apply, spec)`): the forward pass sees every selected weight fake-quantized to `spec`; the
#   gradient passes straight through inside the representable range (and is zero outside it). After training,
#   `lb.rtn(params, qat.analysis(params, x), spec)` stores exactly the codes the training forward saw. Compared
#   here with post-training round-to-nearest at 3 bits per channel, where PTQ loses most.
# * **QLoRA** (`lb.lora(apply, options)`): low-rank adapters added at every dot site of a frozen base whose weights
#   stay packed NF4 with double-quantized scales (never decoded whole: the packed matmul has its own VJP). Here it
#   adapts stories260K, trained only on TinyStories, to WikiText-2.
#
# The model is stories260K with its layers stacked for `nn.scan` (one compiled layer body); everything is seeded.

# %% tags=["deterministic"]
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import lowbit_jax as lb
from lowbit_jax import eval as ev
from lowbit_jax.assets import asset_path
from lowbit_jax.io.gguf import load_gguf
from lowbit_jax.models.llama import Llama, stack_layers

m = load_gguf(asset_path("stories260K_gguf/stories260K.gguf"))
model = Llama(m.config, scan_layers=True)
params = stack_layers(m.params, m.config.n_layers)      # layers_0..4 -> layers, leading axis 5
apply = lambda p, tokens: model.apply({"params": p}, tokens)

STEPS, BATCH, LEN = 20, 8, 128


def tokens(asset, chars, segmentation):
  return ev.token_stream(asset_path(asset).read_text()[:chars], m.tokenizer, segmentation)


def train_windows(stream, seed):
  """(STEPS, BATCH, LEN + 1): one fresh batch of random windows per step."""
  return jnp.stack(ev.sample_windows(stream, n=STEPS * BATCH, length=LEN + 1, batch=BATCH, seed=seed))


def first_windows(stream):
  return jnp.asarray(stream[:16 * LEN].reshape(16, LEN))     # evaluation: the first 16 windows


stories = ev.Segmentation.BOS_PER_BLOCK
ts_train = train_windows(tokens("tinystories/tinystories_train_first2MiB.txt", 300_000, stories), seed=1)
ts_val = first_windows(tokens("tinystories/tinystories_val_part1.txt", 60_000, stories))
wiki = ev.Segmentation.ONE_DOCUMENT
wt_train = train_windows(tokens("wikitext2_raw/wiki.valid.raw", 200_000, wiki), seed=2)
wt_test = first_windows(tokens("wikitext2_raw/wiki.test.raw", 40_000, wiki))


def xent(logits, t):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], t[:, 1:]))


loss_on = jax.jit(lambda fn, p, t: xent(fn(p, t), t), static_argnums=0)   # mean next-token loss, nats


def fit(loss, p0, data, lr, heldout, every=5):
  """Adam on `loss(p, batch)` over data (STEPS, ...), `every` steps per jitted lax.scan; returns (params, the
  held-out loss after each chunk of steps)."""
  opt = optax.adam(lr)

  def step(carry, batch):
    p, state = carry
    updates, state = opt.update(jax.grad(loss)(p, batch), state, p)
    return (optax.apply_updates(p, updates), state), None

  @jax.jit
  def chunk(carry, batches):
    carry, _ = jax.lax.scan(step, carry, batches)
    return carry, loss(carry[0], heldout)

  carry, curve = (p0, opt.init(p0)), []
  for i in range(0, STEPS, every):
    carry, value = chunk(carry, data[i:i + every])
    curve.append(float(value))
  return carry[0], np.asarray(curve)


print(f"fp32 TinyStories val loss {float(loss_on(apply, params, ts_val)):.4f} nats")

# %% [markdown]
# ## QAT against PTQ at 3 bits per channel
#
# `lb.int_spec(3)`: one float32 scale per output channel, 8 levels (signed-max grid). PTQ rounds the pretrained
# weights; QAT starts from them and takes 20 Adam steps (8 x 128 TinyStories training tokens each, lr 3e-4) with
# the quantizer in the loop, then converts. Both are evaluated packed, through `lb.quantized(apply)`.

# %% tags=["deterministic"]
spec = lb.int_spec(3)
qapply = lb.quantized(apply)
analysis = lb.analyze(apply, params, ts_val[:2])
ptq = lb.rtn(params, analysis, spec)

results = {"fp32": float(loss_on(apply, params, ts_val)),
           "RTN w3 per-channel (PTQ)": float(loss_on(qapply, ptq, ts_val))}

qat = lb.qat(apply, spec)
trained, qat_curve = fit(lambda p, t: xent(qat(p, t), t), params, ts_train, 3e-4, ts_val)
converted = lb.rtn(trained, qat.analysis(trained, ts_val[:2]), spec)
results["QAT w3 per-channel, converted"] = float(loss_on(qapply, converted, ts_val))
print("| model | TinyStories val loss (nats) | ppl |\n| --- | ---: | ---: |")
for label, value in results.items():
  print(f"| {label} | {value:.4f} | {np.exp(value):.3f} |")

# %% [markdown]
# ## QLoRA: adapting a packed NF4 base to a new domain
#
# stories260K knows only TinyStories; on WikiText-2 its perplexity is above 100. The base is quantized once to NF4
# (blocks of 64, double-quantized scales) and frozen; rank-8 adapters (A random, B = 0, so training starts at the
# base model) are trained for 20 Adam steps on WikiText-2 *validation* text and evaluated on WikiText-2 *test*.

# %% tags=["deterministic"]
base = lb.rtn(params, analysis, lb.nf4_spec())
before = jax.tree.map(np.array, base)                       # a host copy, to show the base never changes
lora = lb.lora(apply, lb.LoraOptions(rank=8, alpha=16.0))
adapters0 = lora.init(jax.random.key(0), base, analysis)
lora_eval = lambda pa, t: lora(pa[0], pa[1], t, train=False)

adapters, lora_curve = fit(lambda a, t: xent(lora(base, a, t), t), adapters0, wt_train, 3e-3, wt_test)
qlora = {name: (float(loss_on(lora_eval, (base, adapters0), data)), float(loss_on(lora_eval, (base, adapters), data)))
         for name, data in (("WikiText-2 test", wt_test), ("TinyStories val", ts_val))}
print("| eval set | NF4 base (nats) | + QLoRA adapters (nats) |\n| --- | ---: | ---: |")
for name, (b, a) in qlora.items():
  print(f"| {name} | {b:.4f} | {a:.4f} |")

# %% [markdown]
# The adapters buy WikiText-2 with TinyStories: 20 steps on one domain make the model worse on the other, as any
# fine-tune without a replay of the old data would.
#
# What the QLoRA state costs: the base at its packed NF4 bytes, the adapters (and Adam's moments, not shown) in
# float32. The LoRA function runs the base's dots as `lb.quantized(apply)` does (plus the low-rank terms), whose
# run report says they stay packed.

# %% tags=["deterministic"]
base_mem, adapter_mem = lb.memory_report(base), lb.memory_report(adapters)
nf4_leaves = [leaf for leaf in base_mem.leaves if leaf.kind.startswith("NF4")]
print(f"base: {base_mem.summary()}")
print(f"  {len(nf4_leaves)} stacked linear weights stored as {nf4_leaves[0].kind}")
print(f"adapters: {adapter_mem.total_params:,} float32 parameters, {adapter_mem.total_bytes:,} bytes")
unchanged = all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(base)))
print("base unchanged by training:", unchanged)
base_run = qapply.report(base, ts_val[:2])
print(str(base_run).splitlines()[0])

# %% [markdown]
# The held-out loss along training, every 5 steps from the starting model (PTQ's codes: QAT's forward is the
# converted model's; the NF4 base with B = 0):

# %%
steps = np.arange(0, STEPS + 1, 5)
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
axes[0].plot(steps, [results["RTN w3 per-channel (PTQ)"], *qat_curve], marker="o", label="QAT w3 per-channel")
axes[0].axhline(results["fp32"], color="gray", ls="--", label="fp32")
axes[0].set(title="QAT from the pretrained weights", xlabel="Adam step", ylabel="TinyStories val loss (nats)")
axes[1].plot(steps, [qlora["WikiText-2 test"][0], *lora_curve], marker="o", color="C1", label="NF4 base + QLoRA r=8")
axes[1].set(title="QLoRA on WikiText-2", xlabel="Adam step", ylabel="WikiText-2 test loss (nats)")
for ax in axes:
  ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Checks
#
# QAT's converted model beats round-to-nearest PTQ at the same 3-bit format; QLoRA lowers the held-out WikiText-2
# loss by more than 0.5 nats while the NF4 base stays packed and bit-for-bit unchanged.

# %% tags=["deterministic"]
assert results["QAT w3 per-channel, converted"] < results["RTN w3 per-channel (PTQ)"] - 0.1, results
b, a = qlora["WikiText-2 test"]
assert a < b - 0.5, qlora
assert unchanged and len(nf4_leaves) == len(analysis.selected) == 7, (analysis, base_mem)
assert all("+DQ" in leaf.kind for leaf in nf4_leaves) and not base_run.dequantized, (base_mem, base_run)
print(f"checks passed: QAT {results['QAT w3 per-channel, converted']:.4f} < PTQ "
      f"{results['RTN w3 per-channel (PTQ)']:.4f} nats; QLoRA WikiText-2 {b:.4f} -> {a:.4f} nats on a frozen NF4 base")
