"""Pruning transforms (lowbit_jax.magnitude_prune, lowbit_jax.sparsegpt): N:M masks keep exactly n of every m along
the contraction axis; SparseGPT's layer error tr(dWᵀ H dW) beats magnitude pruning (50 % and 2:4); joint
quantization decodes pruned entries to exactly 0; a scanned stack is pruned per layer, from a calibration sharded
over 8 devices equal to one device's; bad input raises naming the key path; the pruners' own contract."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

import lowbit_jax as lb
from lowbit_jax.algorithms.registry import PRUNERS
from lowbit_jax.algorithms.sparsegpt_core import sparsegpt_solve
from lowbit_jax.algorithms.sparsity import magnitude_pruned
from passhelpers import ScanModel, random_like
from seeds import stable_seed


@given(st.integers(1, 4), st.integers(0, 4), st.sampled_from([1, 6]), st.sampled_from([1, 5]), st.integers(0, 2**31 - 1))
def test_nm_masks_keep_exactly_n_of_every_m_along_k(m, n, groups, cols, seed):
  n = min(n, m)
  w = np.random.default_rng(seed).standard_normal((2, groups * m, cols)).astype(np.float32)
  w[0, :m] = 0.0                                                       # ties: zeros in a whole group
  kept = ~np.asarray(magnitude_pruned(jnp.asarray(w), lb.NM(n=n, m=m)))
  assert (kept.reshape(2, groups, m, cols).sum(axis=2) == n).all()
  a = np.abs(w).reshape(2, groups, m, cols)                            # the kept ones are the largest
  k = kept.reshape(a.shape)
  assert (np.where(k, a, np.inf).min(axis=2) >= np.where(k, -np.inf, a).max(axis=2)).all()


def _layer(k=192, n=48, tokens=1024):
  rng = np.random.default_rng(stable_seed("sparsity", k, n))
  x = rng.standard_normal((tokens, k)).astype(np.float32) @ (rng.standard_normal((k, k)).astype(np.float32)
                                                             / np.sqrt(k))
  x *= (1 + 4 * (rng.random(k) < 0.05)).astype(np.float32)            # a few outlier channels
  return (rng.standard_normal((k, n)) * 0.05).astype(np.float32), x.T @ x / tokens


@pytest.mark.parametrize("pattern", [lb.Sparsity(fraction=0.5), lb.NM(n=2, m=4)], ids=["50%", "2:4"])
def test_sparsegpt_beats_magnitude_and_joint_quantization_keeps_zeros(pattern):
  w, h = _layer()
  fr = jnp.asarray([0.01, 0.1], jnp.float32)
  err = lambda d: float(np.trace(d.T @ h @ d))
  p, mask, _, _, ok = sparsegpt_solve(jnp.asarray(w), jnp.asarray(h), fr, pattern=pattern, spec=None, blocksize=64)
  p, mask = np.asarray(p), np.asarray(mask)
  mag = np.where(np.asarray(magnitude_pruned(jnp.asarray(w), pattern)), 0.0, w)
  assert bool(ok) and (p[mask] == 0).all() and mask.mean() == 0.5
  if isinstance(pattern, lb.NM):
    assert (mask.reshape(-1, 4, w.shape[1]).sum(axis=1) == 2).all()
  assert err(p - w) < 0.6 * err(mag - w), (err(p - w), err(mag - w))
  q, mask, _, _, _ = sparsegpt_solve(jnp.asarray(w), jnp.asarray(h), fr, pattern=pattern,
                                     spec=lb.int_spec(4, symmetric=False), blocksize=64)
  dq = np.asarray(q.dequantize())
  assert isinstance(q, lb.QArray) and (dq[np.asarray(mask)] == 0).all()
  assert err(dq - w) < err(mag - w)


N_DEV = 8


@pytest.fixture(scope="module")
def scan():
  m = ScanModel(n_layers=2)
  x = jax.random.normal(jax.random.key(1), (N_DEV, 3, 12))
  params = random_like(jax.eval_shape(m.init, jax.random.key(0), x)["params"], scale=0.3)
  apply = lambda p, x: m.apply({"params": p}, x)
  return apply, params, [x, x * 0.5]


def test_scanned_stack_prunes_per_layer_and_sharded_calibration_matches(scan):
  apply, params, batches = scan
  assert jax.device_count() >= N_DEV
  mesh = Mesh(np.array(jax.devices()[:N_DEV]), ("data",))
  calib = lb.calibrate(apply, params, batches)
  sharded = lb.calibrate(apply, params, [jax.device_put(b, NamedSharding(mesh, PS("data"))) for b in batches])
  for pattern in (lb.NM(n=2, m=4), lb.Sparsity(fraction=0.5)):
    one = lb.sparsegpt(params, calib, pattern)
    many = lb.sparsegpt(params, sharded, pattern) if isinstance(pattern, lb.NM) else one
    up, hs = one["layers"]["up"]["kernel"], calib["layers/up/kernel"].hessian
    assert up.shape == params["layers"]["up"]["kernel"].shape and hs.shape[0] == 2
    for i in range(2):                                                  # layer i with its own Hessian
      ref = sparsegpt_solve(params["layers"]["up"]["kernel"][i], hs[i], jnp.asarray([0.01] * 6, jnp.float32),
                            pattern=pattern, spec=None, blocksize=128)[0]
      np.testing.assert_array_equal(np.asarray(up[i]) == 0, np.asarray(ref) == 0)   # the same mask
      np.testing.assert_allclose(np.asarray(up[i]), np.asarray(ref), rtol=1e-4, atol=1e-5)   # lax.map vs one jit
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
      np.testing.assert_array_equal(np.asarray(a) == 0, np.asarray(b) == 0)
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    mag = lb.magnitude_prune(params, calib, pattern)
    assert float(jnp.mean(mag["layers"]["up"]["kernel"] == 0)) == 0.5


def test_bad_input_names_the_option_or_key_path(scan):
  apply, params, batches = scan
  calib = lb.calibrate(apply, params, batches[:1])
  for f in (1.0, -0.1, 1.5):
    with pytest.raises(ValueError, match=r"Sparsity.fraction must be a finite float in \[0, 1\)"):
      lb.Sparsity(fraction=f)
  with pytest.raises(ValueError, match="NM.n must be <= NM.m"):
    lb.NM(n=5, m=4)
  with pytest.raises(ValueError, match=r"params\['layers'\]\['up'\]\['kernel'\]: contraction length 16 is not "
                                       r"divisible by m=6"):
    lb.magnitude_prune(params, calib, lb.NM(n=2, m=6), where=r"layers/up/kernel")
  with pytest.raises(ValueError, match=r"params\['.*'\]\['kernel'\]: the spec cannot hold exact zeros"):
    lb.sparsegpt(params, calib, lb.NM(), spec=lb.q4_1_spec())
  with pytest.raises(ValueError, match="Scope.LAYER"):
    lb.sparsegpt(params, calib, lb.Sparsity(scope=lb.Scope.GLOBAL))
  with pytest.raises(ValueError, match="Sparsity.scope"):
    lb.Sparsity(scope="global")


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_pruner_contract(name, scan):
  """transform(params, calib, options=Sparsity(), *, where=None, ..., strict=False): a new tree of float leaves of
  the same shapes and dtypes, the input untouched, the selected weights at the requested sparsity."""
  apply, params, batches = scan
  ps = list(inspect.signature(PRUNERS[name]).parameters.values())
  assert [p.name for p in ps[:3]] == ["params", "calib", "options"] and isinstance(ps[2].default, lb.Sparsity)
  assert all(p.kind is p.KEYWORD_ONLY for p in ps[3:]) and ps[3].name == "where" and "strict" in [p.name for p in ps]
  calib = lb.calibrate(apply, params, batches[:1])
  before = jax.tree.map(lambda a: np.array(a, copy=True), params)
  out = PRUNERS[name](params, calib, lb.Sparsity(fraction=0.25))
  assert jax.tree.structure(out) == jax.tree.structure(params)
  for (path, a), b, c in zip(jax.tree_util.tree_flatten_with_path(out)[0], jax.tree.leaves(params),
                             jax.tree.leaves(before)):
    assert (a.shape, a.dtype) == (b.shape, b.dtype)
    np.testing.assert_array_equal(np.asarray(b), c)
    if lb.select.path_str(path) in {lb.select.path_str(p) for p in calib}:
      assert abs(float(jnp.mean(a == 0)) - 0.25) < 0.02, path
