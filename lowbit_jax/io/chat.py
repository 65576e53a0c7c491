"""A model's chat template (GGUF `tokenizer.chat_template`): Jinja source that turns a conversation into prompt text.

Rendered as transformers' `apply_chat_template(..., tokenize=False)` renders it: a sandboxed Jinja environment
(`jinja2.sandbox.ImmutableSandboxedEnvironment`: templates come with downloaded checkpoints, so they may not touch
Python objects), `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, `raise_exception(message)` and a
`tojson` filter that does not HTML-escape; the variables are `messages`, `add_generation_prompt`, `bos_token`,
`eos_token`, and `tools` / `documents` (None).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox


def _raise_exception(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChatTemplate:
  """Jinja chat-template `source` and the special-token texts it may use. Compiled on construction:
  `jinja2.TemplateSyntaxError` if the source does not parse."""
  source: str = dataclasses.field(repr=False)
  bos_token: str
  eos_token: str
  _template: jinja2.Template = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self) -> None:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    object.__setattr__(self, "_template", env.from_string(self.source))

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
    """The prompt text of `messages` (each a mapping with at least "role" and "content"), ending with the
    assistant's turn header when `add_generation_prompt`. Special tokens appear as text ("<|im_start|>"); the
    tokenizer's `encode` turns them into their ids.

    Raises:
      ValueError: when `messages` is not a sequence of mappings with string "role" and "content".
      jinja2.TemplateError: when the template rejects the conversation (`raise_exception`).
    """
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
      raise ValueError(f"messages must be a sequence of {{'role': ..., 'content': ...}} mappings, got "
                       f"{type(messages).__name__}")
    for i, m in enumerate(messages):
      if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
        raise ValueError(f"messages[{i}] must be a mapping with string 'role' and 'content', got {m!r}")
    return self._template.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                 bos_token=self.bos_token, eos_token=self.eos_token, tools=None, documents=None)
