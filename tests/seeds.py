"""Seeds that are equal in every process: the tests draw their random inputs from these, never from `hash()`.

`hash(str)` is salted per interpreter (PYTHONHASHSEED), so a seed built from it differs between runs and between
xdist workers, and a failure found with it cannot be reproduced. tests/test_seeds.py checks both claims in
subprocesses.
"""
from __future__ import annotations

import zlib

import jax

from qhelpers import quantize


def stable_seed(*parts) -> int:
  """CRC-32 of the parts' `str` joined by "/" (so `stable_seed("a", 1)` is `crc32(b"a/1")`), in [0, 2**32)."""
  return zlib.crc32("/".join(map(str, parts)).encode())


def random_case(spec, k: int, n: int, x_shape: tuple[int, ...], dtype, *seed_parts):
  """(x, w) for a kernel test: w = quantize(N(0, 0.1^2) of shape (k, n), spec) (jitted), x ~ N(0, 1) of shape
  (*x_shape, k) cast to `dtype`, both drawn from `stable_seed(*seed_parts)`."""
  kw, kx = jax.random.split(jax.random.PRNGKey(stable_seed(*seed_parts)))
  w = quantize(jax.random.normal(kw, (k, n)) * 0.1, spec)
  x = jax.random.normal(kx, x_shape + (k,)).astype(dtype)
  return x, w
