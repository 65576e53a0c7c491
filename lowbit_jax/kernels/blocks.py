"""Block sizes of the Pallas kernels: one frozen dataclass, one legality check, one heuristic.

Vocabulary (shared by every op): the kernels contract `p` contiguous *chunks* of the padded contraction axis, one
per field of a packed byte (split-chunk layout, `formats/packing.py`): `kc = K_pad / p` code rows per chunk, and
a K step reads `block_k` byte rows, i.e. `block_k` code rows of every chunk. `p = 1` for 8-bit codes.

Rules the check enforces (a violated rule is a fallback reason, never a crash):
  * all: `block_k | kc`; `block_n | N`; with per-group scales, `block_k | group` or `group | block_k` (a tile
    never straddles a group); `split_k | kc / block_k`.
  * GPU (Triton): every block a power of two >= 16 (tl.dot's minimum; Triton tensors are powers of two).
  * TPU (Mosaic): the last two dims of every block divisible by (8, 128) or equal to the array's: `block_k` a
    multiple of 128 (x's lane dim; 8-bit codes then also meet the (32, 128) int8 tiling) or the whole chunk (x
    then goes in as a (p, M, K_pad/p) copy, so the block is a full dim); `block_n` a multiple of 128 or all of N;
    `block_m` a multiple of the activation dtype's native tile rows (8 / 16 / 32 for 4- / 2- / 1-byte dtypes;
    M is padded to it); no split-K (a TPU core runs the grid sequentially, so split-K only adds a reduction).
The heuristic: decode (M <= 64) is bandwidth-bound, so the GPU gets narrow N tiles and split-K until there are
about two waves of programs on an H100 (132 SMs); prefill gets 128-wide tiles for tensor-core reuse. The TPU gets
big tiles (few grid steps, <= ~4 MiB of VMEM per buffer) and M tiles of up to 256 rows.
"""
from __future__ import annotations

import dataclasses

from lowbit_jax.kernels.common import Platform, round_up

GPU_SMS = 132   # H100 SXM


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: `block_m` activation rows, `block_n` output columns, `block_k` byte rows per K step (code rows
  per chunk), and `split_k` independent K ranges summed afterwards (GPU only)."""
  block_m: int
  block_n: int
  block_k: int
  split_k: int = 1


def _pow2(v: int) -> bool:
  return v > 0 and v & (v - 1) == 0


def _next_pow2(v: int) -> int:
  return 1 << max(0, (v - 1).bit_length())


def check(platform: Platform, b: BlockSizes, *, m: int, n: int, kc: int, p: int, group: int | None,
          x_bytes: int = 2) -> str | None:
  """None when `b` is legal for the problem (M rows, N columns, chunk length kc, p chunks, group length, bytes
  per activation element as the kernel reads it), else the reason it is not."""
  if min(b.block_m, b.block_n, b.block_k, b.split_k) < 1:
    return f"blocks must be positive, got {b}"
  if kc % b.block_k:
    return f"block_k {b.block_k} does not divide the chunk length K_pad/{p} = {kc}"
  if group is not None and group % b.block_k and b.block_k % group:
    return f"block_k {b.block_k} and the group length {group} do not divide one another"
  if n % b.block_n:
    return f"block_n {b.block_n} does not divide N = {n}"
  if platform is Platform.TPU and b.split_k != 1:
    return "split-K is GPU-only"
  if (kc // b.block_k) % b.split_k:
    return f"split_k {b.split_k} does not divide the {kc // b.block_k} K steps"
  if platform is Platform.GPU:
    for name in ("block_m", "block_n", "block_k"):
      v = getattr(b, name)
      if not _pow2(v) or v < 16:
        return f"Triton needs power-of-two blocks >= 16, got {name}={v}"
    return None
  if b.block_k % 128 and b.block_k != kc:
    return f"Mosaic TPU needs block_k % 128 == 0 (x's lane dim) or block_k == K_pad/{p} = {kc}, got {b.block_k}"
  if b.block_n % 128 and b.block_n != n:
    return f"Mosaic TPU needs block_n % 128 == 0 or block_n == N = {n}, got {b.block_n}"
  if b.block_m % _sublanes(x_bytes):
    return f"Mosaic TPU needs block_m % {_sublanes(x_bytes)} == 0 for {x_bytes}-byte activations, got {b.block_m}"
  if group is not None and b.block_k > group and group % 8:
    return f"Mosaic TPU expands per-group scales by a sublane reshape; needs group % 8 == 0, got {group}"
  return None


def _divisors(total: int, candidates) -> list[int]:
  return [c for c in candidates if c <= total and total % c == 0]


def _sublanes(x_bytes: int) -> int:
  """Rows of one native TPU tile of a 4/2/1-byte dtype (8, 16, 32)."""
  return 32 // max(1, min(x_bytes, 4))


def heuristic(platform: Platform, *, m: int, n: int, kc: int, p: int, group: int | None,
              x_bytes: int = 2) -> BlockSizes | str:
  """Block sizes for the problem, or the reason no legal tiling exists."""
  decode = m <= 64

  def k_ok(bk):
    return group is None or group % bk == 0 or bk % group == 0

  if platform is Platform.GPU:
    bm = min(max(_next_pow2(m), 16), 64 if decode else 128)
    bns = _divisors(n, (64, 32, 16) if decode else (128, 64, 32, 16))
    bks = [bk for bk in _divisors(kc, (256, 128, 64, 32, 16) if decode else (128, 64, 32, 16)) if k_ok(bk)]
    if not bns:
      return f"no power-of-two block_n >= 16 divides N = {n}"
    if not bks:
      return f"no power-of-two block_k >= 16 divides K_pad/{p} = {kc} (compatible with group {group})"
    bn, bk = bns[0], bks[0]
    steps, programs, split = kc // bk, (n // bn) * -(-m // bm), 1
    while decode and programs * split < 2 * GPU_SMS and steps % (2 * split) == 0 and steps // (2 * split) >= 2:
      split *= 2
    return BlockSizes(bm, bn, bk, split)
  bm = round_up(max(m, 1), _sublanes(x_bytes)) if m <= 256 else 256
  bns = _divisors(n, (512, 256, 128))
  bks = [bk for bk in _divisors(kc, (1024, 512, 256, 128) if decode else (512, 256, 128)) if k_ok(bk)]
  if not bks and kc <= 4096 and k_ok(kc):   # one K step over the whole chunk (a full-dim block), narrow N
    bks, bns = [kc], bns[-1:]
  if not bks:
    return f"no block_k (a multiple of 128 dividing K_pad/{p} = {kc}, or all of it) fits group {group}"
  bn = bns[0] if bns else n
  if bn * bks[0] * 4 > 8 * 2 ** 20:
    return f"a {bks[0]} x {bn} f32 tile does not fit VMEM (N = {n} has no 128-multiple tile)"
  return BlockSizes(bm, bn, bks[0], 1)


def choose(platform: Platform, blocks: BlockSizes | None, **problem) -> BlockSizes | str:
  """`blocks` if given and legal, else the heuristic's; a str is the reason neither works."""
  b = heuristic(platform, **problem) if blocks is None else blocks
  if isinstance(b, str):
    return b
  why = check(platform, b, **problem)
  return why if why else b
