"""The engine's paged KV cache on the host: each replica's block allocator and every slot's
block table.

A dense cache gives every slot max_len positions on every stage up front, so the number of
sequences in flight is fixed by the longest request a run could meet. With pages, each
replica's pool holds `blocks` blocks of `block_size` positions (`Pipeline.pool_shape`); a
request is admitted when a slot is free and its prompt plus max_new_tokens fit the free
blocks (allocated whole on admission: no growth, so no preemption and nothing to recompute),
and its blocks return when it finishes. With `grow`, admission takes only the prompt's
blocks and one decode call's (`chunk` tokens), and `ensure` grows a row's blocks before
each decode call; when the pool cannot, the engine swaps a sequence out (`kv_swap.py`).
With the prefix cache, a prompt whose next uncached block another prompt of its replica
is computing right now waits for it (`takes_now`): admitted together, a burst of prompts
with one system prompt would each compute it; one after the other, all but the first
reuse it (SGLang defers in-batch prefix sharers the same way).
The tables [M, rows, nblk] go to every decode call
(the rows' blocks); a prefill gets each prompt token's (block, offset) instead. A finished
slot's table is reset to NULL_BLOCK before the next call, so the junk a finished row keeps
writing lands in the null block, never in blocks handed on to another request.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np

from jaxpp.errors import JaxppError
from jaxpp.model.kv_cache import KV_DTYPES, NULL_BLOCK
from jaxpp.serve import defaults
from jaxpp.serve.kv_blocks import Allocation, BlockAllocator, block_keys


def check_options(block_size: int, kv_cache_memory: float, prefix_cache: bool,
                  prefill_chunk: int, where: str = "", kv_dtype: str = "auto",
                  kv_grow: bool = False) -> None:
  """Refuses KV cache knobs no engine can take, one line naming the knob (`where` prefixes
  its name: the job checks its config's `engine.` section before anything compiles)."""
  if kv_dtype not in KV_DTYPES:
    raise JaxppError(f"{where}kv_dtype={kv_dtype!r} is not one of {', '.join(KV_DTYPES)} "
                     "(auto: the activations' dtype; fp8: e4m3, half the bytes)")
  if block_size and (block_size < 16 or block_size & (block_size - 1)):
    raise JaxppError(f"{where}block_size={block_size} must be a power of two >= 16 (0: a "
                     "dense cache)")
  if kv_cache_memory < 0:
    raise JaxppError(f"{where}kv_cache_memory={kv_cache_memory} must be >= 0 (0: "
                     f"{defaults.KV_MEMORY_SHARE:g} of free memory after the weights, <= 1: "
                     "that share, > 1: GB)")
  if prefill_chunk < 0:
    raise JaxppError(f"{where}prefill_chunk={prefill_chunk} must be >= 0 (0: whole prompts)")
  if kv_grow and jax.process_count() > 1:
    raise JaxppError(f"{where}kv_grow swaps KV blocks through one process's host memory; "
                     "it runs in one process only")
  if (prefix_cache or prefill_chunk or kv_grow) and not block_size:
    raise JaxppError(f"{where}prefix_cache, {where}prefill_chunk and {where}kv_grow need a "
                     f"paged KV cache ({where}block_size > 0)")


class PagedSlots:
  """Block allocators (one a replica, `blocks` each, the null block among them) and the
  block tables of M x rows slots with a context of `max_len` positions (`block_size` as
  `check_options` takes it)."""

  def __init__(self, M: int, rows: int, dp: int, max_len: int, blocks: int, block_size: int,
               prefix_cache: bool = False, grow: bool = False, chunk: int = 1):
    self.block_size, self.dp, self.replica_rows = block_size, dp, rows // dp
    self.prefix_cache = prefix_cache
    self.grow, self.chunk = grow, chunk
    self.nblk = math.ceil(max_len / block_size)
    self.allocators = [BlockAllocator(blocks, block_size, prefix_cache=prefix_cache)
                       for _ in range(dp)]
    self.tables = np.full((M, rows, self.nblk), NULL_BLOCK, np.int32)
    self.held: dict[tuple[int, int], Allocation] = {}
    # prefix keys of the full prompt blocks a slot is computing, until its prefill is done
    # (`prefilled`) or it leaves (`release`)
    self.computing_of: dict[tuple[int, int], tuple[bytes, ...]] = {}

  @property
  def blocks(self) -> int:
    """Blocks each replica's pool holds (the null block counted)."""
    return self.allocators[0].num_blocks

  def replica(self, row: int) -> int:
    return row // self.replica_rows

  def positions(self, prompt_len: int, max_new: int) -> int:
    """Cache positions a request writes: its prompt and every token but the last, plus the
    one a finished row keeps writing until its slot is retired, within the table's nblk
    blocks (a write past them goes to the null block)."""
    return min(prompt_len + max_new, self.nblk * self.block_size)

  def reserve(self, prompt_len: int, max_new: int) -> int:
    """Positions admission takes: all of `positions`, or with growth the prompt's and one
    decode call's."""
    return self.through_call(prompt_len, max_new, prompt_len) if self.grow else (
        self.positions(prompt_len, max_new))

  def through_call(self, prompt_len: int, max_new: int, length: int) -> int:
    """Positions a growing sequence holding `length` must have for its next decode call
    (`chunk` more), at most all of `positions`."""
    return min(self.positions(prompt_len, max_new), length + self.chunk)

  def check(self, key: str, prompt_len: int, max_new: int) -> None:
    """Refuses a request no replica's pool could ever hold (one line)."""
    need = self.positions(prompt_len, max_new)
    if not self.allocators[0].fits_ever(need):
      raise JaxppError(
          f"request {key}: prompt of {prompt_len} tokens + max_new_tokens={max_new} needs "
          f"{self.allocators[0].blocks_for(need)} KV blocks of {self.block_size} positions; "
          f"the cache holds {self.blocks - 1} (raise engine.kv_cache_memory or lower "
          "max_len)")

  def admit(self, slot: tuple[int, int], prompt: Sequence[int], max_new: int,
            share: bool = True) -> Allocation | None:
    """Blocks for a request in `slot` (its table filled), or None when its replica's free
    blocks do not hold it now; with the prefix cache on its `cached` prompt tokens are
    already in the first of them (`share=False`: none are)."""
    got = self.admit_positions(slot, prompt, self.reserve(len(prompt), max_new), share)
    if got is not None and self.prefix_cache:
      self.computing_of[slot] = got.keys[got.cached // self.block_size:]
    return got

  def admit_positions(self, slot: tuple[int, int], prompt: Sequence[int], positions: int,
                      share: bool = True) -> Allocation | None:
    """`admit` of `positions` positions (a swapped-out sequence coming back takes what it
    held)."""
    return self._hold(slot, self.allocators[self.replica(slot[1])].admit(prompt, positions,
                                                                          share))

  def ensure(self, slot: tuple[int, int], positions: int) -> bool:
    """Grows the slot's blocks to hold `positions` positions (its table too); False, with
    nothing changed, if its replica's pool cannot now."""
    got = self.allocators[self.replica(slot[1])].grow(self.held[slot], positions)
    return self._hold(slot, got) is not None

  def _hold(self, slot: tuple[int, int], got: Allocation | None) -> Allocation | None:
    """Records `got` (unless None) as the slot's blocks, in its table too."""
    if got is not None:
      self.held[slot] = got
      self.tables[slot][:len(got.blocks)] = got.blocks
    return got

  def pool_ids(self, slot: tuple[int, int]) -> list[int]:
    """The slot's blocks as indices of the whole pool's block axis (replica d's block i is
    d * blocks + i: `Pipeline.pool_shape`)."""
    offset = self.replica(slot[1]) * self.blocks
    return [offset + b for b in self.held[slot].blocks]

  def writes(self, slot: tuple[int, int], start: int, end: int) -> np.ndarray:
    """i32 [end - start, 2]: (block, offset) of the slot's prompt positions [start, end)."""
    got = self.held[slot]
    at = np.arange(start, end)
    blocks = np.asarray(got.blocks, np.int32)[at // self.block_size]
    return np.stack([blocks, at % self.block_size], axis=1).astype(np.int32)

  def prefilled(self, slot: tuple[int, int], prompt: Sequence[int]) -> None:
    """The slot's prompt is in its blocks: its full blocks may now serve other prompts."""
    self.allocators[self.replica(slot[1])].register(self.held[slot], prompt)
    self.computing_of.pop(slot, None)

  def release(self, slot: tuple[int, int]) -> None:
    """The slot's request finished: its blocks go back, its table to the null block."""
    got = self.held.pop(slot)
    self.computing_of.pop(slot, None)
    self.allocators[self.replica(slot[1])].release(got)
    self.tables[slot] = NULL_BLOCK

  def fits_now(self, d: int, prompt_len: int, max_new: int) -> bool:
    """Whether replica d could take such a request now, ignoring the prefix cache's hits
    (a cheap check for choosing a replica: `admit` decides)."""
    return self.fits_positions(d, self.reserve(prompt_len, max_new))

  def takes_now(self, d: int, prompt: Sequence[int], max_new: int, share: bool) -> bool:
    """`fits_now`, and with the prefix cache (and `share`) the prompt's next uncached
    block is not being computed by another prompt of replica d: better to wait one step
    and reuse it than compute it twice."""
    if not self.fits_now(d, len(prompt), max_new):
      return False
    computing = {key for slot, keys in self.computing_of.items()
                 if self.replica(slot[1]) == d for key in keys}
    if not (self.prefix_cache and share and computing):
      return True
    keys = block_keys(prompt, self.block_size)
    reusable = max(len(prompt) - 1, 0) // self.block_size
    cached = len(self.allocators[d].cached_prefix(keys, len(prompt)))
    return cached == reusable or keys[cached] not in computing

  def fits_positions(self, d: int, positions: int) -> bool:
    """Whether replica d's free and evictable blocks hold `positions` positions now."""
    a = self.allocators[d]
    return a.blocks_for(positions) <= a.free_blocks + a.cached_blocks

  def stats(self) -> dict:
    """Peak and current blocks in use and the prefix cache's hits, over the replicas."""
    a = self.allocators
    return dict(block_size=self.block_size, blocks=self.blocks - 1,
                peak_blocks=max(x.peak_used for x in a),
                prefix_hit_tokens=sum(x.hit_tokens for x in a),
                prefix_lookup_tokens=sum(x.lookup_tokens for x in a),
                prefix_evictions=sum(x.evictions for x in a))
