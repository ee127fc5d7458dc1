"""The token logprobs the engine collects beside the tokens, for requests that ask.

The programs compute them on the last stage from the logits that sampled each token
(`sampling.token_logprobs`) only when some request in flight asks (a static argument), and
then with either no alternatives or MAX_TOP_LOGPROBS of them, so at most three variants of
each program exist; each request keeps the first `Request.logprobs` alternatives.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from jaxpp.model.sampling import MAX_TOP_LOGPROBS

Slot = tuple[int, int]  # (micro-batch, row)


def wanted(logprobs: Iterable[int | None]) -> int | None:
  """The programs' `logprobs` for requests asking these: None when none asks, 0 when none
  wants alternatives, else MAX_TOP_LOGPROBS."""
  asked = [k for k in logprobs if k is not None]
  if not asked:
    return None
  return MAX_TOP_LOGPROBS if max(asked) > 0 else 0


class TokenLogprobs:
  """Per slot: each generated token's logprob and its top alternatives (id, logprob)."""

  def __init__(self):
    self.rows: dict[Slot, tuple[list[float], list[list[tuple[int, float]]]]] = {}

  def add(self, slot: Slot, top: int | None, chosen, ids, lps, n: int = 1) -> None:
    """Appends the first n tokens' values (chosen [n], ids / lps [n, k]) for a slot whose
    request asked for `top` alternatives (None: it did not ask)."""
    if top is None:
      return
    chosen_list, top_list = self.rows.setdefault(slot, ([], []))
    chosen, ids, lps = np.atleast_1d(chosen), np.atleast_2d(ids), np.atleast_2d(lps)
    for i in range(n):
      chosen_list.append(float(chosen[i]))
      top_list.append([(int(t), float(p)) for t, p in zip(ids[i][:top], lps[i][:top])])

  def pop(self, slot: Slot, keep: int):
    """The slot's lists cut to its `keep` kept tokens, or (None, None); forgets the slot."""
    chosen, top = self.rows.pop(slot, (None, None))
    return (None, None) if chosen is None else (chosen[:keep], top[:keep])
