"""What every checkpoint loader returns, and the one error every loader raises.

Invariants of a `LoadedModel` (checked by the loaders before they return, never half-built):
  * `params` follows the layout of `lowbit_jax.models.llama` exactly: a nested dict whose leaves are numpy float32
    arrays or packed `QArray`s (a quantized checkpoint's own codes and scales, e.g. GGUF Q4_1), with the logical
    shapes of `config`; every numpy array (a QArray's codes and scales included) is C-contiguous and owns its memory
    (no views of a file buffer or of each other). `output/kernel` is present iff
    `config.tie_embeddings` is False. `lowbit_jax.dequantize(params)` is the all-float32 view.
  * `config.vocab_size == tokenizer.vocab_size`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import jax
import numpy as np

from lowbit_jax.models.llama import LlamaConfig
from lowbit_jax.qarray import QArray

if TYPE_CHECKING:
  from lowbit_jax.io.chat import ChatTemplate

Params = dict[str, Any]


class TextTokenizer(Protocol):
  """What every tokenizer offers (`tokenizer.Tokenizer`, SentencePiece-style; `bpe.BPETokenizer`, GPT-2 byte-level
  BPE), so that evaluation and experiments need not know which one a checkpoint has."""
  bos_id: int
  eos_id: int

  @property
  def vocab_size(self) -> int: ...

  @property
  def add_bos(self) -> bool:
    """Whether `encode(text)` puts BOS first when `bos` is not given (the checkpoint's convention)."""

  def encode(self, text: str, *, bos: bool | None = None, eos: bool = False) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class CheckpointError(ValueError):
  """A checkpoint or tokenizer file is unusable: truncated, corrupted, mis-shaped or of an unsupported kind.

  The message always starts with the offending file's path.
  """

  def __init__(self, path: object, problem: str):
    super().__init__(f"{path}: {problem}")
    self.path = path
    self.problem = problem


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
  """A Llama checkpoint read from disk: its config, its parameters (Flax layout; float32 or packed QArrays), its
  tokenizer and, when the file has one, its chat template."""
  config: LlamaConfig
  params: Params = dataclasses.field(repr=False)
  tokenizer: TextTokenizer
  chat_template: "ChatTemplate | None" = None


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """The shape of every parameter leaf, keyed by its '/'-joined path, in the Flax layout of `models/llama.py`."""
  d, h, v = config.dim, config.hidden_dim, config.vocab_size
  q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
  shapes: dict[str, tuple[int, ...]] = {"tok_embeddings/embedding": (v, d)}
  for i in range(config.n_layers):
    p = f"layers_{i}"
    shapes.update({
        f"{p}/attention_norm/scale": (d,),
        f"{p}/attention/wq/kernel": (d, q),
        f"{p}/attention/wk/kernel": (d, kv),
        f"{p}/attention/wv/kernel": (d, kv),
        f"{p}/attention/wo/kernel": (q, d),
        f"{p}/ffn_norm/scale": (d,),
        f"{p}/feed_forward/w1/kernel": (d, h),
        f"{p}/feed_forward/w3/kernel": (d, h),
        f"{p}/feed_forward/w2/kernel": (h, d),
    })
  shapes["norm/scale"] = (d,)
  if not config.tie_embeddings:
    shapes["output/kernel"] = (d, v)
  return shapes


def nest(flat: dict[str, np.ndarray]) -> Params:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
  tree: Params = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


_POSITIVE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len", "norm_eps",
                    "rope_theta")


def validate_config(path: object, config: LlamaConfig) -> None:
  """Raises CheckpointError unless the config's sizes (and eps, theta) are positive and the heads divide evenly."""
  sizes = {name: getattr(config, name) for name in _POSITIVE_FIELDS}
  bad = {k: s for k, s in sizes.items() if not s > 0}
  if bad:
    raise CheckpointError(path, f"non-positive model sizes {bad}")
  if config.dim % config.n_heads or config.n_heads % config.n_kv_heads:
    raise CheckpointError(
        path, f"dim {config.dim}, n_heads {config.n_heads} and n_kv_heads {config.n_kv_heads} do not divide evenly")


def build_params(path: object, config: LlamaConfig, flat: dict[str, np.ndarray | QArray]) -> Params:
  """Checks `flat` holds exactly the leaves of `config` with the right (logical) shapes, then nests it: arrays as
  owned float32, QArrays with owned numpy leaves.

  Arrays that are views (transposes, slices of a file buffer) are copied; fresh arrays are used as they are.

  Raises:
    CheckpointError: naming `path` and the first missing, unexpected or mis-shaped leaf.
  """
  shapes = expected_shapes(config)
  missing = [k for k in shapes if k not in flat]
  extra = [k for k in flat if k not in shapes]
  if missing or extra:
    raise CheckpointError(path, f"parameters do not match the config: missing {missing}, unexpected {extra}")
  for key, shape in shapes.items():
    if flat[key].shape != shape:
      raise CheckpointError(path, f"parameter {key} has shape {flat[key].shape}, expected {shape}")
  return nest({k: _owned(flat[k]) for k in shapes})


def _owned(leaf: np.ndarray | QArray) -> np.ndarray | QArray:
  """A float array as owned C-contiguous float32; a QArray with every leaf an owned C-contiguous numpy array of its
  own dtype."""
  if isinstance(leaf, QArray):
    return jax.tree.map(lambda a: np.require(a, None, _OWNED), leaf)
  return np.require(leaf, np.float32, _OWNED)


_OWNED = ["C_CONTIGUOUS", "OWNDATA", "WRITEABLE"]
