"""lowbit_jax.passes on the 8 host CPU devices of conftest: pmap, shard_map, NamedSharding batches."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

import lowbit_jax as lb
from lowbit_jax import passes as P
from lowbit_jax.select import select
from passhelpers import ScanModel, assert_close, dequantized, random_like

N = 8


@pytest.fixture(scope="module")
def setup():
  assert jax.device_count() >= N, f"conftest must force {N} host devices (XLA_FLAGS), found {jax.device_count()}"
  m = ScanModel(n_layers=2)
  x = jax.random.normal(jax.random.key(1), (N, 3, 12))
  params = random_like(jax.eval_shape(m.init, jax.random.key(0), x)["params"], scale=0.3)
  return (lambda p, x: m.apply({"params": p}, x)), params, x


def test_pmap_and_shard_map_of_quantized(setup):
  f, params, x = setup
  q = lb.rtn(params, None, lb.int_spec(8))
  ref = jax.jit(f)(dequantized(q), x)
  qf = P.quantized(f)
  assert_close(jax.pmap(qf, in_axes=(None, 0))(q, x), ref)
  mesh = Mesh(np.array(jax.devices()[:N]), ("data",))
  sm = jax.shard_map(qf, mesh=mesh, in_specs=(PS(), PS("data")), out_specs=PS("data"))
  assert_close(jax.jit(sm)(q, x), ref)
  xs = jax.device_put(x, NamedSharding(mesh, PS("data")))
  assert_close(jax.jit(qf)(q, xs), ref)


def test_shard_map_inside_the_function(setup):
  f, params, x = setup
  mesh = Mesh(np.array(jax.devices()[:N]), ("data",))
  g = lambda p, x: jax.shard_map(f, mesh=mesh, in_specs=(PS(), PS("data")), out_specs=PS("data"))(p, x)
  cal = P.calibrate(g, params, [x])
  ref = P.calibrate(f, params, [x])
  for k in ref:
    assert_close(cal[k].xtx, ref[k].xtx, 1e-4)
    np.testing.assert_array_equal(cal[k].count, ref[k].count)
  q = lb.rtn(params, None, lb.int_spec(8))
  assert_close(jax.jit(P.quantized(g))(q, x), jax.jit(f)(dequantized(q), x))


def test_sharded_calibration_equals_one_device(setup):
  f, params, x = setup
  mesh = Mesh(np.array(jax.devices()[:N]), ("data",))
  batches = [x, x * 0.5]
  one = P.calibrate(f, params, batches)
  sharded = P.calibrate(f, params, [jax.device_put(b, NamedSharding(mesh, PS("data"))) for b in batches])
  tagged = frozenset(select(params))
  stat = lambda x: P.collect(f, params, x, tagged=tagged, axis_name="d")[1]
  pm = jax.pmap(stat, axis_name="d")(x[:, None])
  for k in one:
    assert_close(sharded[k].xtx, one[k].xtx, 1e-4)
    assert_close(sharded[k].absmax, one[k].absmax)
  first = P.calibrate(f, params, [x])
  for key, st in pm.items():          # every device holds the psum over the 8 shards of batch 0
    assert_close(st.xtx[3], first[key[0]].xtx, 1e-4)
    np.testing.assert_array_equal(st.count[0], first[key[0]].count)
