"""Which ggml type each tensor of an exported GGUF file gets: llama.cpp's `llama-quantize` rules, restated.

`ExportType` is the file type (`llama-quantize`'s TYPE argument): the type of the 2-D weights. `choose_type` then
applies, per tensor, what llama.cpp's `src/llama-quant.cpp` does for that file type (ggml-org/llama.cpp, functions
`tensor_allows_quantization`, `llama_tensor_get_type_impl` and `tensor_type_fallback`):

  1. 1-D tensors (the RMSNorm scales) stay F32: `tensor_allows_quantization` quantizes only 2-D and 3-D tensors,
     and the converters write 1-D tensors as F32.
  2. Float file types (F32, F16, BF16): every 2-D tensor is written in that type (`ggml_is_quantized` is false, so
     no mix rule and no fallback runs).
  3. The classifier, and the token embedding when it is tied to it (no `output.weight`), get more bits: Q8_0 if
     ne[0] is not a whole number of the file type's blocks, else Q6_K unless the file type is Q8_0
     (`llama_tensor_get_type_impl`, `category == OUTPUT || (has_tied_embeddings && category == TOKEN_EMBD)`).
  4. An untied token embedding of a TQ1_0 / TQ2_0 file is Q4_K in llama.cpp (same function, `category ==
     TOKEN_EMBD`); we have no Q4_K encoder (`ggml_blocks.KINDS`), so it gets Q6_K, the next k-quant up (more
     bits, never fewer).
  5. A tensor whose rows (ne[0], the input width) are not a whole number of blocks falls back
     (`tensor_type_fallback`): Q6_K -> Q8_0, Q4_K -> Q5_0, TQ1_0 / TQ2_0 -> Q4_0; and when the fallback type
     does not divide ne[0] either, "must use F16 due to unusual shape" -> F16. For the 32-wide types (Q4_0, Q4_1,
     Q8_0) llama.cpp defines no fallback and refuses the file ("no tensor type fallback is defined for type
     q4_0"); we apply its last resort, F16, instead of refusing, and report the tensor as a fallback. This is what
     stories260K's FFN down projections (ne[0] = hidden_dim = 172) get at every block type.

The other per-category mixes of `llama_tensor_get_type_impl` only concern the K_S / K_M / IQ file types and Q4_0
with an importance matrix; the file types here have none ("pure" k-quants: `ExportType.Q6_K` is llama.cpp's
MOSTLY_Q6_K, which has no mix either).
"""
from __future__ import annotations

import dataclasses
import enum

import gguf

_T = gguf.GGMLQuantizationType
_F = gguf.LlamaFileType


class ExportType(enum.Enum):
  """A GGUF file type `export_gguf` writes: the ggml type of the 2-D weights (`llama-quantize`'s TYPE names)."""
  F32 = "F32"
  F16 = "F16"
  BF16 = "BF16"
  Q8_0 = "Q8_0"
  Q4_0 = "Q4_0"
  Q4_1 = "Q4_1"
  Q6_K = "Q6_K"
  TQ1_0 = "TQ1_0"
  TQ2_0 = "TQ2_0"

  @property
  def ggml(self) -> gguf.GGMLQuantizationType:
    return _T[self.value]

  @property
  def file_type(self) -> gguf.LlamaFileType:
    """`general.file_type` (llama.cpp's LLAMA_FTYPE_*)."""
    return _FILE_TYPES[self]

  @property
  def is_float(self) -> bool:
    return self in (ExportType.F32, ExportType.F16, ExportType.BF16)

  @classmethod
  def of(cls, value: "ExportType | gguf.GGMLQuantizationType | str") -> "ExportType":
    """The ExportType of an ExportType, a `gguf.GGMLQuantizationType` or its name ("Q4_0").

    Raises:
      ValueError: naming the supported types, when `value` is none of them.
    """
    if isinstance(value, cls):
      return value
    name = value.name if isinstance(value, _T) else value
    try:
      return cls(name)
    except ValueError:
      raise ValueError(f"tensor_type {value!r} is not supported; supported: {[t.value for t in cls]}") from None


_FILE_TYPES = {
    ExportType.F32: _F.ALL_F32, ExportType.F16: _F.MOSTLY_F16, ExportType.BF16: _F.MOSTLY_BF16,
    ExportType.Q8_0: _F.MOSTLY_Q8_0, ExportType.Q4_0: _F.MOSTLY_Q4_0, ExportType.Q4_1: _F.MOSTLY_Q4_1,
    ExportType.Q6_K: _F.MOSTLY_Q6_K, ExportType.TQ1_0: _F.MOSTLY_TQ1_0, ExportType.TQ2_0: _F.MOSTLY_TQ2_0,
}


class Role(enum.Enum):
  """What a tensor is to llama.cpp's type rules."""
  NORM = "norm"                # 1-D scale
  TOKEN_EMBD = "token_embd"    # token_embd.weight
  OUTPUT = "output"            # output.weight
  LINEAR = "linear"            # a per-layer projection


class Rule(enum.Enum):
  """Why a tensor has the type it has (see the module docstring's numbered rules)."""
  FILE_TYPE = "file type"
  ONE_D = "1-D: F32"
  CLASSIFIER = "classifier / tied embedding: more bits"
  EMBEDDING = "ternary file: k-quant embedding (Q6_K for llama.cpp's Q4_K)"
  SHAPE_FALLBACK = "row width not a whole number of blocks: fallback"


@dataclasses.dataclass(frozen=True)
class TypeChoice:
  """The ggml type of one tensor and the rule that chose it; `note` says how, for a fallback."""
  ggml_type: gguf.GGMLQuantizationType
  rule: Rule
  note: str = ""


# tensor_type_fallback's table (block-256 types to a block-32 type); every other type has none.
_FALLBACK = {_T.Q6_K: _T.Q8_0, _T.Q4_K: _T.Q5_0, _T.Q5_K: _T.Q5_1, _T.Q2_K: _T.Q4_0, _T.Q3_K: _T.Q4_0,
             _T.TQ1_0: _T.Q4_0, _T.TQ2_0: _T.Q4_0}


def block_size(kind: gguf.GGMLQuantizationType) -> int:
  return gguf.GGML_QUANT_SIZES[kind][0]


def choose_type(role: Role, ne0: int, export: ExportType, *, tied: bool) -> TypeChoice:
  """The ggml type llama.cpp's `llama-quantize` gives a tensor of `role` with rows of `ne0` values in a file of
  type `export` (`tied`: the model has no `output.weight`); see the module docstring."""
  if role is Role.NORM:
    return TypeChoice(_T.F32, Rule.ONE_D)
  if export.is_float:
    return TypeChoice(export.ggml, Rule.FILE_TYPE)
  kind, rule = export.ggml, Rule.FILE_TYPE
  if role is Role.OUTPUT or (tied and role is Role.TOKEN_EMBD):
    if ne0 % block_size(kind):
      kind, rule = _T.Q8_0, Rule.CLASSIFIER
    elif kind != _T.Q8_0:
      kind, rule = _T.Q6_K, Rule.CLASSIFIER
  elif role is Role.TOKEN_EMBD and kind in (_T.TQ1_0, _T.TQ2_0):
    kind, rule = _T.Q6_K, Rule.EMBEDDING  # llama.cpp: Q4_K, which we cannot encode
  return _fallback(kind, rule, ne0)


def _fallback(kind: gguf.GGMLQuantizationType, rule: Rule, ne0: int) -> TypeChoice:
  """llama.cpp's `tensor_type_fallback`, with F16 (its last resort) where it defines no fallback."""
  if ne0 % block_size(kind) == 0:
    return TypeChoice(kind, rule)
  new = _FALLBACK.get(kind)
  if new is None or ne0 % block_size(new):
    new = _T.F16
  return TypeChoice(new, Rule.SHAPE_FALLBACK,
                    f"ne[0] = {ne0} is not a multiple of {kind.name}'s block of {block_size(kind)} -> {new.name}")
