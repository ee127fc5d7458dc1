"""Stop strings (and a request's own stop ids): where a sequence ends, found on the host.

A stop string can end inside a token or span several (" Summary" + ":"), so it is matched on
the detokenized text, never on ids. At every return to the host each live sequence with stop
strings has its generated text decoded; at the first occurrence it keeps the fewest tokens
whose text contains the string (the last of them completed it), and its text ends just
before the string, which is not part of the output, as in OpenAI's and vLLM's `stop`.
"""

from __future__ import annotations

from typing import Callable, Sequence

Detokenize = Callable[[Sequence[int]], str]


def _first(text: str, stops: Sequence[str]) -> int | None:
  """Where the earliest stop string starts in `text`, or None."""
  found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
  return min(found) if found else None


def find_stop(detokenize: Detokenize, token_ids: Sequence[int], stops: Sequence[str]
              ) -> tuple[int, str] | None:
  """(tokens to keep, text before the stop string), or None when no stop string occurs.

  The tokens kept are the fewest whose text already holds a stop string (a prefix's text
  only grows as tokens are added, so a bisection finds them).
  """
  if not stops or not token_ids or _first(detokenize(token_ids), stops) is None:
    return None
  lo, hi = 1, len(token_ids)  # the shortest prefix holding a stop lies in [lo, hi]
  while lo < hi:
    mid = (lo + hi) // 2
    if _first(detokenize(token_ids[:mid]), stops) is None:
      lo = mid + 1
    else:
      hi = mid
  text = detokenize(token_ids[:lo])
  return lo, text[:_first(text, stops)]


def first_stop_id(token_ids: Sequence[int], stop_ids: Sequence[int]) -> int | None:
  """Tokens to keep when one of a request's `stop_token_ids` was generated (the stop token
  is kept, as the checkpoint's EOS is), or None. The device's stop test knows only the
  checkpoint's EOS ids, which are compiled into the decode program; a request's own ids
  are looked for here, at each return to the host."""
  stops = set(stop_ids)
  return next((i + 1 for i, t in enumerate(token_ids) if t in stops), None)


def stop_of(token_ids: Sequence[int], stop_ids: Sequence[int], stops: Sequence[str],
            detokenize: Detokenize | None) -> tuple[int, str | None] | None:
  """(tokens to keep, text or None) where a request's own stop ids or stop strings end
  its tokens so far, or None."""
  at = first_stop_id(token_ids, stop_ids)
  stop = None if at is None else (at, None)
  if stops:
    stop = find_stop(detokenize, token_ids[:at], stops) or stop
  return stop
