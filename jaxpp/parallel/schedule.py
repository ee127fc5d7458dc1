"""Pipeline schedules as data: a table (tick, device) -> (micro-batch, chunk, token) | idle.

One table drives the executor (`pipeline.py` indexes it inside the compiled program), gives
the analytic bubble fraction, and renders as text or PNG so people can look at it.

The circular schedule: `pp` devices, `v` virtual stages per device (device s holds global
chunks s, s+pp, s+2pp, ...), `m` micro-batches, `rounds` passes (decode tokens; 1 for
prefill). Micro-batch j runs global chunk c = r*pp + s of round k on device s at tick

    t = k*m*v + r*m + j + s.

With v = 1 and rounds = 1 this is GPipe fill-drain. When v > 1 or rounds > 1 the output of
the last device re-enters device 0 (next chunk or next token) m ticks after it left device
0's previous visit, so m >= pp is needed; then the pipe stays full and only the first fill
and the last drain are idle: bubble = (p-1) / (rounds*v*m + p-1).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxpp.errors import JaxppError

IDLE = -1


@dataclasses.dataclass(frozen=True)
class Schedule:
  """`table[t, s] = (micro_batch, local_chunk, round)`, all IDLE (-1) when device s idles."""

  pp: int
  virtual_stages: int
  microbatches: int
  rounds: int
  table: np.ndarray  # int32 [ticks, pp, 3]

  @property
  def ticks(self) -> int:
    return self.table.shape[0]

  def padded(self, multiple: int) -> np.ndarray:
    """The table with idle ticks appended up to a multiple of `multiple` ticks (the decode
    ring unrolls its tick loop by m, so it runs whole groups of m ticks)."""
    ticks = -(-self.ticks // multiple) * multiple
    out = np.full((ticks,) + self.table.shape[1:], IDLE, np.int32)
    out[:self.ticks] = self.table
    return out

  def busy(self) -> np.ndarray:
    """bool [ticks, pp]: device s computes at tick t."""
    return self.table[:, :, 0] != IDLE

  def bubble_fraction(self) -> float:
    """Share of device-ticks spent idle, counted from the table itself."""
    return 1.0 - float(self.busy().mean())

  def render_text(self) -> str:
    """One row per device, one column per tick: `j.c` = micro-batch j on global chunk c."""
    width = len(f"{self.microbatches - 1}.{self.pp * self.virtual_stages - 1}")
    rows = []
    for s in range(self.pp):
      cells = []
      for t in range(self.ticks):
        j, r, _ = self.table[t, s]
        cells.append("." * width if j == IDLE else f"{j}.{r * self.pp + s}".rjust(width))
      rows.append(f"dev{s} | " + " ".join(cells))
    return "\n".join(rows)

  def render_png(self, path: str, tick_seconds: float | None = None, title: str = "") -> None:
    """A Gantt picture of the table (matplotlib; imported here so it is only needed here).

    With `tick_seconds` (a measured tick time) the x axis is in milliseconds: the executor
    is lock-step, so every device's slot in a tick lasts the measured tick.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    w = 1.0 if tick_seconds is None else tick_seconds * 1e3
    fig, ax = plt.subplots(figsize=(max(6, self.ticks * 0.3), 0.5 * self.pp + 1))
    cmap = plt.get_cmap("tab20")
    for t in range(self.ticks):
      for s in range(self.pp):
        j, r, _ = self.table[t, s]
        if j != IDLE:
          ax.barh(s, w, left=t * w, color=cmap(j % 20), edgecolor="black", linewidth=0.3)
          ax.text((t + 0.5) * w, s, str(r * self.pp + s), ha="center", va="center",
                  fontsize=6)
    ax.set_yticks(range(self.pp), [f"device {s}" for s in range(self.pp)])
    ax.invert_yaxis()
    unit = "tick" if tick_seconds is None else "ms"
    ax.set_xlabel(f"{unit} (colour = micro-batch, label = chunk)")
    ax.set_title(title or f"pp={self.pp} v={self.virtual_stages} m={self.microbatches} "
                 f"bubble={self.bubble_fraction():.1%}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Prefill micro-batches per pipeline stage when none are asked for. Prefill's fill and drain
# cost (p-1)/(m+p-1) of it, so more micro-batches help until their matmuls get too small: on
# 4 x H200, llama3-8b shape, 64 slots x 1024 tokens, pp=4 prefill went 58% -> 74% -> 84% ->
# 88% -> 87% of ideal strong scaling at m = 4, 8, 16, 32, 64. Small micro-batches also let a
# refill of a few slots prefill only those (engine.py): on a mixed-length workload one H200
# (pp=1) went 1.84x faster with 8 than with 1 (docs/benchmarks.md).
PREFILL_MICROBATCHES_PER_STAGE = 8


def prefill_microbatches(requested: int, pp: int, microbatches: int,
                         slots: int | None = None) -> int:
  """Micro-batches a prefill of every slot is cut into.

  `requested` wins when set (> 0); otherwise PREFILL_MICROBATCHES_PER_STAGE per stage, and
  never fewer than the decode ring's `microbatches`. With `slots`, never more than the
  slots: a micro-batch needs at least one row.
  """
  n = requested or max(microbatches, PREFILL_MICROBATCHES_PER_STAGE * pp)
  return min(n, slots) if slots else n


def formula_bubble(pp: int, virtual_stages: int, microbatches: int, rounds: int = 1) -> float:
  """The analytic bubble (p-1)/(v*m*rounds + p-1)."""
  return (pp - 1) / (virtual_stages * microbatches * rounds + pp - 1)


def circular(pp: int, virtual_stages: int, microbatches: int, rounds: int = 1) -> Schedule:
  """The circular (interleaved) schedule; GPipe when virtual_stages = rounds = 1."""
  v, m = virtual_stages, microbatches
  if min(pp, v, m, rounds) < 1:
    raise JaxppError(f"pp={pp}, virtual_stages={v}, microbatches={m}, rounds={rounds} "
                     "must all be >= 1")
  if (v > 1 or rounds > 1) and m < pp:
    what = "virtual_stages > 1" if v > 1 else "the decode ring"
    raise JaxppError(f"microbatches={m} < pp={pp}: {what} needs at least pp micro-batches "
                     "in flight")
  ticks = rounds * v * m + pp - 1
  table = np.full((ticks, pp, 3), IDLE, np.int32)
  for t in range(ticks):
    for s in range(pp):
      x = t - s
      if 0 <= x < rounds * v * m:
        table[t, s] = (x % m, (x // m) % v, x // (m * v))
  return Schedule(pp, v, m, rounds, table)


def gpipe(pp: int, microbatches: int) -> Schedule:
  """Fill-drain: every micro-batch through every stage once."""
  return circular(pp, 1, microbatches)
