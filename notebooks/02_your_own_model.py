# %% [markdown]
# # Your own model, quantized with no edits
#
# `lowbit_jax` never asks a model to use its layers: it traces the apply function to a jaxpr, follows every weight
# leaf through its views (transposes, reshapes, the slicing a scan does to stacked layers) to the `dot_general`
# that contracts it with an activation, and quantizes the weight along exactly the axes that dot contracts. The same
# pass then runs the unmodified function on the packed weights.
#
# Here that is shown on a model written in this notebook: a small Flax linen decoder with `DenseGeneral`
# projections to and from `(heads, head_dim)`, einsum attention, a SwiGLU MLP and its layers stacked by `nn.scan`
# over `nn.remat`, then on an NNX module. Byte-level TinyStories text feeds it (weights random: the point is the
# plumbing, not the model's quality).

# %% tags=["deterministic"]
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lowbit_jax as lb
from lowbit_jax.assets import asset_path

V, D, H, K, F, L = 256, 64, 4, 16, 128, 3          # bytes, width, heads, head dim, MLP width, layers


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, mask):                                           # (B, T, D), (T, T)
    h = nn.RMSNorm(name="attn_norm")(x)
    q, k, v = (nn.DenseGeneral((H, K), use_bias=False, name=n)(h) for n in ("query", "key", "value"))
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / K ** 0.5
    att = jax.nn.softmax(jnp.where(mask, logits, -1e9))
    o = jnp.einsum("bhqs,bshk->bqhk", att, v)                            # (B, T, H, K)
    x = x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="out")(o)   # contracts (H, K)
    h = nn.RMSNorm(name="mlp_norm")(x)
    g = nn.silu(nn.Dense(F, use_bias=False, name="gate")(h)) * nn.Dense(F, use_bias=False, name="up")(h)
    return x + nn.Dense(D, use_bias=False, name="down")(g), None


class ByteLM(nn.Module):
  @nn.compact
  def __call__(self, ids):                                               # (B, T) int32 -> (B, T, V)
    x = nn.Embed(V, D, name="embed")(ids)
    mask = jnp.tril(jnp.ones((ids.shape[1], ids.shape[1]), bool))
    stack = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=L,
                    in_axes=(nn.broadcast,))
    x, _ = stack(name="layers")(x, mask)
    return nn.Dense(V, use_bias=False, name="head")(nn.RMSNorm(name="norm")(x))


text = asset_path("tinystories/tinystories_train_first2MiB.txt").read_bytes()[:64 * 128]
ids = jnp.asarray(np.frombuffer(text, np.uint8).astype(np.int32).reshape(8, 8, 128))   # 8 batches of (8, 128)
lm = ByteLM()
params = lm.init(jax.random.key(0), ids[0])["params"]
apply = lambda p, x: lm.apply({"params": p}, x)
print(f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters; the scan stacks each layer weight on axis 0, "
      f"e.g. layers/out/kernel {params['layers']['out']['kernel'].shape}")

# %% [markdown]
# ## What the trace finds
#
# `lb.analyze` traces `apply` once (abstractly) and reports how every weight is used: the leaf axes contracted
# with an activation, the axes a scan slices (one layer per step), and whether it is only looked up. The embedding
# table is only looked up, so it is not selected; everything contracted is.

# %% tags=["deterministic"]
found = lb.analyze(apply, params, ids[0])
print("| weight | shape | contracted axes | stacked (scan) axes |\n| --- | --- | --- | --- |")
for path, use in found.uses.items():
  name = jax.tree_util.keystr(path, simple=True, separator="/")
  print(f"| {name}{'' if path in found.selected else ' (not selected)'} | {use.shape} | {use.contract_axes} | "
        f"{use.stack_axes} |")

# %% [markdown]
# ## Calibrate, GPTQ, run packed
#
# GPTQ solves each stacked weight once per layer (a `lax.map` over the scan axis) in its traced layout: the
# `out` projection's two contracted axes `(H, K)` are one 64-long input, grouped by 32.

# %% tags=["deterministic"]
calib = lb.calibrate(apply, params, list(ids))
qparams = lb.gptq(params, calib, lb.int_spec(4, group_size=32))
qapply = lb.quantized(apply)
report = qapply.report(qparams, ids[0])
print(report)

# %% [markdown]
# Every selected weight runs on its packed codes ("reference (tiled)": decoded one K tile at a time inside the
# matmul; a Pallas kernel on an accelerator). Against the float function on the dequantized weights, the packed
# run differs only by float rounding; against the float model, by the quantization error, which GPTQ keeps below
# round-to-nearest's on these inputs (root-mean-square logit error relative to the logits' RMS):

# %% tags=["deterministic"]
x = ids[0]
run = jax.jit(qapply)
packed = run(qparams, x)
dequantized = jax.jit(apply)(lb.dequantize(qparams), x)
original = jax.jit(apply)(params, x)
rms = lambda a: float(jnp.sqrt(jnp.mean(jnp.square(a))))
rel_rounding = float(jnp.max(jnp.abs(packed - dequantized)) / jnp.max(jnp.abs(dequantized)))
rel_gptq = rms(packed - original) / rms(original)
rel_rtn = rms(run(lb.rtn(params, calib, lb.int_spec(4, group_size=32)), x) - original) / rms(original)
print(f"max |packed - dequantized float| / max |logit| = {rel_rounding:.1e}")
print(f"logit error vs the float model: GPTQ {rel_gptq:.4f}, RTN {rel_rtn:.4f} (relative RMS)")
print(lb.memory_report(qparams).summary())

# %% [markdown]
# ## The same on NNX
#
# An NNX module is a function of its state once split: `nnx.split` gives the graph and the `Param` state, and the
# apply function merges them back. Here `LinearGeneral` to and from heads and an `nnx.Einsum` MLP.

# %% tags=["deterministic"]
class NNXBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.q, self.k, self.v = (nnx.LinearGeneral(D, (H, K), use_bias=False, rngs=rngs) for _ in range(3))
    self.out = nnx.LinearGeneral((H, K), D, axis=(-2, -1), use_bias=False, rngs=rngs)
    self.up = nnx.Einsum("btd,df->btf", (D, F), rngs=rngs)
    self.down = nnx.Einsum("btf,fd->btd", (F, D), rngs=rngs)

  def __call__(self, x):                                                 # (B, T, D)
    q, k, v = self.q(x), self.k(x), self.v(x)
    att = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", q, k) / K ** 0.5)
    x = x + self.out(jnp.einsum("bhqs,bshk->bqhk", att, v))
    return x + self.down(nnx.gelu(self.up(x)))


graphdef, nparams, rest = nnx.split(NNXBlock(nnx.Rngs(0)), nnx.Param, ...)
napply = lambda p, x: nnx.merge(graphdef, p, rest)(x)
xs = jax.random.normal(jax.random.key(1), (4, 16, D))
nq = lb.rtn(nparams, lb.analyze(napply, nparams, xs), lb.int_spec(8))
nreport = lb.quantized(napply).report(nq, xs)
print(str(nreport).splitlines()[0])
nfloat = jax.jit(napply)(lb.dequantize(nq), xs)
nrel = float(jnp.max(jnp.abs(jax.jit(lb.quantized(napply))(nq, xs) - nfloat)) / jnp.max(jnp.abs(nfloat)))
print(f"NNX: max |packed - dequantized float| / max |output| = {nrel:.1e}")

# %% [markdown]
# ## Checks
#
# The trace selects exactly the contracted weights (every projection and the head, not the embedding), each is
# quantized along its traced contraction axes, runs packed (none dequantized, none unused), and the packed run
# equals the float run on the dequantized weights to float rounding, for linen and NNX alike; GPTQ's
# logit error is below round-to-nearest's.

# %% tags=["deterministic"]
names = lambda paths: {jax.tree_util.keystr(p, simple=True, separator="/") for p in paths}
expected = {f"layers/{n}/kernel" for n in ("query", "key", "value", "out", "gate", "up", "down")} | {"head/kernel"}
assert names(found.selected) == expected, names(found.selected)
for path, q in jax.tree_util.tree_leaves_with_path(qparams, is_leaf=lambda x: isinstance(x, lb.QArray)):
  is_q = isinstance(q, lb.QArray)
  assert is_q == (path in found.selected), path
  assert not is_q or q.k_axes == found.uses[path].contract_axes, (path, q)
assert len(report.weights) == 8 and not report.dequantized and not report.unused, report
assert len(nreport.weights) == 6 and not nreport.dequantized and not nreport.unused, nreport
assert rel_rounding < 1e-5 and nrel < 1e-5, (rel_rounding, nrel)
assert rel_gptq < rel_rtn, (rel_gptq, rel_rtn)
print("checks passed: 8 linen and 6 NNX weights selected by use, quantized along their contracted axes, run packed")
