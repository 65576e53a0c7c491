"""load_gguf: the real stories260K file, small GGUF files written with gguf.GGUFWriter (every supported tensor type),
and every kind of bad input."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.assets import asset_path
from lowbit_jax.io.gguf import load_gguf
from lowbit_jax.io.loaded import CheckpointError, expected_shapes
from lowbit_jax.models.llama import LlamaConfig

Q = gguf.GGMLQuantizationType
TINY = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=3 + 256 + 5, hidden_dim=64,
                   norm_eps=1e-6, rope_theta=500000.0, max_seq_len=128, tie_embeddings=False)
_PIECES = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "a", "b", "▁a", "ab"]


def _tiny_metadata() -> dict[str, Any]:
  c = TINY
  return {
      "llama.embedding_length": c.dim, "llama.block_count": c.n_layers, "llama.attention.head_count": c.n_heads,
      "llama.attention.head_count_kv": c.n_kv_heads, "llama.feed_forward_length": c.hidden_dim,
      "llama.attention.layer_norm_rms_epsilon": c.norm_eps, "llama.rope.freq_base": c.rope_theta,
      "llama.context_length": c.max_seq_len, "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": _PIECES,
      "tokenizer.ggml.scores": [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0],
      "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * 5,
      "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
  }


def _tiny_tensors(seed: int = 0) -> dict[str, np.ndarray]:
  """GGUF name -> float32 array in numpy order ((out, in) for matrices), for TINY."""
  rng = np.random.default_rng(seed)
  c = TINY
  kv = c.n_kv_heads * c.head_dim
  shapes = {"token_embd.weight": (c.vocab_size, c.dim), "output_norm.weight": (c.dim,),
            "output.weight": (c.vocab_size, c.dim)}
  for i in range(c.n_layers):
    shapes.update({f"blk.{i}.attn_norm.weight": (c.dim,), f"blk.{i}.attn_q.weight": (c.dim, c.dim),
                   f"blk.{i}.attn_k.weight": (kv, c.dim), f"blk.{i}.attn_v.weight": (kv, c.dim),
                   f"blk.{i}.attn_output.weight": (c.dim, c.dim), f"blk.{i}.ffn_norm.weight": (c.dim,),
                   f"blk.{i}.ffn_gate.weight": (c.hidden_dim, c.dim), f"blk.{i}.ffn_up.weight": (c.hidden_dim, c.dim),
                   f"blk.{i}.ffn_down.weight": (c.dim, c.hidden_dim)})
  return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _write(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, Any], qtype: Q = Q.F32,
           arch: str = "llama") -> Path:
  """Writes a GGUF file; matrices are stored as `qtype`, 1-D tensors as F32 (as llama.cpp does)."""
  writer = gguf.GGUFWriter(path, arch)
  for key, value in metadata.items():
    if isinstance(value, str):
      writer.add_string(key, value)
    elif isinstance(value, list):
      writer.add_array(key, value)
    elif isinstance(value, float):
      writer.add_float32(key, value)
    else:
      writer.add_uint32(key, value)
  for name, array in tensors.items():
    kind = qtype if array.ndim == 2 else Q.F32
    if kind == Q.F32:
      writer.add_tensor(name, array)
    elif kind == Q.F16:
      writer.add_tensor(name, array.astype(np.float16))
    else:
      writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def _flat(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for key, value in params.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = value
  return out


# ------------------------------------------------------------------------------------------------- the real model

def test_real_stories260k_config_and_layout(stories260k):
  model = stories260k.loaded   # load_gguf of the file
  assert model.config == LlamaConfig(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, hidden_dim=172,
                                     norm_eps=1e-5, rope_theta=10000.0, max_seq_len=2048, tie_embeddings=True)
  flat = _flat(model.params)
  assert {k: v.shape for k, v in flat.items()} == expected_shapes(model.config)
  assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in flat.values())
  # A kernel is the transpose of the file's (out, in) matrix.
  reader = gguf.GGUFReader(asset_path("stories260K_gguf/stories260K.gguf"))
  wk = next(t for t in reader.tensors if t.name == "blk.3.attn_k.weight")
  assert list(wk.shape) == [64, 32] and wk.data.shape == (32, 64)
  np.testing.assert_array_equal(flat["layers_3/attention/wk/kernel"], wk.data.T)
  assert model.tokenizer.vocab_size == 512 and model.tokenizer.bos_id == 1 and model.tokenizer.eos_id == 2


# ------------------------------------------------------------------------------------------- written tensor types

_PACKED = (Q.Q8_0, Q.Q4_0, Q.Q4_1)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_tensor_types_dequantize_like_gguf_and_within_bounds(tmp_path, qtype):
  tensors = _tiny_tensors()
  model = load_gguf(_write(tmp_path / "tiny.gguf", tensors, _tiny_metadata(), qtype))
  assert model.config == TINY
  packed = _flat(model.params)
  assert {k: v.shape for k, v in packed.items()} == expected_shapes(TINY)
  # Q8_0 / Q4_0 / Q4_1 matrices load as packed QArrays (tests/test_ggml_blocks.py), the rest as float32.
  assert {isinstance(v, lb.QArray) for k, v in packed.items() if "norm" not in k} == {qtype in _PACKED}
  flat = _flat(lb.dequantize(model.params))
  got, want = np.asarray(flat["layers_1/feed_forward/w2/kernel"]).T, tensors["blk.1.ffn_down.weight"]
  # Our decoder equals gguf's own reference dequantization bit for bit.
  reference = want if qtype == Q.F32 else gguf.quants.dequantize(gguf.quants.quantize(want, qtype), qtype)
  np.testing.assert_array_equal(got, reference)
  # And its error is the format's: per 32-block, |err| <= step/2 (Q4_0: one step, from clipping the far extreme),
  # plus the float16 rounding of the scale (relative 2^-11) times the largest code, and of Q4_1's minimum.
  blocks, err = want.reshape(-1, 32), np.abs(got - want).reshape(-1, 32)
  amax, span = np.abs(blocks).max(1), blocks.max(1) - blocks.min(1)
  f16 = 2.0 ** -11 * 1.01
  bound = {Q.F32: 0 * amax, Q.F16: f16 * amax, Q.BF16: 2.0 ** -8 * amax, Q.Q8_0: amax / 127 / 2 + f16 * amax,
           Q.Q4_0: amax / 8 + f16 * amax, Q.Q4_1: span / 15 / 2 + f16 * (span + np.abs(blocks.min(1)))}[qtype]
  assert np.all(err.max(1) <= bound + 1e-7)
  if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
    assert err.max() > 0  # it really was quantized
  # 1-D tensors stay F32 and exact.
  np.testing.assert_array_equal(flat["norm/scale"], tensors["output_norm.weight"])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")   # gguf-py writing the inf scale
@pytest.mark.parametrize("qtype", [Q.F32, Q.Q4_1])
def test_nonfinite_weights_rejected_unless_allowed(tmp_path, qtype):
  """A NaN value (F32), or a Q4_1 block whose f16 scale overflows to inf (a span of 2e6 / 15 > 65504)."""
  tensors = _tiny_tensors()
  tensors["blk.1.attn_v.weight"][3, 5] = np.nan if qtype == Q.F32 else 1e6
  path = _write(tmp_path / "nan.gguf", tensors, _tiny_metadata(), qtype)
  _assert_rejected(path, "blk.1.attn_v.weight", "non-finite", "allow_nonfinite")
  model = load_gguf(path, allow_nonfinite=True)
  wv = lb.dequantize(model.params)["layers_1"]["attention"]["wv"]["kernel"]
  assert not np.all(np.isfinite(wv)) and np.all(np.isfinite(lb.dequantize(model.params)["layers_0"]["attention"]
                                                               ["wv"]["kernel"]))


def test_untied_output_and_identical_copy_reads_tied(tmp_path):
  tensors = _tiny_tensors()
  untied = load_gguf(_write(tmp_path / "untied.gguf", tensors, _tiny_metadata()))
  assert not untied.config.tie_embeddings
  np.testing.assert_array_equal(untied.params["output"]["kernel"], tensors["output.weight"].T)
  tensors["output.weight"] = tensors["token_embd.weight"].copy()
  copied = load_gguf(_write(tmp_path / "copy.gguf", tensors, _tiny_metadata()))
  assert copied.config.tie_embeddings and "output" not in copied.params
  del tensors["output.weight"]
  absent = load_gguf(_write(tmp_path / "tied.gguf", tensors, _tiny_metadata()))
  assert absent.config.tie_embeddings and "output" not in absent.params


# ------------------------------------------------------------------------------------------------- bad inputs

def _assert_rejected(path: Path, *words: str) -> None:
  with pytest.raises(CheckpointError) as info:
    load_gguf(path)
  message = str(info.value)
  assert str(path) in message
  for word in words:
    assert word in message, message


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    load_gguf(tmp_path / "nope.gguf")


def test_wrong_magic(tmp_path):
  path = tmp_path / "magic.gguf"
  path.write_bytes(b"GGUX" + asset_path("stories260K_gguf/stories260K.gguf").read_bytes()[4:])
  _assert_rejected(path, "magic")


@pytest.mark.parametrize("keep", [4, 10, 24, 200, 5000, 600_000, -1])
def test_truncated_real_file(tmp_path, keep):
  data = asset_path("stories260K_gguf/stories260K.gguf").read_bytes()
  path = tmp_path / "cut.gguf"
  path.write_bytes(data[:keep])
  _assert_rejected(path)


def test_corrupted_tensor_type(tmp_path):
  tensors = {"token_embd.weight": _tiny_tensors()["token_embd.weight"]}
  data = bytearray(_write(tmp_path / "ok.gguf", tensors, _tiny_metadata()).read_bytes())
  name = b"token_embd.weight"
  at = data.index(name) + len(name) + 4 + 2 * 8  # after the name: n_dims (u32), two dims (u64), then the type
  data[at:at + 4] = (250).to_bytes(4, "little")
  (tmp_path / "bad.gguf").write_bytes(bytes(data))
  _assert_rejected(tmp_path / "bad.gguf", "corrupted")


def test_unknown_architecture(tmp_path):
  meta = {k.replace("llama.", "gpt2."): v for k, v in _tiny_metadata().items()}
  _assert_rejected(_write(tmp_path / "gpt2.gguf", _tiny_tensors(), meta, arch="gpt2"), "'gpt2'")


def test_missing_tensor(tmp_path):
  tensors = _tiny_tensors()
  del tensors["blk.1.ffn_up.weight"]
  _assert_rejected(_write(tmp_path / "missing.gguf", tensors, _tiny_metadata()), "blk.1.ffn_up.weight")


def test_unexpected_tensor(tmp_path):
  tensors = _tiny_tensors()
  tensors["blk.2.attn_q.weight"] = tensors["blk.1.attn_q.weight"]
  _assert_rejected(_write(tmp_path / "extra.gguf", tensors, _tiny_metadata()), "blk.2.attn_q.weight")


def test_misshaped_tensor(tmp_path):
  tensors = _tiny_tensors()
  tensors["blk.0.attn_k.weight"] = tensors["blk.0.attn_q.weight"]  # (32, 32) where (16, 32) belongs
  _assert_rejected(_write(tmp_path / "shape.gguf", tensors, _tiny_metadata()), "wk", "(32, 32)", "(32, 16)")


def test_embedding_rows_must_match_vocab(tmp_path):
  tensors = _tiny_tensors()
  tensors["token_embd.weight"] = tensors["token_embd.weight"][:-1]
  _assert_rejected(_write(tmp_path / "vocab.gguf", tensors, _tiny_metadata()), "tok_embeddings")


def test_unsupported_tensor_type(tmp_path):
  _assert_rejected(_write(tmp_path / "q5.gguf", _tiny_tensors(), _tiny_metadata(), Q.Q5_0), "Q5_0")


def test_missing_hyperparameter(tmp_path):
  meta = _tiny_metadata()
  del meta["llama.feed_forward_length"]
  _assert_rejected(_write(tmp_path / "hp.gguf", _tiny_tensors(), meta), "llama.feed_forward_length")


def test_heads_must_divide(tmp_path):
  meta = _tiny_metadata()
  meta["llama.attention.head_count_kv"] = 3
  _assert_rejected(_write(tmp_path / "heads.gguf", _tiny_tensors(), meta), "n_kv_heads 3")


@pytest.mark.parametrize("key, words", [
    ("tokenizer.ggml.scores", ("no scores",)),
    ("tokenizer.ggml.model", ("no tokenizer",)),
    ("tokenizer.ggml.tokens", ("no pieces",)),
    ("tokenizer.ggml.bos_token_id", ("bos_token_id",)),
])
def test_tokenizer_metadata_missing(tmp_path, key, words):
  meta = _tiny_metadata()
  del meta[key]
  _assert_rejected(_write(tmp_path / "tok.gguf", _tiny_tensors(), meta), *words)


def test_tokenizer_model_unsupported(tmp_path):
  meta = _tiny_metadata()
  meta["tokenizer.ggml.model"] = "rwkv"
  _assert_rejected(_write(tmp_path / "rwkv.gguf", _tiny_tensors(), meta), "tokenizer.ggml.model", "'rwkv'")


@pytest.mark.parametrize("pre", [None, "llama-bpe"])
def test_gpt2_tokenizer_pre_type_unsupported(tmp_path, pre):
  """A gpt2 (byte-level BPE) vocabulary whose pre-tokenizer type is missing or not one we implement."""
  meta = _tiny_metadata()
  del meta["tokenizer.ggml.scores"]
  meta.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": ["a b"]})
  if pre is not None:
    meta["tokenizer.ggml.pre"] = pre
  _assert_rejected(_write(tmp_path / "bpe.gguf", _tiny_tensors(), meta), "tokenizer.ggml.pre", repr(pre), "'smollm'")


def test_chat_template_kept_or_rejected(tmp_path):
  meta = _tiny_metadata()
  assert load_gguf(_write(tmp_path / "none.gguf", _tiny_tensors(), meta)).chat_template is None
  meta["tokenizer.chat_template"] = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
  model = load_gguf(_write(tmp_path / "chat.gguf", _tiny_tensors(), meta))
  assert model.chat_template.apply_chat_template([{"role": "user", "content": "ab"}]) == "<s>ab"
  meta["tokenizer.chat_template"] = "{% for m in messages %}"
  _assert_rejected(_write(tmp_path / "bad.gguf", _tiny_tensors(), meta), "tokenizer.chat_template", "Jinja")


def test_tokenizer_without_byte_pieces(tmp_path):
  meta = _tiny_metadata()
  meta["tokenizer.ggml.tokens"] = [p.replace("<0x41>", "A") for p in _PIECES]
  _assert_rejected(_write(tmp_path / "bytes.gguf", _tiny_tensors(), meta), "byte-fallback")
