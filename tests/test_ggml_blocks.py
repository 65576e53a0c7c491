"""ggml block codecs (`lowbit_jax.io.ggml_blocks`): byte-identical to gguf-py's quantizer and bit-identical decoding
(seeded edge cases and real SmolLM2 weights), Q6_K (which gguf-py only decodes) against its error bound, the QArray
mapping both ways, and the real SmolLM2 file imported as packed QArrays."""
from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax.io import ggml_blocks as gb
from lowbit_jax.io import ggml_kquants as kq
from lowbit_jax.io.gguf import _GLOBAL_TENSORS, _LAYER_TENSORS
from lowbit_jax.models.llama import Llama, stack_layers

Q = gguf.GGMLQuantizationType
GGUF_PY = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.TQ1_0, Q.TQ2_0, Q.BF16)   # the types gguf-py can quantize
F16 = jnp.float16
MAPPED = {  # block type -> the spec its QArray has, at contraction axis a
    Q.Q8_0: lambda a: lb.int_spec(8, group_size=32, axis=a, scale_dtype=F16, grid=lb.SymGrid.RESTRICTED),
    Q.Q4_0: lambda a: lb.int_spec(4, group_size=32, axis=a, scale_dtype=F16, grid=lb.SymGrid.SIGNED_MAX),
    Q.Q4_1: lambda a: lb.q4_1_spec(axis=a),
    Q.TQ2_0: lambda a: lb.QuantSpec(format=lb.Format.TERNARY, granularity=lb.PerGroup(size=256, axis=a),
                                    scale_dtype=F16),
}


def _bits(a) -> np.ndarray:
  return np.asarray(a, np.float32).view(np.uint32)


def _gguf_bytes(x: np.ndarray, kind: Q) -> np.ndarray:
  """gguf-py's raw blocks, as uint8 (..., bytes per row)."""
  return np.asarray(gguf.quants.quantize(x, kind)).view(np.uint8).reshape(gb.byte_shape(x.shape, kind))


def _hard(seed: int = 0) -> np.ndarray:
  """(64, 512) float32: normal rows plus the edge cases of the block rules."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((64, 512)).astype(np.float32)
  x[0, :256] = 0                                           # all-zero blocks (d = 0, id = 0)
  x[1, 3], x[1, 7], x[1, 34], x[1, 41] = 2.0, -2.0, -2.0, 2.0   # +-max ties: the first one sets the sign
  x[2, :32] = (np.arange(32) - 16) * np.float32(0.5)       # Q4_0 d = 1: every x * id + 8.5 is a half-way value
  x[2, 32:64] = np.arange(32) * np.float32(0.25)           # Q4_1 on exact halves of its step
  x[3] *= np.float32(1e-9)                                 # f16 scales underflow to 0
  x[4] *= np.float32(1e-6)                                 # f16 scales subnormal
  x[5] *= np.float32(1e4)                                  # large values
  x[6, :256] = np.float32(0.37)                            # constant blocks (Q4_1 span 0)
  x[7] = rng.laplace(size=512).astype(np.float32)          # heavy tails
  return x


@pytest.fixture(scope="module")
def real(smollm2_float) -> dict[str, np.ndarray]:
  """A few real SmolLM2 weights (Q4_1 / Q8_0 decoded) in GGUF numpy order (out, in), as rows of 256."""
  p = smollm2_float
  mats = {"blk.0.attn_q": np.asarray(p["layers_0"]["attention"]["wq"]["kernel"]).T,
          "blk.17.ffn_down": np.asarray(p["layers_17"]["feed_forward"]["w2"]["kernel"]).T,
          "token_embd[:2048]": np.asarray(p["tok_embeddings"]["embedding"][:2048])}
  return {k: np.ascontiguousarray(v).reshape(-1, 256) for k, v in mats.items()}


# --- the codecs ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", GGUF_PY, ids=lambda k: k.name)
def test_quantize_and_decode_identical_to_gguf_py(kind, real):
  for name, x in {"hard": _hard(), **real}.items():
    raw = gb.quantize(x, kind)
    np.testing.assert_array_equal(raw, _gguf_bytes(x, kind), err_msg=name)
    np.testing.assert_array_equal(_bits(gb.dequantize(raw, kind, x.shape)),
                                  _bits(gguf.quants.dequantize(raw, kind)), err_msg=name)


def _q6_k_steps(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per value, float32 of shape (n_blocks, 256): the sub-block step d * scales[j] and the super-block scale d."""
  blocks = raw.reshape(-1, kq.Q6_K_BYTES)
  d = blocks[:, 208:].copy().view("<f2").astype(np.float32)                    # (n, 1)
  step = np.repeat(d * blocks[:, 192:208].view(np.int8).astype(np.float32), kq.SUB, axis=1)
  return step, np.broadcast_to(d, step.shape)


def test_q6_k_decodes_like_gguf_py_within_its_bound(real):
  for name, x in {"hard": _hard(), **real}.items():
    raw = gb.quantize(x, Q.Q6_K)
    got = gb.dequantize(raw, Q.Q6_K, x.shape)
    np.testing.assert_array_equal(_bits(got), _bits(gguf.quants.dequantize(raw, Q.Q6_K)), err_msg=name)
    # Half a step inside the code range d_j * [-32, 31], the distance to it outside; that distance is below
    # 2 |d_j| + 19 |d| (ggml_kquants' docstring).
    step, d = (a.reshape(x.shape) for a in _q6_k_steps(raw))
    limit = np.where(np.sign(x) == np.sign(step), 31, 32) * np.abs(step)
    clip = np.where(step != 0, np.maximum(np.abs(x) - limit, 0), 0)   # d_j == 0 (d underflows): decodes to 0
    slack = 1 + 2.0 ** -20
    inside = np.where(step != 0, np.abs(step) / 2 + clip, np.abs(x)) * slack
    assert np.all(np.abs(got - x) <= inside), name
    assert np.all(clip <= (2 * np.abs(step) + 19 * np.abs(d)) * slack), name
    # Below Q4_0's error by far (6.56 vs 4.5 bits per weight).
    q4 = gb.dequantize(gb.quantize(x, Q.Q4_0), Q.Q4_0, x.shape)
    assert np.sqrt(np.mean((got - x) ** 2)) < 0.3 * np.sqrt(np.mean((q4 - x) ** 2)), name


def test_q6_k_reconstructs_its_own_grid_exactly():
  """Values s * l with l in [-32, 31] and -32 in every sub-block, s a power of two: every candidate search and the
  int8 scale requantization land on s exactly, so the blocks decode to x bit for bit; all-zero blocks are zero
  bytes (the reference's memset)."""
  rng = np.random.default_rng(3)
  levels = rng.integers(-32, 32, (8, 256)).astype(np.float32)
  levels[:, ::16] = -32
  x = levels * np.float32(2.0 ** -6)
  np.testing.assert_array_equal(gb.dequantize(gb.quantize(x, Q.Q6_K), Q.Q6_K, x.shape), x)
  assert not gb.quantize(np.zeros((2, 512), np.float32), Q.Q6_K).any()


def test_rejects_partial_blocks_and_wrong_sizes():
  with pytest.raises(ValueError, match="not whole blocks of 32"):
    gb.quantize(np.zeros((2, 48), np.float32), Q.Q4_0)
  with pytest.raises(ValueError, match="expected 36"):
    gb.dequantize(np.zeros(35, np.uint8), Q.Q4_0, (1, 64))
  with pytest.raises(ValueError, match="Q5_0 is not supported"):
    gb.quantize(np.zeros((2, 64), np.float32), Q.Q5_0)


# --- the QArray mapping -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("kind", list(MAPPED), ids=lambda k: k.name)
def test_to_qarray_decodes_bit_identically_and_round_trips(kind, transpose):
  x = _hard(1)
  raw = gb.quantize(x, kind)
  q = gb.to_qarray(raw, kind, x.shape, transpose=transpose)
  want = gb.dequantize(raw, kind, x.shape)
  want = want.T if transpose else want
  assert q.spec == MAPPED[kind](-2 if transpose else -1) and q.shape == want.shape and q.dtype == np.float32
  assert q.nbytes == raw.nbytes
  assert all(isinstance(a, np.ndarray) and a.flags.c_contiguous and a.flags.owndata for a in jax.tree.leaves(q))
  np.testing.assert_array_equal(_bits(q.dequantize()), _bits(want))             # op by op
  np.testing.assert_array_equal(_bits(lb.dequantize(q)), _bits(want))           # compiled (may fuse into FMAs)
  back_kind, back = gb.from_qarray(q)
  assert back_kind == kind
  np.testing.assert_array_equal(back, raw)


def test_to_qarray_is_none_for_types_without_a_qarray():
  x = _hard(2)
  for kind in (Q.TQ1_0, Q.Q6_K, Q.BF16, Q.F16, Q.F32):
    assert gb.to_qarray(gb.quantize(x, kind), kind, x.shape, transpose=True) is None


@pytest.mark.parametrize("spec, kind", [
    (lb.int_spec(4, group_size=32, scale_dtype=F16), Q.Q4_0),
    (lb.int_spec(4, group_size=32, scale_dtype=F16, grid=lb.SymGrid.FULL), Q.Q4_0),
    (lb.q4_1_spec(), Q.Q4_1),
    (lb.int_spec(8, group_size=32, scale_dtype=F16, grid=lb.SymGrid.SIGNED_MAX), Q.Q8_0),
], ids=["q4_0", "q4_0-full-grid", "q4_1", "q8_0-signed-max"])
def test_from_qarray_of_our_quantization_decodes_in_gguf_py_as_ours(spec, kind):
  """What a GGUF writer does with a quantized Flax kernel (in, out): gguf-py decodes its blocks to exactly the
  QArray's values."""
  w = _hard(3).T                                                               # (in 512, out 64)
  q = jax.jit(lb.quantize, static_argnums=1)(w, spec)
  got_kind, raw = gb.from_qarray(q)
  assert got_kind == kind and raw.shape == (64, gb.byte_shape((512,), kind)[0])
  np.testing.assert_array_equal(_bits(gguf.quants.dequantize(raw, kind).T), _bits(q.dequantize()))


def test_from_qarray_is_none_when_nothing_maps():
  """Q4_0's codes and scales under specs and layouts that store or decode them otherwise."""
  x = _hard(4)
  q = gb.to_qarray(gb.quantize(x, Q.Q4_0), Q.Q4_0, x.shape, transpose=True)   # (in 512, out 64), 16 groups
  codes, scale = q.codes, q.scale

  def make(spec, scale=scale, zero=None, k=512, **kw):
    return lb.QArray(codes, scale, zero, spec=spec, k=k, dtype=np.float32, **kw)

  f32 = scale.astype(np.float32)
  unmapped = {
      "float32 scales": make(lb.int_spec(4, group_size=32), f32),
      "groups of 64": make(lb.int_spec(4, group_size=64, scale_dtype=F16), scale[::2]),
      "integer zero points": make(lb.int_spec(4, group_size=32, symmetric=False, scale_dtype=F16),
                                  zero=np.full(scale.shape, 8, np.uint8)),
      "nf4": make(lb.QuantSpec(format=lb.Format.NF4, granularity=lb.PerGroup(size=32), scale_dtype=F16)),
      "padding": make(q.spec, k=496),
      "in_scale": make(q.spec, in_scale=np.ones((512, 1), np.float32)),
      "permuted": make(q.spec, perm=(1, 0)),
  }
  assert gb.from_qarray(make(q.spec)) is not None
  assert {name: gb.from_qarray(u) for name, u in unmapped.items()} == dict.fromkeys(unmapped)


# --- the real SmolLM2 file ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reader(smollm2_path) -> gguf.GGUFReader:
  return gguf.GGUFReader(smollm2_path)


def _leaf(params: dict, name: str):
  """The param leaf of a GGUF tensor name ('blk.3.attn_q.weight' or a global one), and whether it is transposed."""
  if name.startswith("blk."):
    _, i, rest = name.split(".", 2)
    path, transposed = f"layers_{i}/{_LAYER_TENSORS[rest][0]}", _LAYER_TENSORS[rest][1]
  else:
    path, transposed = _GLOBAL_TENSORS[name]
  node = params
  for key in path.split("/"):
    node = node[key]
  return node, transposed


def test_smollm2_imports_packed_with_the_files_bytes(smollm2, reader):
  kinds = {}
  for t in reader.tensors:
    leaf, transposed = _leaf(smollm2.params, t.name)
    kinds[t.tensor_type] = kinds.get(t.tensor_type, 0) + 1
    if t.tensor_type == Q.F32:
      assert isinstance(leaf, np.ndarray) and leaf.dtype == np.float32
      continue
    assert isinstance(leaf, lb.QArray), t.name
    assert leaf.spec == MAPPED[t.tensor_type](-2 if transposed else -1), t.name
    assert leaf.nbytes == t.n_bytes, t.name
  assert kinds == {Q.Q4_1: 210, Q.Q8_0: 1, Q.F32: 61}
  report = lb.memory_report(smollm2.params)
  assert report.total_bytes == sum(int(t.n_bytes) for t in reader.tensors) == 96_576_768


def test_smollm2_float_view_is_gguf_py_bit_for_bit(smollm2_float, reader):
  for t in reader.tensors:
    leaf, transposed = _leaf(smollm2_float, t.name)
    want = gguf.quants.dequantize(t.data, t.tensor_type)
    np.testing.assert_array_equal(_bits(leaf), _bits(want.T if transposed else want), err_msg=t.name)


def test_smollm2_packed_logits_equal_float_view(smollm2, smollm2_float):
  """`lb.quantized` runs the unmodified (scanned) model on the Q4_1 / Q8_0 QArrays: every weight stays packed, the
  embedding is looked up packed and used packed as the tied classifier."""
  model = Llama(smollm2.config, scan_layers=True)

  def apply(p, t):
    return model.apply({"params": p}, t)

  ids = jnp.asarray([smollm2.tokenizer.encode("Once upon a time, in a small village")])
  packed = stack_layers(smollm2.params, smollm2.config.n_layers)
  run = lb.quantized(apply)
  got = np.asarray(jax.jit(run)(packed, ids))
  want = np.asarray(jax.jit(apply)(stack_layers(smollm2_float, smollm2.config.n_layers), ids))
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
  report = run.report(packed, ids)
  assert len(report.weights) == 8 and not report.dequantized and all(w.packed for w in report.weights)
