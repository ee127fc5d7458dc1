"""Clean stops on SIGTERM and SIGINT, as batch schedulers send them.

SLURM and Kubernetes stop a job with SIGTERM and a grace period before SIGKILL; a person
presses Ctrl-C (SIGINT). Either way the job should leave whole lines, a report marked
`interrupted` and an exit code that says so (128 + the signal: 143 for SIGTERM, 130 for
SIGINT, the shells' convention), and the rerun resumes.

Two phases: during start-up (checks, probe, weights, compiles) nothing is in flight, so the
first signal ends the process at once (`os._exit`: every row already written is a whole,
flushed line, and the kernel releases the output's lock); raising an exception from the
handler instead would land anywhere, e.g. inside `Thread.start()` of the watchdog, and leave
a half-started thread to print a traceback at exit. Once rows are in flight (`deferred()`),
the first signal only sets `requested`: the job stops admitting, lets the device step under
way finish (bounded by its watchdog deadline), writes the rows that step finished and drops
the rest, which the rerun redoes. A second signal, in either phase, exits at once with the
same code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
  return 128 + signum


class StopSignals:
  """`with StopSignals() as stop:` installs the handlers (main thread only: elsewhere
  signals cannot be caught, and the handlers stay as they were)."""

  def __init__(self, log=lambda line: print(line, file=sys.stderr, flush=True)):
    self.signum: int | None = None
    self._deferred = False
    self._log = log
    self._previous: dict[int, object] = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def deferred(self) -> contextlib.AbstractContextManager:
    """Within this, a first signal only sets `requested` (rows are in flight)."""

    @contextlib.contextmanager
    def scope():
      self._deferred = True
      try:
        yield self
      finally:
        self._deferred = False
    return scope()

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signum is not None:
      self._exit(f"{name} again: exiting now (the rerun resumes)", self.signum)
    self.signum = signum
    if not self._deferred:
      self._exit(f"stopped by {name} during start-up: nothing was in flight; rerun the same "
                 "command to resume", signum)
    self._log(f"{name}: stopping after the device step under way; a second signal exits "
              "at once")

  def _exit(self, line: str, signum: int) -> None:
    self._log(line)
    sys.stdout.flush()
    os._exit(exit_code(signum))

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      for s in SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()
