"""Schedule tables: the bubble they imply, and that every micro-batch visits every chunk."""

import numpy as np
import pytest

from jaxpp.errors import JaxppError
from jaxpp.parallel import schedule

CASES = [(1, 1, 1, 1), (2, 1, 2, 1), (4, 1, 4, 1), (4, 1, 8, 1), (4, 1, 2, 1), (8, 1, 8, 1),
         (2, 2, 2, 1), (4, 2, 4, 1), (4, 3, 6, 1), (4, 1, 4, 16), (4, 2, 8, 4), (8, 4, 16, 2)]


@pytest.mark.parametrize("pp,v,m,rounds", CASES)
def test_bubble_matches_formula(pp, v, m, rounds):
  sched = schedule.circular(pp, v, m, rounds)
  assert sched.bubble_fraction() == pytest.approx(schedule.formula_bubble(pp, v, m, rounds))


@pytest.mark.parametrize("pp,v,m,rounds", CASES)
def test_every_microbatch_visits_every_chunk_in_order(pp, v, m, rounds):
  sched = schedule.circular(pp, v, m, rounds)
  visits = {}  # (micro-batch, round) -> [(tick, global chunk)]
  for t in range(sched.ticks):
    for s in range(pp):
      j, r, k = sched.table[t, s]
      if j != schedule.IDLE:
        visits.setdefault((j, k), []).append((t, r * pp + s))
  assert set(visits) == {(j, k) for j in range(m) for k in range(rounds)}
  for (j, k), seq in visits.items():
    ticks = [t for t, _ in seq]
    assert [c for _, c in sorted(seq)] == list(range(pp * v)), (j, k)
    assert len(set(ticks)) == len(ticks)
  # a token's next pass starts only after the previous one left the last chunk
  for j in range(m):
    for k in range(1, rounds):
      assert min(t for t, _ in visits[(j, k)]) > max(t for t, _ in visits[(j, k - 1)])


@pytest.mark.parametrize("pp,v,m,rounds", CASES)
def test_rotated_slot_is_the_tick_mod_m(pp, v, m, rounds):
  """pipeline.py keeps micro-batch j of device s in cache slot (j + s) mod m and reads slot
  t mod m at tick t of the m-unrolled loop: the two must agree at every busy tick, also in
  the idle ticks padded on to whole groups of m."""
  sched = schedule.circular(pp, v, m, rounds)
  table = sched.padded(m)
  assert table.shape[0] % m == 0 and table.shape[0] - sched.ticks < m
  assert (table[:sched.ticks] == sched.table).all() and (table[sched.ticks:] == -1).all()
  for t, s in zip(*np.nonzero(table[:, :, 0] != schedule.IDLE)):
    assert (table[t, s, 0] + s) % m == t % m


def test_gpipe_is_fill_drain():
  sched = schedule.gpipe(3, 2)
  assert sched.render_text().splitlines() == [
      "dev0 | 0.0 1.0 ... ...",
      "dev1 | ... 0.1 1.1 ...",
      "dev2 | ... ... 0.2 1.2",
  ]


def test_png_rendering(tmp_path):
  path = tmp_path / "schedule.png"
  schedule.circular(4, 2, 4).render_png(str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ring_needs_enough_microbatches():
  with pytest.raises(JaxppError, match="microbatches=2 < pp=4"):
    schedule.circular(4, 1, 2, rounds=3)
  with pytest.raises(JaxppError, match="virtual_stages > 1"):
    schedule.circular(4, 2, 3)
  assert schedule.gpipe(4, 2).bubble_fraction() == pytest.approx(3 / 5)


def test_prefill_microbatches_default_and_caps():
  per = schedule.PREFILL_MICROBATCHES_PER_STAGE
  assert schedule.prefill_microbatches(0, 4, 4) == 4 * per  # 8 per stage by default
  assert schedule.prefill_microbatches(0, 1, 1) == per
  assert schedule.prefill_microbatches(0, 2, 40) == 40  # never fewer than the decode ring
  assert schedule.prefill_microbatches(0, 4, 4, slots=12) == 12  # a row each at most
  assert schedule.prefill_microbatches(6, 4, 4) == 6  # asked for: taken as it is
  assert schedule.prefill_microbatches(6, 4, 4, slots=5) == 5
