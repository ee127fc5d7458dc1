"""An fp8 (e4m3) KV cache with per-token scales: about half the bytes a cached position
takes, every layout alike, and the trained model's greedy summaries kept (the scales
themselves: test_kv_scales.py).

Layouts: with `kv_dtype="fp8"` every layout stores the same rounded keys and values
(fp32 activations differ between layouts only in summation order, far below e4m3's step of
2^-4 relative), so their greedy tokens are the single-device fp8 run's. Accuracy: on the
shipped harbor-tiny and its 40 held-out tickets, in bf16, the fp8 cache keeps at least 36
of 40 greedy 24-token outputs identical to the bf16 cache (the bound `test_quant.py` gives
fp8 weights; measured: see docs/quantization.md).
"""

import numpy as np
import pytest

import jaxpp
from jaxpp.errors import JaxppError
from jaxpp.model import kv_cache
from tests import hf_models
from tests.test_paged import BLOCK, MAX_LEN, run, shared  # noqa: F401 (fixture)
from tests.test_quant import MAX_LEN as TICKET_LEN
from tests.test_quant import bf16, prompts  # noqa: F401 (fixtures)
from tests.test_trained_model import MODEL, held_out  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """test_paged's checkpoint and requests (its reference run is not needed here)."""
  ckpt, _ = hf_models.make_checkpoint(tmp_path_factory.mktemp("kv_fp8"), "deep",
                                      num_key_value_heads=4, num_attention_heads=8,
                                      head_dim=16, vocab_size=96, eos_token_id=None)
  rng = np.random.default_rng(0)
  ids = [[1] + rng.integers(3, 90, n).tolist() for n in (40, 3, 17, 29, 9, 33, 1, 22, 12)]
  return ckpt, ids, [6 + 5 * (i % 4) for i in range(len(ids))], None


@pytest.fixture(scope="module")
def single_fp8(model):
  ckpt, requests, new, _ = model
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, decode_chunk=4, block_size=BLOCK,
                  kv_dtype="fp8")
  eng, tokens, _ = run(llm, requests, new)
  assert eng.cache[0].dtype == kv_cache.FP8
  return tokens


@pytest.mark.parametrize("layout, attention, block_size", [
    ("pp2tp2", "kernel", BLOCK), ("pp1tp2", "xla", 0)])
def test_every_layout_gives_the_single_device_fp8_tokens(model, single_fp8, layout,
                                                         attention, block_size):
  ckpt, requests, new, _ = model
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, decode_chunk=4, layout=layout,
                  attention=attention, block_size=block_size, kv_dtype="fp8")
  assert run(llm, requests, new)[1] == single_fp8


def test_prefix_hits_and_chunks_keep_the_fp8_tokens(shared):  # noqa: F811
  """A token attends to its own pass's keys and values as the fp8 cache will hold them, so
  a prompt whose prefix comes from the prefix cache, or that is prefilled in chunks (of 16
  tokens, on pp2tp2 with the kernels), gives the tokens it gives prefilled whole on one
  device without the prefix cache (unrounded own keys made a prefix hit change tokens)."""
  ckpt, texts, _ = shared
  new = [8] * len(texts)
  whole = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, decode_chunk=4, block_size=BLOCK,
                    kv_dtype="fp8")
  want = run(whole, texts, new, max_num_seqs=2)[1]
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=MAX_LEN, decode_chunk=4, layout="pp2tp2",
                  attention="kernel", block_size=BLOCK, kv_dtype="fp8")
  eng, got, _ = run(llm, texts, new, max_num_seqs=2, prefix_cache=True, prefill_chunk=16)
  assert got == want and eng.stats.kv["prefix_hit_tokens"] > 0


def test_fp8_cache_takes_half_the_bytes_and_its_scales(model):
  """The same pool (CPUs report no free memory, so both hold what dense slots would) in
  half of bf16's bytes plus a bf16 scale per (token, kv head), as `block_bytes` counts it;
  on a GPU the budget then holds about twice the blocks (defaults.kv_blocks divides it by
  the block's bytes)."""
  llm = jaxpp.LLM(model[0], dtype="bfloat16", max_len=MAX_LEN, block_size=BLOCK)
  wide, narrow = llm.engine(), llm.engine(kv_dtype="fp8")
  assert wide.pages.blocks == narrow.pages.blocks
  assert len(wide.cache) == 2 and len(narrow.cache) == 4
  assert 2 * narrow.cache[0].nbytes == wide.cache[0].nbytes
  H = narrow.cache[0].shape[-1]
  assert sum(a.nbytes for a in narrow.cache) == sum(a.nbytes for a in wide.cache) * (
      1 + 2 / H) / 2
  per_block = llm.pipeline.block_bytes(BLOCK, narrow.cache[0].dtype)
  assert per_block * narrow.pages.blocks * llm.pipeline.layout.devices == sum(
      a.nbytes for a in narrow.cache)


def test_trained_model_keeps_its_summaries(bf16, prompts):  # noqa: F811 (fixtures)
  _, _, want = bf16
  llm = jaxpp.LLM(MODEL, dtype="bfloat16", max_len=TICKET_LEN, kv_dtype="fp8")
  got = llm.generate(prompts, max_new_tokens=24)
  same = sum(g.token_ids == w.token_ids for g, w in zip(got, want))
  assert same >= 36, f"{same} of {len(want)} outputs equal the bf16 cache's"


def test_unknown_kv_dtype_is_one_line(model):
  with pytest.raises(JaxppError, match="kv_dtype='fp4' is not one of auto, fp8"):
    jaxpp.LLM(model[0], dtype="float32", max_len=MAX_LEN, kv_dtype="fp4").engine()


def test_bench_runs_each_kv_dtype(tmp_path):
  """`--kv_dtype=auto,fp8`: one row each, the same tokens; the fp8 row's decode bytes (GB/s
  times decode seconds) count fewer cache bytes for the same weights and steps."""
  from tests import cli
  rows = cli.bench_rows(tmp_path, "--layouts=pp1tp1", "--kv_dtype=auto,fp8")
  assert [r["kv_dtype"] for r in rows] == ["auto", "fp8"]
  assert rows[0]["completion_tokens"] == rows[1]["completion_tokens"]
  wide, narrow = (r["decode_hbm_gbps_per_gpu"] * r["completion_tokens"]
                  / r["decode_tokens_per_second"] for r in rows)
  assert narrow < wide


def test_fp8_cache_refused_where_the_backend_cannot_convert(model, monkeypatch):
  from jaxpp.model import quant
  monkeypatch.setattr(quant, "runs_fp8", lambda device: False)
  llm = jaxpp.LLM(model[0], dtype="float32", max_len=MAX_LEN)
  with pytest.raises(JaxppError, match="^kv_dtype='fp8' is not supported on cpu: its XLA"):
    llm.engine(kv_dtype="fp8")
