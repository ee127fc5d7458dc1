"""What the engine is asked for and what it gives back: requests, finished sequences, and
the checks that refuse a request before it is queued.

A bad knob inside a compiled program is silent garbage, so every field is checked here,
once, on the host, with a one-line error naming the request.
"""

from __future__ import annotations

import dataclasses

from jaxpp.errors import JaxppError
from jaxpp.model import penalties, sampling

PRIORITIES = ("interactive", "batch")  # admission order


@dataclasses.dataclass
class Request:
  key: str  # unique id of the request
  prompt: list[int]
  max_new_tokens: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  min_p: float = 0.0
  repetition_penalty: float = 1.0  # the penalties as `model/penalties.py` defines them
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  priority: str = "batch"
  stop: tuple[str, ...] = ()  # stop strings (`stop_strings.py`; needs the engine's detokenize)
  stop_token_ids: tuple[int, ...] = ()  # ids that end this request besides the EOS ids
  logprobs: int | None = None  # report each token's logprob and this many alternatives


@dataclasses.dataclass
class Finished:
  request: Request
  token_ids: list[int]
  finish_reason: str  # "stop" (a stop id or stop string) or "length"
  text: str | None = None  # set when a stop string ended it: the text before the string
  # with Request.logprobs: each token's logprob, and its top alternatives as (id, logprob)
  logprobs: list[float] | None = None
  top_logprobs: list[list[tuple[int, float]]] | None = None


def check(request: Request, max_len: int, *, stop_strings: bool) -> None:
  """Refuses a request that could never run in a context of `max_len` (one-line
  JaxppError); `stop_strings` says whether the engine can match stop strings (it has a
  detokenizer)."""
  if request.priority not in PRIORITIES:
    raise JaxppError(f"request {request.key}: unknown priority {request.priority!r}; "
                     f"classes: {', '.join(PRIORITIES)}")
  # every token but the last is fed back, so it needs a cache position
  need = len(request.prompt) + request.max_new_tokens - 1
  if not request.prompt or request.max_new_tokens < 1 or need > max_len:
    raise JaxppError(f"request {request.key}: prompt of {len(request.prompt)} tokens + "
                     f"max_new_tokens={request.max_new_tokens} does not fit max_len="
                     f"{max_len}")
  try:
    sampling.SamplingParams.checked(1, **{f: getattr(request, f)
                                          for f in sampling.SamplingParams._fields})
  except JaxppError as e:
    raise JaxppError(f"request {request.key}: {e}") from None
  if request.stop and not stop_strings:
    raise JaxppError(f"request {request.key}: stop strings need a tokenizer")
  if request.logprobs is not None and not 0 <= request.logprobs <= sampling.MAX_TOP_LOGPROBS:
    raise JaxppError(f"request {request.key}: logprobs={request.logprobs} must be in [0, "
                     f"{sampling.MAX_TOP_LOGPROBS}] (alternatives per token)")


def whole_prompt(request: Request) -> bool:
  """Whether a request's prompt is prefilled whole, in one piece and from no cached prefix:
  its first token's repetition penalty counts every prompt token, which the prefill of a
  piece does not see."""
  return bool(penalties.is_on(request.repetition_penalty, 0.0, 0.0))


def sampling_values(request: Request) -> dict:
  """The request's sampling knobs as its slot's row of the engine's SamplingParams holds
  them (the seed as 32 bits)."""
  return {f: getattr(request, f) & 0xFFFFFFFF if f == "seed" else getattr(request, f)
          for f in sampling.SamplingParams._fields}
