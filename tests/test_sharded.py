"""Sharded calibration and quantization (issue 15) on a (data 4, model 2) mesh of conftest's 8 host CPU devices:
batches split over "data", weights over "model" (tensor-parallel: q/k/v, gate/up and the head on their outputs, o and
down on their inputs); every statistic and quantized weight equals the one-device run."""
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

import lowbit_jax as lb
from lowbit_jax.algorithms import common, sharded
from lowbit_jax.models.llama import Llama, LlamaConfig
from passhelpers import assert_close, dequantized, random_like

# every layer weight (2, 32, 32), the head (32, 32): few distinct shapes, few compiles
CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=32, hidden_dim=32, max_seq_len=32)
ROW_PARALLEL = ("wo", "w2")            # split on K: solved by the one-program path
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")
SPEC = lb.int_spec(4, group_size=16, symmetric=False)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() >= 8, f"conftest must force 8 host devices (XLA_FLAGS), found {jax.device_count()}"
  return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))


@pytest.fixture(scope="module")
def llama(mesh):
  """(apply, float params, the same params tensor-parallel over "model", batches, the batches split over "data")."""
  m = Llama(CFG, scan_layers=True)
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, CFG.vocab_size)
  params = random_like(jax.eval_shape(m.init, jax.random.key(0), tokens)["params"], scale=0.3)

  def put(path, a):
    s = [None] * a.ndim
    if a.ndim >= 2:
      s[-2 if any(n in jax.tree_util.keystr(path) for n in ROW_PARALLEL) else -1] = "model"
    return jax.device_put(a, NamedSharding(mesh, PS(*s)))

  tp = jax.tree_util.tree_map_with_path(put, params)
  tp["output"]["kernel"] = jax.device_put(params["output"]["kernel"],      # the head over all 8 devices
                                          NamedSharding(mesh, PS(None, ("data", "model"))))
  batches = [tokens, tokens[::-1]]
  split = [jax.device_put(b, NamedSharding(mesh, PS("data"))) for b in batches]
  return (lambda p, t: m.apply({"params": p}, t)), params, tp, batches, split


@pytest.fixture(scope="module")
def calib(llama):
  f, params, _, batches, _ = llama
  return lb.calibrate(f, params, batches)


def assert_same_quantized(sh, one, min_equal=0.999):
  """Codes equal on >= `min_equal` of the entries (float rounding may move a code by one step), quantizer parameters
  equal, dequantized weights close."""
  for path, a in jax.tree_util.tree_flatten_with_path(one, is_leaf=lambda x: isinstance(x, lb.QArray))[0]:
    b = dict(jax.tree_util.tree_flatten_with_path(sh, is_leaf=lambda x: isinstance(x, lb.QArray))[0])[path]
    where = jax.tree_util.keystr(path)
    if not isinstance(a, lb.QArray):
      assert_close(b, a, 1e-5)
      continue
    assert isinstance(b, lb.QArray), where
    same = np.mean(np.asarray(b.codes) == np.asarray(a.codes))
    assert same >= min_equal, f"{where}: {same:.4%} of the codes equal"
    np.testing.assert_array_equal(np.asarray(b.scale), np.asarray(a.scale), err_msg=where)
    if a.zero is not None:
      np.testing.assert_array_equal(np.asarray(b.zero), np.asarray(a.zero), err_msg=where)
    if same == 1.0:
      np.testing.assert_array_equal(np.asarray(b.dequantize()), np.asarray(a.dequantize()), err_msg=where)


def test_calibration_on_a_data_model_mesh_equals_one_device(llama, mesh):
  f, params, tp, batches, split = llama
  one = lb.calibrate(f, params, batches, outlier_threshold=0.5)
  sh = lb.calibrate(f, tp, split, outlier_threshold=0.5)
  assert list(sh) == list(one) and len(one) == 8
  for k in one:
    a, b = one[k].stats, sh[k].stats
    np.testing.assert_array_equal(b.count, a.count)
    np.testing.assert_array_equal(b.outliers, a.outliers)
    for name in ("xtx", "absmax", "abs_sum"):
      assert_close(getattr(b, name), getattr(a, name), 1e-5)
  assert int(np.sum(one["output/kernel"].stats.outliers)) > 0


def test_gptq_column_parallel_equals_one_device(llama, calib, mesh):
  f, params, tp, batches, split = llama
  one = lb.gptq(params, calib, SPEC)
  with mock.patch.object(sharded, "solve", wraps=sharded.solve) as spy:
    sh = lb.gptq(tp, calib, SPEC)
  assert spy.call_count == len(COLUMN_PARALLEL)           # each device solved only its output columns
  assert_same_quantized(sh, one)
  lay = sh["layers"]
  for q in (lay["attention"]["wq"]["kernel"], lay["attention"]["wk"]["kernel"], lay["feed_forward"]["w3"]["kernel"]):
    for leaf in (q.codes, q.scale, q.zero):
      assert leaf.sharding.spec == PS(None, None, "model"), leaf.sharding
  head = sh["output"]["kernel"]
  for leaf in (head.codes, head.scale, head.zero):
    assert leaf.sharding.spec == PS(None, ("data", "model")), leaf.sharding
  run = jax.jit(lb.quantized(f))
  assert_close(run(sh, split[0]), run(one, batches[0]), 1e-4)       # the sharded QArrays run packed, same logits
  assert_close(run(sh, split[0]), jax.jit(f)(dequantized(one), batches[0]), 1e-4)


def test_sparsegpt_on_model_sharded_weights_equals_one_device(llama, calib):
  f, params, tp, batches, split = llama
  nm, ffn = lb.NM(n=2, m=4), "feed_forward"          # w1, w3 column-parallel; w2 row-parallel
  with mock.patch.object(sharded, "solve", wraps=sharded.solve) as spy:
    sh = lb.sparsegpt(tp, calib, nm, spec=SPEC, where=ffn)
  assert spy.call_count == 2
  assert_same_quantized(sh, lb.sparsegpt(params, calib, nm, spec=SPEC, where=ffn))
  assert sh["layers"]["feed_forward"]["w1"]["kernel"].codes.sharding.spec == PS(None, None, "model")
  with mock.patch.object(sharded, "solve", wraps=sharded.solve) as spy:   # unstructured: one program, same result
    sh = lb.sparsegpt(tp, calib, lb.Sparsity(fraction=0.5), where="w1")
  assert spy.call_count == 0
  assert_same_quantized(sh, lb.sparsegpt(params, calib, lb.Sparsity(fraction=0.5), where="w1"))


@pytest.mark.parametrize("spec, split", [(PS(None, "model"), True), (PS(None, ("model", "data")), True),
                                         (PS(None, None, "model"), False), (PS("model"), False),
                                         (PS(None, "model", "data"), False), (PS(), False)])
def test_which_shardings_are_solved_per_device(mesh, spec, split):
  """An einsum weight (D, H, Dh): its output block (H, Dh) is split per device only on its outer axis H (contiguous
  columns of N = H * Dh); an inner Dh, the contraction D or two split axes run as one program; all equal."""
  f = lambda p, x: jnp.einsum("bd,dhk->bhk", x, p["w"])
  w = jax.random.normal(jax.random.key(2), (32, 8, 4)) * 0.3
  x = jax.random.normal(jax.random.key(3), (64, 32))
  calib = lb.calibrate(f, {"w": w}, [x])
  p = {"w": jax.device_put(w, NamedSharding(mesh, spec))}
  cols = sharded.columns(common.calibrated_leaves(p, calib, None, "test")[0], SPEC)
  assert (cols is not None) == split
  q = lb.gptq(p, calib, SPEC)
  assert_same_quantized(q, lb.gptq({"w": w}, calib, SPEC))
  if split:
    assert q["w"].codes.sharding.spec == PS(None, spec[1], None)


def test_streamed_on_the_mesh_equals_one_device(llama):
  """Streamed GPTQ with batches split over "data" and tensor-parallel weights: each block's cached activations
  stay sharded, its statistics reduce over the mesh, its column-parallel weights are solved per device, and the
  result equals the one-device streamed run."""
  f, params, tp, batches, split = llama
  one = lb.streamed(lb.gptq, f, params, batches, SPEC)
  sh = lb.streamed(lb.gptq, f, tp, split, SPEC)
  assert_same_quantized(sh, one)
  wq = sh["layers"]["attention"]["wq"]["kernel"]
  assert wq.codes.sharding.spec == PS(None, None, "model"), wq.codes.sharding
