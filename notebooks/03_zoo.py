# %% [markdown]
# # The zoo: a transformers Flax model and a gemma-style einsum model
#
# Two models whose code we do not control, quantized and run packed as they are:
#
# * transformers' `FlaxLlamaForCausalLM` (a tiny random config): `nn.Dense` projections behind transformers'
#   own module tree and calling convention (`model(ids, params=p).logits`);
# * a gemma-style model written the way `google-deepmind/gemma` writes it: every projection is an `Einsum` module
#   holding one parameter `w` (named `w`, whatever it does), with layouts such as `(N, D, H)` for the query,
#   `(2, K, D, H)` for key and value together, `(2, F, D)` for the gated MLP (contracted on its *last* axis), and an
#   embedding table that is both looked up and used, transposed, as the output head.
#
# For each: what the trace selects, int4 g32 weights quantized along the traced contraction axes (GPTQ for the
# transformers model, round-to-nearest for the einsum model; tests/test_zoo_layouts.py runs both on every layout),
# the run report, and the packed logits against the float model evaluated on the dequantized weights.

# %%
import flax.linen as nn
import jax
import jax.numpy as jnp
import transformers

import lowbit_jax as lb

SPEC = lb.int_spec(4, group_size=32)
B, T, V = 4, 16, 128
batches = [jax.random.randint(jax.random.key(i), (B, T), 0, V) for i in range(2)]
names = lambda paths: sorted(jax.tree_util.keystr(p, simple=True, separator="/") for p in paths)


def quantize_and_run(method, apply, params, where=None):
  """(selected names, qparams, run report, max relative |packed - dequantized float|, relative RMS error vs float)"""
  calib = lb.calibrate(apply, params, batches, where=where)
  qparams = method(params, calib, SPEC, where=where)
  qapply = lb.quantized(apply)
  x = batches[0]
  packed = jax.jit(qapply)(qparams, x)
  dequantized = jax.jit(apply)(lb.dequantize(qparams), x)
  original = jax.jit(apply)(params, x)
  rounding = float(jnp.max(jnp.abs(packed - dequantized)) / jnp.max(jnp.abs(dequantized)))
  error = float(jnp.sqrt(jnp.mean(jnp.square(packed - original)) / jnp.mean(jnp.square(original))))
  return names(calib.weights), qparams, qapply.report(qparams, x), rounding, error

# %% [markdown]
# ## transformers: `FlaxLlamaForCausalLM`
#
# Two layers, GQA (2 query heads, 1 key/value head of 32), vocabulary 128; random weights from transformers' own
# initializer, run under `jit` (`_do_init=False`: transformers' own lazy initialization; its eager init takes
# seconds).

# %% tags=["deterministic"]
cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
hf = transformers.FlaxLlamaForCausalLM(cfg, _do_init=False)           # transformers' lazy init: params apart
hf_params = jax.jit(hf.init_weights, static_argnums=1)(jax.random.key(0), (B, T))
hf_apply = lambda p, ids: hf(ids, params=p).logits
hf_sel, hf_q, hf_report, hf_rounding, hf_error = quantize_and_run(lb.gptq, hf_apply, hf_params)
print(hf_report)

# %% [markdown]
# ## gemma-style einsum layers
#
# The embedding table is contracted by the tied head (`x @ table.T`) as well as looked up, so by default it stays
# float (as most quantization recipes keep it); `where=` opts it in, and then the lookup gathers codes and decodes
# only the rows it takes, while the head contracts the packed table.

# %% tags=["deterministic"]
D, N, KV, Hd, F = 64, 4, 2, 32, 128      # width, query heads, kv heads, head dim, MLP width


class Einsum(nn.Module):
  shape: tuple[int, ...]

  @nn.compact
  def __call__(self, eqn, x):
    return jnp.einsum(eqn, x, self.param("w", nn.initializers.normal(), self.shape))


class RMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-6) * (1.0 + scale)


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):                                                   # (B, T, D)
    q = Einsum((N, D, Hd), name="q_einsum")("BTD,NDH->BTNH", x) * Hd ** -0.5
    k, v = Einsum((2, KV, D, Hd), name="kv_einsum")("BSD,CKDH->CBSKH", x)
    q = q.reshape(*q.shape[:2], KV, N // KV, Hd)                            # (B, T, KV, G, H)
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", q, k)
    causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))[None, :, None, None, :]
    probs = jax.nn.softmax(jnp.where(causal, logits, -1e9))
    enc = jnp.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(*x.shape[:2], N, Hd)
    return Einsum((N, Hd, D), name="attn_vec_einsum")("BTNH,NHD->BTD", enc)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    gate = Einsum((2, F, D), name="gating_einsum")("...D,CFD->C...F", x)    # contracted on the last axis
    return Einsum((F, D), name="linear")("...F,FD->...D", nn.gelu(gate[0]) * gate[1])


class Gemma(nn.Module):
  @nn.compact
  def __call__(self, ids):                                                 # (B, T) -> (B, T, V)
    table = self.param("input_embedding", nn.initializers.normal(), (V, D))
    x = table[ids] * D ** 0.5
    for i in range(2):
      x = x + Attention(name=f"layer_{i}_attn")(RMSNorm(name=f"layer_{i}_pre_attention_norm")(x))
      x = x + MLP(name=f"layer_{i}_mlp")(RMSNorm(name=f"layer_{i}_pre_ffw_norm")(x))
    return jnp.dot(RMSNorm(name="final_norm")(x), table.T)


gemma = Gemma()
g_params = gemma.init(jax.random.key(0), batches[0])["params"]
g_apply = lambda p, ids: gemma.apply({"params": p}, ids)
g_sel, g_q, g_report, g_rounding, g_error = quantize_and_run(lb.rtn, g_apply, g_params)
print(g_report)
for path, use in lb.analyze(g_apply, g_params, batches[0]).uses.items():
  if "layer_0" in jax.tree_util.keystr(path) or "embedding" in jax.tree_util.keystr(path):
    print(f"{jax.tree_util.keystr(path, simple=True, separator='/'):32s} {str(use.shape):16s} contracted "
          f"{use.contract_axes}")

# %% [markdown]
# Opting the tied table in: `where=` takes a key-path regex or a predicate `(path, leaf) -> bool`.

# %% tags=["deterministic"]
opt_in = lambda path, leaf: path.endswith("/w") or path == "input_embedding"
t_sel, t_q, t_report, t_rounding, t_error = quantize_and_run(lb.rtn, g_apply, g_params, where=opt_in)
(table_run,) = [w for w in t_report.weights if "input_embedding" in w.where]
print(table_run.where, "runs as:", sorted(i.value for i in table_run.impls))

# %% [markdown]
# ## Summary

# %% tags=["deterministic"]
print("| model | weights quantized | dequantized at run time | packed / float bytes | "
      "max rel. packed - dequantized | rel. RMS logit error vs float |\n|---|---:|---:|---:|---:|---:|")
for label, report, rounding, error in (("FlaxLlamaForCausalLM, GPTQ", hf_report, hf_rounding, hf_error),
                                       ("gemma-style, RTN", g_report, g_rounding, g_error),
                                       ("gemma-style + tied table, RTN", t_report, t_rounding, t_error)):
  floats = sum(w.float_nbytes for w in report.weights)
  print(f"| {label} | {len(report.weights)} | {len(report.dequantized)} | {report.packed_bytes:,} / {floats:,} | "
        f"{rounding:.1e} | {error:.4f} |")

# %% [markdown]
# ## Checks
#
# Selection by use finds exactly the projections (and transformers' untied `lm_head`; the gemma table only when
# opted in), every quantized weight runs packed, and the packed logits equal the float model on the dequantized
# weights to float rounding.

# %% tags=["deterministic"]
hf_expected = sorted([f"model/layers/{i}/{m}/kernel" for i in range(2) for m in
                      ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
                       "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")] + ["lm_head/kernel"])
g_expected = sorted(f"layer_{i}_{m}/w" for i in range(2) for m in
                    ("attn/q_einsum", "attn/kv_einsum", "attn/attn_vec_einsum", "mlp/gating_einsum", "mlp/linear"))
assert hf_sel == hf_expected, hf_sel
assert g_sel == g_expected and t_sel == sorted(g_expected + ["input_embedding"]), (g_sel, t_sel)
for report in (hf_report, g_report, t_report):
  assert not report.dequantized and not report.unused, report
assert {i.value for i in table_run.impls} == {"gathered rows decoded", "reference (tiled)"}, table_run
assert max(hf_rounding, g_rounding, t_rounding) < 1e-5, (hf_rounding, g_rounding, t_rounding)
assert max(hf_error, g_error, t_error) < 0.2, (hf_error, g_error, t_error)
print(f"checks passed: {len(hf_sel)} transformers and {len(g_sel)} (+1 tied table) gemma-style weights run packed")
