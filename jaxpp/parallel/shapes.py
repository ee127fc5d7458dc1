"""How host batches become the programs' shapes: padded lengths and micro-batch cuts.

Every distinct shape is another compiled program, so prompt lengths are padded to
power-of-two buckets and rows are cut into a fixed number of micro-batches, padding rows
filled in; a padding row's cache slot is -1 and it writes nothing.
"""

from __future__ import annotations

import numpy as np


def bucket(n: int, minimum: int = 16) -> int:
  """Pads lengths to powers of two so a handful of programs serve every prompt length."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


PREFILL_MIN_LEN = 64  # the shortest prefill program: shorter prompts pad to it


def prefill_len(longest: int, max_len: int) -> int:
  """Positions a prefill pads its prompts to: the longest one's bucket, within the context."""
  return min(bucket(longest, minimum=PREFILL_MIN_LEN), max_len)


def split_rows(n: int, microbatches: int) -> int:
  """Rows per micro-batch for n sequences (the last micro-batches may hold padding rows)."""
  return -(-n // microbatches)


def to_microbatches(a: np.ndarray, microbatches: int, fill) -> np.ndarray:
  """[B, ...] -> [M, b, ...] with the fewest rows b that fit, padding with `fill`."""
  b = split_rows(a.shape[0], microbatches)
  padded = np.full((microbatches * b,) + a.shape[1:], fill, a.dtype)
  padded[:a.shape[0]] = a
  return padded.reshape((microbatches, b) + a.shape[1:])
