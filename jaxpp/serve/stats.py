"""What the engine measures while it runs: time and tokens per phase, device step times.

Plain numbers, so the job's report and the bench's rows are built from them without a
model; `percentiles` summarises the per-tick times both print.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jaxpp.parallel import schedule


@dataclasses.dataclass
class EngineStats:
  """Totals since the engine started.

  A program's first call traces it, compiles it (or loads it from JAX's persistent cache)
  and then runs: its time and tokens are also counted in `*_first_seconds` and
  `*_first_tokens`, so `steady_rates` can leave this once-a-shape cost out, as a benchmark
  that compiles before its clock does. `prefill_shapes` counts the distinct prefill
  programs a run met (each one such first call).

  `tick_seconds` holds one entry per timed decode call (a program's first, compiling call
  is not timed): the call's time over its ticks, i.e. one stage-step. Over the timed calls,
  `decode_busy_seconds` is the share of `decode_timed_seconds` the stages computed (the
  schedule table's occupancy) and `decode_gap_seconds` the host time between them, prefills
  excluded: `idle_share` is the rest.
  """

  prefill_seconds: float = 0.0
  prefill_tokens: int = 0  # prompt tokens the prefills computed (a cached prefix is not)
  decode_seconds: float = 0.0
  prompt_tokens: int = 0
  prefill_positions: int = 0  # token positions the prefill programs computed (m * p * T)
  completion_tokens: int = 0
  decode_calls: int = 0
  decode_rows: int = 0  # rows the decode calls ran (a paged cache's windows), summed
  prefill_calls: int = 0
  prefill_shapes: int = 0
  prefill_first_seconds: float = 0.0
  prefill_first_tokens: int = 0
  decode_first_seconds: float = 0.0
  decode_first_tokens: int = 0
  tick_seconds: list[float] = dataclasses.field(default_factory=list)
  max_live_per_microbatch: int = 0  # the most live rows of one replica in one micro-batch
  max_live: int = 0  # the most sequences in flight at once, all replicas
  admissions: int = 0  # requests given a slot (their admission order numbers the sequences)
  preemptions: int = 0  # sequences swapped out of the KV pool to make room (kv_grow)
  decode_timed_seconds: float = 0.0
  decode_busy_seconds: float = 0.0
  decode_gap_seconds: float = 0.0
  # a paged cache's blocks (`PagedSlots.stats`): size, count, peak in use, prefix hits
  kv: dict = dataclasses.field(default_factory=dict)
  last_decode_end: float | None = None  # host time the last timed decode call returned
  prefill_since: float = 0.0  # prefill seconds since then

  def add_decode(self, seconds: float, rows: int) -> None:
    """One decode call of `rows` rows (all replicas) that took `seconds` to its results."""
    self.decode_seconds += seconds
    self.decode_calls += 1
    self.decode_rows += rows

  def mean_decode_rows(self) -> float:
    """Rows a decode call ran, on average: the slots with a dense cache, with a paged one
    the windows of rows in use (`decode_rows.py`), which set the weight GEMMs' M."""
    return self.decode_rows / self.decode_calls if self.decode_calls else 0.0

  def add_first_decode(self, seconds: float) -> None:
    """A decode program's first call: untimed (it compiles), and it breaks the gap count."""
    self.decode_first_seconds += seconds
    self.last_decode_end = None
    self.prefill_since = 0.0

  def add_timed_decode(self, start: float, seconds: float, table: np.ndarray) -> None:
    """Per-tick time and stage occupancy of one decode call (not a program's first) that
    began at host time `start` and ran the schedule `table`.

    Every tick of the ring is one synchronous step of every stage (each stage's slice is a
    collective-permute away from the next), so a call's time over its ticks is one
    stage-step's latency. The stages computed in `busy` of the table's stage-ticks; the
    rest is fill and drain. The host time since the previous timed call, less the prefills
    in between (`prefill_since`), is time the ring sat idle.
    """
    self.tick_seconds.append(seconds / len(table))
    busy = float(np.mean(table[..., 0] != schedule.IDLE))
    self.decode_timed_seconds += seconds
    self.decode_busy_seconds += seconds * busy
    if self.last_decode_end is not None:
      self.decode_gap_seconds += max(start - self.last_decode_end - self.prefill_since, 0.0)
    self.last_decode_end, self.prefill_since = start + seconds, 0.0

  def add_prefill(self, seconds: float, tokens: int, positions: int, *, first: bool) -> None:
    """One prefill call: `tokens` prompt tokens computed in a program of `positions`
    (padding included); `first`: its program's first call."""
    self.prefill_seconds += seconds
    self.prefill_tokens += tokens
    self.prefill_positions += positions
    self.prefill_calls += 1
    if first:
      self.prefill_shapes += 1
      self.prefill_first_seconds += seconds
      self.prefill_first_tokens += tokens

  def first_call_seconds(self) -> float:
    """Seconds in programs' first calls (trace, compile or cache load, one run): a one-off
    per program, however long the run."""
    return self.prefill_first_seconds + self.decode_first_seconds

  def steady_rates(self) -> tuple[float | None, float | None]:
    """(prefill, decode) tokens/s over the calls that were not a program's first; None
    where no such call ran."""
    def rate(tokens: int, seconds: float) -> float | None:
      return tokens / seconds if seconds > 0 else None
    return (rate(self.prefill_tokens - self.prefill_first_tokens,
                 self.prefill_seconds - self.prefill_first_seconds),
            rate(self.completion_tokens - self.decode_first_tokens,
                 self.decode_seconds - self.decode_first_seconds))

  def idle_share(self) -> float | None:
    """Share of the decode ring's time (timed calls and the host gaps between them) its
    stages did not compute: fill and drain plus host time; None before any timed call."""
    total = self.decode_timed_seconds + self.decode_gap_seconds
    return 1.0 - self.decode_busy_seconds / total if total > 0 else None


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, Any]:
  """`{"p50": ..., "p90": ..., "p99": ..., "count": n}`; values are None when there are none."""
  arr = np.asarray(list(values), dtype=np.float64)
  out: dict[str, Any] = {f"p{q:g}": (float(np.percentile(arr, q)) if arr.size else None)
                         for q in qs}
  out["count"] = int(arr.size)
  return out
