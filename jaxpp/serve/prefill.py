"""The engine's prefills: admitted prompts packed into one call of the pipeline's program.

Admitted requests already own their cache slots; this module packs their prompts into rows
(`parallel/packing.py`), picks the program's shape from a small family (so a run compiles
a handful of prefills, not one per admission) and turns the sampled first tokens into each
request's decode state.

Shape: rows of T = max(the longest prompt's bucket, the bucket of all the admitted tokens
up to PACK_LEN) tokens, q prompts at most a row; micro-batches as `packing.prefill_shape`
cuts them (spread over up to `prefill_m` micro-batches when pipelined, to shrink the fill
and drain; as few as fit when not, since each micro-batch re-reads the stage's weights).
With dp replicas each replica's prompts are packed apart into its own share of the rows
(`packing.pack_replicas`), all shares of the same shape: the busiest replica's.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from jaxpp.model import decode_state, sampling
from jaxpp.parallel import packing, shapes
from jaxpp.parallel.pipeline import Pipeline

PACK_LEN = 1024  # row length prompts are packed into, unless the context is shorter


class Prefiller:
  """Packs and runs prefills for an engine of `slots` sequences with context `max_len`."""

  def __init__(self, pipe: Pipeline, max_len: int, slots: int, eos_ids: tuple[int, ...]):
    self.pipe, self.max_len, self.eos_ids = pipe, max_len, eos_ids
    self.dp = pipe.dp
    self.slots = slots // self.dp  # one replica's: prefill shapes are per replica
    self.replica_rows = self.slots // pipe.microbatches  # a replica's rows a micro-batch
    self.prefill_m = pipe.layout.prefill_m(self.slots)  # micro-batches of the largest prefill
    self.min_m = pipe.pp if pipe.v > 1 else 1  # interleaving needs pp in flight
    self.last_shape = (0, 0, 0)
    self.programs: set = set()  # keys of the prefill programs already called
    self.last_first = False  # whether the last `run` was its program's first call

  def row_len(self, lengths: Sequence[int]) -> int:
    """T of the rows for an admission of prompts of these lengths: the longest one's bucket,
    or that of all their tokens together up to PACK_LEN (a lone short prompt gets a short
    row, not PACK_LEN positions)."""
    pack = min(sum(lengths), PACK_LEN, self.max_len)
    return max(shapes.prefill_len(max(lengths), self.max_len),
               shapes.prefill_len(pack, self.max_len))

  def shape(self, rows: int, T: int) -> tuple[int, int]:
    return packing.prefill_shape(rows, T, max_microbatches=self.prefill_m,
                                 spread=self.pipe.pp > 1, min_microbatches=self.min_m)

  def run(self, params, cache, prompts: Sequence[Sequence[int]],
          targets: Sequence[tuple[int, int]], knobs: Sequence[dict], max_new: Sequence[int],
          step: Callable, logprobs: int | None = None,
          writes: Sequence[np.ndarray] | None = None,
          prefix: tuple[Sequence[int], Sequence[np.ndarray]] | None = None
          ) -> tuple[decode_state.DecodeState, object, tuple | None]:
    """Prefills `prompts` into cache slots `targets`; returns (each prompt's decode state
    as host arrays, in the order given; the new cache; with `logprobs`, each first token's
    logprob [n] and top alternatives' ids and logprobs [n, logprobs], else None).
    `knobs[i]` holds prompt i's sampling fields; `step(key)` is the watchdog's context for
    the device call. A paged cache takes each prompt token's (block, offset), `writes[i]`
    i32 [n, 2]. With `prefix` = (starts, tables) each of `prompts` is a piece continuing a
    cached prefix of starts[i] positions in the blocks of tables[i] (i32 [nblk]): one piece a
    row, no packing. The shape it ran is left in `last_shape` (M, p, T)."""
    mine = [[i for i, (_, r) in enumerate(targets) if r // self.replica_rows == d]
            for d in range(self.dp)]
    if prefix is None:
      T = self.row_len([len(p) for p in prompts])
      q = packing.seqs_per_row(T)
      rows = [[[mine[d][k] for k in row]
               for row in packing.first_fit([len(prompts[i]) for i in mine[d]], T, q)]
              for d in range(self.dp)]
    else:
      T, q = shapes.prefill_len(max(map(len, prompts)), self.max_len), 1
      rows = [[[i] for i in mine[d]] for d in range(self.dp)]
    M, p = self.shape(max(map(len, rows)), T)
    self.last_shape = (M, self.dp * p, T)
    batch, where = packing.pack_replicas(prompts, targets if writes is None else writes,
                                         rows, M, p, T, q,
                                         starts=None if prefix is None else prefix[0])
    arrays = None if prefix is None else self._prefix_arrays(prefix, where, M, p)
    knob_arrays = _knob_arrays(M, self.dp * p, q)
    budget = np.ones((M, self.dp * p, q), np.int32)
    for i, (j, r, s) in enumerate(where):
      for f, value in knobs[i].items():
        knob_arrays[f][j, r, s] = value
      budget[j, r, s] = max_new[i]
    state, cache, lps = self._call(params, cache, batch, knob_arrays, budget, step, logprobs,
                                   arrays)
    flat = [(j * self.dp * p + r) * q + s for j, r, s in where]
    lps = None if lps is None else tuple(
        a.reshape((int(np.prod(a.shape[:3])),) + a.shape[3:])[flat] for a in lps)
    return decode_state.DecodeState(*(a[flat] for a in state)), cache, lps

  def _prefix_arrays(self, prefix, where, M: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    """(tables i32 [M, dp*p, nblk], starts i32 [M, dp*p]) of the rows `where` holds: each
    row's blocks and cached positions (padding rows: the null block, 0)."""
    starts, tables = prefix
    table_rows = np.zeros((M, self.dp * p, len(tables[0])), np.int32)
    start_rows = np.zeros((M, self.dp * p), np.int32)
    for i, (j, r, _) in enumerate(where):
      table_rows[j, r], start_rows[j, r] = tables[i], starts[i]
    return table_rows, start_rows

  def _call(self, params, cache, batch, knob_arrays, budget, step, logprobs=None,
            prefix=None):
    knobs = sampling.SamplingParams(*knob_arrays.values())  # numpy: jit places it
    do_sample = knobs.needs_sampling()
    # a first token's only penalty is the prompt's repetition penalty (no output yet)
    penalties = bool(np.any(np.asarray(knobs.repetition_penalty) != 1))
    key = (batch.tokens.shape, batch.ends.shape, do_sample, logprobs, penalties,
           prefix is not None)
    self.last_first = key not in self.programs
    self.programs.add(key)
    with step(key):
      first, cache, *lps = self.pipe.prefill(params, cache, batch, knobs, prefix,
                                             do_sample=do_sample, logprobs=logprobs,
                                             penalties=penalties)
      first = np.asarray(first)
      lps = tuple(np.asarray(a) for a in lps[0]) if lps else None
    # Over every prompt position of the shape, so these few eager ops compile once per
    # prefill shape, not once per admission size.
    new = decode_state.start_state(first.reshape(-1), batch.lengths.reshape(-1),
                                   budget.reshape(-1), self.eos_ids, self.max_len)
    return decode_state.DecodeState(*(np.asarray(a) for a in new)), cache, lps  # one fetch each

  def shapes_for(self, prompt_lengths, admissions=None) -> set[tuple[int, int, int]]:
    """Every (M, p, T) an admission of these prompt lengths can take (1 row to one per
    slot), or, given `admissions` (lists of prompt lengths), the shapes of exactly those;
    p is one replica's rows (the program's batch holds dp * p, as `last_shape` says)."""
    if admissions is not None:
      out = set()
      for lengths in admissions:
        T = self.row_len(lengths)
        # a burst into an idle engine alternates between the replicas
        rows = max(len(packing.first_fit(lengths[d::self.dp], T, packing.seqs_per_row(T)))
                   for d in range(self.dp))
        out.add(self.shape(rows, T) + (T,))
      return out
    lengths = sorted(set(prompt_lengths))
    Ts = {self.row_len([n]) for n in lengths}  # a lone prompt of each length
    T = self.row_len([lengths[0]])
    while T < self.row_len([lengths[0]] * self.slots):  # ... up to a full admission's rows
      T = shapes.prefill_len(2 * T, self.max_len)
      Ts.add(T)
    return {self.shape(rows, T) + (T,) for T in Ts for rows in range(1, self.slots + 1)}

  def precompile(self, params, cache, prompt_lengths, step, admissions=None,
                 continued_blocks: int = 0) -> tuple[int, object]:
    """Runs every prefill shape of `shapes_for` once with greedy knobs, filling no slot;
    with `continued_blocks` (a paged cache's table width, when prompts may continue a cached
    prefix) also every shape of pieces one a row (1 row to one per slot, T as lone
    prompts'); returns (how many ran, the cache)."""
    packed = sorted(self.shapes_for(prompt_lengths, admissions))
    pieces = sorted({self.shape(rows, T) + (T,) for T in {t for _, _, t in packed}
                     for rows in range(1, self.slots + 1)}) if continued_blocks else []
    for (M, p, T), continued in [(s, False) for s in packed] + [(s, True) for s in pieces]:
      q, p = 1 if continued else packing.seqs_per_row(T), self.dp * p
      batch, _ = packing.pack([], [], [], M, p, T, q)
      prefix = ((np.zeros((M, p, continued_blocks), np.int32), np.zeros((M, p), np.int32))
                if continued else None)
      _, cache, _ = self._call(params, cache, batch, _knob_arrays(M, p, q),
                               np.ones((M, p, q), np.int32), step, prefix=prefix)
    return len(packed) + len(pieces), cache


def _knob_arrays(M: int, p: int, q: int) -> dict[str, np.ndarray]:
  """Greedy sampling fields for every prompt position of a prefill shape."""
  return {f: np.full((M, p, q), a[0])
          for f, a in zip(sampling.SamplingParams._fields, sampling.SamplingParams.checked(1))}
