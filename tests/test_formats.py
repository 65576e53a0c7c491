"""Property tests per format: error within the documented bound, stored bytes equal the formula, padding inert.

`HYPOTHESIS_PROFILE=thorough pytest tests/test_formats.py` runs 10,000 examples per property.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

import lowbit_jax as lb
from lowbit_jax.formats import PACKED, packing
from qhelpers import REGISTRY, error_bound, expected_nbytes, k_pad

SHAPES = [(1, 1), (5, 3), (64, 8), (100, 4), (172, 8), (2, 40, 4)]


@functools.lru_cache(maxsize=None)
def _roundtrip(spec):
  """jit of x -> (quantize(x, spec), its dequantized value): one compile per spec and shape, where the eager
  quantizer compiles each of its ops."""
  @jax.jit
  def f(x):
    q = lb.quantize(x, spec)
    return q, q.dequantize()
  return f


@st.composite
def weights(draw):
  """Small arrays drawn element by element (edge values: zeros, ties, tiny and huge magnitudes); larger ones
  from a drawn seed (hypothesis draws element-wise arrays slowly), scaled and with heavy-tailed outliers."""
  shape = draw(st.sampled_from(SHAPES))
  scale = np.float32(draw(st.sampled_from([1e-3, 1.0, 1e3])))
  if int(np.prod(shape)) <= 32:
    elements = st.floats(-1.0, 1.0, width=32, allow_subnormal=False)
    x = draw(hnp.arrays(np.float32, shape, elements=elements))
  else:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal(shape).astype(np.float32)
    if draw(st.booleans()):   # heavy-tailed: a few outliers, as real LLM weights have
      x = x * np.where(rng.random(shape) < 0.02, np.float32(30.0), np.float32(1.0))
    if draw(st.booleans()):   # exact zeros and repeated values
      x = np.where(rng.random(shape) < 0.2, np.float32(0.0), x)
  return x * scale


def _check_bound(x, spec):
  q, d = _roundtrip(spec)(jnp.asarray(x))
  assert d.shape == x.shape and d.dtype == x.dtype
  assert bool(jnp.all(jnp.isfinite(d)))
  err = np.abs(np.asarray(d, np.float64) - x.astype(np.float64))
  bound = error_bound(x, q)
  worst = np.argmax(err - bound)
  assert np.all(err <= bound), (f"{spec}: error {err.flat[worst]} > bound {bound.flat[worst]} "
                                f"at x={x.flat[worst]}")
  assert q.nbytes == expected_nbytes(x.shape, spec)


@pytest.mark.parametrize("name", sorted(REGISTRY))
@given(x=weights())
def test_error_within_documented_bound_and_bytes_match_formula(name, x):
  _check_bound(x, REGISTRY[name])


LARGEST = float(np.float32(1e37))   # the documented limit: |x| up to float32's max / 34 (the range max - min, the
#                                    NF4 / ternary normalisations and float offsets stay finite in float32)
EXTREME_SCALES = (1e-42, 1e-38, 1e-30, 1e30, 1e36, 1e37)   # subnormal, smallest normal, ..., the limit


@st.composite
def extreme_weights(draw):
  """Arrays at magnitudes near float32's limits: element by element over [-LARGEST, LARGEST] (subnormals
  included), or a drawn-seed normal array times a scale of `EXTREME_SCALES` (clipped to +-LARGEST)."""
  shape = draw(st.sampled_from(SHAPES))
  if int(np.prod(shape)) <= 32 and draw(st.booleans()):
    elements = st.floats(-LARGEST, LARGEST, width=32, allow_subnormal=True)
    return draw(hnp.arrays(np.float32, shape, elements=elements))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  x = rng.standard_normal(shape) * draw(st.sampled_from(EXTREME_SCALES))
  return np.clip(x, -LARGEST, LARGEST).astype(np.float32)


@pytest.mark.parametrize("name", sorted(REGISTRY))
@given(x=extreme_weights())
def test_extreme_magnitudes_and_subnormals_stay_finite_within_the_bound(name, x):
  """No format overflows to inf/NaN or loses its error bound at the edges of float32 (scales and offsets are
  computed in float32 and clamped to their dtype, formats/integer.py)."""
  _check_bound(x, REGISTRY[name])


def _partial_granule(spec) -> tuple[int, int, int]:
  """(K, t, reps): K rows whose quantization pads its last granule, which holds the last t real rows; `reps` copies
  of those t rows fill a granule that needs no padding. Grouped: K = 2g + g/4 (a quarter group at the end).
  Per channel / per tensor: K = 171 (odd, so every packed format pads it), the granule is the whole axis."""
  if spec.group_size:
    g = spec.group_size
    return 2 * g + g // 4, g // 4, 4
  pm = packing.pack_multiple(spec.bits) if spec.format in PACKED else 1
  return 171, 171, math.lcm(2, pm)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_padding_never_changes_a_result(name):
  """Padding is inert: the real rows of a padded granule dequantize exactly as they do when copies of them fill
  the granule with no padding at all. Copies change no statistic a format takes (min, max, signed max, absmax,
  mean |x|, the clip search's best ratio); padding zeros counted as data would (a mean, a float offset's range)."""
  spec = REGISTRY[name]
  k, t, reps = _partial_granule(spec)
  x = np.random.default_rng(0).standard_normal((k, 8)).astype(np.float32)
  q, d = _roundtrip(spec)(x)
  assert q.k_pad == k_pad(k, spec) and q.nbytes == expected_nbytes(x.shape, spec)
  assert q.k_pad > k or spec.format not in PACKED or packing.pack_multiple(spec.bits) == 1   # padded if it packs
  filled, d_filled = _roundtrip(spec)(np.tile(x[k - t:], (reps, 1)))
  assert filled.k_pad == reps * t                                     # the copies need no padding
  np.testing.assert_allclose(np.asarray(d)[k - t:], np.asarray(d_filled)[:t],
                             rtol=1e-6, atol=0)   # 1-ulp: a mean over another count may round differently


# Small inputs worked out by hand from each format's rule (formats/*.py docstrings): (spec, x (K, N), the
# dequantized values, stored bytes).
EXACT = {
    # SIGNED_MAX: scale = m / -8 for the signed max m = -0.8, so 0.1; 0.25 / 0.1 = 2.5 -> 2 (ties to even) -> 0.2.
    # 2 bytes of 4-bit codes + one f32 scale.
    "int4_signed_max": (lb.int_spec(4, grid=lb.SymGrid.SIGNED_MAX), [[-0.8], [0.1], [0.4], [0.25]],
                        [[-0.8], [0.1], [0.4], [0.2]], 2 + 4),
    # INTEGER zero point: range [-1, 2], scale 3 / 3 = 1, zero 1; 0.75 -> 1. 1 byte of codes + f32 scale + u8 zero.
    "int2_asym": (lb.int_spec(2, symmetric=False), [[-1.0], [0.0], [0.75], [2.0]],
                  [[-1.0], [0.0], [1.0], [2.0]], 1 + 4 + 1),
    # FLOAT offset: range [-1, 2], scale 1, offset -1; codes 0, 1, 2, 3. Codes + f32 scale + f32 offset.
    "int2_float_offset": (lb.int_spec(2, symmetric=False, zero_point=lb.ZeroPoint.FLOAT),
                          [[-1.0], [0.2], [0.6], [2.0]], [[-1.0], [0.0], [1.0], [2.0]], 1 + 4 + 4),
    # absmean over the 4 real entries (K = 2 is padded to 4): 1.8 / 4 = 0.45; 1 / 0.45 -> 1, 0.2 / 0.45 -> 0,
    # 0.6 / 0.45 -> 1. 2 x 4 padded 2-bit codes = 2 bytes + one f32 scale.
    "ternary_padded": (lb.ternary_spec(), [[1.0, -0.2], [0.0, 0.6]], [[0.45, 0.0], [0.0, 0.45]], 2 + 4),
    # absmax / 448 = 2 / 448: the codes 448, -224, 112, -56 are E4M3 values, so every x comes back.
    "fp8_e4m3": (lb.fp8_spec(lb.Format.FP8_E4M3), [[2.0], [-1.0], [0.5], [-0.25]],
                 [[2.0], [-1.0], [0.5], [-0.25]], 4 + 4),
    # one block of 64 with absmax 2: +-2 are the levels +-1 of NF4, 0 its exact zero. 32 bytes + f32 scale.
    "nf4": (lb.nf4_spec(double_quant=False), [[2.0], [-2.0]] + [[0.0]] * 62, [[2.0], [-2.0]] + [[0.0]] * 62,
            32 + 4),
}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_small_inputs_dequantize_to_hand_computed_values(name):
  spec, x, want, nbytes = EXACT[name]
  q, d = _roundtrip(spec)(np.asarray(x, np.float32))
  np.testing.assert_allclose(np.asarray(d), np.asarray(want, np.float32), rtol=1e-6, atol=1e-7)
  assert q.nbytes == nbytes


def test_strict_raises_instead_of_padding():
  x = np.ones((172, 8), np.float32)
  with pytest.raises(ValueError, match="not a multiple of group size 32"):
    lb.quantize(x, lb.int_spec(4, group_size=32, strict=True), path="params['ffn']['kernel']")
  q = lb.quantize(np.ones((192, 8), np.float32), lb.int_spec(4, group_size=32, strict=True))
  assert q.k_pad == 192


def test_nf4_double_quant_overhead_is_about_0127_bits():
  x = jax.ShapeDtypeStruct((4096, 4096), jnp.float32)
  q = jax.eval_shape(lambda a: lb.quantize(a, lb.nf4_spec()), x)
  overhead = q.bits_per_weight - 4
  assert 0.126 < overhead < 0.128, overhead
  q_nodq = jax.eval_shape(lambda a: lb.quantize(a, lb.nf4_spec(double_quant=False)), x)
  assert q_nodq.bits_per_weight == 4.5


def test_ternary_is_at_most_two_bits():
  x = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
  q = jax.eval_shape(lambda a: lb.quantize(a, lb.ternary_spec()), x)
  assert q.bits_per_weight <= 2.0 + 32 / (4096 * 4096)   # 2-bit codes + one f32 scale


def test_fp8_saturates_and_never_makes_nan():
  x = np.array([[0.0], [1e-30], [3e38], [-3e38], [1.0]], np.float32)
  for fmt in (lb.Format.FP8_E4M3, lb.Format.FP8_E5M2):
    d = np.asarray(lb.quantize(x, lb.fp8_spec(fmt)).dequantize())
    assert np.all(np.isfinite(d))
    np.testing.assert_allclose(d[2:4, 0], x[2:4, 0], rtol=1e-6)
  zeros = np.zeros((4, 4), np.float32)
  assert np.all(np.asarray(lb.quantize(zeros, lb.fp8_spec()).dequantize()) == 0)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_constant_and_zero_blocks(name):
  spec = REGISTRY[name]
  for x in (np.zeros((64, 4), np.float32), np.full((64, 4), -0.5, np.float32)):
    q, d = _roundtrip(spec)(x)
    d = np.asarray(d)
    assert np.all(np.isfinite(d))
    assert np.all(np.abs(d - x) <= error_bound(x, q))


def test_bf16_weights_keep_their_dtype():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 16)), jnp.bfloat16)
  q = lb.quantize(x, lb.int_spec(8))
  assert q.dtype == jnp.bfloat16 and q.dequantize().dtype == jnp.bfloat16


@pytest.mark.parametrize("name", [n for n in sorted(REGISTRY) if REGISTRY[n].scale_dtype == np.dtype(jnp.float16)])
def test_float16_scales_and_offsets_beyond_range_clip_instead_of_nan(name):
  """A float16 scale or offset beyond 65504 is clamped (formats/integer.py): values clip, nothing becomes inf/NaN
  (found by the property above: an offset of -1.3e5 stored as -inf)."""
  x = np.random.default_rng(3).standard_normal((64, 8)).astype(np.float32) * np.float32(4e4)
  x[5, 2], x[40, 3] = -1.3e5, 2.1e5
  q, d = _roundtrip(REGISTRY[name])(x)
  d = np.asarray(d)
  assert np.all(np.isfinite(d))
  assert np.all(np.abs(d - x) <= error_bound(x, q))
