"""Tiny random-weight models in every weight layout of the Flax zoos, for tests that must run them with no edits.

Each builder returns a `Zoo`: a pure `apply(params, batch)`, float32 random `params` (deterministic seeds), one
`batch`, and key-path regexes (matched with `re.search` against `lowbit_jax.select.path_str`, e.g. "q/kernel") for
the weights a user calls linear (contracted against an activation by a dot / einsum / ragged_dot, including
gathered experts and tied heads), the embedding tables used only by lookup, and the conv kernels. Every other leaf
is a bias or a norm scale. `ZOO` maps a name to its builder; the per-builder comments list the selected leaves.

Sizes: D=64, heads H=4 of K=32, F=128, E=4 experts, V=128 tokens; every contraction is a multiple of 32.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit_jax.select import path_str
from seeds import stable_seed

B, T, D, H, K, F, E, V = 2, 8, 64, 4, 32, 128, 4, 128
KV = 2                                                        # gemma kv heads (GQA: H // KV query heads each)


@dataclasses.dataclass(frozen=True)
class Zoo:
  name: str
  apply: Callable[[Any, Any], jax.Array]
  params: Any
  batch: Any
  linear: tuple[str, ...]
  lookup_only: tuple[str, ...] = ()
  conv: tuple[str, ...] = ()


def leaves(params) -> dict[str, tuple[int, ...]]:
  """{path_str: shape} of every array leaf."""
  return {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def matching(zoo: Zoo, regexes: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
  """The leaves any of `regexes` selects; raises if one regex selects nothing."""
  paths = leaves(zoo.params)
  for r in regexes:
    if not any(re.search(r, p) for p in paths):
      raise ValueError(f"{zoo.name}: {r!r} matches none of {sorted(paths)}")
  return {p: s for p, s in paths.items() if any(re.search(r, p) for r in regexes)}


def _fill(shapes, name: str, scale: float = 0.1):
  """Random float32 leaves with the structure of `shapes` (abstract or concrete); norm scales around 1."""
  rng = np.random.default_rng(stable_seed(name))

  def leaf(path, s):
    z = scale * rng.standard_normal(s.shape).astype(np.float32)
    return jnp.asarray(1.0 + z if path_str(path).endswith("scale") else z)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _acts(name: str) -> jax.Array:
  return jnp.asarray(np.random.default_rng(stable_seed(name) + 1).standard_normal((B, T, D)), jnp.float32)


def _tokens(name: str) -> jax.Array:
  return jnp.asarray(np.random.default_rng(stable_seed(name) + 1).integers(0, V, (B, T)), jnp.int32)


def _linen(name, module, batch, **kinds) -> Zoo:
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), batch)["params"]   # abstract: no init compile
  return Zoo(name, lambda p, x: module.apply({"params": p}, x), _fill(shapes, name), batch, **kinds)


def _attend(q, k, v, mask=None):                            # (B, T, H, K) x3 -> (B, T, H, K)
  logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / q.shape[-1] ** 0.5
  if mask is not None:
    logits = jnp.where(mask, logits, -1e9)
  return jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(logits), v)


def _mlp(x):                                                 # linen Dense MLP with a residual
  return x + nn.Dense(x.shape[-1], name="down")(nn.gelu(nn.Dense(F, name="up")(x)))


# ---------------------------------------------------------------------------------------------------- linen
class _DenseGeneralAttn(nn.Module):
  @nn.compact
  def __call__(self, x):                                     # (B, T, D)
    q, k, v = (nn.DenseGeneral((H, K), axis=-1, name=n)(x) for n in "qkv")    # (B, T, H, K)
    x = x + nn.DenseGeneral(D, axis=(-2, -1), name="out")(_attend(q, k, v))  # (H, K) contracted
    return _mlp(x)


def linen_dense_general() -> Zoo:
  # q|k|v/kernel (64, 4, 32) dot 'btd,dhk'; out/kernel (4, 32, 64) dot 'bthk,hkd'; up/kernel (64, 128), down/kernel
  # (128, 64) dot; biases q|k|v (4, 32), out|down (64,), up (128,)
  return _linen("linen_dense_general", _DenseGeneralAttn(), _acts("linen_dense_general"),
                linear=(r"^[qkv]/kernel$", r"^out/kernel$", r"^(up|down)/kernel$"))


class _EinsumAttn(nn.Module):
  @nn.compact
  def __call__(self, x):                                     # (B, T, D)
    q, k, v = (nn.Einsum((H, D, K), "btd,hdk->bthk", name=n)(x) for n in "qkv")  # (B, T, H, K)
    x = x + nn.Einsum((H, K, D), "bthk,hkd->btd", name="out")(_attend(q, k, v))
    return _mlp(x)


def linen_einsum() -> Zoo:
  # q|k|v/kernel (4, 64, 32) einsum 'btd,hdk->bthk' (head axis leads, a batch-free non-contracted dim);
  # out/kernel (4, 32, 64) einsum 'bthk,hkd->btd'; up/kernel (64, 128), down/kernel (128, 64) dot; biases (4, 32)/(64,)
  return _linen("linen_einsum", _EinsumAttn(), _acts("linen_einsum"),
                linear=(r"^[qkv]/kernel$", r"^out/kernel$", r"^(up|down)/kernel$"))


class _MHA(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=H * K, name="attn")(x)
    return _mlp(x)


def linen_mha() -> Zoo:
  # attn/{query,key,value}/kernel (64, 4, 32) DenseGeneral dot; attn/out/kernel (4, 32, 64) dot over (h, k);
  # up/kernel (64, 128), down/kernel (128, 64); biases
  return _linen("linen_mha", _MHA(), _acts("linen_mha"),
                linear=(r"^attn/(query|key|value)/kernel$", r"^attn/out/kernel$", r"^(up|down)/kernel$"))


# ---------------------------------------------------------------------------------------------------- nnx
class _NNXModel(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.q, self.k, self.v = (nnx.LinearGeneral(D, (H, K), rngs=rngs) for _ in range(3))   # kernel (D, H, K)
    self.out = nnx.LinearGeneral((H, K), D, axis=(-2, -1), rngs=rngs)                     # kernel (H, K, D)
    self.up = nnx.Einsum("btd,df->btf", (D, F), (F,), rngs=rngs)
    self.down = nnx.Einsum("btf,fd->btd", (F, D), (D,), rngs=rngs)
    self.mha = nnx.MultiHeadAttention(H, D, H * K, decode=False, rngs=rngs)

  def __call__(self, x):                                     # (B, T, D)
    x = x + self.out(_attend(self.q(x), self.k(x), self.v(x)))
    x = x + self.down(nnx.gelu(self.up(x)))
    return x + self.mha(x)


def nnx_linear_general() -> Zoo:
  # q|k|v/kernel (64, 4, 32) dot; out/kernel (4, 32, 64) dot over axes (-2, -1); up/kernel (64, 128) einsum
  # 'btd,df->btf'; down/kernel (128, 64) einsum 'btf,fd->btd'; mha/{query,key,value}/kernel (64, 4, 32);
  # mha/out/kernel (4, 32, 64); biases. params = nnx.State of the Param variables (leaf paths end in `.value`).
  name = "nnx_linear_general"
  graphdef, params, rest = nnx.split(_NNXModel(nnx.Rngs(0)), nnx.Param, ...)
  apply = lambda p, x: nnx.merge(graphdef, p, rest)(x)
  return Zoo(name, apply, _fill(params, name), _acts(name),
             linear=(r"^[qkv]/kernel$", r"^out/kernel$", r"^(up|down)/kernel$",
                     r"^mha/(query|key|value)/kernel$", r"^mha/out/kernel$"))


# ---------------------------------------------------------------------------------------------------- maxtext
class _ScanBlock(nn.Module):
  """A MaxText-like decoder layer, (carry, broadcast mask) -> (carry, None)."""

  @nn.compact
  def __call__(self, x, mask):                               # (B, T, D), (T, T) bool
    h = nn.RMSNorm(name="pre_self_attention_norm")(x)
    q, k, v = (nn.DenseGeneral((H, K), use_bias=False, name=n)(h) for n in ("query", "key", "value"))
    a = _attend(q, k, v, mask)
    x = x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="out")(a)
    h = nn.RMSNorm(name="post_self_attention_norm")(x)
    g = nn.silu(nn.Dense(F, use_bias=False, name="wi_0")(h)) * nn.Dense(F, use_bias=False, name="wi_1")(h)
    return x + nn.Dense(D, use_bias=False, name="wo")(g), None


class _ScanModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    stack = nn.scan(_ScanBlock, variable_axes={"params": 1}, split_rngs={"params": True}, length=3,
                    in_axes=(nn.broadcast,))
    x, _ = stack(name="layers")(x, mask)
    return nn.RMSNorm(name="decoder_norm")(x)


def maxtext_scan() -> Zoo:
  # the layer axis (3) at position 1 of every layer param (MaxText param_scan_axis=1); one dot per scan body:
  # layers/{query,key,value}/kernel (64, 3, 4, 32) dot 'btd,dhk'; layers/out/kernel (4, 3, 32, 64) dot over
  # (h, k) = leaf axes (0, 2); layers/wi_0|wi_1/kernel (64, 3, 128); layers/wo/kernel (128, 3, 64);
  # layers/*_norm/scale (64, 3); decoder_norm/scale (64,)
  return _linen("maxtext_scan", _ScanModel(), _acts("maxtext_scan"),
                linear=(r"^layers/(query|key|value)/kernel$", r"^layers/out/kernel$", r"^layers/w(i_[01]|o)/kernel$"))


# ---------------------------------------------------------------------------------------------------- MoE
class _MoE(nn.Module):
  """Gated (silu) experts wi_0, wi_1 (E, D, F), wo (E, F, D); `kind` picks how tokens reach them."""
  kind: str

  @nn.compact
  def __call__(self, x):                                     # (B, T, D)
    init = nn.initializers.normal(0.1)
    wi_0, wi_1 = (self.param(n, init, (E, D, F)) for n in ("wi_0", "wi_1"))
    wo = self.param("wo", init, (E, F, D))
    t = x.reshape(-1, D)                                     # (N, D) tokens
    logits = nn.Dense(E, use_bias=False, name="router")(t)   # (N, E)
    gate = jax.nn.softmax(logits)
    top = jnp.argmax(logits, -1)                             # (N,) top-1 expert
    if self.kind == "all":                                   # every token through every expert
      h = nn.silu(jnp.einsum("td,edf->tef", t, wi_0)) * jnp.einsum("td,edf->tef", t, wi_1)   # (N, E, F)
      y = jnp.einsum("ted,te->td", jnp.einsum("tef,efd->ted", h, wo), gate)
    elif self.kind == "capacity":                            # GShard/Switch dispatch with capacity C
      cap = 2 * t.shape[0] // E
      onehot = jax.nn.one_hot(top, E)                        # (N, E)
      pos = ((jnp.cumsum(onehot, 0) - 1.0) * onehot).astype(jnp.int32)
      dispatch = onehot[..., None] * jax.nn.one_hot(pos, cap)    # (N, E, C); overflow tokens dropped
      xe = jnp.einsum("tec,td->ecd", dispatch, t)            # (E, C, D)
      h = nn.silu(jnp.einsum("ecd,edf->ecf", xe, wi_0)) * jnp.einsum("ecd,edf->ecf", xe, wi_1)  # batch dim e
      y = jnp.einsum("tec,ecd->td", dispatch * gate[..., None], jnp.einsum("ecf,efd->ecd", h, wo))
    elif self.kind == "gathered":                            # per-token expert weights w[top]: (N, D, F)
      h = nn.silu(jnp.einsum("td,tdf->tf", t, wi_0[top])) * jnp.einsum("td,tdf->tf", t, wi_1[top])
      y = jnp.einsum("tf,tfd->td", h, wo[top]) * jnp.take_along_axis(gate, top[:, None], 1)
    elif self.kind == "ragged":                              # tokens sorted by expert, grouped matmul
      order = jnp.argsort(top)
      sizes = jnp.bincount(top, length=E).astype(jnp.int32)  # (E,)
      ts = t[order]
      h = nn.silu(jax.lax.ragged_dot(ts, wi_0, sizes)) * jax.lax.ragged_dot(ts, wi_1, sizes)    # (N, F)
      y = jnp.zeros_like(t).at[order].set(jax.lax.ragged_dot(h, wo, sizes))                  # unsort: (N, D)
      y = y * jnp.take_along_axis(gate, top[:, None], 1)
    else:
      raise ValueError(self.kind)
    return x + y.reshape(x.shape)


def _moe(name: str, kind: str) -> Zoo:
  return _linen(name, _MoE(kind), _acts(name), linear=(r"^wi_[01]$", r"^wo$", r"^router/kernel$"))


# all four: wi_0, wi_1 (4, 64, 128), wo (4, 128, 64), router/kernel (64, 4) dot 'td,de'. The experts feed
#   moe_all_experts: einsum 'td,edf->tef' / 'tef,efd->ted' (e a free dim of the weight)
#   moe_capacity:    einsum 'ecd,edf->ecf' / 'ecf,efd->ecd' (e a batch dim of both operands)
#   moe_gathered:    gather w[top] -> (N, D, F), then einsum 'td,tdf->tf' / 'tf,tfd->td' (t batch)
#   moe_ragged:      lax.ragged_dot(x_sorted (N, D), w (E, D, F), group_sizes (E,))
def moe_all_experts() -> Zoo:
  return _moe("moe_all_experts", "all")


def moe_capacity() -> Zoo:
  return _moe("moe_capacity", "capacity")


def moe_gathered() -> Zoo:
  return _moe("moe_gathered", "gathered")


def moe_ragged() -> Zoo:
  return _moe("moe_ragged", "ragged")


# ---------------------------------------------------------------------------------------------------- conv
class _ConvFrontEnd(nn.Module):
  @nn.compact
  def __call__(self, x):                                     # (B, T, C=64) mel-like frames
    x = nn.gelu(nn.Conv(D, kernel_size=(3,), padding=1, name="conv1")(x))                # (B, T, D)
    x = nn.gelu(nn.Conv(D, kernel_size=(3,), strides=(2,), padding=1, name="conv2")(x))  # (B, T/2, D)
    return nn.Dense(D, name="proj")(x)


def conv() -> Zoo:
  # conv1/kernel, conv2/kernel (3, 64, 64) conv_general_dilated (WIO, 'NWC'; conv2 stride 2);
  # proj/kernel (64, 64) dot; biases (64,)
  return _linen("conv", _ConvFrontEnd(), _acts("conv"), linear=(r"^proj/kernel$",),
                conv=(r"^conv[12]/kernel$",))


# ---------------------------------------------------------------------------------------------------- embeddings
class _LM(nn.Module):
  tied: bool

  @nn.compact
  def __call__(self, ids):                                   # (B, T) int32
    embed = nn.Embed(V, D, name="embed")
    x = _mlp(embed(ids))                                     # lookup: (B, T, D)
    x = nn.LayerNorm(name="norm")(x)
    return embed.attend(x) if self.tied else nn.Dense(V, use_bias=False, name="head")(x)   # (B, T, V)


def tied_embed() -> Zoo:
  # embed/embedding (128, 64): gather (lookup) and dot 'btd,vd->btv' (embed.attend, contracted on leaf axis 1);
  # up/kernel (64, 128), down/kernel (128, 64) dot; norm/scale, biases
  return _linen("tied_embed", _LM(tied=True), _tokens("tied_embed"),
                linear=(r"^embed/embedding$", r"^(up|down)/kernel$"))


def untied_embed() -> Zoo:
  # embed/embedding (128, 64) gather only; head/kernel (64, 128) dot; up/kernel, down/kernel dot
  return _linen("untied_embed", _LM(tied=False), _tokens("untied_embed"),
                linear=(r"^head/kernel$", r"^(up|down)/kernel$"), lookup_only=(r"^embed/embedding$",))


# ---------------------------------------------------------------------------------------------------- gemma
class _Einsum(nn.Module):
  """gemma's Einsum: a single param `w` and `jnp.einsum(eqn, x, w)`."""
  shape: tuple[int, ...]

  @nn.compact
  def __call__(self, eqn: str, x):
    return jnp.einsum(eqn, x, self.param("w", nn.initializers.normal(), self.shape))


class _GemmaRMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-6) * (1.0 + scale)


class _Embedder(nn.Module):
  def setup(self):
    self.input_embedding = self.param("input_embedding", nn.initializers.normal(), (V, D))

  def encode(self, ids):                                     # gather
    return self.input_embedding[ids] * D ** 0.5

  def decode(self, x):                                       # tied head: plain dot with the transposed table
    return jnp.dot(x, self.input_embedding.T)


class _GemmaAttention(nn.Module):
  def setup(self):
    self.q_einsum = _Einsum((H, D, K))                       # (N, D, H) in gemma's letters
    self.kv_einsum = _Einsum((2, KV, D, K))                  # (C=2, K, D, H)
    self.attn_vec_einsum = _Einsum((H, K, D))                # (N, H, D)

  def __call__(self, x):                                     # (B, T, D)
    q = self.q_einsum("BTD,NDH->BTNH", x) * K ** -0.5
    k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)              # (B, S, KV, K) each
    q = q.reshape(*q.shape[:2], KV, H // KV, K)              # (B, T, KV, G, K)
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", q, k)
    logits = jnp.where(jnp.tril(jnp.ones((T, T), bool))[None, :, None, None, :], logits, -1e9)
    enc = jnp.einsum("BTKGS,BSKH->BTKGH", jax.nn.softmax(logits), v).reshape(*x.shape[:2], H, K)
    return self.attn_vec_einsum("BTNH,NHD->BTD", enc)


class _GemmaMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    gate = _Einsum((2, F, D), name="gating_einsum")("...D,CFD->C...F", x)   # (2, B, T, F): weight is (C, F, D)
    return _Einsum((F, D), name="linear")("...F,FD->...D", nn.gelu(gate[0]) * gate[1])


class _GemmaBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + _GemmaAttention(name="attn")(_GemmaRMSNorm(name="pre_attention_norm")(x))
    return x + _GemmaMLP(name="mlp")(_GemmaRMSNorm(name="pre_ffw_norm")(x))


class _Gemma(nn.Module):
  @nn.compact
  def __call__(self, ids):                                   # (B, T) int32 -> (B, T, V)
    embedder = _Embedder(name="embedder")
    x = embedder.encode(ids)
    for i in range(2):
      x = _GemmaBlock(name=f"layer_{i}")(x)
    return embedder.decode(_GemmaRMSNorm(name="final_norm")(x))


def gemma_style() -> Zoo:
  # layer_{0,1}/attn/q_einsum/w (4, 64, 32) 'BTD,NDH->BTNH'; attn/kv_einsum/w (2, 2, 64, 32) 'BSD,CKDH->CBSKH'
  # (two free weight dims C, K); attn/attn_vec_einsum/w (4, 32, 64) 'BTNH,NHD->BTD'; mlp/gating_einsum/w
  # (2, 128, 64) '...D,CFD->C...F' (contracted on the LAST leaf axis); mlp/linear/w (128, 64) '...F,FD->...D';
  # embedder/input_embedding (128, 64) gather + jnp.dot(x, table.T); *_norm/scale (64,)
  return _linen("gemma_style", _Gemma(), _tokens("gemma_style"),
                linear=(r"/attn/(q|kv|attn_vec)_einsum/w$", r"/mlp/(gating_einsum|linear)/w$",
                        r"^embedder/input_embedding$"))


# ---------------------------------------------------------------------------------------------------- transformers
def _hf(name: str, cls, cfg, **kinds) -> Zoo:
  ids = _tokens(name)
  with jax.numpy_dtype_promotion("standard"):
    model = cls(cfg, _do_init=False, input_shape=ids.shape)  # abstract init: no compile

  def apply(p, x):                                           # third-party code: standard promotion inside
    with jax.numpy_dtype_promotion("standard"):
      return model(x, params=p).logits
  return Zoo(name, apply, _fill(model.params_shape_tree, name), ids, **kinds)


def hf_llama() -> Zoo:
  # model/layers/{0,1}/self_attn/{q,o}_proj/kernel (64, 64), {k,v}_proj/kernel (64, 32); mlp/{gate,up}_proj/kernel
  # (64, 128), down_proj/kernel (128, 64) (all (in, out) dots); lm_head/kernel (64, 128); model/embed_tokens/
  # embedding (128, 64) gather only; *layernorm/weight, model/norm/weight (64,)
  import transformers
  cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=64)   # >= 2 * head_dim: HF's sincos table slices [:num_pos]
  return _hf("hf_llama", transformers.FlaxLlamaForCausalLM, cfg,
             linear=(r"/self_attn/[qkvo]_proj/kernel$", r"/mlp/(gate|up|down)_proj/kernel$", r"^lm_head/kernel$"),
             lookup_only=(r"^model/embed_tokens/embedding$",))


def hf_gpt2() -> Zoo:
  # transformer/h/{0,1}/attn/c_attn/kernel (192, 64), attn/c_proj/kernel (64, 64), mlp/c_fc/kernel (256, 64),
  # mlp/c_proj/kernel (64, 256): Conv1D stored (out, in), dot contracting leaf axis 1; transformer/wte/embedding
  # (128, 64) gather + tied head dot (wte.attend); transformer/wpe/embedding (16, 64) gather only; ln_* scale/bias
  import transformers
  cfg = transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=2, n_positions=16)
  return _hf("hf_gpt2", transformers.FlaxGPT2LMHeadModel, cfg,
             linear=(r"/attn/c_(attn|proj)/kernel$", r"/mlp/c_(fc|proj)/kernel$", r"^transformer/wte/embedding$"),
             lookup_only=(r"^transformer/wpe/embedding$",))


ZOO: dict[str, Callable[[], Zoo]] = {f.__name__: f for f in (
    linen_dense_general, linen_einsum, linen_mha, nnx_linear_general, maxtext_scan, moe_all_experts,
    moe_capacity, moe_gathered, moe_ragged, conv, tied_embed, untied_embed, gemma_style, hf_llama, hf_gpt2)}


if __name__ == "__main__":                                   # python tests/zoo_layouts.py: print every layout
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  for build in ZOO.values():
    z = build()
    y = jax.jit(z.apply)(z.params, z.batch)
    print(f"{z.name}: out {y.shape} {y.dtype} finite={bool(jnp.all(jnp.isfinite(y)))}")
    for kind in ("linear", "lookup_only", "conv"):
      print("".join(f"  {kind:11s} {p} {s}\n" for p, s in matching(z, getattr(z, kind)).items()), end="")
    print("  other      ", sorted(set(leaves(z.params)) - set(matching(z, z.linear + z.lookup_only + z.conv))))
