"""Every weight layout of the Flax zoos, quantized and run packed with no model edits (tests/zoo_layouts.py).

For each model: the default selection (by use) is exactly the weights a user calls linear (tied embedding tables
are opt-in); `rtn` and `gptq` quantize them along the axes the function contracts; `jit(quantized(apply))(q, x)`
equals `apply(dequantized q, x)` to 1e-5 in f32; the run report shows no weight dequantized (convolutions are the
documented exception); the jaxpr of the quantized function holds no float buffer of a quarter of a weight.
"""
import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import passes as P
from lowbit_jax.select import path_str
from passhelpers import assert_close, dequantized, is_q
from zoo_layouts import ZOO, matching

SPEC = lb.int_spec(4, group_size=32)
# Embedding tables that double as the output head: contracted, but left in float unless selected explicitly.
TIED = {"tied_embed": r"^embed/embedding$", "hf_gpt2": r"^transformer/wte/embedding$",
        "gemma_style": r"input_embedding$"}


@functools.lru_cache(maxsize=None)
def _build(name):
  """(zoo, the paths of its linear and conv weights), built once per process: the tests of one layout share its
  apply function, so jax traces and compiles each of its runs once per tree structure."""
  z = ZOO[name]()
  return z, frozenset(matching(z, z.linear + z.conv))


@functools.lru_cache(maxsize=None)
def _quantized(name):
  """`quantized(apply)` of one layout, shared like its apply function."""
  return lb.quantized(_build(name)[0].apply)


def _qpaths(tree) -> set:
  return {path_str(p) for p, l in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_q)[0] if is_q(l)}


def _expect(expected: bool, category, match: str):
  """`pytest.warns(category, match=match)` if `expected`, else nothing: such a warning is then an error."""
  return pytest.warns(category, match=match) if expected else contextlib.nullcontext()


def _check_run(z, q, *, allow_dequantized=()):
  """The packed run equals the float run of the dequantized tree; only weights matching `allow_dequantized` run
  dequantized (the zoo's convs: one DequantizedWarning each)."""
  # Warnings come from tracing, which jax does once per function and tree structure: a run that must warn gets a
  # function of its own.
  f = lb.quantized(z.apply) if allow_dequantized else _quantized(z.name)
  with _expect(bool(allow_dequantized), P.DequantizedWarning, "the quantized weight runs dequantized"):
    got = jax.jit(f)(q, z.batch)
  want = jax.jit(z.apply)(dequantized(q), z.batch)
  assert_close(got, want, 1e-5)
  report = f.report(q, z.batch)
  bad = {path_str(w.path) for w in report.dequantized}
  assert all(any(re.search(r, b) for r in allow_dequantized) for b in bad), report
  assert not report.unused, report
  return report


@pytest.mark.parametrize("name", sorted(ZOO))
def test_default_selection_rtn_and_packed_run(name):
  z, linear = _build(name)
  tied = {p for p in linear if name in TIED and re.search(TIED[name], p)}
  found = lb.analyze(z.apply, z.params, z.batch)
  assert {path_str(p) for p in found.selected} == linear - tied
  q = lb.rtn(z.params, found, SPEC)
  assert _qpaths(q) == linear - tied
  for p, leaf in jax.tree_util.tree_flatten_with_path(q, is_leaf=is_q)[0]:
    if is_q(leaf):   # quantized along the traced contraction axes: groups never straddle another axis
      use = found.uses[p]
      assert leaf.k_axes == use.contract_axes and leaf.shape == use.shape, (path_str(p), leaf, use)
  _check_run(z, q, allow_dequantized=z.conv)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_gptq_on_every_layout(name):
  z, linear = _build(name)
  calib = lb.calibrate(z.apply, z.params, [z.batch])
  with _expect(bool(z.conv), RuntimeWarning, "gptq: no calibration statistics for .*convolution"):
    q = lb.gptq(z.params, calib, SPEC)      # convs have no statistics: quantized round-to-nearest, with a warning
  tied = {p for p in linear if name in TIED and re.search(TIED[name], p)}
  assert _qpaths(q) == linear - tied
  _check_run(z, q, allow_dequantized=z.conv)


@pytest.mark.parametrize("name", sorted(TIED))
def test_tied_embedding_opt_in_runs_lookup_on_codes(name):
  z, _ = _build(name)
  found = lb.analyze(z.apply, z.params, z.batch, where=lambda p, l: p in _build(name)[1] or bool(
      re.search(TIED[name], p)))
  q = lb.rtn(z.params, found, SPEC)
  report = _check_run(z, q)
  (emb,) = [found.uses[p].where for p in found.selected if re.search(TIED[name], path_str(p))]
  (run,) = [w for w in report.weights if w.where == emb]
  assert P.Impl.ROWS in run.impls and P.Impl.REFERENCE in run.impls   # rows looked up on codes; head packed


def _derived_float_max(jaxpr, taint: dict) -> dict:
  """{weight id: the largest float buffer computed from that weight's leaves} over a jaxpr and its sub-jaxprs
  (`taint`: invar -> set of weight ids; an equation's outputs derive from its inputs, a sub-jaxpr's outputs from
  what its body derives them from; a dot's output is an activation, not a weight copy)."""
  from jax.extend import core as jex
  out: dict = {}

  def visit(jx, env) -> list:
    for eqn in jx.eqns:
      ids = set().union(*[env.get(v, set()) for v in eqn.invars if isinstance(v, jex.Var)])
      subs = [getattr(sub, "jaxpr", sub) for p in eqn.params.values()
              for sub in (p if isinstance(p, (tuple, list)) else (p,)) if isinstance(sub, (jex.ClosedJaxpr, jex.Jaxpr))]
      outs = [ids] * len(eqn.outvars)
      if subs:
        outs = [set() for _ in eqn.outvars]
        for sj in subs:        # sub-jaxpr inputs line up with the trailing operands (scan, pjit, cond, while)
          ins = list(eqn.invars)[-len(sj.invars):] if sj.invars else []
          res = visit(sj, {iv: env.get(ov, set()) for iv, ov in zip(sj.invars, ins) if isinstance(ov, jex.Var)})
          if len(res) == len(outs):
            outs = [a | b for a, b in zip(outs, res)]
      if eqn.primitive.name in ("dot_general", "ragged_dot_general"):
        outs = [set() for _ in eqn.outvars]
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
        if o and jnp.issubdtype(v.aval.dtype, jnp.floating):
          for i in o:
            out[i] = max(out.get(i, 0), int(np.prod(v.aval.shape)))
    return [env.get(v, set()) if isinstance(v, jex.Var) else set() for v in jx.outvars]
  visit(jaxpr.jaxpr, dict(taint))
  return out


@pytest.mark.parametrize("name", ["linen_dense_general", "maxtext_scan", "gemma_style", "moe_all_experts",
                                  "moe_capacity", "moe_ragged", "nnx_linear_general", "hf_llama"])
def test_no_float_copy_of_a_weight(name):
  """K >= 8 x group size (group 8): the reference decodes one K tile at a time, so no float buffer computed from a
  weight's codes reaches a quarter of that weight. Gathered experts are left out: a lookup of experts decodes one
  tile per token."""
  z, linear = _build(name)
  tied = TIED.get(name, "^$")
  found = lb.analyze(z.apply, z.params, z.batch, where=lambda p, l: p in linear or bool(re.search(tied, p)))
  q = lb.rtn(z.params, found, lb.int_spec(4, group_size=8))   # every 2-D+ float weight quantized
  x = jax.tree.map(lambda a: a[:1], z.batch)               # one sequence
  jaxpr = jax.make_jaxpr(lb.quantized(z.apply))(q, x)
  flat = jax.tree_util.tree_flatten_with_path((q, x), is_leaf=is_q)[0]
  taint, sizes, i = {}, {}, 0
  for path, leaf in flat:
    n = len(jax.tree.leaves(leaf))
    if is_q(leaf) and leaf.k >= 64:
      for v in jaxpr.jaxpr.invars[i:i + n]:
        taint[v] = {path_str(path)}
      sizes[path_str(path)] = leaf.size
    i += n
  derived = _derived_float_max(jaxpr, taint)
  assert derived and set(derived) <= set(sizes)
  for w, biggest in derived.items():
    assert biggest < sizes[w] / 4, (w, biggest, sizes[w])


def test_incompatible_uses_raise_naming_both():
  w = jnp.ones((8, 8), jnp.float32)
  f = lambda p, x: x @ p["w"] + (x @ p["w"].T)    # contracted over axis 0 and over axis 1
  x = jnp.ones((2, 8), jnp.float32)
  found = lb.analyze(f, {"w": w}, x)                 # the analysis itself works; the weight has no layout
  msg = r"params\['w'\].*two incompatible ways.*\(0,\).*\(1,\)"
  with pytest.raises(ValueError, match=msg):
    lb.rtn({"w": w}, found, SPEC)
  with pytest.raises(ValueError, match=msg):
    lb.calibrate(f, {"w": w}, [x])


def test_conv_warns_once_per_weight_and_is_counted():
  z, _ = _build("conv")
  q = lb.rtn(z.params, lb.analyze(z.apply, z.params, z.batch), SPEC)
  conv = q["conv1"]["kernel"]
  assert conv.k_axes == (0, 1) and conv.k == 3 * 64          # quantized along (spatial, in)
  with pytest.warns(P.DequantizedWarning) as rec:
    jax.jit(lb.quantized(z.apply))(q, z.batch)
  msgs = [str(w.message) for w in rec if issubclass(w.category, P.DequantizedWarning)]
  assert sorted(m.split(":")[0] for m in msgs) == ["params['conv1']['kernel']", "params['conv2']['kernel']"]
  report = lb.quantized(z.apply).report(q, z.batch)
  assert {w.where for w in report.dequantized} == {"params['conv1']['kernel']", "params['conv2']['kernel']"}
  assert report.packed_bytes == q["proj"]["kernel"].nbytes


@pytest.mark.parametrize("name", sorted(ZOO))
def test_sparsegpt_2_4_on_every_layout(name):
  """SparseGPT 2:4 prunes every calibrated weight along the axes the function contracts (each weight in its (*B, K,
  N) layout keeps at most 2 of every 4 consecutive K entries, for every column and stacked layer or expert), and
  the pruned model's output error is below magnitude 2:4's (convolutions, without statistics, are magnitude
  pruned with a warning)."""
  z, _ = _build(name)
  calib = lb.calibrate(z.apply, z.params, [z.batch])
  with _expect(bool(z.conv), RuntimeWarning, "sparsegpt: no calibration statistics for .*convolution"):
    pruned = lb.sparsegpt(z.params, calib, lb.NM())
  mag = lb.magnitude_prune(z.params, calib, lb.NM())
  flat = {p: leaf for p, leaf in jax.tree_util.tree_flatten_with_path(pruned)[0]}
  for p in calib:
    kn = np.asarray(calib[p].layout.to_kn(flat[p]))                                 # (*B, K, N)
    groups = kn.reshape(kn.shape[:-2] + (kn.shape[-2] // 4, 4, kn.shape[-1]))      # (*B, K/4, 4, N)
    assert np.all(np.sum(groups != 0, axis=-2) <= 2), path_str(p)
  run = jax.jit(z.apply)
  ref = run(z.params, z.batch)
  err = lambda t: float(jnp.mean((run(t, z.batch) - ref) ** 2))
  assert err(pruned) < err(mag), (err(pruned), err(mag))
