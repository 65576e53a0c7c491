"""A validating parser of the GGUF (v2/v3) header: the index a hostile file can neither hang nor fool.

`read_gguf_header(path)` reads the header with `struct` from a read-only memory map and returns a `GGUFHeader`
(the metadata and every tensor's name, shape, type, offset and byte size) only when all of these hold, else it
raises `CheckpointError(path, "<field>: <what was expected>")`:

  * magic b"GGUF"; version 2 or 3, little-endian (a byte-swapped version is reported as big-endian, unsupported).
  * Every count and length is bounded by the bytes left in the file before anything is allocated or looped over:
    tensor count x 32 bytes (the smallest tensor info) + metadata count x 13 bytes (the smallest key/value), a
    string's length, an array's length x its element type's smallest size. Arrays nest at most 4 deep. So parsing
    takes time and memory linear in the file size, whatever the counts claim.
  * Metadata: known value types only (`gguf.GGUFValueType`), keys and strings valid UTF-8, booleans 0 or 1, no key
    twice. `general.alignment`, when present, is a uint32 power of two (default 32).
  * Tensor infos: a non-empty UTF-8 name under 64 bytes (GGML_MAX_NAME), unique; 1 <= n_dims <= 4 (GGML_MAX_DIMS);
    every dimension >= 1 and their product < 2**63; a known `gguf.GGMLQuantizationType`; ne[0] a whole number of
    the type's blocks; byte size = n_elements / block_size x type_size.
  * Data section (it starts at the header's end rounded up to the alignment): every offset is aligned, every tensor
    lies inside it (Python ints: no uint64 wraparound), no two tensors overlap, and the tensors, in offset order,
    cover it exactly: the first at offset 0, each next one at the previous one's aligned end, and the file ending
    between the last tensor's end and its aligned end (as llama.cpp's gguf.cpp requires).

`tensor_views(header)` then gives the tensors as gguf-py `ReaderTensor`s (what `gguf.GGUFReader` would give) over
one read-only `np.memmap` of the file, so gguf-py's reader, which loops once per claimed element, never runs.
"""
from __future__ import annotations

import dataclasses
import math
import mmap
import struct
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import gguf
import numpy as np

from lowbit_jax.io.loaded import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME (64) less the terminating NUL
MAX_ARRAY_NESTING = 4
_V = gguf.GGUFValueType
_SCALARS = {_V.UINT8: "<u1", _V.INT8: "<i1", _V.UINT16: "<u2", _V.INT16: "<i2", _V.UINT32: "<u4", _V.INT32: "<i4",
            _V.FLOAT32: "<f4", _V.BOOL: "<u1", _V.UINT64: "<u8", _V.INT64: "<i8", _V.FLOAT64: "<f8"}
_MIN_BYTES = {**{t: np.dtype(d).itemsize for t, d in _SCALARS.items()}, _V.STRING: 8, _V.ARRAY: 4 + 8}
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dimension, type, offset
# What GGUFReader gives as `data` for these types (element-typed arrays); every other type comes as raw bytes.
_TYPED = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
          gguf.GGMLQuantizationType.F64: np.float64, gguf.GGMLQuantizationType.I8: np.int8,
          gguf.GGMLQuantizationType.I16: np.int16, gguf.GGMLQuantizationType.I32: np.int32,
          gguf.GGMLQuantizationType.I64: np.int64}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One validated tensor: `dims` in GGUF order (ne[0], the fastest-varying, first); `offset` from the start of the
  data section; `n_bytes` its exact byte size."""
  name: str
  dims: tuple[int, ...]
  ggml_type: gguf.GGMLQuantizationType
  offset: int
  n_bytes: int


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
  """The validated index of a GGUF file (see the module docstring for what was checked).

  `metadata` maps each key to a plain Python value (int, float, bool, str, or a list of them, nested for arrays of
  arrays); `value_types` gives each key's GGUF type (an array's is ARRAY). `tensors` are in file order;
  `data_start` is the data section's absolute offset.
  """
  path: Path
  version: int
  metadata: Mapping[str, Any]
  value_types: Mapping[str, gguf.GGUFValueType]
  tensors: tuple[TensorInfo, ...]
  alignment: int
  data_start: int
  file_size: int


class _Cursor:
  """Reads little-endian values from `buf`, failing with a CheckpointError before reading past its end."""

  def __init__(self, path: Path, buf: mmap.mmap, size: int, pos: int = 0):
    self.path, self.buf, self.size, self.pos = path, buf, size, pos

  def fail(self, field: str, expected: str) -> CheckpointError:
    return CheckpointError(self.path, f"{field}: {expected}")

  def need(self, n_bytes: int, field: str, what: str) -> None:
    """Raises unless `n_bytes` (the least `what` can take) are left in the file."""
    left = self.size - self.pos
    if n_bytes > left:
      raise self.fail(field, f"{what} needs at least {n_bytes} bytes at offset {self.pos}, but only {left} of the "
                             f"{_human(self.size)} file are left (truncated or corrupted)")

  def take(self, n_bytes: int, field: str, what: str) -> bytes:
    self.need(n_bytes, field, what)
    self.pos += n_bytes
    return self.buf[self.pos - n_bytes:self.pos]

  def unpack(self, fmt: str, field: str, what: str) -> tuple[Any, ...]:
    return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), field, what))

  def string(self, field: str) -> str:
    (n_bytes,) = self.unpack("Q", field, "a string length")
    raw = self.take(n_bytes, field, f"a string of {n_bytes} bytes")
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise self.fail(field, f"a UTF-8 string, got invalid UTF-8 ({e.reason} at byte {e.start})") from e


def read_gguf_header(path: str | Path) -> GGUFHeader:
  """The validated header of the GGUF file at `path`.

  Raises:
    FileNotFoundError: when `path` does not exist.
    CheckpointError: naming `path` and the first field that breaks an invariant of the module docstring.
  """
  path = Path(path)
  with path.open("rb") as f:
    magic = f.read(4)
    if magic != MAGIC:
      raise CheckpointError(path, f"magic: expected {MAGIC!r}, got {magic!r}")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
      return _parse(_Cursor(path, buf, len(buf), pos=len(MAGIC)))


def _parse(cur: _Cursor) -> GGUFHeader:
  version = _version(cur)
  n_tensors, n_kv = cur.unpack("QQ", "tensor and metadata counts", "the two counts")
  cur.need(n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES, "tensor and metadata counts",
           f"{n_tensors} tensor infos and {n_kv} metadata key/values")
  metadata: dict[str, Any] = {}
  value_types: dict[str, gguf.GGUFValueType] = {}
  for i in range(n_kv):  # bounded: n_kv * 13 bytes fit in the file
    key = cur.string(f"metadata key #{i}")
    field = f"metadata key {key!r}"
    if key in metadata:
      raise cur.fail(field, "each key once, got it twice")
    (type_id,) = cur.unpack("I", field, "a value type")
    value_types[key] = _value_type(cur, type_id, field)
    metadata[key] = _value(cur, value_types[key], field, depth=0)
  raw_infos = [_tensor_info(cur, i) for i in range(n_tensors)]  # bounded: n_tensors * 32 bytes fit in the file
  alignment = _alignment(cur, metadata, value_types)
  data_start = _round_up(cur.pos, alignment)
  infos = tuple(_checked_tensor(cur, *raw, alignment=alignment) for raw in raw_infos)
  _check_names(cur, infos)
  _check_layout(cur, infos, alignment, data_size=cur.size - data_start)
  return GGUFHeader(path=cur.path, version=version, metadata=MappingProxyType(metadata),
                    value_types=MappingProxyType(value_types), tensors=infos, alignment=alignment,
                    data_start=data_start, file_size=cur.size)


def _version(cur: _Cursor) -> int:
  (version,) = cur.unpack("I", "version", "the version")
  if version in VERSIONS:
    return version
  if int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
    raise cur.fail("version", "a little-endian file; big-endian GGUF files are not supported")
  raise cur.fail("version", f"one of {VERSIONS}, got {version}")


def _value_type(cur: _Cursor, type_id: int, field: str) -> gguf.GGUFValueType:
  try:
    return _V(type_id)
  except ValueError:
    raise cur.fail(field, f"a GGUF value type (0..{int(max(_V))}), got {type_id}") from None


def _value(cur: _Cursor, kind: gguf.GGUFValueType, field: str, depth: int) -> Any:
  """One metadata value of type `kind` (scalars as Python scalars, arrays as lists)."""
  if kind == _V.STRING:
    return cur.string(field)
  if kind == _V.ARRAY:
    return _array(cur, field, depth + 1)
  return _scalars(cur, kind, 1, field)[0]


def _array(cur: _Cursor, field: str, depth: int) -> list[Any]:
  if depth > MAX_ARRAY_NESTING:
    raise cur.fail(field, f"arrays nested at most {MAX_ARRAY_NESTING} deep")
  type_id, n = cur.unpack("IQ", field, "an array header")
  kind = _value_type(cur, type_id, field)
  cur.need(n * _MIN_BYTES[kind], field, f"an array of {n} {kind.name} elements")
  if kind in _SCALARS:
    return _scalars(cur, kind, n, field)
  return [_value(cur, kind, field, depth) for _ in range(n)]  # bounded: n * min size fit in the file


def _scalars(cur: _Cursor, kind: gguf.GGUFValueType, n: int, field: str) -> list[Any]:
  dtype = np.dtype(_SCALARS[kind])
  values = np.frombuffer(cur.take(n * dtype.itemsize, field, f"{n} {kind.name} values"), dtype)
  if kind == _V.BOOL:
    if np.any(values > 1):
      raise cur.fail(field, "booleans stored as 0 or 1")
    return values.astype(bool).tolist()
  return values.tolist()


def _tensor_info(cur: _Cursor, i: int) -> tuple[str, tuple[int, ...], int, int]:
  """(name, dims, type id, offset) of the i-th tensor info, with only n_dims checked (it sizes the read)."""
  name = cur.string(f"tensor info #{i} name")
  field = f"tensor {name!r}"
  if not 0 < len(name.encode("utf-8")) <= MAX_NAME_BYTES:
    raise cur.fail(field, f"a name of 1..{MAX_NAME_BYTES} bytes")
  (n_dims,) = cur.unpack("I", field, "n_dims")
  if not 1 <= n_dims <= MAX_DIMS:
    raise cur.fail(field, f"n_dims in 1..{MAX_DIMS} (GGML_MAX_DIMS), got {n_dims}")
  dims = cur.unpack(f"{n_dims}Q", field, f"{n_dims} dimensions")
  type_id, offset = cur.unpack("IQ", field, "a type and an offset")
  return name, dims, type_id, offset


def _alignment(cur: _Cursor, metadata: dict[str, Any], value_types: dict[str, gguf.GGUFValueType]) -> int:
  if "general.alignment" not in metadata:
    return DEFAULT_ALIGNMENT
  value, kind = metadata["general.alignment"], value_types["general.alignment"]
  if kind != _V.UINT32 or value <= 0 or value & (value - 1):
    raise cur.fail("metadata key 'general.alignment'", f"a uint32 power of two, got {kind.name} {value!r}")
  return value


def _checked_tensor(cur: _Cursor, name: str, dims: tuple[int, ...], type_id: int, offset: int, *,
                    alignment: int) -> TensorInfo:
  field = f"tensor {name!r}"
  if min(dims) < 1:
    raise cur.fail(field, f"every dimension >= 1, got {list(dims)}")
  n_elements = math.prod(dims)
  if n_elements >= 2**63:
    raise cur.fail(field, f"fewer than 2**63 elements, got dims {list(dims)} ({n_elements} elements)")
  try:
    kind = gguf.GGMLQuantizationType(type_id)
  except ValueError:
    raise cur.fail(field, f"a known GGML tensor type, got type id {type_id} (corrupted tensor info)") from None
  block, type_size = gguf.GGML_QUANT_SIZES[kind]
  if dims[0] % block:
    raise cur.fail(field, f"ne[0] a multiple of the {kind.name} block size {block}, got dims {list(dims)}")
  if offset % alignment:
    raise cur.fail(field, f"an offset aligned to {alignment} bytes, got {offset}")
  return TensorInfo(name=name, dims=dims, ggml_type=kind, offset=offset, n_bytes=n_elements // block * type_size)


def _check_names(cur: _Cursor, infos: tuple[TensorInfo, ...]) -> None:
  seen: set[str] = set()
  for info in infos:
    if info.name in seen:
      raise cur.fail(f"tensor {info.name!r}", "each tensor name once, got it twice")
    seen.add(info.name)


def _check_layout(cur: _Cursor, infos: tuple[TensorInfo, ...], alignment: int, data_size: int) -> None:
  """Every tensor inside the data section, no overlaps, no gaps beyond alignment padding, nothing after the end."""
  for info in infos:  # first, so that a tensor sent far away is named rather than the gap it leaves
    if info.offset + info.n_bytes > data_size:
      raise cur.fail(f"tensor {info.name!r}", f"to lie inside the data section of {max(data_size, 0)} bytes, got "
                                              f"bytes [{info.offset}, {info.offset + info.n_bytes}) for "
                                              f"{info.ggml_type.name} {list(info.dims)} (file truncated, or offset "
                                              f"or shape corrupted)")
  in_order = sorted(infos, key=lambda t: t.offset)
  for before, info in zip(in_order, in_order[1:]):  # then overlaps, before the gap a moved tensor leaves behind
    if info.offset < before.offset + before.n_bytes:
      raise cur.fail(f"tensor {info.name!r}", f"no overlap with tensor {before.name!r}, which ends at "
                                              f"{before.offset + before.n_bytes}, got bytes [{info.offset}, "
                                              f"{info.offset + info.n_bytes})")
  end = 0
  for info in in_order:
    if info.offset != _round_up(end, alignment):
      raise cur.fail(f"tensor {info.name!r}", f"offset {_round_up(end, alignment)} (right after the previous "
                                              f"tensor), got {info.offset}: bytes [{end}, {info.offset}) of the "
                                              f"data section belong to no tensor")
    end = info.offset + info.n_bytes
  if data_size > _round_up(end, alignment):
    raise cur.fail("data section", f"at most {_round_up(end, alignment)} bytes (the last tensor's aligned end), "
                                   f"got {data_size}: trailing bytes after the last tensor")


def tensor_views(header: GGUFHeader) -> dict[str, gguf.ReaderTensor]:
  """Each tensor, by name, as the `gguf.ReaderTensor` `gguf.GGUFReader` would give: `shape` the GGUF dims (uint64),
  `data` a read-only view of one memory map of the file, element-typed for F32/F16/F64/I8..I64 (numpy shape the
  reversed dims), raw bytes for block types (numpy shape the reversed dims with ne[0] in bytes). `field` is None."""
  if not header.tensors:
    return {}
  data = np.memmap(header.path, mode="r")
  views = {}
  for t in header.tensors:
    start = header.data_start + t.offset
    raw = data[start:start + t.n_bytes]
    np_dims = tuple(reversed(t.dims))
    if t.ggml_type in _TYPED:
      array = raw.view(_TYPED[t.ggml_type]).reshape(np_dims)
    else:
      array = raw.reshape(gguf.quants.quant_shape_to_byte_shape(np_dims, t.ggml_type))
    views[t.name] = gguf.ReaderTensor(name=t.name, tensor_type=t.ggml_type, shape=np.array(t.dims, np.uint64),
                                      n_elements=math.prod(t.dims), n_bytes=t.n_bytes,
                                      data_offset=start, data=array, field=None)
  return views


def _round_up(n: int, alignment: int) -> int:
  return -(-n // alignment) * alignment


def _human(n_bytes: int) -> str:
  return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 1e5 else f"{n_bytes} byte"
