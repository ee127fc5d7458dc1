"""Every shipped config runs the job, shrunk, and the command line behaves: exit codes, errors.

The in-process tests call `job.run_job`, the same function as `python -m jaxpp.run`; the
subprocess tests check what only the entry point does (flag parsing, device set-up, one-line
errors). Every mistake in the config, the input or the output location must be one
`JaxppError` line raised before anything is compiled, with no output file left behind.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import ml_collections
import pytest

from jaxpp.errors import JaxppError
from jaxpp.job import runner as job

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.py"))
TICKETS = REPO / "data" / "tickets.jsonl"
FIELDS = {"id", "line", "summary", "finish_reason", "prompt_tokens", "completion_tokens",
          "truncated_tokens"}
FAST_S = 5.0  # a config / input / output mistake must surface before any compile


def load_config(path: pathlib.Path) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f"config_smoke_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def leaf_paths(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  out = set()
  for key, value in config.items():
    out.add(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out |= leaf_paths(value, f"{prefix}{key}.")
  return out


def read_jsonl(path) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def write_tickets(path: pathlib.Path, n: int) -> list[str]:
  """The first n tickets of data/tickets.jsonl; returns their ids."""
  with open(TICKETS, encoding="utf-8") as f:
    lines = [next(f) for _ in range(n)]
  path.write_text("".join(lines), encoding="utf-8")
  return [json.loads(l)["id"] for l in lines]


def shrunk(config: ml_collections.ConfigDict, tmp_path: pathlib.Path, *, n: int = 12,
           max_new_tokens: int = 3) -> ml_collections.ConfigDict:
  config.sampling.max_new_tokens = max_new_tokens
  config.job.input = str(tmp_path / "in.jsonl")
  write_tickets(tmp_path / "in.jsonl", n)
  config.job.output = str(tmp_path / "out" / "summaries.jsonl")
  config.job.progress = False
  return config


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "jaxpp.run", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_configs_exist():
  assert CONFIGS, "no configs/*.py found"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_shrunk(path, tmp_path):
  config = load_config(path)
  want = leaf_paths(load_config(REPO / "configs" / "harbor.py"))
  got = leaf_paths(config)
  assert got == want, f"{path.name}: missing {sorted(want - got)}, extra {sorted(got - want)}"
  devices = None
  if not pathlib.Path(config.model.checkpoint).is_dir():
    # GPU configs (harbor_70b_4gpu.py) name a placeholder checkpoint to override on the
    # command line. Run their layout and schedule on the shipped demo model instead, on as
    # many CPU devices as the layout uses, in float32 and within the demo's context.
    config.model.checkpoint = str(REPO / "models" / "demo-llama")
    config.model.dtype = "float32"
    config.engine.max_len = min(config.engine.max_len, 1024)
    devices = jax.devices()[:config.mesh.pp * config.mesh.tp * max(config.mesh.dp, 1)]
  config = shrunk(config, tmp_path)
  rep = job.run_job(config, devices=devices)

  rows = read_jsonl(config.job.output)
  want_ids = [d["id"] for d in read_jsonl(config.job.input)]
  assert sorted(r["id"] for r in rows) == sorted(want_ids)
  assert len({r["id"] for r in rows}) == len(rows)
  for r in rows:
    assert set(r) == FIELDS
    assert isinstance(r["summary"], str)
    assert r["finish_reason"] in ("stop", "length")
    assert r["prompt_tokens"] > 0 and 1 <= r["completion_tokens"] <= 3
  assert rep["reconciled"] is True
  assert rep["input_lines"] == rep["written_total"] == len(want_ids)
  assert rep["completion_tokens"] == sum(r["completion_tokens"] for r in rows)


def expect_fast_error(config, match: str) -> None:
  """run_job raises one JaxppError line quickly and leaves no output or errors file."""
  start = time.perf_counter()
  with pytest.raises(JaxppError, match=match) as info:
    job.run_job(config)
  assert time.perf_counter() - start < FAST_S, "raised only after compiling?"
  assert "\n" not in str(info.value)
  out = pathlib.Path(config.job.output)
  assert not out.exists() and not out.with_name(out.stem + ".errors.jsonl").exists()


@pytest.fixture
def harbor(tmp_path):
  return shrunk(load_config(REPO / "configs" / "harbor.py"), tmp_path, n=4)


@pytest.mark.parametrize("overrides, match", [
    (dict(mesh=dict(pp=2, tp=2)), r"layout pp2tp2 uses 4 of 8 devices; layouts that use "
                                  r"all 8: dp2pp2tp2, pp4tp2, pp2tp4"),
    (dict(schedule=dict(microbatches=2)), r"microbatches=2 < pp=4"),
    (dict(mesh=dict(dp=2)), r"layout dp2pp4tp2 uses 16 of 8 devices"),
    (dict(mesh=dict(pp=3, dp=0)), r"replicas of pp3tp2 \(6 devices\) cannot fill 8"),
])
def test_bad_layout_is_one_clear_error(harbor, overrides, match):
  for group, values in overrides.items():
    for key, value in values.items():
      harbor[group][key] = value
  expect_fast_error(harbor, match)


def test_bad_length_policy(harbor):
  harbor.job.length_policy = "bogus"
  expect_fast_error(harbor, r"job.length_policy='bogus'; choose one of truncate, reject")


def test_bad_sampling_settings(harbor):
  harbor.sampling.top_p = 1.5
  expect_fast_error(harbor, r"sampling top_p must be in \(0, 1\]")


def test_bad_quant(harbor):
  harbor.model.quant = "int4"
  expect_fast_error(harbor, r"^quant='int4' is not supported; choose one of none, int8, fp8$")


def test_bad_attention(harbor):
  harbor.model.attention = "flash"
  expect_fast_error(harbor, r"^model.attention='flash'; choose one of auto, kernel, xla$")


def test_output_directory_not_writable(harbor, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory\n")
  harbor.job.output = str(blocker / "out" / "summaries.jsonl")
  expect_fast_error(harbor, r"^job output .*a_file/out/summaries\.jsonl: not writable")
  assert blocker.read_text() == "not a directory\n"


def test_missing_input(harbor, tmp_path):
  harbor.job.input = str(tmp_path / "nowhere.jsonl")
  expect_fast_error(harbor, r"^job input .*nowhere\.jsonl: no such file$")


def test_unreadable_input(harbor, tmp_path):
  (tmp_path / "a_dir.jsonl").mkdir()
  harbor.job.input = str(tmp_path / "a_dir.jsonl")
  expect_fast_error(harbor, r"^job input .*a_dir\.jsonl: not a regular file$")
  if os.geteuid() != 0:  # root reads through chmod 000
    locked = tmp_path / "locked.jsonl"
    locked.write_text('{"id": 1, "text": "x"}\n')
    locked.chmod(0)
    harbor.job.input = str(locked)
    expect_fast_error(harbor, r"^job input .*locked\.jsonl: cannot read")


def test_missing_checkpoint(harbor, tmp_path):
  harbor.model.checkpoint = str(tmp_path / "no-such-model")
  expect_fast_error(harbor, r"checkpoint directory .*no-such-model does not exist")


def test_cli_runs_with_overrides(tmp_path):
  ids = write_tickets(tmp_path / "in.jsonl", 6)
  out = tmp_path / "nested" / "summaries.jsonl"
  proc = run_cli("--config", "configs/harbor.py", "--config.sampling.max_new_tokens=4",
                 f"--config.job.input={tmp_path / 'in.jsonl'}", f"--config.job.output={out}",
                 "--config.job.progress=False")
  assert proc.returncode == 0, proc.stderr
  assert "8 x cpu" in proc.stdout  # virtual devices were set before the backend started
  assert "input lines = written + rejected: 6 = 6 + 0 ✓" in proc.stdout, proc.stdout
  rows = read_jsonl(out)
  assert sorted(r["id"] for r in rows) == sorted(ids)
  assert all(set(r) == FIELDS and 1 <= r["completion_tokens"] <= 4 for r in rows)


def test_cli_unknown_key_is_an_error(tmp_path):
  proc = run_cli("--config", "configs/harbor.py", "--config.mesh.bogus=1",
                 f"--config.job.output={tmp_path / 'o.jsonl'}")
  assert proc.returncode != 0
  assert "bogus" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "o.jsonl").exists()


def test_cli_jaxpp_error_is_one_line(tmp_path):
  write_tickets(tmp_path / "in.jsonl", 2)
  proc = run_cli("--config", "configs/harbor.py",
                 f"--config.model.checkpoint={tmp_path / 'missing'}",
                 f"--config.job.input={tmp_path / 'in.jsonl'}",
                 f"--config.job.output={tmp_path / 'o.jsonl'}",
                 "--config.job.progress=False")
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "missing" in errors[0], proc.stderr
  assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("group, key, value, match", [
    ("engine", "max_len", 100000, r"^max_len=100000 exceeds the model's max_position_embeddings"),
    ("engine", "max_len", 1, r"^max_len=1 must be >= 2"),
    ("schedule", "decode_chunk", -1, r"^decode_chunk=-1 must be >= 1 \(0 = from the layout\)$"),
    ("model", "dtype", "float16", r"^dtype 'float16' is not supported; choose one of"),
    ("engine", "max_num_seqs", -1, r"^engine.max_num_seqs=-1 must be >= 1 \(0 = what free"),
    ("engine", "block_size", 24, r"^engine.block_size=24 must be a power of two >= 16"),
    ("engine", "kv_cache_memory", -1.0, r"^engine.kv_cache_memory=-1.0 must be >= 0"),
    ("engine", "prefill_chunk", -8, r"^engine.prefill_chunk=-8 must be >= 0"),
    ("engine", "kv_dtype", "fp4", r"^engine.kv_dtype='fp4' is not one of auto, fp8"),
    ("watchdog", "min_seconds", 0.0, r"^watchdog: multiple=.* must be > 0"),
])
def test_out_of_range_values_are_refused_before_the_probe(harbor, capsys, group, key, value,
                                                          match):
  """Refused with the config and the model alone: no health probe, no compile, no files."""
  harbor[group][key] = value
  expect_fast_error(harbor, match)
  assert "health:" not in capsys.readouterr().err


def copy_checkpoint(tmp_path: pathlib.Path, src: str) -> pathlib.Path:
  dst = tmp_path / "ckpt"
  dst.mkdir()
  for f in pathlib.Path(src).iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


@pytest.mark.parametrize("damage, match", [
    ("truncate", r"^checkpoint file .*model\.safetensors: unreadable safetensors \(Error "
                 r"while deserializing header: incomplete metadata, file not fully covered\)$"),
    ("garbage", r"^checkpoint file .*model\.safetensors: unreadable safetensors"),
    ("shape", r"^checkpoint .*: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape "
              r"\(\d+, \d+\) but config\.json implies"),
])
def test_damaged_checkpoint_is_refused_before_the_probe(harbor, tmp_path, capsys, damage,
                                                        match):
  """A cut-off download, a file that is not safetensors, a config.json that does not
  describe the tensors: one error line from the headers alone, before the probe."""
  ckpt = copy_checkpoint(tmp_path, harbor.model.checkpoint)
  weights = ckpt / "model.safetensors"
  if damage == "truncate":
    weights.write_bytes(weights.read_bytes()[:-1000])
  elif damage == "garbage":
    weights.write_bytes(b"<html>rate limited</html>" * 40)
  else:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (ckpt / "config.json").write_text(json.dumps(cfg))
  harbor.model.checkpoint = str(ckpt)
  expect_fast_error(harbor, match)
  assert "health:" not in capsys.readouterr().err


def test_cli_value_of_the_wrong_type_is_one_error_line(tmp_path):
  """absl's two-line FATAL for `--config.mesh.pp=abc` becomes the job's `error:` form."""
  proc = run_cli("--config", "configs/harbor.py", "--config.mesh.pp=abc",
                 f"--config.job.output={tmp_path / 'o.jsonl'}")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      "error: flag --config.mesh.pp=abc: invalid literal for int() with base 10: 'abc'"]
