"""lowbit_jax.passes on linen (scan + remat) and NNX models: origin analysis, capture, rewrite, composition."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit_jax as lb
from lowbit_jax import passes as P
from passhelpers import (ScanModel, assert_close, dequantized, float_shapes, is_q, random_like,
                         scan_model_layer_inputs)

SPEC = lb.int_spec(4, group_size=8)


@pytest.fixture(scope="module")
def scan_setup():
  m = ScanModel(n_layers=3)
  x = jax.random.normal(jax.random.key(1), (2, 5, 12))
  params = random_like(jax.eval_shape(m.init, jax.random.key(0), x)["params"], scale=0.3)
  return (lambda p, x: m.apply({"params": p}, x)), params, x


def test_analyze_scan_remat(scan_setup):
  f, params, x = scan_setup
  an = P.analyze(f, params, x)
  by = an.by_path()
  assert len(an.sites) == 4 and len(by) == 4
  up = by["params['layers']['up']['kernel']"][0]
  assert up.contract_axes == (1,) and up.stacked_axes == (0,) and up.side is P.Side.RHS
  assert up.nesting[0] == "scan(length=3)" and up.nesting[1] in ("remat2", "checkpoint")
  assert by["params['head']['kernel']"][0].contract_axes == (0,)
  assert "inside scan(length=3)" in str(up)


def test_hessians_equal_xtx_by_hand(scan_setup):
  f, params, x = scan_setup
  batches = [x, 2.0 * x + 1.0]
  cal = P.calibrate(f, params, batches)
  assert len(cal) == 4 and cal.n_batches == 2
  assert [p[-2].key for p in cal.order] == ["inp", "up", "down", "head"]
  ins = [scan_model_layer_inputs(params, b) for b in batches]
  for name, key in [("inp", "inp/kernel"), ("up", "layers/up/kernel"), ("down", "layers/down/kernel"),
                    ("head", "head/kernel")]:
    w = cal[key]
    per_layer = len(ins[0][name])
    xs = [np.concatenate([np.asarray(i[name][l]) for i in ins]) for l in range(per_layer)]
    xtx = np.stack([a.T @ a for a in xs])
    absmax = np.stack([np.abs(a).max(0) for a in xs])
    if key.startswith("layers"):
      assert w.stacked_axes == (0,) and w.xtx.shape[0] == 3
    else:
      xtx, absmax = xtx[0], absmax[0]
    assert_close(w.xtx, xtx, 1e-4)
    assert_close(w.absmax, absmax)
    assert_close(w.hessian, 2 * xtx / xs[0].shape[0], 1e-4)
    assert_close(w.abs_mean, np.stack([np.abs(a).mean(0) for a in xs]).reshape(w.abs_mean.shape), 1e-4)
    np.testing.assert_array_equal(np.asarray(w.count).reshape(-1), [xs[0].shape[0]] * per_layer)
    outl = np.stack([(np.abs(a) > 1.5).sum(0) for a in xs]).reshape(w.outlier_fraction.shape)
    np.testing.assert_array_equal(
        np.asarray(P.calibrate(f, params, batches, stats={P.Stat.OUTLIERS}, outlier_threshold=1.5)[key]
                   .stats.outliers), outl)


def test_stats_selection_and_recalibrate(scan_setup):
  f, params, x = scan_setup
  cal = P.calibrate(f, params, [x], stats={P.Stat.ABSMAX}, where=r"layers/.*kernel$")
  assert len(cal) == 2 and cal["layers/up/kernel"].xtx is None
  q = lb.rtn(params, None, SPEC, where=r"^inp/kernel$")
  cal2 = cal.recalibrate(q)           # the quantized first layer now feeds the stack
  assert len(cal2) == 2 and not np.allclose(cal2["layers/up/kernel"].absmax, cal["layers/up/kernel"].absmax)


def test_quantized_equals_dequantized_and_composes(scan_setup):
  f, params, x = scan_setup
  q = lb.rtn(params, None, SPEC)
  ref = jax.jit(f)(dequantized(q), x)
  qf = P.quantized(f)
  assert_close(jax.jit(qf)(q, x), ref)
  assert qf.last_notes == [] and len(qf.last_sites) == 4
  assert_close(jax.vmap(qf, in_axes=(None, 0))(q, x), ref)
  # grad w.r.t. the input and a float leaf (the head bias), the QArrays held fixed
  loss_q = lambda b, x: jnp.sum(qf({**q, "head": {**q["head"], "bias": b}}, x) ** 2)
  dq = dequantized(q)
  loss_f = lambda b, x: jnp.sum(f({**dq, "head": {**dq["head"], "bias": b}}, x) ** 2)
  gq = jax.jit(jax.grad(loss_q, argnums=(0, 1)))(q["head"]["bias"], x)
  gf = jax.jit(jax.grad(loss_f, argnums=(0, 1)))(q["head"]["bias"], x)
  for a, b in zip(gq, gf):
    assert_close(a, b, 1e-4)


def _decoded_shapes(q: lb.QArray) -> set[tuple[int, ...]]:
  """The shapes a float decode of the whole weight q would have: (K, N), padded (K_pad, N) and grouped
  (G, group_len, N), each with and without q's stacked leading axes (a scan slices one layer off)."""
  *lead, n = q.shape[:-2] + q.shape[-1:]
  per_layer = {(q.k, n), (q.k_pad, n), (q.k_pad // q.group_len, q.group_len, n)}
  return per_layer | {tuple(lead) + s for s in per_layer}


def test_no_float_weight_materialised_under_jit(scan_setup):
  """No op anywhere in the quantized jaxpr (sub-jaxprs of scan, remat and pjit included) computes a float array
  of a weight's full shape: the reference kernel unpacks codes, but scales multiply the (.., G, N) partial sums,
  never a (K, N) weight. The same check finds the decode in the dequantize-then-run jaxpr."""
  f, params, x = scan_setup
  q = lb.rtn(params, None, SPEC)
  qf = P.quantized(f)
  packed = set(float_shapes(jax.make_jaxpr(qf)(q, x)))
  assert qf.last_notes == []
  decoded = set(float_shapes(jax.make_jaxpr(lambda q, x: f(dequantized(q), x))(q, x)))
  weights = [l for l in jax.tree.leaves(q, is_leaf=is_q) if is_q(l)]
  assert len(weights) == 4
  for w in weights:
    assert _decoded_shapes(w) & decoded, w.shape        # the check can fail
    assert not _decoded_shapes(w) & packed, (w.shape, _decoded_shapes(w) & packed)


class TinyNNX(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(12, 20, rngs=rngs)
    self.l2 = nnx.Linear(20, 6, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.gelu(self.l1(x)))


def test_nnx_split_merge():
  graphdef, state = nnx.split(TinyNNX(nnx.Rngs(0)))
  f = lambda s, x: nnx.merge(graphdef, s)(x)
  x = jax.random.normal(jax.random.key(2), (4, 12))
  an = P.analyze(f, state, x)
  assert len(an.sites) == 2
  cal = P.calibrate(f, state, [x])
  assert_close(cal["l1/kernel"].xtx, np.asarray(x).T @ np.asarray(x), 1e-4)
  q = lb.rtn(state, None, SPEC)
  assert_close(jax.jit(P.quantized(f))(q, x), jax.jit(f)(dequantized(q), x))


class Views(nn.Module):
  """A transposed (out, in) kernel, a DenseGeneral over two contraction axes, a tied embedding."""

  @nn.compact
  def __call__(self, tokens):
    emb = nn.Embed(32, 16, name="embed")
    x = emb(tokens)                                                    # gather
    w_t = self.param("proj_t", nn.initializers.lecun_normal(), (16, 16))   # stored (out, in)
    x = x @ w_t.T.astype(jnp.float32)
    h = nn.DenseGeneral((2, 8), name="split")(x).astype(jnp.float32)   # (.., 2, 8)
    x = nn.DenseGeneral(16, axis=(-2, -1), name="merge")(h)            # kernel (2, 8, 16)
    return emb.attend(x)                                               # dot with the embedding


def test_views_transpose_multi_axis_and_tied_embedding():
  m = Views()
  tokens = jax.random.randint(jax.random.key(3), (2, 7), 0, 32)
  params = random_like(jax.eval_shape(m.init, jax.random.key(0), tokens)["params"], scale=0.3)
  f = lambda p, t: m.apply({"params": p}, t)
  where = r"(kernel|proj_t|embedding)$"
  found = P.analyze(f, params, tokens, where=where)
  by = found.by_path()
  assert by["params['proj_t']"][0].contract_axes == (1,)
  assert by["params['merge']['kernel']"][0].contract_axes == (0, 1)
  assert {s.kind for s in by["params['embed']['embedding']"]} == {P.SiteKind.LOOKUP, P.SiteKind.DOT}
  emb_use = next(u for u in found.uses.values() if u.where == "params['embed']['embedding']")
  assert emb_use.contract_axes == (1,) and emb_use.embedding
  cal = P.calibrate(f, params, [tokens], where=where)
  assert cal["merge/kernel"].xtx.shape == (16, 16) and cal["embed/embedding"].xtx.shape == (16, 16)
  x_emb = np.asarray(params["embed"]["embedding"])[np.asarray(tokens)].reshape(-1, 16)
  assert_close(cal["proj_t"].xtx, x_emb.T @ x_emb, 1e-4)
  q = lb.rtn(params, None, lb.int_spec(8, axis=-1), where=r"(proj_t|embedding)$")
  q = lb.rtn(q, found, lb.int_spec(8), where=r"split/kernel$")     # along its traced contraction axis
  qf = P.quantized(f)
  assert_close(jax.jit(qf)(q, tokens), jax.jit(f)(dequantized(q), tokens), 1e-4)
  report = qf.report(q, tokens)
  runs = {w.where: w.impls for w in report.weights}
  assert runs["params['embed']['embedding']"] == {P.Impl.ROWS, P.Impl.REFERENCE}   # rows decoded; head packed
  assert runs["params['proj_t']"] == {P.Impl.REFERENCE}                 # the transposed kernel stays packed
  assert not report.dequantized


def test_control_flow_and_custom_rules():
  @jax.custom_vjp
  def mm(x, w):
    return x @ w

  mm.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))

  def f(p, x):
    y = jax.lax.cond(jnp.sum(x) > -1e9, lambda: x @ p["a"], lambda: (p["a"].T @ x.T).T)   # axis 0 both ways
    y = jax.lax.fori_loop(0, 3, lambda i, c: jnp.tanh(c @ p["b"]), y)
    y = mm(y, p["c"])
    return jax.jit(lambda a, b: jax.nn.relu(a) @ b)(y, p["d"])

  ks = jax.random.split(jax.random.key(0), 5)
  params = {k: jax.random.normal(kk, (16, 16)) / 4 for k, kk in zip("abcd", ks)}
  x = jax.random.normal(ks[4], (3, 16))
  where = lambda path, leaf: True
  an = P.analyze(f, params, x, where=where)
  assert {s.where for s in an.sites} == {f"params['{k}']" for k in "abcd"}
  cal = P.calibrate(f, params, [x], where=where)
  assert_close(cal["a"].xtx, np.asarray(x).T @ np.asarray(x), 1e-4)
  assert int(cal["b"].count) == 9                          # three loop iterations of 3 rows
  q = lb.rtn(params, None, lb.int_spec(8), where=where)
  qf = P.quantized(f)
  assert_close(jax.jit(qf)(q, x), jax.jit(f)(dequantized(q), x), 1e-4)
  assert any("custom derivative rule" in n.reason for n in qf.last_notes)
  g = jax.jit(jax.grad(lambda x: jnp.sum(qf(q, x))))(x)
  dq = dequantized(q)
  assert_close(g, jax.jit(jax.grad(lambda x: jnp.sum(f(dq, x))))(x), 1e-3)


def test_errors_name_the_leaf(scan_setup):
  f, params, x = scan_setup
  with pytest.raises(ValueError, match="empty selection"):
    P.calibrate(f, params, [x], where=r"nothing_here")
  extra = {**params, "unused": {"kernel": jnp.ones((4, 4))}}
  assert "unused" not in str(list(P.calibrate(f, extra, [x])))     # selection by use skips it
  with pytest.raises(ValueError, match=r"params\['unused'\]\['kernel'\].*never used"):
    P.calibrate(f, extra, [x], where=r"kernel$")
  with pytest.raises(ValueError, match=r"batch 1 has shape \(2, 4, 12\).*expected shape \(2, 5, 12\)"):
    P.calibrate(f, params, [x, x[:, :4]])
  with pytest.raises(ValueError, match="dtype int32"):
    P.calibrate(f, params, [x, x.astype(jnp.int32)])
  with pytest.raises(ValueError, match=r"params\['inp'\]\['kernel'\].*NaN/inf.*batch 1"):
    P.calibrate(f, params, [x, x.at[0, 0, 0].set(jnp.nan)])
  wrong = jax.tree.map(lambda a: a, params)
  wrong["head"] = {"kernel": jnp.ones((3, 8)), "bias": jnp.ones((8,))}
  with pytest.raises(ValueError, match="failed while tracing.*head"):
    P.calibrate(f, wrong, [x])
  with pytest.raises(ValueError, match="backend"):
    P.quantized(f, backend="pallas")
