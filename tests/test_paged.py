"""A paged KV cache: every layout gives the single-device tokens through block tables, the
engine admits by free blocks (more short requests in flight than a dense cache of the same
memory holds), refuses what can never fit, and gives every block back.

fp32 on the 8 CPU devices of conftest; blocks of 16 positions so prompts span several
blocks, handed out in an order unlike the rows'.
"""

import re

import numpy as np
import pytest

import jaxpp
from jaxpp.job import report
from jaxpp.load import checkpoint
from jaxpp.model import kv_cache, sampling
from jaxpp.parallel import pipeline
from jaxpp.serve import decode_rows, reference, requests
from tests import hf_models

MAX_LEN = 64
BLOCK = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """A checkpoint (8 layers, 4 kv heads of 16: the kernel's tile) and a reference run."""
  ckpt, _ = hf_models.make_checkpoint(tmp_path_factory.mktemp("paged"), "deep",
                                      num_key_value_heads=4, num_attention_heads=8,
                                      head_dim=16, vocab_size=96, eos_token_id=None)
  config = checkpoint.load_config(ckpt)
  params = checkpoint.load_hf_params(ckpt, config, np.float32)
  rng = np.random.default_rng(0)
  prompts = [[1] + rng.integers(3, 90, n).tolist() for n in (40, 3, 17, 29, 9, 33, 1, 22, 12)]
  new = [6 + 5 * (i % 4) for i in range(len(prompts))]
  want = [reference.reference_generate(config, params, [p], n, sampling.SamplingParams.make(1),
                                       max_len=MAX_LEN)[0] for p, n in zip(prompts, new)]
  return ckpt, prompts, new, want


def run(llm, prompts, new, **engine):
  eng = llm.engine(**engine)
  for i, (p, n) in enumerate(zip(prompts, new)):
    eng.submit(requests.Request(f"r{i}", p, n))
  done = {}
  eng.run(lambda f: done.__setitem__(f.request.key, f.token_ids))
  # the most sequences one micro-batch of one replica held at once
  return eng, [done[f"r{i}"] for i in range(len(prompts))], eng.stats.max_live_per_microbatch


@pytest.mark.parametrize("layout, attention", [
    ("pp1tp1", "xla"), ("pp1tp1", "kernel"), ("pp2tp2", "kernel"), ("pp2tp1v2", "kernel"),
    ("dp2pp2tp1", "xla")])
def test_every_layout_reads_its_blocks_like_the_reference(model, layout, attention):
  """Mixed prompt lengths (one to three blocks), refills into freed blocks, the decode
  kernel's paged form and XLA's gather: the single-device greedy tokens, and every block
  back in its pool after the run."""
  ckpt, prompts, new, want = model
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, decode_chunk=4, layout=layout,
                  attention=attention, block_size=BLOCK)
  eng, got, _ = run(llm, prompts, new, max_num_seqs=4 * llm.pipeline.dp)
  assert got == want
  for a in eng.pages.allocators:
    assert a.free_blocks == eng.pages.blocks - 1 and a.used_blocks == 0
  assert not eng.pages.held and (eng.pages.tables == kv_cache.NULL_BLOCK).all()
  assert 0 < eng.stats.kv["peak_blocks"] <= eng.stats.kv["blocks"]


def test_blocks_admit_more_short_requests_than_dense_slots(model):
  """A pool of 8 blocks (the memory of two dense slots of 64 positions) runs 7 short
  requests at once where two dense slots would run two; a request that needs more blocks
  than the pool holds is refused at submit, one waiting for blocks is admitted later."""
  ckpt, prompts, new, want = model
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, decode_chunk=4, layout="pp1tp1",
                  block_size=BLOCK)
  short = [p[:8] for p in prompts]
  config = checkpoint.load_config(ckpt)
  params = checkpoint.load_hf_params(ckpt, config, np.float32)
  short_want = [reference.reference_generate(config, params, [p], 6,
                                             sampling.SamplingParams.make(1),
                                             max_len=MAX_LEN)[0] for p in short]
  eng, got, most = run(llm, short, [6] * len(short), max_num_seqs=8, kv_blocks=9)
  assert got == short_want
  assert most >= 6  # each request needs one block of 16 (8 + 6 positions)
  assert eng.stats.kv["peak_blocks"] == 8
  with pytest.raises(jaxpp.JaxppError, match=r"request big: prompt of 41 tokens \+ "
                     r"max_new_tokens=20 needs 4 KV blocks of 16 positions; the cache holds 3"):
    llm.engine(max_num_seqs=4, kv_blocks=4).submit(requests.Request("big", prompts[0], 20))
  # three long requests (3, 3 and 4 blocks) through a pool of 7: they wait their turn
  pick = [0, 5, 3]
  eng, got, most = run(llm, [prompts[i] for i in pick], [new[i] for i in pick],
                       max_num_seqs=4, kv_blocks=8)
  assert got == [want[i] for i in pick] and most == 2


@pytest.mark.parametrize("layout", ["pp2tp1", "dp2pp2tp1"])
def test_decode_runs_only_the_rows_in_use(model, layout, monkeypatch):
  """A paged cache's decode call runs each replica's first rows that hold sequences
  (`decode_rows.py`): with room for 16 a replica and a trickle of requests, the calls are
  narrower than the slots, and the rows they leave out keep their state. Greedy rows give
  the single-device tokens; sampled rows with penalties and logprobs give the tokens and
  (to f32 rounding) the logprobs of an engine whose every call runs every row (the test
  fails if a row's results are written back to the wrong row)."""
  ckpt, prompts, new, want = model
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, decode_chunk=4, layout=layout,
                  attention="kernel", block_size=BLOCK)
  dp = llm.pipeline.dp
  extra = [requests.Request(f"s{i}", p[:12], 9, temperature=0.8, seed=i, logprobs=2,
                            repetition_penalty=1.3) for i, p in enumerate(prompts[:4])]

  def serve(min_rows):
    monkeypatch.setattr(decode_rows, "MIN_ROWS", min_rows)
    eng = llm.engine(max_num_seqs=16 * dp)
    done = {}
    for i, (p, n) in enumerate(zip(prompts, new)):  # two new requests between decode calls
      eng.submit(requests.Request(f"r{i}", p, n))
      if i % 2:
        for f in eng.step():
          done[f.request.key] = f
    for r in extra:
      eng.submit(r)
    eng.run(lambda f: done.__setitem__(f.request.key, f))
    return eng, done

  whole, want_extra = serve(min_rows=64)
  eng, done = serve(min_rows=1)
  assert [done[f"r{i}"].token_ids for i in range(len(prompts))] == want
  for r in extra:  # a call's width changes a GEMM's f32 sums by an ulp or so
    got, ref = done[r.key], want_extra[r.key]
    assert got.token_ids == ref.token_ids
    assert [i for i, _ in sum(got.top_logprobs, [])] == [i for i, _ in sum(ref.top_logprobs, [])]
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)
  rows = {key[0][1] for key in eng._decode_programs}  # (M, rows) of each decode program
  assert {key[0][1] for key in whole._decode_programs} == {eng.rows}
  assert min(rows) < eng.rows and all(n % dp == 0 for n in rows), rows
  # the report's mean rows a call: every row without the window, fewer with it
  assert whole.stats.kv["decode_rows"] == whole.M * whole.rows
  assert whole.M * dp <= eng.stats.kv["decode_rows"] < whole.M * whole.rows
  assert "decode calls ran" in report.kv_line(eng.stats.kv)
  for a in eng.pages.allocators:
    assert a.free_blocks == eng.pages.blocks - 1


def test_decode_window_takes_and_puts_each_replicas_rows(monkeypatch):
  monkeypatch.setattr(decode_rows, "MIN_ROWS", 2)
  # rows 1 and 2 of replica 0, row 1 of replica 1: 3 rows a replica, rounded up to 4
  assert decode_rows.window([1, 9, 2], rows_per_replica=8, dp=2, paged=True).n == 4
  assert decode_rows.window([6], rows_per_replica=7, dp=1, paged=True).n == 7  # capped
  w = decode_rows.RowWindow(8, 2, 2)
  full = np.arange(2 * 16 * 3).reshape(2, 16, 3)
  part = w.take(full)
  assert part.shape == (2, 4, 3) and (part[:, 2] == full[:, 8]).all()
  assert [w.index(r) for r in (0, 1, 8, 9)] == [0, 1, 2, 3]
  before = full.copy()
  w.put(full, -part)
  assert (full[:, [0, 1, 8, 9]] == -before[:, [0, 1, 8, 9]]).all()
  assert (full[:, 2:8] == before[:, 2:8]).all() and (full[:, 10:] == before[:, 10:]).all()
  assert decode_rows.window([3], 8, 1, paged=False).whole


def test_dense_cache_is_still_a_choice(model):
  """block_size=0: every slot owns max_len positions, as before pages."""
  ckpt, prompts, new, want = model
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, decode_chunk=4, layout="pp2tp2",
                  block_size=0)
  eng, got, _ = run(llm, prompts, new, max_num_seqs=4)
  assert got == want and eng.pages is None and eng.stats.kv == {}


def test_bad_block_sizes_are_one_line(model):
  ckpt = model[0]
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, layout="pp1tp1", block_size=24)
  with pytest.raises(jaxpp.JaxppError, match="block_size=24 must be a power of two >= 16"):
    llm.engine(max_num_seqs=4)


def test_paged_decode_updates_the_pool_in_place(model):
  """The pool is written in place: no pool-sized copy inside the decode program's layer
  loop (a scatter inside the loop made XLA copy the whole cache per layer)."""
  ckpt, prompts, new, _ = model
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, layout="pp1tp1", block_size=BLOCK,
                  attention="xla")
  eng = llm.engine(max_num_seqs=4)
  eng.submit(requests.Request("r", prompts[0], 4))
  eng.step()
  hlo = pipeline.Pipeline.decode.lower(
      llm.pipeline, llm.params, eng.cache, eng.state, eng.sampling, None, eng.pages.tables,
      steps=2, do_sample=False, eos_ids=()).compile().as_text()
  local = ",".join(str(d) for d in eng.cache[0].shape[1:])
  copies = [line for line in hlo.splitlines()
            if re.search(rf"f32\[(1,)?{local}\]\S* copy\(", line)]
  assert len(copies) <= 4, copies


@pytest.fixture(scope="module")
def shared(model):
  """Prompts that share a 37-token prefix (two whole blocks and a part), their tails of
  3-20 tokens, and the reference's greedy tokens for each."""
  ckpt = model[0]
  config = checkpoint.load_config(ckpt)
  params = checkpoint.load_hf_params(ckpt, config, np.float32)
  rng = np.random.default_rng(1)
  head = [1] + rng.integers(3, 90, 36).tolist()
  prompts = [head + rng.integers(3, 90, n).tolist() for n in (5, 20, 3, 12, 9, 16)]
  want = [reference.reference_generate(config, params, [p], 8, sampling.SamplingParams.make(1),
                                       max_len=MAX_LEN)[0] for p in prompts]
  return ckpt, prompts, want


@pytest.mark.parametrize("layout, attention, chunk", [
    ("pp1tp1", "xla", 0), ("pp2tp2", "kernel", 0), ("pp1tp1", "xla", 16),
    ("dp2pp2tp1", "kernel", 24), ("pp2tp1v2", "xla", 7)])
def test_prefix_cache_and_chunks_give_the_reference_tokens(shared, layout, attention, chunk):
  """With the prefix cache on, later prompts start after the shared blocks (fewer tokens
  computed); with a token budget long prompts are prefilled a chunk a step; the greedy
  tokens are the reference's either way, and every block comes back (cached or free)."""
  ckpt, prompts, want = shared
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, decode_chunk=4, layout=layout,
                  attention=attention, block_size=BLOCK)
  eng = llm.engine(max_num_seqs=2 * llm.pipeline.dp, prefix_cache=True, prefill_chunk=chunk)
  for i, p in enumerate(prompts):
    eng.submit(requests.Request(f"r{i}", p, 8))
  done = {}
  eng.run(lambda f: done.__setitem__(f.request.key, f.token_ids))
  assert [done[f"r{i}"] for i in range(len(prompts))] == want
  st = eng.stats
  assert st.prompt_tokens == sum(map(len, prompts))
  assert st.kv["prefix_hit_tokens"] >= 2 * BLOCK * (len(prompts) - 2 * llm.pipeline.dp)
  assert st.prefill_tokens == st.prompt_tokens - st.kv["prefix_hit_tokens"]
  if chunk:
    assert st.prefill_calls > len(prompts) // (2 * llm.pipeline.dp)
  for a in eng.pages.allocators:
    assert a.used_blocks == 0 and a.free_blocks + a.cached_blocks == eng.pages.blocks - 1
  assert not eng.prefilling and not eng.pages.held


@pytest.mark.parametrize("layout, chunk", [("pp1tp1", 0), ("dp2pp1tp1", 24)])
def test_a_burst_sharing_a_prefix_computes_it_once_a_replica(shared, layout, chunk):
  """Six prompts with one two-block prefix, submitted together into room for all: each
  replica admits one first and the others after its prefill, so they all reuse its blocks
  (admitted together, each would compute them); the tokens are the reference's. With a
  prefill budget some rows wait a step for their first piece while the others decode:
  parked past their tables, they write nothing into the shared blocks (at their slots'
  stale lengths they did, and the replica's other sequences read junk)."""
  ckpt, prompts, want = shared
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, decode_chunk=4, layout=layout,
                  block_size=BLOCK)
  dp = llm.pipeline.dp
  eng = llm.engine(max_num_seqs=len(prompts) * dp, prefix_cache=True, prefill_chunk=chunk)
  for i, p in enumerate(prompts):
    eng.submit(requests.Request(f"r{i}", p, 8))
  done = {}
  for f in eng.step():
    done[f.request.key] = f.token_ids
  assert eng.stats.admissions == dp  # one a replica: the rest wait for its prefix blocks
  eng.run(lambda f: done.__setitem__(f.request.key, f.token_ids))
  assert [done[f"r{i}"] for i in range(len(prompts))] == want
  assert eng.stats.kv["prefix_hit_tokens"] == 2 * BLOCK * (len(prompts) - dp)
  assert not eng.pages.computing_of  # no prefix left marked as being computed


def test_a_chunked_prompt_lets_decode_run_between_its_chunks(model):
  """A 41-token prompt with a budget of 8 tokens a step takes 6 steps to prefill; the
  request already decoding gets a decode chunk in each of them, and both finish with the
  reference's tokens."""
  ckpt, prompts, new, want = model
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, decode_chunk=2, layout="pp1tp1",
                  block_size=BLOCK)
  eng = llm.engine(max_num_seqs=2, prefill_chunk=8)
  eng.submit(requests.Request("short", prompts[6], new[6]))  # 2 tokens: one piece
  eng.step()
  eng.submit(requests.Request("long", prompts[0], new[0]))
  got, steps = {}, 0
  while eng.busy():
    before = eng.stats.completion_tokens
    for f in eng.step():
      got[f.request.key] = f.token_ids
    steps += 1
    if "long" in [r.key for row in eng.owner for r in row if r] and eng.prefilling:
      assert eng.stats.completion_tokens > before or "short" in got  # decode went on
  assert got == {"short": want[6], "long": want[0]}
  assert eng.stats.prefill_calls >= 1 + 41 // 8


def test_penalised_prompts_skip_the_prefix_cache(shared):
  """A first token's repetition penalty counts the whole prompt, so such a prompt is
  prefilled whole (no cached prefix, no chunks) and samples what it would without them."""
  ckpt, prompts, _ = shared
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, decode_chunk=4, layout="pp1tp1",
                  block_size=BLOCK)

  def tokens(**engine):
    eng = llm.engine(max_num_seqs=2, **engine)
    for i, p in enumerate(prompts[:4]):
      eng.submit(requests.Request(f"r{i}", p, 6, repetition_penalty=1.3))
    done = {}
    eng.run(lambda f: done.__setitem__(f.request.key, f.token_ids))
    return [done[f"r{i}"] for i in range(4)], eng.stats

  plain, _ = tokens()
  cached, st = tokens(prefix_cache=True, prefill_chunk=16)
  assert cached == plain and st.prefill_tokens == st.prompt_tokens
