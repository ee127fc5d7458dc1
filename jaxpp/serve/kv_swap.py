"""Swapping a sequence's KV blocks out of the paged pool to host memory and back.

With growth on (`kv_grow`) the engine admits a request with the blocks of its prompt and
one decode call, and grows them as decode goes on; when the pool runs dry it preempts the
most recently admitted sequence. Preemption by recompute (prefill the prompt and the tokens
so far again) would be cheaper in bytes but not exact: a batched prefill rounds its keys
and values differently from the one-token decode steps that wrote them, so in bf16 the
sequence's later tokens could change. Swapping copies the sequence's own blocks to the
host and, when blocks free up, back into fresh ones, bit for bit: the sequence goes on as
if it had never left, and its greedy tokens are the ones it would have produced.

A swap moves every stage's blocks (all layers, keys, values and an fp8 cache's scales) in
one gather and one scatter program per power-of-two block count (padded with the null
block, which no sequence reads), so a run compiles a handful of them. For the Llama-3-8B
shape a block of 64 positions is 8 MiB in bf16: a 1,024-token sequence is 136 MiB each way.
Neither direction makes the host wait. The copy out goes to pinned host memory, which the
device writes by DMA while it goes on decoding (the first GPU run copied to ordinary host
memory and waited: 28 swaps took 27% of the run's wall time, docs/benchmarks.md); the
gather is ordered before any later program that writes the freed blocks, as JAX orders a
buffer's readers before the writer it is donated to. The copy back is queued the same way
ahead of the scatter that places it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpp.serve import requests, slots

POOL_AXIS = 3  # the block axis of a pool [pp, v, Lc, dp * blocks, K, BS(, H)] and its scales
HOST = "pinned_host"  # where swapped-out blocks wait: host memory the devices copy to by DMA


class Swapped(NamedTuple):
  """A preempted sequence as the engine keeps it until it comes back."""

  request: object  # the engine's Request
  tokens: list[int]  # generated so far
  state: tuple  # its DecodeState row (token, length, remaining, done)
  blocks: tuple  # its blocks in host memory, one array per cache array (padded)
  count: int  # how many of the copied blocks are its own (the rest is padding)
  order: int  # its admission order, kept: a swapped sequence is still the older one
  logprobs: tuple | None  # its `TokenLogprobs` lists so far, if it asked for them


def padded(ids: list[int], null: int) -> np.ndarray:
  """`ids` padded with `null` (the replica's null block) to a power of two."""
  n = 1 << max(len(ids) - 1, 0).bit_length()
  return np.asarray(ids + [null] * (n - len(ids)), np.int32)


@jax.jit
def _gather(cache, ids):
  return tuple(jnp.take(a, ids, axis=POOL_AXIS) for a in cache)


@functools.partial(jax.jit, donate_argnums=0)
def _scatter(cache, ids, blocks):
  index = (slice(None),) * POOL_AXIS + (ids,)
  return tuple(a.at[index].set(b) for a, b in zip(cache, blocks))


def swap_out(cache, ids: list[int], null: int) -> tuple:
  """Copies in pinned host memory of the pool blocks `ids` (whole-pool indices) of every
  cache array, under way when this returns (nothing waits for them here)."""
  return tuple(jax.device_put(a, a.sharding.with_memory_kind(HOST))
               for a in _gather(cache, padded(ids, null)))


def swap_in(cache, ids: list[int], null: int, blocks: tuple):
  """The cache with `blocks` (from `swap_out`, padded alike) written at pool blocks `ids`;
  the padding goes to the null block. Each array keeps its sharding, so the decode and
  prefill programs see the cache they were compiled for."""
  shardings = [a.sharding for a in cache]  # read before the scatter donates the arrays
  back = tuple(jax.device_put(b, b.sharding.with_memory_kind("device")) for b in blocks)
  out = _scatter(cache, padded(ids, null), back)
  return tuple(jax.device_put(a, s) for a, s in zip(out, shardings))



# --- the engine's side (`serve/engine.py` calls these with itself) ----------------------------


def make_room(eng) -> None:
  """Before a decode call: grows every decoding row's blocks to hold the call's tokens,
  oldest sequence first; while its replica's pool cannot, swaps out that replica's most
  recently admitted sequence (the row itself, if it is the newest)."""
  pages = eng.pages
  for slot in sorted(eng.tokens, key=eng.order.__getitem__):
    if slot not in eng.tokens:  # swapped out for an older one
      continue
    request = eng.owner[slot[0]][slot[1]]
    need = pages.through_call(len(request.prompt), request.max_new_tokens,
                              int(eng.state.lengths[slot]))
    d = pages.replica(slot[1])
    while not pages.ensure(slot, need):
      victim = max((s for s in eng.tokens if pages.replica(s[1]) == d),
                   key=eng.order.__getitem__)
      _swap_out(eng, victim)
      if victim == slot:
        break


def _swap_out(eng, slot) -> None:
  pages, (j, r) = eng.pages, slot
  ids = pages.pool_ids(slot)
  blocks = swap_out(eng.cache, ids, pages.replica(r) * pages.blocks)
  eng.swapped.append(Swapped(eng.owner[j][r], eng.tokens.pop(slot),
                             tuple(np.array(f[slot]) for f in eng.state), blocks, len(ids),
                             eng.order.pop(slot), eng.logprobs.rows.pop(slot, None)))
  pages.release(slot)
  eng.owner[j][r] = None
  eng.state.done[slot] = True  # its row writes nowhere until a sequence takes it
  eng.stats.preemptions += 1


def restore(eng, live: np.ndarray) -> bool:
  """Brings swapped-out sequences back, oldest first, into free rows whose replica has
  the blocks (`live` [dp, M] counts rows in use and is updated); False while one cannot
  come back yet (the engine then admits nothing new, so it is not overtaken)."""
  pages = eng.pages
  while eng.swapped:
    back = min(eng.swapped, key=lambda s: s.order)
    request = back.request
    need = max(back.count * pages.block_size,
               pages.through_call(len(request.prompt), request.max_new_tokens,
                                  int(back.state[1])))
    at = slots.free_row(live, eng.owner, eng.replica_rows,
                        lambda d: pages.fits_positions(d, need))
    if int(live.sum()) >= eng.max_num_seqs or at is None:
      return False
    d, j, r = at
    if pages.admit_positions((j, r), request.prompt, need, share=False) is None:
      return False
    eng.cache = swap_in(eng.cache, pages.pool_ids((j, r))[:back.count], d * pages.blocks,
                        back.blocks)
    eng.swapped.remove(back)
    slot = (j, r)
    eng.owner[j][r], eng.order[slot], eng.tokens[slot] = request, back.order, back.tokens
    for field, value in zip(eng.state, back.state):
      field[slot] = value
    for name, value in requests.sampling_values(request).items():
      getattr(eng.sampling, name)[slot] = value
    eng.history.start(slot, request.prompt, back.tokens[0])
    eng.history.extend(slot, back.tokens[1:])
    if back.logprobs is not None:
      eng.logprobs.rows[slot] = back.logprobs
    live[d, j] += 1
  return True
