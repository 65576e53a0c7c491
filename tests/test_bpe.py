"""GPT-2 byte-level BPE (lowbit_jax.io.bpe) on SmolLM2's GGUF vocabulary: token for token equal to a Hugging Face
`tokenizers` BPE built from the same file (tests/hf_bpe_oracle.py) on real text, special-token strings and arbitrary
text; decoding inverts encoding; llama.cpp's handling of bytes the vocabulary lacks; bad vocabularies."""
from __future__ import annotations

import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from hf_bpe_oracle import CONTROL, hf_tokenizer, tokenizer_metadata
from lowbit_jax.assets import asset_path
from lowbit_jax.io.bpe import BPETokenizer, PreTokenizer, byte_to_unicode
from lowbit_jax.io.loaded import CheckpointError


@pytest.fixture(scope="module")
def tok(smollm2) -> BPETokenizer:
  assert isinstance(smollm2.tokenizer, BPETokenizer)
  return smollm2.tokenizer


@pytest.fixture(scope="module")
def hf(smollm2_path):
  return hf_tokenizer(smollm2_path)


def hf_ids(hf, text: str) -> list[int]:
  return hf.encode(text, add_special_tokens=False).ids


def test_vocabulary_as_in_the_file(tok, smollm2_path):
  meta = tokenizer_metadata(smollm2_path)
  assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
  assert tok.pre == PreTokenizer.SMOLLM and tok.vocab_size == len(meta["tokenizer.ggml.tokens"]) == 49152
  assert tok.tokens == tuple(meta["tokenizer.ggml.tokens"]) and len(tok.merges) == len(meta["tokenizer.ggml.merges"])
  assert (tok.bos_id, tok.eos_id, tok.unk_id) == (meta["tokenizer.ggml.bos_token_id"],
                                                  meta["tokenizer.ggml.eos_token_id"],
                                                  meta["tokenizer.ggml.unknown_token_id"])
  assert tok.add_bos is meta["tokenizer.ggml.add_bos_token"] is False


def test_byte_map_is_hugging_faces_byte_level_alphabet():
  table = byte_to_unicode()
  assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
  assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
  assert table[ord(" ")] == "\u0120" and table[ord("\n")] == "\u010a" and table[ord("A")] == "A"


@pytest.mark.parametrize("asset, n_chars", [("wikitext2_raw/wiki.test.raw", None),
                                            ("tinystories/tinystories_val_part1.txt", 200_000)])
def test_real_text_equals_hugging_face(tok, hf, asset, n_chars):
  """All 1.3 MB of WikiText-2 test (numbers, ' @-@ ', unicode) and 200 kB of TinyStories, encoded whole; WikiText-2
  also bounds the time (the per-word cache makes repeated words free)."""
  text = asset_path(asset).read_text(encoding="utf-8")[:n_chars]
  start = time.perf_counter()
  ids = tok.encode(text)
  seconds = time.perf_counter() - start
  assert ids == hf_ids(hf, text)
  assert seconds < 30.0, f"encoding {len(text)} characters took {seconds:.1f} s"
  assert len(ids) < len(text) / 3.0  # real merging happened (~4.2 characters per token on WikiText-2)
  assert tok.decode(ids) == text


def test_random_snippets_equal_hugging_face(tok, hf):
  """Snippets starting and ending anywhere (mid-word, mid-number, inside runs of spaces), each encoded fresh."""
  text = asset_path("wikitext2_raw/wiki.valid.raw").read_text(encoding="utf-8")
  rng = random.Random(0)
  for _ in range(300):
    start = rng.randrange(len(text))
    snippet = text[start:start + rng.randrange(1, 400)]
    assert tok.encode(snippet) == hf_ids(hf, snippet), repr(snippet)


SPECIAL = [
    "<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "<|im_start|><|im_start|><|im_end|>", "a<|im_end|>b", "<|im_start", "|im_start|>", "<|im_start|\n>",
    "<|endoftext|>The end.<|endoftext|>", "<repo_name>x<file_sep>y<filename>z", "<jupyter_code>print(1)",
    " <|im_end|> ", "<<|im_end|>>", "In 2024, 12345 people paid $3.50 (i.e. 1/2)", "x\t\ty", "  ", " \n \n",
    "don't I'll we've", "DON'T", "éé\u00a0x", "١٢٣ ²³ Ⅻ", "🙂👍🏽", "日本語のテキスト", "a  b   c", "\r\n\r\n", "",
]


@pytest.mark.parametrize("text", SPECIAL)
def test_special_strings_equal_hugging_face(tok, hf, text):
  ids = tok.encode(text)
  assert ids == hf_ids(hf, text)
  assert tok.decode(ids) == text


def test_control_tokens_encode_whole(tok, smollm2_path):
  meta = tokenizer_metadata(smollm2_path)
  control = [i for i, kind in enumerate(meta["tokenizer.ggml.token_type"]) if kind == CONTROL]
  assert len(control) == 17 and tok.tokens[1] == "<|im_start|>" and tok.tokens[2] == "<|im_end|>"
  for i in control:
    assert tok.encode(tok.tokens[i]) == [i]
    assert tok.encode("x" + tok.tokens[i] + "x") == [tok.encode("x")[0], i, tok.encode("x")[0]]


@pytest.fixture(scope="module")
def tokenless_bytes(tok) -> frozenset[int]:
  """Bytes whose byte-level symbol is not a token of the vocabulary (SmolLM2 lacks 21)."""
  vocab = set(tok.tokens)
  return frozenset(b for b, c in byte_to_unicode().items() if c not in vocab)


# Code points whose UTF-8 holds a byte without a token are left out: there llama.cpp (which we follow) and Hugging
# Face differ (see test_bytes_without_a_token_are_dropped_and_block_merges).
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_arbitrary_text_equals_hugging_face(tok, hf, tokenless_bytes, text):
  text = "".join(c for c in text if tokenless_bytes.isdisjoint(c.encode("utf-8")))
  ids = tok.encode(text)
  assert ids == hf_ids(hf, text)
  assert tok.decode(ids) == text


def test_bytes_without_a_token_are_dropped_and_block_merges(tok, tokenless_bytes):
  """SmolLM2 has no token for byte 0x04. llama.cpp keeps such a byte as a symbol while merging (nothing merges with
  it) and drops it at the end, so "!\\x04!" is "!" "!" although "!!" is one token."""
  assert len(tokenless_bytes) == 21 and 0x04 in tokenless_bytes and len(tok.encode("!!")) == 1
  assert tok.encode("!\x04!") == tok.encode("!") * 2
  assert tok.encode("a\x04b") == tok.encode("a") + tok.encode("b")


def test_bos_eos_and_decode(tok):
  hi = tok.encode("Hi")
  assert tok.encode("Hi", bos=True) == [tok.bos_id] + hi and tok.encode("Hi", eos=True) == hi + [tok.eos_id]
  assert tok.encode("", bos=True, eos=True) == [tok.bos_id, tok.eos_id] and tok.encode("") == []
  assert tok.decode([tok.bos_id] + hi + [tok.eos_id]) == "<|im_start|>Hi<|im_end|>"
  assert tok.decode(tok.encode("€")) == "€"  # 3 UTF-8 bytes
  lone = [i for i, t in enumerate(tok.tokens) if t == byte_to_unicode()[0xE2]]
  assert tok.decode(lone) == "\ufffd"  # an incomplete UTF-8 sequence a sampler may emit
  with pytest.raises(ValueError, match="49152"):
    tok.decode([49152])


def _tiny(**overrides) -> dict:
  chars = [byte_to_unicode()[b] for b in range(256)]
  fields = dict(tokens=tuple(["<s>", "</s>"] + chars + ["ab", "abc"]), token_types=tuple([3, 3] + [1] * 258),
                merges=(("a", "b"), ("ab", "c")), pre=PreTokenizer.SMOLLM, bos_id=0, eos_id=1)
  fields.update(overrides)
  return fields


def test_constructor_invariants():
  t = BPETokenizer(**_tiny())
  assert t.encode("abc abcab") == [259, t.encode(" ")[0], 259, 258]
  with pytest.raises(ValueError, match="unique"):
    BPETokenizer(**_tiny(tokens=_tiny()["tokens"][:-1] + ("ab",)))
  with pytest.raises(ValueError, match="token types"):
    BPETokenizer(**_tiny(token_types=(1,) * 3))
  with pytest.raises(ValueError, match="merge 1"):
    BPETokenizer(**_tiny(merges=(("a", "b"), ("b", "c"))))
  with pytest.raises(ValueError, match="eos_id"):
    BPETokenizer(**_tiny(eos_id=260))


def test_metadata_errors_name_the_file():
  meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": ["a"],
          "tokenizer.ggml.token_type": [1], "tokenizer.ggml.merges": ["a"], "tokenizer.ggml.bos_token_id": 0,
          "tokenizer.ggml.eos_token_id": 0}
  with pytest.raises(CheckpointError, match=r"^m\.gguf: tokenizer.ggml.merges\[0\] is 'a'"):
    BPETokenizer.from_gguf_metadata(meta, path="m.gguf")
  with pytest.raises(CheckpointError, match=r"^m\.gguf: .*tokenizer.ggml.pre 'qwen2'"):
    BPETokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "qwen2"}, path="m.gguf")
  with pytest.raises(CheckpointError, match=r"^m\.gguf: gpt2 tokenizer metadata lacks \['tokenizer.ggml.merges'\]"):
    BPETokenizer.from_gguf_metadata({k: v for k, v in meta.items() if k != "tokenizer.ggml.merges"}, path="m.gguf")
