"""Every shipped config runs, shrunk, and the command line behaves: exit codes and errors.

The in-process test calls the same library function as `python -m jaxpp.run`; the subprocess
tests check what only the entry point does (flag parsing, device set-up, one-line errors).
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from jaxpp import demo
from jaxpp.errors import JaxppError

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.py"))
FIELDS = {"id", "summary", "finish_reason", "prompt_tokens", "completion_tokens"}


def load_config(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def read_jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "jaxpp.run", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_configs_exist():
  assert CONFIGS, "no configs/*.py found"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_shrunk(path, tmp_path):
  config = load_config(path)
  with config.unlocked():
    config.sampling.max_new_tokens = 3
    config.job.output = str(tmp_path / "out" / "summaries.jsonl")
  stats = demo.run_demo(config)

  rows = read_jsonl(config.job.output)
  want_ids = [d["id"] for d in read_jsonl(config.job.input)]
  assert [r["id"] for r in rows] == want_ids
  for r in rows:
    assert set(r) == FIELDS
    assert isinstance(r["summary"], str)
    assert r["finish_reason"] in ("stop", "length")
    assert r["prompt_tokens"] > 0 and 1 <= r["completion_tokens"] <= 3
  assert stats["documents"] == len(want_ids)
  assert stats["completion_tokens"] == sum(r["completion_tokens"] for r in rows)


@pytest.mark.parametrize("overrides, match", [
    (dict(mesh=dict(pp=2, tp=2)), r"pp\*tp\*dp = 2\*2\*1 = 4 but there are 8 devices"),
    (dict(schedule=dict(microbatches=2)), r"microbatches=2 < pp=4"),
    (dict(mesh=dict(dp=2)), r"mesh.dp=2"),
])
def test_bad_layout_is_one_clear_error(overrides, match, tmp_path):
  config = load_config(REPO / "configs" / "harbor.py")
  config.job.output = str(tmp_path / "o.jsonl")
  for group, values in overrides.items():
    for key, value in values.items():
      config[group][key] = value
  with pytest.raises(JaxppError, match=match):
    demo.run_demo(config)
  assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("line, match", [
    ("not json", "not valid JSON"),
    ('{"text": "no id"}', 'expected an object with "id"'),
    ('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}', "duplicate id 1"),
])
def test_bad_input_is_a_jaxpp_error(tmp_path, line, match):
  path = tmp_path / "in.jsonl"
  path.write_text(line + "\n")
  with pytest.raises(JaxppError, match=match):
    demo.read_documents(path)


def test_cli_runs_with_overrides(tmp_path):
  out = tmp_path / "nested" / "summaries.jsonl"
  proc = run_cli("--config", "configs/harbor.py", "--config.sampling.max_new_tokens=4",
                 f"--config.job.output={out}")
  assert proc.returncode == 0, proc.stderr
  assert "8 x cpu" in proc.stdout  # virtual devices were set before the backend started
  rows = read_jsonl(out)
  assert len(rows) == len(read_jsonl(REPO / "data" / "tickets_demo.jsonl"))
  assert all(set(r) == FIELDS and r["completion_tokens"] <= 4 for r in rows)


def test_cli_unknown_key_is_an_error(tmp_path):
  proc = run_cli("--config", "configs/harbor.py", "--config.mesh.bogus=1",
                 f"--config.job.output={tmp_path / 'o.jsonl'}")
  assert proc.returncode != 0
  assert "bogus" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "o.jsonl").exists()


def test_cli_jaxpp_error_is_one_line(tmp_path):
  proc = run_cli("--config", "configs/harbor.py",
                 f"--config.model.checkpoint={tmp_path / 'missing'}",
                 f"--config.job.output={tmp_path / 'o.jsonl'}")
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "missing" in errors[0], proc.stderr
