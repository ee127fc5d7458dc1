"""The paged KV cache's host allocator: sizes, admission until full, release, prefix reuse
through chained keys, LRU eviction, the bookkeeping under random traffic, and the errors."""

import collections

import numpy as np
import pytest

from jaxpp.errors import JaxppError
from jaxpp.serve.kv_blocks import NULL_BLOCK as NULL, Allocation, BlockAllocator, block_keys


def check_books(alloc: BlockAllocator, live: list[Allocation]) -> None:
  """The allocator's books against a model of the live allocations: the three states
  partition the pool, reference counts equal the model's, nothing free or cached is held,
  the null block is never handed out, and private blocks are handed to one sequence."""
  assert alloc.free_blocks + alloc.cached_blocks + alloc.used_blocks == alloc.num_blocks - 1
  refs = collections.Counter(b for a in live for b in a.blocks)
  assert NULL not in refs
  assert alloc.used_blocks == len(refs)
  assert alloc._refs == [refs.get(b, 0) for b in range(alloc.num_blocks)]
  idle = set(alloc._free) | set(alloc._lru)
  assert len(idle) == alloc.free_blocks + alloc.cached_blocks  # no block in both
  assert not idle & set(refs)
  if not alloc.prefix_cache:  # nothing is shared: every block has one holder
    assert all(n == 1 for n in refs.values())
  for a in live:  # shared blocks are only ever reused prompt blocks
    shared = [i for i, b in enumerate(a.blocks) if refs[b] > 1]
    assert all(i < len(a.keys) for i in shared)



def test_sizes():
  alloc = BlockAllocator(5, 4)
  assert [alloc.blocks_for(p) for p in (1, 4, 5, 8, 9, 16, 17)] == [1, 1, 2, 2, 3, 4, 5]
  assert alloc.fits_ever(16) and not alloc.fits_ever(17)  # 4 blocks: 5 less the null one


def test_admit_until_full_then_release_everything():
  alloc = BlockAllocator(8, 4)
  first = alloc.admit([1, 2, 3], 7)  # 2 blocks
  assert first.blocks == (1, 2) and first.cached == 0 and first.keys == ()
  rest = [alloc.admit([5] * 4, 8) for _ in range(2)]
  assert [a.blocks for a in rest] == [(3, 4), (5, 6)]
  assert (alloc.free_blocks, alloc.used_blocks) == (1, 6)
  assert alloc.admit([1], 5) is None  # needs 2, 1 left: nothing changes
  assert (alloc.free_blocks, alloc.used_blocks, alloc.cached_blocks) == (1, 6, 0)
  last = alloc.admit([1], 4)
  assert last.blocks == (7,)
  assert alloc.admit([1], 1) is None
  assert alloc.peak_used == 7
  for a in [first, *rest, last]:
    alloc.release(a)
  assert (alloc.free_blocks, alloc.used_blocks, alloc.cached_blocks) == (7, 0, 0)
  assert alloc.peak_used == 7
  assert alloc.admit([1], 1).blocks == (1,)  # lowest id first again


def test_random_traffic_without_prefix_cache_never_shares_a_block():
  rng = np.random.default_rng(0)
  alloc = BlockAllocator(64, 8)
  live, admitted, refused = [], 0, 0
  for _ in range(3000):
    if live and (rng.random() < 0.45 or alloc.free_blocks == 0):
      alloc.release(live.pop(int(rng.integers(len(live)))))
    else:
      n = int(rng.integers(1, 60))
      positions = n + int(rng.integers(0, 80))
      before = (alloc.free_blocks, alloc.used_blocks, alloc.cached_blocks)
      a = alloc.admit(list(rng.integers(0, 100, n)), positions)
      if a is None:
        refused += 1
        assert alloc.free_blocks < alloc.blocks_for(positions)
        assert (alloc.free_blocks, alloc.used_blocks, alloc.cached_blocks) == before
      else:
        admitted += 1
        assert len(a.blocks) == alloc.blocks_for(positions) and a.cached == 0
        live.append(a)
    check_books(alloc, live)
  assert admitted > 1000 and refused > 50  # the pool really ran full
  for a in live:
    alloc.release(a)
  assert alloc.free_blocks == 63 and alloc.used_blocks == 0


def test_same_calls_give_same_blocks():
  def tables():
    rng = np.random.default_rng(7)
    alloc, live, out = BlockAllocator(40, 4, prefix_cache=True), [], []
    for _ in range(500):
      if live and rng.random() < 0.5:
        alloc.release(live.pop(int(rng.integers(len(live)))))
      else:
        prompt = [1, 2, 3, 4, 5, 6, 7, 8][:int(rng.integers(1, 9))] + [int(rng.integers(9))]
        a = alloc.admit(prompt, len(prompt) + 5)
        if a is not None:
          alloc.register(a, prompt)
          live.append(a)
          out.append(a.blocks)
    return out
  assert tables() == tables()


# -- prefix caching ------------------------------------------------------------------------


def test_shared_prefix_reused_only_after_register():
  bs = 4
  alloc = BlockAllocator(32, bs, prefix_cache=True)
  common = list(range(100, 110))  # 2.5 blocks
  p1, p2 = common + [1, 2, 3], common + [7, 8, 9, 10, 11]
  a1 = alloc.admit(p1, len(p1) + 6)
  assert a1.cached == 0 and len(a1.keys) == 3
  early = alloc.admit(p2, len(p2) + 6)  # a1 not registered yet: nothing to reuse
  assert early.cached == 0 and not set(early.blocks) & set(a1.blocks)
  alloc.register(a1, p1)
  a2 = alloc.admit(p2, len(p2) + 6)
  assert a2.cached == 2 * bs
  assert a2.blocks[:2] == a1.blocks[:2] and not set(a2.blocks[2:]) & set(a1.blocks)
  assert a2.keys[:2] == a1.keys[:2] and a2.keys[2] != a1.keys[2]
  alloc.register(early, p2)  # same keys as a1's first two: early's blocks stay private
  alloc.register(a2, p2)  # a2's third block is new: published now
  assert alloc.used_blocks == len(set(a1.blocks) | set(early.blocks) | set(a2.blocks))
  assert alloc.lookup_tokens == 13 + 15 + 15 and alloc.hit_tokens == 2 * bs
  for a in (a1, early, a2):
    alloc.release(a)
  # Cached: a1's 3 full prompt blocks and early's third (registered before a2's, whose
  # third stays private). Free: early's duplicates of a1's and every generation block.
  assert alloc.cached_blocks == 4 and alloc.used_blocks == 0
  assert alloc.free_blocks == 31 - 4


def test_hit_and_lookup_counters():
  bs = 4
  alloc = BlockAllocator(32, bs, prefix_cache=True)
  prompt = list(range(1, 14))  # 13 tokens: 3 full blocks, all inside prompt[:-1]
  a = alloc.admit(prompt, 20)
  alloc.register(a, prompt)
  b = alloc.admit(prompt, 20)
  c = alloc.admit(prompt[:9], 12)  # 9 tokens: 2 blocks reusable
  assert (a.cached, b.cached, c.cached) == (0, 12, 8)
  assert alloc.lookup_tokens == 13 + 13 + 9 and alloc.hit_tokens == 12 + 8
  before = (alloc.lookup_tokens, alloc.hit_tokens)
  assert alloc.admit(prompt, 31 * bs) is None  # a refused admit counts nothing
  assert (alloc.lookup_tokens, alloc.hit_tokens) == before


def test_exact_full_blocks_leave_the_last_one_to_compute():
  bs = 4
  alloc = BlockAllocator(16, bs, prefix_cache=True)
  prompt = list(range(12))  # exactly 3 full blocks
  a = alloc.admit(prompt, 12)
  assert len(a.keys) == 3 and len(a.blocks) == 3
  alloc.register(a, prompt)
  b = alloc.admit(prompt, 16)
  assert b.cached == 2 * bs and b.blocks[:2] == a.blocks[:2] and b.blocks[2] != a.blocks[2]
  longer = prompt + [50]  # now the third block lies inside prompt[:-1]
  c = alloc.admit(longer, 16)
  assert c.cached == 3 * bs and c.blocks[:3] == a.blocks


def test_keys_chain_so_an_early_difference_shares_nothing_after_it():
  bs = 4
  alloc = BlockAllocator(32, bs, prefix_cache=True)
  p1 = list(range(20))
  p2 = list(p1)
  p2[5] = 99  # block 1 differs; blocks 2.. are equal token for token
  assert block_keys(p1, bs)[0] == block_keys(p2, bs)[0]
  assert not set(block_keys(p1, bs)[1:]) & set(block_keys(p2, bs))
  a = alloc.admit(p1, 24)
  alloc.register(a, p1)
  b = alloc.admit(p2, 24)
  assert b.cached == bs and b.blocks[0] == a.blocks[0]
  assert not set(b.blocks[1:]) & set(a.blocks)


# -- eviction ------------------------------------------------------------------------------


def test_released_blocks_stay_cached_and_are_evicted_lru_only_when_needed():
  bs = 2
  alloc = BlockAllocator(7, bs, prefix_cache=True)  # 6 usable blocks
  pa, pb = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]  # 2 full blocks each (+ 1 token)
  a = alloc.admit(pa, 5)  # 3 blocks: 1, 2, 3
  alloc.register(a, pa)
  alloc.release(a)
  b = alloc.admit(pb, 5)  # free blocks only: a's cached ones are untouched
  assert b.blocks == (3, 4, 5) and alloc.evictions == 0
  alloc.register(b, pb)
  alloc.release(b)
  assert (alloc.cached_blocks, alloc.free_blocks, alloc.used_blocks) == (4, 2, 0)
  # LRU, oldest first: a's tail 2, a's head 1, b's tail 4, b's head 3.
  c = alloc.admit([30, 31, 32], 6)  # 3 blocks: free 5, 6, then evict 2
  assert c.blocks == (5, 6, 2) and alloc.evictions == 1
  again = alloc.admit(pa, 5)  # a's second block was evicted: only the head is hit
  assert again.cached == bs and again.blocks[0] == 1
  assert again.blocks[1:] == (4, 3) and alloc.evictions == 3  # next in LRU order
  assert alloc.admit(pb, 5) is None  # b's prefix is gone and nothing is left
  alloc.release(c)
  d = alloc.admit(pb, 5)
  assert d.cached == 0 and alloc.hit_tokens == bs


def test_a_held_block_is_never_evicted():
  bs = 2
  alloc = BlockAllocator(5, bs, prefix_cache=True)  # 4 usable blocks
  p = [1, 2, 3, 4, 5]
  a = alloc.admit(p, 5)
  alloc.register(a, p)
  b = alloc.admit(p, 5)  # shares a's first two blocks
  assert b.cached == 4 and alloc.used_blocks == 4
  alloc.release(a)  # the shared blocks are still held by b
  assert alloc.cached_blocks == 0 and alloc.free_blocks == 1
  assert alloc.admit([9], 4) is None  # 2 needed: only 1 free, nothing evictable
  c = alloc.admit([9], 2)
  assert c.blocks == (a.blocks[2],) and alloc.evictions == 0


def test_random_traffic_with_prefix_cache_keeps_the_books():
  """Prompts drawn from a few shared stems so blocks are shared, published, released,
  cached and evicted; after every step the books match the model of live allocations."""
  rng = np.random.default_rng(1)
  bs = 4
  alloc = BlockAllocator(48, bs, prefix_cache=True)
  stems = [list(rng.integers(0, 50, 24)) for _ in range(5)]
  live = []
  for _ in range(4000):
    if live and (rng.random() < 0.45 or alloc.free_blocks + alloc.cached_blocks == 0):
      a = live.pop(int(rng.integers(len(live))))
      alloc.release(a)
    else:
      stem = stems[int(rng.integers(len(stems)))]
      prompt = stem[:int(rng.integers(1, 25))] + list(rng.integers(0, 50, int(rng.integers(3))))
      positions = len(prompt) + int(rng.integers(0, 12))
      before = (alloc.free_blocks, alloc.cached_blocks, alloc.used_blocks, alloc.evictions,
                alloc.lookup_tokens)
      a = alloc.admit(prompt, positions)
      if a is None:
        assert (alloc.free_blocks, alloc.cached_blocks, alloc.used_blocks, alloc.evictions,
                alloc.lookup_tokens) == before
      else:
        assert len(a.blocks) == alloc.blocks_for(positions)
        assert a.cached % bs == 0 and a.cached < len(prompt)
        assert a.keys == block_keys(prompt, bs)
        # reused blocks hold exactly the prefix their keys name
        assert all(alloc._block_of_key.get(k) == b
                   for k, b in zip(a.keys[:a.cached // bs], a.blocks))
        live.append(a)
        if rng.random() < 0.8:
          alloc.register(a, prompt)
    check_books(alloc, live)
  assert alloc.evictions > 50 and alloc.hit_tokens > 0.2 * alloc.lookup_tokens


def test_growth_takes_fresh_blocks_and_the_old_allocation_is_gone():
  alloc = BlockAllocator(8, 4, prefix_cache=True)
  a = alloc.admit(list(range(9)), 10)  # 3 blocks; 2 full prompt blocks published
  alloc.register(a, list(range(9)))
  assert alloc.grow(a, 12) is a  # 12 positions still fit 3 blocks
  b = alloc.grow(a, 13)
  assert b.blocks == a.blocks + (4,) and b.keys == a.keys and b.cached == a.cached
  assert alloc.peak_used == 4
  with pytest.raises(JaxppError, match="^grow of an allocation that is not live"):
    alloc.grow(a, 20)  # replaced by b
  assert alloc.grow(b, 30) is None  # 8 blocks needed, 7 in the pool
  check_books(alloc, [b])
  alloc.release(b)
  assert (alloc.free_blocks, alloc.cached_blocks, alloc.used_blocks) == (5, 2, 0)


def test_random_traffic_with_growth_keeps_the_books():
  """Sequences admitted small and grown a block at a time, released at random: the books
  always match the live allocations, and a failed growth changes nothing."""
  rng = np.random.default_rng(2)
  alloc = BlockAllocator(32, 4, prefix_cache=True)
  stems = [list(rng.integers(0, 50, 16)) for _ in range(3)]
  live = []
  for _ in range(3000):
    roll = rng.random()
    if live and roll < 0.3:
      alloc.release(live.pop(int(rng.integers(len(live)))))
    elif live and roll < 0.7:
      i = int(rng.integers(len(live)))
      before = (alloc.free_blocks, alloc.cached_blocks, alloc.used_blocks)
      grown = alloc.grow(live[i], 4 * len(live[i].blocks) + int(rng.integers(1, 9)))
      if grown is None:
        assert (alloc.free_blocks, alloc.cached_blocks, alloc.used_blocks) == before
      else:
        live[i] = grown
    else:
      prompt = stems[int(rng.integers(3))][:int(rng.integers(1, 17))]
      a = alloc.admit(prompt, len(prompt) + 1)
      if a is not None:
        alloc.register(a, prompt)
        live.append(a)
    check_books(alloc, live)


# -- errors --------------------------------------------------------------------------------


def one_line(error) -> str:
  message = str(error.value)
  assert "\n" not in message and message
  return message


def test_double_release_and_foreign_allocations_are_one_line_errors():
  alloc = BlockAllocator(8, 4, prefix_cache=True)
  a = alloc.admit([1, 2, 3, 4, 5], 9)
  alloc.release(a)
  with pytest.raises(JaxppError) as e:
    alloc.release(a)
  assert "not live" in one_line(e)
  b = alloc.admit([1], 4)  # a's last block handed out again: a stale copy is still refused
  with pytest.raises(JaxppError):
    alloc.release(Allocation(b.blocks, b.cached, b.keys))
  with pytest.raises(JaxppError):
    alloc.register(a, [1, 2, 3, 4, 5])
  other = BlockAllocator(8, 4).admit([1], 4)
  with pytest.raises(JaxppError):
    alloc.release(other)
  alloc.release(b)
  assert alloc.used_blocks == 0


@pytest.mark.parametrize("num_blocks, block_size, needle", [
    (1, 4, "num_blocks >= 2"), (0, 4, "num_blocks >= 2"), (4, 0, "block_size >= 1")])
def test_bad_pool_shapes_are_one_line_errors(num_blocks, block_size, needle):
  with pytest.raises(JaxppError) as e:
    BlockAllocator(num_blocks, block_size)
  assert needle in one_line(e)


def test_impossible_admissions_are_one_line_errors():
  alloc = BlockAllocator(4, 4)
  with pytest.raises(JaxppError) as e:
    alloc.admit([1] * 13, 13)  # 4 blocks, the pool has 3
  assert "fits_ever" in one_line(e)
  with pytest.raises(JaxppError) as e:
    alloc.admit([1, 2, 3], 2)
  one_line(e)
  assert alloc.used_blocks == 0
