"""The per-stage latency histogram written beside the job's report (PNG, matplotlib).

A decode tick is one synchronous step of every stage, so its time is the slowest stage's
latency for that step; a straggling stage or a noisy host shows as a long right tail, which
the production checklist this job follows asks to watch ("stragglers show up as tail skew").
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np

BINS = 40


def latency_png_path(output_path: str | os.PathLike) -> pathlib.Path:
  """`<output>.latency.png`, e.g. out/summaries.jsonl.latency.png."""
  p = pathlib.Path(output_path)
  return p.with_name(p.name + ".latency.png")


def write_latency_png(tick_seconds: Sequence[float], output_path: str | os.PathLike,
                      title: str) -> pathlib.Path | None:
  """Draws the histogram of per-tick times (ms) with p50/p90/p99 marked; None (and no
  file) when no decode call was timed."""
  ms = 1e3 * np.asarray(list(tick_seconds), np.float64)
  if not ms.size:
    return None
  import matplotlib  # only the job's end needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  path = latency_png_path(output_path)
  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.hist(ms, bins=BINS, color="#4c72b0")
  for q, style in ((50, "-"), (90, "--"), (99, ":")):
    v = float(np.percentile(ms, q))
    ax.axvline(v, color="#c44e52", linestyle=style, label=f"p{q} {v:.2f} ms")
  ax.set_xlabel("per-stage latency: decode tick time (ms)")
  ax.set_ylabel("ticks (one per timed decode call)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
