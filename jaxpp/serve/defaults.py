"""Run knobs that follow the layout and the model when left at 0, and warnings for choices
that are known to cost.

A user who changes `pp` should not have to know that harbor.py's four micro-batches were
chosen for pp=4: at pp=1 they make every decode tick re-read all weights for a quarter of
the rows (decode 3.0x slower on one H200, docs/benchmarks.md). So micro-batches default to
pp (`Layout.m`), the decode chunk to the shortest whose fill and drain cost at most
BUBBLE_TARGET of a call, and the slot count to what the devices' free memory holds (up to
MAX_AUTO_SLOTS), or 4 per micro-batch where a device reports no memory (CPU).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxpp.parallel.layout import Layout
from jaxpp.parallel.pipeline import Pipeline

BUBBLE_TARGET = 0.05  # the decode ring's fill + drain share of one decode call, at most
MIN_DECODE_CHUNK = 16  # tokens per return to the host: launch and fetch cost amortised
MAX_DECODE_CHUNK = 64
MAX_AUTO_SLOTS = 256  # sequences in flight chosen by memory (beyond: weights read per row)
SLOTS_PER_MICROBATCH_CPU = 4
KV_MEMORY_SHARE = 0.8  # of a device's free memory after weights, for the KV cache


def decode_chunk(layout: Layout) -> int:
  """Decode rounds per call: the fewest (a multiple of 8, at least MIN_DECODE_CHUNK) whose
  bubble (p-1)/(k·v·m + p-1) is at most BUBBLE_TARGET."""
  p, vm = layout.pp, layout.virtual_stages * layout.m
  need = math.ceil((p - 1) * (1 / BUBBLE_TARGET - 1) / vm)
  return min(MAX_DECODE_CHUNK, max(MIN_DECODE_CHUNK, -(-need // 8) * 8))


def max_num_seqs(pipe: Pipeline, max_len: int, dtype_bytes: int) -> int:
  """Slots of all replicas: each replica as many as KV_MEMORY_SHARE of the fullest
  device's free memory holds at `max_len` positions each (a multiple of m, at most
  MAX_AUTO_SLOTS), measured after the weights are placed; SLOTS_PER_MICROBATCH_CPU x m
  where devices report no memory. A device holds only its own replica's slots.

  Each process reads its own devices; with several, they agree on the smallest count (one
  small all-gather), since every process must run the same programs.
  """
  m = pipe.microbatches
  mine = [d for d in pipe.mesh.devices.flat if d.process_index == jax.process_index()]
  stats = [d.memory_stats() for d in mine]
  if not all(s and "bytes_limit" in s for s in stats):
    fit = SLOTS_PER_MICROBATCH_CPU * m
  else:
    free = min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
    per_slot = pipe.cache_bytes_per_slot(max_len, dtype_bytes)
    fit = max(m, min(MAX_AUTO_SLOTS, int(KV_MEMORY_SHARE * max(free, 0) // per_slot)) // m * m)
  if jax.process_count() > 1:
    fit = int(np.min(multihost_utils.process_allgather(np.int32(fit))))
  return fit * pipe.dp


def warnings(layout: Layout) -> list[str]:
  """One line for each explicit choice of `layout` known to cost, with the reason."""
  out = []
  if layout.microbatches > layout.pp:
    out.append(f"schedule.microbatches={layout.microbatches} > pp={layout.pp}: every decode "
               f"round reads each stage's weights {layout.microbatches} times where "
               f"{layout.pp} would keep the ring full, so decode runs up to "
               f"{layout.microbatches / layout.pp:g}x slower (0 = pp)")
  return out
