"""The contract of every transform in `lowbit_jax.algorithms.registry.ALGORITHMS`, one test per clause, each run for
every entry on two scanned stacks: a linen `nn.scan` over layers (params (layers, ...), q/k/v DenseGeneral kernels
(D, H, Dh) and an out-projection (H, Dh, D) contracting two axes) and a maxtext-style scan with
variable_axes={"params": 1} (params (in, layers, out)). Tiny shapes (D = 64, every K a multiple of the group size
32, every problem (64, 64)) keep the compiled functions few and shared."""
import dataclasses
import functools
import inspect
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import select as sel
from lowbit_jax.algorithms.llm_int8 import LLM_INT8_SPEC
from lowbit_jax.algorithms.registry import ALGORITHMS
from lowbit_jax.algorithms.smoothquant import W8A8_SPEC
from lowbit_jax.qarray import QArray
from passhelpers import dequantized, is_q

D, H, DH, F, L = 64, 2, 32, 64, 2      # every weight: (64, 64) problems
INT4 = lb.int_spec(4, group_size=32)
# the spec each entry runs with (None: its own default, the W8A8 / LLM.int8() specs)
SPECS = {"rtn": INT4, "gptq": INT4, "awq": INT4, "smoothquant": None, "llm_int8": None}
# (d) output MSE (dequantized tree vs the float model, on the calibration batches) at most FACTOR x RTN's with the
# same spec: GPTQ and AWQ minimise exactly this error layer by layer (AWQ's α = 0, no-clip candidate is RTN);
# LLM.int8() weights are RTN int8; SmoothQuant moves activation range into the weights, at most doubling it.
FACTOR = {"rtn": 1.0, "gptq": 1.0, "awq": 1.0, "smoothquant": 2.0, "llm_int8": 1.0}
NAMES = sorted(ALGORITHMS)
MODELS = ["scan", "maxtext"]
FED_BY = {"norm": ("q", "k", "v"), "mlp_norm": ("up",)}      # norm -> the weights its output feeds


class Block(nn.Module):
  """Pre-norm attention (q/k/v share one input) and MLP, residual; (carry, x) -> (carry, None)."""
  general: bool = True     # DenseGeneral q/k/v (D, H, Dh) and out-projection (H, Dh, D), else Dense (D, H * Dh)

  @nn.compact
  def __call__(self, x, _):
    h = nn.RMSNorm(name="norm")(x)
    if self.general:
      q, k, v = (nn.DenseGeneral((H, DH), use_bias=False, name=n)(h) for n in ("q", "k", "v"))
    else:
      q, k, v = (nn.Dense(H * DH, use_bias=False, name=n)(h).reshape(h.shape[:-1] + (H, DH)) for n in "qkv")
    a = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / np.float32(np.sqrt(DH)), axis=-1)
    o = jnp.einsum("bhts,bshd->bthd", a, v)
    if self.general:
      x = x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="o")(o)
    else:
      x = x + nn.Dense(D, use_bias=False, name="o")(o.reshape(o.shape[:-2] + (H * DH,)))
    h = nn.RMSNorm(name="mlp_norm")(x)
    return x + nn.Dense(D, use_bias=False, name="down")(jax.nn.silu(nn.Dense(F, use_bias=False, name="up")(h))), None


class Scanned(nn.Module):
  axis: int = 0            # 0: params (layers, ...); 1: maxtext's (in, layers, out)

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(Block, variable_axes={"params": self.axis}, split_rngs={"params": True}, length=L)
    return stack(general=self.axis == 0, name="layers")(x, None)[0]


class Unrolled(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(L):
      x = Block(name=f"layers_{i}")(x, None)[0]
    return x


def _batches(seed: int):
  rng = np.random.default_rng(seed)
  salient = np.where(np.arange(D) % 13 == 0, 8.0, 1.0)                       # a few outlier input channels
  return [jnp.asarray((rng.normal(size=(2, 16, D)) * salient).astype(np.float32)) for _ in range(4)]


def _unstack(params, axis: int):
  """Scanned params -> {"layers_i": layer i} (the Unrolled model's params)."""
  return {f"layers_{i}": jax.tree.map(lambda a: jnp.take(a, i, axis=axis), params["layers"]) for i in range(L)}


def _maxtext_params(params, shapes):
  """The scan model's params in maxtext's layout (layers second, q/k/v/o heads flattened): the same function."""
  return jax.tree.map(lambda a, t: jnp.moveaxis(a.reshape((L, t.shape[0]) + t.shape[2:]), 0, 1), params, shapes)


@functools.lru_cache(maxsize=None)
def _setup(model: str):
  """(apply, params, calibration, batches). "scan": params from a fixed seed; "maxtext": the same function with
  maxtext's layout; "unrolled": the scan model's layers unrolled (layers_0, layers_1)."""
  m = {"scan": Scanned(axis=0), "maxtext": Scanned(axis=1), "unrolled": Unrolled()}[model]
  batches = _batches(1)
  if model == "scan":
    shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), batches[0])["params"]
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.15, s.shape).astype(np.float32)), shapes)
    for norm in FED_BY:
      params["layers"][norm]["scale"] = params["layers"][norm]["scale"] + 1.0
  elif model == "maxtext":
    params = _maxtext_params(_setup("scan")[1], jax.eval_shape(m.init, jax.random.PRNGKey(0), batches[0])["params"])
  else:
    params = _unstack(_setup("scan")[1], 0)
  apply = lambda p, x: m.apply({"params": p}, x)
  return apply, params, lb.calibrate(apply, params, batches), batches


def _host(tree):
  return jax.tree.map(lambda a: np.array(a, copy=True), tree)


@functools.lru_cache(maxsize=None)
def _run(name: str, model: str):
  """(quantized tree, host copy of the params before the call). Every weight here has statistics, so no
  algorithm warns (test (f) covers the warning)."""
  _, params, calib, _ = _setup(model)
  before = _host(params)
  spec = SPECS[name]
  q = ALGORITHMS[name](params, calib) if spec is None else ALGORITHMS[name](params, calib, spec)
  return q, before


@functools.lru_cache(maxsize=None)
def _qfn(model: str):
  """One jitted quantized function per model: trees of one structure and spec share its compile."""
  return jax.jit(lb.quantized(_setup(model)[0]))


@functools.lru_cache(maxsize=None)
def _ffn(model: str):
  return jax.jit(_setup(model)[0])


def _weight_only(tree):
  """The same codes with activation quantization switched off (what the dequantized tree stands for)."""
  def one(l):
    if not is_q(l) or l.spec.activations is None:
      return l
    children, aux = l.tree_flatten_with_keys()
    aux = (dataclasses.replace(l.spec, activations=None),) + tuple(aux[1:])
    return QArray.tree_unflatten(aux, [c for _, c in children])
  return jax.tree.map(one, tree, is_leaf=is_q)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _mse(model: str, tree) -> float:
  _, params, _, batches = _setup(model)
  x = jnp.concatenate(batches)
  return float(jnp.mean((_ffn(model)(dequantized(tree), x) - _ffn(model)(params, x)) ** 2))


@pytest.mark.parametrize("name", NAMES)
def test_one_signature(name):
  """transform(params, calib, spec=<a QuantSpec>, *, where=None, <options as keywords>)."""
  assert NAMES == ["awq", "gptq", "llm_int8", "rtn", "smoothquant"] and set(FACTOR) == set(SPECS) == set(NAMES)
  ps = list(inspect.signature(ALGORITHMS[name]).parameters.values())
  assert [p.name for p in ps[:3]] == ["params", "calib", "spec"] and isinstance(ps[2].default, lb.QuantSpec)
  assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in ps[:3]) and all(p.kind is p.KEYWORD_ONLY for p in ps[3:])
  assert ps[3].name == "where" and ps[3].default is None


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", NAMES)
def test_a_jitted_quantized_output_equals_the_dequantized_model(name, model):
  q, _ = _run(name, model)
  x = _setup(model)[3][0]
  ref = _ffn(model)(dequantized(q), x)
  out = _qfn(model)(_weight_only(q), x)
  assert _rel(out, ref) <= 1e-5
  if model == "scan" and any(is_q(l) and l.spec.activations for l in jax.tree.leaves(q, is_leaf=is_q)):
    # as returned, with its 8-bit activations: within a few int8 steps of the same function (one model: compiles)
    assert _rel(_qfn(model)(q, x), ref) <= 3e-2


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", NAMES)
def test_b_tree_structure_shapes_and_dtypes_are_kept(name, model):
  q, _ = _run(name, model)
  _, params, calib, _ = _setup(model)
  deq = dequantized(q)
  assert jax.tree.structure(deq) == jax.tree.structure(params)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(deq)[0], jax.tree.leaves(params)):
    assert (a.shape, a.dtype) == (b.shape, b.dtype), sel.path_repr(path)
  leaves = dict(jax.tree_util.tree_flatten_with_path(q, is_leaf=is_q)[0])
  assert all(is_q(leaves[p]) for p in calib), [sel.path_repr(p) for p in calib if not is_q(leaves[p])]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", NAMES)
def test_c_input_params_are_untouched(name, model):
  _, before = _run(name, model)
  after = _setup(model)[1]
  assert jax.tree.structure(after) == jax.tree.structure(before)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
    assert not is_q(a)
    np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", NAMES)
def test_d_output_error_within_the_rtn_bound_of_its_spec(name, model):
  q, _ = _run(name, model)
  _, params, calib, _ = _setup(model)
  spec = SPECS[name] or next(l.spec for l in jax.tree.leaves(q, is_leaf=is_q) if is_q(l))
  rtn = ALGORITHMS["rtn"](params, calib, dataclasses.replace(spec, activations=None))
  err, err_rtn = _mse(model, q), _mse(model, rtn)
  assert 0 < err <= FACTOR[name] * err_rtn * (1 + 1e-6), (err, err_rtn)


def _unfold(layers: dict, ref: dict) -> dict:
  """Unrolled layers with a scale folded into a norm (p' = p / s, weights s ⊙ W) moved back into the weights
  (whether a scale folds depends on the norm's layout: maxtext's (D, layers) norm does not, its layers' do)."""
  out = {}
  for name, layer in layers.items():
    layer = dict(layer)
    for norm, fed in FED_BY.items():
      r = layer[norm]["scale"] / ref[name][norm]["scale"]                      # 1 / s where folded, else 1
      layer[norm] = ref[name][norm]
      for w in fed:
        k = layer[w]["kernel"]
        layer[w] = {"kernel": k * r.reshape((-1,) + (1,) * (k.ndim - 1))}     # K leads in an unrolled layer
    out[name] = layer
  return out


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", NAMES)
def test_e_scanned_stack_quantizes_each_layer_like_the_unrolled_model(name, model):
  """Layer i of the stack (layer axis leading, or second as maxtext stores it) is quantized as the same layer of
  the unrolled model, with its own statistics: the same dequantized weights and the same function."""
  q, _ = _run(name, model)
  q_un, _ = _run(name, "unrolled")
  ref = _setup("unrolled")[1]
  layers = _unstack(dequantized(q), {"scan": 0, "maxtext": 1}[model])
  layers = jax.tree.map(lambda a, r: a.reshape(r.shape), layers, ref)          # maxtext: (D, H * Dh) -> (D, H, Dh)
  got, want = _unfold(layers, ref), _unfold(dequantized(q_un), ref)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    a, b = np.asarray(a), np.asarray(b)
    # float32 statistics of a scan and of unrolled layers may differ in the last bits: a rounding tie may flip
    assert np.mean(np.isclose(a, b, rtol=1e-4, atol=1e-6 * np.max(np.abs(b)))) > 0.99, sel.path_repr(path)
  x = _setup(model)[3][0]
  assert _rel(_ffn("unrolled")(got, x), _ffn("unrolled")(want, x)) < 1e-2


class _Conv(nn.Module):
  """A convolution (no traceable statistics) feeding a Dense."""

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(D, (2,), use_bias=False, name="conv")(x)                      # kernel (2, 32, 64): K = 64
    return nn.Dense(D, use_bias=False, name="out")(jax.nn.silu(h))


NEEDS_STATS = ("gptq", "awq", "smoothquant")       # the others need no statistics: no warning


@pytest.mark.parametrize("name", NAMES)
def test_f_weights_without_statistics_are_round_to_nearest_with_a_warning(name):
  m = _Conv()
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 16, 32)).astype(np.float32))
  params = m.init(jax.random.PRNGKey(0), x)["params"]
  calib = lb.calibrate(lambda p, x: m.apply({"params": p}, x), params, [x])
  conv = calib["conv/kernel"]
  assert conv.stats is None and calib["out/kernel"].stats is not None
  spec = SPECS[name] or {"smoothquant": W8A8_SPEC, "llm_int8": LLM_INT8_SPEC}[name]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    q = ALGORITHMS[name](params, calib, spec)
  said = [str(w.message) for w in caught if "no calibration statistics" in str(w.message)]
  if name in NEEDS_STATS:
    assert len(said) == 1 and "params['conv']['kernel'] (a convolution)" in said[0], said
    assert "round-to-nearest" in said[0] and "out" not in said[0]
  else:
    assert not said
  assert is_q(q["conv"]["kernel"]) and is_q(q["out"]["kernel"])
  np.testing.assert_array_equal(np.asarray(q["conv"]["kernel"].dequantize()),
                                np.asarray(conv.layout.quantize(params["conv"]["kernel"], spec).dequantize()))
