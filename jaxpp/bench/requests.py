"""The bench's requests: fixed-length random prompts, or one request per line of a JSONL file.

Its own module so measure.py stays about running and reporting layouts: reading a workload
file is mostly checking it, and every mistake in it must be one line naming `file:line`.

A line is `{"input_len": 700, "output_len": 90}` (a random-token prompt of that length,
drawn from the bench's seeded generator, as the fixed-length workload's are) or
`{"prompt_ids": [128000, 791, 4062], "output_len": 90}`; blank lines are skipped. Exactly
`output_len` tokens are generated per request (stop ids ignored). With `"shared_prefix": N`
beside input_len, the prompt's first N tokens are the same for every line that names the
same N (a template or system prompt, for the prefix cache), the rest its own.

A job input file (lines `{"id": ..., "text": ...}`, e.g. data/tickets.jsonl) is read as the
job reads it (`job/files.py`), each ticket turned into its prompt by the job's own
`Prompter` (the template, the tokenizer, and with `--max_len` the job's truncation to its
context), so the bench and the job can be compared on the same requests; each gets
`--output_len` new tokens.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from jaxpp.errors import JaxppError
from jaxpp.job import files as jobio
from jaxpp.job.prompter import Prompter
from jaxpp.load.tokenizer import Tokenizer

DEFAULT_TEMPLATE = "Ticket:\n{text}\nSummary:"  # configs/harbor.py's

KEYS = ("input_len", "output_len", "prompt_ids", "shared_prefix")
FIRST_ID = 3  # random prompts avoid the ids tokenizers keep for specials, as before


@dataclasses.dataclass(frozen=True)
class RequestSet:
  """Prompts (token ids) and each one's number of new tokens; `source` the file, if any."""
  prompts: list[list[int]]
  output_lens: list[int]
  source: str | None = None

  @property
  def name(self) -> str:
    """The file's name, or "random" for the fixed-length random workload."""
    return self.source or "random"

  @property
  def max_len(self) -> int:
    """Cache positions the longest request needs (prompt plus its new tokens)."""
    return max(len(p) + o for p, o in zip(self.prompts, self.output_lens))

  def describe(self) -> str:
    """`256 requests x 1024 in / 128 out` or `256 requests from a.jsonl (mean 700 in / 90 out)`."""
    n = len(self.prompts)
    if self.source is None:
      return f"{n} requests x {len(self.prompts[0])} in / {self.output_lens[0]} out"
    return (f"{n} requests from {self.name} (mean {np.mean([len(p) for p in self.prompts]):.0f}"
            f" in / {np.mean(self.output_lens):.0f} out)")


def random(num_requests: int, input_len: int, output_len: int, vocab_size: int,
           rng: np.random.Generator) -> RequestSet:
  """`num_requests` random-token prompts of `input_len`, `output_len` new tokens each."""
  prompts = rng.integers(FIRST_ID, vocab_size, (num_requests, input_len)).tolist()
  return RequestSet(prompts, [output_len] * num_requests)


def load(path: str, vocab_size: int, rng: np.random.Generator, *, tickets: dict | None = None
         ) -> RequestSet:
  """The requests of a JSONL workload file or, when its lines hold ticket "text", of a job
  input file (`tickets`: `from_tickets`'s keyword arguments; see the module docstring)."""
  p = pathlib.Path(path)
  try:
    text = p.read_text()
  except (OSError, UnicodeDecodeError) as e:
    raise JaxppError(f"--workload={path}: cannot read it ({type(e).__name__})") from None
  first = next((line for line in text.splitlines() if line.strip()), "")
  try:
    is_tickets = "text" in json.loads(first)
  except (json.JSONDecodeError, TypeError):
    is_tickets = False
  if is_tickets:
    return from_tickets(path, vocab_size, **(tickets or {}))
  return parse(text.splitlines(), path, vocab_size, rng, name=p.name)


def from_tickets(path: str, vocab_size: int, *, tokenizer: str = "", template: str = "",
                 output_len: int = 128, max_len: int = 0) -> RequestSet:
  """The job's prompts for a job input file: `tokenizer` is a checkpoint directory with a
  tokenizer.json, `template` the job's prompt_template, `max_len` its engine.max_len (0:
  no truncation); bad lines are skipped as the job's errors file would take them."""
  if not tokenizer:
    raise JaxppError(f"--workload={path} is a job input file (lines with \"text\"): pass "
                     "--tokenizer=DIR, a checkpoint directory with tokenizer.json")
  tok = Tokenizer.from_dir(tokenizer)
  if tok is None:
    raise JaxppError(f"--tokenizer={tokenizer}: no tokenizer.json there")
  budget = max_len - output_len + 1 if max_len else 1 << 30
  prompter = Prompter(tok, template or DEFAULT_TEMPLATE, budget=budget)
  prompts = [t.prompt for t in jobio.read_tickets(path, prepare=prompter)
             if not isinstance(t, jobio.Rejected)]
  if not prompts:
    raise JaxppError(f"--workload={path}: no ticket could be read")
  bad = [t for p in prompts for t in p if not 0 <= t < vocab_size]
  if bad:
    raise JaxppError(f"--tokenizer={tokenizer}: token id {bad[0]} is outside the model's "
                     f"vocabulary [0, {vocab_size})")
  return RequestSet(prompts, [output_len] * len(prompts), pathlib.Path(path).name)


def parse(lines, where: str, vocab_size: int, rng: np.random.Generator, *,
          name: str | None = None) -> RequestSet:
  """Requests from JSONL `lines`; `where` (the file) prefixes every error's line number."""
  prompts, output_lens, prefixes = [], [], {}
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    at = f"{where}:{number}"
    try:
      req = json.loads(line)
    except json.JSONDecodeError as e:
      raise JaxppError(f"{at}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(req, dict):
      raise JaxppError(f"{at}: expected an object like {{\"input_len\": 512, "
                       f"\"output_len\": 64}}, got {type(req).__name__}")
    unknown = sorted(set(req) - set(KEYS))
    if unknown:
      raise JaxppError(f"{at}: unknown key {unknown[0]!r} (allowed: {', '.join(KEYS)})")
    if "output_len" not in req:
      raise JaxppError(f"{at}: output_len is missing")
    output_lens.append(_positive(req["output_len"], "output_len", at))
    if ("input_len" in req) == ("prompt_ids" in req):
      raise JaxppError(f"{at}: needs exactly one of input_len or prompt_ids")
    if "input_len" in req:
      n = _positive(req["input_len"], "input_len", at)
      shared = req.get("shared_prefix", 0)
      if not _is_int(shared) or not 0 <= shared <= n:
        raise JaxppError(f"{at}: shared_prefix must be an integer in [0, input_len], got "
                         f"{json.dumps(shared)}")
      if shared and shared not in prefixes:  # (no draw for 0: older files' prompts stay)
        prefixes[shared] = rng.integers(FIRST_ID, vocab_size, shared).tolist()
      prompts.append(prefixes.get(shared, []) +
                     rng.integers(FIRST_ID, vocab_size, n - shared).tolist())
    elif "shared_prefix" in req:
      raise JaxppError(f"{at}: shared_prefix goes with input_len, not prompt_ids")
    else:
      prompts.append(_prompt_ids(req["prompt_ids"], vocab_size, at))
  if not prompts:
    raise JaxppError(f"{where}: no requests (the workload file is empty)")
  return RequestSet(prompts, output_lens, name or where)


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _positive(v, key: str, at: str) -> int:
  if not _is_int(v) or v < 1:
    raise JaxppError(f"{at}: {key} must be an integer >= 1, got {json.dumps(v)}")
  return v


def _prompt_ids(ids, vocab_size: int, at: str) -> list[int]:
  if not isinstance(ids, list) or not ids:
    raise JaxppError(f"{at}: prompt_ids must be a non-empty list of token ids")
  for i, t in enumerate(ids):
    if not _is_int(t) or not 0 <= t < vocab_size:
      raise JaxppError(f"{at}: prompt_ids[{i}] = {json.dumps(t)} is not a token id in "
                       f"[0, {vocab_size})")
  return ids
