"""Asymmetric calibration: the cross statistic Xᵀ(X_ref − X), the least-squares target W*, and streamed quantization
toward the float model's outputs (`lb.streamed(..., objective=lb.Objective.ASYMMETRIC)`)."""
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lowbit_jax as lb
from lowbit_jax.algorithms.asymmetric import retarget, retarget_core
from lowbit_jax.models.llama import stack_layers
from passhelpers import dequantized
from test_streamed import CFG, SPEC, _assert_same_q, _flat, _llama
from zoo_layouts import ZOO

ASYM = lb.Objective.ASYMMETRIC
K1, K2 = 16, 12


def _params():
  k = jax.random.split(jax.random.key(0), 4)
  return {"a": {"kernel": jax.random.normal(k[0], (K1, K2)) / 4},
          "e": {"kernel": jax.random.normal(k[1], (K2, 2, 3)) / 4},          # einsum 'btk,khd->bthd'
          "s": {"kernel": jax.random.normal(k[2], (2, 6, 6)) / 3}}           # a scanned stack of 2 layers


def _apply(p, x):                                                            # x (B, T, K1)
  h = jnp.tanh(x @ p["a"]["kernel"])                                          # (B, T, K2)
  z = jnp.einsum("btk,khd->bthd", h, p["e"]["kernel"]).reshape(x.shape[:2] + (6,))   # (B, T, 6)
  z, _ = lax.scan(lambda c, w: (jnp.tanh(c @ w), None), z, p["s"]["kernel"])
  return z


def _rows(x, p):
  """The activations feeding a, e and each layer of s, as (rows, K) NumPy arrays."""
  h = np.tanh(x @ p["a"]["kernel"])
  z = np.einsum("btk,khd->bthd", h, p["e"]["kernel"]).reshape(x.shape[:2] + (6,))
  out = {"a": x.reshape(-1, K1), "e": h.reshape(-1, K2), "s": []}
  for w in p["s"]["kernel"]:
    out["s"].append(z.reshape(-1, 6))
    z = np.tanh(z @ w)
  return out


def test_cross_statistic_equals_numpy():
  """`calibrate(..., reference=...)` adds Σ xᵀ(x_ref − x) per weight (per layer of a stack), the rows of the two
  runs paired position by position; every other statistic is the one without a reference."""
  p = _params()
  k = jax.random.split(jax.random.key(1), 2)
  batches = list(jax.random.normal(k[0], (2, 3, 5, K1)))
  refs = [b + 0.3 * jax.random.normal(kk, b.shape) for b, kk in zip(batches, jax.random.split(k[1], 2))]
  calib = lb.calibrate(_apply, p, batches, reference=refs)
  plain = lb.calibrate(_apply, p, batches)
  pn = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  want = {"a": 0, "e": 0, "s": 0}
  for b, r in zip(batches, refs):
    x, xr = _rows(np.asarray(b, np.float64), pn), _rows(np.asarray(r, np.float64), pn)
    want["a"] += x["a"].T @ (xr["a"] - x["a"])
    want["e"] += x["e"].T @ (xr["e"] - x["e"])
    want["s"] += np.stack([xl.T @ (xrl - xl) for xl, xrl in zip(x["s"], xr["s"])])
  for name in want:
    st, st0 = calib[f"{name}/kernel"].stats, plain[f"{name}/kernel"].stats
    np.testing.assert_allclose(np.asarray(st.xtd), want[name], rtol=2e-4, atol=2e-4, err_msg=name)
    for field in ("xtx", "absmax", "abs_sum", "outliers", "count"):
      np.testing.assert_allclose(np.asarray(getattr(st, field)), np.asarray(getattr(st0, field)), rtol=1e-6,
                                 err_msg=f"{name}: {field}")
    assert st0.xtd is None


def test_retarget_core_is_least_squares():
  """W* = W + (XᵀX + λI)⁻¹ Xᵀ(X_ref − X) W: with λ → 0 the least-squares map from X to the outputs X_ref W; with
  the reference equal to the inputs, W itself, bit for bit."""
  rng = np.random.default_rng(0)
  X = rng.standard_normal((400, 24))
  Xr = X + 0.2 * rng.standard_normal(X.shape)
  W = rng.standard_normal((24, 10))
  got, ok = retarget_core(jnp.asarray(W, jnp.float32), jnp.asarray(X.T @ X, jnp.float32),
                          jnp.asarray(X.T @ (Xr - X), jnp.float32), jnp.float32(1e-7))
  lstsq = np.linalg.lstsq(X, Xr @ W, rcond=None)[0]
  assert bool(ok)
  np.testing.assert_allclose(np.asarray(got), lstsq, rtol=1e-3, atol=1e-3)
  assert np.sum((X @ np.asarray(got, np.float64) - Xr @ W) ** 2) < np.sum((X @ W - Xr @ W) ** 2)
  same, _ = retarget_core(jnp.asarray(W, jnp.float32), jnp.asarray(X.T @ X, jnp.float32),
                          jnp.zeros((24, 24), jnp.float32), jnp.float32(0.01))
  np.testing.assert_array_equal(np.asarray(same), np.asarray(W, np.float32))


def test_retarget_over_layouts_and_its_errors():
  """`retarget` maps each calibrated weight (an einsum kernel, each layer of a stack) to its target in the leaf's
  own layout; a calibration without reference inputs is refused, naming the weight."""
  p = _params()
  x = jax.random.normal(jax.random.key(2), (3, 5, K1))
  calib = lb.calibrate(_apply, p, [x], reference=[x + 0.2])
  out = retarget(p, calib)
  for name in ("a", "e", "s"):
    new, old = out[name]["kernel"], p[name]["kernel"]
    assert new.shape == old.shape and new.dtype == old.dtype and not np.allclose(new, old), name
  same = retarget(p, lb.calibrate(_apply, p, [x], reference=[x]))
  for name in ("a", "e", "s"):
    np.testing.assert_allclose(np.asarray(same[name]["kernel"]), np.asarray(p[name]["kernel"]), atol=1e-6)
  with pytest.raises(ValueError, match=r"params\['a'\]\['kernel'\].*no cross statistic"):
    retarget(p, lb.calibrate(_apply, p, [x]))
  with pytest.raises(ValueError, match="one batch per batch"):
    lb.calibrate(_apply, p, [x, x], reference=[x])
  with pytest.raises(ValueError, match="reference batch 0"):
    lb.calibrate(_apply, p, [x], reference=[x[:1]])


@functools.lru_cache(maxsize=None)
def _streamed(scan: bool, objective: lb.Objective):
  f, params, batches = _llama(scan)
  return lb.streamed(lb.gptq, f, params, batches, SPEC, objective=objective)


def test_asymmetric_tracks_the_float_model():
  """Toward the float model's outputs: the first group (whose inputs are the float model's) gets the reference's
  codes, and the quantized model's outputs are closer to the float model's than with the reference's objective,
  on the calibration batches and on held-out ones. (The target is a least-squares fit: with too few calibration
  tokens for the layer widths it fits them and generalizes worse; 768 tokens here, for widths 32 and 64.)"""
  f, params, _ = _llama(False)
  batches = [jax.random.randint(jax.random.key(100 + i), (4, 16), 0, CFG.vocab_size) for i in range(12)]
  sym, asym = (_flat(lb.streamed(lb.gptq, f, params, batches, SPEC, objective=o)) for o in lb.Objective)
  first = [p for p in asym if "layers_0" in str(p) and any(n in str(p) for n in ("wq", "wk", "wv"))]
  assert len(first) == 3
  _assert_same_q({p: asym[p] for p in first}, {p: sym[p] for p in first})
  held_out = [jax.random.randint(jax.random.key(10 + i), (4, 16), 0, CFG.vocab_size) for i in range(3)]
  run = jax.jit(f)
  tree = jax.tree_util.tree_structure(params)
  for data in (batches, held_out):
    ref = [run(params, b) for b in data]
    err = lambda q: sum(float(jnp.mean((run(dequantized(jax.tree_util.tree_unflatten(tree, list(q.values()))), b)
                                        - r) ** 2)) for b, r in zip(data, ref))
    assert err(asym) < 0.8 * err(sym), (err(asym), err(sym))


def test_asymmetric_scanned_equals_unrolled():
  unrolled = stack_layers(_streamed(False, ASYM), CFG.n_layers)
  _assert_same_q(_flat(_streamed(True, ASYM)), _flat(unrolled))


@pytest.mark.parametrize("name", ["maxtext_scan", "moe_all_experts"])
def test_zoo_layouts(name):
  """Zoo layouts (a scanned stack, experts every token goes through): the same
  weights become QArrays as with the reference's objective, with a lower output error."""
  z = ZOO[name]()
  spec = lb.int_spec(4, group_size=32)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    sym = _flat(lb.streamed(lb.gptq, z.apply, z.params, [z.batch], spec))
    asym = _flat(lb.streamed(lb.gptq, z.apply, z.params, [z.batch], spec, objective=ASYM))
  assert {p for p, l in asym.items() if isinstance(l, lb.QArray)} == {p for p, l in sym.items()
                                                                      if isinstance(l, lb.QArray)}
  tree = jax.tree_util.tree_structure(z.params, is_leaf=lambda x: isinstance(x, lb.QArray))
  run = jax.jit(z.apply)
  ref = run(z.params, z.batch)
  err = lambda q: float(jnp.mean((run(dequantized(jax.tree_util.tree_unflatten(tree, list(q.values()))), z.batch)
                                  - ref) ** 2))
  assert err(asym) < err(sym), (err(asym), err(sym))


@pytest.mark.parametrize("name", ["moe_capacity", "moe_ragged"])
def test_routed_experts_are_refused(name):
  """Rows routed by the data cannot be paired with the float model's: streamed names the block; a calibration
  against reference inputs names the weight a ragged_dot feeds."""
  z = ZOO[name]()
  with pytest.raises(ValueError, match=r"routes tokens by the data \((argmax|sort)\)"):
    lb.streamed(lb.gptq, z.apply, z.params, [z.batch], lb.int_spec(4, group_size=32), objective=ASYM)
  if name == "moe_ragged":
    with pytest.raises(ValueError, match=r"params\['wi_0'\].*ragged_dot"):
      lb.calibrate(z.apply, z.params, [z.batch], reference=[z.batch + 0.1])


def test_bad_objective():
  f, params, batches = _llama(False)
  with pytest.raises(ValueError, match="objective must be a lowbit_jax.Objective"):
    lb.streamed(lb.gptq, f, params, batches, SPEC, objective="asymmetric")
