"""`jaxpp.bench` on CPU devices with a tiny shape (CI has no GPU): it runs and its numbers add up."""


import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxpp import bench, presets
from jaxpp.model import params as params_lib
from tests import cli

ARGS = dict(input_len=12, output_len=6, dtype="float32", decode_chunk=3, max_num_seqs=4)


@pytest.fixture(scope="module")
def tiny():
  return presets.model_config("tiny"), presets.hardware("h100")


@pytest.mark.parametrize("layout", ["pp1tp1", "pp2tp2", "pp4tp1v1m4", "pp2tp1v2m2"])
def test_layouts_run_and_report(tiny, layout):
  config, hw = tiny
  prompts = np.random.default_rng(0).integers(3, 200, (8, ARGS["input_len"])).tolist()
  row = bench.run_layout(config, hw, layout, prompts, ARGS)
  assert row["requests"] == 8
  assert row["output_tokens_per_second"] == pytest.approx(8 * 6 / row["wall_seconds"])
  assert row["total_tokens_per_second"] == pytest.approx(8 * 18 / row["wall_seconds"])
  assert row["tokens_per_second_per_gpu"] * row["devices"] == pytest.approx(
      row["total_tokens_per_second"])
  assert 0 < row["bubble_schedule"] < 1 or row["pp"] == 1
  assert 0 <= row["bubble_measured"] <= 1
  assert row["decode_hbm_roofline"] > 0 and row["prefill_matmul_roofline"] > 0


def test_random_weights_are_placed_on_their_stages(tiny):
  config, _ = tiny
  llm = bench.random_llm(config, np.float32, max_len=32, decode_chunk=4, pp=4, tp=2)
  wq = llm.params["blocks"]["attn"]["wq"]
  assert wq.shape[:3] == (4, 1, 1)
  shapes = {s.data.shape for s in wq.addressable_shards}
  assert shapes == {(1, 1, 1, config.hidden_size, config.num_heads // 2, config.head_dim)}
  flat = params_lib.flatten(llm.params)
  assert all(np.isfinite(np.asarray(x)).all() for x in flat.values())


def test_cli_writes_json_and_markdown(tmp_path):
  out = tmp_path / "bench"
  rows = cli.bench_rows(out, "--layouts=pp1tp1")
  assert [r["layout"] for r in rows] == ["pp1tp1"]
  assert "| pp1tp1 |" in (out / "results.md").read_text()


def test_cli_bad_layout_is_one_line(tmp_path):
  proc = cli.run_module("jaxpp.bench", "--model=tiny", "--layouts=pp2x", f"--out={tmp_path}",
                        timeout=120)
  assert proc.returncode != 0
  assert "error: layout 'pp2x' is not of the form" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("tp", [1, 2])
def test_gspmd_baseline_gives_the_single_device_tokens(tiny, tp):
  from jaxpp import baseline_tp, generate, sampling
  config, _ = tiny
  prompts = np.random.default_rng(1).integers(3, 200, (5, 10)).tolist()
  llm = bench.random_llm(config, np.float32, max_len=20, decode_chunk=4, pp=1, tp=tp)
  params = baseline_tp.plain_params(llm.pipeline, llm.params)
  assert params["blocks"]["mlp"]["w_up"].sharding.spec == P(None, None, "tp")
  got = baseline_tp.run(llm.pipeline, params, prompts, output_len=7, max_num_seqs=3,
                        decode_chunk=4, max_len=20)
  ref = generate.reference_generate(config, jax.device_get(params), prompts, 7,
                                    sampling.SamplingParams.make(5), max_len=20)
  assert got["tokens"] == ref
  assert got["completion_tokens"] == 35 and got["prompt_tokens"] == 50


def test_gspmd_baseline_row_in_the_same_table(tiny):
  config, hw = tiny
  prompts = np.random.default_rng(0).integers(3, 200, (6, ARGS["input_len"])).tolist()
  row = bench.run_layout(config, hw, "gspmd_tp2", prompts, ARGS)
  assert (row["layout"], row["devices"], row["pp"], row["microbatches"]) == ("gspmd_tp2", 2, 1, 1)
  assert row["total_tokens_per_second"] == pytest.approx(6 * 18 / row["wall_seconds"])
  assert row["bubble_schedule"] == 0 and row["tick_seconds"]["count"] > 0
  assert "| gspmd_tp2 |" in bench.markdown([row], "header")


def test_plots_are_written(tmp_path, tiny):
  from jaxpp import bench_plots
  config, hw = tiny
  prompts = np.random.default_rng(0).integers(3, 200, (4, ARGS["input_len"])).tolist()
  rows = [bench.run_layout(config, hw, layout, prompts, ARGS)
          for layout in ("pp2tp1m2", "pp2tp1m4", "gspmd_tp2")]
  paths = bench_plots.write(rows, tmp_path, ARGS["decode_chunk"])
  assert sorted(p.name for p in paths) == ["gantt_pp2tp1m2_none.png", "gantt_pp2tp1m4_none.png",
                                           "throughput.png"]
  for p in paths:
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
