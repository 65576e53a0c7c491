"""Write a Llama model as a GGUF v3 file that llama.cpp runs and `load_gguf` reads back.

    report = export_gguf("model.Q4_0.gguf", loaded.config, qparams, loaded.tokenizer, tensor_type=ExportType.Q4_0,
                         chat_template=loaded.chat_template)
    print(report.table())

What is written:
  * Metadata: `general.architecture = llama`, `general.name`, `general.file_type` (llama.cpp's LLAMA_FTYPE of the
    chosen type), `general.quantization_version`; every `llama.*` hyperparameter (context_length,
    embedding_length, block_count, feed_forward_length, rope.dimension_count = head_dim, attention.head_count,
    attention.head_count_kv, attention.layer_norm_rms_epsilon, rope.freq_base, vocab_size); the tokenizer's own
    `to_gguf_metadata()` (SentencePiece-style "llama" or byte-level BPE "gpt2"); `tokenizer.chat_template` when
    given.
  * Tensors, named and laid out exactly as `load_gguf` reads them: a Flax kernel (in, out) is stored as the numpy
    (out, in) array, GGUF shape [in, out] (ne[0] = in: ggml blocks run along the input features); the embedding
    (vocab, dim) as is; the norm scales 1-D. A tied model has no `output.weight` (llama.cpp then uses
    `token_embd.weight` as the classifier).
  * RoPE: our model rotates interleaved pairs (2i, 2i+1) of each head (Meta's and llama2.c's convention), which
    is what llama.cpp's `llama` architecture does (LLAMA_ROPE_TYPE_NORM); it is llama.cpp's HF converter that
    permutes HF's half-split q/k rows into this layout. So wq and wk are written unpermuted, as the loader reads
    them.
  * Per tensor type: `gguf_types.choose_type` (llama.cpp's `llama-quantize` rules: norms F32, the classifier or
    tied embedding Q6_K / Q8_0, a fallback for rows that are not whole blocks). Then, for each tensor:
      - a QArray whose spec maps onto that block type (`ggml_blocks.from_qarray`: int4 g32 float16 symmetric ->
        Q4_0, `q4_1_spec()` -> Q4_1, int8 g32 float16 -> Q8_0) is written as its own codes and scales, so what
        GPTQ / AWQ chose is what llama.cpp runs;
      - any other QArray is dequantized and quantized again into the block type, with a `warnings.warn` naming
        the tensor and why (or, for a float type, written dequantized);
      - a float array is quantized with `ggml_blocks.quantize` (byte-identical to `gguf.quants.quantize` for the
        types gguf-py implements), or converted for F32 / F16 / BF16.

Everything is validated and encoded before the file is opened, and the file is written under a temporary name and
renamed, so an error never leaves a partial file behind.
"""
from __future__ import annotations

import dataclasses
import enum
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import jax
import numpy as np

from lowbit_jax import select as sel
from lowbit_jax.io import ggml_blocks
from lowbit_jax.io.chat import ChatTemplate
from lowbit_jax.io.gguf import _GLOBAL_TENSORS, _LAYER_TENSORS
from lowbit_jax.io.gguf_types import ExportType, Role, Rule, TypeChoice, choose_type
from lowbit_jax.io.loaded import TextTokenizer, expected_shapes, validate_config
from lowbit_jax.models.llama import LlamaConfig, unstack_layers
from lowbit_jax.qarray import QArray, dequantize

_T = gguf.GGMLQuantizationType
_FLOAT_TYPES = (_T.F32, _T.F16, _T.BF16)


class ExportError(ValueError):
  """The inputs of `export_gguf` cannot be written: the message names the parameter path or argument at fault."""


class Source(enum.Enum):
  """Where a written tensor's bytes come from."""
  FLOAT = "float"                 # a float array, converted to F32 / F16 / BF16
  QUANTIZED = "quantized"         # a float array, quantized into blocks by ggml_blocks.quantize
  BLOCKS = "QArray blocks"        # a QArray's own codes and scales (ggml_blocks.from_qarray), exact
  REQUANTIZED = "requantized"     # a QArray that does not map onto the block type, dequantized and quantized again
  DEQUANTIZED = "dequantized"     # a QArray written in a float type


@dataclasses.dataclass(frozen=True)
class TensorRecord:
  """One written tensor. `shape` is the GGUF shape (ne[0] first); `n_bytes` its data bytes in the file."""
  name: str
  flax_path: str
  shape: tuple[int, ...]
  ggml_type: gguf.GGMLQuantizationType
  role: Role
  rule: Rule
  source: Source
  n_params: int
  n_bytes: int
  note: str = ""

  @property
  def bits_per_weight(self) -> float:
    return 8.0 * self.n_bytes / self.n_params


@dataclasses.dataclass(frozen=True)
class ExportReport:
  """What `export_gguf` wrote. Bits per weight count tensor data bytes only (not the metadata; `file_size` has
  everything): `bits_per_weight` over all tensors, `linear_bits_per_weight` over the projections (the per-layer
  attention and FFN matrices, and an untied `output.weight`; not the embedding, tied or not, nor the norms)."""
  path: Path
  export_type: ExportType
  file_size: int
  tensors: tuple[TensorRecord, ...]

  @property
  def bits_per_weight(self) -> float:
    return _bits(self.tensors)

  @property
  def linear_bits_per_weight(self) -> float:
    return _bits([t for t in self.tensors if t.role in (Role.LINEAR, Role.OUTPUT)])

  @property
  def fallbacks(self) -> tuple[str, ...]:
    """Tensors whose rows are not whole blocks of the type the rules chose, written in llama.cpp's fallback."""
    return tuple(t.name for t in self.tensors if t.rule is Rule.SHAPE_FALLBACK)

  @property
  def requantized(self) -> tuple[str, ...]:
    """QArray tensors whose spec does not map onto their block type: dequantized and quantized again."""
    return tuple(t.name for t in self.tensors if t.source is Source.REQUANTIZED)

  def summary(self) -> str:
    """Size and bits per weight in one line."""
    return (f"{self.path} ({self.export_type.value}): {self.file_size:,} bytes, {self.linear_bits_per_weight:.3f} "
            f"bits/weight over the linear weights, {self.bits_per_weight:.3f} over all tensors")

  def table(self) -> str:
    """A Markdown table of every tensor, after the summary, the fallbacks and the requantized tensors."""
    lines = [self.summary(), "", f"fallbacks: {', '.join(self.fallbacks) or 'none'}",
             f"requantized: {', '.join(self.requantized) or 'none'}", "",
             "| tensor | GGUF shape | type | bits/weight | source | rule |", "|---|---|---|---|---|---|"]
    for t in self.tensors:
      rule = t.rule.value + (f" ({t.note})" if t.note else "")
      lines.append(f"| {t.name} | {list(t.shape)} | {t.ggml_type.name} | {t.bits_per_weight:.3f} | "
                   f"{t.source.value} | {rule} |")
    return "\n".join(lines)


def _bits(records) -> float:
  params = sum(t.n_params for t in records)
  return 8.0 * sum(t.n_bytes for t in records) / params if params else 0.0


@dataclasses.dataclass(frozen=True)
class _Planned:
  """A tensor to write: its leaf, whether the Flax array is the transpose of the numpy GGUF array, its type."""
  name: str
  flax_path: str
  leaf: Any
  transpose: bool
  role: Role
  choice: TypeChoice


def export_gguf(path: str | Path, config: LlamaConfig, params: Mapping[str, Any], tokenizer: TextTokenizer, *,
                tensor_type: ExportType | gguf.GGMLQuantizationType | str,
                chat_template: ChatTemplate | str | None = None, name: str = "lowbit_jax export") -> ExportReport:
  """Writes `params` (the layout of `models/llama.py`, unrolled or scanned; float arrays and/or QArrays) as a
  llama.cpp GGUF file of `tensor_type` (see the module docstring for what is written how).

  Args:
    path: the file to write (replaced if it exists; its folder must exist).
    config: the architecture; the params must have exactly its shapes.
    tokenizer: a `Tokenizer` or `BPETokenizer` (anything with `to_gguf_metadata()`) of `config.vocab_size` tokens.
    tensor_type: the file type: an `ExportType`, a `gguf.GGMLQuantizationType` or its name.
    chat_template: written as `tokenizer.chat_template` (a `ChatTemplate`'s source, or the Jinja source itself).
    name: `general.name`.

  Returns:
    an `ExportReport`: file size, bits per weight, every tensor's type and source, fallbacks, requantized tensors.

  Raises:
    ExportError: before anything is written, naming the parameter path or argument at fault: an unsupported
      tensor_type, a config that does not divide, a missing, unexpected, mis-shaped, non-float or non-finite
      parameter, a tokenizer of the wrong size or kind, a chat template that is not a string.
  Warns:
    UserWarning: once per QArray that has to be requantized, naming it and why.
  """
  path = Path(path)
  try:
    export = ExportType.of(tensor_type)
  except ValueError as e:
    raise ExportError(str(e)) from None
  if not path.parent.is_dir():
    raise ExportError(f"path {path}: folder {path.parent} does not exist")
  planned = _plan(config, params, export)
  metadata = _metadata(config, tokenizer, chat_template, export, name)
  encoded = [(p, *_encode(p)) for p in planned]
  tmp = path.with_name(path.name + ".partial")
  try:
    _write(tmp, metadata, [(p.name, raw, p.choice.ggml_type) for p, raw, _, _ in encoded])
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  records = tuple(_record(p, raw, source, note) for p, raw, source, note in encoded)
  return ExportReport(path=path, export_type=export, file_size=path.stat().st_size, tensors=records)


# ---------------------------------------------------------------------------------------------------- validation

def _plan(config: LlamaConfig, params: Mapping[str, Any], export: ExportType) -> list[_Planned]:
  """Every tensor to write, in llama.cpp's order, after checking the params against `config`."""
  try:
    validate_config("config", config)
  except ValueError as e:
    raise ExportError(str(e)) from None
  flat = _flatten(params)
  shapes = expected_shapes(config)
  missing = [k for k in shapes if k not in flat]
  extra = [k for k in flat if k not in shapes]
  if missing or extra:
    raise ExportError(f"params do not match the config: missing {missing}, unexpected {extra}")
  for key, shape in shapes.items():
    _check_leaf(key, flat[key], shape)
  names = {**{f"blk.{i}.{g}": (f"layers_{i}/{p}", t) for i in range(config.n_layers)
              for g, (p, t) in _LAYER_TENSORS.items()}, **_GLOBAL_TENSORS}
  order = ["token_embd.weight", *(n for n in names if n.startswith("blk.")), "output_norm.weight", "output.weight"]
  planned = []
  for gguf_name in order:
    flax_path, transpose = names[gguf_name]
    if flax_path not in flat:  # output/kernel of a tied model
      continue
    leaf = flat[flax_path]
    role = _role(gguf_name, len(leaf.shape))
    ne0 = leaf.shape[0] if transpose else leaf.shape[-1]
    planned.append(_Planned(gguf_name, flax_path, leaf, transpose, role,
                            choose_type(role, ne0, export, tied=config.tie_embeddings)))
  return planned


def _flatten(params: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': leaf} with QArrays as leaves; a scanned tree (`layers/...`) is unrolled first."""
  if not isinstance(params, Mapping):
    raise ExportError(f"params must be a nested dict in the layout of models/llama.py, got {type(params).__name__}")
  if "layers" in params:
    try:
      params = unstack_layers(params)
    except Exception as e:  # noqa: BLE001 -- any failure here is a malformed stacked tree
      raise ExportError(f"params['layers'] (scanned layout) cannot be unstacked: {e}") from e
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QArray))[0]
  return {sel.path_str(p): leaf for p, leaf in flat}


def _check_leaf(key: str, leaf: Any, shape: tuple[int, ...]) -> None:
  if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    raise ExportError(f"parameter {key} is a {type(leaf).__name__}, not an array or QArray")
  if tuple(leaf.shape) != shape:
    raise ExportError(f"parameter {key} has shape {tuple(leaf.shape)}, expected {shape} for this config")
  if not np.issubdtype(np.dtype(leaf.dtype), np.floating) and np.dtype(leaf.dtype).name != "bfloat16":
    raise ExportError(f"parameter {key} has dtype {leaf.dtype}, expected a float array or a QArray")
  if isinstance(leaf, QArray):
    if len(leaf.k_shape) != 1:
      raise ExportError(f"parameter {key} is a QArray contracted over {len(leaf.k_shape)} axes; expected one")
    # Its values are finite iff its scales and float offsets are (codes are small integers).
    parts = [leaf.scale_values()] + ([leaf.zero] if leaf.spec.float_offset else [])
  else:
    parts = [leaf]
  if not all(np.all(np.isfinite(np.asarray(a, np.float32))) for a in parts):
    raise ExportError(f"parameter {key} has NaN or infinite values" + (" (in its QArray scales or offsets)"
                                                                      if isinstance(leaf, QArray) else ""))


def _role(gguf_name: str, ndim: int) -> Role:
  if ndim == 1:
    return Role.NORM
  return {"token_embd.weight": Role.TOKEN_EMBD, "output.weight": Role.OUTPUT}.get(gguf_name, Role.LINEAR)


# ---------------------------------------------------------------------------------------------------- metadata

def _metadata(config: LlamaConfig, tokenizer: TextTokenizer, chat_template: ChatTemplate | str | None,
              export: ExportType, name: str) -> dict[str, Any]:
  """Every key/value to write (plain Python values; see `_add_kv` for their GGUF types), checked."""
  to_meta = getattr(tokenizer, "to_gguf_metadata", None)
  if to_meta is None:
    raise ExportError(f"tokenizer {type(tokenizer).__name__} has no to_gguf_metadata(); expected a Tokenizer or "
                      "BPETokenizer")
  if tokenizer.vocab_size != config.vocab_size:
    raise ExportError(f"tokenizer has {tokenizer.vocab_size} tokens but config.vocab_size is {config.vocab_size}")
  if not isinstance(name, str):
    raise ExportError(f"name must be a string, got {type(name).__name__}")
  c = config
  meta: dict[str, Any] = {
      "general.name": name, "general.file_type": int(export.file_type),
      "general.quantization_version": gguf.GGML_QUANT_VERSION,
      "llama.context_length": c.max_seq_len, "llama.embedding_length": c.dim, "llama.block_count": c.n_layers,
      "llama.feed_forward_length": c.hidden_dim, "llama.rope.dimension_count": c.head_dim,
      "llama.attention.head_count": c.n_heads, "llama.attention.head_count_kv": c.n_kv_heads,
      "llama.attention.layer_norm_rms_epsilon": float(c.norm_eps), "llama.rope.freq_base": float(c.rope_theta),
      "llama.vocab_size": c.vocab_size,
  }
  meta.update(to_meta())
  if chat_template is not None:
    source = chat_template.source if isinstance(chat_template, ChatTemplate) else chat_template
    if not isinstance(source, str):
      raise ExportError(f"chat_template must be a ChatTemplate or a string, got {type(chat_template).__name__}")
    meta["tokenizer.chat_template"] = source
  return meta


def _add_kv(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
  """One key/value with the GGUF type llama.cpp expects: bool BOOL, int UINT32 (ids, counts), float FLOAT32,
  str STRING, lists ARRAY of STRING / FLOAT32 / INT32 (token types)."""
  if isinstance(value, bool):
    writer.add_bool(key, value)
  elif isinstance(value, int):
    writer.add_uint32(key, value)
  elif isinstance(value, float):
    writer.add_float32(key, value)
  elif isinstance(value, str):
    writer.add_string(key, value)
  elif isinstance(value, list) and value:
    writer.add_array(key, value)
  else:
    raise ExportError(f"metadata {key}: cannot write {type(value).__name__} {value!r:.60}")


# ---------------------------------------------------------------------------------------------------- tensors

def _encode(p: _Planned) -> tuple[np.ndarray, Source, str]:
  """(the tensor's bytes or float array in numpy GGUF order, where they came from, a note)."""
  kind = p.choice.ggml_type
  leaf, note = p.leaf, ""
  if isinstance(leaf, QArray):
    if kind not in _FLOAT_TYPES:
      raw, why = _qarray_blocks(p)
      if raw is not None:
        return raw, Source.BLOCKS, ""
      warnings.warn(f"{p.name} ({p.flax_path}): {why}; dequantizing and requantizing it as {kind.name}",
                    stacklevel=4)  # export_gguf's caller
      source, note = Source.REQUANTIZED, why
    else:
      source = Source.DEQUANTIZED
    x = np.asarray(dequantize(leaf), np.float32)  # one compiled decoder per shape and spec
  else:
    x = np.asarray(leaf, np.float32)
    source = Source.FLOAT if kind in _FLOAT_TYPES else Source.QUANTIZED
  x = np.ascontiguousarray(x.T if p.transpose else x)
  return _encode_float(x, kind), source, note


def _qarray_blocks(p: _Planned) -> tuple[np.ndarray | None, str]:
  """The QArray's own ggml blocks when its spec maps onto the planned type, else (None, why not)."""
  q, kind = p.leaf, p.choice.ggml_type
  axis = 0 if p.transpose else 1  # the axis the ggml blocks run along (ne[0])
  if q.k_axes != (axis,):
    return None, f"it is quantized along axis {q.k_axes}, not along the rows' axis {axis}"
  if q.in_scale is not None:
    return None, "it carries an in_scale (AWQ / SmoothQuant), which no ggml block type stores"
  mapped = ggml_blocks.from_qarray(q)
  if mapped is None:
    return None, f"its spec ({_describe(q)}) maps onto no ggml block type"
  mapped_kind, raw = mapped
  if mapped_kind != kind:
    return None, f"its spec ({_describe(q)}) maps onto {mapped_kind.name}, not {kind.name}"
  return np.asarray(raw, np.uint8), ""


def _describe(q: QArray) -> str:
  s = q.spec
  grid = f" {s.grid.name}" if s.grid is not None else ""
  zero = f" zero_point={s.zero_point.name}" if s.zero_point is not None else ""
  return f"{s.format.name} {s.bits}-bit {s.granularity}{grid}{zero}, {np.dtype(s.scale_dtype).name} scales"


def _encode_float(x: np.ndarray, kind: gguf.GGMLQuantizationType) -> np.ndarray:
  """A float32 array (numpy GGUF order) as `kind`: F32 / F16 arrays as they are stored, else raw bytes."""
  if kind == _T.F32:
    return x
  if kind == _T.F16:
    return x.astype(np.float16)
  return ggml_blocks.quantize(x, kind)  # choose_type made the rows whole blocks


def _write(path: Path, metadata: dict[str, Any], tensors: list[tuple[str, np.ndarray, Any]]) -> None:
  writer = gguf.GGUFWriter(path, "llama")
  try:
    for key, value in metadata.items():
      _add_kv(writer, key, value)
    for name, data, kind in tensors:
      if kind in (_T.F32, _T.F16):
        writer.add_tensor(name, data)
      else:
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
  finally:
    writer.close()


def _record(p: _Planned, data: np.ndarray, source: Source, note: str) -> TensorRecord:
  numpy_shape = tuple(p.leaf.shape[::-1] if p.transpose else p.leaf.shape)
  shape = numpy_shape[::-1]  # GGUF order
  n_params = int(np.prod(shape))
  return TensorRecord(name=p.name, flax_path=p.flax_path, shape=shape, ggml_type=p.choice.ggml_type, role=p.role,
                      rule=p.choice.rule, source=source, n_params=n_params, n_bytes=int(data.nbytes),
                      note=p.choice.note or note)
