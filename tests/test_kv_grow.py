"""KV growth with swap-out preemption (`kv_grow`): sequences admitted with their prompt's
blocks, grown as they decode, swapped out to host memory when the pool runs dry and back
into fresh blocks later, giving exactly the tokens they give without preemption.

fp32 on the 8 CPU devices of conftest, test_paged's checkpoint and requests, and a pool of
6 blocks of 16 positions a replica (5 usable): four rows of up to 4 blocks each cannot all
grow, so every run here swaps.
"""

import numpy as np
import pytest

import jaxpp
from jaxpp.errors import JaxppError
from jaxpp.serve import requests
from tests.test_paged import BLOCK, MAX_LEN, model, run  # noqa: F401 (fixture)

POOL = 6  # blocks a replica, the null block counted


def finished(llm, prompts, new, **engine):
  """(engine, {key: Finished}) of one run, each request asking for its top-2 logprobs and
  every third for a repetition penalty (the host-side state a swap must carry back)."""
  eng = llm.engine(**engine)
  for i, (p, n) in enumerate(zip(prompts, new)):
    eng.submit(requests.Request(f"r{i}", p, n, logprobs=2,
                                repetition_penalty=1.3 if i % 3 == 0 else 1.0))
  done = {}
  eng.run(lambda f: done.__setitem__(f.request.key, f))
  return eng, done


def _assert_pool_empty(eng):
  for a in eng.pages.allocators:
    assert a.used_blocks == 0
  assert not eng.pages.held and not eng.swapped and not eng.order


@pytest.mark.parametrize("layout, attention", [("pp2tp1v2", "kernel"), ("dp2pp2tp1", "xla")])
def test_swapped_sequences_give_the_reference_tokens(model, layout, attention):  # noqa: F811
  ckpt, prompts, new, want = model
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, decode_chunk=4, layout=layout,
                  attention=attention, block_size=BLOCK)
  dp = llm.pipeline.dp
  eng, got, _ = run(llm, prompts, new, max_num_seqs=4 * dp, kv_blocks=POOL, kv_grow=True)
  assert got == want
  assert eng.stats.preemptions > 0
  _assert_pool_empty(eng)


@pytest.mark.parametrize("kv_dtype, prefix_cache, chunk", [("fp8", False, 0), ("auto", True, 8)])
def test_logprobs_penalties_and_scales_come_back_with_a_sequence(model, kv_dtype,  # noqa: F811
                                                                 prefix_cache, chunk):
  """The same requests with and without growth (a pool that never swaps): identical
  tokens, logprobs and alternatives, penalties applied alike; an fp8 cache's scales swap
  with its blocks, and the prefix cache's shared blocks are copied out like private ones,
  beside prompts prefilled in chunks of 8 (parked rows hold their blocks meanwhile)."""
  ckpt, prompts, new, _ = model
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, decode_chunk=4, layout="pp1tp1",
                  attention="kernel", block_size=BLOCK, kv_dtype=kv_dtype,
                  prefix_cache=prefix_cache, prefill_chunk=chunk)
  shared = [prompts[0][:16] + p[:20] for p in prompts]  # a full block alike
  _, want = finished(llm, shared, new, max_num_seqs=4)
  eng, got = finished(llm, shared, new, max_num_seqs=4, kv_blocks=POOL, kv_grow=True)
  assert eng.stats.preemptions > 0 and len(eng.cache) == (4 if kv_dtype == "fp8" else 2)
  for key, f in want.items():  # a prefix hit sums in another order: logprobs to 1e-5
    g = got[key]
    assert g.token_ids == f.token_ids
    assert [[t for t, _ in top] for top in g.top_logprobs] == [
        [t for t, _ in top] for top in f.top_logprobs]
    np.testing.assert_allclose(g.logprobs, f.logprobs, rtol=1e-5, atol=1e-5)
  _assert_pool_empty(eng)


def test_growth_needs_a_paged_cache_and_one_process(model, monkeypatch):  # noqa: F811
  llm = jaxpp.LLM(model[0], dtype="float32", max_len=MAX_LEN, decode_chunk=4)
  with pytest.raises(JaxppError, match="^prefix_cache, prefill_chunk and kv_grow need a paged"):
    llm.engine(block_size=0, kv_grow=True)
  import jax
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(JaxppError, match="^kv_grow swaps KV blocks through one process's host"):
    llm.engine(kv_grow=True)


def test_swap_moves_blocks_through_pinned_host_memory_bit_for_bit():
  """swap_out leaves its copies in pinned host memory (the devices write them by DMA while
  the host goes on); swap_in puts them, and only them, into other blocks of a pool whose
  block axis is split over two devices as dp splits it, keeping the pool's sharding."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from jaxpp.serve import kv_swap
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("dp",))
  spec = NamedSharding(mesh, P(None, None, None, "dp"))
  rng = np.random.default_rng(0)
  shapes = [(1, 1, 2, 8, 2, 4, 3), (1, 1, 2, 8, 2, 4)]  # keys, and an fp8 cache's scales
  cache = tuple(jax.device_put(rng.standard_normal(s).astype(np.float32), spec) for s in shapes)
  before = [np.asarray(a) for a in cache]
  out = kv_swap.swap_out(cache, [2, 5, 3], null=0)
  assert all(b.sharding.memory_kind == kv_swap.HOST for b in out)
  empty = tuple(jax.device_put(np.zeros(s, np.float32), spec) for s in shapes)
  back = kv_swap.swap_in(empty, [6, 1, 7], null=4, blocks=out)
  for a, b in zip(back, before):
    assert a.sharding == spec
    got = np.asarray(a)
    np.testing.assert_array_equal(got[:, :, :, [6, 1, 7]], b[:, :, :, [2, 5, 3]])
    np.testing.assert_array_equal(got[:, :, :, 4], b[:, :, :, 0])  # the padding: null to null
    assert not got[:, :, :, [0, 2, 3, 5]].any()
