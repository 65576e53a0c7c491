"""SmolLM2-135M-Instruct end to end: config and weights as in the file, logits equal an independent NumPy forward
(tests/numpy_llama.py), and greedy decoding reproduces the outputs documented in the asset's PROVENANCE.txt, one
prompt at a time and batched (with padding)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.assets import asset_path
from lowbit_jax.eval import generate_greedy, generate_greedy_batch
from lowbit_jax.models.llama import Llama, LlamaConfig, stack_layers
from numpy_llama import read_gguf_llama, forward

CHAT_QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def reference(smollm2_path):
  return read_gguf_llama(smollm2_path)


@pytest.fixture(scope="module")
def documented() -> dict[str, str]:
  """PROVENANCE.txt's documented greedy outputs: {"story": full text from "Once upon a time", "chat": the answer}."""
  text = " ".join(asset_path("smollm2_135m_instruct_q4_1/PROVENANCE.txt").read_text(encoding="utf-8").split())
  story = re.search(r'"Once upon a time" -> "([^"]+)"', text).group(1)
  chat = re.search(rf'chat prompt "{re.escape(CHAT_QUESTION)}" -> "([^"]+)"', text).group(1)
  assert story.startswith("Once upon a time, the city of Nova Haven") and chat.startswith("The capital")
  return {"story": story, "chat": chat}


def test_config_and_weights_as_in_the_file(smollm2, smollm2_float, reference):
  meta = reference.metadata
  assert smollm2.config == LlamaConfig(
      dim=int(meta["llama.embedding_length"]), n_layers=reference.n_layers, n_heads=reference.n_heads,
      n_kv_heads=reference.n_kv_heads, vocab_size=len(meta["tokenizer.ggml.tokens"]),
      hidden_dim=int(meta["llama.feed_forward_length"]), norm_eps=1e-5, rope_theta=reference.rope_base,
      max_seq_len=int(meta["llama.context_length"]), tie_embeddings="output.weight" not in reference.tensors)
  assert (smollm2.config.n_layers, smollm2.config.dim, smollm2.config.vocab_size) == (30, 576, 49152)
  p, t = smollm2_float, reference.tensors
  # The float view of the Q4_1 (linear weights) and Q8_0 (embedding) QArrays equals gguf-py's dequantization, bit
  # for bit in float32.
  np.testing.assert_array_equal(p["layers_7"]["feed_forward"]["w2"]["kernel"], t["blk.7.ffn_down.weight"].T)
  np.testing.assert_array_equal(p["layers_29"]["attention"]["wk"]["kernel"], t["blk.29.attn_k.weight"].T)
  np.testing.assert_array_equal(p["tok_embeddings"]["embedding"], t["token_embd.weight"])


def test_logits_equal_independent_numpy_forward(smollm2, smollm2_float, reference):
  """The chat prompt's first 24 tokens (system turn, specials, words): float32 vs float64, Hugging Face RoPE."""
  ids = smollm2.tokenizer.encode(smollm2.chat_template.apply_chat_template(
      [{"role": "user", "content": CHAT_QUESTION}]))[:24]
  want = forward(reference, ids)  # (24, vocab) float64
  got = np.asarray(jax.jit(Llama(smollm2.config).apply)({"params": smollm2_float}, jnp.asarray([ids]))[0])
  scale = np.abs(want).max()
  assert scale > 10.0
  assert np.abs(got - want).max() <= 1e-4 * scale
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@pytest.fixture(scope="module")
def prompts(smollm2, documented) -> dict[str, tuple[list[int], int]]:
  """name -> (prompt ids, new tokens to generate): the story continues for as many tokens as the documented text
  has after the prompt; the chat answer stops at <|im_end|> (EOS) well within 24 tokens."""
  tok = smollm2.tokenizer
  story = tok.encode("Once upon a time")
  assert tok.encode(documented["story"])[:len(story)] == story
  chat = tok.encode(smollm2.chat_template.apply_chat_template([{"role": "user", "content": CHAT_QUESTION}]))
  return {"story": (story, len(tok.encode(documented["story"])) - len(story)), "chat": (chat, 24)}


@pytest.fixture(scope="module")
def scanned(smollm2, smollm2_float) -> tuple[Llama, dict]:
  """The scanned layout (float view): the same function (tests/test_llama.py), one layer to compile instead of 30."""
  return Llama(smollm2.config, scan_layers=True), stack_layers(smollm2_float, smollm2.config.n_layers)


def _check_documented(tok, documented, story_prompt, story_out, chat_out) -> None:
  assert tok.decode(story_prompt + list(story_out)) == documented["story"]
  assert tok.eos_id in chat_out
  assert tok.decode(chat_out[:list(chat_out).index(tok.eos_id)]) == documented["chat"]


@pytest.fixture(scope="module")
def one_at_a_time(prompts, scanned) -> dict[str, np.ndarray]:
  model, params = scanned
  return {name: generate_greedy(model, params, ids, max_new_tokens=n) for name, (ids, n) in prompts.items()}


def test_greedy_reproduces_documented_outputs(smollm2, documented, prompts, one_at_a_time):
  _check_documented(smollm2.tokenizer, documented, prompts["story"][0], one_at_a_time["story"], one_at_a_time["chat"])


def test_batched_greedy_equals_one_at_a_time(smollm2, documented, prompts, scanned, one_at_a_time):
  """Both prompts in one batch: the 4-token story is left-padded to the chat prompt's length."""
  model, params = scanned
  (story, n_story), (chat, n_chat) = prompts["story"], prompts["chat"]
  assert len(chat) > 8 * len(story)
  story_out, chat_out = generate_greedy_batch(model, params, [story, chat], max_new_tokens=max(n_story, n_chat))
  np.testing.assert_array_equal(story_out[:n_story], one_at_a_time["story"])
  np.testing.assert_array_equal(chat_out[:n_chat], one_at_a_time["chat"])
  _check_documented(smollm2.tokenizer, documented, story, story_out[:n_story], chat_out)
