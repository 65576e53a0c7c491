"""load_llama2c: the real stories260K.bin equals the GGUF bit for bit; every kind of bad input is rejected."""
from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import jax
import numpy as np
import pytest

from lowbit_jax.assets import asset_path
from lowbit_jax.io.llama2c import load_llama2c
from lowbit_jax.io.loaded import CheckpointError
from lowbit_jax.models.llama import LlamaConfig

HEADER_BYTES = 28


def _bin() -> Path:
  return asset_path("stories260K_llama2c/stories260K.bin")


def _tok() -> Path:
  return asset_path("stories260K_llama2c/tok512.bin")


def test_real_config():
  model = load_llama2c(_bin(), _tok())
  assert model.config == LlamaConfig(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, hidden_dim=172,
                                     norm_eps=1e-5, rope_theta=10000.0, max_seq_len=512, tie_embeddings=True)


def test_params_and_tokenizer_equal_the_gguf_bit_for_bit(stories260k):
  a = load_llama2c(_bin(), _tok())
  b = stories260k.loaded   # load_gguf of the file
  # The files disagree only on the context length: llama2.c's header has the training seq_len (512), llama.cpp's
  # converter wrote 2048.
  assert dataclasses.replace(b.config, max_seq_len=a.config.max_seq_len) == a.config
  assert jax.tree.structure(a.params) == jax.tree.structure(b.params)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a.params), jax.tree.leaves(b.params)):
    assert x.dtype == y.dtype == np.float32 and np.array_equal(x, y), jax.tree_util.keystr(path)
  assert a.tokenizer == b.tokenizer


def test_untied_classifier_is_read_after_the_freq_tables(tmp_path):
  data = bytearray(_bin().read_bytes())
  header = np.frombuffer(bytes(data[:HEADER_BYTES]), dtype="<i4").copy()
  header[5] = -header[5]  # negative vocab_size: a separate classifier follows
  wcls = np.random.default_rng(0).standard_normal((512, 64)).astype("<f4")
  path = tmp_path / "untied.bin"
  path.write_bytes(header.tobytes() + bytes(data[HEADER_BYTES:]) + wcls.tobytes())
  model = load_llama2c(path, _tok())
  assert not model.config.tie_embeddings
  np.testing.assert_array_equal(model.params["output"]["kernel"], wcls.T)


def _assert_rejected(bin_path: Path, *words: str, tok_path: Path | None = None, blame: Path | None = None) -> None:
  with pytest.raises(CheckpointError) as info:
    load_llama2c(bin_path, tok_path or _tok())
  message = str(info.value)
  assert str(blame or bin_path) in message
  for word in words:
    assert word in message, message


@pytest.mark.parametrize("keep", [0, 27, 28, 1000, -4, -1])
def test_truncated(tmp_path, keep):
  path = tmp_path / "cut.bin"
  path.write_bytes(_bin().read_bytes()[:keep])
  _assert_rejected(path, "truncated")


def test_longer_than_header(tmp_path):
  path = tmp_path / "long.bin"
  path.write_bytes(_bin().read_bytes() + b"\0" * 4)
  _assert_rejected(path, "longer than its header implies")


@pytest.mark.parametrize("index, value, words", [
    (2, 4, ("longer than its header implies",)),  # 4 layers: the file is a layer too long
    (6, 1024, ("truncated",)),                    # seq_len 1024: the freq_cis tables would not fit
    (0, 0, ("non-positive",)),
    (3, -8, ("non-positive",)),
    (4, 3, ("do not divide",)),
    (0, 0x616B3432, ("ak42",)),
])
def test_bad_header(tmp_path, index, value, words):
  data = bytearray(_bin().read_bytes())
  data[4 * index:4 * index + 4] = int(value).to_bytes(4, "little", signed=True)
  path = tmp_path / "header.bin"
  path.write_bytes(bytes(data))
  _assert_rejected(path, *words)


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="absent.bin"):
    load_llama2c(tmp_path / "absent.bin", _tok())
  with pytest.raises(FileNotFoundError, match="absent_tok.bin"):
    load_llama2c(_bin(), tmp_path / "absent_tok.bin")


@pytest.mark.parametrize("cut, words", [(-3, "truncated"), (2, "truncated"), (3000, "truncated")])
def test_truncated_tokenizer(tmp_path, cut, words):
  path = tmp_path / "tok.bin"
  path.write_bytes(_tok().read_bytes()[:cut])
  _assert_rejected(_bin(), words, tok_path=path, blame=path)


def test_tokenizer_of_another_vocab_size(tmp_path):
  path = tmp_path / "tok.bin"
  path.write_bytes(_tok().read_bytes() + struct.pack("<fi", 0.0, 1) + b"A")  # a 513th piece
  _assert_rejected(_bin(), "vocab_size", tok_path=path, blame=path)


def test_tokenizer_piece_not_utf8(tmp_path):
  data = bytearray(_tok().read_bytes())
  at = data.index(b"Once")
  data[at] = 0xFF
  path = tmp_path / "tok.bin"
  path.write_bytes(bytes(data))
  _assert_rejected(_bin(), "UTF-8", tok_path=path, blame=path)
