"""The watchdog: each program's deadline, a stalled step caught in process, and in the real job.

The end-to-end test runs `jaxpp.run` with the pipeline's decode patched (test code only) to
hang on its third call, after the device work, before the host gets its tokens: exactly
what a stuck collective looks like from the host.
"""

import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest

from jaxpp.dist import watchdog
from jaxpp.errors import JaxppError
from tests.test_job import ticket_lines

REPO = pathlib.Path(__file__).resolve().parent.parent


def make(**knobs) -> watchdog.Watchdog:
  def on_stall(line, code):
    raise AssertionError(f"unexpected stall: {line} ({code})")

  knobs = dict(multiple=4.0, min_seconds=0.5, max_seconds=100.0) | knobs
  return watchdog.Watchdog(**knobs, describe=lambda n: "here", on_stall=on_stall)


def test_deadline_follows_each_programs_own_history():
  dog = make()
  assert dog.limit("decode", 16) == (100.0, "absolute bound watchdog.max_seconds=100")
  with dog.step("decode", 16):  # the first call compiles: not a measure of the step
    time.sleep(0.05)
  assert dog.limit("decode", 16)[0] == 100.0
  for _ in range(3):
    with dog.step("decode", 16):
      time.sleep(0.2)
  seconds, why = dog.limit("decode", 16)
  assert 0.8 <= seconds < 1.2 and "4 x its expected 0.2" in why  # 4 x the median
  assert dog.limit("decode", 32)[0] == 100.0  # another program, its own history
  assert dog.limit("prefill", 16)[0] == 100.0
  assert dog.started == 4


def test_deadline_stays_within_its_bounds():
  dog = make(multiple=1000.0, max_seconds=5.0)
  for _ in range(2):
    with dog.step("prefill"):
      time.sleep(0.01)
  assert dog.limit("prefill")[0] == 5.0  # 1000 x 0.01 s capped by the absolute bound
  dog = make(min_seconds=3.0)
  for _ in range(2):
    with dog.step("prefill"):
      pass
  assert dog.limit("prefill")[0] == 3.0  # a near-zero step still gets min_seconds


@pytest.mark.parametrize("knobs, match", [
    (dict(multiple=0.5), "multiple=0.5 must be >= 1"),
    (dict(min_seconds=0.0), "0 < min_seconds"),
    (dict(min_seconds=10.0, max_seconds=5.0), "min_seconds .10.0. <= max_seconds"),
])
def test_bad_knobs_are_one_line_errors(knobs, match):
  with pytest.raises(JaxppError, match=match):
    make(**knobs)


def test_no_watcher_thread_outlives_its_steps():
  """A process that runs many jobs must not keep one thread per finished watchdog."""
  watchers = lambda: [t for t in threading.enumerate() if t.name == "jaxpp-watchdog"]
  before = len(watchers())
  dogs = [make() for _ in range(5)]
  for dog in dogs:
    for _ in range(3):
      with dog.step("decode"):
        assert dog._thread in watchers()  # the step is watched
  deadline = time.monotonic() + 5
  while len(watchers()) > before and time.monotonic() < deadline:
    time.sleep(0.01)
  # at most as many as before: a watcher an earlier test's job left may end meanwhile
  assert len(watchers()) <= before


def test_stalled_step_is_reported_with_its_stage():
  stalled = threading.Event()
  reports = []

  def on_stall(line, code):
    reports.append((line, code, time.monotonic()))
    stalled.set()
    threading.Event().wait()  # the real on_stall never returns: it ends the process

  dog = watchdog.Watchdog(multiple=2.0, min_seconds=0.3, max_seconds=30.0,
                          describe=lambda n: f"process 0 of 1 (host h, pp stages 0-3) at {n}",
                          on_stall=on_stall)
  for _ in range(3):
    with dog.step("decode", "k"):
      time.sleep(0.01)
  start = time.monotonic()
  with dog.step("decode", "k"):
    assert stalled.wait(10), "the watchdog never fired"
  (line, code, when), = reports
  assert code == watchdog.EXIT_STALLED == 4
  assert 0.3 <= when - start < 2.0
  assert line.startswith("error: watchdog: decode (device step 4) did not finish within 0.3 s")
  assert "on process 0 of 1 (host h, pp stages 0-3) at 4" in line


STALLING_DRIVER = """
import pathlib, sys, time
from absl import app
from jaxpp.parallel import pipeline
from jaxpp import run

stamp = pathlib.Path(sys.argv.pop())  # where to note when the stall began
decode, calls = pipeline.Pipeline.decode, []

def stalled_decode(self, *args, **kwargs):
  out = decode(self, *args, **kwargs)
  calls.append(1)
  if len(calls) == 3:
    stamp.write_text(repr(time.time()))
    time.sleep(300)
  return out

pipeline.Pipeline.decode = stalled_decode
app.run(run.main, flags_parser=run.parse_flags)
"""


def test_stalled_step_in_the_job_stops_it_naming_the_stages(tmp_path):
  src, stamp = tmp_path / "in.jsonl", tmp_path / "stalled_at"
  src.write_text("".join(ticket_lines(16)), encoding="utf-8")
  cmd = [sys.executable, "-c", STALLING_DRIVER, "--config", "configs/harbor.py",
         f"--config.job.input={src}", f"--config.job.output={tmp_path / 'out.jsonl'}",
         "--config.sampling.max_new_tokens=8", "--config.engine.max_num_seqs=4",
         "--config.job.progress=False",
         "--config.watchdog.multiple=3", "--config.watchdog.min_seconds=1",
         "--config.watchdog.max_seconds=120", str(stamp)]
  proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=300)
  ended = time.time()
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == watchdog.EXIT_STALLED, proc.stderr[-3000:]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert errors[0].startswith("error: watchdog: decode (device step ")
  assert "x its expected" in errors[0]
  assert "on process 0 of 1 (host " in errors[0] and "pp stages 0-3)" in errors[0]
  assert ended - float(stamp.read_text()) < 15, "the stall was not cut off promptly"
