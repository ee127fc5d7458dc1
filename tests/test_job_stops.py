"""The batch job as a scheduler sees it: one job per output, clean stops on SIGTERM and
SIGINT with the right exit code, and a rerun that neither re-tokenizes finished tickets
nor, when nothing is left, loads a model. Plus the progress bar's and the report's numbers
that those runs print."""

import json
import os
import signal
import subprocess
import time

import pytest

from jaxpp.errors import JaxppError
from jaxpp.job import files as jobio
from jaxpp.job import report, stop
from jaxpp.job import runner as job
from jaxpp.job.lock import OutputLock, lock_path
from jaxpp.job.prompter import Prompter
from jaxpp.serve.stats import EngineStats
from tests import cli
from tests.test_job import REPO, job_cli, keys_once, read_jsonl, shrunk, ticket_lines

ENV = dict(os.environ, JAX_PLATFORMS="cpu")


# --- one job per output -------------------------------------------------------------------


def test_output_lock_names_its_holder(tmp_path):
  out = tmp_path / "out.jsonl"
  with OutputLock(out):
    assert lock_path(out).read_text().strip() == str(os.getpid())
    with pytest.raises(JaxppError, match=rf"^job output .*out\.jsonl is in use by another "
                                         rf"job \(pid {os.getpid()}, lock .*out\.jsonl\.lock\)"):
      OutputLock(out).__enter__()
  with OutputLock(out):  # released on exit: the next job takes it
    pass


def test_a_second_job_on_the_same_output_is_refused(tmp_path):
  """While another job holds the output, a second one exits 1 at once, naming its pid,
  and writes nothing (no repair, no rows)."""
  src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  src.write_text("".join(ticket_lines(3)), encoding="utf-8")
  with OutputLock(out):
    start = time.monotonic()
    proc = subprocess.run(job_cli(src, out), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"error: job output {out} is in use by another job (pid {os.getpid()}")
  assert "health:" not in proc.stderr and time.monotonic() - start < 60
  assert not out.exists()


# --- SIGTERM / SIGINT: whole lines, a report marked interrupted, the conventional code ------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """40 tickets run to the end: what an interrupted-then-resumed run must equal."""
  tmp = tmp_path_factory.mktemp("whole")
  src, out = tmp / "in.jsonl", tmp / "out.jsonl"
  src.write_text("".join(ticket_lines(40)), encoding="utf-8")
  done = subprocess.run(job_cli(src, out), cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  return src, {r["id"]: r for r in read_jsonl(out)}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_then_rerun(uninterrupted, tmp_path, signum):
  src, want = uninterrupted
  out = tmp_path / "out.jsonl"
  rc, stdout, stderr = cli.signal_after_rows(job_cli(src, out), out, signum, cwd=REPO)
  assert rc == 128 + signum, (rc, stderr[-2000:])
  assert "Traceback" not in stderr
  assert out.read_bytes().endswith(b"\n")  # whole lines only
  first = read_jsonl(out)
  assert 3 <= len(first) < len(want), "not stopped mid-run"
  rep = json.loads((tmp_path / "out.jsonl.report.json").read_text())
  assert rep["interrupted"] == signal.Signals(signum).name
  assert rep["written_run"] == rep["written_total"] == len(first)
  assert f"still to do: interrupted by {signal.Signals(signum).name}" in stdout

  done = subprocess.run(job_cli(src, out), cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  rows = read_jsonl(out)
  assert sorted(keys_once(rows)) == sorted(jobio.ticket_key(i) for i in want)
  assert {r["id"]: r for r in rows} == want  # summaries identical to the uninterrupted run


def test_signal_during_start_up_exits_at_once(tmp_path):
  """Before any row is in flight there is nothing to finish: the first signal stops the
  start-up (here: compiling and placing) and exits 143, no traceback, no rows."""
  src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  src.write_text("".join(ticket_lines(3)), encoding="utf-8")
  proc = subprocess.Popen(job_cli(src, out), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  for line in proc.stderr:  # the handlers are in place once the input has been read
    if line.startswith("input "):
      break
  proc.send_signal(signal.SIGTERM)
  _, rest = proc.communicate(timeout=120)
  assert proc.returncode == stop.exit_code(signal.SIGTERM) == 143, rest[-2000:]
  assert "stopped by SIGTERM during start-up" in rest and "Traceback" not in rest
  assert not out.exists() or out.read_bytes() == b""


# --- reruns: finished tickets are not tokenized again; nothing left, no model -------------


def test_rerun_skips_finished_tickets_without_tokenizing_them(tmp_path, monkeypatch,
                                                             capsys):
  src = tmp_path / "in.jsonl"
  src.write_text("".join(ticket_lines(3)), encoding="utf-8")
  config = shrunk(src, tmp_path / "out.jsonl", max_new_tokens=2)
  first = job.run_job(config)
  assert first["written_run"] == 3
  prepared = []
  call = Prompter.__call__
  monkeypatch.setattr(Prompter, "__call__",
                      lambda self, tickets: prepared.extend(tickets) or call(self, tickets))
  capsys.readouterr()
  start = time.perf_counter()
  again = job.run_job(config)
  seconds = time.perf_counter() - start
  err = capsys.readouterr().err
  assert prepared == []  # every ticket was at the line its row names
  assert again["written_run"] == 0 and again["skipped_done"] == 3 and again["reconciled"]
  assert "health:" not in err and "weights in" not in err  # no model loaded
  assert again["load_seconds"] == 0 and seconds < 5, seconds
  assert "0 to summarise, 3 already done" in err


def test_read_tickets_prepares_only_what_is_not_done(tmp_path):
  """`done` spares a ticket only at the line its row names; a later duplicate of a done id
  is still rejected, and the preparing runs in batches."""
  lines = ticket_lines(3)
  src = tmp_path / "in.jsonl"
  src.write_text("".join(lines) + lines[0], encoding="utf-8")
  ids = [json.loads(l)["id"] for l in lines]
  batches = []

  def prepare(tickets):
    batches.append([t.line for t in tickets])
    for t in tickets:
      t.prompt = [1]
    return [None] * len(tickets)

  items = list(jobio.read_tickets(src, prepare, done={jobio.ticket_key(ids[0]): 1}, batch=2))
  assert batches == [[2], [3, 4]]  # line 4 repeats a done id elsewhere: prepared, refused
  assert [type(i).__name__ for i in items] == ["Ticket", "Ticket", "Ticket", "Rejected"]
  assert items[0].done and items[0].prompt is None and not items[1].done
  assert items[3].reason.startswith("duplicate id")


# --- what the bar and the report print ----------------------------------------------------


def test_progress_rates_start_at_the_first_document(monkeypatch):
  """Start-up is not throughput: a first document after 60 s of start-up, then one a
  second, reads 1.0 doc/s and an ETA of the rest at that rate, not hours."""
  clock = iter([60.0, 61.0, 62.0])
  monkeypatch.setattr(report.time, "perf_counter", lambda: next(clock))
  bar = report.Progress(total=12, disable=True)
  bar.update(tokens=100)
  bar.update(tokens=50)
  bar.update(tokens=50)
  postfix = bar._bar.postfix
  assert postfix == "1.0 doc/s, 50 tok/s, ETA 9.0 s"
  assert bar.documents == 3 and bar.tokens == 200


def test_idle_share_counts_fill_drain_and_host_gaps():
  st = EngineStats()
  assert st.idle_share() is None
  st.decode_timed_seconds, st.decode_busy_seconds, st.decode_gap_seconds = 9.0, 6.0, 1.0
  assert st.idle_share() == pytest.approx(0.4)


def test_measured_bubble_is_stable_between_identical_runs(tmp_path):
  """From the runs' own decode calls (no probe programs): two identical pp4tp2 runs agree
  within 2 points, and never undercut the schedule's fill and drain."""
  src = tmp_path / "in.jsonl"
  src.write_text("".join(ticket_lines(40)), encoding="utf-8")
  measured = []
  for i in range(2):
    config = shrunk(src, tmp_path / f"run{i}" / "out.jsonl", max_new_tokens=16)
    config.schedule.decode_chunk = 4
    rep = job.run_job(config)
    assert rep["tick_seconds"]["count"] >= 5
    assert rep["bubble_measured"] >= rep["bubble_schedule"] > 0
    measured.append(rep["bubble_measured"])
  assert abs(measured[0] - measured[1]) <= 0.02, measured
