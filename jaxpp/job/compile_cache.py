"""JAX's persistent compilation cache for the job, and the compile time a run spends.

A nightly job compiles the same programs every night; with the cache (on by default in
`job.compile_cache`) a rerun loads them from disk instead. `CompileClock` sums the time JAX
reports for its `/jax/core/compile/backend_compile_duration` event (a compile, or a load
from the cache), so the report can show it apart from the steady-state work it projects
from.
"""

from __future__ import annotations

import os
import pathlib

import jax

from jaxpp.errors import JaxppError

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def enable(directory: str) -> pathlib.Path | None:
  """Turns the persistent cache on in `directory` ("" = off). Call it before the process's
  first compile: JAX decides at that compile whether a cache is in use, for good."""
  if not directory:
    return None
  path = pathlib.Path(os.path.expanduser(directory))
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise JaxppError(f"job.compile_cache={directory}: cannot create it ({e.strerror})") from None
  jax.config.update("jax_compilation_cache_dir", str(path))
  # Cache every program, however quick to compile: the job's are few and reused nightly.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


class CompileClock:
  """Seconds JAX spent compiling (or loading compiled programs from the cache) while the
  clock was open, and how many programs: `with CompileClock() as c:`."""

  def __init__(self):
    self.seconds = 0.0
    self.compiles = 0

  def _listen(self, event: str, duration: float, **_) -> None:
    if event == COMPILE_EVENT:
      self.seconds += duration
      self.compiles += 1

  def __enter__(self) -> CompileClock:
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)
