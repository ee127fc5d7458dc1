"""Every decode slot's tokens so far, kept on the host for the penalties' counts.

A decode call that applies penalties (`model/penalties.py`) needs what each row has seen:
its prompt and the tokens generated before the call. The engine already holds both on the
host, so this buffer is a few numpy writes per admission and per call, and goes to the
devices only with calls that need it (about M * rows * max_len * 4 bytes, e.g. 4 MB for
256 slots of 4,096 positions).
"""

from __future__ import annotations

import numpy as np

from jaxpp.model.penalties import History


class TokenHistory:
  """Tokens by (micro-batch, row, position) of M x rows slots with `max_len` positions."""

  def __init__(self, M: int, rows: int, max_len: int):
    self.tokens = np.zeros((M, rows, max_len), np.int32)
    self.prompt_lens = np.zeros((M, rows), np.int32)
    self.filled = np.zeros((M, rows), np.int64)

  def start(self, slot: tuple[int, int], prompt, first: int) -> None:
    """A newly prefilled slot: its prompt, then its first sampled token."""
    n = len(prompt)
    self.tokens[slot][:n] = prompt
    self.prompt_lens[slot] = n
    self.filled[slot] = n
    self.extend(slot, [first])

  def extend(self, slot: tuple[int, int], new) -> None:
    """Appends generated tokens (a row's last token, never fed back, may fall past the end:
    it is never needed)."""
    at = int(self.filled[slot])
    keep = max(0, min(len(new), self.tokens.shape[2] - at))
    self.tokens[slot][at:at + keep] = new[:keep]
    self.filled[slot] = at + len(new)

  def arrays(self) -> History:
    return History(self.tokens, self.prompt_lens)
