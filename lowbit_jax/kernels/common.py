"""Shared pieces of the kernels: the `Backend` / `Platform` enums, the dispatch log, the reference-backed
`custom_vjp`, and the in-kernel decoding of packed codes (used by both the Triton and the Mosaic TPU kernels).

The dispatch log: every dispatcher call records one `Decision` at trace time (which implementation ran and why),
so a test or a user can ask `last_decision()` why a kernel fell back to the reference. It is plain Python state,
written while tracing, never inside a jitted computation.
"""
from __future__ import annotations

import collections
import dataclasses
import enum

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax.formats import nf4
from lowbit_jax.spec import Format


class Backend(enum.Enum):
  AUTO = "auto"            # the Pallas kernel when it is legal for the platform, else the reference
  REFERENCE = "reference"  # the pure-jnp spec
  PALLAS = "pallas"        # the Pallas kernel; an illegal configuration raises instead of falling back


class Platform(enum.Enum):
  """Which kernel family: Pallas Triton (CUDA GPUs) or Pallas Mosaic TPU."""
  GPU = "gpu"
  TPU = "tpu"


# Platforms whose Pallas kernels have been compiled, run and checked against the reference on real hardware
# (benchmarks/kernels.py --full on the device, table in benchmarks/RESULTS.md). `Backend.AUTO` uses a kernel on a
# device only when its platform is listed here; `Backend.PALLAS` (or interpret mode) opts in regardless. Empty
# until a session with a GPU/TPU runs that check: lowering on the CPU does not run the Triton/Mosaic compilers.
VERIFIED_ON_HARDWARE: frozenset = frozenset()


def detect_platform() -> Platform | None:
  """The kernel family for JAX's default backend, or None (CPU: Pallas runs there only in interpret mode)."""
  name = jax.default_backend()
  if name in ("gpu", "cuda"):
    return Platform.GPU
  if name == "tpu":
    return Platform.TPU
  return None


@dataclasses.dataclass(frozen=True)
class Decision:
  """One dispatch: the op, the implementation used (REFERENCE or PALLAS), the kernel family and why."""
  op: str
  backend: Backend
  platform: Platform | None
  reason: str


_LOG: collections.deque = collections.deque(maxlen=1024)


def record(decision: Decision) -> Decision:
  _LOG.append(decision)
  return decision


def decisions() -> list[Decision]:
  """The most recent dispatch decisions (oldest first, at most 1024)."""
  return list(_LOG)


def last_decision() -> Decision | None:
  return _LOG[-1] if _LOG else None


def clear_decisions() -> None:
  _LOG.clear()


def round_up(a: int, b: int) -> int:
  return -(-a // b) * b


def pad_to(a, shape):
  """Zero-pad `a` at the end of every axis up to `shape` (a no-op when already there)."""
  pads = [(0, t - s) for s, t in zip(a.shape, shape)]
  return jnp.pad(a, pads) if any(p for _, p in pads) else a


def with_reference_vjp(kernel, reference):
  """`kernel(x, w)` as the forward, the reference's VJP (w.r.t. x and w's float leaves) as the backward.

  QLoRA/QAT need d/dx through a quantized matmul; the kernel's output equals the reference's, so its
  gradient is the reference's. Integer leaves of w (codes, zero points) get float0 cotangents.
  """

  @jax.custom_vjp
  def f(x, w):
    return kernel(x, w)

  def fwd(x, w):
    return kernel(x, w), (x, w)

  def bwd(res, g):
    x, w = res
    return jax.vjp(reference, x, w)[1](g)

  f.defvjp(fwd, bwd)
  return f


# --- in-kernel decoding of one packed tile (pure jnp on loaded values; Triton and Mosaic both lower it) ---------

def plane_field(packed, j: int, width: int):
  """Field j (code rows j*L/p + i) of a split-chunk packed uint8 tile, as int32 in [0, 2**width)."""
  v = packed.astype(jnp.int32)
  if width == 8:
    return v
  return (v >> (j * width)) & ((1 << width) - 1)


def _nf4_levels(idx):
  """NF4 level of each 4-bit index by a chain of 15 compare-selects against scalar levels (no gather: neither
  Triton nor Mosaic lowers an in-register table lookup); one live tile, so it stays cheap in registers."""
  vals = jnp.full(idx.shape, np.float32(nf4.LEVELS[0]), jnp.float32)
  for level in range(1, 16):
    vals = jnp.where(idx == level, np.float32(nf4.LEVELS[level]), vals)
  return vals


def decode_codes(codes, fmt: Format, bits: int, symmetric: bool):
  """Float32 ``code - implicit_zero`` (symmetric INT, ternary), the NF4 level, the raw code (asymmetric INT,
  whose zero point the caller subtracts) or the FP8 value, for an int32 field (a float8 tile for FP8)."""
  if fmt in (Format.FP8_E4M3, Format.FP8_E5M2):
    return codes.astype(jnp.float32)
  if fmt is Format.NF4:
    return _nf4_levels(codes)
  if fmt is Format.TERNARY:
    return (codes - 1).astype(jnp.float32)
  if symmetric:
    return (codes - (1 << (bits - 1))).astype(jnp.float32)
  return codes.astype(jnp.float32)


def expand_rows(rows, n_rows: int):
  """(R, tn) per-group rows -> (n_rows, tn), each row repeated n_rows / R times (R == 1: a broadcast)."""
  r, tn = rows.shape
  if r == 1:
    return rows
  return jnp.broadcast_to(rows[:, None, :], (r, n_rows // r, tn)).reshape(n_rows, tn)
