"""Bit packing: exact round trips for every width, byte counts, and the documented split-chunk layout."""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from lowbit_jax.formats import packing


@st.composite
def codes_and_bits(draw):
  bits = draw(st.sampled_from([2, 3, 4, 8]))
  m = packing.pack_multiple(bits)
  length = m * draw(st.sampled_from([1, 2, 7]))      # few distinct shapes: each one is a compilation
  cols = draw(st.sampled_from([1, 3]))
  axis = draw(st.sampled_from([0, -2, -1]))
  shape = (length, cols) if axis in (0, -2) else (cols, length)
  codes = draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, 2 ** bits - 1)))
  return codes, bits, axis


@given(codes_and_bits())
def test_pack_unpack_round_trip_is_exact(case):
  codes, bits, axis = case
  packed = packing.pack(codes, bits, axis)
  assert packed.dtype == np.uint8
  assert packed.shape[axis] == codes.shape[axis] * bits // 8 == packing.packed_length(codes.shape[axis], bits)
  np.testing.assert_array_equal(np.asarray(packing.unpack(packed, bits, axis)), codes)


def test_int4_layout_is_split_chunks():
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 16, size=(8, 3), dtype=np.uint8)
  packed = np.asarray(packing.pack(codes, 4, 0))
  np.testing.assert_array_equal(packed, codes[:4] | (codes[4:] << 4))


def test_int3_layout_is_two_planes():
  rng = np.random.default_rng(1)
  codes = rng.integers(0, 8, size=(16, 2), dtype=np.uint8)
  packed = np.asarray(packing.pack(codes, 3, 0))
  lo, hi = codes & 3, codes >> 2
  two_bit = lo[0:4] | lo[4:8] << 2 | lo[8:12] << 4 | lo[12:16] << 6
  one_bit = sum(hi[2 * j:2 * j + 2] << j for j in range(8))
  np.testing.assert_array_equal(packed, np.concatenate([two_bit, one_bit]))


def test_bad_lengths_raise():
  with pytest.raises(ValueError, match="multiple of 8"):
    packing.pack(np.zeros((12, 2), np.uint8), 3, 0)
  with pytest.raises(ValueError, match="unsupported code width"):
    packing.planes(5)
  with pytest.raises(ValueError, match="uint8"):
    packing.unpack(np.zeros((4, 2), np.int32), 4, 0)
