"""Which prompt tokens a step prefills: cached prefixes skipped, long prompts cut to a token
budget.

A prompt enters the cache in pieces. Its first piece starts after the prefix the prefix cache
already holds (`kv_blocks.Allocation.cached`); with a budget (`prefill_chunk` tokens a step)
a long prompt is prefilled a chunk a step, each chunk attending to the earlier ones, so a
prefill's activations are bounded by the budget and the decode ring runs between chunks
instead of waiting for the whole prompt. Only a prompt's last piece samples its first token.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Piece:
  """Prompt tokens [start, end) of the request in `slot`; `last`: the prompt's final piece."""

  slot: tuple[int, int]
  start: int
  end: int
  last: bool


def plan(pending: list[tuple[tuple[int, int], int, int, bool]], budget: int) -> list[Piece]:
  """This step's pieces for `pending` (slot, prompt length, tokens already cached, whole) in
  admission order, at most `budget` tokens in all (0: no limit). A `whole` prompt (one whose
  first token's penalties count the whole prompt) is never cut: it waits until the budget
  left holds it, or goes first. The first piece always gets at least one token, so every
  step makes progress."""
  out, left = [], budget or None
  for slot, n, done, whole in pending:
    take = n - done
    if left is not None:
      if whole:
        if take > left and out:
          continue
      else:
        take = min(take, left) if out else min(take, max(left, 1))
      if take <= 0:
        break
      left -= take
    out.append(Piece(slot, done, done + take, done + take == n))
  return out
