"""Prompts packed into the prefill program's rows, so its FLOPs are the prompts' own.

A prefill row is a stream of T tokens holding several whole prompts one after another
(first fit, longest first). Each token carries its position inside its own prompt (RoPE
and the cache column), its segment (attention stays inside a prompt) and the cache slot
its keys and values go to; each prompt's last token is where its first new token is
sampled. Padding tokens have segment -1 and slot (-1, -1): they attend only to padding and
write nothing. One prompt per row with `seqs_per_row=1` is the unpacked special case.

Padding a batch to its longest prompt wastes most of a prefill when lengths vary (a
189-token mean with prompts up to 1,000 tokens computed about four times the real tokens);
packing leaves only the rows' tails and the shape's rounding (`prefill_shape`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from jaxpp.errors import JaxppError

# Tokens of one prefill micro-batch that the packer aims for when it may choose (pp = 1):
# enough that a stage's weights are read once per ~16k tokens of compute, few enough that
# XLA's [rows, heads, T, T] f32 attention scores stay a few GB at T = 1,024.
TOKENS_PER_MICROBATCH = 16384
MAX_SEQS_PER_ROW = 16  # prompts one row may hold (the sampled outputs' last axis)


class PrefillBatch(NamedTuple):
  """The prefill program's input: M micro-batches of p rows of T tokens, q prompts a row."""

  tokens: np.ndarray  # i32[M, p, T]
  positions: np.ndarray  # i32[M, p, T]: position in its own prompt
  segments: np.ndarray  # i32[M, p, T]: prompt index within the row, -1 for padding
  # i32[M, p, T, 2]: cache (micro-batch, row) the token fills, or in a paged cache its
  # (block, offset); -1: none
  targets: np.ndarray
  ends: np.ndarray  # i32[M, p, q]: index in the row of each prompt's last token
  lengths: np.ndarray  # i32[M, p, q]: each prompt's length (1 where there is no prompt)


def seqs_per_row(T: int) -> int:
  """q: prompts a row of T tokens may hold (at least 16 tokens each on average)."""
  return max(1, min(MAX_SEQS_PER_ROW, T // 16))


def first_fit(lengths: Sequence[int], T: int, q: int) -> list[list[int]]:
  """Rows of prompt indices: longest first, each into the first row with room (tokens and
  prompt count); a prompt longer than T is an error."""
  rows: list[list[int]] = []
  used: list[int] = []
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    n = lengths[i]
    if n > T:
      raise JaxppError(f"a prompt of {n} tokens does not fit a prefill row of {T}")
    for r, row in enumerate(rows):
      if used[r] + n <= T and len(row) < q:
        row.append(i)
        used[r] += n
        break
    else:
      rows.append([i])
      used.append(n)
  return rows


def row_count(n: int) -> int:
  """Rows of a program for n rows of prompts: 1, 2, 3, then four steps an octave (4, 5, 6,
  7, 8, 10, 12, 14, 16, 20, ...), so a handful of shapes serve every admission and at most a
  fifth of the rows are padding."""
  if n <= 4:
    return max(n, 1)
  step = 1 << (n.bit_length() - 3)  # a quarter of the octave's low end
  return -(-n // step) * step


def prefill_shape(rows: int, T: int, *, max_microbatches: int, spread: bool,
                  min_microbatches: int = 1) -> tuple[int, int]:
  """(M, p): micro-batches and rows per micro-batch for `rows` packed rows of T tokens.

  With `spread` (pipelines: more micro-batches shrink the bubble) the rows are cut into as
  many micro-batches as they fill, up to `max_microbatches`; otherwise into as few as keep
  a micro-batch near TOKENS_PER_MICROBATCH tokens. M and p come from `row_count`'s family
  where the limits allow (past `max_microbatches`, p first and then as few micro-batches as
  hold the rows), so the shapes stay few and padding rows stay under about a fifth.
  """
  cap = max(1, TOKENS_PER_MICROBATCH // T)
  want = max(rows if spread else math.ceil(rows / cap), min_microbatches)
  if row_count(want) > max_microbatches:
    p = row_count(math.ceil(rows / max_microbatches))
    return max(math.ceil(rows / p), min_microbatches), p
  M = row_count(want)
  return M, row_count(math.ceil(rows / M))


def pack(prompts: Sequence[Sequence[int]], targets: Sequence[tuple[int, int]],
         rows: list[list[int]], M: int, p: int, T: int, q: int,
         starts: Sequence[int] | None = None
         ) -> tuple[PrefillBatch, list[tuple[int, int, int]]]:
  """The batch holding `rows` (from `first_fit`) and where each prompt landed: (micro-batch,
  row, segment) per prompt, in the order of `prompts`. Rows fill micro-batch by micro-batch
  (row i is micro-batch i // p). `targets[k]` is prompt k's cache slot, or one target per
  token ([n, 2]: a paged cache's (block, offset)). `starts[k]` (default 0) is the position
  of prompt k's first token: a piece continuing a cached prefix of that many tokens."""
  if len(rows) > M * p:
    raise JaxppError(f"{len(rows)} rows do not fit a prefill of {M} x {p}")
  tokens = np.zeros((M, p, T), np.int32)
  positions = np.zeros((M, p, T), np.int32)
  segments = np.full((M, p, T), -1, np.int32)
  slots = np.full((M, p, T, 2), -1, np.int32)
  ends = np.zeros((M, p, q), np.int32)
  lengths = np.ones((M, p, q), np.int32)
  where: list[tuple[int, int, int] | None] = [None] * len(prompts)
  for i, row in enumerate(rows):
    j, r = divmod(i, p)
    at = 0
    for s, k in enumerate(row):
      n, start = len(prompts[k]), 0 if starts is None else starts[k]
      tokens[j, r, at:at + n] = prompts[k]
      positions[j, r, at:at + n] = start + np.arange(n)
      segments[j, r, at:at + n] = s
      slots[j, r, at:at + n] = targets[k]
      ends[j, r, s], lengths[j, r, s] = at + n - 1, start + n
      where[k] = (j, r, s)
      at += n
  return PrefillBatch(tokens, positions, segments, slots, ends, lengths), where


def pack_replicas(prompts: Sequence[Sequence[int]], targets: Sequence[tuple[int, int]],
                  rows: list[list[list[int]]], M: int, p: int, T: int, q: int,
                  starts: Sequence[int] | None = None
                  ) -> tuple[PrefillBatch, list[tuple[int, int, int]]]:
  """`pack` for dp replicas: rows[d] (from `first_fit` over replica d's prompts) fill rows
  d*p .. d*p + p-1 of every micro-batch, so each replica's share of the batch (the programs
  split its row axis over 'dp') names only that replica's cache slots. Returns the batch
  [M, dp*p, ...] and where each prompt landed, rows counted over the whole batch."""
  parts, where = [], [None] * len(prompts)
  for d, replica_rows in enumerate(rows):
    batch, landed = pack(prompts, targets, replica_rows, M, p, T, q, starts)
    parts.append(batch)
    for i in {k for row in replica_rows for k in row}:
      j, r, s = landed[i]
      where[i] = (j, d * p + r, s)
  return PrefillBatch(*(np.concatenate(f, axis=1) for f in zip(*parts))), where


def one_per_row(prompts: Sequence[Sequence[int]], M: int, T: int, dp: int = 1) -> PrefillBatch:
  """Each prompt in its own row, rows cut into M micro-batches of p rows (a multiple of
  dp), prompt i filling cache slot (i // p, i % p): a whole batch starting at once
  (`jaxpp.LLM.prompt_logits`); batch row and cache row coincide, so each replica's rows
  hold its own slots."""
  p = dp * -(-len(prompts) // (M * dp))
  rows = [[i] for i in range(len(prompts))]
  batch, _ = pack(prompts, [divmod(i, p) for i in range(len(prompts))], rows, M, p, T, 1)
  return batch
