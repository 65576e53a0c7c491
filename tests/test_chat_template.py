"""Chat templates (lowbit_jax.io.chat): SmolLM2's GGUF template renders as transformers' `apply_chat_template` renders
it (text and ids), and the sandbox, `raise_exception` and input checks behave."""
from __future__ import annotations

import jinja2
import pytest
from transformers import PreTrainedTokenizerFast

from hf_bpe_oracle import hf_tokenizer, tokenizer_metadata
from lowbit_jax.io.chat import ChatTemplate

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name 3 colors.\nThanks!"}],
    [{"role": "user", "content": "<|im_end|> inside a message, and {{ braces }}"},
     {"role": "assistant", "content": "ok"}],
]


@pytest.fixture(scope="module")
def transformers_tokenizer(smollm2_path) -> PreTrainedTokenizerFast:
  """transformers' tokenizer class around the oracle BPE, with the file's template and special tokens."""
  meta = tokenizer_metadata(smollm2_path)
  tokens = meta["tokenizer.ggml.tokens"]
  return PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer(smollm2_path),
                                 chat_template=meta["tokenizer.chat_template"],
                                 bos_token=tokens[meta["tokenizer.ggml.bos_token_id"]],
                                 eos_token=tokens[meta["tokenizer.ggml.eos_token_id"]])


def test_template_is_the_files(smollm2, smollm2_path):
  meta = tokenizer_metadata(smollm2_path)
  assert smollm2.chat_template.source == meta["tokenizer.chat_template"]
  assert (smollm2.chat_template.bos_token, smollm2.chat_template.eos_token) == ("<|im_start|>", "<|im_end|>")


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_as_transformers(smollm2, transformers_tokenizer, messages, add_generation_prompt):
  ours = smollm2.chat_template.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
  theirs = transformers_tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
  assert ours == theirs
  assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
  assert ("You are a helpful AI assistant named SmolLM" in ours) == (messages[0]["role"] != "system")
  ids = transformers_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
  assert smollm2.tokenizer.encode(ours) == list(ids)


def _template(source: str) -> ChatTemplate:
  return ChatTemplate(source=source, bos_token="<s>", eos_token="</s>")


def test_environment_as_transformers():
  """trim_blocks / lstrip_blocks, loop controls, the non-escaping tojson filter, raise_exception, the sandbox."""
  blocks = _template("{% for m in messages %}\n  {% if m['role'] == 'skip' %}{% continue %}{% endif %}\n"
                     "[{{ m['content'] | tojson }}]\n{% endfor %}{{ bos_token }}")
  messages = [{"role": "user", "content": "<a & 'b'>"}, {"role": "skip", "content": "x"}]
  assert blocks.apply_chat_template(messages) == '["<a & \'b\'>"]\n<s>'
  refuse = _template("{{ raise_exception('only user turns: ' + messages[0]['role']) }}")
  with pytest.raises(jinja2.TemplateError, match="only user turns: system"):
    refuse.apply_chat_template([{"role": "system", "content": ""}])
  escape = _template("{{ messages.__class__.__mro__[-1].__subclasses__() }}")
  with pytest.raises(jinja2.exceptions.SecurityError):
    escape.apply_chat_template([])
  with pytest.raises(jinja2.exceptions.SecurityError):  # immutable: no in-place changes of the caller's data
    _template("{{ messages.append(1) }}").apply_chat_template([])
  with pytest.raises(jinja2.TemplateSyntaxError):
    _template("{% for %}")


@pytest.mark.parametrize("messages, match", [
    ("hello", "sequence"), ({"role": "user", "content": "x"}, "sequence"),
    ([{"role": "user"}], r"messages\[0\]"), ([{"role": "user", "content": 3}], r"messages\[0\]"), (["x"], "mapping"),
])
def test_rejects_malformed_messages(messages, match):
  with pytest.raises(ValueError, match=match):
    _template("{{ messages }}").apply_chat_template(messages)
