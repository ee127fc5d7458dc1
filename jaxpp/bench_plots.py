"""The bench's pictures (PNG, matplotlib): throughput against micro-batches, and the decode
schedule of each pipeline layout drawn at its measured tick time.

The executor is lock-step (every device runs one table tick at a time and the ring's send
ends it), so a layout's stage activity is its schedule table with every tick lasting the
measured tick time; the Gantt is that picture, with the measured p50 tick. Per-device
timestamps inside a tick would need a profiler trace and are not drawn.
"""

from __future__ import annotations

import collections
import pathlib

from jaxpp import schedule

GANTT_ROUNDS = 2  # decode rounds drawn: the fill, one steady round and the drain


def write(rows: list[dict], out: pathlib.Path, decode_chunk: int) -> list[pathlib.Path]:
  """throughput.png and one gantt_<layout>.png per pipeline row (pp > 1); returns the paths."""
  paths = [out / "throughput.png"]
  throughput_png(rows, paths[0])
  for row in rows:
    if row["layout"].startswith("pp") and row["pp"] > 1:  # one stage has no schedule to draw
      path = out / f"gantt_{row['layout']}_{row['quant']}.png"
      sched = schedule.circular(row["pp"], row["virtual_stages"], row["microbatches"],
                                rounds=min(decode_chunk, GANTT_ROUNDS))
      sched.render_png(str(path), tick_seconds=row["tick_seconds"]["p50"], title=(
          f"{row['layout']} ({row['quant']}): {sched.rounds} of {decode_chunk} decode rounds\n"
          f"p50 tick {row['tick_seconds']['p50'] * 1e3:.2f} ms, measured bubble "
          f"{row['bubble_measured']:.1%}"))
      paths.append(path)
  return paths


def throughput_png(rows: list[dict], path: pathlib.Path) -> None:
  """Total tokens/s against micro-batches, one line per pp x tp x v x quant family."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  families = collections.defaultdict(list)
  for r in rows:
    name = (f"pp{r['pp']}tp{r['tp']}v{r['virtual_stages']}" if r["layout"].startswith("pp")
            else r["layout"])
    families[f"{name} {r['quant']}"].append((r["microbatches"], r["total_tokens_per_second"]))
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, points in sorted(families.items()):
    m, tps = zip(*sorted(points))
    ax.plot(m, tps, marker="o", label=name)
  ax.set_xlabel("micro-batches in flight (m)")
  ax.set_ylabel("total tokens/s")
  ax.set_xscale("log", base=2)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
