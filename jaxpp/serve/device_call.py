"""A device call in flight: what the host needs to take its results later and to time it.

JAX dispatches a jitted call and returns at once; the engine starts its next decode call
before handing the last one's finished requests to its caller, so the caller's host work
(detokenizing, writing rows, queueing more) runs while the devices compute. The host comes
back for the results whenever it is done, so the time until then is not the call's: a
thread waits on the outputs and notes when the devices finished.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Hashable, Protocol

import jax


class StepGuard(Protocol):
  """What the engine needs of a watchdog (`dist.watchdog.Watchdog` is one): a context
  around each device call and its fetch, keyed by the compiled program it runs."""

  def step(self, name: str, key: Hashable = None) -> contextlib.AbstractContextManager: ...


class InFlight:
  """A dispatched call's `outputs`, its program `key`, host `start` time and the watchdog's
  deadline around it (`guard`, closed once the results are taken)."""

  def __init__(self, outputs, key: Hashable, start: float, guard: contextlib.ExitStack):
    self.outputs, self.key, self.start, self.guard = outputs, key, start, guard
    self._end: list[float] = []
    self._waiter = threading.Thread(target=self._wait, daemon=True, name="jaxpp-device-call")
    self._waiter.start()

  def _wait(self) -> None:
    jax.block_until_ready(self.outputs)
    self._end.append(time.perf_counter())

  def seconds(self) -> float:
    """From dispatch until the devices finished (waits for them)."""
    self._waiter.join()
    return self._end[0] - self.start
