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
  def for_job(cls, llm, config: ml_collections.ConfigDict) -> Prompter:
    """The job's prompter: its template and length policy, `llm`'s tokenizer and context."""
    if llm.tokenizer is None:
      raise JaxppError(f"checkpoint {config.model.checkpoint} has no tokenizer.json; the job "
                       "needs one to read tickets")
    return cls(llm.tokenizer, config.job.prompt_template, policy=config.job.length_policy,
               budget=llm.max_len - config.sampling.max_new_tokens + 1)

  def __call__(self, ticket: jobio.Ticket) -> tuple[list[int] | None, str | None]:
    """(ids, None), or (None, reason) when the policy rejects the ticket.

    Called by `jobio.read_tickets` before the ticket's id is claimed, so a ticket rejected
    here does not block a corrected copy of it further down the input.
    """
    try:
      prompt = self.template.format_map(ticket.doc)
    except (KeyError, IndexError, ValueError) as e:
      return None, f"prompt_template cannot be filled from this ticket ({e!r})"
    ids = self.tok.encode(prompt)
    if len(ids) <= self.budget:
      return ids, None
    if self.policy == "reject":
      return None, (f"prompt of {len(ids)} tokens exceeds the {self.budget} that fit "
                    "engine.max_len with sampling.max_new_tokens (length_policy=reject)")
    return ids[:self.budget - len(self.tail)] + self.tail, None
