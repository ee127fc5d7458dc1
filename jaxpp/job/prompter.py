"""Ticket -> prompt ids: the config's template filled from the ticket, fitted to the context.

A prompt longer than the context allows (engine.max_len less sampling.max_new_tokens) is
cut or rejected as `job.length_policy` says; a cut keeps the template's ending (the
"Summary:" cue), so the model is still asked the question.
"""

from __future__ import annotations

import ml_collections

from jaxpp.errors import JaxppError
from jaxpp.job import files as jobio
from jaxpp.load.tokenizer import Tokenizer

TEMPLATE_SLOT = "{text}"


class Prompter:
  """Ticket -> prompt ids under the length policy (the template's ending always kept)."""

  def __init__(self, tokenizer: Tokenizer, template: str, *, budget: int,
               policy: str = "truncate"):
    """`budget`: prompt positions (the context less the new tokens, plus one: the last new
    token is never fed back)."""
    self.tok, self.template, self.policy, self.budget = tokenizer, template, policy, budget
    tail = self.template.split(TEMPLATE_SLOT)[-1]
    self.tail = self.tok.encode(tail, add_special_tokens=False) if tail else []

  @classmethod
  def for_job(cls, tokenizer: Tokenizer | None, config: ml_collections.ConfigDict) -> Prompter:
    """The job's prompter: its template, length policy and context (engine.max_len)."""
    if tokenizer is None:
      raise JaxppError(f"checkpoint {config.model.checkpoint} has no tokenizer.json; the job "
                       "needs one to read tickets")
    return cls(tokenizer, config.job.prompt_template, policy=config.job.length_policy,
               budget=config.engine.max_len - config.sampling.max_new_tokens + 1)

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
        texts[i] = self.template.format_map(ticket.doc)
      except (KeyError, IndexError, ValueError) as e:
        reasons[i] = f"prompt_template cannot be filled from this ticket ({e!r})"
    for i, ids in zip(texts, self.tok.encode_batch(list(texts.values()))):
      reasons[i] = self._fit(tickets[i], ids)
    return reasons

  def _fit(self, ticket: jobio.Ticket, ids: list[int]) -> str | None:
    """Puts `ids`, cut to the budget as the policy says, on the ticket; or the reason."""
    if len(ids) > self.budget:
      if self.policy == "reject":
        return (f"prompt of {len(ids)} tokens exceeds the {self.budget} that fit "
                "engine.max_len with sampling.max_new_tokens (length_policy=reject)")
      ticket.truncated_tokens = len(ids) - self.budget
      ids = ids[:self.budget - len(self.tail)] + self.tail
    ticket.prompt = ids
    return None
