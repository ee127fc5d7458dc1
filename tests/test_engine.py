"""The batch engine: even fill, backpressure, priority reserve, refill, reproducibility."""

import numpy as np
import pytest

import jaxpp
from jaxpp.load import checkpoint
from jaxpp.model import decode_state, sampling
from jaxpp.serve import reference, requests
from tests import hf_models


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  path, _ = hf_models.make_checkpoint(tmp_path_factory.mktemp("eng"), "gqa", eos_token_id=None)
  return path


@pytest.fixture(scope="module")
def llm(ckpt):
  return jaxpp.LLM(ckpt, dtype="float32", max_len=40, decode_chunk=4, layout="pp2tp1")


def prompts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [[1] + rng.integers(3, 90, rng.integers(2, 12)).tolist() for _ in range(n)]


def request(i, prompt, **kw):
  return requests.Request(key=f"r{i}", prompt=prompt, max_new_tokens=kw.pop("max_new", 6), **kw)


def run_all(eng):
  done = {}
  eng.run(lambda f: done.__setitem__(f.request.key, f))
  return done


def run_against_reference(llm, ckpt, ps, max_new, max_num_seqs):
  """Submits ps[i] as r{i} for max_new[i] tokens, runs them all, checks every one finished
  with exactly the single-device reference's greedy ids; returns (engine, finished)."""
  eng = llm.engine(max_num_seqs=max_num_seqs)
  for i, p in enumerate(ps):
    eng.submit(request(i, p, max_new=max_new[i]))
  done = run_all(eng)
  assert sorted(done) == sorted(f"r{i}" for i in range(len(ps)))
  config = checkpoint.load_config(ckpt)
  params = checkpoint.load_hf_params(ckpt, config, np.float32)
  for i, p in enumerate(ps):
    ref, = reference.reference_generate(config, params, [p], max_new[i],
                                       sampling.SamplingParams.make(1), max_len=40)
    assert done[f"r{i}"].token_ids == ref, i
  return eng, done


def test_more_requests_than_slots_all_complete_like_the_reference(llm, ckpt):
  """Slots are refilled as sequences finish; every request gets its reference tokens."""
  ps = prompts(13)
  max_new = [3 + i % 5 for i in range(13)]  # different lengths: slots free at different times
  eng, done = run_against_reference(llm, ckpt, ps, max_new, max_num_seqs=4)
  assert all(f.finish_reason == "length" for f in done.values())
  assert eng.stats.max_live_per_microbatch <= 2  # ceil(4 / 2)
  assert eng.stats.decode_calls > 13 * 3 // (4 * 4)  # refills, not one batch


def test_first_calls_are_booked_apart(llm):
  """Each program's first call (trace, compile or cache load) is counted once, and the
  steady rates leave exactly those calls' seconds and tokens out."""
  eng = llm.engine(max_num_seqs=4)
  for i, p in enumerate(prompts(9, seed=3)):
    eng.submit(request(i, p, max_new=3 + i % 4))
  run_all(eng)
  st = eng.stats
  assert st.prefill_shapes == len(eng.prefiller.programs) >= 1
  assert st.prefill_calls > st.prefill_shapes  # refills reuse their programs
  assert 0 < st.prefill_first_seconds < st.prefill_seconds
  assert 0 < st.prefill_first_tokens < st.prompt_tokens
  assert 0 < st.decode_first_seconds < st.decode_seconds and st.decode_first_tokens > 0
  prefill, decode = st.steady_rates()
  assert prefill == pytest.approx((st.prompt_tokens - st.prefill_first_tokens)
                                  / (st.prefill_seconds - st.prefill_first_seconds))
  assert decode == pytest.approx((st.completion_tokens - st.decode_first_tokens)
                                 / (st.decode_seconds - st.decode_first_seconds))
  assert st.first_call_seconds() == st.prefill_first_seconds + st.decode_first_seconds


def test_replicas_fill_the_least_loaded_first_and_match_the_reference(ckpt):
  """dp=2: a burst alternates between the replicas (each micro-batch of a replica within
  its share), and every request still gets the single-device tokens."""
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=40, decode_chunk=4, layout="dp2pp2tp1")
  eng = llm.engine(max_num_seqs=6)  # m = 2, 2 replicas: ceil(6 / 4) = 2 rows a replica
  assert (eng.rows, eng.replica_rows) == (4, 2)
  for i, p in enumerate(prompts(7)):
    eng.submit(request(i, p))
  eng._admit()
  by_replica = eng.live_by_replica()
  assert by_replica.sum(axis=1).tolist() == [3, 3] and by_replica.max() <= 2
  assert eng.waiting() == 1
  ps = prompts(9, seed=1)
  run_against_reference(llm, ckpt, ps, [2 + i % 4 for i in range(9)], max_num_seqs=6)


def test_burst_is_spread_evenly(llm):
  """A burst is spread so no micro-batch exceeds ceil(max_num_seqs / m)."""
  eng = llm.engine(max_num_seqs=3)  # m = 2: at most ceil(3/2) = 2 per micro-batch
  for i, p in enumerate(prompts(6)):
    eng.submit(request(i, p))
  eng._admit()
  assert sorted(eng.live().tolist()) == [1, 2]
  assert eng.waiting() == 3  # backpressure: the rest wait, nothing crashes


def test_backpressure_never_overfills(llm):
  eng = llm.engine(max_num_seqs=2)
  for i, p in enumerate(prompts(7)):
    eng.submit(request(i, p, max_new=3))
  seen = []
  while eng.waiting() or eng.tokens:
    eng.step()
    seen.append(int(eng.live().sum()))
  assert max(seen) <= 2
  assert eng.stats.completion_tokens == 7 * 3


def test_request_that_cannot_fit_is_refused_not_truncated(llm):
  eng = llm.engine(max_num_seqs=2)
  with pytest.raises(jaxpp.JaxppError, match=r"prompt of 30 tokens \+ max_new_tokens=12 does "
                                             r"not fit max_len=40"):
    eng.submit(requests.Request("big", [1] * 30, 12))
  eng.submit(requests.Request("fits", [1] * 30, 11))  # 30 + 11 - 1 = 40 positions


def test_priority_reserve_keeps_slots_for_interactive(llm):
  eng = llm.engine(max_num_seqs=4, reserve={"interactive": 2})
  for i, p in enumerate(prompts(6)):
    eng.submit(request(i, p, priority="batch"))
  eng._admit()
  assert eng.live().sum() == 2  # batch may not take the 2 reserved slots
  eng.submit(request(10, [1, 5, 6], priority="interactive"))
  eng.submit(request(11, [1, 7, 8], priority="interactive"))
  eng.submit(request(12, [1, 7, 9], priority="interactive"))
  admitted = eng._admit()
  assert [a[0].key for a in admitted] == ["r10", "r11"]
  assert eng.waiting() == 5  # 4 batch + 1 interactive wait for free slots


def test_interactive_is_admitted_first(llm):
  eng = llm.engine(max_num_seqs=2)
  for i, p in enumerate(prompts(3)):
    eng.submit(request(i, p))
  eng.submit(request(9, [1, 2, 3], priority="interactive"))
  assert [a[0].key for a in eng._admit()] == ["r9", "r0"]


def test_sampled_tokens_do_not_depend_on_batch_mates(llm):
  ps = prompts(5, seed=3)
  kw = dict(temperature=1.0, top_p=0.9, max_new=8)

  def sample(keys, max_num_seqs):
    eng = llm.engine(max_num_seqs=max_num_seqs)
    for i in keys:
      eng.submit(request(i, ps[i], seed=100 + i, **kw))
    return {k: f.token_ids for k, f in run_all(eng).items()}

  alone = sample([2], 1)
  crowded = sample([4, 0, 2, 1, 3], 4)
  assert crowded["r2"] == alone["r2"]


def test_bad_engine_settings(llm):
  with pytest.raises(jaxpp.JaxppError, match="unknown class"):
    llm.engine(reserve={"vip": 1})
  with pytest.raises(jaxpp.JaxppError, match="leave no slot of max_num_seqs=2 for class "
                                             "'batch'"):
    llm.engine(max_num_seqs=2, reserve={"interactive": 2})
  eng = llm.engine(max_num_seqs=2)
  with pytest.raises(jaxpp.JaxppError, match="unknown priority 'urgent'"):
    eng.submit(request(0, [1, 2], priority="urgent"))


def test_finer_prefill_refills_like_the_reference(ckpt):
  """prefill_microbatches=6 over 2 decode micro-batches of 3 slots: six prefill micro-batches
  of one row each, every row landing in its own slot, refilled as sequences finish."""
  llm6 = jaxpp.LLM(ckpt, dtype="float32", max_len=40, decode_chunk=4, layout="pp2tp1p6")
  ps, max_new = prompts(9, seed=3), [2 + i % 4 for i in range(9)]
  run_against_reference(llm6, ckpt, ps, max_new, max_num_seqs=6)


@pytest.mark.parametrize("v, prefill_m, slots", [(1, 0, 6), (1, 4, 8), (2, 0, 6)])
def test_an_admission_prefills_only_the_rows_it_fills(ckpt, monkeypatch, v, prefill_m, slots):
  """Prompts are packed into rows (several a row), and an admission runs the shape its rows
  need (`Prefiller.shape`): a refill of a few slots never costs a prefill of every slot,
  interleaving keeps pp=2 micro-batches in flight, and each prompt's first token and decode
  state come from its own segment."""
  llm_v = jaxpp.LLM(ckpt, dtype="float32", max_len=40, decode_chunk=4,
                    layout=jaxpp.Layout(2, virtual_stages=v, microbatches=2,
                                        prefill_microbatches=prefill_m))
  calls, prefill = [], type(llm_v.pipeline).prefill

  def spy(self, params, cache, batch, *args, **kw):
    used = batch.segments[..., 0] >= 0  # rows holding a prompt
    prompts_in = int((batch.segments.max(-1) + 1).sum())
    calls.append((batch.tokens.shape, int(used.sum()), prompts_in, batch.ends.shape))
    return prefill(self, params, cache, batch, *args, **kw)

  monkeypatch.setattr(type(llm_v.pipeline), "prefill", spy)
  starts, start_state = [], decode_state.start_state  # its eager ops: one shape per prefill shape
  monkeypatch.setattr(decode_state, "start_state",
                      lambda first, *a: starts.append(first.shape) or start_state(first, *a))
  ps, max_new = prompts(11, seed=4), [2 + (5 * i) % 7 for i in range(11)]
  eng, _ = run_against_reference(llm_v, ckpt, ps, max_new, max_num_seqs=slots)
  assert starts[:len(calls)] == [(int(np.prod(e)),) for *_, e in calls]  # then the reference's
  assert calls[0][2] == slots  # the first admission fills every slot
  floor = 2 if v > 1 else 1
  for (M, p, T), rows, n, _ in calls:
    assert (M, p) == eng.prefiller.shape(rows, T) and M >= floor
    assert rows <= M * p <= max(1.5 * rows, floor)
  assert any(n < slots for *_, n, _ in calls), calls  # some refills were small
  assert any(rows < n for _, rows, n, _ in calls), calls  # some rows held several prompts


@pytest.mark.parametrize("pp, tp, prefill_m, programs", [(2, 1, 5, 6), (1, 2, 0, 6)])
def test_precompiled_prefills_leave_no_compile_to_the_run(ckpt, pp, tp, prefill_m, programs):
  """After precompile_prefills, refills of any size find their program compiled, and so does
  the first prefill into a fresh cache (its sharding is spelled as the programs' outputs)."""
  llm_p = jaxpp.LLM(ckpt, dtype="float32", max_len=40, decode_chunk=4,
                    layout=jaxpp.Layout(pp, tp, prefill_microbatches=prefill_m))
  ps, max_new = prompts(11, seed=6), [2 + (3 * i) % 7 for i in range(11)]
  # 6 slots, rows of max_len = 40 tokens. pp=2, p5: 1..5 rows spread over as many
  # micro-batches of one row, 6 over 5 of two; pp=1: one micro-batch of 1 to 6 rows.
  assert llm_p.engine(max_num_seqs=6).precompile_prefills(map(len, ps)) == programs
  compiled = type(llm_p.pipeline).prefill._cache_size()
  run_against_reference(llm_p, ckpt, ps, max_new, max_num_seqs=6)
  assert type(llm_p.pipeline).prefill._cache_size() == compiled


def test_prefill_microbatches_errors(ckpt):
  with pytest.raises(jaxpp.JaxppError, match="prefill_microbatches=-1 must be >= 0"):
    jaxpp.LLM(ckpt, dtype="float32", max_len=40, layout=jaxpp.Layout(2, prefill_microbatches=-1))
  with pytest.raises(jaxpp.JaxppError, match="prefill_microbatches=1 < pp=2"):
    jaxpp.LLM(ckpt, dtype="float32", max_len=40, layout="pp2tp1v2p1")
  assert jaxpp.Layout.parse("pp4tp2v2m8p16") == jaxpp.Layout(
      4, 2, virtual_stages=2, microbatches=8, prefill_microbatches=16)
