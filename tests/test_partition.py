"""Layer -> chunk splits: even, explicit and cost-balanced."""

import numpy as np
import pytest

from jaxpp.errors import JaxppError
from jaxpp.parallel import partition


def test_even_split_and_layer_index():
  part = partition.even(10, 2, 2)
  assert part.counts == (3, 3, 2, 2)
  index = part.layer_index()  # device s holds chunks s and s + pp
  assert index.shape == (2, 2, 3)
  assert index[0, 0].tolist() == [0, 1, 2] and index[1, 0].tolist() == [3, 4, 5]
  assert index[0, 1].tolist() == [6, 7, -1] and index[1, 1].tolist() == [8, 9, -1]
  assert part.layer_counts().tolist() == [[3, 2], [3, 2]]


def test_explicit_split():
  assert partition.explicit("21,20,20,19", 80, 4).counts == (21, 20, 20, 19)
  with pytest.raises(JaxppError, match="sums to 79 but the model has 80 layers"):
    partition.explicit("20,20,20,19", 80, 4)
  with pytest.raises(JaxppError, match="has 3 entries"):
    partition.explicit("30,30,20", 80, 4)
  with pytest.raises(JaxppError, match="not a comma-separated list"):
    partition.explicit("20;20", 40, 2)


def brute_force_best(layers, chunks, layer_cost, embed, head):
  import itertools
  best = None
  for cuts in itertools.combinations(range(1, layers), chunks - 1):
    counts = np.diff((0,) + cuts + (layers,))
    costs = counts * layer_cost
    costs[0] += embed
    costs[-1] += head
    if best is None or costs.max() < best:
      best = costs.max()
  return best


@pytest.mark.parametrize("layers,pp,v,embed,head", [
    (7, 4, 1, 1.0, 2.5), (32, 4, 1, 3.0, 3.0), (12, 2, 2, 0.0, 4.0), (9, 3, 1, 0.0, 0.0)])
def test_balanced_split_is_optimal(layers, pp, v, embed, head):
  part = partition.balanced(layers, pp, v, layer_cost=1.0, embed_cost=embed, head_cost=head)
  costs = np.array(part.counts, float)
  costs[0] += embed
  costs[-1] += head
  assert sum(part.counts) == layers and min(part.counts) >= 1
  assert costs.max() == pytest.approx(brute_force_best(layers, pp * v, 1.0, embed, head))


def test_too_few_layers():
  with pytest.raises(JaxppError, match="3 layers cannot fill"):
    partition.even(3, 2, 2)
