"""The bench's pictures (PNG, matplotlib): throughput against micro-batches, and the decode
schedule of each pipeline layout drawn at its measured tick time.

The executor is lock-step (every device runs one table tick at a time and the ring's send
ends it), so a layout's stage activity is its schedule table with every tick lasting the
measured tick time; the Gantt is that picture, with the measured p50 tick. With
`--profile_dir`, `activity_png` draws what the devices really did: each device's kernels of
each program, from the trace (the whole traced wave, then its first decode call).
"""

from __future__ import annotations

import collections
import pathlib

from jaxpp.parallel import schedule

GANTT_ROUNDS = 2  # decode rounds drawn: the fill, one steady round and the drain


def write(rows: list[dict], out: pathlib.Path, decode_chunk: int) -> list[pathlib.Path]:
  """throughput.png and one gantt_<layout>.png per pipeline row (pp > 1); returns the paths."""
  paths = [out / "throughput.png"]
  throughput_png(rows, paths[0])
  for row in rows:
    if row["layout"].startswith("pp") and row["pp"] > 1:  # one stage has no schedule to draw
      path = out / f"gantt_{row['layout']}_{row['quant']}_{row['attention']}.png"
      sched = schedule.circular(row["pp"], row["virtual_stages"], row["microbatches"],
                                rounds=min(decode_chunk, GANTT_ROUNDS))
      sched.render_png(str(path), tick_seconds=row["tick_seconds"]["p50"], title=(
          f"{row['layout']} ({row['quant']}, {row['attention']} attention): "
          f"{sched.rounds} of {decode_chunk} decode rounds\n"
          f"p50 tick {row['tick_seconds']['p50'] * 1e3:.2f} ms, measured bubble "
          f"{row['bubble_measured']:.1%}"))
      paths.append(path)
  return paths


def throughput_png(rows: list[dict], path: pathlib.Path) -> None:
  """Total tokens/s against micro-batches, one line per pp x tp x v x quant x attention."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  families = collections.defaultdict(list)
  for r in rows:
    name = (f"pp{r['pp']}tp{r['tp']}v{r['virtual_stages']}" if r["layout"].startswith("pp")
            else r["layout"])
    families[f"{name} {r['quant']} {r['attention']}"].append(
        (r["microbatches"], r["total_tokens_per_second"]))
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


def activity_png(act: dict[str, dict[str, list]], path: pathlib.Path, title: str) -> None:
  """Measured stage activity from `trace_summary.activity`: one row per device, a bar where
  it ran kernels, coloured by program; the whole traced window, then the first decode call."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from jaxpp.bench import trace_summary

  devices = list(act)
  busy = collections.Counter()
  for progs in act.values():
    for m, spans in progs.items():
      busy[m] += sum(b - a for a, b in spans)
  programs = [m for m, _ in busy.most_common()]
  # programs under 1% of the kernel time share one grey, unlabelled
  colors = {m: plt.cm.tab10(i % 10) if busy[m] >= 0.01 * sum(busy.values()) else "0.6"
            for i, m in enumerate(programs)}
  t0 = min(a for progs in act.values() for spans in progs.values() for a, _ in spans)
  decode = [m for m in programs if "decode" in m]
  windows = [("whole traced wave", None)]
  if decode:
    windows.append((f"first {decode[0]} call", trace_summary.first_call(
        [i for progs in act.values() for i in progs.get(decode[0], [])])))
  fig, axes = plt.subplots(len(windows), 1, figsize=(11, 1.2 + 0.9 * len(devices)),
                           squeeze=False)
  for ax, (name, window) in zip(axes[:, 0], windows):
    lo, hi = window or (t0, max(b for p in act.values() for s in p.values() for _, b in s))
    for y, d in enumerate(devices):
      for m, spans in act[d].items():
        bars = [((max(a, lo) - t0) / 1e6, (min(b, hi) - max(a, lo)) / 1e6)
                for a, b in spans if b > lo and a < hi]
        ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=colors[m],
                       label=m if colors[m] != "0.6" else None)
    ax.set_xlim((lo - t0) / 1e6, (hi - t0) / 1e6)
    ax.set_yticks(range(len(devices)), devices, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"ms since the trace's first kernel ({name})")
  handles, labels = axes[0, 0].get_legend_handles_labels()
  unique = dict(zip(labels, handles))
  axes[0, 0].legend(unique.values(), unique.keys(), fontsize=7, loc="upper left",
                    bbox_to_anchor=(1.01, 1.0))
  axes[0, 0].set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
