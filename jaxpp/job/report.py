"""Progress bar and end-of-job report for the batch job.

The report answers the questions the nightly run is judged by: did every input line land
somewhere (output or errors, exactly once), how fast did prefill and decode go, how much of
the pipeline sat idle (the schedule's analytic bubble next to the measured one), and how long
would 40,000 tickets take at this rate. It is built from plain numbers the job measured, so it
can be unit-tested without running a model, and saved as JSON next to the output.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import tempfile
import time
from typing import Any, Sequence

from tqdm import tqdm

from jaxpp.serve.stats import percentiles

PROJECTION_DOCUMENTS = 40_000  # the nightly volume the projection is quoted for


def _rate(amount: float, seconds: float | None) -> float | None:
  """amount/seconds, or None when nothing was timed (never a ZeroDivisionError or inf)."""
  if not seconds or seconds <= 0 or not math.isfinite(seconds):
    return None
  return amount / seconds


def human_duration(seconds: float | None) -> str:
  """'45 s', '12.5 min', '2.9 h', '1.5 d'; 'n/a' when unknown."""
  if seconds is None or not math.isfinite(seconds):
    return "n/a"
  if seconds < 90:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
  if seconds < 90 * 60:
    return f"{seconds / 60:.1f} min"
  if seconds < 48 * 3600:
    return f"{seconds / 3600:.1f} h"
  return f"{seconds / 86400:.1f} d"


class Progress:
  """A tqdm bar on stderr: documents done, one doc/s, one tok/s and an ETA.

  Both rates are averages since the first document of the run finished, so start-up and
  the first compiles do not pass for throughput and the first ETA is not hours off; tok/s
  counts prompt and generated tokens of finished documents (what the devices processed).
  `total` is this run's documents (already-done ones excluded), so a resumed run's ETA is
  honest. `disable=True` keeps tests and logs quiet.
  """

  FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

  def __init__(self, total: int | None, *, disable: bool = False, desc: str = "summaries"):
    self.total, self.documents, self.tokens = total, 0, 0
    self._first: float | None = None  # when the first document finished
    self._before = (0, 0)  # documents and tokens counted by then
    self._bar = tqdm(total=total, desc=desc, unit="doc", file=sys.stderr, disable=disable,
                     dynamic_ncols=True, bar_format=self.FORMAT)

  def update(self, documents: int = 1, tokens: int = 0) -> None:
    now = time.perf_counter()
    self.documents += documents
    self.tokens += tokens
    if self._first is None:  # the rates start here: this document's time was start-up
      self._first, self._before = now, (self.documents, self.tokens)
    elif now > self._first:
      elapsed = now - self._first
      rate = (self.documents - self._before[0]) / elapsed
      left = (self.total - self.documents) / rate if self.total else None
      self._bar.set_postfix_str(
          f"{rate:.1f} doc/s, {(self.tokens - self._before[1]) / elapsed:,.0f} tok/s, "
          f"ETA {human_duration(left)}", refresh=False)
    self._bar.update(documents)

  def close(self) -> None:
    self._bar.close()

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def build_report(*, input_lines: int, written_run: int, written_total: int, rejected_run: int,
                 rejected_total: int, skipped_done: int, prompt_tokens: int,
                 completion_tokens: int, prefill_seconds: float, decode_seconds: float,
                 wall_seconds: float, bubble_schedule: float,
                 bubble_measured: float | None = None, tick_seconds: Sequence[float] = (),
                 devices: str = "", layout: dict | None = None,
                 duplicate_rows: int = 0, startup_seconds: float = 0.0,
                 load_seconds: float = 0.0, compile_seconds: float = 0.0,
                 steady_seconds: float | None = None,
                 prefill_positions: int = 0, truncated_run: int = 0,
                 interrupted: str | None = None, read_seconds: float | None = None,
                 steady_prefill_tps: float | None = None,
                 steady_decode_tps: float | None = None, first_call_seconds: float = 0.0,
                 prefill_calls: int = 0, prefill_shapes: int = 0,
                 kv_cache: dict | None = None,
                 prefill_tokens: int | None = None) -> dict[str, Any]:
  """The job report as a JSON-ready dict; rates are None where nothing was timed.

  `*_run` count this run, `*_total` the whole output / errors file (earlier runs included,
  unique ids / lines). `reconciled` is the promise of the job: every non-blank input line is
  either a row of the output or a row of the errors file, and no id is written twice.
  `startup_seconds` (checks, probe, weights: `load_seconds` of it) and `compile_seconds`
  (all of JAX's compiles) are paid once a run, as are `first_call_seconds`, the first call
  of each program (trace, compile or cache load, one run); `read_seconds` is the part of
  the weights' time spent reading the checkpoint's files (overlapped with placing them).
  `steady_seconds` is the wall time less start-up and those one-off costs (default: the
  whole wall); `steady_*_tps` are the rates over the calls that were not a program's first
  (`EngineStats.steady_rates`), what a benchmark that compiles first would measure.
  `prefill_calls` prefills ran, in `prefill_shapes` distinct programs. `kv_cache` is a paged
  cache's blocks (`PagedSlots.stats`: size, count, peak in use, prefix hits; empty: dense).
  `prefill_tokens` are the prompt tokens the prefills computed (default: all of them; a
  prefix served from the prefix cache is not computed): the prefill rate counts those.
  The projection is this
  run's one-off time plus 40,000 documents at the steady rate. `prefill_positions` are the
  token positions the prefill programs computed; over the prompt tokens they give the share
  spent on padding. `bubble_measured` is the decode ring's idle share from the run's own
  timed decode calls (`EngineStats.idle_share`); `tick_seconds`, one stage-step's latency
  per timed call. `truncated_run` counts this run's rows whose prompt the length policy
  cut; `interrupted` names the signal that stopped the run (None: it ran to the end).
  """
  computed = prompt_tokens if prefill_tokens is None else prefill_tokens
  dps = _rate(written_run, wall_seconds)
  steady_s = wall_seconds if steady_seconds is None else steady_seconds
  steady = _rate(written_run, steady_s)
  projected = wall_seconds - steady_s + PROJECTION_DOCUMENTS / steady if steady else None
  return {
      "input_lines": input_lines,
      "written_run": written_run,
      "written_total": written_total,
      "rejected_run": rejected_run,
      "rejected_total": rejected_total,
      "skipped_done": skipped_done,
      "duplicate_rows": duplicate_rows,
      "reconciled": input_lines == written_total + rejected_total and duplicate_rows == 0,
      "interrupted": interrupted,
      "truncated_run": truncated_run,
      "prompt_tokens": prompt_tokens,
      "prefill_tokens": computed,
      "prefill_positions": prefill_positions,
      "prefill_padding": (1 - computed / prefill_positions if prefill_positions else None),
      "completion_tokens": completion_tokens,
      "prefill_seconds": prefill_seconds,
      "decode_seconds": decode_seconds,
      "wall_seconds": wall_seconds,
      "startup_seconds": startup_seconds,
      "load_seconds": load_seconds,
      "read_seconds": read_seconds,
      "compile_seconds": compile_seconds,
      "first_call_seconds": first_call_seconds,
      "prefill_calls": prefill_calls,
      "prefill_shapes": prefill_shapes,
      "kv_cache": dict(kv_cache or {}),
      "steady_documents_per_second": steady,
      "prefill_tokens_per_second": _rate(computed, prefill_seconds),
      "decode_tokens_per_second": _rate(completion_tokens, decode_seconds),
      "steady_prefill_tokens_per_second": steady_prefill_tps,
      "steady_decode_tokens_per_second": steady_decode_tps,
      "total_tokens_per_second": _rate(prompt_tokens + completion_tokens, wall_seconds),
      "documents_per_second": dps,
      "projected_wall_seconds_40000": projected,
      "projected_wall_40000": human_duration(projected),
      "bubble_schedule": bubble_schedule,
      "bubble_measured": bubble_measured,
      "tick_seconds": percentiles(tick_seconds),
      "devices": devices,
      "layout": dict(layout or {}),
  }


def _num(x: float | None, fmt: str = ",.1f") -> str:
  return "n/a" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
  return "n/a" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
  return "n/a" if x is None else f"{1000 * x:.1f} ms"


def reconciliation_line(r: dict[str, Any]) -> str:
  """'input lines = written + rejected: 212 = 200 + 12 ✓', or a loud MISMATCH line."""
  n, w, e = r["input_lines"], r["written_total"], r["rejected_total"]
  if r["reconciled"]:
    return f"input lines = written + rejected: {n} = {w} + {e} ✓"
  if r.get("interrupted") and not r.get("duplicate_rows") and n > w + e:
    return (f"input lines = written + rejected: {n} != {w} + {e} "
            f"({n - (w + e):,} still to do: interrupted by {r['interrupted']})")
  problems = []
  if n != w + e:
    problems.append(f"{n - (w + e):+d} lines unaccounted for")
  if r.get("duplicate_rows"):
    problems.append(f"{r['duplicate_rows']} duplicate output rows")
  return (f"!!! MISMATCH: input lines = written + rejected: {n} != {w} + {e} "
          f"({', '.join(problems)}) !!!")


def format_report(r: dict[str, Any]) -> str:
  """A compact human summary of `build_report`'s dict, one topic per line."""
  tick = r["tick_seconds"]
  layout = " ".join(f"{k}={v}" for k, v in r["layout"].items())
  lines = [
      f"documents   {r['written_run']:,} written this run ({r['written_total']:,} in output), "
      f"{r['rejected_run']:,} rejected ({r['rejected_total']:,} in errors), "
      f"{r['skipped_done']:,} already done, {r.get('truncated_run', 0):,} prompts truncated",
      f"tokens      prompt {r['prompt_tokens']:,}  completion {r['completion_tokens']:,}  "
      f"(prefill padding {_pct(r.get('prefill_padding'))})",
      f"tokens/s    prefill {_num(r['prefill_tokens_per_second'])}  "
      f"decode {_num(r['decode_tokens_per_second'])}  "
      f"total {_num(r['total_tokens_per_second'])}",
      f"steady      prefill {_num(r.get('steady_prefill_tokens_per_second'))}  "
      f"decode {_num(r.get('steady_decode_tokens_per_second'))} tok/s  (programs' first "
      f"calls left out: {human_duration(r.get('first_call_seconds'))}; "
      f"{r.get('prefill_calls', 0):,} prefills in {r.get('prefill_shapes', 0)} shapes)",
      f"documents/s {_num(r['documents_per_second'], ',.2f')}",
      f"bubble      schedule {_pct(r['bubble_schedule'])}  measured {_pct(r['bubble_measured'])}"
      " (decode ring idle: fill, drain and host time)",
      f"stage step  p50 {_ms(tick['p50'])}  p90 {_ms(tick['p90'])}  p99 {_ms(tick['p99'])}  "
      f"({tick['count']:,} timed decode calls)",
      f"wall        {human_duration(r['wall_seconds'])} "
      f"(prefill {human_duration(r['prefill_seconds'])}, "
      f"decode {human_duration(r['decode_seconds'])})",
      f"startup     {human_duration(r.get('startup_seconds'))} (weights "
      f"{human_duration(r.get('load_seconds'))}"
      + (f", reading files {human_duration(r['read_seconds'])}"
         if r.get("read_seconds") is not None else "") + "), "
      f"compile {human_duration(r.get('compile_seconds'))}",
      f"projection  {PROJECTION_DOCUMENTS:,} tickets in {r['projected_wall_40000']}",
      kv_line(r.get("kv_cache") or {}),
      f"devices     {r['devices'] or 'n/a'}" + (f"  layout {layout}" if layout else ""),
      reconciliation_line(r),
  ]
  if r.get("interrupted"):
    lines.append(f"interrupted by {r['interrupted']}: rerun the same command to resume")
  return "\n".join(lines)


def kv_line(kv: dict[str, Any]) -> str:
  """'kv cache    peak 812 of 4,095 blocks of 64 positions (19.8%)', or the dense cache."""
  if not kv:
    return "kv cache    dense (max_len positions per slot)"
  line = (f"kv cache    peak {kv['peak_blocks']:,} of {kv['blocks']:,} blocks of "
          f"{kv['block_size']} positions ({_pct(kv['peak_blocks'] / kv['blocks'])})")
  if kv.get("prefix_lookup_tokens"):
    line += (f", prefix cache hit {_pct(kv['prefix_hit_tokens'] / kv['prefix_lookup_tokens'])}"
             f" of prompt tokens ({kv['prefix_hit_tokens']:,} not prefilled)")
  if kv.get("preemptions"):
    line += f", {kv['preemptions']:,} sequences swapped out to make room (kv_grow)"
  if kv.get("decode_rows"):
    line += f"; decode calls ran {kv['decode_rows']:.0f} rows on average"
  return line


def report_path(output_path: str | os.PathLike) -> pathlib.Path:
  """`<output>.report.json`, e.g. out/summaries.jsonl.report.json."""
  p = pathlib.Path(output_path)
  return p.with_name(p.name + ".report.json")


def _json_safe(x: Any) -> Any:
  """NaN / inf become None so the report stays strict JSON (other tools choke on NaN)."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


def write_report(report: dict[str, Any], output_path: str | os.PathLike) -> pathlib.Path:
  """Writes the report next to the output atomically: a reader never sees half a report."""
  path = report_path(output_path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(_json_safe(report), f, indent=2, ensure_ascii=False, allow_nan=False)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path
