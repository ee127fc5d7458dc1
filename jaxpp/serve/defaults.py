"""Run knobs that follow the layout and the model when left at 0, and warnings for choices
that are known to cost.

A user who changes `pp` should not have to know that harbor.py's four micro-batches were
chosen for pp=4: at pp=1 they make every decode tick re-read all weights for a quarter of
the rows (decode 3.0x slower on one H200, docs/benchmarks.md). So micro-batches default to
pp (`Layout.m`), the decode chunk to the shortest whose fill and drain cost at most
BUBBLE_TARGET of a call, the slot count to what the devices' free memory holds (up to
MAX_AUTO_SLOTS; a paged cache: that cap), or 4 per micro-batch where a device reports no
memory (CPU), and a paged cache's blocks to a share of the free memory (`kv_blocks`).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxpp.errors import JaxppError
from jaxpp.parallel.layout import Layout
from jaxpp.parallel.pipeline import Pipeline

BUBBLE_TARGET = 0.05  # the decode ring's fill + drain share of one decode call, at most
MIN_DECODE_CHUNK = 16  # tokens per return to the host: launch and fetch cost amortised
MAX_DECODE_CHUNK = 64
MAX_AUTO_SLOTS = 256  # sequences in flight chosen by memory (beyond: weights read per row)
SLOTS_PER_MICROBATCH_CPU = 4
KV_MEMORY_SHARE = 0.8  # of a device's free memory after weights, for the KV cache
BLOCK_SIZE = 64  # positions a paged KV block holds (the decode kernel's step; 0: dense)


def decode_chunk(layout: Layout) -> int:
  """Decode rounds per call: the fewest (a multiple of 8, at least MIN_DECODE_CHUNK) whose
  bubble (p-1)/(k·v·m + p-1) is at most BUBBLE_TARGET."""
  p, vm = layout.pp, layout.virtual_stages * layout.m
  need = math.ceil((p - 1) * (1 / BUBBLE_TARGET - 1) / vm)
  return min(MAX_DECODE_CHUNK, max(MIN_DECODE_CHUNK, -(-need // 8) * 8))


def _free_bytes(pipe: Pipeline) -> int | None:
  """The least free memory of this process's devices of `pipe` (None where a device reports
  none: CPU)."""
  mine = [d for d in pipe.mesh.devices.flat if d.process_index == jax.process_index()]
  stats = [d.memory_stats() for d in mine]
  if not all(s and "bytes_limit" in s for s in stats):
    return None
  return max(min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats), 0)


def _agreed(n: int) -> int:
  """The smallest of every process's `n`: each process reads its own devices, and all must
  run the same programs (one small all-gather with several)."""
  if jax.process_count() > 1:
    return int(np.min(multihost_utils.process_allgather(np.int32(n))))
  return n


def max_num_seqs(pipe: Pipeline, max_len: int, dtype, paged: bool = False) -> int:
  """Slots of all replicas. A dense cache: each replica as many as KV_MEMORY_SHARE of the
  fullest device's free memory holds at `max_len` positions each (a multiple of m, at
  most MAX_AUTO_SLOTS), measured after the weights are placed. A paged cache: the cap,
  MAX_AUTO_SLOTS a replica (its blocks decide how many are in flight). Either way
  SLOTS_PER_MICROBATCH_CPU x m where devices report no memory. A device holds only its own
  replica's slots. `dtype`: the cache's storage (kv_cache.storage_dtype).
  """
  m = pipe.microbatches
  free = _free_bytes(pipe)
  if free is None:
    fit = SLOTS_PER_MICROBATCH_CPU * m
  elif paged:
    fit = max(m, MAX_AUTO_SLOTS // m * m)
  else:
    per_slot = pipe.cache_bytes_per_slot(max_len, dtype)
    fit = max(m, min(MAX_AUTO_SLOTS, int(KV_MEMORY_SHARE * free // per_slot)) // m * m)
  return _agreed(fit) * pipe.dp


def kv_blocks(pipe: Pipeline, block_size: int, dtype, kv_cache_memory: float,
              dense_equivalent: int) -> int:
  """Blocks of each replica's KV pool, the null block counted, from the budget per device:
  `kv_cache_memory` 0 is KV_MEMORY_SHARE of the fullest device's free memory after the
  weights, a value <= 1 another share of it, above 1 that many GB. Devices that report no
  memory (CPU) get `dense_equivalent` (what a dense cache of the same slots holds) unless
  the budget is in GB (`kv_pages.check_options` has refused a negative one)."""
  per_block = pipe.block_bytes(block_size, dtype)
  free = _free_bytes(pipe)
  if kv_cache_memory > 1:
    budget = kv_cache_memory * 1e9
  elif free is None:
    return dense_equivalent
  else:
    budget = (kv_cache_memory or KV_MEMORY_SHARE) * free
  blocks = int(budget // per_block)
  if blocks < 2:
    raise JaxppError(f"kv_cache_memory={kv_cache_memory:g} holds {blocks} KV blocks of "
                     f"{per_block / 1e6:.1f} MB per device; it needs at least 2")
  return _agreed(blocks)


def warnings(layout: Layout) -> list[str]:
  """One line for each explicit choice of `layout` known to cost, with the reason."""
  out = []
  if layout.microbatches > layout.pp:
    out.append(f"schedule.microbatches={layout.microbatches} > pp={layout.pp}: every decode "
               f"round reads each stage's weights {layout.microbatches} times where "
               f"{layout.pp} would keep the ring full, so decode runs up to "
               f"{layout.microbatches / layout.pp:g}x slower (0 = pp)")
  return out
