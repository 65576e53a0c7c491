"""load_gguf on hostile GGUF files: each ends in a CheckpointError naming the file and the broken field, within
seconds and bounded memory, never in a hang, another exception or a silently wrong load.

Mutants are stories260K.gguf with bytes patched at offsets found by `header_fields` of experiments/gguf_fuzz.py (a
walker of the header layout written independently of the loader), or small files assembled byte by byte here.
"""
from __future__ import annotations

import contextlib
import importlib
import resource
import signal
import struct
import sys
from pathlib import Path
from typing import Iterator

import pytest

from lowbit_jax.assets import asset_path
from lowbit_jax.io.gguf import load_gguf
from lowbit_jax.io.loaded import CheckpointError

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
REAL = asset_path("stories260K_gguf/stories260K.gguf")
SECONDS = 5  # per load; a valid load of this file takes ~0.05 s
MEGABYTES = 200  # growth of the process's peak RSS per load; the file is 1.2 MB
N_FUZZ = 300


@pytest.fixture(scope="module")
def fuzz():
  sys.path.insert(0, str(EXPERIMENTS))
  try:
    yield importlib.import_module("gguf_fuzz")
  finally:
    sys.path.remove(str(EXPERIMENTS))


@pytest.fixture(scope="module")
def real() -> bytes:
  return REAL.read_bytes()


@pytest.fixture(scope="module")
def fields(fuzz, real):
  """(kind name, label) -> the fields of that kind and label in the real file, in file order."""
  found: dict[tuple[str, str], list] = {}
  for f in fuzz.header_fields(real)[0]:
    found.setdefault((f.kind.name, f.label), []).append(f)
  return found


class _Timeout(BaseException):
  pass


def _raise_timeout(signum, frame):
  raise _Timeout(f"load_gguf took longer than {SECONDS} s")


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@contextlib.contextmanager
def _bounded() -> Iterator[None]:
  """Fails the test when the block runs longer than SECONDS or raises the process's peak RSS by more than
  MEGABYTES (RSS sees numpy buffers and memory maps too; tracemalloc would slow the parse tenfold)."""
  previous = signal.signal(signal.SIGALRM, _raise_timeout)
  rss_before = _peak_rss()
  signal.alarm(SECONDS)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
  growth = _peak_rss() - rss_before
  assert growth < MEGABYTES * 1e6, f"peak RSS grew by {growth / 1e6:.0f} MB"


def _rejected(path: Path, *words: str) -> str:
  with _bounded(), pytest.raises(CheckpointError) as info:
    load_gguf(path)
  message = str(info.value)
  assert message.startswith(str(path)), message
  for word in words:
    assert word in message, message
  return message


def _patched(tmp_path: Path, data: bytes, *edits: tuple[object, int], name: str = "mutant.gguf") -> Path:
  """`data` with each (field, value) written little-endian over the field."""
  out = bytearray(data)
  for field, value in edits:
    out[field.offset:field.offset + field.size] = value.to_bytes(field.size, "little")
  path = tmp_path / name
  path.write_bytes(bytes(out))
  return path


def _one(fields, kind: str, label: str, index: int = 0):
  return fields[kind, label][index]


# ------------------------------------------------------------------------------------------- counts and lengths

@pytest.mark.parametrize("key, kind", [("tokenizer.ggml.tokens", "STRING"), ("tokenizer.ggml.scores", "FLOAT32")])
@pytest.mark.parametrize("n", [2**31, 2**60, 2**61, 2**64 - 1])
def test_huge_metadata_array_length(tmp_path, real, fields, key, kind, n):
  path = _patched(tmp_path, real, (_one(fields, "ARRAY_LENGTH", key), n))
  _rejected(path, f"metadata key '{key}'", f"an array of {n} {kind} elements", "1.2 MB file")


@pytest.mark.parametrize("label, index, words", [
    ("general.name", 0, "metadata key 'general.name'"),  # a string value
    ("metadata key", 0, "metadata key #0"),  # a key
    ("tokenizer.ggml.tokens", 100, "metadata key 'tokenizer.ggml.tokens'"),  # an element of a string array
    ("tensor name", 3, "tensor info #3 name"),
])
@pytest.mark.parametrize("n", [2**31, 2**63, 2**64 - 1])
def test_huge_string_length(tmp_path, real, fields, label, index, words, n):
  path = _patched(tmp_path, real, (_one(fields, "STRING_LENGTH", label, index), n))
  _rejected(path, words, f"a string of {n} bytes")


@pytest.mark.parametrize("which", [0, 1])  # tensor count, metadata count
@pytest.mark.parametrize("n", [2**31, 2**60, 2**64 - 1])
def test_huge_tensor_or_metadata_count(tmp_path, real, fields, which, n):
  count = fields["COUNT", ("tensor count", "metadata count")[which]][0]
  _rejected(_patched(tmp_path, real, (count, n)), "tensor and metadata counts")


@pytest.mark.parametrize("n_dims", [0, 5, 2**31, 2**32 - 1])
def test_bad_n_dims(tmp_path, real, fields, n_dims):
  path = _patched(tmp_path, real, (_one(fields, "N_DIMS", "token_embd.weight"), n_dims))
  _rejected(path, "tensor 'token_embd.weight'", f"n_dims in 1..4 (GGML_MAX_DIMS), got {n_dims}")


@pytest.mark.parametrize("dims, words", [
    ((2**63, 512), "fewer than 2**63 elements"),
    ((2**32, 2**32), "fewer than 2**63 elements"),
    ((2**64 - 1, 2**64 - 1), "fewer than 2**63 elements"),
    ((0, 512), "every dimension >= 1"),
    ((64, 2**40), "inside the data section"),
    ((64, 513), "no overlap with tensor 'output.weight'"),  # one row more: the next tensor runs into it
])
def test_bad_dims(tmp_path, real, fields, dims, words):
  path = _patched(tmp_path, real, *zip(fields["DIM", "output.weight"], dims))  # a tensor in the middle
  _rejected(path, "tensor 'output.weight'", words)


def test_block_count_beyond_the_tensors(tmp_path, real, fields):
  path = _patched(tmp_path, real, (_one(fields, "SCALAR", "llama.block_count"), 2**31))
  _rejected(path, "llama.block_count", "at most 5 layers", "got 2147483648")


def test_block_count_of_wrong_type(tmp_path, real, fields):
  """A uint32 retyped as float32 (same width): the config wants an integer."""
  path = _patched(tmp_path, real, (_one(fields, "VALUE_TYPE", "llama.block_count"), 6))
  _rejected(path, "llama.block_count", "an integer, got float")


# ----------------------------------------------------------------------------------------------- tensor offsets

@pytest.mark.parametrize("offset, words", [
    (2**64 - 1, "an offset aligned to 32 bytes"),
    (2**64 - 32, "inside the data section"),  # aligned, and wraps to -32 in uint64 arithmetic
    (2**63, "inside the data section"),
])
def test_offset_wraparound(tmp_path, real, fields, offset, words):
  path = _patched(tmp_path, real, (_one(fields, "TENSOR_OFFSET", "output.weight"), offset))
  _rejected(path, "tensor 'output.weight'", words)


@pytest.mark.parametrize("delta", [1, 4, 16, 31])
def test_misaligned_offset(tmp_path, real, fields, delta):
  field = _one(fields, "TENSOR_OFFSET", "blk.2.attn_q.weight")
  path = _patched(tmp_path, real, (field, field.read(real) + delta))
  _rejected(path, "tensor 'blk.2.attn_q.weight'", "an offset aligned to 32 bytes")


def _last_offset(fields, real: bytes):
  """The offset field of the tensor that lies last in the data section."""
  return max((f[0] for k, f in fields.items() if k[0] == "TENSOR_OFFSET"), key=lambda f: f.read(real))


@pytest.mark.parametrize("delta", [256, 1024 * 32])  # 256: past the end by exactly the tensor's size
def test_offset_past_the_end(tmp_path, real, fields, delta):
  last = _last_offset(fields, real)
  path = _patched(tmp_path, real, (last, last.read(real) + delta))
  _rejected(path, f"tensor '{last.label}'", "inside the data section", "truncated")


@pytest.mark.parametrize("onto, delta", [("token_embd.weight", 0), ("blk.0.attn_q.weight", 32),
                                         ("blk.0.attn_q.weight", -32)])
def test_overlapping_tensors(tmp_path, real, fields, onto, delta):
  target = _one(fields, "TENSOR_OFFSET", onto).read(real)
  moved = _one(fields, "TENSOR_OFFSET", "output.weight")
  _rejected(_patched(tmp_path, real, (moved, target + delta)), "no overlap with tensor")


def test_gap_in_the_data_section(tmp_path, real, fields):
  """Moving the last tensor one alignment step on (the file grown to match) leaves 32 bytes no tensor owns."""
  last = _last_offset(fields, real)
  path = _patched(tmp_path, real + bytes(32), (last, last.read(real) + 32))
  _rejected(path, f"tensor '{last.label}'", "belong to no tensor")


def test_trailing_bytes(tmp_path, real):
  path = tmp_path / "long.gguf"
  path.write_bytes(real + bytes(64))
  _rejected(path, "data section", "trailing bytes")


# ------------------------------------------------------------------------------------------------ tensor types

@pytest.mark.parametrize("type_id", [4, 5, 42, 250, 2**31, 2**32 - 1])  # 4, 5: the removed Q4_2, Q4_3
def test_unknown_tensor_type(tmp_path, real, fields, type_id):
  path = _patched(tmp_path, real, (_one(fields, "TENSOR_TYPE", "blk.1.ffn_up.weight"), type_id))
  _rejected(path, "tensor 'blk.1.ffn_up.weight'", f"a known GGML tensor type, got type id {type_id}")


@pytest.mark.parametrize("tensor, type_id, words", [
    ("token_embd.weight", 28, "no overlap with tensor"),  # F32 -> F64: twice the bytes, runs into the next tensor
    ("token_embd.weight", 8, "belong to no tensor"),  # F32 -> Q8_0: a quarter of the bytes, a gap after it
    ("output_norm.weight", 12, "a multiple of the Q4_K block size 256"),  # 64 values are no Q4_K block
    ("blk.4.ffn_norm.weight", 1, "trailing bytes"),  # F32 -> F16 on the last tensor: the file is too long
])
def test_type_and_shape_do_not_fit_the_bytes(tmp_path, real, fields, tensor, type_id, words):
  _rejected(_patched(tmp_path, real, (_one(fields, "TENSOR_TYPE", tensor), type_id)), words)


# ----------------------------------------------------------------------------------------- truncation, duplicates

def test_truncated_at_many_cut_points(tmp_path, real, fuzz):
  all_fields, header_end = fuzz.header_fields(real)
  structural = [f for f in all_fields if f.kind.name != "STRING_LENGTH"] + all_fields[::16]
  cuts = sorted({c for f in structural for c in (f.offset, f.offset + 1, f.offset + f.size - 1)}
                | set(range(0, 24)) | {header_end, header_end + 8} | set(range(14176, len(real), 37_011))
                | {len(real) - 1})
  assert len(cuts) > 400
  for i, cut in enumerate(cuts):
    path = tmp_path / f"cut_{i}.gguf"
    path.write_bytes(real[:cut])
    _rejected(path)
    path.unlink()


def test_duplicate_tensor_name(tmp_path, real):
  data = real.replace(b"blk.0.attn_k.weight", b"blk.0.attn_q.weight")  # same length: the layout is unchanged
  path = tmp_path / "dup.gguf"
  path.write_bytes(data)
  _rejected(path, "tensor 'blk.0.attn_q.weight'", "each tensor name once")


def test_duplicate_metadata_key(tmp_path, real):
  path = tmp_path / "dup.gguf"
  path.write_bytes(real.replace(b"tokenizer.ggml.bos_token_id", b"tokenizer.ggml.eos_token_id"))
  _rejected(path, "metadata key 'tokenizer.ggml.eos_token_id'", "each key once")


# ----------------------------------------------------------------------------- malformed values, written by hand

def _str(s: bytes) -> bytes:
  return struct.pack("<Q", len(s)) + s


def _file(kvs: list[bytes], version: int = 3) -> bytes:
  """A GGUF file of these key/values (each `_str(key) + type + value`) and no tensors."""
  return b"GGUF" + struct.pack("<IQQ", version, 0, len(kvs)) + b"".join(kvs)


def _nested(depth: int) -> bytes:
  """A value of type ARRAY nested `depth` deep, the innermost an empty uint8 array."""
  value = struct.pack("<IQ", 0, 0)
  for _ in range(depth - 1):
    value = struct.pack("<IQ", 9, 1) + value
  return value


@pytest.mark.parametrize("data, words", [
    (_file([_str(b"a") + struct.pack("<I", 9) + _nested(10_000)]), "arrays nested at most 4 deep"),
    (_file([_str(b"a") + struct.pack("<IB", 7, 2)]), "booleans stored as 0 or 1"),
    (_file([_str(b"a") + struct.pack("<I", 13) + bytes(8)]), "a GGUF value type (0..12), got 13"),
    (_file([_str(b"\xff\xfe") + struct.pack("<IB", 0, 1)]), "invalid UTF-8"),
    (_file([_str(b"general.alignment") + struct.pack("<II", 4, 24)]), "a uint32 power of two, got UINT32 24"),
    (_file([_str(b"general.alignment") + struct.pack("<IQ", 10, 32)]), "a uint32 power of two, got UINT64 32"),
    (_file([], version=1), "one of (2, 3), got 1"),
    (_file([], version=3 << 24), "big-endian GGUF files are not supported"),
], ids=["nested_too_deep", "bool_2", "value_type_13", "key_not_utf8", "alignment_24", "alignment_uint64",
        "version_1", "big_endian"])
def test_malformed_values(tmp_path, data, words):
  path = tmp_path / "hand.gguf"
  path.write_bytes(data)
  _rejected(path, words)


def test_well_formed_hand_file_passes_the_header(tmp_path):
  """The hand-made files above fail for their one defect only: the same file with sound values gets past the
  header to the loader's next check (the architecture)."""
  path = tmp_path / "hand.gguf"
  path.write_bytes(_file([_str(b"a") + struct.pack("<I", 9) + _nested(4),
                          _str(b"general.alignment") + struct.pack("<II", 4, 64)]))
  _rejected(path, "architecture None is not supported")


# ---------------------------------------------------------------------------------------------------- seeded fuzz

def test_seeded_fuzz_loads_or_rejects(tmp_path, real, fuzz):
  """N_FUZZ random mutants (mostly of the header): each loads with finite params of the config's shapes or raises a
  CheckpointError naming the file, within SECONDS and MEGABYTES."""
  outcomes = []
  for i, mutant in enumerate(fuzz.mutants(real, N_FUZZ, seed=0)):
    path = tmp_path / f"mutant_{i}.gguf"
    path.write_bytes(mutant.data)
    result = fuzz.try_load(path, SECONDS)
    path.unlink()
    assert result.outcome in (fuzz.Outcome.LOADED, fuzz.Outcome.REJECTED), (mutant.description, result)
    assert result.rss_growth < MEGABYTES * 1e6, (mutant.description, result)
    outcomes.append(result.outcome)
  assert outcomes.count(fuzz.Outcome.REJECTED) > N_FUZZ // 2  # most mutants hit the header's checks
