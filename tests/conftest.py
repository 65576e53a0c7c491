"""Test configuration: 8 host CPU devices, strict dtype promotion, hypothesis profiles, session fixtures of the real
models.

XLA_FLAGS must be set before jax is imported anywhere, which is why it happens at the top of conftest.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from lowbit_jax.assets import asset_path  # noqa: E402
from lowbit_jax.io.gguf import load_gguf  # noqa: E402
from lowbit_jax.io.loaded import LoadedModel  # noqa: E402

# Our own code must never rely on implicit dtype promotion. Tests that run third-party model code (the
# transformers zoo) wrap it in `jax.numpy_dtype_promotion("standard")`.
jax.config.update("jax_numpy_dtype_promotion", "strict")

# CI profile: small but real. `HYPOTHESIS_PROFILE=thorough pytest tests/test_formats.py` runs >= 10,000 examples
# per property by hand.
settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "thorough", max_examples=10_000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


SMOLLM2 = "smollm2_135m_instruct_q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
  """The SmolLM2-135M-Instruct GGUF file; a missing asset is an error (FileNotFoundError), never a skip."""
  return asset_path(SMOLLM2)


@pytest.fixture(scope="session")
def smollm2(smollm2_path: Path) -> LoadedModel:
  """SmolLM2-135M-Instruct (30 layers, Q4_1 weights dequantized to float32, BPE tokenizer, chat template), loaded
  once per session (per xdist worker: ~10 s, most of it gguf-py parsing the 49k tokens and 49k merges)."""
  return load_gguf(smollm2_path)
