"""The test seeds (tests/seeds.py) and the inputs drawn from them are equal under any PYTHONHASHSEED."""
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

from seeds import stable_seed

TESTS = Path(__file__).resolve().parent


def _digests(x, w) -> list[int]:
  return [zlib.crc32(np.ascontiguousarray(np.asarray(a)).tobytes()) for a in (x, w.codes, w.dequantize())]


# Run in a fresh interpreter: the seeds, digests of the inputs test_kernels_qmatmul's `_case("int4_g32_q4_1", 96, 8,
# (3,), float32)` draws, and a salted `hash()` (which shows that the two interpreters do hash strings differently).
PROBE = """
import json, zlib
import numpy as np
import lowbit_jax as lb
from seeds import random_case, stable_seed
from test_seeds import _digests
x, w = random_case(lb.q4_1_spec(), 96, 8, (3,), np.float32, "int4_g32_q4_1", 0)
print(json.dumps({"seeds": [stable_seed("int4_g128"), stable_seed("nf4_dq", 3)], "inputs": _digests(x, w),
                  "salted": hash("int4_g128")}))
"""


def _probe(hash_seed: int) -> subprocess.Popen:
  env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
  return subprocess.Popen([sys.executable, "-c", PROBE], cwd=TESTS, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_stable_seed_is_crc32_of_the_joined_parts():
  assert stable_seed("int4_g128") == zlib.crc32(b"int4_g128")
  assert stable_seed("nf4_dq", 3) == zlib.crc32(b"nf4_dq/3") != stable_seed("nf4_dq", 4)
  assert all(0 <= stable_seed(p) < 2**32 for p in ("", "a", 7))


def test_seeds_and_drawn_inputs_do_not_depend_on_pythonhashseed():
  import test_kernels_qmatmul   # here, not at the top: the probes import this module, and need no Pallas
  runs = []
  for proc in [_probe(1), _probe(2)]:   # both interpreters start before either is waited for
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    runs.append(json.loads(out.strip().splitlines()[-1]))
  assert runs[0]["salted"] != runs[1]["salted"]                  # the interpreters did salt differently
  assert runs[0]["seeds"] == runs[1]["seeds"] == [stable_seed("int4_g128"), stable_seed("nf4_dq", 3)]
  here = _digests(*test_kernels_qmatmul._case("int4_g32_q4_1", 96, 8, (3,), np.float32))   # and this process
  assert runs[0]["inputs"] == runs[1]["inputs"] == here
