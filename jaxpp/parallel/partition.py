"""Which layers each pipeline chunk holds: even, explicit, or cost-balanced splits.

There are `pp * v` chunks; global chunk c runs on device c % pp as its local chunk c // pp
(interleaving), and chunks are contiguous runs of layers in order. Uneven splits are padded
to the longest chunk in the stacked params; `layer_counts` tells each chunk's real length
so the stage scan skips padding.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxpp.errors import JaxppError


@dataclasses.dataclass(frozen=True)
class Partition:
  """Layer counts per global chunk, in pipeline order."""

  pp: int
  virtual_stages: int
  counts: tuple[int, ...]  # layers of global chunk c = r*pp + s

  @property
  def max_layers(self) -> int:
    """Padded chunk length: the layer axis of the stacked params."""
    return max(self.counts)

  def first_layer(self, chunk: int) -> int:
    return sum(self.counts[:chunk])

  def layer_counts(self) -> np.ndarray:
    """int32 [pp, v]: real layers of (device s, local chunk r)."""
    out = np.zeros((self.pp, self.virtual_stages), np.int32)
    for c, n in enumerate(self.counts):
      out[c % self.pp, c // self.pp] = n
    return out

  def layer_index(self) -> np.ndarray:
    """int32 [pp, v, max_layers]: model layer held at each slot, -1 for padding."""
    out = np.full((self.pp, self.virtual_stages, self.max_layers), -1, np.int32)
    for c, n in enumerate(self.counts):
      start = self.first_layer(c)
      out[c % self.pp, c // self.pp, :n] = np.arange(start, start + n)
    return out


def _check(pp: int, v: int, num_layers: int):
  if pp < 1 or v < 1:
    raise JaxppError(f"pp={pp} and virtual_stages={v} must be >= 1")
  if num_layers < pp * v:
    raise JaxppError(f"{num_layers} layers cannot fill pp*virtual_stages={pp * v} chunks "
                     "(each chunk needs at least one layer)")


def even(num_layers: int, pp: int, virtual_stages: int = 1) -> Partition:
  """As even as possible; earlier chunks take the remainder."""
  _check(pp, virtual_stages, num_layers)
  chunks = pp * virtual_stages
  base, extra = divmod(num_layers, chunks)
  return Partition(pp, virtual_stages, tuple(base + (c < extra) for c in range(chunks)))


def explicit(spec: str | tuple[int, ...], num_layers: int, pp: int,
             virtual_stages: int = 1) -> Partition:
  """Per-chunk layer counts, e.g. "21,20,20,19"; must sum to the layer count."""
  _check(pp, virtual_stages, num_layers)
  try:
    counts = tuple(int(x) for x in spec.split(",")) if isinstance(spec, str) else tuple(spec)
  except ValueError:
    raise JaxppError(f"layer split {spec!r} is not a comma-separated list of integers") from None
  if len(counts) != pp * virtual_stages:
    raise JaxppError(f"layer split {spec!r} has {len(counts)} entries; pp*virtual_stages="
                     f"{pp * virtual_stages} chunks need one each")
  if min(counts) < 1:
    raise JaxppError(f"layer split {spec!r}: every chunk needs at least one layer")
  if sum(counts) != num_layers:
    raise JaxppError(f"layer split {spec!r} sums to {sum(counts)} but the model has "
                     f"{num_layers} layers")
  return Partition(pp, virtual_stages, counts)


def balanced(num_layers: int, pp: int, virtual_stages: int = 1, *, layer_cost: float = 1.0,
             embed_cost: float = 0.0, head_cost: float = 0.0) -> Partition:
  """Minimises the costliest chunk; the embedding counts on chunk 0, the head on the last.

  Exact for contiguous splits: binary search over the bottleneck with a greedy fill.
  Costs are in any common unit (e.g. bytes read per decode step).
  """
  _check(pp, virtual_stages, num_layers)
  chunks = pp * virtual_stages

  def split(limit: float) -> tuple[int, ...] | None:
    counts, layer = [], 0
    for c in range(chunks):
      fixed = (embed_cost if c == 0 else 0.0) + (head_cost if c == chunks - 1 else 0.0)
      left_chunks = chunks - c - 1
      room = int((limit - fixed) // layer_cost + 1e-9) if layer_cost > 0 else num_layers
      take = min(room, num_layers - layer - left_chunks)
      if c == chunks - 1:
        take = num_layers - layer
        if fixed + take * layer_cost > limit + 1e-9:
          return None
      if take < 1:
        return None
      counts.append(take)
      layer += take
    return tuple(counts)

  lo, hi = 0.0, embed_cost + head_cost + num_layers * layer_cost
  best = split(hi)
  for _ in range(60):
    mid = (lo + hi) / 2
    found = split(mid)
    if found is None:
      lo = mid
    else:
      hi, best = mid, found
  return Partition(pp, virtual_stages, best)
