"""The SentencePiece-style (Llama) BPE tokenizer, encoding and decoding exactly as llama2.c's `run.c` does.

Pieces are kept in SentencePiece spelling: a space is U+2581 ("▁"), byte-fallback pieces are "<0x00>".."<0xFF>"
at 256 consecutive ids, BOS/EOS are "<s>"/"</s>". llama2.c's `tok512.bin` spells spaces as " " and BOS/EOS as
"\\n<s>\\n"/"\\n</s>\\n"; `from_llama2c` maps them back, so the GGUF and llama2.c tokenizers of one model compare equal.

encode(text) (llama2.c `encode`):
  1. if text is non-empty, prepend one space (SentencePiece's add_dummy_prefix);
  2. map every Unicode code point to its piece, or, when it has none, to the byte-fallback ids of its UTF-8 bytes;
  3. repeatedly merge the adjacent pair whose concatenation is a piece with the highest score, the leftmost pair on
     ties, until no pair merges;
  4. put BOS in front / EOS at the end when asked (they never merge).
Step 3 is `pair_merge.merge_pairs` with priority -score, a priority queue that picks the same pair as llama2.c's
quadratic scan at every step, so the result is identical; ~400 KB of text encodes in under two seconds.

decode(ids) (llama2.c `decode`): concatenates pieces ("▁" -> " "), drops one leading space of the piece right after
BOS, turns byte-fallback pieces into raw bytes, and UTF-8-decodes the whole byte string (invalid sequences, which a
sampled model may emit, become U+FFFD). BOS, EOS and UNK produce no text.
"""
from __future__ import annotations

import dataclasses
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lowbit_jax.checks import as_bool, check_text, token_ids
from lowbit_jax.io.loaded import CheckpointError
from lowbit_jax.io.pair_merge import merge_pairs

SPACE = "\u2581"
# llama.cpp's token types (LLAMA_TOKEN_TYPE_*), as GGUF `tokenizer.ggml.token_type` stores them
TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_BYTE = 1, 2, 3, 6
_NO_TOKEN = (-1, 0xFFFFFFFF)  # llama.cpp's "no such token" id
_LLAMA2C_BOS, _LLAMA2C_EOS = "\n<s>\n", "\n</s>\n"


def padding_id(metadata: Mapping[str, Any], n_tokens: int) -> int | None:
  """`tokenizer.ggml.padding_token_id`, or None when it is absent, llama.cpp's "no such token", or not an id of
  the vocabulary (llama.cpp then warns "bad special token" and keeps its default; nothing here pads)."""
  pad = metadata.get("tokenizer.ggml.padding_token_id")
  return pad if type(pad) is int and 0 <= pad < n_tokens else None  # noqa: E721 -- not a bool


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A Llama BPE vocabulary. Invariants (checked on construction, `ValueError` otherwise):

  * `len(pieces) == len(scores)`, pieces are unique;
  * the byte-fallback pieces "<0x00>".."<0xFF>" sit at 256 consecutive ids starting at `byte_offset`;
  * `bos_id`, `eos_id` (and `unk_id`, `pad_id` unless None) are valid ids;
  * `token_types`, when given, has one GGUF token type per piece and marks exactly the byte-fallback pieces BYTE.

  `token_types` (GGUF `tokenizer.ggml.token_type`) does not change encoding or decoding, so it is not compared; it
  is kept so that `to_gguf_metadata` writes back what the file had. None: the types llama.cpp's converters give a
  SentencePiece vocabulary (`default_token_types`).
  """
  pieces: tuple[str, ...] = dataclasses.field(repr=False)
  scores: tuple[float, ...] = dataclasses.field(repr=False)  # float32 values as Python floats: == compares them
  bos_id: int
  eos_id: int
  unk_id: int | None = None
  pad_id: int | None = None
  token_types: tuple[int, ...] | None = dataclasses.field(default=None, repr=False, compare=False)
  _ids: dict[str, int] = dataclasses.field(init=False, repr=False, compare=False)
  _merges: dict[tuple[int, int], tuple[float, int]] = dataclasses.field(init=False, repr=False, compare=False)
  byte_offset: int = dataclasses.field(init=False, compare=False)

  def __post_init__(self) -> None:
    n = len(self.pieces)
    if len(self.scores) != n:
      raise ValueError(f"{n} pieces but {len(self.scores)} scores")
    ids = {piece: i for i, piece in enumerate(self.pieces)}
    if len(ids) != n:
      raise ValueError("tokenizer pieces are not unique")
    for name in ("bos_id", "eos_id", "unk_id", "pad_id"):
      value = getattr(self, name)
      if value is not None and not 0 <= value < n:
        raise ValueError(f"{name} {value} is not an id of a {n}-piece vocabulary")
    offset = ids.get("<0x00>")
    if offset is None or self.pieces[offset:offset + 256] != tuple(f"<0x{b:02X}>" for b in range(256)):
      raise ValueError("the byte-fallback pieces <0x00>..<0xFF> are missing or not at consecutive ids")
    if self.token_types is not None:
      byte_ids = np.flatnonzero(np.asarray(self.token_types) == TOKEN_TYPE_BYTE)
      if len(self.token_types) != n or not np.array_equal(byte_ids, offset + np.arange(256)):
        raise ValueError("token_types (GGUF tokenizer.ggml.token_type) are not one per piece, or disagree with the "
                         "byte-fallback pieces <0x00>..<0xFF>")
    # Every way of writing a piece as the concatenation of two pieces: (left, right) -> (-score, merged id), the
    # priority `merge_pairs` merges lowest first (so the best score first).
    merges: dict[tuple[int, int], tuple[float, int]] = {}
    for merged, piece in enumerate(self.pieces):
      for cut in range(1, len(piece)):
        left, right = ids.get(piece[:cut]), ids.get(piece[cut:])
        if left is not None and right is not None:
          merges[(left, right)] = (-self.scores[merged], merged)
    object.__setattr__(self, "_ids", ids)
    object.__setattr__(self, "_merges", merges)
    object.__setattr__(self, "byte_offset", offset)

  @property
  def vocab_size(self) -> int:
    return len(self.pieces)

  @property
  def add_bos(self) -> bool:
    """What `encode(text)` does without `bos=`: llama2.c always starts with BOS."""
    return True

  # ---------------------------------------------------------------------------------------------- constructors

  @classmethod
  def from_gguf_metadata(cls, metadata: Mapping[str, Any], *, path: object) -> "Tokenizer":
    """From GGUF `tokenizer.ggml.*` metadata (plain Python values), as written by llama.cpp for the llama vocab.

    Raises:
      CheckpointError: naming `path`, when the tokenizer is missing, not llama-style, has no scores or is invalid.
    """
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
      raise CheckpointError(path, "no tokenizer in the metadata (tokenizer.ggml.model is missing)")
    if model != "llama":
      raise CheckpointError(path, f"tokenizer.ggml.model is {model!r}; only the SentencePiece-style 'llama' "
                                  "tokenizer is supported")
    pieces = metadata.get("tokenizer.ggml.tokens")
    scores = metadata.get("tokenizer.ggml.scores")
    if pieces is None:
      raise CheckpointError(path, "tokenizer has no pieces (tokenizer.ggml.tokens is missing)")
    if scores is None:
      raise CheckpointError(path, "tokenizer has no scores (tokenizer.ggml.scores is missing); a llama BPE "
                                  "tokenizer needs them to pick merges")
    missing = [k for k in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id") if k not in metadata]
    if missing:
      raise CheckpointError(path, f"tokenizer metadata lacks {missing}")
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    types = metadata.get("tokenizer.ggml.token_type")
    return cls._checked(path, pieces, scores, metadata["tokenizer.ggml.bos_token_id"],
                        metadata["tokenizer.ggml.eos_token_id"], None if unk in _NO_TOKEN else unk,
                        pad=padding_id(metadata, len(pieces)), types=types)

  def default_token_types(self) -> tuple[int, ...]:
    """The GGUF token types llama.cpp's converters give a SentencePiece vocabulary: UNKNOWN for `unk_id`, CONTROL
    for BOS and EOS, BYTE for <0x00>..<0xFF>, NORMAL otherwise."""
    types = [TOKEN_TYPE_NORMAL] * self.vocab_size
    types[self.byte_offset:self.byte_offset + 256] = [TOKEN_TYPE_BYTE] * 256
    types[self.bos_id] = types[self.eos_id] = TOKEN_TYPE_CONTROL
    if self.unk_id is not None:
      types[self.unk_id] = TOKEN_TYPE_UNKNOWN
    return tuple(types)

  def to_gguf_metadata(self) -> dict[str, Any]:
    """The GGUF `tokenizer.ggml.*` metadata of this vocabulary (plain Python values), the inverse of
    `from_gguf_metadata`: `Tokenizer.from_gguf_metadata(t.to_gguf_metadata(), path=...) == t`. Also states what
    llama.cpp would otherwise assume for the `llama` vocabulary: BOS added, a space prefixed (`encode` does both)."""
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": list(self.pieces),
        "tokenizer.ggml.scores": list(self.scores),
        "tokenizer.ggml.token_type": list(self.token_types or self.default_token_types()),
        "tokenizer.ggml.bos_token_id": self.bos_id,
        "tokenizer.ggml.eos_token_id": self.eos_id,
        "tokenizer.ggml.add_bos_token": self.add_bos,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": True,
    }
    if self.unk_id is not None:
      meta["tokenizer.ggml.unknown_token_id"] = self.unk_id
    if self.pad_id is not None:
      meta["tokenizer.ggml.padding_token_id"] = self.pad_id
    return meta

  @classmethod
  def from_llama2c(cls, path: str | Path, vocab_size: int) -> "Tokenizer":
    """From llama2.c's `tokenizer.bin` (e.g. `tok512.bin`): int32 max_token_length, then per piece a float32
    score, an int32 byte length and the UTF-8 bytes. The file does not store the piece count: it is the model's
    `vocab_size`, and the file must hold exactly that many pieces. BOS/EOS are the "\\n<s>\\n"/"\\n</s>\\n" pieces.

    Raises:
      FileNotFoundError: when `path` does not exist.
      CheckpointError: naming `path`, when the file is truncated, too long or malformed.
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 4:
      raise CheckpointError(path, f"truncated llama2.c tokenizer: {len(data)} bytes, no header")
    (max_len,) = struct.unpack_from("<i", data, 0)
    pieces, scores, offset = [], [], 4
    for i in range(vocab_size):
      if offset + 8 > len(data):
        raise CheckpointError(path, f"truncated llama2.c tokenizer: ends inside piece {i} of {vocab_size}")
      score, length = struct.unpack_from("<fi", data, offset)
      if not 0 < length <= max_len or offset + 8 + length > len(data):
        raise CheckpointError(path, f"piece {i} has length {length} (max_token_length {max_len}, "
                                    f"{len(data) - offset - 8} bytes left): truncated or corrupted")
      try:
        piece = data[offset + 8:offset + 8 + length].decode("utf-8")
      except UnicodeDecodeError as e:
        raise CheckpointError(path, f"piece {i} is not valid UTF-8") from e
      pieces.append(piece)
      scores.append(score)
      offset += 8 + length
    if offset != len(data):
      raise CheckpointError(path, f"{len(data) - offset} bytes after the {vocab_size} pieces the model's "
                                  "vocab_size asks for: the tokenizer does not belong to this model")
    if _LLAMA2C_BOS not in pieces or _LLAMA2C_EOS not in pieces:
      raise CheckpointError(path, "no BOS/EOS pieces ('\\n<s>\\n', '\\n</s>\\n')")
    bos, eos = pieces.index(_LLAMA2C_BOS), pieces.index(_LLAMA2C_EOS)
    pieces[bos], pieces[eos] = "<s>", "</s>"
    pieces = [p if i in (bos, eos) else p.replace(" ", SPACE) for i, p in enumerate(pieces)]
    unk = pieces.index("<unk>") if "<unk>" in pieces else None
    return cls._checked(path, pieces, scores, bos, eos, unk)

  @classmethod
  def _checked(cls, path: object, pieces: Sequence[str], scores: Sequence[float], bos: int, eos: int,
               unk: int | None, *, pad: int | None = None, types: Sequence[int] | None = None) -> "Tokenizer":
    """The constructor, with its ValueError turned into a CheckpointError naming `path`."""
    scores32 = np.asarray(scores, dtype=np.float32)
    if not np.all(np.isfinite(scores32)):
      raise CheckpointError(path, "tokenizer scores are not all finite")
    try:
      return cls(tuple(pieces), tuple(scores32.tolist()), int(bos), int(eos), None if unk is None else int(unk),
                 pad_id=None if pad is None else int(pad),
                 token_types=None if types is None else tuple(int(t) for t in types))
    except ValueError as e:
      raise CheckpointError(path, f"invalid tokenizer: {e}") from e

  # ---------------------------------------------------------------------------------------------- encode/decode

  def encode(self, text: str, *, bos: bool | None = None, eos: bool = False) -> list[int]:
    """Token ids of `text`, exactly as llama2.c's `encode` (see the module docstring); BOS first unless
    `bos=False` (None: `add_bos`, i.e. True)."""
    check_text(text, "encode: text")
    bos = self.add_bos if bos is None else as_bool(bos, "encode: bos")
    eos = as_bool(eos, "encode: eos")
    ids: list[int] = []
    if text:
      lookup, offset = self._ids, self.byte_offset
      for char in " " + text:
        # A literal "▁" in the text is not a space: llama2.c (pieces spelled with " ") byte-encodes it.
        token = None if char == SPACE else lookup.get(SPACE if char == " " else char)
        if token is not None:
          ids.append(token)
        else:
          ids.extend(b + offset for b in char.encode("utf-8"))
      ids = merge_pairs(ids, self._merges)
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`, exactly as llama2.c's `decode` prints it (see the module docstring).

    Raises:
      ValueError: when `ids` is not a sequence of ints (a float id is never rounded) or an id is outside the
        vocabulary.
    """
    out = bytearray()
    silent = {self.bos_id, self.eos_id, self.unk_id}
    prev = None
    for token in token_ids(ids, len(self.pieces), "decode: ids").tolist():
      if token in silent:
        pass
      elif 0 <= token - self.byte_offset < 256:
        out.append(token - self.byte_offset)
      else:
        piece = self.pieces[token].replace(SPACE, " ")
        if prev == self.bos_id and piece.startswith(" "):
          piece = piece[1:]
        out += piece.encode("utf-8")
      prev = token
    return out.decode("utf-8", errors="replace")

  def piece_bytes(self, token: int) -> bytes:
    """The bytes one token contributes to a decoded text (no BOS-space stripping): a piece per token view."""
    if 0 <= token - self.byte_offset < 256:
      return bytes([token - self.byte_offset])
    if token in (self.bos_id, self.eos_id, self.unk_id):
      return b""
    return self.pieces[token].replace(SPACE, " ").encode("utf-8")
