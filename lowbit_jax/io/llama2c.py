"""Load a llama2.c checkpoint (Karpathy's legacy `run.c` format) and its `tokenizer.bin`.

File layout (all little-endian): a header of 7 int32 `dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len` (a negative vocab_size means the classifier is NOT shared with the embedding), then float32 tensors in
`run.c`'s `memory_map_weights` order, every matrix (out, in) row-major and every per-layer tensor stacked over
layers:
  token_embedding (vocab, dim), rms_att (L, dim), wq (L, n_heads*hd, dim), wk (L, kv, dim), wv (L, kv, dim),
  wo (L, dim, n_heads*hd), rms_ffn (L, dim), w1 (L, hidden, dim), w2 (L, dim, hidden), w3 (L, hidden, dim),
  rms_final (dim), freq_cis_real and freq_cis_imag (seq_len*hd/2 each, skipped: RoPE is recomputed),
  wcls (vocab, dim) only when not shared.
The file size must equal exactly what the header implies. llama2.c's RoPE is the interleaved-pair one of our model,
so wq/wk are used as stored. The format stores no norm epsilon or RoPE base: llama2.c hard-codes 1e-5 and 10000.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lowbit_jax.io.loaded import CheckpointError, LoadedModel, build_params, validate_config
from lowbit_jax.io.tokenizer import Tokenizer
from lowbit_jax.models.llama import LlamaConfig

_HEADER = np.dtype("<i4")
_HEADER_LEN = 7
_V1_MAGIC = 0x616B3432  # "ak42": llama2.c's newer export formats (version 1/2), which this loader does not read
_PER_LAYER = {  # the per-layer tensors of the file -> (Flax path after "layers_{i}/", transposed)
    "rms_att": ("attention_norm/scale", False),
    "wq": ("attention/wq/kernel", True),
    "wk": ("attention/wk/kernel", True),
    "wv": ("attention/wv/kernel", True),
    "wo": ("attention/wo/kernel", True),
    "rms_ffn": ("ffn_norm/scale", False),
    "w1": ("feed_forward/w1/kernel", True),
    "w2": ("feed_forward/w2/kernel", True),
    "w3": ("feed_forward/w3/kernel", True),
}


def load_llama2c(bin_path: str | Path, tokenizer_path: str | Path) -> LoadedModel:
  """Reads a llama2.c `model.bin` and its `tokenizer.bin` (the tokenizer's piece count is the model's vocab).

  Raises:
    FileNotFoundError: when either file does not exist.
    CheckpointError: naming the file and the problem (truncated, longer than the header implies, bad header,
      newer llama2.c export format, malformed tokenizer).
  """
  bin_path = Path(bin_path)
  data = np.fromfile(bin_path, dtype=np.uint8)
  if data.size < _HEADER_LEN * 4:
    raise CheckpointError(bin_path, f"truncated llama2.c checkpoint: {data.size} bytes, shorter than its header")
  header = data[:_HEADER_LEN * 4].view(_HEADER).tolist()
  if header[0] == _V1_MAGIC:
    raise CheckpointError(bin_path, "llama2.c version-1/2 export ('ak42' magic) is not supported; export with "
                                    "the legacy format (version 0)")
  dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header
  config = LlamaConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=abs(vocab),
                       hidden_dim=hidden, max_seq_len=seq_len, tie_embeddings=vocab > 0)
  validate_config(bin_path, config)

  layout = _layout(config)
  n_floats = sum(int(np.prod(shape)) for _, shape in layout)
  expected = (_HEADER_LEN + n_floats) * 4
  if data.size != expected:
    problem = "truncated" if data.size < expected else "longer than its header implies"
    raise CheckpointError(bin_path, f"{problem}: {data.size} bytes, but header {header} implies {expected}")

  floats = data[_HEADER_LEN * 4:].view("<f4")
  tensors, offset = {}, 0
  for name, shape in layout:
    size = int(np.prod(shape))
    tensors[name] = floats[offset:offset + size].reshape(shape)
    offset += size

  flat = {"tok_embeddings/embedding": tensors["token_embedding"], "norm/scale": tensors["rms_final"]}
  for name, (flax_path, transpose) in _PER_LAYER.items():
    for i in range(n_layers):
      flat[f"layers_{i}/{flax_path}"] = tensors[name][i].T if transpose else tensors[name][i]
  if not config.tie_embeddings:
    flat["output/kernel"] = tensors["wcls"].T
  params = build_params(bin_path, config, flat)

  tokenizer = Tokenizer.from_llama2c(tokenizer_path, config.vocab_size)
  return LoadedModel(config=config, params=params, tokenizer=tokenizer)


def _layout(config: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
  """(name, shape) of every float32 tensor in file order, `run.c`'s `memory_map_weights`."""
  d, h, n, v = config.dim, config.hidden_dim, config.n_layers, config.vocab_size
  hd = config.head_dim
  q, kv = config.n_heads * hd, config.n_kv_heads * hd
  layout = [
      ("token_embedding", (v, d)),
      ("rms_att", (n, d)),
      ("wq", (n, q, d)),
      ("wk", (n, kv, d)),
      ("wv", (n, kv, d)),
      ("wo", (n, d, q)),
      ("rms_ffn", (n, d)),
      ("w1", (n, h, d)),
      ("w2", (n, d, h)),
      ("w3", (n, h, d)),
      ("rms_final", (d,)),
      ("freq_cis_real", (config.max_seq_len * hd // 2,)),
      ("freq_cis_imag", (config.max_seq_len * hd // 2,)),
  ]
  if not config.tie_embeddings:
    layout.append(("wcls", (v, d)))
  return layout
