"""The contract every format in the registry must meet: jit-able, tree structure and dtypes kept, bytes right,
orbax round trip exact, and usable under vmap, pmap and NamedSharding on 8 CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh

import lowbit_jax as lb
from lowbit_jax.spec import Format
from passhelpers import dequantized
from qhelpers import REGISTRY, expected_nbytes, quantize, tol

NAMES = sorted(REGISTRY)


def test_registry_covers_every_format():
  assert {s.format for s in REGISTRY.values()} == set(Format)
  assert {s.bits for s in REGISTRY.values() if s.format is Format.INT} == {2, 3, 4, 8}


def _params(dtype=jnp.float32, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  return {
      "embed": {"embedding": jax.random.normal(k[0], (32, 64), dtype)},
      "block": {
          "dense": {"kernel": jax.random.normal(k[1], (64, 128), dtype), "bias": jnp.zeros((128,), dtype)},
          "out": {"kernel": jax.random.normal(k[2], (128, 64), dtype) * 0.02},
          "norm": {"scale": jnp.ones((64,), dtype)},
      },
      "step": jnp.asarray(3, jnp.int32),
  }


@pytest.mark.parametrize("name", NAMES)
def test_jit_matches_eager(name):
  spec = REGISTRY[name]
  x = jax.random.normal(jax.random.PRNGKey(1), (100, 24))
  eager = lb.quantize(x, spec)
  jitted = jax.jit(lambda a: lb.quantize(a, spec))(x)
  assert jax.tree.structure(eager) == jax.tree.structure(jitted)
  np.testing.assert_allclose(jax.jit(lambda q: q.dequantize())(jitted), eager.dequantize(), **tol(jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_tree_structure_dtypes_and_bytes(name, dtype):
  spec = REGISTRY[name]
  params = _params(dtype)
  q = lb.rtn(params, None, spec)
  assert isinstance(q["block"]["dense"]["kernel"], lb.QArray)
  assert not isinstance(q["embed"]["embedding"], lb.QArray)
  deq = dequantized(q)
  assert jax.tree.structure(deq) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(deq), jax.tree.leaves(params)):
    assert a.shape == b.shape and a.dtype == b.dtype
  for path in (("block", "dense", "kernel"), ("block", "out", "kernel")):
    leaf = q[path[0]][path[1]][path[2]]
    assert leaf.nbytes == expected_nbytes(leaf.shape, spec)
    assert leaf.shape == params[path[0]][path[1]][path[2]].shape


@pytest.mark.parametrize("name", NAMES)
def test_orbax_round_trip_is_exact(name, tmp_path):
  q = lb.rtn(_params(), None, REGISTRY[name])
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", q)
  ckpt.wait_until_finished()
  target = jax.tree.map(lambda l: jax.ShapeDtypeStruct(l.shape, l.dtype), q)
  restored = ckpt.restore(tmp_path / "ckpt", target)
  assert jax.tree.structure(restored) == jax.tree.structure(q)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(q)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(dequantized(restored["block"]["dense"]["kernel"]),
                                dequantized(q["block"]["dense"]["kernel"]))


@pytest.mark.parametrize("name", NAMES)
def test_named_sharding_along_output_dim(name):
  assert len(jax.devices()) == 8, "conftest must force 8 host devices"
  spec = REGISTRY[name]
  w = jax.random.normal(jax.random.PRNGKey(2), (128, 64))
  q = quantize(w, spec)
  mesh = Mesh(np.array(jax.devices()), ("model",))
  sq = jax.device_put(q, lb.qarray_sharding(q, mesh, "model"))
  assert len(sq.codes.sharding.device_set) == 8
  assert sq.codes.addressable_shards[0].data.shape[-1] == 64 // 8
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 128))
  out = jax.jit(lambda x, q: x @ q.dequantize())(x, sq)
  np.testing.assert_allclose(out, x @ dequantized(q), **tol(jnp.float32))
  assert len(out.sharding.device_set) == 8


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_stacked_layers(name):
  spec = REGISTRY[name]
  stack = jax.random.normal(jax.random.PRNGKey(4), (3, 64, 32))      # (layers, in, out)
  q = quantize(stack, spec)
  assert q.shape == stack.shape
  whole = dequantized(q)
  per_layer = jax.jit(jax.vmap(lambda l: l.dequantize()))(q)
  np.testing.assert_allclose(per_layer, whole, **tol(jnp.float32))
  scan = jax.jit(lambda q: jax.lax.scan(lambda c, l: (c, l.dequantize()), None, q))   # what nn.scan does to params
  _, scanned = scan(q)
  np.testing.assert_allclose(scanned, whole, **tol(jnp.float32))
  vq = jax.jit(jax.vmap(lambda l: lb.quantize(l, spec)))(stack)   # stack axes get their own scales, as per layer
  np.testing.assert_allclose(dequantized(vq), whole, **tol(jnp.float32))


@pytest.mark.parametrize("name", ["int4_g32", "nf4_dq", "fp8_e4m3_tensor", "int3_channel_asym"])
def test_pmap_over_8_devices(name):
  spec = REGISTRY[name]
  stack = jax.random.normal(jax.random.PRNGKey(5), (8, 64, 16))
  q = jax.pmap(lambda w: lb.quantize(w, spec))(stack)
  x = jax.random.normal(jax.random.PRNGKey(6), (8, 2, 64))
  out = jax.pmap(lambda q, x: x @ q.dequantize())(q, x)
  ref = jnp.stack([x[i] @ dequantized(quantize(stack[i], spec)) for i in range(8)])
  np.testing.assert_allclose(out, ref, **tol(jnp.float32))
