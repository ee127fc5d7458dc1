"""The job on OpenAI Batch API files: the offline format vLLM's `run-batch` and SGLang read.

`job.format = "openai_batch"`: each input line is one request,

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [...], "max_tokens": 64, ...}}

(or `"url": "/v1/completions"` with a string `"prompt"`), and each output line is the
response as OpenAI's batch output lays it out, `{"id", "custom_id", "response":
{"status_code", "request_id", "body": {..., "choices", "usage"}}, "error": null}`, plus
the input `line` (and `truncated_tokens`) the job's resume uses. A line that cannot be
served becomes an errors-file line in the same form, `"response": null, "error": {"code",
"message"}`. `custom_id` is the key that resume and the duplicate check use, as `id` is for
tickets. `logprobs` (chat: with `top_logprobs` up to 20; completions: up to 5 alternatives)
fill each choice's `logprobs` in OpenAI's form, computed on the devices from the logits that
sampled each token; a token's `token` is its own decoded text. Body fields the job cannot
honour (tools, ...) are an error line naming the field, never silently ignored;
`presence_penalty` and `frequency_penalty` are OpenAI's, `repetition_penalty` vLLM's
extension of the same bodies (`model/penalties.py`). `n` > 1
gives n choices, sample k seeded from (the request's seed, k) as `jaxpp.LLM.generate` seeds
them; the line is written once all n are done.
The body's knobs override the config's `sampling` section for that request; `model` is
echoed back, not checked.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from jaxpp.errors import JaxppError
from jaxpp.job import files as jobio
from jaxpp.load.chat_template import check_messages
from jaxpp.load.tokenizer import Tokenizer

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n",
          "presence_penalty", "frequency_penalty", "repetition_penalty"}
PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty")
FIELDS = {CHAT: COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"},
          COMPLETIONS: COMMON | {"prompt", "logprobs"}}
MAX_STOPS = 4  # OpenAI's limit on `stop`
MAX_TOP = {CHAT: 20, COMPLETIONS: 5}  # OpenAI's limits on alternatives per token
MAX_N = 16  # choices per request


def _number(body: dict, name: str, low: float, high: float) -> str | None:
  v = body.get(name)
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
    return f'body "{name}" must be a number in [{low}, {high}]'
  return None


def check_line(obj: Any) -> tuple[Any, str | None]:
  """(custom_id or None, reason or None) for one parsed input line."""
  if not isinstance(obj, dict):
    return None, "not a JSON object"
  cid = obj.get("custom_id")
  if not isinstance(cid, str) or not cid:
    return None, 'missing or empty "custom_id" (a string)'
  if obj.get("method") != "POST":
    return cid, f'"method" must be "POST", got {obj.get("method")!r}'
  url, body = obj.get("url"), obj.get("body")
  if url not in FIELDS:
    return cid, f'"url" must be {CHAT} or {COMPLETIONS}, got {url!r}'
  if not isinstance(body, dict):
    return cid, '"body" must be a JSON object'
  unknown = sorted(set(body) - FIELDS[url])
  if unknown:
    return cid, f'unsupported body field "{unknown[0]}"'
  if url == CHAT:
    try:
      check_messages(body.get("messages"))
    except JaxppError as e:
      return cid, f'body "messages": {e}'
  elif not isinstance(body.get("prompt"), str) or not body["prompt"]:
    return cid, 'body "prompt" must be a non-empty string'
  for name in ("max_tokens", "max_completion_tokens"):
    v = body.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
      return cid, f'body "{name}" must be an integer >= 1'
  n = body.get("n", 1)
  if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
    return cid, f'body "n" must be an integer in [1, {MAX_N}]'
  problem = _logprobs_problem(url, body)
  if problem:
    return cid, problem
  if "seed" in body and (isinstance(body["seed"], bool) or not isinstance(body["seed"], int)):
    return cid, 'body "seed" must be an integer'
  stop = body.get("stop")
  stops = [stop] if isinstance(stop, str) else stop
  if stop is not None and (not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(
      isinstance(s, str) and s for s in stops)):
    return cid, f'body "stop" must be a string or up to {MAX_STOPS} non-empty strings'
  rep = body.get("repetition_penalty")
  if rep is not None and (isinstance(rep, bool) or not isinstance(rep, (int, float))
                          or not 0 < rep < float("inf")):
    return cid, 'body "repetition_penalty" must be a finite number > 0'
  return cid, (_number(body, "temperature", 0, 2) or _number(body, "top_p", 1e-9, 1)
               or _number(body, "presence_penalty", -2, 2)
               or _number(body, "frequency_penalty", -2, 2))


def _logprobs_problem(url: str, body: dict) -> str | None:
  lp, top = body.get("logprobs"), body.get("top_logprobs")
  if url == CHAT:
    if lp is not None and not isinstance(lp, bool):
      return 'body "logprobs" must be true or false'
    if top is not None:
      if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP[CHAT]:
        return f'body "top_logprobs" must be an integer in [0, {MAX_TOP[CHAT]}]'
      if not lp:
        return 'body "top_logprobs" needs "logprobs": true'
  elif lp is not None and (isinstance(lp, bool) or not isinstance(lp, int)
                           or not 0 <= lp <= MAX_TOP[COMPLETIONS]):
    return f'body "logprobs" must be an integer in [0, {MAX_TOP[COMPLETIONS]}] or null'
  return None


def asked_logprobs(doc: dict) -> int | None:
  """Alternatives a valid request asks for per token, or None when it asks no logprobs."""
  body = doc["body"]
  if doc["url"] == CHAT:
    return (body.get("top_logprobs") or 0) if body.get("logprobs") else None
  return body.get("logprobs")


def logprobs_object(url: str, pieces: list[str], chosen: list[float],
                    top: list[list[tuple[str, float]]]) -> dict:
  """A choice's `logprobs` in OpenAI's form: chat `{"content": [...], "refusal": null}`,
  completions `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`. `pieces` are
  the tokens' texts (each decoded alone, so with some tokenizers their spaces differ from
  the text's), `top` each token's alternatives as (text, logprob)."""
  utf8 = lambda s: list(s.encode("utf-8"))
  if url == CHAT:
    return dict(content=[dict(token=p, logprob=c, bytes=utf8(p), top_logprobs=[
        dict(token=t, logprob=lp, bytes=utf8(t)) for t, lp in alts])
        for p, c, alts in zip(pieces, chosen, top)], refusal=None)
  offsets = [0, *itertools.accumulate(map(len, pieces))][:len(pieces)]
  return dict(tokens=pieces, token_logprobs=chosen,
              top_logprobs=[dict(alts) for alts in top], text_offset=offsets)


class BatchPrompter:
  """`read_tickets`' prepare for OpenAI requests: prompt ids (chat through the checkpoint's
  template) and the request's knobs, under the job's length policy and context."""

  def __init__(self, tokenizer: Tokenizer, *, max_len: int, default_new_tokens: int,
               policy: str):
    self.tok, self.max_len, self.default_new, self.policy = (tokenizer, max_len,
                                                              default_new_tokens, policy)

  def __call__(self, tickets: list[jobio.Ticket]) -> list[str | None]:
    return [self._prepare(t) for t in tickets]

  def _prepare(self, ticket: jobio.Ticket) -> str | None:
    body = ticket.doc["body"]
    new = body.get("max_completion_tokens") or body.get("max_tokens") or self.default_new
    if new >= self.max_len:
      return f"max_tokens={new} leaves no room for a prompt in engine.max_len={self.max_len}"
    if ticket.doc["url"] == CHAT:
      if self.tok.chat_template is None:
        return "chat requests need a chat template in the checkpoint"
      try:
        ids = self.tok.apply_chat_template(body["messages"])
      except JaxppError as e:
        return str(e)
    else:
      ids = self.tok.encode(body["prompt"])
    budget = self.max_len - new + 1
    if len(ids) > budget:
      if self.policy == "reject":
        return (f"prompt of {len(ids)} tokens exceeds the {budget} that fit engine.max_len "
                f"with max_tokens={new} (length_policy=reject)")
      ticket.truncated_tokens = len(ids) - budget
      ids = ids[:1] + ids[len(ids) - budget + 1:]  # the first token (BOS) and the end
    stop = body.get("stop")
    ticket.prompt = ids
    ticket.knobs = dict(max_new_tokens=new, stop=(stop,) if isinstance(stop, str) else
                        tuple(stop or ()), logprobs=asked_logprobs(ticket.doc),
                        n=body.get("n", 1),
                        **{k: body[k] for k in ("temperature", "top_p", "seed") + PENALTIES
                           if k in body})
    return None


def result_row(ticket: jobio.Ticket, outs: list[tuple[str, str, dict | None]],
               prompt_tokens: int, completion_tokens: int, model: str) -> dict:
  """One output line in OpenAI's batch output form (plus `line`, `truncated_tokens`): a
  choice per (text, finish_reason, logprobs or None) of `outs`, completion tokens summed."""
  chat = ticket.doc["url"] == CHAT
  choices = [dict(index=i, message=dict(role="assistant", content=text), logprobs=lps,
                  finish_reason=reason) if chat else
             dict(index=i, text=text, logprobs=lps, finish_reason=reason)
             for i, (text, reason, lps) in enumerate(outs)]
  body = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{ticket.line}",
              object="chat.completion" if chat else "text_completion",
              created=int(time.time()), model=ticket.doc["body"].get("model", model),
              choices=choices, usage=dict(prompt_tokens=prompt_tokens,
                                           completion_tokens=completion_tokens,
                                           total_tokens=prompt_tokens + completion_tokens))
  return dict(id=f"batch_req_{ticket.line}", custom_id=ticket.id, line=ticket.line,
              response=dict(status_code=200, request_id=f"req_{ticket.line}", body=body),
              error=None, truncated_tokens=ticket.truncated_tokens)


def error_row(rejected: jobio.Rejected) -> dict:
  """One errors-file line in OpenAI's form (plus `line`, which the resume reads)."""
  return dict(id=f"batch_req_{rejected.line}", custom_id=rejected.id, line=rejected.line,
              response=None, error=dict(code="invalid_request", message=rejected.reason))
