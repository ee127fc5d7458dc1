"""One job per output: an OS file lock beside the output, held for the whole run.

Two jobs appending to one output would write every id twice. The lock is `flock` on
`<output>.lock`, taken before the resume repair touches the output; the kernel releases it
on any exit, SIGKILL included, so a killed job never leaves a stale lock behind. The file
keeps the holder's pid so a refused job can name it; it is left in place after the run
(deleting it would race with the next job taking it). `flock` covers jobs on one host and,
on Linux, on most network file systems (NFS since kernel 2.6.12 emulates it with POSIX
locks).
"""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib

from jaxpp.errors import JaxppError


def lock_path(output: str | os.PathLike) -> pathlib.Path:
  """`<output>.lock`, e.g. out/summaries.jsonl.lock."""
  p = pathlib.Path(output)
  return p.with_name(p.name + ".lock")


class OutputLock:
  """`with OutputLock(output):` holds the lock or raises a one-line JaxppError naming the
  running job's pid."""

  def __init__(self, output: str | os.PathLike):
    self.output, self.path = pathlib.Path(output), lock_path(output)
    self._fd: int | None = None

  def __enter__(self) -> OutputLock:
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise JaxppError(f"job lock {self.path}: cannot open ({e.strerror or e})") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise JaxppError(f"job lock {self.path}: cannot lock ({e.strerror or e})") from None
      raise JaxppError(f"job output {self.output} is in use by another job (pid {holder}, "
                       f"lock {self.path}); wait for it to finish or choose another output"
                       ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor releases the flock
      self._fd = None
