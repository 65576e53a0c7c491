"""GPTQ core on random layers: beats RTN in every configuration, matches a line-by-line NumPy port of the
reference implementation, un-permutes act-order exactly, keeps static groups, and is deterministic."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.algorithms import gptq_core as gptq_core_module
from lowbit_jax.algorithms.gptq_core import gptq_core
from lowbit_jax.algorithms.hessian import upper_cholesky_of_inverse
from passhelpers import dequantized
from qhelpers import quantize

_spec = importlib.util.spec_from_file_location(
    "gptq_numpy", pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gptq_numpy.py")
gptq_numpy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gptq_numpy)


def _layer(k=192, n=48, tokens=1024, seed=0):
  """Correlated inputs with a few outlier channels, like real activations; W in Flax (in, out) layout."""
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((k, k)).astype(np.float32) / np.sqrt(k)
  x = rng.standard_normal((tokens, k)).astype(np.float32) @ mix
  x *= (1 + 4 * (rng.random(k) < 0.05)).astype(np.float32)
  w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
  return x, w, x.T @ x / tokens


CONFIGS = [  # (group_size, sym, act_order, static_groups)
    (None, True, False, False), (None, False, False, False), (None, True, True, False),
    (64, True, False, False), (64, False, False, False), (64, True, False, True), (64, True, True, True),
    (64, False, True, True),
]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size, sym, act_order, static_groups", CONFIGS)
def test_gptq_beats_rtn_and_matches_numpy_reference(bits, group_size, sym, act_order, static_groups):
  x, w, h = _layer()
  spec = lb.int_spec(bits, group_size=group_size, symmetric=sym)
  res = gptq_core(w, h, spec, blocksize=64, act_order=act_order, static_groups=static_groups)
  deq = np.asarray(dequantized(res.q))
  err_gptq = np.linalg.norm(x @ w - x @ deq)
  err_rtn = np.linalg.norm(x @ w - x @ np.asarray(dequantized(quantize(w, spec))))
  assert err_gptq < 0.85 * err_rtn, (err_gptq, err_rtn)
  ref = gptq_numpy.gptq_numpy(w, h, bits=bits, group_size=group_size, sym=sym, blocksize=64,
                              act_order=act_order, static_groups=static_groups)
  _assert_matches(deq, ref, x, w, err_gptq)


def _assert_matches(deq, ref, x, w, err_gptq):
  # float32 vs float64 can flip a rounding tie: on the FULL grid -absmax / scale is exactly -(2**(b-1) - 1/2) in
  # real arithmetic, so each granule's extreme is a tie; the layers must agree almost everywhere
  agree = np.mean(np.isclose(deq, ref, rtol=1e-3, atol=1e-6))
  assert agree > 0.97, agree
  np.testing.assert_allclose(np.linalg.norm(x @ w - x @ ref), err_gptq, rtol=0.02)


GRID_CONFIGS = [  # (bits, group_size, spec kwargs, numpy port kwargs)
    (4, None, dict(grid=lb.SymGrid.SIGNED_MAX), dict(grid=lb.SymGrid.SIGNED_MAX)),
    (3, 64, dict(grid=lb.SymGrid.RESTRICTED), dict(grid=lb.SymGrid.RESTRICTED)),
    (4, 32, dict(symmetric=False, zero_point=lb.ZeroPoint.FLOAT), dict(sym=False, float_offset=True)),
    (3, 64, dict(clip=lb.ClipSearch()), dict(mse=True)),
    (4, None, dict(symmetric=False, clip=lb.ClipSearch()), dict(sym=False, mse=True)),
]


@pytest.mark.parametrize("bits, group_size, spec_kw, ref_kw", GRID_CONFIGS)
def test_grids_float_offsets_and_clip_search_match_numpy_reference(bits, group_size, spec_kw, ref_kw):
  x, w, h = _layer(seed=11)
  spec = lb.int_spec(bits, group_size=group_size, **spec_kw)
  deq = np.asarray(dequantized(gptq_core(w, h, spec, blocksize=64).q))
  err_gptq = np.linalg.norm(x @ w - x @ deq)
  assert err_gptq < 0.85 * np.linalg.norm(x @ w - x @ np.asarray(dequantized(quantize(w, spec))))
  ref = gptq_numpy.gptq_numpy(w, h, bits=bits, group_size=group_size, blocksize=64, **{"sym": True, **ref_kw})
  _assert_matches(deq, ref, x, w, err_gptq)


def test_act_order_unpermutes_exactly():
  """With act-order the codes land in their original columns: a weight whose inputs are permuted gives the
  permuted result (processing order depends only on diag(H), which is permuted along)."""
  x, w, h = _layer(k=128, n=32, seed=1)
  spec = lb.int_spec(4)
  perm = np.random.default_rng(2).permutation(128)
  a = np.asarray(dequantized(gptq_core(w, h, spec, act_order=True).q))
  b = np.asarray(dequantized(gptq_core(w[perm], h[perm][:, perm], spec, act_order=True).q))
  np.testing.assert_allclose(b, a[perm], rtol=1e-5, atol=1e-7)


def test_static_groups_match_the_grouping():
  """Static groups = RTN's group parameters of the original weight, stored per contiguous group."""
  x, w, h = _layer(k=128, n=16, seed=3)
  spec = lb.int_spec(4, group_size=32)
  q = gptq_core(w, h, spec, act_order=True, static_groups=True).q
  rtn = quantize(w, spec)
  np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(rtn.scale))
  assert q.scale.shape == (4, 16) and q.nbytes == rtn.nbytes


def test_reruns_are_bit_identical():
  x, w, h = _layer(k=128, n=16, seed=4)
  spec = lb.int_spec(3, group_size=32)
  a = gptq_core(w, h, spec).q
  b = gptq_core(w, h, spec).q
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
  np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))


@pytest.mark.parametrize("k, blocksize", [(64, 128), (172, 128), (100, 64)])
def test_padding_past_the_last_group_never_overwrites_it(k, blocksize):
  """K smaller than (or not a multiple of) the block: the padded columns must not touch stored groups."""
  x, w, h = _layer(k=k, n=16, seed=8)
  spec = lb.int_spec(4, group_size=32)
  deq = np.asarray(dequantized(gptq_core(w, h, spec, blocksize=blocksize).q))
  rtn = np.asarray(dequantized(quantize(w, spec)))
  assert np.linalg.norm(x @ (w - deq)) < np.linalg.norm(x @ (w - rtn))


def test_dead_inputs_and_padding():
  x, w, h = _layer(k=172, n=16, seed=5)       # 172: not a multiple of the group size
  h[10, :] = h[:, 10] = 0                     # a dead input channel
  spec = lb.int_spec(4, group_size=32)
  q = gptq_core(w, h, spec).q
  deq = np.asarray(dequantized(q))
  assert q.shape == (172, 16) and q.k_pad == 192
  assert np.all(deq[10] == 0)


def test_not_positive_definite_raises_damping_then_errors():
  x, w, h = _layer(k=64, n=8, seed=6)
  bad = -np.eye(64, dtype=np.float32) * 1e-3 + np.ones((64, 64), np.float32) * 1e-6
  bad[np.diag_indices(64)] = 1e-3
  bad[0, 1] = bad[1, 0] = 5e-3                # indefinite, fixed by more damping
  with pytest.warns(RuntimeWarning, match="Hessian not positive definite with percdamp=0.01; needed"):
    res = gptq_core(w, bad, lb.int_spec(4), percdamp=0.01)
  assert res.percdamp > 0.01
  hopeless = -np.eye(64, dtype=np.float32)
  hopeless[0, 0] = 100.0
  with pytest.raises(ValueError, match=r"params\['w'\]: Hessian is not positive definite"):   # raises, no warning
    gptq_core(w, hopeless, lb.int_spec(4), max_damp_tries=2, path="params['w']")


@pytest.mark.parametrize("kwargs, match", [
    (dict(spec=lb.nf4_spec()), "integer QuantSpec"),
    (dict(h=np.ones((3, 3), np.float32)), "does not match"),
    (dict(h=np.full((64, 64), np.nan, np.float32)), "finite Hessian"),
    (dict(act_order=True, spec=lb.int_spec(4, group_size=32)), "static_groups=True"),
])
def test_bad_input(kwargs, match):
  x, w, h = _layer(k=64, n=8, seed=7)
  spec = kwargs.pop("spec", lb.int_spec(4))
  h = kwargs.pop("h", h)
  with pytest.raises(ValueError, match=match):
    gptq_core(w, h, spec, **kwargs)


@pytest.mark.parametrize("k", [64, 173, 1100])
def test_upper_cholesky_of_inverse_matches_the_references_factor(k):
  """One flipped Cholesky and a (recursive, past 512) triangular inverse give the references' factor
  cholesky(H^-1)ᵀ, without forming H^-1."""
  _, _, h = _layer(k=k, n=8, tokens=4 * k, seed=9)
  h = h + 0.01 * np.mean(np.diag(h)) * np.eye(k, dtype=np.float32)
  ref = np.linalg.cholesky(np.linalg.inv(h.astype(np.float64))).T
  got = np.asarray(upper_cholesky_of_inverse(jnp.asarray(h)))
  assert np.all(np.tril(got, -1) == 0)
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("group_size", [None, 32])
def test_act_order_off_equals_act_order_with_identity_order(group_size):
  """The act-order-off path (no permutation, parameters looked up per segment) gives the act-order path's codes
  when diag(H) is already decreasing (the permutation is the identity)."""
  x, w, h = _layer(k=128, n=24, seed=10)
  order = np.argsort(-np.diag(h), kind="stable")
  w, h = w[order], h[order][:, order]
  spec = lb.int_spec(4, group_size=group_size)
  a = gptq_core(w, h, spec, blocksize=64, static_groups=True).q
  b = gptq_core(w, h, spec, blocksize=64, act_order=True, static_groups=True).q
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
  np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))


@pytest.mark.parametrize("group_size, act_order, static_groups", [(32, False, False), (None, False, False),
                                                                   (32, True, True)])
def test_superblocks_match_numpy_reference(monkeypatch, group_size, act_order, static_groups):
  """Several superblocks of several blocks (K = 384, blocks of 64, superblocks of 128): the three-level lazy
  updates reach the reference's weights, groups starting mid-block included."""
  monkeypatch.setattr(gptq_core_module, "_SUPERBLOCK", 128)
  jax.clear_caches()                          # the solver traced with the default superblock must not be reused
  try:
    x, w, h = _layer(k=384, n=24, seed=12)
    spec = lb.int_spec(4, group_size=group_size)
    res = gptq_core(w, h, spec, blocksize=64, act_order=act_order, static_groups=static_groups)
  finally:
    jax.clear_caches()
  deq = np.asarray(dequantized(res.q))
  ref = gptq_numpy.gptq_numpy(w, h, bits=4, group_size=group_size, blocksize=64, act_order=act_order,
                              static_groups=static_groups)
  _assert_matches(deq, ref, x, w, np.linalg.norm(x @ w - x @ deq))
