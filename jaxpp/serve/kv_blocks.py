"""The host-side allocator of a paged KV cache: which blocks each sequence's keys go in.

Each pipeline stage's KV cache is a pool of `num_blocks` blocks of `block_size` positions,
and every sequence (a request in a decode slot) reads and writes through its block table.
By default the engine admits a request only when all the blocks it will ever write are free
(prompt plus `max_new_tokens` positions, taken up front), so a sequence never grows and is
never preempted. With growth on (`kv_grow`) it takes the prompt's blocks and a decode
call's worth, and `grow`s the allocation as decode goes on (the engine swaps a sequence
out when the pool runs dry: `serve/kv_swap.py`). The engine gives the blocks back when the
request finishes.

Block 0 is the NULL block: it is never handed out, so rows of padding and finished rows
can write there without a branch, and nothing ever reads it.

With prefix caching on, full blocks of prompt tokens are shared. The i-th full block of a
prompt is named by a key that chains every block before it (`block_keys`), so two blocks
share a key only when the whole prompt up to their end is equal, and reusing a block means
reusing its prefix. A block whose last sequence finished stays in the pool holding its
keys and values (evictable, least recently released first) until a fresh block is needed
and the free list is empty.

Every call costs O(blocks of the sequence): no call scans the pool.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import heapq
from collections.abc import Sequence

import numpy as np

from jaxpp.errors import JaxppError

NULL_BLOCK = 0


@dataclasses.dataclass(frozen=True)
class Allocation:
  """One sequence's share of the pool, as `BlockAllocator.admit` hands it out.

  `blocks` is the sequence's block table in position order (ids >= 1); `cached` counts the
  prompt tokens whose keys and values already sit in those blocks (a multiple of the block
  size: the prefill starts there); `keys` names the prompt's full blocks for `register`
  (empty without prefix caching).
  """

  blocks: tuple[int, ...]
  cached: int
  keys: tuple[bytes, ...]


def block_keys(prompt: Sequence[int], block_size: int) -> tuple[bytes, ...]:
  """The prefix keys of the prompt's full blocks: k_i = blake2b(k_{i-1} + block i's ids).

  The ids are hashed as little-endian int64, a fixed width, so that no two different id
  sequences give the same bytes; chaining the previous key makes a key stand for the whole
  prefix, not one block of it. A 16-byte digest makes an accidental collision (which
  would serve another prompt's keys and values) about as likely as a hardware fault.
  """
  ids = np.asarray(prompt, dtype="<i8")
  keys, previous = [], b""
  for i in range(len(ids) // block_size):
    digest = hashlib.blake2b(previous, digest_size=16)
    digest.update(ids[i * block_size:(i + 1) * block_size].tobytes())
    previous = digest.digest()
    keys.append(previous)
  return tuple(keys)


class BlockAllocator:
  """Hands out blocks of one KV-cache pool to sequences, optionally sharing prompt prefixes.

  Determinism: free blocks sit in a min-heap (`heapq`) and the lowest id goes first, so the
  same calls give the same block tables on every run and every host (a multi-host job's
  processes must agree on them without talking), and a lightly loaded pool keeps to its low
  ids, which makes tables easy to read when debugging. Evictable blocks sit in an
  `OrderedDict` in release order, which is just as deterministic.

  Every block is in exactly one of three states: free (in the heap), cached (reference
  count 0, published under a key, in the LRU), or used (reference count >= 1), so
  `free_blocks + cached_blocks + used_blocks == num_blocks - 1` always.
  """

  def __init__(self, num_blocks: int, block_size: int, *, prefix_cache: bool = False):
    if num_blocks < 2:
      raise JaxppError(f"a KV pool needs num_blocks >= 2 (block 0 is the null block), "
                       f"got {num_blocks}")
    if block_size < 1:
      raise JaxppError(f"a KV block needs block_size >= 1, got {block_size}")
    self.num_blocks = int(num_blocks)
    self.block_size = int(block_size)
    self.prefix_cache = bool(prefix_cache)
    self._free = list(range(1, self.num_blocks))  # ascending: already a valid heap
    self._refs = [0] * self.num_blocks  # live sequences holding each block
    self._lru: collections.OrderedDict[int, bytes] = collections.OrderedDict()  # oldest first
    self._block_of_key: dict[bytes, int] = {}  # published prefixes
    self._key_of_block: dict[int, bytes] = {}  # the inverse, for release and eviction
    # Live allocations by their last block, which is always private to its sequence (the
    # block holding the last prompt token is never reused, and later ones are fresh): a
    # release or register finds its allocation in O(1) and tells a stale copy by identity.
    self._live: dict[int, Allocation] = {}
    self._used = 0
    self._peak_used = 0
    self._hit_tokens = 0
    self._lookup_tokens = 0
    self._evictions = 0

  # -- sizes -------------------------------------------------------------------------------

  def blocks_for(self, positions: int) -> int:
    """Blocks that hold `positions` cache positions: ceil(positions / block_size)."""
    return -(-int(positions) // self.block_size)

  def fits_ever(self, positions: int) -> bool:
    """Whether a sequence of `positions` positions fits the pool when nothing else is in it
    (the null block is never handed out)."""
    return self.blocks_for(positions) <= self.num_blocks - 1

  # -- the three calls ---------------------------------------------------------------------

  def admit(self, prompt: Sequence[int], positions: int, share: bool = True
            ) -> Allocation | None:
    """Every block a new sequence will write, or None (nothing changed) if the pool can't
    give them now.

    `positions` is every cache position the sequence will ever write (the engine passes
    len(prompt) + max_new_tokens). With prefix caching, the longest run of published
    blocks from the prompt's start is reused, but only blocks lying entirely inside
    prompt[:-1]: the last prompt token is always computed, since its logits give the first
    sampled token. Other blocks come from the free list, then by evicting the least
    recently released cached block. `share=False` reuses nothing (the sequence's own blocks
    are still published by `register`).
    """
    n = len(prompt)
    if positions < max(n, 1):
      raise JaxppError(f"a sequence writes at least its prompt and one position: "
                       f"positions={positions} for a prompt of {n} tokens")
    need = self.blocks_for(positions)
    if not self.fits_ever(positions):
      raise JaxppError(f"a sequence of {positions} positions needs {need} blocks of "
                       f"{self.block_size}; the pool has {self.num_blocks - 1} "
                       f"(check fits_ever first)")
    keys, hits = (), []
    if self.prefix_cache:
      keys = block_keys(prompt, self.block_size)
      hits = self.cached_prefix(keys, n) if share else []
    fresh = need - len(hits)
    hits_evictable = sum(1 for b in hits if self._refs[b] == 0)
    if fresh > len(self._free) + len(self._lru) - hits_evictable:
      return None
    for block in hits:  # take reused blocks off the LRU before anything is evicted
      if self._refs[block] == 0:
        del self._lru[block]
        self._used += 1
      self._refs[block] += 1
    blocks = hits + [self._take_fresh() for _ in range(fresh)]
    self._used += fresh
    self._peak_used = max(self._peak_used, self._used)
    if self.prefix_cache and share:
      self._lookup_tokens += n
      self._hit_tokens += len(hits) * self.block_size
    allocation = Allocation(tuple(blocks), len(hits) * self.block_size, keys)
    self._live[blocks[-1]] = allocation
    return allocation

  def cached_prefix(self, keys: tuple[bytes, ...], prompt_len: int) -> list[int]:
    """The published blocks of the longest run of a prompt's block `keys` from its start,
    among those lying entirely inside prompt[:-1] (the ones `admit` may reuse)."""
    hits = []
    for key in keys[:max(prompt_len - 1, 0) // self.block_size]:
      block = self._block_of_key.get(key)
      if block is None:
        break
      hits.append(block)
    return hits

  def grow(self, allocation: Allocation, positions: int) -> Allocation | None:
    """The allocation extended with fresh blocks to hold `positions` positions (itself when
    it already does), or None (nothing changed) if the pool can't give them now. The
    returned allocation replaces the old one, which is no longer live."""
    self._check_live(allocation, "grow")
    need = self.blocks_for(positions) - len(allocation.blocks)
    if need <= 0:
      return allocation
    if need > len(self._free) + len(self._lru):
      return None
    fresh = tuple(self._take_fresh() for _ in range(need))
    self._used += need
    self._peak_used = max(self._peak_used, self._used)
    grown = dataclasses.replace(allocation, blocks=allocation.blocks + fresh)
    del self._live[allocation.blocks[-1]]
    self._live[fresh[-1]] = grown
    return grown

  def register(self, allocation: Allocation, prompt: Sequence[int]) -> None:
    """Publishes the allocation's full prompt blocks under their keys, once the prefill has
    computed them, so later prompts with the same prefix reuse them.

    A key already published (two requests with the same prefix admitted together) keeps
    its first block; the duplicate stays private to its sequence and is freed with it.
    No-op without prefix caching.
    """
    self._check_live(allocation, "register")
    if not self.prefix_cache:
      return
    if len(prompt) // self.block_size != len(allocation.keys):
      raise JaxppError(f"register got a prompt of {len(prompt)} tokens, but the allocation "
                       f"was made for one with {len(allocation.keys)} full blocks")
    for block, key in zip(allocation.blocks, allocation.keys):
      if key not in self._block_of_key and block not in self._key_of_block:
        self._block_of_key[key] = block
        self._key_of_block[block] = key

  def release(self, allocation: Allocation) -> None:
    """Gives a finished sequence's blocks back: a block no sequence holds any more becomes
    evictable if it is published under a key, else free.

    Blocks go on the LRU last block first, so a prefix's tail is evicted before its head:
    a tail is useless without its head, while a head alone still serves shorter prompts.
    """
    self._check_live(allocation, "release")
    del self._live[allocation.blocks[-1]]
    for block in reversed(allocation.blocks):
      self._refs[block] -= 1
      if self._refs[block] == 0:
        self._used -= 1
        key = self._key_of_block.get(block)
        if key is None:
          heapq.heappush(self._free, block)
        else:
          self._lru[block] = key

  # -- counters ----------------------------------------------------------------------------

  @property
  def free_blocks(self) -> int:
    """Blocks neither in use nor holding a cached prefix."""
    return len(self._free)

  @property
  def cached_blocks(self) -> int:
    """Blocks no live sequence holds that keep a published prefix (evictable, LRU)."""
    return len(self._lru)

  @property
  def used_blocks(self) -> int:
    """Blocks held by at least one live sequence."""
    return self._used

  @property
  def peak_used(self) -> int:
    """The most blocks ever held by live sequences at once."""
    return self._peak_used

  @property
  def hit_tokens(self) -> int:
    """Prompt tokens served from the prefix cache so far."""
    return self._hit_tokens

  @property
  def lookup_tokens(self) -> int:
    """Prompt tokens of admitted requests looked up so far (hit rate: hit / lookup)."""
    return self._lookup_tokens

  @property
  def evictions(self) -> int:
    """Cached blocks taken back for new sequences (their prefixes forgotten)."""
    return self._evictions

  # -- inside ------------------------------------------------------------------------------

  def _take_fresh(self) -> int:
    """A block for one sequence alone: the lowest free id, else the least recently
    released cached block, whose prefix is forgotten."""
    if self._free:
      block = heapq.heappop(self._free)
    else:
      block, key = self._lru.popitem(last=False)
      del self._block_of_key[key]
      del self._key_of_block[block]
      self._evictions += 1
    self._refs[block] = 1
    return block

  def _check_live(self, allocation: Allocation, what: str) -> None:
    """A one-line error for an allocation already released or made by another allocator."""
    blocks = getattr(allocation, "blocks", ())
    if not blocks or self._live.get(blocks[-1]) is not allocation:
      raise JaxppError(f"{what} of an allocation that is not live in this allocator "
                       f"(released already, or made by another one)")
