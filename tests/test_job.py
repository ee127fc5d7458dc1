"""The Harbor batch job end to end: same summaries on every layout, resume after SIGKILL, bad input.

Shrunk so the file runs in about a minute on a 2-core CPU host: small inputs, few new tokens,
no bubble measurement, no progress bar. Runs with the same layout share compiled programs
(the pipeline is a static, hashable jit argument), so only the first run of a layout compiles.
"""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import ml_collections
import pytest

from jaxpp import run
from jaxpp.errors import JaxppError
from jaxpp.job import files as jobio
from jaxpp.job import runner as job
from jaxpp.load.tokenizer import Tokenizer
from tests import cli
from tests.test_jobio import EXPECTED_REJECTIONS, GOOD_LINES

REPO = pathlib.Path(__file__).resolve().parent.parent
TICKETS = REPO / "data" / "tickets.jsonl"
BAD = REPO / "tests" / "data" / "bad_tickets.jsonl"
FIELDS = {"id", "line", "summary", "finish_reason", "prompt_tokens", "completion_tokens",
          "truncated_tokens"}


def load_config() -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("config_job_harbor", REPO / "configs" / "harbor.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def shrunk(input_path, output_path, max_new_tokens: int = 8, **job_fields):
  config = load_config()
  config.sampling.max_new_tokens = max_new_tokens
  config.job.input, config.job.output = str(input_path), str(output_path)
  config.job.progress = False
  for k, v in job_fields.items():
    config.job[k] = v
  return config


def read_jsonl(path) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def ticket_lines(n: int) -> list[str]:
  with open(TICKETS, encoding="utf-8") as f:
    return [next(f) for _ in range(n)]


def keys_once(rows: list[dict]) -> list[str]:
  """Output ticket keys (1 and "1" distinct), asserting none appears twice."""
  keys = [jobio.ticket_key(r["id"]) for r in rows]
  assert len(keys) == len(set(keys)), "an id was written twice"
  return keys


# --- end to end: pp=4 x tp=2 gives the single-device summaries -----------------------------


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
  """The 16 first tickets (two of 6,000+ tokens, truncated) on pp4 x tp2 and on one device."""
  tmp = tmp_path_factory.mktemp("e2e")
  src = tmp / "in.jsonl"
  src.write_text("".join(ticket_lines(16)), encoding="utf-8")
  piped = shrunk(src, tmp / "pp4tp2" / "out.jsonl")
  single = shrunk(src, tmp / "single" / "out.jsonl")
  single.mesh.pp, single.mesh.tp, single.schedule.microbatches = 1, 1, 1
  for config in (piped, single):  # several decode calls of 8 tokens: the report times them
    config.schedule.decode_chunk = 2
  replicas = shrunk(src, tmp / "dp2pp2tp2" / "out.jsonl")
  replicas.mesh.dp, replicas.mesh.pp, replicas.mesh.tp = 2, 2, 2
  replicas.schedule.decode_chunk = 2
  return dict(src=src, config=piped,
              piped=(job.run_job(piped), read_jsonl(piped.job.output)),
              single=(job.run_job(single, devices=jax.devices()[:1]),
                      read_jsonl(single.job.output)),
              replicas=(job.run_job(replicas), read_jsonl(replicas.job.output)))


def test_layouts_give_identical_summaries(e2e):
  want = [json.loads(l)["id"] for l in e2e["src"].read_text(encoding="utf-8").splitlines()]
  (_, piped), (_, single) = e2e["piped"], e2e["single"]
  for rows in (piped, single):
    assert sorted(keys_once(rows)) == sorted(map(jobio.ticket_key, want))
    assert all(set(r) == FIELDS for r in rows)
  by_id = {r["id"]: r for r in single}
  for r in piped:
    assert r == by_id[r["id"]], r["id"]  # greedy: same text, tokens and finish reason

  config = e2e["config"]  # long tickets are truncated to the prompt budget, not rejected
  tok = Tokenizer.from_dir(config.model.checkpoint)
  budget = config.engine.max_len - config.sampling.max_new_tokens + 1
  lengths = {json.loads(l)["id"]: len(tok.encode(config.job.prompt_template.format_map(
      json.loads(l)))) for l in e2e["src"].read_text(encoding="utf-8").splitlines()}
  long_ids = {i for i, n in lengths.items() if n > budget}
  assert len(long_ids) >= 2
  for r in piped:
    assert r["prompt_tokens"] == min(lengths[r["id"]], budget), r["id"]
    assert r["truncated_tokens"] == max(lengths[r["id"]] - budget, 0), r["id"]
    assert 1 <= r["completion_tokens"] <= 8


def test_replicas_give_the_single_device_summaries(e2e):
  """dp=2 replicas of pp2 x tp2: every id once, each row the single device's; the report
  names the layout and counts slots over both replicas."""
  (rep, rows), (_, single) = e2e["replicas"], e2e["single"]
  by_id = {r["id"]: r for r in single}
  assert sorted(keys_once(rows)) == sorted(keys_once(single))
  for r in rows:
    assert r == by_id[r["id"]], r["id"]
  assert rep["layout"]["name"] == "dp2pp2tp2" and rep["layout"]["dp"] == 2
  assert rep["reconciled"] is True


def test_replicas_resume_and_dp_zero_fills_the_devices(e2e, tmp_path):
  """A run over a partly written output with mesh.dp=0 (pp2: four replicas on 8 devices)
  writes only the missing ids, each once, equal to the single device's."""
  _, single = e2e["single"]
  out = tmp_path / "out.jsonl"
  done = e2e["single"][1][:6]
  out.write_text("".join(json.dumps(r) + "\n" for r in done), encoding="utf-8")
  config = shrunk(e2e["src"], out)
  config.mesh.dp, config.mesh.pp, config.mesh.tp = 0, 2, 1
  rep = job.run_job(config)
  rows = read_jsonl(out)
  by_id = {r["id"]: r for r in single}
  assert sorted(keys_once(rows)) == sorted(keys_once(single))
  assert all(r == by_id[r["id"]] for r in rows)
  assert rep["layout"]["name"] == "dp4pp2tp1" and rep["skipped_done"] == 6
  assert rep["written_run"] == len(single) - 6


def test_report_fields_and_file(e2e):
  for rep, rows in (e2e["piped"], e2e["single"]):
    assert rep["reconciled"] is True
    assert rep["input_lines"] == rep["written_total"] == rep["written_run"] == len(rows) == 16
    assert rep["rejected_total"] == rep["skipped_done"] == rep["duplicate_rows"] == 0
    assert rep["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert rep["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows)
    for k in ("prefill_tokens_per_second", "decode_tokens_per_second",
              "total_tokens_per_second", "documents_per_second"):
      assert rep[k] > 0, k
    # from the run's own decode calls: the ring's fill and drain, plus host time
    assert 0.0 <= rep["bubble_schedule"] <= rep["bubble_measured"] < 1.0
    tick = rep["tick_seconds"]  # a program's first (compiling) call is not timed
    assert 1 <= tick["count"] < rep["completion_tokens"] / 2
    assert 0 < tick["p50"] <= tick["p90"] <= tick["p99"]
    assert pathlib.Path(rep["latency_png"]).read_bytes()[:4] == b"\x89PNG"
    assert rep["interrupted"] is None
    long_rows = [r for r in rows if r["truncated_tokens"]]
    assert rep["truncated_run"] == len(long_rows) >= 2
    assert rep["projected_wall_seconds_40000"] > 0
    assert rep["projected_wall_40000"] not in ("", "n/a")
    # packed prefill: the programs computed a few rows' tails more than the prompts
    assert rep["prefill_positions"] >= rep["prompt_tokens"]
    assert 0 <= rep["prefill_padding"] < 0.5, rep["prefill_padding"]
    assert 0 < rep["load_seconds"] <= rep["startup_seconds"] < rep["wall_seconds"]
    assert rep["compile_seconds"] >= 0 and rep["steady_documents_per_second"] > 0
    path = pathlib.Path(rep["report_file"])
    assert path == pathlib.Path(rep["output"]).with_name("out.jsonl.report.json")
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["reconciled"] is True and saved["input_lines"] == 16
    assert saved["layout"] == rep["layout"]
  assert e2e["piped"][0]["layout"]["pp"] == 4 and e2e["piped"][0]["layout"]["tp"] == 2
  assert e2e["piped"][0]["bubble_schedule"] > 0  # pp=4 fills and drains
  assert e2e["single"][0]["layout"]["pp"] == 1 and e2e["single"][0]["bubble_schedule"] == 0


def test_report_names_the_devices_used(e2e):
  """BUG (jaxpp/job/runner.py, the `devices=devices_summary()` argument of build_report): the report
  names every device of the backend, not the ones the job ran on."""
  assert e2e["piped"][0]["devices"].startswith("8 x cpu")
  assert e2e["single"][0]["devices"].startswith("1 x cpu"), e2e["single"][0]["devices"]


# --- SIGKILL mid-run, torn last line, rerun: nothing lost, nothing doubled ----------------


def job_cli(src, out, n_seqs: int = 4) -> list[str]:
  return [sys.executable, "-m", "jaxpp.run", "--config", "configs/harbor.py",
          f"--config.job.input={src}", f"--config.job.output={out}",
          "--config.sampling.max_new_tokens=8", f"--config.engine.max_num_seqs={n_seqs}",
          "--config.job.progress=False"]


def test_kill_and_resume(tmp_path):
  lines = ticket_lines(40)
  want = sorted(jobio.ticket_key(json.loads(l)["id"]) for l in lines)
  src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  src.write_text("".join(lines), encoding="utf-8")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = job_cli(src, out)

  rc, _, stderr = cli.signal_after_rows(cmd, out, signal.SIGKILL, cwd=REPO)
  assert rc == -signal.SIGKILL, (rc, stderr[-2000:])
  before = out.read_bytes()
  before = before[:before.rfind(b"\n") + 1]  # whole lines the killed run wrote
  n_before = before.count(b"\n")
  assert 3 <= n_before < len(lines), f"not killed mid-run: {n_before} of {len(lines)} rows"

  with open(out, "ab") as f:
    f.write(b'{"id": "T0')  # a torn write, as a kill inside write() would leave

  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  after = out.read_bytes()
  assert after.startswith(before), "rows written before the kill changed"
  assert after.endswith(b"\n")  # the torn line is gone, not glued to a new row
  rows = [json.loads(l) for l in after.decode("utf-8").splitlines()]
  assert sorted(keys_once(rows)) == want
  assert all(set(r) == FIELDS for r in rows)
  rep = json.loads((tmp_path / "out.jsonl.report.json").read_text(encoding="utf-8"))
  assert rep["skipped_done"] == n_before and rep["written_run"] == len(lines) - n_before
  assert rep["reconciled"] is True and rep["written_total"] == len(lines)
  assert f"{len(lines)} = {len(lines)} + 0 ✓" in done.stdout


def test_reserve_that_starves_the_job_is_an_error(tmp_path):
  """BUG (jaxpp/job/runner.py run_job loop + jaxpp/serve/engine.py Engine._admit): when the
  other class's priority_reserve takes every slot (interactive=16 = max_num_seqs,
  job.priority=batch), no ticket can ever be admitted; Engine.step() then returns []
  without doing anything and the job's `while True` spins forever at 100% CPU with an empty
  output instead of failing."""
  src = tmp_path / "in.jsonl"
  src.write_text("".join(ticket_lines(4)), encoding="utf-8")
  cmd = job_cli(src, tmp_path / "out.jsonl", n_seqs=16) + [
      "--config.engine.priority_reserve.interactive=16"]
  try:
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=30)
  except subprocess.TimeoutExpired:
    pytest.fail("the job hangs: a priority reserve leaves its class no slot, and nothing "
                "reports it (still running after 30 s on 4 tickets)")
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 1 and len(errors) == 1 and "reserve" in errors[0], proc.stderr


# --- bad input: every line lands in the output or the errors file, once -------------------


def test_bad_input_lines_are_errors_file_rows(tmp_path):
  out = tmp_path / "out.jsonl"
  errors = tmp_path / "out.errors.jsonl"
  config = shrunk(BAD, out)
  rep = job.run_job(config)

  rows = read_jsonl(out)
  assert sorted(keys_once(rows)) == sorted(jobio.ticket_key(i) for i in GOOD_LINES.values())
  assert all(set(r) == FIELDS for r in rows)
  rejected = read_jsonl(errors)
  assert [e["line"] for e in rejected] == sorted(EXPECTED_REJECTIONS)
  for e in rejected:
    assert set(e) == {"line", "id", "reason"}
    assert EXPECTED_REJECTIONS[e["line"]] in e["reason"], e
  ids = {e["line"]: e["id"] for e in rejected}  # the id is named whenever it could be read
  assert ids[7] == "T-7" and ids[8] == "T-1" and ids[9] == "T-9" and ids[14] == "T-14"
  assert ids[21] == 1 and ids[22] == "T-22"
  assert ids[4] is ids[6] is ids[12] is ids[13] is ids[18] is None
  assert rep["input_lines"] == 22 == rep["written_total"] + rep["rejected_total"]
  assert rep["written_total"] == len(GOOD_LINES)
  assert rep["rejected_total"] == rep["rejected_run"] == len(EXPECTED_REJECTIONS)
  assert rep["reconciled"] is True

  saved = out.read_bytes(), errors.read_bytes()
  again = job.run_job(shrunk(BAD, out))  # the same command again: nothing new to do
  assert (out.read_bytes(), errors.read_bytes()) == saved
  assert again["skipped_done"] == len(GOOD_LINES) and again["written_run"] == 0
  assert again["rejected_run"] == 0 and again["rejected_total"] == len(EXPECTED_REJECTIONS)
  assert again["reconciled"] is True and again["input_lines"] == 22


@pytest.mark.parametrize("policy", ["reject", "truncate"])
def test_over_long_ticket(policy, tmp_path):
  """A ticket longer than max_len: an errors row under "reject", summarised under "truncate"."""
  long_text = json.loads(ticket_lines(12)[11])["text"]  # T00012: 6,000+ tokens
  src = tmp_path / "in.jsonl"
  src.write_bytes(BAD.read_bytes() + json.dumps({"id": "T-long", "text": long_text}).encode()
                  + b"\n")
  config = shrunk(src, tmp_path / "out.jsonl", length_policy=policy)
  rep = job.run_job(config)
  rows, rejected = read_jsonl(config.job.output), read_jsonl(tmp_path / "out.errors.jsonl")
  long_line = 25
  good = sorted(jobio.ticket_key(i) for i in GOOD_LINES.values())
  if policy == "reject":
    assert sorted(keys_once(rows)) == good
    assert [e["line"] for e in rejected] == sorted(EXPECTED_REJECTIONS) + [long_line]
    assert rejected[-1]["id"] == "T-long" and "length_policy=reject" in rejected[-1]["reason"]
  else:
    assert sorted(keys_once(rows)) == sorted(good + [jobio.ticket_key("T-long")])
    assert [e["line"] for e in rejected] == sorted(EXPECTED_REJECTIONS)
    (row,) = [r for r in rows if r["id"] == "T-long"]
    assert row["prompt_tokens"] == config.engine.max_len - config.sampling.max_new_tokens + 1
  assert rep["input_lines"] == 23 == rep["written_total"] + rep["rejected_total"]
  assert rep["reconciled"] is True


def test_corrected_copy_after_a_length_rejection_is_summarised(tmp_path):
  """A ticket rejected by the length policy does not claim its id: a later copy still runs."""
  long_text = json.loads(ticket_lines(12)[11])["text"]  # T00012: 6,000+ tokens
  src = tmp_path / "in.jsonl"
  src.write_text(json.dumps({"id": "A", "text": long_text}) + "\n" +
                 json.dumps({"id": "A", "text": "My Harbor Sync invoice is wrong."}) + "\n")
  config = shrunk(src, tmp_path / "out.jsonl", length_policy="reject")
  rep = job.run_job(config)
  rows, rejected = read_jsonl(config.job.output), read_jsonl(tmp_path / "out.errors.jsonl")
  assert [r["id"] for r in rows] == ["A"]
  assert [(e["line"], e["id"]) for e in rejected] == [(1, "A")]
  assert "length_policy=reject" in rejected[0]["reason"]
  assert rep["input_lines"] == 2 and rep["reconciled"] is True


# --- the job's own files: never one another, and the exit code tells the truth ------------


@pytest.mark.parametrize("same", ["output", "errors", "link"])
def test_job_files_that_are_one_file_are_refused(tmp_path, same):
  """output = input (or a link to it), or errors = output: one error line before anything
  compiles, and the input is left byte for byte (its last line has no newline: the resume
  repair would have cut it)."""
  src = tmp_path / "in.jsonl"
  src.write_bytes("".join(ticket_lines(3)).rstrip("\n").encode())
  before = src.read_bytes()
  out, err = tmp_path / "out.jsonl", ""
  if same == "output":
    out = src
  elif same == "errors":
    err = str(out)
  else:
    out = tmp_path / "link.jsonl"
    out.symlink_to(src)
  config = shrunk(src, out, errors=err)
  with pytest.raises(JaxppError, match="is the same file as the job"):
    job.run_job(config)
  assert src.read_bytes() == before
  assert same == "link" or not (tmp_path / "out.jsonl").exists()


def test_a_broken_reconciliation_exits_non_zero(tmp_path):
  """An output that already holds an id twice can never reconcile: the report says
  MISMATCH and the exit code is 2, so a scheduler does not count the night a success."""
  lines = ticket_lines(3)
  src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  src.write_text("".join(lines), encoding="utf-8")
  row = json.dumps(dict(id=json.loads(lines[0])["id"], summary="x", finish_reason="length",
                        prompt_tokens=1, completion_tokens=1))
  out.write_text(row + "\n" + row + "\n", encoding="utf-8")
  proc = subprocess.run(job_cli(src, out), cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == run.EXIT_MISMATCH == 2, proc.stderr[-2000:]
  assert "!!! MISMATCH" in proc.stdout
  assert proc.stderr.strip().splitlines()[-1].startswith("error: !!! MISMATCH")
