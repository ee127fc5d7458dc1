"""`jaxpp.bench` on CPU devices with a tiny shape (CI has no GPU): it runs, its numbers add up."""

import json
import pathlib
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxpp.bench import measure as bench
from jaxpp.bench import requests as bench_workload
from jaxpp.bench import results
from jaxpp.bench.random_weights import random_llm
from jaxpp.bench.suite import BenchOptions, run_suite
from jaxpp.errors import JaxppError
from jaxpp.model import params as params_lib
from jaxpp.parallel.layout import Layout
from jaxpp.plan import presets
from tests import cli

ARGS = dict(input_len=12, output_len=6, dtype="float32", decode_chunk=3, max_num_seqs=4)


@pytest.fixture(scope="module")
def tiny():
  return presets.model_config("tiny"), presets.hardware("h100")


@pytest.mark.parametrize("layout", ["pp1tp1", "pp2tp2", "pp4tp1v1m4", "pp2tp1v2m2", "dp2pp2tp2"])
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
  assert row["decode_hbm_roofline"] > 0
  # prefill FLOPs: 2 * params a prompt token plus causal attention's 2 * L^2 * N * H a layer
  n, L = row["prompt_tokens"], ARGS["input_len"]
  flops = 2 * config.param_count() * n + 8 * 2 * L * L * config.num_heads * config.head_dim * (
      config.num_layers)
  assert row["prefill_matmul_roofline"] == pytest.approx(
      flops * row["prefill_tokens_per_second"] / n / row["devices"] / hw.matmul_flops)


def test_random_weights_are_placed_on_their_stages(tiny):
  config, _ = tiny
  llm = random_llm(config, np.float32, max_len=32, decode_chunk=4, layout=Layout(4, 2))
  wqkv = llm.params["blocks"]["attn"]["wqkv"]
  assert wqkv.shape[:3] == (4, 1, 1)
  shapes = {s.data.shape for s in wqkv.addressable_shards}
  K = llm.pipeline.config.num_kv_heads
  assert shapes == {(1, 1, 1, config.hidden_size, K // 2, config.num_heads // K + 2,
                     config.head_dim)}
  flat = params_lib.flatten(llm.params)
  assert all(np.isfinite(np.asarray(x)).all() for x in flat.values())


def test_cli_writes_json_and_markdown(tmp_path):
  out = tmp_path / "bench"
  rows = cli.bench_rows(out, "--layouts=pp1tp1", "--attention=xla,kernel")
  assert [(r["layout"], r["attention"]) for r in rows] == [("pp1tp1", "xla"),
                                                            ("pp1tp1", "kernel")]
  assert "| pp1tp1 | none | kernel |" in (out / "results.md").read_text()


@pytest.mark.parametrize("flag, message", [
    ("--layouts=pp2x", "error: layout 'pp2x' is not of the form"),
    ("--attention=flash", "error: --attention='flash' is not one of auto, kernel, xla"),
    ("--prefill_chunk=0,half", "error: --prefill_chunk entries are whole numbers, not 'half'")])
def test_cli_bad_flag_is_one_line(tmp_path, flag, message):
  proc = cli.run_module("jaxpp.bench", "--model=tiny", flag, f"--out={tmp_path}", timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("tp,attention", [(1, "xla"), (2, "xla"), (2, "kernel")])
def test_gspmd_baseline_gives_the_single_device_tokens(tiny, tp, attention):
  """With the fused attention kernel too: under the baseline's mesh it splits over kv heads."""
  from jaxpp.bench import baseline_tp
  from jaxpp.model import sampling
  from jaxpp.serve import reference as generate
  config, _ = tiny
  prompts = np.random.default_rng(1).integers(3, 200, (5, 10)).tolist()
  llm = random_llm(config, np.float32, max_len=20, decode_chunk=4, layout=Layout(1, tp),
                         attention=attention)
  params = baseline_tp.plain_params(llm.pipeline, llm.params)
  assert params["blocks"]["mlp"]["w_gate_up"].sharding.spec == P(None, None, None, "tp")
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
  assert "| gspmd_tp2 |" in results.markdown([row], "header")


def test_plots_are_written(tmp_path, tiny):
  from jaxpp.bench import plots as bench_plots
  config, hw = tiny
  prompts = np.random.default_rng(0).integers(3, 200, (4, ARGS["input_len"])).tolist()
  rows = [bench.run_layout(config, hw, layout, prompts, ARGS)
          for layout in ("pp2tp1m2", "pp2tp1m4", "gspmd_tp2")]
  paths = bench_plots.write(rows, tmp_path, ARGS["decode_chunk"])
  assert sorted(p.name for p in paths) == ["gantt_pp2tp1m2_none_xla.png",
                                           "gantt_pp2tp1m4_none_xla.png", "throughput.png"]
  for p in paths:
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- --workload=FILE.jsonl ---------------------------------------------------------------

MIXED = [dict(input_len=9, output_len=5), dict(prompt_ids=[5, 6, 7], output_len=2), {},
         dict(output_len=1, input_len=4), dict(prompt_ids=[0, 100, 199, 3, 4], output_len=7),
         dict(input_len=12, output_len=3), dict(prompt_ids=[8] * 6, output_len=4)]


def _jsonl(path, lines):
  path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) if x else "   "
                             for x in lines) + "\n")
  return path


def test_workload_file_is_read_in_order(tmp_path):
  f = _jsonl(tmp_path / "mixed.jsonl", MIXED)
  work = bench_workload.load(str(f), 200, np.random.default_rng(0))
  rng = np.random.default_rng(0)  # random prompts come from the same seeded draws, in order
  assert work.prompts == [rng.integers(3, 200, 9).tolist(), [5, 6, 7],
                          rng.integers(3, 200, 4).tolist(), [0, 100, 199, 3, 4],
                          rng.integers(3, 200, 12).tolist(), [8] * 6]
  assert work.output_lens == [5, 2, 1, 7, 3, 4]
  assert (work.name, work.max_len) == ("mixed.jsonl", 15)
  assert work.describe() == "6 requests from mixed.jsonl (mean 6 in / 4 out)"
  fixed = bench_workload.random(4, 8, 3, 200, np.random.default_rng(0))
  assert fixed.prompts == np.random.default_rng(0).integers(3, 200, (4, 8)).tolist()
  assert fixed.describe() == "4 requests x 8 in / 3 out" and fixed.name == "random"


@pytest.mark.parametrize("line, message", [
    ('{"input_len": 4, "output_len": 2, "max_tokens": 9}', "unknown key 'max_tokens'"),
    ('{"input_len": 4}', "output_len is missing"),
    ('{"input_len": 4, "output_len": 2', "not valid JSON"),
    ('{"prompt_ids": [5, 200], "output_len": 2}', r"prompt_ids\[1\] = 200 is not a token id in"
                                                  r" \[0, 200\)"),
    ('{"prompt_ids": [5, -1], "output_len": 2}', r"prompt_ids\[1\] = -1 is not a token id"),
    ('{"prompt_ids": [], "output_len": 2}', "prompt_ids must be a non-empty list"),
    ('{"prompt_ids": [5], "input_len": 3, "output_len": 2}', "needs exactly one of input_len or"),
    ('{"output_len": 2}', "needs exactly one of input_len or prompt_ids"),
    ('{"input_len": 4, "output_len": 0}', "output_len must be an integer >= 1, got 0"),
    ('{"input_len": 4, "output_len": true}', "output_len must be an integer >= 1, got true"),
    ('{"input_len": 2.5, "output_len": 1}', "input_len must be an integer >= 1, got 2.5"),
    ('[4, 2]', "expected an object"),
])
def test_bad_workload_lines_name_file_and_line(tmp_path, line, message):
  f = _jsonl(tmp_path / "w.jsonl", ['{"input_len": 4, "output_len": 2}', "", line])
  with pytest.raises(JaxppError, match=rf"^{re.escape(str(f))}:3: {message}") as e:
    bench_workload.load(str(f), 200, np.random.default_rng(0))
  assert "\n" not in str(e.value)


def test_empty_or_missing_workload_file(tmp_path):
  f = _jsonl(tmp_path / "empty.jsonl", ["", ""])
  with pytest.raises(JaxppError, match=rf"^{re.escape(str(f))}: no requests"):
    bench_workload.load(str(f), 200, np.random.default_rng(0))
  with pytest.raises(JaxppError, match="cannot read it"):
    bench_workload.load(str(tmp_path / "absent.jsonl"), 200, np.random.default_rng(0))


def test_gspmd_baseline_gives_each_prompt_its_own_tokens(tiny):
  from jaxpp.bench import baseline_tp
  from jaxpp.model import sampling
  from jaxpp.serve import reference as generate
  config, _ = tiny
  prompts = np.random.default_rng(2).integers(3, 200, (5, 6)).tolist()
  lens = [6, 1, 4, 2, 3]
  llm = random_llm(config, np.float32, max_len=12, decode_chunk=4, layout=Layout(1, 2))
  params = baseline_tp.plain_params(llm.pipeline, llm.params)
  got = baseline_tp.run(llm.pipeline, params, prompts, output_len=lens, max_num_seqs=3,
                        decode_chunk=4, max_len=12)
  ref = generate.reference_generate(config, jax.device_get(params), prompts, 6,
                                    sampling.SamplingParams.make(5), max_len=12)
  assert got["tokens"] == [r[:n] for r, n in zip(ref, lens)]
  assert got["completion_tokens"] == sum(lens)


def test_hf_waves_give_each_prompt_its_own_tokens(tiny):
  pytest.importorskip("accelerate")
  import torch

  from jaxpp.bench import baseline_hf
  model = baseline_hf.random_model(tiny[0].to_hf(), torch.float32)
  prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
  full = baseline_hf.generate_waves(model, prompts, output_len=4, max_num_seqs=2)
  got = baseline_hf.generate_waves(model, prompts, output_len=[4, 1, 3], max_num_seqs=2)
  assert got["tokens"] == [full["tokens"][0], full["tokens"][1][:1], full["tokens"][2][:3]]
  assert got["completion_tokens"] == 8


def test_bench_runs_a_mixed_workload_file(tmp_path):
  f = _jsonl(tmp_path / "mixed.jsonl", MIXED)
  run_suite(BenchOptions(model="tiny", workload=str(f), layouts="pp2tp1,gspmd_tp2",
                         input_len=1000, output_len=1000, num_requests=1,  # not used
                         decode_chunk=2, max_num_seqs=4, dtype="float32",
                         out=str(tmp_path / "out")))
  result = json.loads((tmp_path / "out" / "results.json").read_text())
  assert "6 requests from mixed.jsonl (mean 6 in / 4 out)" in result["header"]
  assert [r["layout"] for r in result["rows"]] == ["pp2tp1", "gspmd_tp2"]
  for r in result["rows"]:
    assert (r["workload"], r["requests"]) == ("mixed.jsonl", 6)
    assert (r["prompt_tokens"], r["completion_tokens"]) == (39, 22)
    assert r["output_tokens_per_second"] == pytest.approx(22 / r["wall_seconds"])
    assert r["total_tokens_per_second"] == pytest.approx(61 / r["wall_seconds"])
    assert r["timed_compiles"] == 0  # the untimed run of the same requests compiled them all


def test_mean_context_is_weighted_by_output_tokens():
  assert bench._mean_ctx([[1] * 10] * 3, [4] * 3) == 12  # input_len + output_len / 2
  assert bench._mean_ctx([[1] * 10, [1] * 2], [6, 2]) == pytest.approx((6 * 13 + 2 * 3) / 8)


def test_cli_bad_workload_is_one_line(tmp_path):
  f = _jsonl(tmp_path / "bad.jsonl", ['{"input_len": 4, "output_len": 2, "n": 1}'])
  proc = cli.run_module("jaxpp.bench", "--model=tiny", f"--workload={f}", f"--out={tmp_path}",
                        timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {f}:1: unknown key 'n' (allowed: input_len, output_len, prompt_ids, "
      "shared_prefix)")
  assert "Traceback" not in proc.stderr


def test_a_job_input_file_is_the_job_s_own_prompts(tmp_path):
  """`--workload=data/tickets.jsonl --tokenizer=...`: the prompts the job would build (its
  template, tokenizer, truncation) and --output_len each; bad lines skipped as the job's."""
  import types

  from jaxpp.job import files as jobio
  from jaxpp.job.prompter import Prompter
  from jaxpp.load.tokenizer import Tokenizer
  repo = pathlib.Path(__file__).resolve().parent.parent
  tickets, model = repo / "data" / "tickets.jsonl", repo / "models" / "harbor-tiny"
  src = tmp_path / "mixed.jsonl"
  src.write_text(tickets.read_text() + "not json\n" + '{"id": 7}\n')
  work = bench_workload.load(str(src), 1 << 16, np.random.default_rng(0), tickets=dict(
      tokenizer=str(model), template="Ticket:\n{text}\nSummary:", output_len=32, max_len=256))
  config = types.SimpleNamespace(model=types.SimpleNamespace(checkpoint=str(model)),
                                 job=types.SimpleNamespace(prompt_template="Ticket:\n{text}\n"
                                                           "Summary:", length_policy="truncate",
                                                           prompt_format="text",
                                                           system_prompt=""),
                                 sampling=types.SimpleNamespace(max_new_tokens=32),
                                 engine=types.SimpleNamespace(max_len=256))
  prompter = Prompter.for_job(Tokenizer.from_dir(model), config)
  job = [t.prompt for t in jobio.read_tickets(tickets, prepare=prompter)]
  assert work.prompts == job and len(job) == 240
  assert work.output_lens == [32] * 240 and max(map(len, job)) == 225  # cut to the budget
  assert "240 requests from mixed.jsonl" in work.describe()
  with pytest.raises(JaxppError, match="needs --tokenizer|pass --tokenizer"):
    bench_workload.load(str(tickets), 1 << 16, np.random.default_rng(0))
  with pytest.raises(JaxppError, match="outside the model's vocabulary"):
    bench_workload.load(str(tickets), 64, np.random.default_rng(0),
                        tickets=dict(tokenizer=str(model)))


def test_bench_runs_pipelines_on_virtual_cpu_devices(tmp_path):
  """`--cpu_devices=8`, as `jaxpp.run` does on CPU: a pp4tp2 pipeline and a one-device
  layout in one table, each on the first devices it needs."""
  rows = cli.bench_rows(tmp_path, "--cpu_devices=8", "--layouts=pp4tp2,pp1tp1")
  assert [(r["layout"], r["devices"]) for r in rows] == [("pp4tp2", 8), ("pp1tp1", 1)]
  assert all(r["output_tokens_per_second"] > 0 for r in rows)


def test_a_failing_layout_is_a_row_and_the_others_still_run(tmp_path, monkeypatch):
  """A layout that raises on the device (out of memory here) becomes a row with its error;
  results are on disk after every layout, so nothing measured is lost."""
  real = bench.run_layout
  written = []

  def run_layout(config, hw, text, prompts, args):
    written.append((tmp_path / "results.json").exists())
    if text == "pp2tp1":
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 98.8GiB\n"
                         "details")
    return real(config, hw, text, prompts, args)

  monkeypatch.setattr(bench, "run_layout", run_layout)
  opts = BenchOptions(model="tiny", layouts="pp1tp1,pp2tp1,pp2tp2", num_requests=4,
                      input_len=12, output_len=6, dtype="float32", decode_chunk=3,
                      max_num_seqs=4, out=str(tmp_path))
  rows = run_suite(opts)
  assert [r["layout"] for r in rows] == ["pp1tp1", "pp2tp1", "pp2tp2"]
  assert rows[1]["error"] == ("RuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying "
                              "to allocate 98.8GiB")
  assert "error" not in rows[0] and "error" not in rows[2]
  assert written == [False, True, True]  # each layout found the rows before it on disk
  assert json.loads((tmp_path / "results.json").read_text())["rows"][1]["error"]
  assert "| pp2tp1 | none | auto | error: RuntimeError" in (tmp_path / "results.md").read_text()


def test_table_shows_the_knobs_that_set_runs_apart():
  """Two runs that differ only in kv_grow must not print as two identical rows: the knob
  gets a column, and the paged cache's report (peak blocks, swaps) comes with it."""
  base = dict(layout="pp1tp1", quant="none", attention="kernel", block_size=64,
              max_num_seqs=128, kv_dtype="auto", prefix_cache=False, prefill_chunk=0,
              max_live=111, total_tokens_per_second=1.0)
  rows = [dict(base, kv_grow=False, kv_cache=dict(peak_blocks=1279, preemptions=0)),
          dict(base, kv_grow=True, max_live=130, kv_cache=dict(peak_blocks=1279, preemptions=7))]
  head, _, *body = results.markdown(rows, "header").splitlines()[2:]
  names = [c.strip() for c in head.strip("|").split("|")]
  assert "kv_grow" in names and "prefix_cache" not in names and "max_num_seqs" not in names
  cells = [dict(zip(names, (c.strip() for c in line.strip("|").split("|")))) for line in body]
  assert [(c["kv_grow"], c["max_live"], c["preemptions"]) for c in cells] == [
      ("False", "111", "0"), ("True", "130", "7")]
  dense = results.markdown([dict(base, block_size=0, kv_grow=False)], "h")
  assert "peak_blocks" not in dense and "kv_grow" not in dense
