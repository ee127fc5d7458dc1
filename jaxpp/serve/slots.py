"""Which free decode slot a sequence goes to: the engine's even fill.

A new request (`Engine._admit`) and a swapped-out sequence coming back (`kv_swap.restore`)
take a row the same way, so that no micro-batch of a replica holds more than its share and
the replicas fill alike: the least-loaded replica that can take it, there its least-loaded
micro-batch, there its first free row.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def free_row(live: np.ndarray, owner: list[list], rows_per_replica: int,
             fits: Callable[[int], bool]) -> tuple[int, int, int] | None:
  """(replica d, micro-batch j, row r) of a free slot, or None. `live` [dp, M] counts each
  replica's rows in use per micro-batch, `owner[j][r]` is None for a free row, and
  `fits(d)` says whether replica d can take the sequence (its KV blocks)."""
  b, full = rows_per_replica, np.iinfo(np.int32).max
  open_ = (live < b) & np.array([[fits(d)] for d in range(live.shape[0])])
  if not open_.any():
    return None
  d = int(np.argmin(np.where(open_.any(axis=1), live.sum(axis=1), full)))
  j = int(np.argmin(np.where(open_[d], live[d], full)))
  return d, j, d * b + owner[j][d * b:(d + 1) * b].index(None)
