"""GPT-2 byte-level BPE, as llama.cpp runs a GGUF vocabulary with `tokenizer.ggml.model == "gpt2"`.

encode(text):
  1. special tokens (GGUF token types CONTROL, USER_DEFINED and UNKNOWN, e.g. "<|im_start|>") found in the text
     are emitted as their ids, whole: at every position the longest special text matches first (HF's added
     tokens, llama.cpp's `tokenizer_st_partition`); the text between them goes through steps 2-4;
  2. pre-tokenization: the `tokenizer.ggml.pre` type's regular expressions (llama.cpp `src/llama-vocab.cpp`) split
     the text in turn; each expression splits every fragment the previous one left into its matches and the gaps
     between them (a lookahead stops at the fragment's end), as llama.cpp's `unicode_regex_split` does;
  3. each word's UTF-8 bytes become the byte-level symbols of GPT-2's byte-to-unicode map (space -> "Ġ",
     newline -> "Ċ", ...), the ids of the one-symbol tokens;
  4. adjacent symbols merge by merge rank, lowest first, leftmost on ties (`pair_merge.merge_pairs`), until no
     pair of `tokenizer.ggml.merges` applies. A word's result is cached: text repeats words.
  A byte whose symbol is not a token (SmolLM2 lacks 21, e.g. 0x04, 0xC0, 0xFF) merges with nothing and is dropped,
  as llama.cpp's `llm_tokenizer_bpe_session` drops a final symbol it cannot find (its neighbours stay apart).
  BOS / EOS are added when asked (`bos=None` follows `tokenizer.ggml.add_bos_token`).

decode(ids): normal tokens map back through the byte map to bytes, special tokens give their text as written, and
the whole byte string is UTF-8-decoded (invalid sequences, which a sampled model may emit, become U+FFFD); so
`decode(encode(text)) == text` for every text whose bytes all have tokens.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import Any

import regex

from lowbit_jax.checks import as_bool, check_text, token_ids
from lowbit_jax.io.loaded import CheckpointError
from lowbit_jax.io.pair_merge import merge_pairs
from lowbit_jax.io.tokenizer import padding_id

_GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_SPECIAL_TYPES = frozenset({2, 3, 4})  # llama.cpp's token types UNKNOWN, CONTROL, USER_DEFINED
_CACHE_LIMIT = 1 << 17  # words; the cache is emptied when it grows past this
_NO_TOKEN = (None, -1, 0xFFFFFFFF)  # an absent id, or llama.cpp's "no such token"


class PreTokenizer(enum.Enum):
  """A supported `tokenizer.ggml.pre` value; `patterns` are llama.cpp's regular expressions for it, in order."""
  SMOLLM = "smollm"  # LLAMA_VOCAB_PRE_TYPE_SMOLLM: every digit alone, then GPT-2's word pattern

  @property
  def patterns(self) -> tuple[str, ...]:
    return {PreTokenizer.SMOLLM: (r"\p{N}", _GPT2_WORDS)}[self]


def byte_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map: printable Latin-1 bytes map to themselves, the other 68
  bytes to chr(256), chr(257), ... in byte order (so space -> 'Ġ' (U+0120), newline -> 'Ċ')."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  table = {b: chr(b) for b in printable}
  extra = (b for b in range(256) if b not in table)
  table.update({b: chr(256 + k) for k, b in enumerate(extra)})
  return dict(sorted(table.items()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class BPETokenizer:
  """A byte-level BPE vocabulary. Invariants (checked on construction, `ValueError` otherwise):

  * tokens are unique and `len(token_types) == len(tokens)`;
  * every merge is two tokens whose concatenation is a token;
  * `bos_id`, `eos_id` (and `unk_id`, `pad_id` unless None) are valid ids.
  """
  tokens: tuple[str, ...] = dataclasses.field(repr=False)
  token_types: tuple[int, ...] = dataclasses.field(repr=False)  # GGUF token types (1 normal, 3 control, ...)
  merges: tuple[tuple[str, str], ...] = dataclasses.field(repr=False)  # by rank, best first
  pre: PreTokenizer
  bos_id: int
  eos_id: int
  unk_id: int | None = None
  pad_id: int | None = None  # `tokenizer.ggml.padding_token_id`: unused here, kept for the GGUF round trip
  add_bos: bool = False  # what `encode(text)` does without `bos=` (`tokenizer.ggml.add_bos_token`)
  _ids: dict[str, int] = dataclasses.field(init=False, repr=False, compare=False)
  _merge_ranks: dict[tuple[int, int], tuple[int, int]] = dataclasses.field(init=False, repr=False, compare=False)
  _byte_ids: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)  # byte -> id or -1
  _token_bytes: tuple[bytes, ...] = dataclasses.field(init=False, repr=False, compare=False)
  _special: Any = dataclasses.field(init=False, repr=False, compare=False)  # compiled regex of the special texts
  _splitters: tuple[Any, ...] = dataclasses.field(init=False, repr=False, compare=False)
  _cache: dict[str, tuple[int, ...]] = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self) -> None:
    n = len(self.tokens)
    ids = {token: i for i, token in enumerate(self.tokens)}
    if len(ids) != n:
      raise ValueError("tokens are not unique")
    if len(self.token_types) != n:
      raise ValueError(f"{n} tokens but {len(self.token_types)} token types")
    for name in ("bos_id", "eos_id", "unk_id", "pad_id"):
      value = getattr(self, name)
      if value is not None and not 0 <= value < n:
        raise ValueError(f"{name} {value} is not an id of a {n}-token vocabulary")
    to_char = byte_to_unicode()
    ranks: dict[tuple[int, int], tuple[int, int]] = {}
    for rank, (left, right) in enumerate(self.merges):
      pair, merged = (ids.get(left), ids.get(right)), ids.get(left + right)
      if None in pair or merged is None:
        raise ValueError(f"merge {rank} ({left!r} {right!r}) does not join two tokens into a token")
      ranks.setdefault(pair, (rank, merged))  # a repeated merge keeps its best rank
    special = {i for i, t in enumerate(self.token_types) if t in _SPECIAL_TYPES}
    to_byte = {c: b for b, c in to_char.items()}
    token_bytes = tuple(  # special tokens, and any token outside the byte alphabet, decode to their text
        token.encode("utf-8") if i in special or any(c not in to_byte for c in token)
        else bytes(to_byte[c] for c in token)
        for i, token in enumerate(self.tokens))
    texts = sorted((self.tokens[i] for i in special if self.tokens[i]), key=len, reverse=True)
    set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen dataclass)
    set_("_ids", ids)
    set_("_merge_ranks", ranks)
    set_("_byte_ids", tuple(ids.get(to_char[b], -1) for b in range(256)))  # -1: a barrier, dropped
    set_("_token_bytes", token_bytes)
    set_("_special", regex.compile("|".join(map(regex.escape, texts))) if texts else None)
    set_("_splitters", tuple(regex.compile(p) for p in self.pre.patterns))
    set_("_cache", {})

  @property
  def vocab_size(self) -> int:
    return len(self.tokens)

  # ---------------------------------------------------------------------------------------------- constructor

  @classmethod
  def from_gguf_metadata(cls, metadata: Mapping[str, Any], *, path: object) -> "BPETokenizer":
    """From GGUF `tokenizer.ggml.*` metadata (plain Python values) of a `gpt2` tokenizer.

    Raises:
      CheckpointError: naming `path`, when the model is not gpt2, the pre-tokenizer type is missing or
        unsupported, a field is missing, or the vocabulary breaks an invariant.
    """
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
      raise CheckpointError(path, f"tokenizer.ggml.model is {model!r}, not the byte-level BPE 'gpt2'")
    pre = metadata.get("tokenizer.ggml.pre")
    supported = [p.value for p in PreTokenizer]
    if pre not in supported:
      raise CheckpointError(path, f"tokenizer.ggml.pre {pre!r} (pre-tokenizer type of the gpt2 tokenizer) is not "
                                  f"supported; supported: {supported}")
    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")
    missing = [k for k in keys if k not in metadata]
    if missing:
      raise CheckpointError(path, f"gpt2 tokenizer metadata lacks {missing}")
    merges = []
    for rank, merge in enumerate(metadata["tokenizer.ggml.merges"]):
      parts = merge.split(" ")
      if len(parts) != 2 or not all(parts):
        raise CheckpointError(path, f"tokenizer.ggml.merges[{rank}] is {merge!r}, not two tokens joined by a space")
      merges.append((parts[0], parts[1]))
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    try:
      return cls(tokens=tuple(metadata["tokenizer.ggml.tokens"]),
                 token_types=tuple(int(t) for t in metadata["tokenizer.ggml.token_type"]),
                 merges=tuple(merges), pre=PreTokenizer(pre),
                 bos_id=int(metadata["tokenizer.ggml.bos_token_id"]),
                 eos_id=int(metadata["tokenizer.ggml.eos_token_id"]),
                 unk_id=None if unk in _NO_TOKEN else int(unk),
                 pad_id=padding_id(metadata, len(metadata["tokenizer.ggml.tokens"])),
                 add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)))
    except ValueError as e:
      raise CheckpointError(path, f"invalid gpt2 tokenizer: {e}") from e

  def to_gguf_metadata(self) -> dict[str, Any]:
    """The GGUF `tokenizer.ggml.*` metadata of this vocabulary (plain Python values), the inverse of
    `from_gguf_metadata`: `BPETokenizer.from_gguf_metadata(t.to_gguf_metadata(), path=...) == t`. Merges are
    written as llama.cpp reads them, "left right" by rank; no space is prefixed (llama.cpp's gpt2 default, said
    explicitly)."""
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": self.pre.value,
        "tokenizer.ggml.tokens": list(self.tokens),
        "tokenizer.ggml.token_type": list(self.token_types),
        "tokenizer.ggml.merges": [f"{left} {right}" for left, right in self.merges],
        "tokenizer.ggml.bos_token_id": self.bos_id,
        "tokenizer.ggml.eos_token_id": self.eos_id,
        "tokenizer.ggml.add_bos_token": self.add_bos,
        "tokenizer.ggml.add_space_prefix": False,
    }
    if self.unk_id is not None:
      meta["tokenizer.ggml.unknown_token_id"] = self.unk_id
    if self.pad_id is not None:
      meta["tokenizer.ggml.padding_token_id"] = self.pad_id
    return meta

  # ---------------------------------------------------------------------------------------------- encode/decode

  def encode(self, text: str, *, bos: bool | None = None, eos: bool = False) -> list[int]:
    """Token ids of `text` (see the module docstring); BOS first if `bos` (None: `add_bos`), EOS last if `eos`."""
    check_text(text, "encode: text")
    bos = self.add_bos if bos is None else as_bool(bos, "encode: bos")
    eos = as_bool(eos, "encode: eos")
    ids = [self.bos_id] if bos else []
    start = 0
    for match in (self._special.finditer(text) if self._special is not None else ()):
      ids += self._encode_ordinary(text[start:match.start()])
      ids.append(self._ids[match.group()])
      start = match.end()
    ids += self._encode_ordinary(text[start:])
    return ids + ([self.eos_id] if eos else [])

  def _encode_ordinary(self, text: str) -> list[int]:
    """Steps 2-4 of the module docstring for text without special tokens."""
    fragments = [text] if text else []
    for splitter in self._splitters:
      fragments = [word for fragment in fragments for word in _split(splitter, fragment)]
    ids: list[int] = []
    cache = self._cache
    for word in fragments:
      hit = cache.get(word)
      if hit is None:
        hit = tuple(merge_pairs([self._byte_ids[b] for b in word.encode("utf-8")], self._merge_ranks))
        if len(cache) >= _CACHE_LIMIT:
          cache.clear()
        cache[word] = hit
      ids += hit
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids` (see the module docstring).

    Raises:
      ValueError: when `ids` is not a sequence of ints (a float id is never rounded) or an id is outside the
        vocabulary.
    """
    out = bytearray()
    for token in token_ids(ids, len(self.tokens), "decode: ids").tolist():
      out += self._token_bytes[token]
    return out.decode("utf-8", errors="replace")


def _split(pattern: Any, text: str) -> list[str]:
  """`text` cut into the matches of `pattern` and the non-empty gaps between them, in order."""
  out, start = [], 0
  for match in pattern.finditer(text):
    if match.start() > start:
      out.append(text[start:match.start()])
    out.append(match.group())
    start = match.end()
  if start < len(text):
    out.append(text[start:])
  return out
