"""lowbit_jax.allocate: units are the weights sharing an input (a scanned stack is one unit), errors are the RTN
output errors (checked against the activations by hand), bytes are what the quantized tree stores (memory_report),
the knapsack is optimal (against exhaustive search), bad inputs are rejected naming the argument, and
Allocation.apply feeds every algorithm one pass per spec without touching other leaves; on stories260K the
KL-weighted allocation beats the uniform format of equal bytes."""
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import allocate_core as core
from lowbit_jax import select as sel
from lowbit_jax.algorithms.llm_int8 import llm_int8_spec
from lowbit_jax.algorithms.registry import ALGORITHMS
from lowbit_jax.algorithms.smoothquant import W8A8_SPEC
from lowbit_jax.allocate import Sensitivity, spec_label
from lowbit_jax.passes import Stat
from passhelpers import ScanModel, dequantized, is_q, quantized_jit, random_like, scan_model_layer_inputs

D, F, V = 64, 96, 32
# int4 g64 pads the down-projections' K = 96 to 128: padding must be counted
CANDS = (lb.int_spec(2, group_size=32), lb.int_spec(4, group_size=64), lb.int_spec(8))
UNITS = [{"gate_0/kernel", "up_0/kernel"}, {"down_0/kernel"}, {"gate_1/kernel", "up_1/kernel"}, {"down_1/kernel"},
         {"head/kernel"}]


class Mlp(nn.Module):
  """Two pre-norm gated MLP blocks (gate and up read one normed input) and a head; returns logits."""

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      h = nn.RMSNorm(name=f"norm_{i}")(x)
      g, u = (nn.Dense(F, use_bias=False, name=f"{n}_{i}")(h) for n in ("gate", "up"))
      x = x + nn.Dense(D, use_bias=False, name=f"down_{i}")(jax.nn.silu(g) * u)
    return nn.Dense(V, use_bias=False, name="head")(nn.RMSNorm(name="final_norm")(x))


@functools.lru_cache(maxsize=None)
def _mlp():
  """(apply, params, calib, allocation with every measure's data at an unlimited budget)."""
  m = Mlp()
  rng = np.random.default_rng(0)
  salient = np.where(np.arange(D) % 11 == 0, 6.0, 1.0)
  batches = [jnp.asarray((rng.normal(size=(2, 16, D)) * salient).astype(np.float32)) for _ in range(3)]
  params = random_like(jax.eval_shape(m.init, jax.random.PRNGKey(0), batches[0])["params"], seed=1, scale=0.15)
  params = jax.tree_util.tree_map_with_path(lambda p, a: a + 1.0 if "norm" in sel.path_str(p) else a, params)
  apply = lambda p, x: m.apply({"params": p}, x)
  calib = lb.calibrate(apply, params, batches)
  return apply, params, calib, lb.allocate(params, calib, 32.0, CANDS)


def _chosen_bits(tree, alloc) -> float:
  """bits/weight of the allocated weights in `tree`, from memory_report."""
  rep = {l.path: l for l in lb.memory_report(tree).leaves}
  leaves = [rep[sel.path_str(p)] for p in alloc.specs]
  return 8.0 * sum(l.nbytes for l in leaves) / sum(l.params for l in leaves)


def _uniform_bits(alloc, c: int) -> float:
  return 8.0 * sum(u.nbytes[c] for u in alloc.units) / alloc.n_weights


def test_units_share_an_input_and_bytes_are_the_stored_ones():
  _, params, calib, a = _mlp()
  assert [{sel.path_str(p) for p in u.paths} for u in a.units] == UNITS
  assert a.units[0].name == "{gate_0,up_0}/kernel" and a.optimal
  assert all(a.choice[i] == 2 for i in range(len(a.units)))        # unlimited budget: the most precise
  for c, spec in enumerate(CANDS):
    q = lb.rtn(params, calib, spec)
    rep = {l.path: l for l in lb.memory_report(q).leaves}
    for u, names in zip(a.units, UNITS):
      assert u.nbytes[c] == sum(rep[n].nbytes for n in names), (u.name, spec)
      assert u.n_weights == sum(rep[n].params for n in names)


def test_errors_are_the_rtn_output_errors_of_every_layer_of_a_scanned_stack():
  m = ScanModel()
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 8, 12)).astype(np.float32))
  params = random_like(jax.eval_shape(m.init, jax.random.PRNGKey(0), x)["params"], seed=2, scale=0.3)
  calib = lb.calibrate(lambda p, v: m.apply({"params": p}, v), params, [x])
  cands = (lb.int_spec(2, group_size=8), lb.int_spec(4, group_size=8), lb.int_spec(8))
  a = lb.allocate(params, calib, 32.0, cands, sensitivity=Sensitivity.ABSOLUTE)
  assert [sel.path_str(u.paths[0]) for u in a.units] == ["inp/kernel", "layers/up/kernel", "layers/down/kernel",
                                                          "head/kernel"]
  assert a.units[1].n_weights == 3 * 16 * 24                       # one unit: all layers of the stack
  xs = scan_model_layer_inputs(params, x)                           # the activations feeding each Dense, per layer
  for c, spec in enumerate(cands):
    deq = dequantized(lb.rtn(params, calib, spec))
    for u in a.units:
      name = sel.path_str(u.paths[0]).split("/")[-2]
      pick = lambda t: np.asarray(t[name]["kernel"] if name in ("inp", "head") else t["layers"][name]["kernel"],
                                  np.float64)
      w = pick(params).reshape((-1,) + pick(params).shape[-2:])        # (layers, K, N)
      dq = pick(deq).reshape(w.shape)
      err = sum(2.0 / len(X) * np.sum((X @ (dq[i] - w[i])) ** 2) for i, X in enumerate(xs[name]))
      norm = sum(2.0 / len(X) * np.sum((X @ w[i]) ** 2) for i, X in enumerate(xs[name]))
      np.testing.assert_allclose(u.abs_errors[c], err, rtol=2e-4, err_msg=f"{u.name} {spec}")
      np.testing.assert_allclose(u.norm, norm, rtol=2e-4)
      np.testing.assert_allclose(u.errors(Sensitivity.RELATIVE)[c], err / norm, rtol=3e-4)


def test_a_quantizer_scores_what_it_stores():
  """quantizer=gptq: each unit's error is the output error of GPTQ's own result (checked against an independent
  computation from the dequantized tree), below round-to-nearest's for every unit and candidate, and the KL
  factors are measured on GPTQ's weights too (they predict a small KL for GPTQ's most precise candidate)."""
  _, params, calib, rtn_alloc = _mlp()
  gptq = functools.partial(lb.gptq, act_order=True, static_groups=True)
  a = lb.allocate(params, calib, 32.0, CANDS, quantizer=gptq)
  assert [u.paths for u in a.units] == [u.paths for u in rtn_alloc.units]
  leaves = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for c, spec in enumerate(CANDS):
    deq = dict(jax.tree_util.tree_flatten_with_path(dequantized(gptq(params, calib, spec)))[0])
    for u, ur in zip(a.units, rtn_alloc.units):
      err = 0.0
      for p in u.paths:
        d = np.asarray(deq[p], np.float64) - np.asarray(leaves[p], np.float64)
        err += float(np.sum(d * (np.asarray(calib[p].hessian, np.float64) @ d)))
      np.testing.assert_allclose(u.abs_errors[c], err, rtol=2e-4, err_msg=f"{u.name} {spec_label(spec)}")
      assert u.abs_errors[c] < ur.abs_errors[c], (u.name, spec_label(spec))
  assert all(u.kl_factor is not None and u.kl_factor >= 0 for u in a.units)
  with pytest.raises(ValueError, match="quantizer must be None or a transform"):
    lb.allocate(params, calib, 32.0, CANDS, quantizer="gptq")


def test_kl_factors_predict_the_kl_of_quantizing_one_unit():
  """KL_WEIGHTED's factor is measured at the most precise candidate; at the others its prediction stays within a
  factor of 2 of the KL actually measured on the same batches when only that unit is quantized."""
  apply, params, calib, a = _mlp()
  x = jnp.concatenate(calib.batches[:2])
  ref = apply(params, x)
  for u in a.units:
    for c, spec in enumerate(CANDS[:2]):
      q = lb.rtn(params, calib, spec, where=lambda p, _, names={sel.path_str(q) for q in u.paths}: p in names)
      kl = float(core.mean_kl(ref, apply(dequantized(q), x)))
      assert 0.5 < u.errors(Sensitivity.KL_WEIGHTED)[c] / kl < 2.0, (u.name, spec, kl)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_the_budget_is_respected_by_the_stored_bytes(method):
  _, params, calib, base = _mlp()
  lo, hi = _uniform_bits(base, 0), _uniform_bits(base, 2)
  budgets = [_uniform_bits(base, 1), lo + 0.3 * (hi - lo)] + ([lo, lo + 0.6 * (hi - lo), hi] if method == "rtn"
                                                               else [])
  for b in budgets:
    a = base.with_budget(b)
    q = a.apply(ALGORITHMS[method], params, calib)
    got = _chosen_bits(q, a)
    assert got == a.bits_per_weight and got <= b, (b, got, a.bits_per_weight)


@pytest.mark.parametrize("measure", list(Sensitivity))
def test_at_a_uniform_candidates_bytes_the_error_is_at_most_uniforms(measure):
  base = _mlp()[3]
  for c in range(len(CANDS)):
    a = base.with_budget(_uniform_bits(base, c), sensitivity=measure)
    uniform = sum(u.errors(measure)[c] for u in a.units)
    assert a.predicted_error <= uniform * (1 + 1e-12) and a.nbytes <= sum(u.nbytes[c] for u in a.units)


def _brute(b, e, limit):
  best = min((sum(e[u][c] for u, c in enumerate(x)), x) for x in itertools.product(*[range(len(r)) for r in b])
             if sum(b[u][c] for u, c in enumerate(x)) <= limit)
  return best[0]


def test_the_knapsack_is_optimal_against_exhaustive_search():
  rng = np.random.default_rng(0)
  for trial in range(300):
    n_units = 3 + trial % 2
    b = rng.integers(10, 100, size=(n_units, 3))
    e = rng.uniform(0.0, 10.0, size=(n_units, 3))
    limit = int(rng.integers(b.min(axis=1).sum(), b.max(axis=1).sum() + 1))
    x, exact = core.solve(b, e, limit)
    rows = np.arange(n_units)
    assert exact and b[rows, x].sum() <= limit
    assert e[rows, x].sum() == pytest.approx(_brute(b, e, limit), rel=1e-12), (b, e, limit)
    g = core.greedy(b, e, limit)                                   # the fallback: feasible, never below optimal
    assert b[rows, g].sum() <= limit and e[rows, g].sum() >= e[rows, x].sum() - 1e-9
    g2, exact2 = core.solve(b, e, limit, max_states=1)              # front too large: the greedy, unproven
    assert np.array_equal(g2, g) if not exact2 else e[rows, g2].sum() == pytest.approx(e[rows, x].sum())


def test_an_allocation_is_optimal_on_the_small_model():
  base = _mlp()[3]
  lo, hi = _uniform_bits(base, 0), _uniform_bits(base, 2)
  prev = np.inf
  for t in (0.0, 0.15, 0.4, 0.7, 1.0):
    a = base.with_budget(lo + t * (hi - lo))
    b = [u.nbytes for u in a.units]
    e = [u.errors(a.sensitivity) for u in a.units]
    limit = a.budget_bits_per_weight * a.n_weights / 8 * (1 + 1e-12)
    assert a.optimal and a.predicted_error == pytest.approx(_brute(b, e, limit), rel=1e-12)
    assert a.predicted_error <= prev                                # more bytes never predict more error
    prev = a.predicted_error


@pytest.mark.parametrize("budget", [0, -1.0, float("nan"), float("inf"), True, "4", None])
def test_bad_budgets_are_rejected(budget):
  _, params, calib, base = _mlp()
  with pytest.raises(ValueError, match="budget_bits_per_weight"):
    lb.allocate(params, calib, budget, CANDS)
  with pytest.raises(ValueError, match="budget_bits_per_weight"):
    base.with_budget(budget)


@pytest.mark.parametrize("candidates", [[], (), CANDS[0], "int4", None, [CANDS[0], "int4"],
                                        [lb.int_spec(4, group_size=32), lb.int_spec(4, group_size=32, axis=-1)]])
def test_bad_candidates_are_rejected(candidates):
  _, params, calib, _ = _mlp()
  with pytest.raises(ValueError, match=r"candidates"):
    lb.allocate(params, calib, 4.0, candidates)


def test_a_budget_below_the_cheapest_says_the_minimum_and_other_errors_name_the_argument():
  _, params, calib, base = _mlp()
  least = _uniform_bits(base, 0)
  with pytest.raises(ValueError, match=f"minimum achievable {least:.4f} bits/weight"):
    lb.allocate(params, calib, least * 0.99, CANDS)
  assert base.with_budget(least).bits_per_weight == least
  for kw, what in (({"sensitivity": "relative"}, "sensitivity"), ({"kl_batches": 0}, "kl_batches"),
                   ({"max_states": 0}, "max_states")):
    with pytest.raises(ValueError, match=what):
      lb.allocate(params, calib, 4.0, CANDS, **kw)
  no_h = lb.calibrate(calib.apply_fn, params, calib.batches[:1], stats={Stat.ABSMAX})
  with pytest.raises(ValueError, match=r"params\['gate_0'\]\['kernel'\].*Hessian"):
    lb.allocate(params, no_h, 4.0, CANDS)
  absolute = lb.allocate(params, calib, 32.0, CANDS, sensitivity=Sensitivity.ABSOLUTE)
  with pytest.raises(ValueError, match=r"\{gate_0,up_0\}/kernel: no measured KL factor"):
    absolute.with_budget(4.0, sensitivity=Sensitivity.KL_WEIGHTED)
  with pytest.raises(ValueError, match="transform"):
    base.apply("gptq", params, calib)
  with pytest.raises(ValueError, match=r"params\['down_0'\]\['kernel'\]: allocated but already a QArray"):
    base.apply(lb.rtn, lb.rtn(params, calib, CANDS[2], where="down_0"), calib)


def _flat(tree) -> dict:
  return dict(jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_q)[0])


def test_a_pass_with_where_leaves_other_leaves_and_earlier_qarrays_untouched():
  """Pass 1 quantizes down_0; a second pass (GPTQ, AWQ, SmoothQuant) on gate_1/up_1 with the same calibration keeps
  down_0's QArray and every other leaf, and quantizes gate_1/up_1 exactly as one pass on the float tree."""
  _, params, calib, _ = _mlp()
  first = lb.rtn(params, calib, CANDS[2], where="down_0")
  where = lambda path, _: path in ("gate_1/kernel", "up_1/kernel")
  spec = lb.int_spec(4, group_size=32)
  floats = _flat(params)
  for transform in (lb.gptq, lb.awq, lb.smoothquant):
    second = _flat(transform(first, calib, spec, where=where))
    alone = _flat(transform(params, calib, spec, where=where))
    assert second.keys() == floats.keys()
    for p, leaf in second.items():
      name = sel.path_str(p)
      if name == "down_0/kernel":
        assert leaf is first["down_0"]["kernel"]
      elif is_q(leaf):                                             # gate_1 / up_1: as the one-pass result
        assert name in ("gate_1/kernel", "up_1/kernel")
        for x, y in zip(jax.tree.leaves(leaf), jax.tree.leaves(alone[p])):
          np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
      else:                                                        # untouched, or norm_1 with the same fold
        want = alone[p] if name == "norm_1/scale" else floats[p]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want), err_msg=f"{transform} {name}")
  # GPTQ's sequential re-capture runs the model with the earlier passes' QArrays in place
  seq = _flat(lb.gptq(first, calib, spec, where=r"(gate|up|down)_1", true_sequential=True))
  assert seq[next(p for p in seq if sel.path_str(p) == "down_0/kernel")] is first["down_0"]["kernel"]
  assert all(is_q(seq[p]) == (sel.path_str(p) in ("down_0/kernel", "gate_1/kernel", "up_1/kernel", "down_1/kernel"))
             for p in seq)


# the candidates each algorithm can take (LLM.int8() needs int8 with an outlier threshold)
APPLY_CANDS = {"rtn": CANDS, "gptq": CANDS, "awq": CANDS, "smoothquant": (lb.int_spec(4, group_size=32), W8A8_SPEC),
               "llm_int8": (llm_int8_spec(),)}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_apply_feeds_every_algorithm(name):
  apply, params, calib, _ = _mlp()
  before = jax.tree.map(lambda v: np.array(v, copy=True), params)
  base = lb.allocate(params, calib, 32.0, APPLY_CANDS[name], sensitivity=Sensitivity.ABSOLUTE)
  n = len(base.candidates)
  a = base.with_budget(_uniform_bits(base, 0) + 0.5 * (_uniform_bits(base, n - 1) - _uniform_bits(base, 0)))
  assert len(set(a.choice)) >= min(n, 2), a.choice                 # a real mix wherever there is a choice
  q = a.apply(ALGORITHMS[name], params, calib)
  leaves = dict(jax.tree_util.tree_flatten_with_path(q, is_leaf=is_q)[0])
  for p, spec in a.specs.items():
    assert is_q(leaves[p]) and (leaves[p].spec.bits, leaves[p].spec.group_size, leaves[p].spec.activations) == (
        spec.bits, spec.group_size, spec.activations), sel.path_repr(p)
  bits = _chosen_bits(q, a)
  assert bits == a.bits_per_weight if name in ("rtn", "gptq", "llm_int8") else bits >= a.bits_per_weight
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(x), y)                # the input tree is untouched
  x = calib.batches[0]
  out, ref = jax.jit(lb.quantized(apply))(q, x), apply(dequantized(q), x)
  tol = 3e-2 if any(s.activations for s in a.specs.values()) else 1e-5
  assert float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref))) <= tol


def test_str_is_a_table_of_units():
  a = _mlp()[3].with_budget(4.5)
  text = str(a)
  for u, c in zip(a.units, a.choice):
    assert f"| {u.name} | {u.n_weights:,} | {spec_label(a.candidates[c])} | {8 * u.nbytes[c] / u.n_weights:.3f} |" \
        in text
  assert "| **total** |" in text and "budget 4.500" in text and "optimal" in text
  assert text.count("\n| ") == len(a.units) + 1                      # unit rows and the total


@pytest.mark.assets
def test_kl_weighted_mixed_precision_beats_uniform_at_equal_bytes_on_stories260k(stories260k, stories260k_calib):
  m, apply, held, calib = stories260k.loaded, stories260k.apply, stories260k.held, stories260k_calib
  cands = (lb.int_spec(2, group_size=32), lb.int_spec(3, group_size=64), lb.int_spec(3, group_size=32),
           lb.int_spec(4, group_size=64), lb.int_spec(8))
  base = lb.allocate(m.params, calib, 32.0, cands)
  assert len(base.units) == 20                                      # 5 layers x (q/k/v, o, gate/up, down)
  c = cands.index(lb.int_spec(3, group_size=32))
  uniform = lb.rtn(m.params, calib, cands[c])
  mixed_alloc = base.with_budget(_uniform_bits(base, c))
  mixed = mixed_alloc.apply(lb.rtn, m.params, calib)
  assert _chosen_bits(mixed, mixed_alloc) <= _chosen_bits(uniform, mixed_alloc) == _uniform_bits(base, c)
  assert len(set(mixed_alloc.choice)) > 1
  ref = jax.jit(apply)(m.params, held)
  kl = {k: float(core.mean_kl(ref, quantized_jit(apply)(t, held))) for k, t in (("uniform", uniform), ("mixed", mixed))}
  assert kl["mixed"] < kl["uniform"], kl
