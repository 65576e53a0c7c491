"""Load a Llama GGUF file (llama.cpp's format) into our config, Flax params (packed QArrays or float32), tokenizer
and chat template.

GGUF facts this relies on:
  * The header is parsed and validated by `io/gguf_header.py` before any tensor is touched (gguf-py's own reader
    loops once per claimed element and trusts every offset); tensors are its `tensor_views`, gguf-py `ReaderTensor`s
    laid out exactly as `gguf.GGUFReader` gives them.
  * A tensor's GGUF shape lists the fastest-varying dimension first (ggml's ne[0], ne[1], ...); `gguf.GGUFReader`
    reports it as `tensor.shape` and gives `tensor.data` in numpy order, i.e. reversed. So a Linear weight of
    `out` rows of `in` values has GGUF shape [in, out] and numpy shape (out, in), the PyTorch / llama2.c layout; we
    store its transpose (in, out). `token_embd.weight` is (vocab, dim) in numpy order and is used as is.
  * Quantized tensors come as raw bytes (numpy shape (..., bytes per row)), decoded by `io/ggml_blocks.py` (block
    layouts there): Q8_0, Q4_0, Q4_1 and TQ2_0 become QArrays that store exactly the file's codes and scales (the
    same bytes, the same float32 values on dequantization); BF16, TQ1_0 and Q6_K are decoded into float32.
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

import jinja2
import numpy as np

from lowbit_jax.io import ggml_blocks
from lowbit_jax.io.bpe import BPETokenizer
from lowbit_jax.io.chat import ChatTemplate
from lowbit_jax.io.gguf_header import read_gguf_header, tensor_views
from lowbit_jax.io.loaded import CheckpointError, LoadedModel, TextTokenizer, build_params, validate_config
from lowbit_jax.io.tokenizer import Tokenizer
from lowbit_jax.models.llama import LlamaConfig
from lowbit_jax.qarray import QArray

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


def load_gguf(path: str | Path, *, allow_nonfinite: bool = False) -> LoadedModel:
  """Reads a `llama`-architecture GGUF file: Q8_0/Q4_0/Q4_1/TQ2_0 tensors as packed QArrays holding the file's own
  codes and scales (`ggml_blocks.to_qarray`), F32/F16/BF16 and the other supported block types (TQ1_0, Q6_K) as
  float32. `lowbit_jax.dequantize(loaded.params)` is the float view, bit-identical to gguf-py's dequantization.

  allow_nonfinite: load tensors with NaN or inf values (or QArray scales / offsets) instead of raising.

  Everything is validated before anything is returned: architecture, hyperparameters, tokenizer, the exact set of
  tensors, every tensor's type and shape.

  Raises:
    FileNotFoundError: when `path` does not exist.
    CheckpointError: naming `path` and the problem (wrong magic, truncated or corrupted file or any other header
      that breaks an invariant of `io/gguf_header.py`, block_count beyond the tensors present, architecture other
      than llama, missing or mis-shaped tensor, unsupported tensor type, non-finite values (unless
      `allow_nonfinite`), tokenizer missing, of an unsupported model or pre-tokenizer type, or invalid; chat
      template that does not parse).
  """
  path = Path(path)
  with path.open("rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise CheckpointError(path, f"not a GGUF file: magic {magic!r}, expected b'GGUF'")
  header = read_gguf_header(path)  # every count, length, offset and size checked against the file first
  metadata = dict(header.metadata)
  tensors = tensor_views(header)  # what gguf.GGUFReader would give, without its loop per claimed element

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
  flat = {flax_path: _tensor(path, tensors[name], transpose, allow_nonfinite)
          for name, (flax_path, transpose) in names.items()}
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

  def count(key: str, default: int | None = None) -> int:
    value = get(key, default)
    if type(value) is not int:  # noqa: E721 -- bool is an int subclass, and not a count
      raise CheckpointError(path, f"metadata key llama.{key}: an integer, got {type(value).__name__} {value!r}")
    return value

  def real(key: str, default: float | None = None) -> float:
    value = get(key, default)
    if type(value) not in (int, float) or not abs(value) <= _F32_MAX:  # also False for NaN
      raise CheckpointError(path, f"metadata key llama.{key}: a finite float32, got {type(value).__name__} "
                                  f"{value!r}")
    return _f32_to_float(value)

  n_heads = count("attention.head_count")
  dim = count("embedding_length")
  rope_dims = metadata.get("llama.rope.dimension_count")
  if rope_dims is not None and n_heads > 0 and rope_dims != dim // n_heads:
    raise CheckpointError(path, f"partial RoPE (llama.rope.dimension_count {rope_dims} != head_dim "
                                f"{dim // n_heads}) is not supported")
  n_layers = count("block_count")
  if n_layers * len(_LAYER_TENSORS) > len(tensors):  # bounds the per-layer names load_gguf builds next
    raise CheckpointError(path, f"metadata key llama.block_count: at most {len(tensors) // len(_LAYER_TENSORS)} "
                                f"layers ({len(_LAYER_TENSORS)} tensors each) for the {len(tensors)} tensors in "
                                f"the file, got {n_layers}")
  return LlamaConfig(
      dim=dim,
      n_layers=n_layers,
      n_heads=n_heads,
      n_kv_heads=count("attention.head_count_kv", n_heads),
      vocab_size=vocab_size,
      hidden_dim=count("feed_forward_length"),
      norm_eps=real("attention.layer_norm_rms_epsilon"),
      rope_theta=real("rope.freq_base", 10000.0),
      max_seq_len=count("context_length"),
      tie_embeddings=_is_tied(tensors),
  )


_F32_MAX = float(np.finfo(np.float32).max)


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


def _tensor(path: Path, tensor: Any, transpose: bool, allow_nonfinite: bool) -> np.ndarray | QArray:
  """A reader tensor as its parameter leaf: a packed QArray when its block type maps onto one
  (`ggml_blocks.to_qarray`), else float32; a Linear weight (out, in) transposed to the Flax kernel (in, out)."""
  shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # numpy order
  kind, raw = tensor.tensor_type, np.asarray(tensor.data)
  if kind not in ggml_blocks.KINDS:
    raise CheckpointError(path, f"tensor {tensor.name} has type {getattr(kind, 'name', kind)}; supported: "
                                f"{', '.join(k.name for k in ggml_blocks.KINDS)}")
  try:
    leaf = ggml_blocks.to_qarray(raw, kind, shape, transpose=transpose)
    if leaf is None:
      leaf = ggml_blocks.dequantize(raw, kind, shape)
      leaf = leaf.T if transpose else leaf
  except ValueError as e:
    raise CheckpointError(path, f"tensor {tensor.name} (GGUF shape {list(shape[::-1])}): {e}") from e
  if not allow_nonfinite:
    _check_finite(path, tensor.name, leaf)
  return leaf


def _check_finite(path: Path, name: str, leaf: np.ndarray | QArray) -> None:
  """Raises CheckpointError unless every value of `leaf` is finite (a QArray's are iff its scales and offsets are:
  codes are small integers and every decoded product is exact)."""
  parts = {"values": leaf} if not isinstance(leaf, QArray) else {"scales": leaf.scale, "offsets": leaf.zero}
  for what, a in parts.items():
    if a is None:
      continue
    bad = int(np.size(a) - np.count_nonzero(np.isfinite(np.asarray(a))))
    if bad:
      raise CheckpointError(path, f"tensor {name} has {bad} non-finite (NaN or inf) {what}; pass "
                                  "allow_nonfinite=True to load it anyway")
