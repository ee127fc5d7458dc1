"""Conversations -> prompt text, by the checkpoint's own chat template, as transformers does.

Instruct models are trained on conversations laid out by their template (role headers,
end-of-turn tokens, the BOS text); a raw-text prompt gets a different, worse answer. The
template is Jinja, from `chat_template.jinja` or `tokenizer_config.json`'s `chat_template`
(a string, or a list of named templates of which "default" is taken). It is rendered the
way transformers' `apply_chat_template` renders it, so the ids match token for token: a
sandboxed, immutable Jinja environment (templates come with downloaded checkpoints, so
they must not reach Python objects), `trim_blocks` and `lstrip_blocks`, the loop-control
extension, `raise_exception` and `strftime_now`, a `tojson` that keeps non-ASCII text, and
the variables `messages`, `add_generation_prompt`, `tools` (None: tool calls are off) and
the tokenizer's special tokens (`bos_token`, `eos_token`, ...). The rendered text already
holds the BOS its template writes, so it is tokenized with no special tokens added.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox

from jaxpp.errors import JaxppError

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
ROLES = ("system", "user", "assistant", "tool")

Message = dict[str, Any]


def _raise(message: str) -> None:
  raise JaxppError(f"chat template: {message}")


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False
            ) -> str:
  return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


def _environment() -> jinja2.Environment:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise
  env.globals["strftime_now"] = _strftime_now
  return env


def _token_text(value: Any) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


class ChatTemplate:
  """One checkpoint's chat template, compiled once; `render(messages)` gives the prompt."""

  def __init__(self, source: str, special_tokens: dict[str, str] | None = None,
               origin: str = "chat template"):
    self.origin = origin
    self.special_tokens = dict(special_tokens or {})
    try:
      self._template = _environment().from_string(source)
    except jinja2.TemplateError as e:
      raise JaxppError(f"{origin}: not a valid Jinja template ({e})") from None

  @classmethod
  def from_dir(cls, checkpoint_dir: str | os.PathLike) -> ChatTemplate | None:
    """The checkpoint's template, or None if it ships none (a base model)."""
    d = pathlib.Path(checkpoint_dir)
    config: dict[str, Any] = {}
    if (d / CONFIG_FILE).is_file():
      try:
        config = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
      except json.JSONDecodeError as e:
        raise JaxppError(f"{d / CONFIG_FILE}: not valid JSON ({e.msg})") from None
    special = {k: t for k, v in config.items()
               if k.endswith("_token") and (t := _token_text(v)) is not None}
    if (d / TEMPLATE_FILE).is_file():
      return cls((d / TEMPLATE_FILE).read_text(encoding="utf-8"), special,
                 str(d / TEMPLATE_FILE))
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
      named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
      source = named.get("default")
    if source is None:
      return None
    if not isinstance(source, str):
      raise JaxppError(f"{d / CONFIG_FILE}: chat_template must be a string or a list of "
                       "named templates with a 'default'")
    return cls(source, special, f"{d / CONFIG_FILE} chat_template")

  def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The prompt text of one conversation (a list of {"role", "content"} messages)."""
    check_messages(messages)
    try:
      return self._template.render(messages=list(messages),
                                   add_generation_prompt=add_generation_prompt, tools=None,
                                   documents=None, **self.special_tokens)
    except JaxppError:
      raise
    except jinja2.TemplateError as e:
      raise JaxppError(f"{self.origin}: cannot render ({e})") from None


def check_messages(messages: Any) -> None:
  """A conversation is a non-empty list of {"role": one of ROLES, "content": str} dicts."""
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
    raise JaxppError("a conversation is a non-empty list of {'role', 'content'} messages")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("content"), str):
      raise JaxppError(f"message {i}: needs a string 'content'")
    if m.get("role") not in ROLES:
      raise JaxppError(f"message {i}: role {m.get('role')!r} is not one of {', '.join(ROLES)}")
