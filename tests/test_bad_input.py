"""The bad-input table of issue 12: one parametrized row per finding, run through every public entry it concerns.

Each row asserts the exact exception type and that the message names the argument or key path; the degenerate
statistics rows assert the warning (`lowbit_jax.DegenerateStatisticsWarning`), the fallback (the weight equals
its round-to-nearest quantization and is not all zero) and the `strict=True` error. One tiny two-layer model
(32 -> 32 -> 16) and its calibrations are shared by the module.
"""
import dataclasses
import math
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.algorithms.gptq_core import gptq_core
from lowbit_jax.algorithms.llm_int8 import LLM_INT8_SPEC
from lowbit_jax.checks import ApplyFnError, DegenerateStatisticsWarning
from lowbit_jax.eval import perplexity
from lowbit_jax.io.bpe import BPETokenizer, PreTokenizer, byte_to_unicode
from lowbit_jax.io.tokenizer import Tokenizer
from passhelpers import ScanModel, random_like
from seeds import stable_seed

A = r"params\['a'\]\['kernel'\]"
B = r"params\['b'\]\['kernel'\]"
INT4 = lb.int_spec(4, group_size=16)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(32, use_bias=False, name="a")(x)
    return nn.Dense(16, use_bias=False, name="b")(jax.nn.relu(h))


MODEL = MLP()


def apply(p, x):
  return MODEL.apply({"params": p}, x)


def _x(scale=1.0, rows=16):
  rng = np.random.default_rng(stable_seed("test_bad_input", rows))
  return jnp.asarray((rng.normal(size=(rows, 32)) * scale).astype(np.float32))


@pytest.fixture(scope="module")
def model():
  x = _x()
  params = random_like(jax.eval_shape(MODEL.init, jax.random.PRNGKey(0), x)["params"],
                       seed=stable_seed("test_bad_input", "params"), scale=0.3)
  return params, x, lb.calibrate(apply, params, [x])


def _nan(params, name="a"):
  out = jax.tree.map(lambda l: l, params)
  out[name]["kernel"] = params[name]["kernel"].at[1, 2].set(jnp.nan)
  return out


def _raises(exc, pattern, fn, *args, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("error")   # no retry warning, no fallback warning on the way to the error
    with pytest.raises(exc, match=pattern) as info:
      fn(*args, **kwargs)
  assert type(info.value) is exc, type(info.value)
  return info.value


# --- spec constructors: strict field types --------------------------------------------------------------------

SPEC_ROWS = [
    (lambda: lb.int_spec(4.0), r"QuantSpec\.bits must be an int, got 4\.0"),
    (lambda: lb.int_spec(4, group_size=True), r"PerGroup\.size .*must be an int >= 1, got True"),
    (lambda: lb.int_spec(4, group_size=32.0), r"PerGroup\.size"),
    (lambda: lb.int_spec(4, symmetric="no"), r"QuantSpec\.symmetric must be a bool, got 'no'"),
    (lambda: lb.int_spec(4, strict="yes"), r"QuantSpec\.strict must be a bool, got 'yes'"),
    (lambda: lb.int_spec(4, axis=1.5), r"PerChannel\.axis must be an int, got 1\.5"),
    (lambda: lb.int_spec(4, group_size=32, axis=True), r"PerGroup\.axis must be an int, got True"),
    (lambda: lb.int_spec(4, grid="full"), r"QuantSpec\.grid.*SymGrid"),
    (lambda: lb.int_spec(4, symmetric=False, zero_point="float"), r"QuantSpec\.zero_point.*ZeroPoint"),
    (lambda: lb.QuantSpec(format="int", bits=4), r"QuantSpec\.format must be a lowbit_jax\.Format"),
    (lambda: lb.QuantSpec(format=lb.Format.NF4, bits=4.0, granularity=lb.PerGroup(size=64)), r"QuantSpec\.bits"),
    (lambda: lb.QuantSpec(format=lb.Format.INT, bits=4, dq_group_size=True), r"QuantSpec\.dq_group_size"),
    (lambda: lb.nf4_spec(double_quant="yes"), r"QuantSpec\.double_quant must be a bool"),
    (lambda: lb.nf4_spec(block_size=64.0), r"PerGroup\.size"),
    (lambda: lb.q4_1_spec(group_size=True), r"PerGroup\.size"),
    (lambda: lb.fp8_spec(per_channel="yes"), r"fp8_spec: per_channel must be a bool"),
    (lambda: lb.ternary_spec(per_channel=1), r"ternary_spec: per_channel must be a bool"),
    (lambda: lb.ActQuant(outlier_threshold=float("nan")), r"ActQuant\.outlier_threshold"),
    (lambda: lb.ActQuant(bits=8.0), r"ActQuant\.bits"),
    (lambda: lb.ActQuant(per_token=1), r"ActQuant\.per_token must be a bool"),
    (lambda: lb.llm_int8_spec(threshold=float("inf")), r"threshold"),
    (lambda: lb.ClipSearch(steps=True), r"ClipSearch\.steps"),
    (lambda: lb.ClipSearch(max_shrink=float("nan")), r"ClipSearch\.max_shrink"),
]


@pytest.mark.parametrize("make, pattern", SPEC_ROWS, ids=[f"spec{i}" for i in range(len(SPEC_ROWS))])
def test_spec_fields_are_strictly_typed(make, pattern):
  _raises(ValueError, pattern, make)


# --- the entries' own arguments ------------------------------------------------------------------------------

def test_quantize_refuses_non_arrays_and_non_specs():
  w = np.ones((32, 8), np.float32)
  _raises(ValueError, r"quantize: x must be a jax or numpy array.*got list", lb.quantize, [[1.0, 2.0]], INT4)
  _raises(ValueError, r"quantize: params\['w'\]: x must be a jax or numpy array.*got NoneType", lb.quantize,
          None, INT4, path="params['w']")
  _raises(ValueError, r"quantize: spec must be a lowbit_jax\.QuantSpec.*'int4'", lb.quantize, w, "int4")
  _raises(ValueError, r"quantize: path must be None or a str", lb.quantize, w, INT4, path=3)


ALGOS = ["rtn", "gptq", "awq", "smoothquant", "llm_int8"]
SPEC_OF = {"rtn": INT4, "gptq": INT4, "awq": INT4, "smoothquant": lb.W8A8_SPEC, "llm_int8": LLM_INT8_SPEC}


def _run(name, params, calib, *args, **kwargs):
  return getattr(lb, name)(params, calib, *args, **kwargs)


@pytest.mark.parametrize("name", ALGOS)
def test_a_string_spec_is_refused(name, model):
  params, _, calib = model
  _raises(ValueError, rf"{name}: expected a QuantSpec.*'int4'", _run, name, params, calib, "int4")


@pytest.mark.parametrize("name", ALGOS)
def test_an_invalid_where_regex_names_where(name, model):
  params, _, calib = model
  _raises(ValueError, r"where: '\(\(' is not a valid key-path regex", _run, name, params, calib, where="((")


def test_calibrate_and_rtn_without_calibration_name_where(model):
  params, x, _ = model
  _raises(ValueError, r"where: '\[' is not a valid key-path regex", lb.calibrate, apply, params, [x], where="[")
  _raises(ValueError, r"where: '\[' is not a valid key-path regex", lb.rtn, params, None, where="[")
  _raises(ValueError, r"where: '\[' is not a valid key-path regex", lb.llm_int8, params, None, where="[")


@pytest.mark.parametrize("percdamp", [0, 0.0, -0.01, float("nan"), float("inf"), 1e6, True, "0.01"])
def test_percdamp_out_of_range_raises_before_any_retry(percdamp, model):
  params, x, calib = model
  e = _raises(ValueError, r"gptq: percdamp must be a finite float in \(0, 1\]", lb.gptq, params, calib,
              INT4, percdamp=percdamp)
  assert "calibration" not in str(e)          # the option is blamed, not the data
  w, h = np.ones((32, 8), np.float32), np.eye(32, dtype=np.float32)
  _raises(ValueError, r"gptq_core: percdamp must be a finite float in \(0, 1\]", gptq_core, w, h, INT4,
          percdamp=percdamp)


OPTION_ROWS = [
    ("gptq", dict(act_order="yes"), r"gptq: act_order must be a bool"),
    ("gptq", dict(blocksize=1.5), r"gptq: blocksize must be an int"),
    ("gptq", dict(max_damp_tries=True), r"gptq: max_damp_tries must be an int"),
    ("gptq", dict(true_sequential=1), r"gptq: true_sequential must be a bool"),
    ("gptq", dict(strict="yes"), r"gptq: strict must be a bool"),
    ("awq", dict(n_grid=2.0), r"awq: n_grid must be an int"),
    ("awq", dict(clip=1), r"awq: clip must be a bool"),
    ("awq", dict(max_shrink=float("nan")), r"awq: max_shrink must be a finite float in \[0, 1\)"),
    ("awq", dict(fold="no"), r"awq: fold must be a bool"),
    ("awq", dict(strict=None), r"awq: strict must be a bool"),
    ("smoothquant", dict(alpha=float("nan")), r"smoothquant: alpha must be a finite float in \[0, 1\]"),
    ("smoothquant", dict(alpha=True), r"smoothquant: alpha"),
    ("smoothquant", dict(fold=1), r"smoothquant: fold must be a bool"),
    ("smoothquant", dict(strict=0), r"smoothquant: strict must be a bool"),
]


@pytest.mark.parametrize("name, kwargs, pattern", OPTION_ROWS, ids=[f"{n}-{next(iter(k))}" for n, k, _ in OPTION_ROWS])
def test_algorithm_options_are_strictly_typed(name, kwargs, pattern, model):
  params, _, calib = model
  _raises(ValueError, pattern, _run, name, params, calib, **kwargs)


def test_calibrate_arguments(model):
  params, x, _ = model
  _raises(ValueError, r"calibrate: batches\[0\] has shape \(0, 32\) \(no rows\)", lb.calibrate, apply, params,
          [x[:0]])
  _raises(ValueError, r"calibrate: batches\[1\] has shape \(0, 32\) \(no rows\)", lb.calibrate, apply, params,
          [x, x[:0]])
  _raises(ValueError, r"calibrate: outlier_threshold must be a finite float >= 0", lb.calibrate, apply, params,
          [x], outlier_threshold=float("nan"))
  _raises(ValueError, r"calibrate: batches must be an iterable", lb.calibrate, apply, params, None)
  _raises(ValueError, r"calibrate: apply_fn must be a callable", lb.calibrate, "apply", params, [x])


# --- no silent NaN/inf ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALGOS)
def test_non_finite_weights_raise_naming_the_path(name, model):
  params, _, calib = model
  _raises(ValueError, A + r".*NaN", _run, name, _nan(params), calib, SPEC_OF[name])


def test_non_finite_weights_raise_without_calibration(model):
  params, _, _ = model
  _raises(ValueError, A + r".*NaN", lb.rtn, _nan(params), None, INT4)
  _raises(ValueError, A + r".*NaN", lb.llm_int8, _nan(params))
  _raises(ValueError, r"params\['w'\].*NaN", lb.quantize, np.full((32, 8), np.nan, np.float32), INT4,
          path="params['w']")


def test_overflowing_results_raise_naming_the_path(monkeypatch):
  """Every format stays finite up to float32's max (tests/test_formats.py); a format whose scale overflows anyway
  (here ternary's, forced to inf) is caught by the output check and named, never returned as NaN."""
  from lowbit_jax.formats import ternary
  real = ternary.compute_params
  monkeypatch.setattr(ternary, "compute_params",
                      lambda *a: (real(*a)[0] * np.float32(np.inf), None))
  w = np.linspace(-3.0, 3.0, 33 * 7, dtype=np.float32).reshape(33, 7)    # a shape no other test compiles
  _raises(ValueError, r"params\['w'\]\.scale: quantize produced NaN/inf", lb.quantize, w, lb.ternary_spec(),
          path="params['w']")
  _raises(ValueError, r"params\['w'\]\['kernel'\]\.scale: rtn produced NaN/inf", lb.rtn,
          {"w": {"kernel": w}}, None, lb.ternary_spec())


def test_perplexity_of_nan_logits_names_the_window():
  tokens = np.arange(40, dtype=np.int32) % 7

  def logits(p, t):   # NaN in the third window only
    out = jax.nn.one_hot(t, 8) * p
    return jnp.where((t[:, :1] == tokens[20])[..., None] & (jnp.arange(8) == 0), jnp.nan, out)

  _raises(ValueError, r"perplexity: window 2 \(tokens 20:30\) has a non-finite", perplexity, logits,
          jnp.float32(1.0), tokens, seq_len=10, batch_size=3, progress=False)
  _raises(ValueError, r"perplexity: seq_len .*must be an int >= 2, got 2\.5", perplexity, logits,
          jnp.float32(1.0), tokens, seq_len=2.5, batch_size=3, progress=False)
  _raises(ValueError, r"perplexity: batch_size must be an int >= 1, got True", perplexity, logits,
          jnp.float32(1.0), tokens, seq_len=10, batch_size=True, progress=False)


def test_memory_report_of_empty_or_non_array_trees():
  _raises(ValueError, r"memory_report: the tree has no array leaves", lb.memory_report, {})
  _raises(ValueError, r"memory_report: params\['a'\] is a str", lb.memory_report, {"a": "x"})


# --- third-party errors get our context ----------------------------------------------------------------------

def _flax_error_apply(p, x):   # a Flax ScopeParamNotFoundError: the model needs "b", which is dropped
  return MODEL.apply({"params": {"a": p["a"]}}, x)


def test_third_party_errors_are_wrapped_with_context(model):
  params, x, _ = model
  qparams = lb.rtn(params, None, lb.int_spec(8))
  for call, entry in ((lambda: lb.quantized(_flax_error_apply)(qparams, x), r"quantized: "),
                      (lambda: lb.quantized(_flax_error_apply).report(qparams, x), r"quantized\(\.\.\.\)\.report: "),
                      (lambda: lb.calibrate(_flax_error_apply, params, [x]), r"calibrate: apply_fn\(params, batch\)"),
                      (lambda: lb.analyze(_flax_error_apply, params, x), r"_flax_error_apply\(params, \.\.\.\)")):
    e = _raises(ApplyFnError, entry + r".*ScopeParamNotFoundError", call)
    assert isinstance(e, ValueError) and type(e.__cause__).__name__ == "ScopeParamNotFoundError"


# --- tokenizers ----------------------------------------------------------------------------------------------

def _tokenizers():
  pieces = ("<unk>", "<s>", "</s>") + tuple(f"<0x{b:02X}>" for b in range(256)) + ("a",)
  chars = [byte_to_unicode()[b] for b in range(256)]
  bpe = BPETokenizer(tokens=tuple(["<s>", "</s>"] + chars + ["ab"]), token_types=tuple([3, 3] + [1] * 257),
                     merges=(("a", "b"),), pre=PreTokenizer.SMOLLM, bos_id=0, eos_id=1)
  return [Tokenizer(pieces, (0.0,) * 260, bos_id=1, eos_id=2), bpe]


@pytest.mark.parametrize("tok", _tokenizers(), ids=["llama", "bpe"])
@pytest.mark.parametrize("call, pattern", [
    (lambda t: t.decode([1.7]), r"decode: ids\[0\] must be an int token id, got 1\.7"),
    (lambda t: t.decode([3, True]), r"decode: ids\[1\] must be an int token id, got True"),
    (lambda t: t.decode(np.array([1.0, 2.0])), r"decode: ids must be a 1-D sequence of int token ids, got dtype float"),
    (lambda t: t.decode(None), r"decode: ids must be a sequence of int token ids, got None"),
    (lambda t: t.decode("ab"), r"decode: ids must be a sequence of int token ids, got 'ab'"),
    (lambda t: t.decode([5, 10**6]), r"token id 1000000 \(decode: ids\[1\]\) is outside"),
    (lambda t: t.encode(None), r"encode: text must be a str, got None"),
    (lambda t: t.encode(b"ab"), r"encode: text must be a str, got b'ab'"),
    (lambda t: t.encode("ab", bos="yes"), r"encode: bos must be a bool"),
    (lambda t: t.encode("ab", eos=None), r"encode: eos must be a bool"),
])
def test_tokenizers_refuse_non_int_ids_and_non_text(tok, call, pattern):
  _raises(ValueError, pattern, call, tok)
  assert tok.decode(np.asarray(tok.encode("ab"), np.int32)) == tok.decode(tok.encode("ab"))   # arrays still work


# --- degenerate statistics: detected, warned, round-to-nearest (strict: raised) -----------------------------

def _calib(params, x):
  return lb.calibrate(apply, params, [x])


def _assert_rtn(q, params, calib, spec, names=("a", "b")):
  ref = lb.rtn(params, calib, spec)
  for n in names:
    got, want = np.asarray(lb.dequantize(q)[n]["kernel"]), np.asarray(lb.dequantize(ref)[n]["kernel"])
    np.testing.assert_array_equal(got, want)
    assert np.any(got != 0)


DEGENERATE_ROWS = [   # (algorithm, calibration batch, spec, what the warning says)
    ("gptq", lambda: jnp.zeros((16, 32)), INT4, "activations are all zero"),
    ("gptq", lambda: _x(1e30), INT4, "overflow float32"),
    ("awq", lambda: jnp.ones((16, 32)), INT4, r"\|x\| is constant"),
    ("awq", lambda: jnp.zeros((16, 32)), INT4, "activations are all zero"),
    ("awq", lambda: _x(1e30), INT4, "overflow float32"),
    ("smoothquant", lambda: _x(1e30), lb.W8A8_SPEC, "overflow float32"),
    ("smoothquant", lambda: jnp.zeros((16, 32)), lb.W8A8_SPEC, "activations are all zero"),
]


@pytest.mark.parametrize("name, batch, spec, why", DEGENERATE_ROWS,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(DEGENERATE_ROWS)])
def test_degenerate_statistics_warn_and_fall_back_to_rtn(name, batch, spec, why, model):
  params = model[0]
  calib = _calib(params, batch())
  with pytest.warns(DegenerateStatisticsWarning) as record:
    q = _run(name, params, calib, spec)
  messages = sorted(str(w.message) for w in record)
  assert len(messages) == 2, messages                     # one per weight: both see the degenerate input
  for path, message in zip((A, B), messages):
    assert re.match(path + rf": {name} cannot use this calibration: .*{why}.*round-to-nearest", message), message
  _assert_rtn(q, params, calib, spec)
  _raises(ValueError, A + rf": {name} cannot use this calibration: .*{why}.*strict=True", _run, name, params,
          calib, spec, strict=True)


def test_constant_activations_are_fine_for_gptq(model):
  """GPTQ damps a constant calibration: no warning, and not round-to-nearest. (That a real calibration warns for
  no algorithm is checked by every other test: the warning is an error in the suite's filterwarnings.)"""
  params = model[0]
  calib = _calib(params, jnp.ones((16, 32)))
  with warnings.catch_warnings():
    warnings.simplefilter("error", DegenerateStatisticsWarning)
    q = np.asarray(lb.dequantize(lb.gptq(params, calib, INT4))["a"]["kernel"])
  assert np.any(q != 0) and not np.array_equal(q, np.asarray(lb.dequantize(lb.rtn(params, calib, INT4))["a"]["kernel"]))


def test_gptq_falls_back_per_layer_of_a_scanned_stack():
  """One layer of a stack with an all-zero Hessian: that layer is round-to-nearest (the warning names it), the
  others are GPTQ's as without it."""
  m = ScanModel()
  x = jnp.asarray(np.random.default_rng(stable_seed("test_bad_input", "scan")).normal(size=(4, 8, 5))
                  .astype(np.float32))
  params = random_like(jax.eval_shape(m.init, jax.random.PRNGKey(0), x)["params"], seed=1, scale=0.3)
  scan_apply = lambda p, x: m.apply({"params": p}, x)
  calib = lb.calibrate(scan_apply, params, [x], where=r"layers/up/kernel")
  wc = calib["layers/up/kernel"]
  stats = dataclasses.replace(wc.stats, xtx=wc.stats.xtx.at[1].set(0.0))
  zeroed = dataclasses.replace(calib, weights={wc.path: dataclasses.replace(wc, stats=stats)})
  spec = lb.int_spec(4)
  with pytest.warns(DegenerateStatisticsWarning, match=r"params\['layers'\]\['up'\]\['kernel'\]\[1\]: gptq"):
    q = lb.gptq(params, zeroed, spec)["layers"]["up"]["kernel"]
  ref = lb.gptq(params, calib, spec)["layers"]["up"]["kernel"]
  rtn = lb.rtn(params, calib, spec)["layers"]["up"]["kernel"]
  np.testing.assert_array_equal(np.asarray(q.codes)[[0, 2]], np.asarray(ref.codes)[[0, 2]])
  np.testing.assert_array_equal(np.asarray(q.codes)[1], np.asarray(rtn.codes)[1])
  np.testing.assert_array_equal(np.asarray(q.scale)[1], np.asarray(rtn.scale)[1])
  assert not np.array_equal(np.asarray(ref.codes)[1], np.asarray(rtn.codes)[1])   # the fallback changed layer 1
  assert math.isfinite(float(jnp.sum(lb.dequantize(q))))
