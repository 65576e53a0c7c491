import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.spec import Format, PerChannel, PerGroup, PerTensor, QuantSpec


def test_fixed_bits_filled_in():
  assert QuantSpec(format=Format.NF4, granularity=PerGroup(size=64)).bits == 4
  assert lb.ternary_spec().bits == 2
  assert lb.fp8_spec().bits == 8
  assert lb.int_spec(4, scale_dtype=jnp.bfloat16).scale_dtype == np.dtype(jnp.bfloat16)


def test_spec_is_hashable_and_keyword_only():
  s = lb.int_spec(4, group_size=128)
  assert hash(s) == hash(lb.int_spec(4, group_size=128))
  with pytest.raises(TypeError):
    QuantSpec(Format.INT, 4)  # positional arguments are not accepted


@pytest.mark.parametrize("kwargs, match", [
    (dict(format=Format.INT, bits=5), "bits in"),
    (dict(format=Format.INT, bits=1), "bits in"),
    (dict(format=Format.INT), "bits in"),
    (dict(format=Format.NF4, bits=3), "stores 4-bit"),
    (dict(format=Format.FP8_E4M3, bits=4), "stores 8-bit"),
    (dict(format="int", bits=4), "lowbit_jax.Format"),
    (dict(format=Format.NF4, symmetric=False), "zero point"),
    (dict(format=Format.INT, bits=4, scale_dtype=jnp.int8), "scale_dtype"),
    (dict(format=Format.INT, bits=4, granularity="per_channel"), "granularity"),
    (dict(format=Format.INT, bits=4, double_quant=True), "double_quant"),
    (dict(format=Format.INT, bits=4, grid="full"), "SymGrid"),
    (dict(format=Format.INT, bits=4, symmetric=False, grid=lb.SymGrid.FULL), "symmetric Format.INT"),
    (dict(format=Format.NF4, grid=lb.SymGrid.FULL), "symmetric Format.INT"),
    (dict(format=Format.INT, bits=4, zero_point=lb.ZeroPoint.FLOAT), "asymmetric Format.INT"),
    (dict(format=Format.INT, bits=4, symmetric=False, zero_point="float"), "ZeroPoint"),
    (dict(format=Format.FP8_E4M3, clip=lb.ClipSearch()), "Format.INT or Format.NF4"),
    (dict(format=Format.INT, bits=4, clip=0.9), "ClipSearch"),
    (dict(format=Format.INT, bits=8, symmetric=False, zero_point=lb.ZeroPoint.FLOAT,
          activations=lb.ActQuant()), "float offset"),
])
def test_invalid_specs_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantSpec(**kwargs)


@pytest.mark.parametrize("size", [0, -4, 2.5])
def test_invalid_group_size(size):
  with pytest.raises(ValueError, match="PerGroup.size"):
    PerGroup(size=size)


def test_codes_per_byte_and_axis():
  assert lb.int_spec(3).codes_per_byte == 8
  assert lb.int_spec(4).codes_per_byte == 2
  assert lb.int_spec(4, group_size=32, axis=0).axis == 0
  assert lb.int_spec(8).group_size is None
  assert isinstance(lb.fp8_spec(per_channel=True).granularity, PerChannel)
  assert isinstance(lb.fp8_spec().granularity, PerTensor)


def test_grid_and_zero_point_defaults_resolve_once():
  assert lb.int_spec(4).grid is lb.DEFAULT_SYM_GRID is lb.SymGrid.SIGNED_MAX
  assert lb.int_spec(4) == lb.int_spec(4, grid=lb.SymGrid.SIGNED_MAX) != lb.int_spec(4, grid=lb.SymGrid.FULL)
  assert lb.int_spec(4, symmetric=False).zero_point is lb.ZeroPoint.INTEGER and not lb.int_spec(4).float_offset
  assert lb.int_spec(4, symmetric=False).grid is None and lb.nf4_spec().grid is None
  assert lb.q4_1_spec().float_offset and lb.q4_1_spec().scale_dtype == np.dtype(jnp.float16)
  assert lb.W8A8_SPEC.grid is lb.SymGrid.RESTRICTED and lb.llm_int8_spec().grid is lb.SymGrid.RESTRICTED


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"), (dict(steps=True), "steps"), (dict(max_shrink=1.0), "max_shrink"),
    (dict(max_shrink=float("nan")), "max_shrink"), (dict(norm=0), "norm"), (dict(norm="2"), "norm"),
])
def test_invalid_clip_search(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lb.ClipSearch(**kwargs)


def test_clip_ratios_follow_the_reference_grid():
  r = lb.ClipSearch().ratios     # quant.py: p = 1 - i / grid for i in range(int(maxshrink * grid))
  assert r[0] == 1 and len(r) == 80 and np.isclose(r[-1], 0.21)


def test_ggml_presets_store_the_ggml_block_bytes():
  """q4_0_spec / q4_1_spec / q8_0_spec store what llama.cpp's blocks of 32 do: 18, 20 and 34 bytes."""
  w = jax.random.normal(jax.random.key(0), (64, 16))
  for spec, block in ((lb.q4_0_spec(), 18), (lb.q4_1_spec(), 20), (lb.q8_0_spec(), 34)):
    assert lb.quantize(w, spec).nbytes == (64 * 16 // 32) * block, spec
  assert lb.q4_0_spec().grid is lb.SymGrid.SIGNED_MAX and lb.q8_0_spec().grid is lb.SymGrid.RESTRICTED
