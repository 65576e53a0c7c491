"""Where the real test assets live: ``$LOWBIT_JAX_ASSETS``, else ``../shared/assets`` beside the repository.

The assets (a real pretrained Llama, its tokenizer, TinyStories and WikiText-2 text) are used as found and never
copied into the repository. A missing asset is an error that says where it was looked for, never a silent skip.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "LOWBIT_JAX_ASSETS"
_DEFAULT = Path(__file__).resolve().parent.parent.parent / "shared" / "assets"


def assets_dir() -> Path:
  """The assets folder: ``$LOWBIT_JAX_ASSETS`` if set, else ``<repo>/../shared/assets``."""
  env = os.environ.get(ENV_VAR)
  return Path(env).expanduser().resolve() if env else _DEFAULT


def asset_path(relative: str) -> Path:
  """Absolute path of one asset, e.g. ``asset_path("stories260K_gguf/stories260K.gguf")``.

  Raises:
    FileNotFoundError: naming the file, the folder searched and how to point ``$LOWBIT_JAX_ASSETS`` elsewhere.
  """
  path = assets_dir() / relative
  if not path.is_file():
    raise FileNotFoundError(
        f"lowbit_jax asset {relative!r} not found at {path}. Set ${ENV_VAR} to the folder holding the real "
        f"assets (currently {'set' if ENV_VAR in os.environ else 'unset; default'}: {assets_dir()}).")
  return path
