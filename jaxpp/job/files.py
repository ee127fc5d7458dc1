"""Job I/O for the nightly batch: tickets in, summaries and rejections out, safe to kill.

The job must never lose or duplicate a document, even when killed with SIGKILL at any moment
and rerun with the same command. Three rules make that hold:

- Every non-blank input line ends up in exactly one place: the output (as its ticket's row)
  or the errors file (as a `{"line", "id", "reason"}` row). Bad input never raises.
- Output and errors are append-only JSONL, one whole line per `write` call, flushed to the OS
  at once (enough to survive SIGKILL of the process; `close()` also fsyncs for power loss).
- A rerun first repairs each file (drops the partial last line a kill may leave), then reads
  which ticket keys are done and which input lines are already rejected, and skips those.

Line numbers are physical, 1-based line numbers of the input file, so a person can jump to
them. Blank or whitespace-only lines are skipped silently and are NOT input lines: they are
neither written nor rejected, so "input lines" below means non-blank lines (the number of items
`read_tickets` yields).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import tempfile
from typing import Any, Callable, Iterator

from jaxpp.errors import JaxppError

PathLike = str | os.PathLike
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
               float: "number", type(None): "null"}


@dataclasses.dataclass
class Ticket:
  """One good input line. `key` is a hashable, type-distinct form of `id` (1 != "1")."""
  line: int
  id: Any
  key: str
  text: str
  doc: dict  # the whole JSON object, "id" and "text" included, so no field is lost
  prompt: Any = None  # what `read_tickets`' `prepare` made of it (the job: prompt ids)
  truncated_tokens: int = 0  # prompt tokens the length policy cut (the job's prepare sets it)
  done: bool = False  # an earlier run wrote its row (read_tickets' `done`): not prepared
  knobs: dict | None = None  # per-request sampling the line itself sets (OpenAI batch bodies)


@dataclasses.dataclass
class Rejected:
  """One bad input line; becomes one row of the errors file. `id` is None when unknown."""
  line: int
  id: Any | None
  reason: str


def ticket_key(id_: Any) -> str:
  """The key under which an id is deduplicated and resumed; stable across runs."""
  return json.dumps(id_, sort_keys=True)


def check_input(path: PathLike) -> pathlib.Path:
  """Raises `JaxppError` before any work if the job input cannot be read as a file."""
  p = pathlib.Path(path)
  if not p.exists():
    raise JaxppError(f"job input {p}: no such file")
  if not p.is_file():
    raise JaxppError(f"job input {p}: not a regular file")
  try:
    with open(p, "rb") as f:
      f.read(1)
  except OSError as e:
    raise JaxppError(f"job input {p}: cannot read ({e.strerror or e})") from None
  return p


def _json_type(value: Any) -> str:
  return _JSON_TYPES.get(type(value), type(value).__name__)


def _is_unicode(s: str) -> bool:
  """False for strings holding unpaired surrogates (JSON "\\ud800"): they cannot be written."""
  try:
    s.encode("utf-8")
    return True
  except UnicodeEncodeError:
    return False


def _parse(raw: bytes) -> tuple[Any, str | None]:
  """Decodes and parses one line; returns (value, None) or (None, reason)."""
  try:
    s = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    return None, f"invalid UTF-8 at byte {e.start} of the line"
  try:
    return json.loads(s), None
  except json.JSONDecodeError as e:
    return None, f"malformed JSON ({e.msg}, column {e.colno})"
  except (ValueError, RecursionError) as e:  # e.g. an int of 5000 digits, nesting too deep
    return None, f"malformed JSON ({str(e).splitlines()[0][:100]})"


def _check(obj: Any) -> tuple[Any | None, str | None]:
  """Validates a parsed line; returns (usable id or None, reason or None)."""
  if not isinstance(obj, dict):
    return None, f"not a JSON object (got {_json_type(obj)})"
  if "id" not in obj:
    return None, 'missing "id"'
  id_ = obj["id"]
  if isinstance(id_, bool) or not isinstance(id_, (str, int)):
    return None, f'"id" must be a string or integer, got {json.dumps(id_)[:40]}'
  if isinstance(id_, str) and not _is_unicode(id_):
    return None, '"id" is not valid Unicode (unpaired surrogate escape)'
  if "text" not in obj:
    return id_, 'missing "text"'
  text = obj["text"]
  if not isinstance(text, str):
    return id_, f'"text" must be a string, got {_json_type(text)}'
  if not text:
    return id_, '"text" is empty'
  if not text.strip():
    return id_, '"text" is blank (whitespace only)'
  if not _is_unicode(text):
    return id_, '"text" is not valid Unicode (unpaired surrogate escape)'
  return id_, None


Prepare = Callable[[list["Ticket"]], list[str | None]]


Check = Callable[[Any], tuple[Any, str | None]]


def read_tickets(path: PathLike, prepare: Prepare | None = None, *,
                 done: dict[str, int] | None = None, batch: int = 512,
                 check: Check | None = None) -> Iterator[Ticket | Rejected]:
  """Streams the input, yielding one `Ticket` or `Rejected` per non-blank line, in order.

  Deterministic from the file alone, so every run assigns the same verdict to the same line.
  `prepare(tickets) -> reasons` is the caller's own check (the job's tokenizer and length
  policy), called on up to `batch` tickets at once so it can tokenize them in one parallel
  call; it sets each ticket's `prompt` and returns a reason (rejecting the line) or None per
  ticket. Duplicates: the first ACCEPTED line with an id wins and later ones are rejected
  naming it; a line rejected for any other reason, `prepare`'s included, does not claim its
  id, so a corrected copy further down is still summarised rather than lost.

  `done` ({key: input line} of the rows earlier runs wrote) spares finished tickets the
  preparing: a ticket at the very line its row names is yielded with `done=True` and no
  prompt. It was accepted there before, and verdicts are deterministic, so it still claims
  its id. `check(obj) -> (id, reason)` validates a parsed line (default: a ticket,
  `{"id", "text"}`; `openai_batch.check_line` for OpenAI batch requests).
  """
  p = check_input(path)
  check = check or _check
  done = done or {}
  first_line: dict[str, int] = {}
  with open(p, "rb") as f:
    lines = enumerate(f, start=1)
    while chunk := [_candidate(n, raw, done, check)
                    for n, raw in itertools.islice(lines, batch)]:
      fresh = [c for c in chunk if isinstance(c, Ticket) and not c.done]
      reasons = dict(zip(map(id, fresh), prepare(fresh) if prepare and fresh else ()))
      for item in chunk:
        if item is None or isinstance(item, Rejected):
          if item is not None:
            yield item
          continue
        reason = reasons.get(id(item))
        if item.key in first_line:
          reason = f"duplicate id {item.key} (first accepted on line {first_line[item.key]})"
        if reason is None:
          first_line[item.key] = item.line
          yield item
        else:
          yield Rejected(line=item.line, id=item.id, reason=reason)


def _candidate(lineno: int, raw: bytes, done: dict[str, int], check: Check
               ) -> Ticket | Rejected | None:
  """One line's verdict before `prepare` and the duplicate check; None for a blank line."""
  if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
    raw = raw[3:]  # a UTF-8 byte-order mark some editors write
  if not raw.strip():
    return None
  obj, reason = _parse(raw.rstrip(b"\r\n"))
  id_ = None
  if reason is None:
    id_, reason = check(obj)
  if reason is not None:
    return Rejected(line=lineno, id=id_, reason=reason)
  key = ticket_key(id_)
  return Ticket(line=lineno, id=id_, key=key, text=obj.get("text", ""), doc=obj,
                done=done.get(key) == lineno)


@dataclasses.dataclass
class RepairResult:
  """What `repair_jsonl` found: bytes cut from the end, and corrupt lines left in the middle."""
  truncated_bytes: int = 0
  corrupt_lines: int = 0


def _row(raw: bytes) -> dict | None:
  try:
    obj = json.loads(raw)
  except (ValueError, RecursionError):
    return None
  return obj if isinstance(obj, dict) else None


def repair_jsonl(path: PathLike) -> RepairResult:
  """Makes a killed run's JSONL appendable again; idempotent, a no-op on a healthy file.

  Cuts a partial last line (no final "\\n", even if it happens to parse: the ticket is simply
  redone) and any trailing lines that are not JSON objects. Corrupt lines in the middle cannot
  come from a kill (we only append whole lines), so they are kept and counted, not guessed at.
  A non-empty file with no JSON row at all is someone else's file: it raises, never truncates.
  """
  p = pathlib.Path(path)
  result = RepairResult()
  if not p.exists():
    return result
  offset = good_end = 0
  bad_since_good = 0
  with open(p, "rb") as f:
    for raw in f:
      offset += len(raw)
      if not raw.endswith(b"\n"):
        break  # the partial last line
      if not raw.strip():
        continue
      if _row(raw) is None:
        bad_since_good += 1
      else:
        result.corrupt_lines += bad_since_good
        bad_since_good = 0
        good_end = offset
  if offset != good_end:
    if good_end == 0 and bad_since_good:
      raise JaxppError(f"job output {p}: holds no JSON rows, so not a file of this job; "
                       "move it away or choose another output")
    result.truncated_bytes = offset - good_end
    os.truncate(p, good_end)
  return result


@dataclasses.dataclass
class ResumeState:
  """What earlier runs already finished; the job skips these and writes only the rest."""
  done_keys: set[str] = dataclasses.field(default_factory=set)
  done_lines: dict[str, int] = dataclasses.field(default_factory=dict)  # key -> row's "line"
  rejected_lines: set[int] = dataclasses.field(default_factory=set)
  output_rows: int = 0  # rows in the output; > len(done_keys) means duplicate_rows > 0
  duplicate_rows: int = 0  # output rows whose key was already seen (should stay 0)
  truncated_bytes: int = 0  # cut from the two files' ends by the repair
  corrupt_lines: int = 0  # unparseable lines kept in the middle of either file


def _rows(path: pathlib.Path) -> Iterator[dict]:
  if not path.exists():
    return
  with open(path, "rb") as f:
    for raw in f:
      row = _row(raw) if raw.strip() else None
      if row is not None:
        yield row


def resume_state(output_path: PathLike, errors_path: PathLike, id_field: str = "id"
                 ) -> ResumeState:
  """Repairs both files, then reads done ticket keys (from each row's `id_field`: "id",
  or "custom_id" for OpenAI batch rows) and already-rejected input lines.

  Missing files mean a first run (empty state). Call this BEFORE opening the writers.
  """
  state = ResumeState()
  out, err = pathlib.Path(output_path), pathlib.Path(errors_path)
  for p in (out, err):
    fixed = repair_jsonl(p)
    state.truncated_bytes += fixed.truncated_bytes
    state.corrupt_lines += fixed.corrupt_lines
  for row in _rows(out):
    if id_field not in row:
      state.corrupt_lines += 1
      continue
    key = ticket_key(row[id_field])
    state.output_rows += 1
    if key in state.done_keys:
      state.duplicate_rows += 1
    state.done_keys.add(key)
    if isinstance(row.get("line"), int) and key not in state.done_lines:
      state.done_lines[key] = row["line"]
  for row in _rows(err):
    if isinstance(row.get("line"), int):
      state.rejected_lines.add(row["line"])
    else:
      state.corrupt_lines += 1
  return state


class ResultWriter:
  """Appends whole JSONL lines, each flushed to the OS as soon as it is written.

  Unbuffered, one `write` per line (looped only if the OS writes part of it), so a SIGKILL
  leaves at most one partial last line, which `repair_jsonl` removes; the file is repaired on
  open too, so appending never glues a new row onto a killed run's partial line.
  """

  def __init__(self, path: PathLike):
    self.path = pathlib.Path(path)
    check_output_dir(self.path)
    repair_jsonl(self.path)
    self._f = open(self.path, "ab", buffering=0)
    self.rows = 0

  def write(self, row: dict) -> None:
    try:
      line = json.dumps(row, ensure_ascii=False) + "\n"
      data = line.encode("utf-8")
    except UnicodeEncodeError:  # unpaired surrogates: \u-escaped JSON is still one valid line
      data = (json.dumps(row) + "\n").encode("ascii")
    view = memoryview(data)
    while view:
      view = view[self._f.write(view):]
    self.flush()
    self.rows += 1

  def flush(self) -> None:
    """Unbuffered, so every row is already with the OS; kept for a file-like interface."""
    self._f.flush()

  def close(self) -> None:
    """Closes after an fsync, so a finished run also survives a power cut."""
    if not self._f.closed:
      os.fsync(self._f.fileno())
      self._f.close()

  def __enter__(self) -> ResultWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def error_row(rejected: Rejected) -> dict:
  """The errors file's row of a rejected ticket line."""
  return {"line": rejected.line, "id": rejected.id, "reason": rejected.reason}


class ErrorWriter(ResultWriter):
  """The errors file: one row per rejected input line, `row(rejected)` (default
  `{"line", "id", "reason"}`; every form keeps the integer "line" the resume reads)."""

  def __init__(self, path: PathLike, row: Callable[[Rejected], dict] = error_row):
    super().__init__(path)
    self._row = row

  def write_rejected(self, rejected: Rejected) -> None:
    self.write(self._row(rejected))


def check_distinct(**paths: PathLike) -> None:
  """Refuses two of the job's files that are one file (same path, or links to it): with the
  output equal to the input, the resume repair would cut the input's last line."""
  seen: dict[pathlib.Path, str] = {}
  for role, path in paths.items():
    real = pathlib.Path(os.path.realpath(path))
    if real in seen:
      raise JaxppError(f"job {role} {path} is the same file as the job {seen[real]}; give "
                       "the input, output, errors and report files different paths")
    seen[real] = role


def check_output_dir(output_path: PathLike) -> pathlib.Path:
  """Creates the output's parent directories and proves they are writable, before any work.

  Probes with a real temporary file rather than `os.access`, which says yes to root even on a
  read-only mount. Raises `JaxppError` in one line otherwise.
  """
  p = pathlib.Path(output_path)
  try:
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists() and not p.is_file():
      raise JaxppError(f"job output {p}: exists and is not a regular file")
    with tempfile.TemporaryFile(dir=p.parent):
      pass
    if p.exists():
      with open(p, "ab"):
        pass
  except OSError as e:
    raise JaxppError(f"job output {p}: not writable ({e.strerror or e})") from None
  return p
