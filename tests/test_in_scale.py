"""QArray.in_scale: x @ W == (x / s) @ Q(s ⊙ W) through dequantize, qmatmul, views in the passes, orbax, scan."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import lowbit_jax as lb
from lowbit_jax.kernels import qmatmul
from lowbit_jax.qarray import with_in_scale


def _w_s(k=96, n=40, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((k, n)).astype(np.float32),
          np.exp(rng.standard_normal(k)).astype(np.float32))


def test_dequantize_and_qmatmul_undo_the_scale():
  w, s = _w_s()
  spec = lb.int_spec(4, group_size=32)
  q = with_in_scale(w, s, spec)
  ref = np.asarray(lb.quantize(w * s[:, None], spec).dequantize()) / s[:, None]
  np.testing.assert_allclose(np.asarray(q.dequantize()), ref, rtol=1e-6)
  assert q.nbytes == lb.quantize(w, spec).nbytes + 4 * 96
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 96))
  np.testing.assert_allclose(qmatmul(x, q), x @ q.dequantize(), rtol=1e-4, atol=1e-4)
  g = jax.grad(lambda x: jnp.sum(qmatmul(x, q)))(x)
  np.testing.assert_allclose(g, jax.grad(lambda x: jnp.sum(x @ q.dequantize()))(x), rtol=1e-4, atol=1e-4)


def test_stacked_scan_and_orbax(tmp_path):
  rng = np.random.default_rng(1)
  w = rng.standard_normal((3, 64, 16)).astype(np.float32)
  s = np.exp(rng.standard_normal((3, 64))).astype(np.float32)
  q = with_in_scale(w, s, lb.nf4_spec())
  _, per_layer = jax.lax.scan(lambda c, l: (c, l.dequantize()), None, q)
  np.testing.assert_allclose(per_layer, q.dequantize(), rtol=1e-6)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "c", {"w": q})
  ckpt.wait_until_finished()
  back = ckpt.restore(tmp_path / "c", jax.tree.map(lambda l: jax.ShapeDtypeStruct(l.shape, l.dtype), {"w": q}))
  np.testing.assert_array_equal(back["w"].in_scale, q.in_scale)


def test_rewrite_pass_runs_in_scaled_weights_through_views():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(32, use_bias=False, name="a")(x)
      return nn.DenseGeneral((4, 8), use_bias=False, name="b")(jax.nn.relu(h))   # kernel (32, 4, 8): a view
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16))
  params = M().init(jax.random.PRNGKey(1), x)["params"]
  spec = lb.int_spec(8)
  q = dict(params)
  q["a"] = {"kernel": with_in_scale(params["a"]["kernel"], np.linspace(0.5, 2, 16), spec)}
  q["b"] = {"kernel": with_in_scale(params["b"]["kernel"], np.linspace(2, 0.5, 32), lb.int_spec(8, axis=0))}
  apply = lambda p, x: M().apply({"params": p}, x)
  deq = jax.tree.map(lambda l: l.dequantize() if isinstance(l, lb.QArray) else l, q,
                     is_leaf=lambda l: isinstance(l, lb.QArray))
  np.testing.assert_allclose(jax.jit(lb.quantized(apply))(q, x), apply(deq, x), rtol=1e-4, atol=1e-5)


def test_bad_in_scale_shape():
  w, _ = _w_s()
  with pytest.raises(ValueError, match=r"params\['w'\]: in_scale"):
    with_in_scale(w, np.ones(95, np.float32), lb.int_spec(8), path="params['w']")
