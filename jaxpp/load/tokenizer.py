"""A thin wrapper over the `tokenizers` library, loaded from a checkpoint's tokenizer.json.

Tokenization is delegated entirely to `tokenizers`, so ids match what the model was trained
with; special tokens (BOS and the like) come from tokenizer.json's own post-processor rather
than from hints we would have to re-implement per model family. The wrapper exists to give the
rest of jaxpp a small, stable surface and to turn load failures into one-line `JaxppError`s.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import tokenizers

from jaxpp.errors import JaxppError
from jaxpp.load.chat_template import ChatTemplate, Message

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
  """Text <-> token ids for one model."""

  def __init__(self, tok: tokenizers.Tokenizer, chat_template: ChatTemplate | None = None):
    self._tok = tok
    self.chat_template = chat_template  # the checkpoint's, for conversations (instruct models)

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer.json; a corrupt file is a JaxppError naming it, not a Rust panic."""
    try:
      tok = tokenizers.Tokenizer.from_file(os.fspath(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON / schema.
      reason = " ".join(str(e).split()) or type(e).__name__
      raise JaxppError(f"cannot load tokenizer {os.fspath(path)}: {reason}") from None
    return cls(tok)

  @classmethod
  def from_dir(cls, checkpoint_dir: str | os.PathLike) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None if it ships none (callers then take raw ids)."""
    path = os.path.join(os.fspath(checkpoint_dir), TOKENIZER_FILE)
    if not os.path.isfile(path):
      return None
    tok = cls.from_file(path)
    tok.chat_template = ChatTemplate.from_dir(checkpoint_dir)
    return tok

  @property
  def vocab_size(self) -> int:
    """Size including added special tokens, i.e. one past the largest id encode may return."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    """The id of a token string (e.g. '</s>' for a stop id), or None if unknown."""
    return self._tok.token_to_id(token)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Ids for one text, with the special tokens the post-processor adds (e.g. BOS)."""
    return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True
                   ) -> list[list[int]]:
    """Ids for many texts; `tokenizers` parallelises this in Rust, so prefer it for bulk."""
    return [list(e.ids) for e in self._tok.encode_batch(
        list(texts), add_special_tokens=add_special_tokens)]

  def apply_chat_template(self, messages: Sequence[Message],
                          add_generation_prompt: bool = True) -> list[int]:
    """Ids of one conversation as the checkpoint's chat template lays it out (as
    transformers' `apply_chat_template(..., tokenize=True)`): the rendered text holds its
    own BOS, so none is added."""
    if self.chat_template is None:
      raise JaxppError("the checkpoint has no chat template (tokenizer_config.json "
                       "chat_template or chat_template.jinja): pass plain prompts instead")
    text = self.chat_template.render(messages, add_generation_prompt)
    return self.encode(text, add_special_tokens=False)

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text for ids; accepts any iterable of ints (lists, numpy or jax arrays)."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
