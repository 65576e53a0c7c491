"""export_gguf and `python -m lowbit_jax.export` on the real stories260K (and SmolLM2's tokenizer, without its
weights): exact F32 round trip, llama.cpp's metadata, tensor names, types and shapes, gguf-py's block bytes, QArray
codes written as they are, requantization warnings, the 172-wide fallback, GPTQ beating RTN after export."""
from __future__ import annotations

import functools
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowbit_jax as lb
from lowbit_jax import eval as ev
from lowbit_jax import export as ex
from lowbit_jax.assets import asset_path
from lowbit_jax.eval import kl_divergence, perplexity
from lowbit_jax.io import ggml_blocks
from lowbit_jax.io.bpe import BPETokenizer
from lowbit_jax.io.gguf import load_gguf
from lowbit_jax.io.gguf_export import ExportError, Source, export_gguf
from lowbit_jax.io.gguf_header import read_gguf_header
from lowbit_jax.io.gguf_types import ExportType, Role, Rule, choose_type
from lowbit_jax.io.loaded import LoadedModel, expected_shapes, nest
from lowbit_jax.io.tokenizer import Tokenizer
from lowbit_jax.models.llama import Llama, LlamaConfig, stack_layers

pytestmark = pytest.mark.assets
Q = gguf.GGMLQuantizationType
STORIES = "stories260K_gguf/stories260K.gguf"
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def stories() -> LoadedModel:
  return load_gguf(asset_path(STORIES))


@pytest.fixture(scope="module")
def tokens(stories) -> jax.Array:
  """Two windows of 128 TinyStories validation tokens."""
  text = asset_path("tinystories/tinystories_val_part1.txt").read_text(encoding="utf-8")[:8000]
  return jnp.asarray(ev.token_stream(text, stories.tokenizer, ev.Segmentation.BOS_PER_BLOCK)[:256].reshape(2, 128))


@functools.lru_cache(maxsize=None)
def _forward(config: LlamaConfig):
  """The jitted float model of `config` (one compilation serves every test's logits)."""
  return jax.jit(lambda params, tokens: Llama(config).apply({"params": params}, tokens))


def _logits(model: LoadedModel, tokens: jax.Array, params=None) -> np.ndarray:
  params = lb.dequantize(model.params if params is None else params)
  return np.asarray(_forward(model.config)(jax.tree.map(jnp.asarray, params), tokens))


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _reader(path: Path) -> tuple[dict, dict]:
  reader = gguf.GGUFReader(path)
  return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


# ------------------------------------------------------------------------------------------------ tokenizers

def test_tokenizer_metadata_round_trip_stories(stories):
  tok = stories.tokenizer
  meta = tok.to_gguf_metadata()
  again = Tokenizer.from_gguf_metadata(meta, path="x")
  assert again == tok and again.to_gguf_metadata() == meta
  file_meta, _ = _reader(asset_path(STORIES))
  for key in ("tokens", "scores", "token_type", "bos_token_id", "eos_token_id", "unknown_token_id"):
    assert meta[f"tokenizer.ggml.{key}"] == file_meta[f"tokenizer.ggml.{key}"], key


def test_smollm2_tokenizer_and_template_round_trip_through_a_file(tmp_path, smollm2_path):
  """SmolLM2's BPE tokenizer and chat template, written by export_gguf beside a tiny random model, read back
  equal (the 135M weights are never touched)."""
  metadata = dict(read_gguf_header(smollm2_path).metadata)
  tok = BPETokenizer.from_gguf_metadata(metadata, path=smollm2_path)
  meta = tok.to_gguf_metadata()
  assert BPETokenizer.from_gguf_metadata(meta, path="x") == tok
  for key in ("tokens", "token_type", "merges", "pre", "bos_token_id", "eos_token_id", "unknown_token_id",
              "padding_token_id", "add_bos_token", "add_space_prefix"):
    assert meta[f"tokenizer.ggml.{key}"] == metadata[f"tokenizer.ggml.{key}"], key
  config = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, hidden_dim=64,
                       max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True)
  rng = np.random.default_rng(0)
  params = nest({k: rng.standard_normal(shape, np.float32) for k, shape in expected_shapes(config).items()})
  template = metadata["tokenizer.chat_template"]
  export_gguf(tmp_path / "t.gguf", config, params, tok, tensor_type=ExportType.F16, chat_template=template)
  back = load_gguf(tmp_path / "t.gguf")
  assert back.tokenizer == tok and back.config == config
  assert back.chat_template.source == template


# ------------------------------------------------------------------------------------------------ F32: exact

def test_f32_export_loads_back_exactly(tmp_path, stories, tokens):
  report = export_gguf(tmp_path / "s.gguf", stories.config, stories.params, stories.tokenizer,
                       tensor_type=Q.F32, chat_template=None)
  back = load_gguf(tmp_path / "s.gguf")
  assert back.config == stories.config and back.tokenizer == stories.tokenizer
  got, want = _flat(back.params), _flat(stories.params)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  np.testing.assert_array_equal(_logits(back, tokens), _logits(stories, tokens))
  assert "output.weight" not in {t.name for t in report.tensors}  # tied: llama.cpp uses token_embd
  assert report.bits_per_weight == 32.0 and report.file_size == (tmp_path / "s.gguf").stat().st_size
  # The scanned layout exports the same file.
  scanned = stack_layers(stories.params, stories.config.n_layers)
  export_gguf(tmp_path / "t.gguf", stories.config, scanned, stories.tokenizer, tensor_type=ExportType.F32)
  assert (tmp_path / "t.gguf").read_bytes() == (tmp_path / "s.gguf").read_bytes()


# ------------------------------------------------------------------------------------------------ block types

_KL_BOUND = {Q.Q8_0: 2e-3, Q.Q4_0: 0.2, Q.Q4_1: 0.2}  # measured: 3.5e-4, 0.070, 0.055 (nats per token)


def _gguf_round_trip(x: np.ndarray, kind) -> np.ndarray:
  """What llama.cpp computes with when `x` (numpy GGUF order) is stored as `kind`: gguf-py's reference codecs."""
  if kind == Q.F32:
    return x
  if kind == Q.F16:
    return x.astype(np.float16).astype(np.float32)
  return gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(x), kind), kind)


@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_float_model_quantized_like_llama_cpp(tmp_path, stories, tokens, kind):
  c = stories.config
  report = export_gguf(tmp_path / "s.gguf", c, stories.params, stories.tokenizer, tensor_type=kind, name="s")
  meta, tensors = _reader(tmp_path / "s.gguf")
  file_type = {Q.Q8_0: 7, Q.Q4_0: 2, Q.Q4_1: 3}[kind]
  expected_meta = {
      "general.architecture": "llama", "general.name": "s", "general.file_type": file_type,
      "general.quantization_version": 2, "llama.context_length": 2048, "llama.embedding_length": 64,
      "llama.block_count": 5, "llama.feed_forward_length": 172, "llama.rope.dimension_count": 8,
      "llama.attention.head_count": 8, "llama.attention.head_count_kv": 4, "llama.vocab_size": 512,
      "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.add_bos_token": True}
  assert {k: meta[k] for k in expected_meta} == expected_meta
  assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5, rel=1e-6)
  assert meta["llama.rope.freq_base"] == 10000.0
  # Names, shapes and llama.cpp's types: norms F32, the tied embedding Q8_0 (llama.cpp's Q6_K needs rows of 256),
  # the 172-wide down projections F16 (no 32-block type fits), everything else the file type.
  want = {"token_embd.weight": ([64, 512], Q.Q8_0), "output_norm.weight": ([64], Q.F32)}
  for i in range(c.n_layers):
    want |= {f"blk.{i}.{n}_norm.weight": ([64], Q.F32) for n in ("attn", "ffn")}
    want |= {f"blk.{i}.attn_q.weight": ([64, 64], kind), f"blk.{i}.attn_k.weight": ([64, 32], kind),
             f"blk.{i}.attn_v.weight": ([64, 32], kind), f"blk.{i}.attn_output.weight": ([64, 64], kind),
             f"blk.{i}.ffn_gate.weight": ([64, 172], kind), f"blk.{i}.ffn_up.weight": ([64, 172], kind),
             f"blk.{i}.ffn_down.weight": ([172, 64], Q.F16)}
  assert {n: (t.shape.tolist(), t.tensor_type) for n, t in tensors.items()} == want
  embd = {"token_embd.weight"} if kind != Q.Q8_0 else set()  # Q6_K -> Q8_0 fallback; a Q8_0 file keeps Q8_0
  assert set(report.fallbacks) == embd | {f"blk.{i}.ffn_down.weight" for i in range(5)}
  # Float tensors are gguf-py's own blocks, byte for byte.
  flat = _flat(stories.params)
  for name, path in (("blk.2.attn_q.weight", "layers_2/attention/wq/kernel"), ("token_embd.weight",
                     "tok_embeddings/embedding"), ("blk.4.ffn_up.weight", "layers_4/feed_forward/w3/kernel")):
    x = flat[path].T if path.endswith("kernel") else flat[path]
    ref = gguf.quants.quantize(np.ascontiguousarray(x), tensors[name].tensor_type)
    np.testing.assert_array_equal(np.asarray(tensors[name].data), ref, err_msg=name)
  # The loaded model is exactly the float model seen through gguf-py's codecs of each tensor's type ...
  types = {t.flax_path: t.ggml_type for t in report.tensors}
  back = _flat(lb.dequantize(load_gguf(tmp_path / "s.gguf").params))
  for path, x in flat.items():
    kernel = path.endswith("kernel")
    ref = _gguf_round_trip(x.T if kernel else x, types[path])
    np.testing.assert_array_equal(back[path], ref.T if kernel else ref, err_msg=path)
  # ... so within the format's error of it.
  assert 0 < float(kl_divergence(_logits(stories, tokens), _logits(stories, tokens, nest(back)))) < _KL_BOUND[kind]


# ------------------------------------------------------------------------------------------------ QArrays

@pytest.fixture(scope="module")
def rtn_q4_0(stories):
  return ex.quantize_for(stories, ex.Method.RTN, ExportType.Q4_0, None)


def test_qarray_codes_written_as_they_are(tmp_path, stories, tokens, rtn_q4_0):
  report = export_gguf(tmp_path / "q.gguf", stories.config, rtn_q4_0, stories.tokenizer,
                       tensor_type=ExportType.Q4_0)
  _, tensors = _reader(tmp_path / "q.gguf")
  flat, back = _flat(rtn_q4_0), _flat(load_gguf(tmp_path / "q.gguf").params)
  q = flat["layers_1/attention/wv/kernel"]
  kind, raw = ggml_blocks.from_qarray(q)
  assert kind == Q.Q4_0
  np.testing.assert_array_equal(np.asarray(tensors["blk.1.attn_v.weight"].data), raw)
  for path, leaf in flat.items():
    if isinstance(leaf, lb.QArray) and "w2" not in path:  # every mapped projection decodes to the same values
      loaded = back[path]
      loaded = loaded.dequantize() if isinstance(loaded, lb.QArray) else loaded
      np.testing.assert_array_equal(np.asarray(loaded), np.asarray(leaf.dequantize()), err_msg=path)
  sources = {t.name.split(".")[-2]: t.source for t in report.tensors if t.name.startswith("blk.0.")}
  assert sources["attn_q"] is Source.BLOCKS and sources["ffn_down"] is Source.DEQUANTIZED
  assert report.requantized == ()
  # The loaded model is the in-memory quantized model with llama.cpp's Q8_0 embedding, up to the float16 rounding
  # of the fallen-back w2.
  flat["tok_embeddings/embedding"] = _gguf_round_trip(flat["tok_embeddings/embedding"], Q.Q8_0)
  ref = _logits(stories, tokens, nest(flat))
  assert np.abs(_logits(load_gguf(tmp_path / "q.gguf"), tokens) - ref).max() / ref.std() < 1e-3


@pytest.mark.parametrize("kind, spec", [(Q.Q4_1, lb.q4_1_spec()),
                                        (Q.Q8_0, ex.SPECS[ExportType.Q8_0])])
def test_qarray_maps_onto_q4_1_and_q8_0(tmp_path, stories, kind, spec):
  flat = _flat(stories.params)
  flat["layers_0/attention/wq/kernel"] = q = lb.quantize(flat["layers_0/attention/wq/kernel"], spec)
  report = export_gguf(tmp_path / "q.gguf", stories.config, nest(flat), stories.tokenizer, tensor_type=kind)
  _, tensors = _reader(tmp_path / "q.gguf")
  np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_q.weight"].data),
                                ggml_blocks.from_qarray(q)[1])
  assert next(t for t in report.tensors if t.name == "blk.0.attn_q.weight").source is Source.BLOCKS


def test_non_mapping_qarray_warns_and_requantizes(tmp_path, stories):
  flat = _flat(stories.params)
  flat["layers_3/feed_forward/w1/kernel"] = q = lb.quantize(flat["layers_3/feed_forward/w1/kernel"],
                                                            lb.int_spec(4, group_size=64))
  with pytest.warns(UserWarning, match=r"blk\.3\.ffn_gate\.weight.*maps onto no ggml block type"):
    report = export_gguf(tmp_path / "q.gguf", stories.config, nest(flat), stories.tokenizer,
                         tensor_type=ExportType.Q4_0)
  assert report.requantized == ("blk.3.ffn_gate.weight",)
  _, tensors = _reader(tmp_path / "q.gguf")
  ref = gguf.quants.quantize(np.ascontiguousarray(np.asarray(q.dequantize()).T), Q.Q4_0)
  np.testing.assert_array_equal(np.asarray(tensors["blk.3.ffn_gate.weight"].data), ref)


def test_gptq_beats_rtn_after_export(tmp_path, stories, rtn_q4_0):
  """GPTQ w4 g32 and RTN in Q4_0's layout, each exported and read back: GPTQ's codes reach the file."""
  text = asset_path("tinystories/tinystories_train_first2MiB.txt").read_text(encoding="utf-8")[:200_000]
  stream = ev.token_stream(text, stories.tokenizer, ev.Segmentation.BOS_PER_BLOCK)
  batches = ex.calibration_batches(stream, ex.Calib(windows=8, length=256))
  gptq = ex.quantize_for(stories, ex.Method.GPTQ, ExportType.Q4_0, batches)
  val = asset_path("tinystories/tinystories_val_part1.txt").read_text(encoding="utf-8")[:60_000]
  tokens = ev.token_stream(val, stories.tokenizer, ev.Segmentation.BOS_PER_BLOCK)[:16 * 256]
  apply = _forward(stories.config)
  ppl = {}
  for label, params in (("rtn", rtn_q4_0), ("gptq", gptq)):
    report = export_gguf(tmp_path / f"{label}.gguf", stories.config, params, stories.tokenizer,
                         tensor_type=ExportType.Q4_0)
    assert report.requantized == ()
    loaded = lb.dequantize(load_gguf(tmp_path / f"{label}.gguf").params)
    ppl[label] = perplexity(apply, loaded, tokens, seq_len=256, batch_size=8, progress=False).ppl
  assert ppl["gptq"] < ppl["rtn"], ppl


# ------------------------------------------------------------------------------------------------ type rules

@pytest.mark.parametrize("role, ne0, export, tied, want, rule", [
    (Role.NORM, 576, ExportType.Q4_0, True, Q.F32, Rule.ONE_D),
    (Role.LINEAR, 576, ExportType.F16, True, Q.F16, Rule.FILE_TYPE),
    (Role.TOKEN_EMBD, 64, ExportType.BF16, True, Q.BF16, Rule.FILE_TYPE),
    (Role.LINEAR, 576, ExportType.Q4_1, True, Q.Q4_1, Rule.FILE_TYPE),
    (Role.TOKEN_EMBD, 576, ExportType.Q4_1, False, Q.Q4_1, Rule.FILE_TYPE),          # untied: the file type
    (Role.TOKEN_EMBD, 512, ExportType.Q4_0, True, Q.Q6_K, Rule.CLASSIFIER),          # tied: Q6_K
    (Role.OUTPUT, 4096, ExportType.Q4_0, False, Q.Q6_K, Rule.CLASSIFIER),
    (Role.OUTPUT, 4096, ExportType.Q8_0, False, Q.Q8_0, Rule.FILE_TYPE),
    (Role.TOKEN_EMBD, 576, ExportType.Q4_0, True, Q.Q8_0, Rule.SHAPE_FALLBACK),      # SmolLM2: Q6_K -> Q8_0
    (Role.OUTPUT, 100, ExportType.Q4_0, False, Q.F16, Rule.SHAPE_FALLBACK),          # Q8_0, then no block fits
    (Role.LINEAR, 172, ExportType.Q4_0, True, Q.F16, Rule.SHAPE_FALLBACK),           # no 32-block type fits
    (Role.LINEAR, 576, ExportType.Q6_K, True, Q.Q8_0, Rule.SHAPE_FALLBACK),
    (Role.LINEAR, 1536, ExportType.Q6_K, True, Q.Q6_K, Rule.FILE_TYPE),
    (Role.LINEAR, 576, ExportType.TQ2_0, True, Q.Q4_0, Rule.SHAPE_FALLBACK),
    (Role.TOKEN_EMBD, 4096, ExportType.TQ1_0, False, Q.Q6_K, Rule.EMBEDDING),        # llama.cpp: Q4_K
])
def test_llama_cpp_type_rules(role, ne0, export, tied, want, rule):
  choice = choose_type(role, ne0, export, tied=tied)
  assert (choice.ggml_type, choice.rule) == (want, rule)


# ------------------------------------------------------------------------------------------------ validation

def test_invalid_inputs_raise_before_writing(tmp_path, stories):
  out = tmp_path / "bad.gguf"
  flat = _flat(stories.params)
  bad = dict(flat, **{"layers_2/attention/wk/kernel": flat["layers_2/attention/wk/kernel"][:, :16]})
  with pytest.raises(ExportError, match=r"layers_2/attention/wk/kernel has shape \(64, 16\)"):
    export_gguf(out, stories.config, nest(bad), stories.tokenizer, tensor_type=ExportType.Q4_0)
  with pytest.raises(ExportError, match=r"missing \['norm/scale'\]"):
    export_gguf(out, stories.config, nest({k: v for k, v in flat.items() if k != "norm/scale"}),
                stories.tokenizer, tensor_type=ExportType.Q4_0)
  nan = dict(flat, **{"norm/scale": np.full(64, np.nan, np.float32)})
  with pytest.raises(ExportError, match="norm/scale has NaN"):
    export_gguf(out, stories.config, nest(nan), stories.tokenizer, tensor_type=ExportType.Q4_0)
  t = stories.tokenizer
  longer = Tokenizer(t.pieces + ("zzz",), t.scores + (0.0,), t.bos_id, t.eos_id, t.unk_id)
  with pytest.raises(ExportError, match="513 tokens but config.vocab_size is 512"):
    export_gguf(out, stories.config, stories.params, longer, tensor_type=ExportType.F32)
  with pytest.raises(ExportError, match="Q5_K.*not supported"):
    export_gguf(out, stories.config, stories.params, stories.tokenizer, tensor_type=Q.Q5_K)
  assert not out.exists() and list(tmp_path.iterdir()) == []


def test_command_line(tmp_path, capsys):
  ex.main(["--model", "stories260k", "--method", "rtn", "--type", "F16", "--out", str(tmp_path / "s.gguf")])
  printed = capsys.readouterr().out
  assert "F16" in printed and "fallbacks: none" in printed and (tmp_path / "s.gguf").is_file()
  with pytest.raises(SystemExit):
    ex.main(["--model", "stories260k", "--method", "gptq", "--type", "F16", "--out", str(tmp_path / "t.gguf")])
  assert "needs --type one of" in capsys.readouterr().err
