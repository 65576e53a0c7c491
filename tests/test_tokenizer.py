"""Tokenizer: the GGUF and llama2.c vocabularies agree; encode/decode equal a literal port of llama2.c's run.c
(quadratic merge loop over raw byte strings, read straight from tok512.bin) and round-trip real text."""
from __future__ import annotations

import random
import struct
import time
from functools import cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowbit_jax.assets import asset_path
from lowbit_jax.io.tokenizer import Tokenizer

ONCE = "Once upon a time"


@pytest.fixture(scope="module")
def tok(stories260k) -> Tokenizer:
  """The GGUF file's tokenizer."""
  return stories260k.loaded.tokenizer


@cache
def _raw_llama2c_vocab() -> tuple[list[bytes], list[float]]:
  """tok512.bin read the way run.c's build_tokenizer does, with no canonicalisation."""
  data = asset_path("stories260K_llama2c/tok512.bin").read_bytes()
  pieces, scores, offset = [], [], 4
  while offset < len(data):
    score, length = struct.unpack_from("<fi", data, offset)
    pieces.append(data[offset + 8:offset + 8 + length])
    scores.append(score)
    offset += 8 + length
  return pieces, scores


def _reference_encode(text: str, bos: bool = True, eos: bool = False) -> list[int]:
  """run.c's encode(), statement for statement, on the raw vocabulary (BOS=1, EOS=2, byte fallback +3)."""
  pieces, scores = _raw_llama2c_vocab()
  lookup = {p: i for i, p in enumerate(pieces)}
  raw = text.encode("utf-8")
  tokens = [1] if bos else []
  if raw:
    tokens.append(lookup[b" "])
  buf = b""
  for k, c in enumerate(raw):
    if c & 0xC0 != 0x80:
      buf = b""
    buf += bytes([c])
    nxt = raw[k + 1] if k + 1 < len(raw) else 0
    if nxt & 0xC0 == 0x80 and len(buf) < 4:
      continue
    if buf in lookup:
      tokens.append(lookup[buf])
    else:
      tokens.extend(b + 3 for b in buf)
    buf = b""
  while True:
    best_score, best_id, best_idx = -1e10, -1, -1
    for i in range(len(tokens) - 1):
      merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]], -1)
      if merged != -1 and scores[merged] > best_score:
        best_score, best_id, best_idx = scores[merged], merged, i
    if best_idx == -1:
      break
    tokens[best_idx:best_idx + 2] = [best_id]
  return tokens + ([2] if eos else [])


def _reference_decode(ids: list[int]) -> str:
  """run.c's decode() per token, concatenated, skipping BOS/EOS (generation stops there)."""
  pieces, _ = _raw_llama2c_vocab()
  out, prev = b"", None
  for token in ids:
    piece = pieces[token]
    if token not in (1, 2):
      if prev == 1 and piece.startswith(b" "):
        piece = piece[1:]
      if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
        piece = bytes([int(piece[3:5], 16)])
      out += piece
    prev = token
  return out.decode("utf-8")


# ------------------------------------------------------------------------------------------------- vocabularies

def test_gguf_and_llama2c_vocabularies_are_identical(tok):
  c_tok = Tokenizer.from_llama2c(asset_path("stories260K_llama2c/tok512.bin"), 512)
  assert tok.pieces == c_tok.pieces and tok.scores == c_tok.scores
  assert (tok.bos_id, tok.eos_id, tok.unk_id) == (c_tok.bos_id, c_tok.eos_id, c_tok.unk_id) == (1, 2, 0)
  assert tok == c_tok
  assert tok.byte_offset == 3 and tok.pieces[3 + 0x41] == "<0x41>"


def test_constructor_invariants():
  pieces = ("<unk>", "<s>", "</s>") + tuple(f"<0x{b:02X}>" for b in range(256))
  Tokenizer(pieces, (0.0,) * 259, bos_id=1, eos_id=2)
  with pytest.raises(ValueError, match="scores"):
    Tokenizer(pieces, (0.0,) * 258, bos_id=1, eos_id=2)
  with pytest.raises(ValueError, match="unique"):
    Tokenizer(pieces + ("<s>",), (0.0,) * 260, bos_id=1, eos_id=2)
  with pytest.raises(ValueError, match="eos_id"):
    Tokenizer(pieces, (0.0,) * 259, bos_id=1, eos_id=259)
  with pytest.raises(ValueError, match="byte-fallback"):
    Tokenizer(pieces[:-1] + ("x",), (0.0,) * 259, bos_id=1, eos_id=2)


# ------------------------------------------------------------------------------------------------- encode/decode

def test_once_upon_a_time(tok):
  ids = tok.encode(ONCE)
  assert ids == [1, 403, 407, 261, 378] == _reference_encode(ONCE)
  assert [tok.pieces[i] for i in ids[1:]] == ["▁Once", "▁upon", "▁a", "▁time"]
  assert b"".join(tok.piece_bytes(i) for i in ids).decode() == " " + ONCE  # the dummy prefix
  assert tok.decode(ids) == ONCE
  assert tok.decode(ids[1:]) == " " + ONCE  # llama2.c strips the prefix space only right after BOS
  assert tok.encode(ONCE, bos=False, eos=True) == ids[1:] + [2]


def test_empty_text_has_no_dummy_prefix(tok):
  assert tok.encode("") == [1] and tok.encode("", bos=False) == [] and tok.encode("", eos=True) == [1, 2]
  assert tok.decode([]) == "" and tok.decode([1, 2]) == ""


SPECIAL = ["a", " ", "  two  spaces ", "\n", "line\n\nbreaks\n", "tab\there", "naïve café",
           "日本語のテキスト", "emoji 🙂👍🏽!", "a literal ▁ mark", "<0x41> looks like a byte piece",
           "<s> is not BOS", "\u0000nul",
           "Lily's mom said, \"Lily, let's go to the park.\""]


@pytest.mark.parametrize("text", SPECIAL)
def test_matches_llama2c_on_special_strings(text, tok):
  ids = tok.encode(text)
  assert ids == _reference_encode(text)
  assert tok.decode(ids) == _reference_decode(ids) == text


def test_matches_llama2c_on_random_snippets(tok):
  text = asset_path("tinystories/tinystories_val_part1.txt").read_text(encoding="utf-8")
  rng = random.Random(0)
  for _ in range(60):
    start = rng.randrange(len(text))
    snippet = text[start:start + rng.randrange(1, 250)]
    assert tok.encode(snippet, eos=True) == _reference_encode(snippet, eos=True), repr(snippet)


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_matches_llama2c_on_arbitrary_text(tok, text):
  ids = tok.encode(text)
  assert ids == _reference_encode(text)
  assert tok.decode(ids) == text


def test_round_trip_of_the_whole_tinystories_validation_text(tok):
  text = asset_path("tinystories/tinystories_val_part1.txt").read_text(encoding="utf-8")
  assert len(text) > 400_000
  start = time.perf_counter()
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert time.perf_counter() - start < 10.0
  assert ids[0] == 1 and 2 not in ids and 0 not in ids
  assert len(ids) < len(text) / 1.9  # real merging happened (~2.05 characters per token)


def test_round_trip_of_non_ascii_wikitext(tok):
  text = asset_path("wikitext2_raw/wiki.valid.raw").read_text(encoding="utf-8")[:100_000]
  assert any(ord(c) > 127 for c in text)
  assert tok.decode(tok.encode(text)) == text


def test_decode_of_model_output(tok):
  assert tok.decode([1, 3 + 0xE2]) == "\ufffd"  # an incomplete UTF-8 sequence a sampler may emit
  with pytest.raises(ValueError, match="512"):
    tok.decode([512])
