"""Two processes x 4 CPU devices on localhost (gloo): the default job across both, and fail-fast.

Real `python -m jaxpp.run` processes joined by JAX's distributed runtime, with pp=4 x tp=2
spanning the two (stages 0-1 in process 0, stages 2-3 in process 1). Shrunk inputs keep the
file near a minute on a 2-core host: startup and compile dominate each run.
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxpp.job import files as jobio
from jaxpp.job import runner as job
from tests.test_job import FIELDS, keys_once, read_jsonl, shrunk, ticket_lines

REPO = pathlib.Path(__file__).resolve().parent.parent
FAIL_FAST_S = 15.0  # a survivor must be gone this soon after its peer is killed
RUN_TIMEOUT_S = 300
HEALTH = re.compile(r"health: pp stage (\d) of 4: process (\d) on host \S+, devices (cpu:\d+) "
                    r"(cpu:\d+): ok \(\d+\.\d+ s\)")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def job_args(src, out, *extra: str) -> list[str]:
  return ["--config", "configs/harbor.py", f"--config.job.input={src}",
          f"--config.job.output={out}", "--config.sampling.max_new_tokens=8",
          "--config.job.progress=False", *extra]


class Run:
  """`python -m jaxpp.run ARGS` once per process, joined over a fresh local port.

  Output goes to files, not pipes, so a process never blocks on a full pipe while the test
  watches its output rows.
  """

  def __init__(self, logs: pathlib.Path, args: list[str], processes: int = 2):
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    logs.mkdir(parents=True, exist_ok=True)
    self.logs, self.procs = logs, []
    for i in range(processes):
      with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "jaxpp.run", *args, f"--coordinator=127.0.0.1:{port}",
             f"--num_processes={processes}", f"--process_id={i}"],
            cwd=REPO, env=env, stdout=out, stderr=err))

  def wait(self, i: int, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of process i; kills every process if it hangs."""
    try:
      self.procs[i].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      raise
    return (self.procs[i].returncode, (self.logs / f"{i}.out").read_text(),
            (self.logs / f"{i}.err").read_text())

  def finish(self) -> list[tuple[int, str, str]]:
    return [self.wait(i) for i in range(len(self.procs))]

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def wait_for_rows(out: pathlib.Path, n: int, run: Run) -> None:
  deadline = time.monotonic() + RUN_TIMEOUT_S
  while time.monotonic() < deadline and all(p.poll() is None for p in run.procs):
    if out.exists() and out.read_bytes().count(b"\n") >= n:
      return
    time.sleep(0.02)
  run.kill()
  pytest.fail(f"never saw {n} output rows; exit codes {[p.poll() for p in run.procs]}")


def error_lines(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if l.startswith("error:")]


def test_two_processes_give_the_single_process_output(tmp_path):
  src = tmp_path / "in.jsonl"
  src.write_text("".join(ticket_lines(16)), encoding="utf-8")
  single = shrunk(src, tmp_path / "single" / "out.jsonl")
  job.run_job(single)  # pp=4 x tp=2 on this process's 8 devices
  out = tmp_path / "two" / "out.jsonl"

  run = Run(tmp_path / "logs", job_args(src, out))
  (rc0, stdout0, err0), (rc1, stdout1, err1) = run.finish()
  assert rc0 == 0 and rc1 == 0, (err0[-3000:], err1[-3000:])
  rows = read_jsonl(out)
  assert rows == read_jsonl(single.job.output)  # same summaries, tokens, even the order
  assert all(set(r) == FIELDS for r in rows) and len(keys_once(rows)) == 16
  rep = json.loads((tmp_path / "two" / "out.jsonl.report.json").read_text(encoding="utf-8"))
  assert rep["reconciled"] and rep["written_total"] == 16
  assert rep["layout"]["pp"] == 4 and rep["layout"]["tp"] == 2
  assert rep["devices"].startswith("8 x cpu")
  assert "16 = 16 + 0 ✓" in stdout0  # process 0 reports; process 1 only says it is done
  assert "process 1 of 2" in stdout1 and "pp stages 2-3" in stdout1
  assert "documents" not in stdout1
  for process, err, stages in ((0, err0, [0, 1]), (1, err1, [2, 3])):
    health = [HEALTH.fullmatch(l) for l in err.splitlines() if l.startswith("health:")]
    assert [int(m[1]) for m in health] == stages, err[-2000:]  # logged by their own process
    assert all(int(m[2]) == process and m[3] != m[4] for m in health)  # two tp devices each


def test_killed_process_stops_the_other_and_rerun_resumes(tmp_path):
  """Kill process 1, then (on the resumed run) process 0, the coordinator; then finish."""
  lines = ticket_lines(60)
  want = sorted(jobio.ticket_key(json.loads(l)["id"]) for l in lines)
  src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  src.write_text("".join(lines), encoding="utf-8")
  args = job_args(src, out, "--config.engine.max_num_seqs=4", "--config.schedule.decode_chunk=4")

  rows_before = 0
  for k, (victim, lost_stages) in enumerate(((1, "pp stages 2-3"), (0, "pp stages 0-1"))):
    run = Run(tmp_path / f"kill{k}", args)
    wait_for_rows(out, rows_before + 3, run)
    run.procs[victim].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    rc, _, stderr = run.wait(1 - victim, timeout=60)
    took = time.monotonic() - killed
    run.kill()
    errors = error_lines(stderr)
    assert rc == 3, (rc, stderr[-3000:])
    assert took < FAIL_FAST_S, f"survivor took {took:.1f} s to exit"
    assert len(errors) == 1 and f"lost process {victim}" in errors[0], stderr[-3000:]
    assert lost_stages in errors[0]
    written = out.read_bytes()
    rows_now = written[:written.rfind(b"\n") + 1].count(b"\n")
    assert rows_before + 3 <= rows_now < len(lines), "not killed mid-job"
    rows_before = rows_now

  (rc0, stdout0, err0), (rc1, _, err1) = Run(tmp_path / "rerun", args).finish()
  assert rc0 == 0 and rc1 == 0, (err0[-3000:], err1[-3000:])
  rows = read_jsonl(out)
  assert sorted(keys_once(rows)) == want  # every id exactly once
  rep = json.loads((tmp_path / "out.jsonl.report.json").read_text(encoding="utf-8"))
  assert rep["skipped_done"] == rows_before and rep["written_run"] == len(lines) - rows_before
  assert rep["reconciled"] and f"{len(lines)} = {len(lines)} + 0 ✓" in stdout0


def test_replicas_on_two_processes(tmp_path):
  """dp=2 replicas of pp2 x tp2, one a process: every id once, each row the single
  process's pp4 x tp2 row; each process probes its own replica's stages."""
  src = tmp_path / "in.jsonl"
  src.write_text("".join(ticket_lines(12)), encoding="utf-8")
  single = shrunk(src, tmp_path / "single" / "out.jsonl")
  job.run_job(single)
  out = tmp_path / "two" / "out.jsonl"
  run = Run(tmp_path / "logs", job_args(src, out, "--config.mesh.dp=2", "--config.mesh.pp=2"))
  (rc0, _, err0), (rc1, _, err1) = run.finish()
  assert rc0 == 0 and rc1 == 0, (err0[-3000:], err1[-3000:])
  want = {r["id"]: r for r in read_jsonl(single.job.output)}
  rows = read_jsonl(out)
  assert sorted(keys_once(rows)) == sorted(keys_once(list(want.values())))
  assert all(r == want[r["id"]] for r in rows)
  rep = json.loads((tmp_path / "two" / "out.jsonl.report.json").read_text(encoding="utf-8"))
  assert rep["layout"]["name"] == "dp2pp2tp2" and rep["reconciled"]
  for process, err in ((0, err0), (1, err1)):
    health = [l for l in err.splitlines() if l.startswith("health:")]
    assert health and all(f"replica {process} pp stage" in l for l in health), err[-2000:]
