"""Test configuration: 8 host CPU devices, strict dtype promotion, hypothesis profiles, session fixtures of the real
models.

XLA_FLAGS must be set before jax is imported anywhere, which is why it happens at the top of conftest.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import dataclasses  # noqa: E402
import zlib  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import lowbit_jax as lb  # noqa: E402
from lowbit_jax.assets import asset_path  # noqa: E402
from lowbit_jax.io.gguf import load_gguf  # noqa: E402
from lowbit_jax.io.loaded import LoadedModel  # noqa: E402
from lowbit_jax.models.llama import Llama  # noqa: E402
from lowbit_jax.passes import Calibration  # noqa: E402

# Our own code must never rely on implicit dtype promotion. Tests that run third-party model code (the
# transformers zoo) wrap it in `jax.numpy_dtype_promotion("standard")`.
jax.config.update("jax_numpy_dtype_promotion", "strict")

# The suite is compile-bound, and many tests compile the same programs (the same model calibrated and quantized in
# several files, eager ops): JAX's persistent compilation cache serves every repeat from disk, within a run and on
# a rerun. Every compile is cached (min time 0). One folder per xdist worker, without a size cap: a capped cache
# locks a file and scans the whole folder on every write (quadratic in the ~10k entries of a run: it made CI 50 %
# slower), and an uncapped folder shared by two writers could serve a half-written entry. `LOWBIT_JAX_TEST_JAX_CACHE`
# moves it; CI starts empty.
_CACHE = Path(os.environ.get("LOWBIT_JAX_TEST_JAX_CACHE", Path(__file__).resolve().parent.parent / ".jax_cache" /
                             "tests"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE / os.environ.get("PYTEST_XDIST_WORKER", "main")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

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
  """SmolLM2-135M-Instruct (30 layers; its Q4_1 linear weights and Q8_0 embedding as packed QArrays, the file's
  own codes and scales; BPE tokenizer, chat template), loaded once per session (per xdist worker: ~7 s, most of
  it parsing the 49k tokens and 49k merges)."""
  return load_gguf(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_float(smollm2: LoadedModel) -> dict:
  """SmolLM2's float32 params: `lb.dequantize` of its QArrays, bit-identical to gguf-py's dequantization."""
  return lb.dequantize(smollm2.params)


STORIES260K = "stories260K_gguf/stories260K.gguf"


@dataclasses.dataclass(frozen=True)
class Stories260K:
  """stories260K (5 layers, dim 64, float32) with the TinyStories tokens its tests calibrate and evaluate on. Every
  array is read-only: tests share one instance per xdist worker and must copy what they change."""
  loaded: LoadedModel
  apply: Callable            # (params, tokens (B, T) int32) -> logits, `Llama(config).apply`
  train: np.ndarray          # (30007,) int32: the first 60,000 characters of tinystories_train_first2MiB.txt
  val: np.ndarray            # (19175,) int32: the first 40,000 characters of tinystories_val_part1.txt

  @property
  def params(self) -> dict:
    return self.loaded.params

  @property
  def batches(self) -> list[jax.Array]:
    """The calibration protocol: the first 8 x 128 training tokens in 4 batches of 2 windows."""
    ids = self.train[:8 * 128].reshape(8, 128)
    return [jnp.asarray(ids[i:i + 2]) for i in range(0, 8, 2)]

  @property
  def held(self) -> jax.Array:
    """The first 4 x 128 validation tokens, (4, 128)."""
    return jnp.asarray(self.val[:4 * 128].reshape(4, 128))


def _read_only(a: np.ndarray) -> np.ndarray:
  a.setflags(write=False)
  return a


def _digest(tree) -> int:
  """CRC-32 of a pytree's structure and leaf bytes."""
  leaves, treedef = jax.tree.flatten(tree)
  crc = zlib.crc32(str(treedef).encode())
  for leaf in leaves:
    crc = zlib.crc32(np.ascontiguousarray(leaf).tobytes(), crc)
  return crc


@pytest.fixture(scope="session")
def stories260k() -> Iterator[Stories260K]:
  """stories260K and its token streams, loaded and tokenized once per session (per xdist worker); at teardown, the
  shared params must be as loaded (a test that replaced a leaf of the shared dicts fails the session)."""
  loaded = load_gguf(asset_path(STORIES260K))
  jax.tree.map(_read_only, loaded.params)
  model = Llama(loaded.config)
  tokens = lambda asset, chars: _read_only(np.asarray(loaded.tokenizer.encode(
      asset_path(asset).read_text(encoding="utf-8")[:chars]), np.int32))
  stories = Stories260K(loaded, lambda p, t: model.apply({"params": p}, t),
                        tokens("tinystories/tinystories_train_first2MiB.txt", 60_000),
                        tokens("tinystories/tinystories_val_part1.txt", 40_000))
  before = _digest(loaded.params)
  yield stories
  assert _digest(loaded.params) == before, "a test changed the shared stories260K params"


@pytest.fixture(scope="session")
def stories260k_calib(stories260k: Stories260K) -> Calibration:
  """`calibrate(apply, params, batches)` of stories260K with the default statistics, once per session."""
  return lb.calibrate(stories260k.apply, stories260k.params, stories260k.batches)


@pytest.fixture(scope="session")
def stories260k_awq4(stories260k: Stories260K, stories260k_calib: Calibration) -> dict:
  """AWQ int4 g32 of stories260K with the scales kept as QArray in_scales (fold=False), for tests/test_awq.py and
  the folding comparison of tests/test_fold.py."""
  return lb.awq(stories260k.params, stories260k_calib, lb.int_spec(4, group_size=32), fold=False)
