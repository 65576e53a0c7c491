"""Load a Llama GGUF file (llama.cpp's format) into our config, float32 Flax params, tokenizer and chat template.

GGUF facts this relies on:
  * A tensor's GGUF shape lists the fastest-varying dimension first (ggml's ne[0], ne[1], ...); `gguf.GGUFReader`
    reports it as `tensor.shape` and gives `tensor.data` in numpy order, i.e. reversed. So a Linear weight of
    `out` rows of `in` values has GGUF shape [in, out] and numpy shape (out, in), the PyTorch / llama2.c layout; we
    store its transpose (in, out). `token_embd.weight` is (vocab, dim) in numpy order and is used as is.
  * Quantized tensors come as raw bytes (numpy shape (..., bytes per row)); Q8_0, Q4_0, Q4_1 and BF16 are decoded
    here, vectorised, into float32. Q8_0: f16 scale d + 32 int8 q, x = d*q. Q4_0: f16 d + 16 bytes holding 32
    nibbles (low nibbles are elements 0..15, high nibbles 16..31), x = d*(q-8). Q4_1: f16 d, f16 m, 16 bytes of
    nibbles, x = d*q + m.
  * llama.cpp's `llama` architecture stores wq/wk in the interleaved-pair RoPE layout our model uses, so nothing
    is permuted.
  * A tied classifier is sometimes written out anyway (llama.cpp's llama2.c converter does): an `output.weight`
    bit-identical to `token_embd.weight` is read as tied (`tie_embeddings=True`, no `output/kernel`), which keeps
    the model function unchanged and makes the GGUF and llama2.c files of one model load to the same params.
  * The tokenizer follows `tokenizer.ggml.model`: "llama" is SentencePiece-style (`io/tokenizer.py`), "gpt2" is
    byte-level BPE (`io/bpe.py`, which also checks `tokenizer.ggml.pre`); `tokenizer.chat_template`, when present,
    becomes `LoadedModel.chat_template` (`io/chat.py`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import jinja2
import numpy as np

from lowbit_jax.io.bpe import BPETokenizer
from lowbit_jax.io.chat import ChatTemplate
from lowbit_jax.io.loaded import CheckpointError, LoadedModel, TextTokenizer, build_params, validate_config
from lowbit_jax.io.tokenizer import Tokenizer
from lowbit_jax.models.llama import LlamaConfig

_T = gguf.GGMLQuantizationType
_LAYER_TENSORS = {  # GGUF name (after "blk.{i}.") -> (Flax path after "layers_{i}/", transposed)
    "attn_norm.weight": ("attention_norm/scale", False),
    "attn_q.weight": ("attention/wq/kernel", True),
    "attn_k.weight": ("attention/wk/kernel", True),
    "attn_v.weight": ("attention/wv/kernel", True),
    "attn_output.weight": ("attention/wo/kernel", True),
    "ffn_norm.weight": ("ffn_norm/scale", False),
    "ffn_gate.weight": ("feed_forward/w1/kernel", True),
    "ffn_down.weight": ("feed_forward/w2/kernel", True),
    "ffn_up.weight": ("feed_forward/w3/kernel", True),
}
_GLOBAL_TENSORS = {
    "token_embd.weight": ("tok_embeddings/embedding", False),
    "output_norm.weight": ("norm/scale", False),
    "output.weight": ("output/kernel", True),
}
# Errors GGUFReader raises on a truncated or corrupted file (it memory-maps the file and slices past its end).
_PARSE_ERRORS = (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError, MemoryError)


def load_gguf(path: str | Path) -> LoadedModel:
  """Reads a `llama`-architecture GGUF file: F32/F16/BF16 tensors as is, Q8_0/Q4_0/Q4_1 dequantized to float32.

  Everything is validated before anything is returned: architecture, hyperparameters, tokenizer, the exact set of
  tensors, every tensor's type and shape.

  Raises:
    FileNotFoundError: when `path` does not exist.
    CheckpointError: naming `path` and the problem (wrong magic, truncated or corrupted file, architecture other
      than llama, missing or mis-shaped tensor, unsupported tensor type, tokenizer missing, of an unsupported
      model or pre-tokenizer type, or invalid; chat template that does not parse).
  """
  path = Path(path)
  with path.open("rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise CheckpointError(path, f"not a GGUF file: magic {magic!r}, expected b'GGUF'")
  try:
    reader = gguf.GGUFReader(path, "r")
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
  except _PARSE_ERRORS as e:
    raise CheckpointError(path, f"truncated or corrupted GGUF file ({type(e).__name__}: {e})") from e
  if reader.byte_order != "I":
    raise CheckpointError(path, "big-endian GGUF files are not supported")

  arch = metadata.get("general.architecture")
  if arch != "llama":
    raise CheckpointError(path, f"architecture {arch!r} is not supported (only 'llama')")
  tokenizer = _tokenizer(path, metadata)
  chat_template = _chat_template(path, metadata, tokenizer)
  config = _config(path, metadata, tokenizer.vocab_size, tensors)
  validate_config(path, config)

  names = dict(_GLOBAL_TENSORS)
  for i in range(config.n_layers):
    names.update({f"blk.{i}.{k}": (f"layers_{i}/{p}", t) for k, (p, t) in _LAYER_TENSORS.items()})
  if config.tie_embeddings:
    del names["output.weight"]
  missing = sorted(set(names) - set(tensors))
  extra = sorted(set(tensors) - set(names) - {"output.weight"})
  if missing:
    raise CheckpointError(path, f"missing tensors {missing}")
  if extra:
    raise CheckpointError(path, f"unexpected tensors {extra} (not part of a {config.n_layers}-layer llama)")
  flat = {}
  for name, (flax_path, transpose) in names.items():
    array = _dequantize(path, tensors[name])
    flat[flax_path] = array.T if transpose else array
  return LoadedModel(config=config, params=build_params(path, config, flat), tokenizer=tokenizer,
                     chat_template=chat_template)


_TOKENIZERS = {"llama": Tokenizer, "gpt2": BPETokenizer}  # tokenizer.ggml.model -> its class


def _tokenizer(path: Path, metadata: dict[str, Any]) -> TextTokenizer:
  """The tokenizer class `tokenizer.ggml.model` names, built from the metadata."""
  model = metadata.get("tokenizer.ggml.model")
  if model is None:
    raise CheckpointError(path, "no tokenizer in the metadata (tokenizer.ggml.model is missing)")
  if model not in _TOKENIZERS:
    raise CheckpointError(path, f"tokenizer.ggml.model {model!r} is not supported; supported: "
                                "'llama' (SentencePiece-style BPE), 'gpt2' (byte-level BPE)")
  return _TOKENIZERS[model].from_gguf_metadata(metadata, path=path)


def _chat_template(path: Path, metadata: dict[str, Any], tokenizer: TextTokenizer) -> ChatTemplate | None:
  """`tokenizer.chat_template`, compiled; None when the file has none."""
  source = metadata.get("tokenizer.chat_template")
  if source is None:
    return None
  if not isinstance(source, str):
    raise CheckpointError(path, f"tokenizer.chat_template is a {type(source).__name__}, not a string")
  tokens = metadata["tokenizer.ggml.tokens"]  # the tokenizer was built from them: bos_id / eos_id index them
  try:
    return ChatTemplate(source=source, bos_token=tokens[tokenizer.bos_id], eos_token=tokens[tokenizer.eos_id])
  except jinja2.TemplateSyntaxError as e:
    raise CheckpointError(path, f"tokenizer.chat_template does not parse as Jinja: {e}") from e


def _config(path: Path, metadata: dict[str, Any], vocab_size: int, tensors: dict[str, Any]) -> LlamaConfig:
  """LlamaConfig from `llama.*` metadata; the vocabulary size comes from the tokenizer."""

  def get(key: str, default: Any = None) -> Any:
    value = metadata.get(f"llama.{key}", default)
    if value is None:
      raise CheckpointError(path, f"metadata key llama.{key} is missing")
    return value

  n_heads = int(get("attention.head_count"))
  dim = int(get("embedding_length"))
  rope_dims = metadata.get("llama.rope.dimension_count")
  if rope_dims is not None and n_heads > 0 and rope_dims != dim // n_heads:
    raise CheckpointError(path, f"partial RoPE (llama.rope.dimension_count {rope_dims} != head_dim "
                                f"{dim // n_heads}) is not supported")
  return LlamaConfig(
      dim=dim,
      n_layers=int(get("block_count")),
      n_heads=n_heads,
      n_kv_heads=int(get("attention.head_count_kv", n_heads)),
      vocab_size=vocab_size,
      hidden_dim=int(get("feed_forward_length")),
      norm_eps=_f32_to_float(get("attention.layer_norm_rms_epsilon")),
      rope_theta=_f32_to_float(get("rope.freq_base", 10000.0)),
      max_seq_len=int(get("context_length")),
      tie_embeddings=_is_tied(tensors),
  )


def _f32_to_float(value: float) -> float:
  """The shortest decimal that rounds to the same float32: GGUF's float32 1e-5 reads back as 1e-5, not 9.99e-6."""
  return float(str(np.float32(value)))


def _is_tied(tensors: dict[str, Any]) -> bool:
  """Tied when `output.weight` is absent or a bit-identical copy of `token_embd.weight`."""
  out, emb = tensors.get("output.weight"), tensors.get("token_embd.weight")
  if out is None:
    return True
  return (emb is not None and out.tensor_type == emb.tensor_type and out.data.shape == emb.data.shape
          and np.array_equal(out.data.view(np.uint8), emb.data.view(np.uint8)))


def _dequantize(path: Path, tensor: Any) -> np.ndarray:
  """A reader tensor as a float32 array of numpy shape reversed(GGUF shape)."""
  shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
  kind, raw = tensor.tensor_type, np.asarray(tensor.data)
  if kind == _T.F32:
    out = raw.astype(np.float32)
  elif kind == _T.F16:
    out = raw.astype(np.float32)
  elif kind in _BLOCK_DECODERS:
    block, nbytes = gguf.GGML_QUANT_SIZES[kind]
    if shape[-1] % block:
      raise CheckpointError(path, f"tensor {tensor.name}: rows of {shape[-1]} are not whole {kind.name} blocks")
    blocks = raw.reshape(-1, nbytes)
    out = _BLOCK_DECODERS[kind](blocks).reshape(shape)
  else:
    raise CheckpointError(path, f"tensor {tensor.name} has type {kind.name}; supported: F32, F16, BF16, Q8_0, "
                                "Q4_0, Q4_1")
  if out.shape != shape:
    raise CheckpointError(path, f"tensor {tensor.name}: data of shape {out.shape} for GGUF shape {shape[::-1]}")
  return out


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
  """The little-endian float16 at byte `start` of every block, as float32 of shape (n_blocks, 1)."""
  return np.ascontiguousarray(blocks[:, start:start + 2]).view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
  """(n, 16) bytes -> (n, 32) values 0..15: the low nibbles (elements 0..15), then the high nibbles (16..31)."""
  return np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)


def _bf16(blocks: np.ndarray) -> np.ndarray:
  """bfloat16 is the top half of a float32: widen each little-endian uint16 by 16 zero bits."""
  halves = np.ascontiguousarray(blocks).view("<u2").astype(np.uint32)
  return (halves << np.uint32(16)).view(np.float32)


_BLOCK_DECODERS = {
    _T.BF16: _bf16,
    _T.Q8_0: lambda b: _f16(b, 0) * np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32),
    _T.Q4_0: lambda b: _f16(b, 0) * (_nibbles(b[:, 2:]) - np.float32(8)),
    _T.Q4_1: lambda b: _f16(b, 0) * _nibbles(b[:, 4:]) + _f16(b, 2),
}
