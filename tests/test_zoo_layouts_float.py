"""The zoo layouts themselves (float, no quantization): each runs under jit, is finite, and its regexes select
exactly the leaves listed here (paths as `lowbit_jax.select.path_str` writes them)."""
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.select import path_str
from zoo_layouts import ZOO, Zoo


def expand(spec: dict[str, tuple]) -> dict[str, tuple]:
  """Brace expansion of the keys: "a/{q,k}/kernel" -> "a/q/kernel", "a/k/kernel"."""
  out = {}
  for key, shape in spec.items():
    parts = re.split(r"\{([^}]*)\}", key)           # literal, alternatives, literal, ...
    alts = [p.split(",") if i % 2 else [p] for i, p in enumerate(parts)]
    out.update({"".join(c): shape for c in itertools.product(*alts)})
  return out


QKV, OUT, UP, DOWN = (64, 4, 32), (4, 32, 64), (64, 128), (128, 64)
MLP = {"up/kernel": UP, "down/kernel": DOWN}
MOE = {"linear": {"wi_{0,1}": (4, 64, 128), "wo": (4, 128, 64), "router/kernel": (64, 4)}}
EXPECT = {
    "linen_dense_general": {"linear": {"{q,k,v}/kernel": QKV, "out/kernel": OUT, **MLP}},
    "linen_einsum": {"linear": {"{q,k,v}/kernel": (4, 64, 32), "out/kernel": OUT, **MLP}},
    "linen_mha": {"linear": {"attn/{query,key,value}/kernel": QKV, "attn/out/kernel": OUT, **MLP}},
    "nnx_linear_general": {"linear": {"{q,k,v}/kernel": QKV, "mha/{query,key,value}/kernel": QKV,
                                      "{,mha/}out/kernel": OUT, **MLP}},
    "maxtext_scan": {"linear": {"layers/{query,key,value}/kernel": (64, 3, 4, 32), "layers/out/kernel": (4, 3, 32, 64),
                                "layers/wi_{0,1}/kernel": (64, 3, 128), "layers/wo/kernel": (128, 3, 64)}},
    "moe_all_experts": MOE, "moe_capacity": MOE, "moe_gathered": MOE, "moe_ragged": MOE,
    "conv": {"linear": {"proj/kernel": (64, 64)}, "conv": {"conv{1,2}/kernel": (3, 64, 64)}},
    "tied_embed": {"linear": {"embed/embedding": (128, 64), **MLP}},
    "untied_embed": {"linear": {"head/kernel": (64, 128), **MLP},
                     "lookup_only": {"embed/embedding": (128, 64)}},
    "gemma_style": {"linear": {
        "layer_{0,1}/attn/q_einsum/w": (4, 64, 32), "layer_{0,1}/attn/kv_einsum/w": (2, 2, 64, 32),
        "layer_{0,1}/attn/attn_vec_einsum/w": (4, 32, 64), "layer_{0,1}/mlp/gating_einsum/w": (2, 128, 64),
        "layer_{0,1}/mlp/linear/w": (128, 64), "embedder/input_embedding": (128, 64)}},
    "hf_llama": {"linear": {
        "model/layers/{0,1}/self_attn/{q,o}_proj/kernel": (64, 64), "model/layers/{0,1}/self_attn/{k,v}_proj/kernel":
        (64, 32), "model/layers/{0,1}/mlp/{gate,up}_proj/kernel": UP, "model/layers/{0,1}/mlp/down_proj/kernel": DOWN,
        "lm_head/kernel": (64, 128)}, "lookup_only": {"model/embed_tokens/embedding": (128, 64)}},
    "hf_gpt2": {"linear": {
        "transformer/h/{0,1}/attn/c_attn/kernel": (192, 64), "transformer/h/{0,1}/attn/c_proj/kernel": (64, 64),
        "transformer/h/{0,1}/mlp/c_fc/kernel": (256, 64), "transformer/h/{0,1}/mlp/c_proj/kernel": (64, 256),
        "transformer/wte/embedding": (128, 64)}, "lookup_only": {"transformer/wpe/embedding": (16, 64)}},
}
KINDS = ("linear", "lookup_only", "conv")


def test_expectations_cover_zoo():
  assert set(EXPECT) == set(ZOO)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_entry(name):
  zoo: Zoo = ZOO[name]()
  assert zoo.name == name
  flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(zoo.params)[0]}
  assert all(x.dtype == jnp.float32 for x in flat.values())

  y = jax.jit(zoo.apply)(zoo.params, zoo.batch)
  assert y.dtype == jnp.float32 and y.shape[0] == zoo.batch.shape[0]
  assert np.isfinite(np.asarray(y)).all()

  chosen = {}
  for kind in KINDS:
    for r in getattr(zoo, kind):
      assert any(re.search(r, p) for p in flat), f"{kind} regex {r!r} matches no leaf"
    got = {p: tuple(x.shape) for p, x in flat.items() if any(re.search(r, p) for r in getattr(zoo, kind))}
    assert got == expand(EXPECT[name].get(kind, {})), kind
    assert not set(got) & set(chosen), f"{kind} overlaps another kind"
    chosen.update(got)
  for p, x in flat.items():                          # everything else is a bias or a norm scale
    if p not in chosen:
      assert p.rsplit("/", 1)[-1] in ("bias", "scale") or x.ndim == 1, p


def test_moe_dispatch_layouts_agree():
  """Same params, top-1 routing within capacity: gathered, ragged and capacity dispatch compute one function."""
  ref = ZOO["moe_gathered"]()
  want = np.asarray(jax.jit(ref.apply)(ref.params, ref.batch))
  for name in ("moe_ragged", "moe_capacity"):
    np.testing.assert_allclose(np.asarray(jax.jit(ZOO[name]().apply)(ref.params, ref.batch)), want, atol=1e-5)
