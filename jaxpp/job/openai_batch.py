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
tickets. Body fields the job cannot honour (`logprobs`, `n` > 1, tools, ...) are an error
line naming the field, never silently ignored. The body's knobs override the config's
`sampling` section for that request; `model` is echoed back, not checked.
"""

from __future__ import annotations

import time
from typing import Any

from jaxpp.errors import JaxppError
from jaxpp.job import files as jobio
from jaxpp.load.chat_template import check_messages
from jaxpp.load.tokenizer import Tokenizer

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n"}
FIELDS = {CHAT: COMMON | {"messages", "max_completion_tokens"}, COMPLETIONS: COMMON | {"prompt"}}
MAX_STOPS = 4  # OpenAI's limit on `stop`


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
  if body.get("n", 1) != 1:
    return cid, 'unsupported body field "n" (only n=1)'
  if "seed" in body and (isinstance(body["seed"], bool) or not isinstance(body["seed"], int)):
    return cid, 'body "seed" must be an integer'
  stop = body.get("stop")
  stops = [stop] if isinstance(stop, str) else stop
  if stop is not None and (not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(
      isinstance(s, str) and s for s in stops)):
    return cid, f'body "stop" must be a string or up to {MAX_STOPS} non-empty strings'
  return cid, _number(body, "temperature", 0, 2) or _number(body, "top_p", 1e-9, 1)


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
                        tuple(stop or ()),
                        **{k: body[k] for k in ("temperature", "top_p", "seed") if k in body})
    return None


def result_row(ticket: jobio.Ticket, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int, model: str) -> dict:
  """One output line in OpenAI's batch output form (plus `line`, `truncated_tokens`)."""
  chat = ticket.doc["url"] == CHAT
  choice = (dict(index=0, message=dict(role="assistant", content=text), logprobs=None,
                 finish_reason=finish_reason) if chat else
            dict(index=0, text=text, logprobs=None, finish_reason=finish_reason))
  body = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{ticket.line}",
              object="chat.completion" if chat else "text_completion",
              created=int(time.time()), model=ticket.doc["body"].get("model", model),
              choices=[choice], usage=dict(prompt_tokens=prompt_tokens,
                                           completion_tokens=completion_tokens,
                                           total_tokens=prompt_tokens + completion_tokens))
  return dict(id=f"batch_req_{ticket.line}", custom_id=ticket.id, line=ticket.line,
              response=dict(status_code=200, request_id=f"req_{ticket.line}", body=body),
              error=None, truncated_tokens=ticket.truncated_tokens)


def error_row(rejected: jobio.Rejected) -> dict:
  """One errors-file line in OpenAI's form (plus `line`, which the resume reads)."""
  return dict(id=f"batch_req_{rejected.line}", custom_id=rejected.id, line=rejected.line,
              response=None, error=dict(code="invalid_request", message=rejected.reason))
