"""JAX's persistent compilation cache for the experiments' command lines: compiled programs are written to
<repo>/.jax_cache/experiments (git-ignored) and a rerun reads them from disk instead of compiling again (on this
CPU most of a small model's run time is compilation). Called from `__main__` blocks only, never on import.
"""
from pathlib import Path

import jax


def enable() -> Path:
  """Turn the cache on for this process (every compiled program, however quick to compile); returns its folder."""
  path = Path(__file__).resolve().parent.parent / ".jax_cache" / "experiments"
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
