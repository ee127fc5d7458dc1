"""Packed prefill rows: what goes where, the shape family, and the waste it leaves."""

import numpy as np
import pytest

from jaxpp.errors import JaxppError
from jaxpp.parallel import packing


def test_first_fit_packs_longest_first_within_tokens_and_count():
  rows = packing.first_fit([5, 9, 3, 4, 8, 1], T=10, q=3)
  assert sorted(i for row in rows for i in row) == list(range(6))  # every prompt once
  lengths = [5, 9, 3, 4, 8, 1]
  assert all(sum(lengths[i] for i in row) <= 10 and len(row) <= 3 for row in rows)
  assert rows == [[1, 5], [4], [0, 3], [2]]  # 9+1, 8, 5+4, 3
  assert len(packing.first_fit([1] * 7, T=10, q=3)) == 3  # the count caps a row too
  with pytest.raises(JaxppError, match="a prompt of 11 tokens does not fit a prefill row of 10"):
    packing.first_fit([11], T=10, q=3)


def test_pack_places_tokens_positions_segments_and_slots():
  prompts = [[7, 8, 9], [4, 5], [6]]
  targets = [(0, 1), (1, 0), (1, 1)]
  rows = packing.first_fit([3, 2, 1], T=4, q=2)  # [[0, 2], [1]]
  batch, where = packing.pack(prompts, targets, rows, M=2, p=1, T=4, q=2)
  assert where == [(0, 0, 0), (1, 0, 0), (0, 0, 1)]
  assert batch.tokens[0, 0].tolist() == [7, 8, 9, 6] and batch.tokens[1, 0].tolist() == [4, 5, 0, 0]
  assert batch.positions[0, 0].tolist() == [0, 1, 2, 0]
  assert batch.segments[0, 0].tolist() == [0, 0, 0, 1]
  assert batch.segments[1, 0].tolist() == [0, 0, -1, -1]
  assert batch.targets[0, 0].tolist() == [[0, 1]] * 3 + [[1, 1]]
  assert batch.targets[1, 0, 2:].tolist() == [[-1, -1]] * 2  # padding writes nowhere
  assert batch.ends[0, 0].tolist() == [2, 3] and batch.lengths[0, 0].tolist() == [3, 1]
  assert batch.lengths[1, 0].tolist() == [2, 1]  # an empty segment samples at length 1
  with pytest.raises(JaxppError, match="2 rows do not fit a prefill of 1 x 1"):
    packing.pack(prompts, targets, rows, M=1, p=1, T=4, q=2)


def test_row_counts_waste_at_most_a_fifth():
  family = [packing.row_count(n) for n in range(1, 50)]
  assert sorted(set(family)) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40,
                                 48, 56]
  assert all(n <= c < 1.25 * n for n, c in zip(range(2, 50), family[1:]))


def test_prefill_shape_spreads_pipelines_and_packs_one_stage():
  # pp > 1: rows over as many micro-batches as they fill (up to the cap), one row each
  assert packing.prefill_shape(3, 256, max_microbatches=32, spread=True) == (3, 1)
  assert packing.prefill_shape(40, 256, max_microbatches=16, spread=True) == (14, 3)
  # past the cap: rows per micro-batch first, then as few micro-batches as hold them
  for rows, cap in ((9, 8), (17, 16), (5, 4), (100, 32)):
    M, p = packing.prefill_shape(rows, 256, max_microbatches=cap, spread=True)
    assert M <= cap and rows <= M * p < 1.25 * rows + p
  assert packing.prefill_shape(1, 256, max_microbatches=16, spread=True,
                               min_microbatches=2) == (2, 1)
  # pp = 1: as few micro-batches as keep one near TOKENS_PER_MICROBATCH tokens
  assert packing.prefill_shape(12, 1024, max_microbatches=8, spread=False) == (1, 12)
  assert packing.prefill_shape(40, 1024, max_microbatches=8, spread=False) == (3, 14)


def test_packing_computes_close_to_the_real_tokens():
  """A ticket-like mix (mean ~190 tokens, a few near 1,000) packed into rows of 1,024: the
  program's tokens are within a quarter of the real ones, where padding every prompt to the
  longest computed several times them."""
  rng = np.random.default_rng(0)
  lengths = list(rng.lognormal(5.0, 0.55, 124).astype(int) + 20) + [990, 1000, 870, 700]
  T = 1024
  rows = packing.first_fit(lengths, T, packing.seqs_per_row(T))
  M, p = packing.prefill_shape(len(rows), T, max_microbatches=8, spread=False)
  real = sum(lengths)
  assert M * p * T <= 1.25 * real
  assert len(lengths) * max(lengths) > 3 * real  # what padding to the longest would cost


def test_one_per_row_is_the_unpacked_batch():
  batch = packing.one_per_row([[1, 2, 3], [4], [5, 6]], M=2, T=4)
  assert batch.tokens.shape == (2, 2, 4) and batch.ends.shape == (2, 2, 1)
  assert batch.targets[1, 0, 0].tolist() == [1, 0]  # prompt 2 -> slot (2 // 2, 2 % 2)
  assert batch.ends[:, :, 0].tolist() == [[2, 0], [1, 0]]
