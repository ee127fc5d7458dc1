"""A deadline on every device step, so a stuck stage ends the job instead of hanging it.

A device step (a prefill, a decode chunk, the start-up probe) that never finishes looks,
from the host, like a `block_until_ready` that never returns: a hung NCCL collective, a
device that stopped answering, a peer stuck in host code. Nothing in JAX times it out. The
watchdog gives each step a deadline and, when one passes, ends the process with one line
naming the step and the stages this process holds (and, in a multi-process run, the
processes that have not reached the step, which are the likely culprits).

The deadline is `multiple` x the step's expected time, but at least `min_seconds` and at
most `max_seconds`. The expected time is the median of earlier calls of the same program
(same step name and key, e.g. the decode chunk length), not counting the first call, which
compiles; until a program has run twice its deadline is `max_seconds`, the absolute bound.
"""

from __future__ import annotations

import collections
import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import NoReturn

from jaxpp.errors import JaxppError

EXIT_STALLED = 4  # a device step passed its deadline
HISTORY = 32  # durations kept per program for the expected time


class Watchdog:
  """Bounds device steps: `with watchdog.step("decode", key): ...` (one at a time).

  `describe(n)` names where step n is stuck (this process and its stages); `on_stall(line,
  code)` ends the process (`distributed.Runtime.fail`, which also stops the other
  processes). Both are called from the watchdog's own thread.
  """

  def __init__(self, *, multiple: float = 10.0, min_seconds: float = 30.0,
               max_seconds: float = 900.0, describe: Callable[[int], str],
               on_stall: Callable[[str, int], NoReturn]):
    if not multiple >= 1:
      raise JaxppError(f"watchdog.multiple={multiple} must be >= 1")
    if not 0 < min_seconds <= max_seconds:
      raise JaxppError(f"watchdog: need 0 < min_seconds ({min_seconds}) <= max_seconds "
                       f"({max_seconds})")
    self.multiple, self.min_seconds, self.max_seconds = multiple, min_seconds, max_seconds
    self.describe, self.on_stall = describe, on_stall
    self.started = 0  # device steps begun so far; step n is the n-th
    self._durations: dict[Hashable, collections.deque] = {}
    self._armed: tuple[int, str, float, float, str] | None = None  # n, name, start, limit, why
    self._cond = threading.Condition()
    self._thread: threading.Thread | None = None

  def limit(self, name: str, key: Hashable = None) -> tuple[float, str]:
    """(seconds, why) for the next call of this program."""
    past = self._durations.get((name, key))
    if not past:
      return self.max_seconds, f"absolute bound watchdog.max_seconds={self.max_seconds:g}"
    expected = statistics.median(past)
    seconds = min(self.max_seconds, max(self.min_seconds, self.multiple * expected))
    return seconds, (f"{self.multiple:g} x its expected {expected:.3g} s, within "
                     f"[{self.min_seconds:g}, {self.max_seconds:g}] s")

  @contextlib.contextmanager
  def step(self, name: str, key: Hashable = None) -> Iterator[None]:
    """Runs the body under a deadline; its duration then informs the program's next one."""
    limit, why = self.limit(name, key)
    start = time.monotonic()
    with self._cond:
      self.started += 1
      self._armed = (self.started, name, start, limit, why)
      if self._thread is None:
        self._thread = threading.Thread(target=self._watch, name="jaxpp-watchdog", daemon=True)
        self._thread.start()
      self._cond.notify()
    try:
      yield
    finally:
      with self._cond:
        self._armed = None
        self._cond.notify()  # the watcher ends: no thread outlives its steps
      seconds = time.monotonic() - start
      if (name, key) in self._durations:
        self._durations[(name, key)].append(seconds)
      else:  # the first call compiles: it says nothing about the step's own time
        self._durations[(name, key)] = collections.deque(maxlen=HISTORY)

  def _watch(self) -> None:
    """Watches the armed step until it ends (then forgets itself) or passes its deadline."""
    with self._cond:
      while self._armed is not None:
        n, name, start, limit, why = self._armed
        remaining = start + limit - time.monotonic()
        if remaining <= 0:
          break
        self._cond.wait(remaining)
      else:
        self._thread = None  # under the lock: the next step starts a new watcher
        return
    self._stall(n, name, limit, why)

  def _stall(self, n: int, name: str, limit: float, why: str) -> NoReturn:
    self.on_stall(f"error: watchdog: {name} (device step {n}) did not finish within "
                  f"{limit:.1f} s ({why}) on {self.describe(n)}; stopping", EXIT_STALLED)

