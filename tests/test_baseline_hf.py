"""The `device_map="auto"` baseline: transformers' own generation, checked against jaxpp's.

On CPU accelerate maps the whole model to the CPU; the wave logic, padding, timing split
and the bench row are the same code that runs over several GPUs.
"""

import dataclasses

import numpy as np
import pytest
import torch

from jaxpp.bench import baseline_hf, results
from jaxpp.bench import measure as bench
from jaxpp.load import checkpoint
from jaxpp.model import sampling
from jaxpp.plan import presets
from jaxpp.serve import reference as generate
from tests import cli
from tests.hf_models import make_checkpoint

ARGS = dict(input_len=12, output_len=6, dtype="float32", decode_chunk=3, max_num_seqs=4)


@pytest.mark.parametrize("variant", ["gqa", "tied", "llama3_rope"])
def test_hf_generation_matches_jaxpp_reference(tmp_path, variant):
  """Greedy ids of a real checkpoint through `from_pretrained(device_map="auto")` equal
  jaxpp's single-device reference, with ragged prompts (left padding) over two waves."""
  d, _ = make_checkpoint(tmp_path / "ckpt", variant)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 97, n).tolist() for n in (9, 5, 12, 7, 3)]
  model = baseline_hf.load_model(str(d), torch.float32)
  got = baseline_hf.generate_waves(model, prompts, output_len=8, max_num_seqs=3)

  config = dataclasses.replace(checkpoint.load_config(d), eos_token_ids=())  # as the bench
  params = checkpoint.load_hf_params(d, config, np.float32)
  ref = generate.reference_generate(config, params, prompts, 8,
                                    sampling.SamplingParams.make(len(prompts)), max_len=24)
  assert got["tokens"] == ref
  assert (got["prompt_tokens"], got["completion_tokens"]) == (36, 40)
  assert got["devices"] == ["cpu"]
  # prefill is timed by a separate one-token call, so on a loaded CPU it may outlast the
  # whole 8-token call of a model this small: both are timed, their order is noise
  assert got["prefill_seconds"] > 0 and got["wall_seconds"] > 0
  assert got["decode_seconds"] == pytest.approx(got["wall_seconds"] - got["prefill_seconds"])


def test_random_model_is_placed_and_generates(tmp_path):
  config = presets.model_config("tiny")
  model = baseline_hf.random_model(config.to_hf(), torch.float32)
  counted = sum(p.numel() for p in model.parameters())
  assert counted == config.param_count()
  assert all(p.device.type == "cpu" and p.is_floating_point() for p in model.parameters())
  norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
  assert all(bool((p == 1).all()) for p in norms)
  got = baseline_hf.generate_waves(model, [[5, 6, 7]] * 2, output_len=4, max_num_seqs=2)
  assert [len(t) for t in got["tokens"]] == [4, 4]


def test_hf_auto_row_in_the_bench_table():
  config, hw = presets.model_config("tiny"), presets.hardware("h100")
  prompts = np.random.default_rng(0).integers(3, 200, (6, ARGS["input_len"])).tolist()
  row = bench.hf_row(config, hw, prompts, ARGS)
  assert (row["layout"], row["devices"], row["microbatches"], row["requests"]) == (
      "hf_auto", 1, 1, 6)
  assert row["total_tokens_per_second"] == pytest.approx(6 * 18 / row["wall_seconds"])
  assert row["bubble_schedule"] == 0 and row["bubble_measured"] is None
  line = results.markdown([row], "header").splitlines()[-1]
  assert line.startswith("| hf_auto | none |") and "| – |" in line


def test_cli_runs_hf_auto_first_and_reports_it(tmp_path):
  rows = cli.bench_rows(tmp_path / "bench", "--layouts=pp1tp1,hf_auto", "--quant=none,int8")
  assert [(r["layout"], r["quant"]) for r in rows] == [
      ("pp1tp1", "none"), ("pp1tp1", "int8"), ("hf_auto", "none")]


def test_child_failure_is_one_line(tmp_path):
  bad = dict(presets.model_config("tiny").to_hf(), num_attention_heads=3)  # 64 % 3 != 0
  with pytest.raises(Exception, match=r"^hf_auto baseline failed \(exit 1\): "):
    baseline_hf.run(bad, [[5, 6]], output_len=2, max_num_seqs=1, dtype="float32")
