"""What the engine measures while it runs: time and tokens per phase, device step times.

Plain numbers, so the job's report and the bench's rows are built from them without a
model; `percentiles` summarises the per-tick times both print.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass
class EngineStats:
  """Totals since the engine started; `tick_seconds` holds one entry per decode call."""

  prefill_seconds: float = 0.0
  decode_seconds: float = 0.0
  prompt_tokens: int = 0
  prefill_positions: int = 0  # token positions the prefill programs computed (m * p * T)
  completion_tokens: int = 0
  decode_calls: int = 0
  tick_seconds: list[float] = dataclasses.field(default_factory=list)
  max_live_per_microbatch: int = 0


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, Any]:
  """`{"p50": ..., "p90": ..., "p99": ..., "count": n}`; values are None when there are none."""
  arr = np.asarray(list(values), dtype=np.float64)
  out: dict[str, Any] = {f"p{q:g}": (float(np.percentile(arr, q)) if arr.size else None)
                         for q in qs}
  out["count"] = int(arr.size)
  return out
