"""Which rows a decode call runs: with a paged cache, only as many as are in use.

A decode program's shapes fix its rows, and each row costs its share of every weight GEMM
whether or not a sequence holds it. With a dense cache a row is a slot of the cache, so
every call runs them all. With a paged cache a row is only its decode state and a block
table (the keys and values live in the shared pool), so a call can run the first n rows
of each replica and leave the rest alone: the engine's default cap is MAX_AUTO_SLOTS rows
a replica, and a pool that holds fewer sequences, or a light load, would otherwise pay
for all of them every step. Even fill (`slots.free_row`) takes each micro-batch's first
free row, so the rows in use stay near the front.

n is rounded up to a multiple of MIN_ROWS (at most the replica's rows), so a run compiles
a few decode programs (8 at most for 256 rows), not one per count, and runs at most
MIN_ROWS - 1 empty rows. Below about MIN_ROWS rows a decode step reads its weights in
about the same time whatever the rows, so finer steps would only add programs.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

MIN_ROWS = 32  # rows per micro-batch and replica of the smallest decode call


class RowWindow:
  """The first `n` of each replica's `rows_per_replica` rows, as one decode call's
  arrays [M, dp * n, ...] (replica d's rows stay together, as the program shards them)."""

  def __init__(self, rows_per_replica: int, dp: int, n: int):
    self.b, self.dp, self.n = rows_per_replica, dp, n

  @property
  def whole(self) -> bool:
    return self.n == self.b

  def take(self, a: np.ndarray) -> np.ndarray:
    """The window's rows of a host array [M, dp * b, ...] (axis 1 the rows)."""
    if self.whole:
      return a
    M, rest = a.shape[0], a.shape[2:]
    return np.ascontiguousarray(
        a.reshape(M, self.dp, self.b, *rest)[:, :, :self.n].reshape(M, self.dp * self.n, *rest))

  def put(self, full: np.ndarray, part: np.ndarray) -> None:
    """Writes a call's rows [M, dp * n, ...] back into the host array [M, dp * b, ...]."""
    M, rest = full.shape[0], full.shape[2:]
    full.reshape(M, self.dp, self.b, *rest)[:, :, :self.n] = np.asarray(part).reshape(
        M, self.dp, self.n, *rest)

  def index(self, r: int) -> int:
    """Row r of the engine's numbering as a row of the call's arrays."""
    d, i = divmod(r, self.b)
    assert i < self.n, f"row {r} is outside the decode window of {self.n} rows a replica"
    return d * self.n + i


def window(busy_rows: Iterable[int], rows_per_replica: int, dp: int, paged: bool) -> RowWindow:
  """The window covering every row in `busy_rows` (engine row numbers of the sequences
  decoding): all rows with a dense cache, else the fewest bucketed rows that hold them."""
  b = rows_per_replica
  if not paged:
    return RowWindow(b, dp, b)
  need = max((r % b for r in busy_rows), default=0) + 1
  return RowWindow(b, dp, min(b, -(-need // MIN_ROWS) * MIN_ROWS))
