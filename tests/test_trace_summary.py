"""`trace_summary`: op classes, self times, and a real trace of the bench's CPU run."""

import json

import numpy as np
import pytest

from jaxpp.bench import measure as bench
from jaxpp.bench import trace_summary
from jaxpp.bench.trace_summary import Event
from jaxpp.plan import presets


@pytest.mark.parametrize("op,kernel,expected", [
    ("custom-call.3", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x64", "matmul"),
    ("custom-call.7", "nvjet_hsh_64x8_64x16_2x1_v_bz_TNN", "matmul"),
    ("all-reduce-start.2", "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "collective"),
    ("collective-permute-start", "collective-permute-start", "collective"),
    ("copy.12", "copy_fusion", "copy"),
    ("loop_dynamic_update_slice_fusion", "loop_dynamic_update_slice_fusion", "copy"),
    ("input_reduce_fusion.3", "input_reduce_fusion_3", "other"),
])
def test_op_class(op, kernel, expected):
  assert trace_summary.op_class(op, kernel) == expected


def test_nested_events_get_their_self_time():
  ev = lambda op, start, dur: Event("cpu:0", "m", op, op, start, dur, dur)
  # a loop of 100 ns holding two 30 ns ops, then a lone op
  got = trace_summary._self_times([ev("while", 0, 100), ev("dot", 10, 30), ev("add", 50, 30),
                                   ev("copy", 120, 5)])
  assert [e.self_ns for e in got] == [40, 30, 30, 5]
  assert trace_summary._union_ns([(0, 100), (10, 40), (120, 125)]) == 105


def test_activity_closes_launch_gaps_and_finds_the_first_call():
  ev = lambda device, module, start, dur: Event(device, module, "op", "k", start, dur, dur)
  evs = [ev("gpu:0", "decode", 0, 10), ev("gpu:0", "decode", 11, 10),
         ev("gpu:0", "decode", 5000, 10), ev("gpu:1", "prefill", 0, 3)]
  act = trace_summary.activity(evs, gap_ns=2)
  assert act == {"gpu:0": {"decode": [[0, 21], [5000, 5010]]}, "gpu:1": {"prefill": [[0, 3]]}}
  assert trace_summary.first_call(act["gpu:0"]["decode"], gap_ns=100) == (0, 21)


def test_bench_traces_one_wave_and_sums_its_device_time(tmp_path):
  config, hw = presets.model_config("tiny"), presets.hardware("h100")
  prompts = np.random.default_rng(0).integers(3, 200, (8, 12)).tolist()
  args = dict(input_len=12, output_len=6, dtype="float32", decode_chunk=3, max_num_seqs=4,
              profile_dir=str(tmp_path))
  row = bench.run_layout(config, hw, "pp2tp1", prompts, args)
  assert row["profile"] == str(tmp_path / "pp2tp1" / "summary.md")
  summary = json.loads((tmp_path / "pp2tp1" / "summary.json").read_text())
  assert sorted(summary["devices"]) == ["cpu:0", "cpu:1"]  # one per pipeline stage
  for t in summary["devices"].values():
    assert 0 < t["busy_ms"] <= t["window_ms"]
  decode = summary["programs"]["jit_decode"]
  assert sorted(decode["ms"]) == ["cpu:0", "cpu:1"]
  assert sum(decode["classes"].values()) == pytest.approx(sum(decode["ms"].values()))
  assert decode["classes"]["collective"] > 0  # the ring's ppermutes
  assert "| op | class | count |" in (tmp_path / "pp2tp1" / "summary.md").read_text()
  assert (tmp_path / "pp2tp1" / "activity.png").stat().st_size > 0


def test_missing_trace_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no \\*.xplane.pb under"):
    trace_summary.find_trace(tmp_path)
