"""lowbit_jax.sparse.Sparse24: bytes equal the documented formula, densify is exact, the tiled reference matmul
equals the dense masked matmul, `quantized(apply_fn)` runs it at dot sites (a plain model and a scanned stack),
memory_report counts it, and non-2:4 input raises naming the key path."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.algorithms.sparsity import magnitude_pruned
from lowbit_jax.passes import DequantizedWarning
from lowbit_jax.passes.values import Impl
from lowbit_jax.sparse import compress, sparse24_matmul
from passhelpers import ScanModel, assert_close, random_like
from seeds import stable_seed


def _pruned(k, n, *seed):
  w = jax.random.normal(jax.random.PRNGKey(stable_seed("sparse24", k, n, *seed)), (k, n)) * 0.1
  return jnp.where(magnitude_pruned(w, lb.NM(n=2, m=4)), 0.0, w)


VALUES = {
    "f32": lambda w: w, "f16": lambda w: w.astype(jnp.float16), "bf16": lambda w: w.astype(jnp.bfloat16),
    "int8": lambda w: lb.quantize(w, lb.int_spec(8)),
    "int4g32": lambda w: lb.quantize(w, lb.int_spec(4, group_size=32)),
    "int4asym": lambda w: lb.quantize(w, lb.int_spec(4, symmetric=False)),
}


CASES = [(kind, 64, 48) for kind in sorted(VALUES)] + [("f32", 172, 40), ("int4asym", 172, 40), ("int4g32", 264, 24)]


@pytest.mark.parametrize("kind, k, n", CASES)
def test_bytes_formula_densify_and_reference_matmul(kind, k, n):
  wp = VALUES[kind](_pruned(k, n))
  dense = wp.dequantize() if isinstance(wp, lb.QArray) else wp
  s = compress(wp)
  np.testing.assert_array_equal(np.asarray(s.densify()), np.asarray(dense))          # exact
  meta = math.ceil(k / 8) * n
  if isinstance(wp, lb.QArray):
    half = lb.quantize(jnp.zeros((k // 2, n)), s.values.spec)                         # same spec, K/2 rows
    vals = half.nbytes
  else:
    vals = k // 2 * n * np.dtype(wp.dtype).itemsize
  assert s.nbytes == vals + meta and s.meta.dtype == np.uint8
  if kind == "f16" and k % 8 == 0:
    assert s.bits_per_weight == 8 + 1                                                  # 16 / 2 + 2 / 2
  x = jax.random.normal(jax.random.PRNGKey(stable_seed("x", k)), (3, 5, k))
  assert_close(jax.jit(sparse24_matmul)(x, s), x @ dense.astype(jnp.float32), 1e-5)


def test_quantized_runs_it_at_dot_sites_on_a_scanned_stack():
  m = ScanModel(n_layers=2)
  x = jax.random.normal(jax.random.key(1), (4, 3, 12))
  params = random_like(jax.eval_shape(m.init, jax.random.key(0), x)["params"], scale=0.3)
  apply = lambda p, x: m.apply({"params": p}, x)
  calib = lb.calibrate(apply, params, [x])
  pruned = lb.magnitude_prune(params, calib, lb.NM(), where=r"layers/up/kernel|inp/kernel")
  rt = lb.rtn(pruned, None, lb.int_spec(8), where=r"layers/up/kernel")
  packed = lb.compress_24(rt, where=r"layers/up/kernel|inp/kernel")
  assert isinstance(packed["layers"]["up"]["kernel"], lb.Sparse24)
  assert isinstance(packed["layers"]["up"]["kernel"].values, lb.QArray)                # 2:4 x int8
  assert isinstance(packed["inp"]["kernel"], lb.Sparse24) and packed["head"]["kernel"].shape == (16, 8)
  ref = jax.jit(apply)(lb.dequantize(rt), x)
  qf = lb.quantized(apply)
  assert_close(jax.jit(qf)(packed, x), ref, 1e-5)
  report = qf.report(packed, x)
  runs = {w.where: w for w in report.weights}
  for name in ("params['inp']['kernel']", "params['layers']['up']['kernel']"):
    assert runs[name].packed and runs[name].impls == {Impl.REFERENCE}, report
  mem = lb.memory_report(packed)
  row = next(l for l in mem.leaves if l.path == "inp/kernel")
  assert row.nbytes == packed["inp"]["kernel"].nbytes == 6 * 16 * 4 + 2 * 16 and "2:4 sparse" in row.kind


def test_a_float_cast_of_a_float16_2_4_weight_still_runs_packed():
  """Models that cast a float16 weight up before the dot (Llama's f32 compute) keep the 2:4 format through the cast
  (a whole-weight view); any other view decodes it, with the DequantizedWarning naming it."""
  rng = np.random.default_rng(stable_seed("sparse24", "cast"))
  w = jnp.asarray(rng.normal(size=(16, 8)).astype(np.float16))
  x = jnp.asarray(rng.normal(size=(3, 16)).astype(np.float32))
  apply = lambda p, x: x @ p["w"].astype(jnp.float32)
  calib = lb.calibrate(apply, {"w": w.astype(jnp.float32)}, [x])
  packed = lb.compress_24(lb.magnitude_prune({"w": w}, calib, lb.NM()))
  qf = lb.quantized(apply)
  assert_close(jax.jit(qf)(packed, x), x @ packed["w"].densify().astype(jnp.float32), 1e-6)
  assert all(r.packed for r in qf.report(packed, x).weights)
  sliced = lambda p, x: x[:, :8] @ p["w"][:8].astype(jnp.float32)
  with pytest.warns(DequantizedWarning, match=r"params\['w'\].*a view of a 2:4 sparse weight"):
    lb.quantized(sliced)(packed, x)


def test_bad_input_names_the_key_path():
  dense = {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 4))}
  with pytest.raises(ValueError, match=r"params\['w'\]: 8 groups of 4 along K hold more than 2 nonzeros"):
    lb.compress_24(dense, where="w")
  with pytest.raises(ValueError, match=r"params\['v'\]: contraction length 6 is not divisible by 4"):
    lb.compress_24({"v": jnp.zeros((6, 4))}, where="v")
  assert lb.compress_24(dense)["w"] is dense["w"]                                     # not selected: left as is
