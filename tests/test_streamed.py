"""`lowbit_jax.streamed`: block-by-block calibration and quantization on quantized inputs (issue 15, item 1)."""
import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.models.llama import Llama, LlamaConfig, stack_layers
from lowbit_jax.passes.segments import Kind, Level
from lowbit_jax.select import path_str
from passhelpers import dequantized, quantized_jit
from zoo_layouts import ZOO

CFG = LlamaConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64, max_seq_len=32)
SPEC = lb.int_spec(3, group_size=16)


def _flat(tree) -> dict:
  return dict(jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, lb.QArray))[0])


@functools.lru_cache(maxsize=None)
def _llama(scan: bool, n_layers: int = CFG.n_layers):
  cfg = dataclasses.replace(CFG, n_layers=n_layers)
  m = Llama(cfg, scan_layers=scan)
  tokens = jnp.zeros((2, 16), jnp.int32)
  params = Llama(cfg).init(jax.random.key(0), tokens)["params"]
  keys = iter(jax.random.split(jax.random.key(3), 64))
  params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(next(keys), a.shape), params)
  if scan:
    params = stack_layers(params, cfg.n_layers)
  batches = [jax.random.randint(jax.random.key(i), (4, 16), 0, CFG.vocab_size) for i in range(3)]
  return (lambda p, t: m.apply({"params": p}, t)), params, batches


def _assert_same_q(a: dict, b: dict):
  qs = [p for p, l in a.items() if isinstance(l, lb.QArray)]
  assert qs and set(qs) == {p for p, l in b.items() if isinstance(l, lb.QArray)}
  for p in qs:
    np.testing.assert_array_equal(np.asarray(a[p].codes), np.asarray(b[p].codes), err_msg=str(p))
    np.testing.assert_allclose(np.asarray(a[p].dequantize()), np.asarray(b[p].dequantize()), atol=1e-6)


def test_blocks_are_the_reference_groups():
  """An unrolled Llama is cut after q/k/v, o, gate/up and down of every layer (then the head): the reference's
  sequential groups; a scanned one is one stepped scan whose body has the same four groups."""
  for scan, want_top in ((False, [("wk", "wq", "wv"), ("wo",), ("w1", "w3"), ("w2",)] * CFG.n_layers + [("output",)]),
                         (True, None)):
    f, params, batches = _llama(scan)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    closed = jax.make_jaxpr(lambda pl, x: f(jax.tree.unflatten(jax.tree.structure(params), pl), x))(
        [l for _, l in leaves], batches[0])
    selected = {p: True for p in lb.analyze(f, params, batches[0]).selected}
    level = Level.build(closed, {i: frozenset({p}) for i, (p, _) in enumerate(leaves)}, selected)
    groups = [tuple(sorted(path_str(p).split("/")[-2] for p in b.weights)) for b in level.blocks
              if b.kind is not Kind.RUN]
    if not scan:
      assert groups == want_top
      assert all(b.kind is Kind.QUANT for b in level.blocks if b.weights)
    else:
      kinds = [b.kind for b in level.blocks if b.weights]
      assert kinds == [Kind.SCAN, Kind.QUANT], kinds         # the stack, then the head


def test_unrolled_equals_true_sequential_gptq():
  """On an unrolled model, streaming block by block is exactly GPTQ's true-sequential mode (statistics of every
  group re-captured with the earlier groups quantized), at a fraction of its work (two layers: the whole-model
  mode recompiles the model for every group)."""
  f, params, batches = _llama(False, 2)
  streamed = lb.streamed(lb.gptq, f, params, batches, SPEC)
  sequential = lb.gptq(params, lb.calibrate(f, params, batches), SPEC, true_sequential=True)
  _assert_same_q(_flat(streamed), _flat(sequential))


def test_scanned_stack_equals_unrolled():
  """A scanned stack is stepped one layer at a time: the same codes as the unrolled model, written back as one
  stacked QArray per leaf that runs packed (and, for AWQ, folded norm scales stacked back as floats)."""
  f, params, batches = _llama(False)
  fs, sparams, _ = _llama(True)
  for method, kw in ((lb.gptq, {}), (lb.awq, {"n_grid": 4})):
    unrolled = stack_layers(lb.streamed(method, f, params, batches, SPEC, **kw), CFG.n_layers)
    scanned = lb.streamed(method, fs, sparams, batches, SPEC, **kw)
    a, b = _flat(scanned), _flat(unrolled)
    _assert_same_q(a, b)
    for p, l in a.items():
      if not isinstance(l, lb.QArray):
        np.testing.assert_allclose(np.asarray(l), np.asarray(b[p]), rtol=1e-5, atol=1e-6, err_msg=str(p))
    if method is lb.awq:   # folding changed the norms: the streamed result must carry them
      assert not np.allclose(np.asarray(a[_key(sparams, "attention_norm")]),
                             np.asarray(_flat(sparams)[_key(sparams, "attention_norm")]))
    np.testing.assert_allclose(quantized_jit(fs)(scanned, batches[0]), jax.jit(fs)(dequantized(scanned), batches[0]),
                               rtol=1e-4, atol=1e-4)


def _key(params, name):
  return next(p for p in _flat(params) if name in path_str(p))


def test_statistics_memory_is_one_block():
  """Every calibration the method receives covers one group's weights only (peak statistics: one block's), and
  the layers of a scan reuse each group's traced calibration."""
  f, params, batches = _llama(True)
  seen, calibs = [], []

  def method(p, calib, spec):
    seen.append(sorted(path_str(k).split("/")[-2] for k in calib))
    calibs.append(calib)
    return lb.gptq(p, calib, spec)

  q = lb.streamed(method, f, params, batches, SPEC)
  assert len(seen) == 4 * CFG.n_layers + 1
  fns = [c.apply_fn for c in calibs]       # the layers of the scan share each group's traced calibration step
  assert len({id(fn) for fn in fns[:4 * CFG.n_layers]}) == 4 and fns[0] is fns[4] is fns[8]
  assert max(len(s) for s in seen) == 3 and seen[:4] == [["wk", "wq", "wv"], ["wo"], ["w1", "w3"], ["w2"]]
  assert all(isinstance(q_, lb.QArray) for p, q_ in _flat(q).items() if path_str(p).endswith("kernel"))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_layout(name):
  """Every layout of the zoo streams: the same weights become QArrays as in the whole-model mode, of the same
  shapes, and the output error stays at the whole-model GPTQ's level (a misplaced layer or statistic would put it
  at RTN's or worse)."""
  z = ZOO[name]()
  spec = lb.int_spec(4, group_size=32)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)    # convolutions: round-to-nearest, as the whole-model mode
    streamed = lb.streamed(lb.gptq, z.apply, z.params, [z.batch], spec)
    whole = lb.gptq(z.params, lb.calibrate(z.apply, z.params, [z.batch]), spec)
  a, b = _flat(streamed), _flat(whole)
  assert {p for p, l in a.items() if isinstance(l, lb.QArray)} == {p for p, l in b.items() if isinstance(l, lb.QArray)}
  for p, l in a.items():
    assert tuple(l.shape) == tuple(b[p].shape) and l.dtype == b[p].dtype, p
  run = jax.jit(z.apply)
  ref = run(z.params, z.batch)
  err = lambda t: float(jnp.mean((run(dequantized(t), z.batch) - ref) ** 2))
  assert err(streamed) < 2.0 * err(whole), (err(streamed), err(whole))


def test_a_weight_shared_by_every_step_is_refused():
  """A weight that a scanned stack reuses in every step cannot be quantized layer by layer: the error names it."""
  import flax.linen as nn

  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param("shared", nn.initializers.normal(0.1), (8, 8))
      stack = self.param("stack", nn.initializers.normal(0.1), (3, 8, 8))
      y, _ = jax.lax.scan(lambda c, s: (jnp.tanh(c @ w) @ s, None), x, stack)
      return y

  m = Shared()
  x = jax.random.normal(jax.random.key(0), (4, 8))
  params = m.init(jax.random.key(1), x)["params"]
  with pytest.raises(ValueError, match=r"params\['shared'\] is shared by every step of a scan"):
    lb.streamed(lb.gptq, lambda p, x: m.apply({"params": p}, x), params, [x], lb.int_spec(4))


def test_errors_name_the_layer_of_a_stack():
  """A NaN weight in layer 1 of a stack: the method's error names the stacked leaf and the layer."""
  f, params, batches = _llama(True)
  wq = params["layers"]["attention"]["wq"]["kernel"]
  bad = jax.tree.map(lambda x: x, params)
  bad["layers"]["attention"]["wq"]["kernel"] = wq.at[1, 0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match=r"\['wq'\]\['kernel'\].*(NaN|finite).*layer 1 of the stack"):
    lb.streamed(lb.gptq, f, bad, batches, SPEC)
  assert not bool(jnp.isnan(params["layers"]["attention"]["wq"]["kernel"]).any())   # input untouched


def test_bad_input():
  f, params, batches = _llama(False)
  with pytest.raises(ValueError, match="streamed: method must be"):
    lb.streamed("gptq", f, params, batches)
  with pytest.raises(ValueError, match="streamed: batches must be a non-empty"):
    lb.streamed(lb.gptq, f, params, [])
  with pytest.raises(ValueError, match="batch 1 has"):
    lb.streamed(lb.gptq, f, params, [batches[0], batches[1][:, :8]])
