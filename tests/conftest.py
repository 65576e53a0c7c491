"""Test configuration: 8 host CPU devices, strict dtype promotion, hypothesis profiles.

XLA_FLAGS must be set before jax is imported anywhere, which is why it happens at the top of conftest.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

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
