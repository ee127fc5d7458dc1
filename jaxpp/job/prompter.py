"""Ticket -> prompt ids: the config's template filled from the ticket, fitted to the context.

`job.prompt_format` says what the filled template is: the prompt text itself ("text"), or
the user message of a conversation ("chat", after `job.system_prompt` if one is set) laid
out by the checkpoint's chat template, as an instruct model expects (its own BOS, no
second one). A prompt longer than the context allows (engine.max_len less
sampling.max_new_tokens) is cut or rejected as `job.length_policy` says; a cut keeps
everything after the ticket's text (the "Summary:" cue and, in chat, the end of the turn
and the assistant's header), so the model is still asked the question.
"""

from __future__ import annotations

import ml_collections

from jaxpp.errors import JaxppError
from jaxpp.job import files as jobio
from jaxpp.load.tokenizer import Tokenizer

TEMPLATE_SLOT = "{text}"
PROMPT_FORMATS = ("text", "chat")
_SENTINEL = "\x00jaxpp-ticket-text\x00"  # stands for the text when finding what follows it


class Prompter:
  """Ticket -> prompt ids under the length policy (the template's ending always kept)."""

  def __init__(self, tokenizer: Tokenizer, template: str, *, budget: int,
               policy: str = "truncate", prompt_format: str = "text", system_prompt: str = ""):
    """`budget`: prompt positions (the context less the new tokens, plus one: the last new
    token is never fed back)."""
    self.tok, self.template, self.policy, self.budget = tokenizer, template, policy, budget
    if prompt_format not in PROMPT_FORMATS:
      raise JaxppError(f"job.prompt_format={prompt_format!r}; choose one of "
                       f"{', '.join(PROMPT_FORMATS)}")
    if prompt_format == "chat" and tokenizer.chat_template is None:
      raise JaxppError("job.prompt_format='chat' needs a chat template in the checkpoint "
                       "(tokenizer_config.json chat_template or chat_template.jinja)")
    self.chat, self.system = prompt_format == "chat", system_prompt

  def _text(self, doc: dict) -> str:
    """The prompt text of a ticket (KeyError / ValueError when the template cannot be
    filled from it)."""
    user = self.template.format_map(doc)
    if not self.chat:
      return user
    system = [dict(role="system", content=self.system)] if self.system else []
    return self.tok.chat_template.render(system + [dict(role="user", content=user)])

  def _encode(self, texts: list[str]) -> list[list[int]]:
    if not self.chat:
      return self.tok.encode_batch(texts)
    return self.tok.encode_batch(texts, add_special_tokens=False)  # the template's BOS only

  @classmethod
  def for_job(cls, tokenizer: Tokenizer | None, config: ml_collections.ConfigDict,
              max_len: int | None = None) -> Prompter:
    """The job's prompter: its template, length policy and context (`max_len`, default
    engine.max_len)."""
    if tokenizer is None:
      raise JaxppError(f"checkpoint {config.model.checkpoint} has no tokenizer.json; the job "
                       "needs one to read tickets")
    return cls(tokenizer, config.job.prompt_template, policy=config.job.length_policy,
               budget=(max_len or config.engine.max_len) - config.sampling.max_new_tokens + 1,
               prompt_format=config.job.prompt_format, system_prompt=config.job.system_prompt)

  def __call__(self, tickets: list[jobio.Ticket]) -> list[str | None]:
    """Sets each ticket's `prompt` (ids) and `truncated_tokens`; returns per ticket None, or
    the reason the policy rejects it. One parallel `encode_batch` call for all of them.

    Called by `jobio.read_tickets` before the tickets' ids are claimed, so a ticket rejected
    here does not block a corrected copy of it further down the input.
    """
    reasons: list[str | None] = [None] * len(tickets)
    texts = {}
    for i, ticket in enumerate(tickets):
      try:
        texts[i] = self._text(ticket.doc)
      except (KeyError, IndexError, ValueError) as e:
        reasons[i] = f"prompt_template cannot be filled from this ticket ({e!r})"
    for i, ids in zip(texts, self._encode(list(texts.values()))):
      reasons[i] = self._fit(tickets[i], ids)
    return reasons

  def _tail(self, doc: dict) -> list[int]:
    """Ids of what follows the ticket's text in its prompt (kept by a cut)."""
    after = self._text(dict(doc, text=_SENTINEL)).split(_SENTINEL)[-1]
    return self.tok.encode(after, add_special_tokens=False) if after else []

  def _fit(self, ticket: jobio.Ticket, ids: list[int]) -> str | None:
    """Puts `ids`, cut to the budget as the policy says, on the ticket; or the reason."""
    if len(ids) > self.budget:
      if self.policy == "reject":
        return (f"prompt of {len(ids)} tokens exceeds the {self.budget} that fit "
                "engine.max_len with sampling.max_new_tokens (length_policy=reject)")
      ticket.truncated_tokens = len(ids) - self.budget
      tail = self._tail(ticket.doc)
      ids = ids[:self.budget - len(tail)] + tail
    ticket.prompt = ids
    return None
