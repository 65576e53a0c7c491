"""A Hugging Face `tokenizers` BPE built from a GGUF file's gpt2 vocabulary: the reference for lowbit_jax.io.bpe.

Built from the file's own `tokenizer.ggml.*` metadata (read with gguf.GGUFReader, not our loader): a `BPE` model over
the tokens and merges, the pre-tokenizer of llama.cpp's `smollm` type in Hugging Face terms (`Digits(individual_
digits=True)`, then `ByteLevel(add_prefix_space=False)` with GPT-2's regex), the `ByteLevel` decoder, and the
CONTROL tokens (type 3) as special added tokens, matched whole. transformers' own GGUF import is no oracle here: it
needs torch, and for a gpt2 vocabulary in a llama-architecture GGUF (`GGUFLlamaConverter`) it builds a plain
`ByteLevel` pre-tokenizer, without the digit split.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

CONTROL = 3  # GGUF token type


@functools.cache
def tokenizer_metadata(path: Path) -> dict[str, Any]:
  """The `tokenizer.*` metadata of a GGUF file as plain Python values."""
  reader = gguf.GGUFReader(path)
  return {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}


@functools.cache
def hf_tokenizer(path: Path) -> Tokenizer:
  meta = tokenizer_metadata(path)
  tokens = meta["tokenizer.ggml.tokens"]
  merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
  tok = Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, merges))
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  types = meta["tokenizer.ggml.token_type"]
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, kind in zip(tokens, types) if kind == CONTROL])
  return tok
