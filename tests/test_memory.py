"""memory_report on concrete and abstract trees; the numbers behind the README's memory table."""
import re

import jax
import jax.numpy as jnp
import pytest

import lowbit_jax as lb
from lowbit_jax.models.llama import Llama, LlamaConfig


def _abstract_llama(config):
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda t: Llama(config).init(jax.random.PRNGKey(0), t), tokens)["params"]
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), shapes)


def test_int4_g128_with_bf16_scales_is_4125_bits():
  leaf = {"w": {"kernel": jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)}}
  q = jax.eval_shape(lambda p: lb.rtn(p, None, lb.int_spec(4, group_size=128, scale_dtype=jnp.bfloat16)), leaf)
  rep = lb.memory_report(q)
  assert rep.bits_per_weight == 4.125
  assert rep.total_bytes == 4096 * 4096 // 2 + (4096 // 128) * 4096 * 2


def test_abstract_llama_7b_shapes_and_sizes():
  params = _abstract_llama(LlamaConfig.llama2_7b())
  bf16 = lb.memory_report(params)
  assert bf16.total_params == 6_738_415_616          # Llama-2-7B's published parameter count
  assert bf16.gb == pytest.approx(13.48, abs=0.01)
  q = jax.eval_shape(lambda p: lb.rtn(p, None, lb.int_spec(4, group_size=128, scale_dtype=jnp.bfloat16)), params)
  rep = lb.memory_report(q)
  assert 3.5 < rep.gb < 4.0                           # the seed's claim: 7B at 4 bit -> 3.5-4 GB
  assert 0.5 < rep.gb_per_billion_params < 0.56
  assert rep.compression_vs_bf16 == pytest.approx(bf16.total_bytes / rep.total_bytes)
  quantized = [l for l in rep.leaves if l.kind.startswith("INT4")]
  assert len(quantized) == 32 * 7 + 1                  # q k v o gate up down per layer, and the classifier
  assert all(l.bits_per_weight == 4.125 for l in quantized)


def test_concrete_and_abstract_reports_agree():
  params = {"a": {"kernel": jnp.ones((172, 64))}, "b": {"scale": jnp.ones((64,))}}
  spec = lb.nf4_spec()
  concrete = lb.memory_report(lb.rtn(params, None, spec))
  abstract = lb.memory_report(jax.eval_shape(lambda p: lb.rtn(p, None, spec), params))
  assert concrete == abstract
  assert concrete.leaves[0].nbytes == lb.rtn(params, None, spec)["a"]["kernel"].nbytes
  assert "NF4" in concrete.table() and "total" in concrete.table()
  assert "bits/weight" in concrete.summary()


@pytest.mark.parametrize("n_in, count_unit, byte_unit", [(64, "K", "kB"), (4096, "K", "kB"), (2**20, "M", "MB")])
def test_summary_units_fit_the_size(n_in, count_unit, byte_unit):
  """Counts and bytes in K/M/B and kB/MB/GB (3 significant digits of the true totals), never "0.000 B params"."""
  shapes = {"a": {"kernel": jax.ShapeDtypeStruct((n_in, 172), jnp.float32)},
            "b": {"scale": jax.ShapeDtypeStruct((n_in,), jnp.float32)}}
  rep = lb.memory_report(jax.eval_shape(lambda p: lb.rtn(p, None, lb.nf4_spec()), shapes))
  m = re.match(r"([\d.]+)([KMB]) params, ([\d.]+) ([kMG]?B) \(", rep.summary())
  assert m and (m[2], m[4]) == (count_unit, byte_unit), rep.summary()
  scale = {"K": 1e3, "M": 1e6, "kB": 1e3, "MB": 1e6}
  assert float(m[1]) * scale[m[2]] == pytest.approx(n_in * 173, rel=5e-3)
  assert float(m[3]) * scale[m[4]] == pytest.approx(rep.total_bytes, rel=5e-3)


def test_bad_input():
  with pytest.raises(ValueError, match=r"params\['a'\].*expected an array"):
    lb.memory_report({"a": "not an array"})
  with pytest.raises(ValueError, match="no array leaves"):
    lb.memory_report({})
