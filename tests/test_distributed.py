"""The pieces of multi-process runs that need no second process: flags, mesh rule, probe, monitor.

The real thing (two processes, a kill, a resume) is tests/test_multihost.py; here each rule
is checked on its own, in milliseconds: the flag combinations, the mesh rule that keeps tp
inside a process, the health probe's verdicts, and the peer monitor against an in-memory
stand-in for the coordination service's key-value store.
"""

import contextlib
import os
import pathlib
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from jaxpp.dist import distributed, failfast, health
from jaxpp.errors import JaxppError
from jaxpp.parallel import mesh as mesh_lib

REPO = pathlib.Path(__file__).resolve().parent.parent


def flag_values(**given):
  values = dict(coordinator=None, num_processes=None, process_id=None, local_device_ids=None,
                distributed=False, peer_timeout=5.0) | given
  return types.SimpleNamespace(**values)


# --- flags ---------------------------------------------------------------------------------


def test_no_flags_is_a_single_process_run():
  assert distributed.options_from_flags(flag_values()) is None


def test_explicit_flags():
  opts = distributed.options_from_flags(flag_values(
      coordinator="10.0.0.1:1234", num_processes=2, process_id=1, local_device_ids=["0", "1"],
      peer_timeout=3.0))
  assert opts == distributed.Options("10.0.0.1:1234", 2, 1, (0, 1), 3.0)


def test_distributed_leaves_the_rest_to_cluster_detection():
  opts = distributed.options_from_flags(flag_values(distributed=True))
  assert opts == distributed.Options()


@pytest.mark.parametrize("given, match", [
    (dict(num_processes=2), "--coordinator, --process_id missing"),
    (dict(coordinator="h:1", process_id=0), "--num_processes missing"),
    (dict(coordinator="localhost", num_processes=2, process_id=0), "expected host:port"),
    (dict(coordinator="h:99999", num_processes=2, process_id=0), "expected host:port"),
    (dict(coordinator="h:1", num_processes=0, process_id=0), "--num_processes=0 must be >= 1"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), "must be in 0 .. num_processes-1"),
    (dict(coordinator="h:1", num_processes=2, process_id=-1), "must be in 0 .. num_proc"),
    (dict(local_device_ids=["0"]), "--local_device_ids needs a multi-process run"),
    (dict(distributed=True, local_device_ids=["a"]), "expected integers"),
    (dict(distributed=True, local_device_ids=["0", "0"]), "expected distinct ids"),
    (dict(distributed=True, peer_timeout=0.0), "--peer_timeout=0.0 must be > 0"),
])
def test_bad_flag_combinations(given, match):
  with pytest.raises(JaxppError, match=match):
    distributed.options_from_flags(flag_values(**given))


def run_cli(*flags: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}
  return subprocess.run([sys.executable, "-m", "jaxpp.run", *flags], cwd=REPO,
                        env=env | dict(JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                        timeout=120)


def test_cli_flag_mistake_is_one_line_and_exit_1():
  proc = run_cli("--num_processes=2")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      "error: --coordinator, --process_id missing: a multi-process run needs --coordinator, "
      "--num_processes and --process_id (or --distributed under SLURM / Open MPI)"]


def test_cli_distributed_outside_a_cluster_is_one_line_and_exit_1():
  proc = run_cli("--distributed")
  assert proc.returncode == 1
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith("error: cannot start the multi-process run: ")
  assert "no SLURM or Open MPI environment found?" in line


# --- the single-process runtime --------------------------------------------------------------


def test_single_process_runtime():
  rt = distributed.Runtime()
  assert rt.is_writer and rt.monitor is None
  assert rt.broadcast_json({"done": ["a"]}) == {"done": ["a"]}
  rt.set_layout(mesh_lib.make_mesh(pp=4, tp=2))
  assert rt.where().endswith(", pp stages 0-3") and rt.where().startswith("host ")
  assert rt.describe().startswith("process 0 of 1 (host ")
  assert rt.describe_stall(7) == rt.describe()


# --- the mesh rule: pp spans processes, tp stays inside one ---------------------------------


def fake_devices(per_process: list[int]):
  return [types.SimpleNamespace(process_index=p, id=1000 * p + i)
          for p, n in enumerate(per_process) for i in range(n)]


@pytest.mark.parametrize("per_process, pp, tp, match", [
    ([4, 4], 2, 4, None),  # a stage per process
    ([4, 4], 1, 8, "tp=8 must divide the 4 devices of each process"),
    ([2, 2, 2, 2], 2, 4, "tp=4 must divide the 2 devices"),
    ([4, 2], 3, 2, "processes hold different numbers of devices"),
])
def test_tp_never_spans_processes(per_process, pp, tp, match):
  devices = fake_devices(per_process)
  if match is None:
    grid = mesh_lib._host_major(devices, 1, pp, tp)
    assert all(len({d.process_index for d in grid[0, s]}) == 1 for s in range(pp))
  else:
    with pytest.raises(JaxppError, match=match):
      mesh_lib.make_mesh(pp=pp, tp=tp, devices=devices)


def test_stages_by_process_and_their_names():
  mesh = mesh_lib.make_mesh(pp=4, tp=2)
  assert mesh_lib.stages_by_process(mesh) == {0: [0, 1, 2, 3]}
  assert mesh_lib.describe_stages([2]) == "pp stage 2"
  assert mesh_lib.describe_stages([2, 3]) == "pp stages 2-3"
  assert mesh_lib.describe_stages([0, 2]) == "pp stages 0, 2"


# --- the health probe ------------------------------------------------------------------------


def probe_answers(pp: int, tp: int) -> np.ndarray:
  """What healthy stages answer: (own matmul, tp mean, received from the previous stage)."""
  v = np.zeros((1, pp, tp, 3))
  for s in range(pp):
    v[0, s, :, :2] = s + 1
    v[0, s, :, 2] = (s - 1) % pp + 1
  return v


def test_probe_passes_on_every_stage():
  stages = health.probe(mesh_lib.make_mesh(pp=4, tp=2))
  assert [(h.stage, h.problem) for h in stages] == [(s, None) for s in range(4)]
  assert stages[3].devices == ["cpu:6", "cpu:7"]


@pytest.mark.parametrize("where, value, problem", [
    ((2, 1, 0), 7.0, "pp stage 2 .* device cpu:5 computed 7, expected 3"),
    ((1, 0, 1), 0.0, "pp stage 1 .* device cpu:2 got over its tp group 0, expected 2"),
    ((0, 1, 2), 0.0, "pp stage 0 .* device cpu:1 received from pp stage 3 0, expected 4"),
])
def test_unhealthy_stage_stops_the_start(monkeypatch, where, value, problem):
  mesh = mesh_lib.make_mesh(pp=4, tp=2)
  answers = probe_answers(4, 2)
  answers[(0,) + where] = value
  monkeypatch.setattr(health, "probe", lambda m: health.check(m, answers))
  dog = types.SimpleNamespace(step=lambda name: contextlib.nullcontext())
  lines = []
  with pytest.raises(JaxppError, match=f"health probe: {problem}; not starting"):
    health.startup(mesh, dog, lines.append)
  assert len(lines) == 4 and sum("FAILED" in l for l in lines) == 1


# --- the peer monitor, against an in-memory key-value store ---------------------------------


class FakeStore:
  """The few calls of JAX's distributed client that the monitor makes."""

  def __init__(self):
    self.data, self.lock = {}, threading.Lock()

  def key_value_set(self, key, value, allow_overwrite=False):
    with self.lock:
      if key in self.data and not allow_overwrite:
        raise RuntimeError(f"ALREADY_EXISTS: {key}")
      self.data[key] = value

  def key_value_dir_get(self, prefix):
    with self.lock:
      return [(k, v) for k, v in self.data.items() if k.startswith(prefix)]

  def wait_at_barrier(self, barrier_id, timeout_ms, process_ids):
    del barrier_id, timeout_ms, process_ids


@pytest.fixture
def exits(monkeypatch):
  """Records the monitor's exit instead of ending pytest; the monitor thread then stops."""
  seen = []
  done = threading.Event()

  def exit_now(line, code):
    seen.append((line, code))
    done.set()
    threading.Event().wait()  # the real one never returns

  monkeypatch.setattr(failfast, "exit_now", exit_now)
  return seen, done


def monitor(store, timeout=0.5):
  return failfast.PeerMonitor(store, 0, 3, timeout, lambda p: f"host h{p}, pp stage {p}",
                              lambda: 5)


def test_silent_peer_is_lost_and_the_verdict_shared(exits):
  seen, done = exits
  store = FakeStore()
  store.key_value_set("jaxpp/beat/2", "done")  # finished its work: not expected to beat
  mon = monitor(store)
  mon.start()
  start = time.monotonic()
  for i in range(5):  # process 1 beats for a while, then dies
    store.key_value_set("jaxpp/beat/1", f"{i} 4", allow_overwrite=True)
    time.sleep(0.1)
  assert done.wait(5), "the silent peer was never declared lost"
  (line, code), = seen
  assert code == failfast.EXIT_PEER_LOST == 3
  assert line.startswith("error: lost process 1 (host h1, pp stage 1): no sign of life for")
  assert 0.5 <= time.monotonic() - start < 3
  assert store.data["jaxpp/failed"] == f"3 1 {line}"
  assert mon.behind(5) == [1] and mon.behind(4) == []  # process 1 last beat at step 4


def test_published_failure_stops_every_process(exits):
  seen, done = exits
  store = FakeStore()
  store.key_value_set("jaxpp/failed", "4 -1 error: watchdog: decode (device step 9) ...")
  monitor(store, timeout=30).start()
  assert done.wait(5)
  assert seen == [("error: watchdog: decode (device step 9) ...", failfast.EXIT_PEER_LOST)]


def test_unreachable_coordinator_is_reported_as_process_0(exits):
  seen, done = exits

  class Gone(FakeStore):
    def key_value_dir_get(self, prefix):
      raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")

  mon = failfast.PeerMonitor(Gone(), 1, 2, 0.5, lambda p: f"host h{p}", lambda: 0)
  mon.start()
  assert done.wait(5)
  (line, code), = seen
  assert code == 3 and line.startswith("error: lost process 0 (host h0): the coordination "
                                       "service it hosts is unreachable (UNAVAILABLE")


def test_reachable():
  assert not failfast.reachable("127.0.0.1:1")
  assert not failfast.reachable("no-port")
