"""Fail fast in a multi-process run: when one process dies, every other one stops, saying which.

A multi-controller JAX job has no natural end to a failure. When a process is killed, the
survivors block in their next collective: NCCL waits forever, and JAX's coordination service
notices only after its heartbeat timeout, then terminates every process with a C++ abort
that names a task number, not a pipeline stage. jaxpp wants a survivor to exit within
seconds with one line naming the process and the stages that were lost, whatever it was
doing (a device step, host work, a compile), so the same command can simply be rerun.

Three parts, all on JAX's own coordination service (its key-value store), no side channel:

- `PeerMonitor`: a thread in every process writes a beat to the store every second and
  reads everyone's; a process whose beat has not changed for `timeout` seconds is lost.
  JAX's heartbeat timeout is set above `timeout` (see `distributed.start`), so this named
  verdict comes before JAX's unnamed abort, which stays as the backstop.
- A shared verdict: the first process to fail (a lost peer, a stalled step, an error on
  one process only) publishes one line under `jaxpp/failed`; every monitor that reads it
  prints it and exits. The processes then meet at a short barrier, so process 0, which
  hosts the store, stays up until the others have read the line.
- An abort hook: if process 0 dies, JAX's client in every other process aborts at once
  (SIGABRT), before any Python code can react, and its own failure callback cannot be used
  from Python; a CPU collective (gloo) whose peer died can abort the same way. The hook
  catches that SIGABRT: if the coordinator is unreachable it prints the named line and
  exits, else it gives the peer monitor its timeout to name a lost peer (the monitor then
  exits the process with its line); an abort with no lost peer proceeds unchanged.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, NoReturn

EXIT_PEER_LOST = 3  # this process stopped because another one died or failed
BARRIER_MS = 3000  # how long failing processes wait for each other before exiting
PREFIX = "jaxpp/"


def exit_now(line: str, code: int) -> NoReturn:
  """Prints `line` on stderr and ends the process at once, from any thread.

  `os._exit` rather than `sys.exit`: a watchdog or monitor thread cannot raise into the main
  thread, and the main thread may be blocked inside a collective that will never return.
  Output rows are already on disk (each is one unbuffered write), so nothing is lost.
  """
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os.write(2, (" ".join(line.split()) + "\n").encode("utf-8", "replace"))
  os._exit(code)


class PeerMonitor:
  """Beats, watches the other processes' beats and the shared verdict; see the module doc.

  `describe(p)` names process p for messages ("host h, pp stages 2-3"); `progress()` is
  this process's current device step number, published with each beat so a watchdog can
  tell which process is behind (`behind`).
  """

  def __init__(self, client: Any, process_id: int, num_processes: int, timeout: float,
               describe: Callable[[int], str], progress: Callable[[], int]):
    self.client, self.me, self.n = client, process_id, num_processes
    self.timeout, self.describe, self.progress = timeout, describe, progress
    self.interval = min(1.0, timeout / 5)
    self.steps: dict[int, int] = {}  # last published device step of each process
    self._stop = threading.Event()
    self._failing = threading.Lock()
    self._thread = threading.Thread(target=self._run, name="jaxpp-peer-monitor", daemon=True)

  def start(self) -> None:
    self._beat(0)
    self._thread.start()

  def stop(self) -> None:
    """Marks this process done (peers no longer expect beats from it) and stops beating."""
    self._stop.set()
    self._thread.join()
    self.client.key_value_set(f"{PREFIX}beat/{self.me}", "done", allow_overwrite=True)

  def await_verdict(self) -> None:
    """Gives the monitor time to name a lost peer (it exits the process if it does).

    For the main thread after a collective failed: under gloo a dead peer breaks the
    collective at once, seconds before its silence proves which process is gone.
    """
    self._thread.join(self.timeout + 2 * self.interval)

  def behind(self, step: int) -> list[int]:
    """Processes whose last published device step is before `step` (not yet started it)."""
    return [p for p, s in sorted(self.steps.items()) if p != self.me and s < step]

  def _beat(self, count: int) -> None:
    self.client.key_value_set(f"{PREFIX}beat/{self.me}", f"{count} {self.progress()}",
                              allow_overwrite=True)

  def _run(self) -> None:
    started = time.monotonic()
    seen: dict[int, tuple[str, float]] = {}  # process -> (last beat, when it changed)
    count = 0
    while not self._stop.wait(self.interval):
      count += 1
      try:
        self._beat(count)
        store = dict(self.client.key_value_dir_get(PREFIX))
      except Exception as e:  # the store lives in process 0: it is gone or unreachable
        if self._stop.is_set():
          return
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        self.fail(coordinator_lost_line(self.describe(0), first), EXIT_PEER_LOST, lost=0)
      verdict = store.get(f"{PREFIX}failed")
      if verdict is not None:
        self._follow(verdict)
      now = time.monotonic()
      for p in range(self.n):
        beat = store.get(f"{PREFIX}beat/{p}")
        if p == self.me or beat == "done":
          continue
        if beat is not None:
          self.steps[p] = int(beat.split()[1])
        if beat is not None and seen.get(p, (None,))[0] != beat:
          seen[p] = (beat, now)
        silent = now - seen.get(p, (None, started))[1]
        if silent > self.timeout:
          self.fail(f"error: lost process {p} ({self.describe(p)}): no sign of life for "
                    f"{silent:.0f} s; stopping (rerun the same command to resume)",
                    EXIT_PEER_LOST, lost=p)

  def fail(self, line: str, code: int, lost: int | None = None) -> NoReturn:
    """Publishes this failure (unless one is already published), meets the others, exits."""
    with self._failing:  # a second failing thread (monitor, watchdog) waits here for exit
      self._stop.set()
      try:
        self.client.key_value_set(f"{PREFIX}failed", f"{code} {-1 if lost is None else lost} "
                                  f"{line}")
      except Exception:  # already published by another process, or the store is gone
        pass
      self._meet(lost)
      exit_now(line, code)

  def _follow(self, verdict: str) -> NoReturn:
    """Another process failed: print its line, meet the others, exit."""
    _, lost, line = verdict.split(" ", 2)
    with self._failing:
      self._stop.set()
      self._meet(int(lost) if int(lost) >= 0 else None)
      exit_now(line, EXIT_PEER_LOST)

  def _meet(self, lost: int | None) -> None:
    live = [p for p in range(self.n) if p != lost]
    try:
      self.client.wait_at_barrier(f"{PREFIX}failed", BARRIER_MS, live)
    except Exception:  # a peer that cannot come (stuck, or dying too) must not hold us
      pass


def coordinator_lost_line(description: str, detail: str) -> str:
  return (f"error: lost process 0 ({description}): the coordination service it hosts is "
          f"unreachable ({detail}); stopping (rerun the same command to resume)")


def reachable(address: str, timeout: float = 1.0) -> bool:
  """Whether a TCP connection to host:port opens (the coordination service is up)."""
  host, _, port = address.rpartition(":")
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
      return True
  except (OSError, ValueError):
    return False


class AbortHook:
  """Turns JAX's abort on losing the coordinator, or a collective's on losing any peer,
  into the named one-line exit.

  Installed with libc's `signal()` because the abort comes from a C++ thread inside JAX's
  client and ends the process before Python's own signal handlers could run. The handler
  runs in that thread; ctypes takes the GIL for it (the main thread releases it while it
  waits on devices). It acts when process 0's service is really unreachable, or when the
  peer monitor names a lost peer within its timeout; any other abort, or one during a
  normal shutdown, proceeds.
  """

  def __init__(self, coordinator: str, describe: Callable[[int], str],
               monitor: PeerMonitor | None = None, coordinator_is_peer: bool = True):
    self.coordinator, self.describe, self.monitor = coordinator, describe, monitor
    self.coordinator_is_peer = coordinator_is_peer  # False in process 0, which hosts it
    self.closing = False
    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    # C holds only the function pointer: the ctypes object must live as long as the hook.
    self._handler = ctypes.CFUNCTYPE(None, ctypes.c_int)(self._on_abort)
    libc.signal(signal.SIGABRT, ctypes.cast(self._handler, ctypes.c_void_p))

  def _on_abort(self, signum: int) -> None:
    del signum
    if self.closing:
      return
    if self.coordinator_is_peer and not reachable(self.coordinator):
      exit_now(coordinator_lost_line(self.describe(0), "JAX's client aborted"),
               EXIT_PEER_LOST)
    if self.monitor is not None:  # waiting releases the GIL: the monitor thread can run
      self.monitor.await_verdict()
