"""One layer's flat index in a stage's stacked arrays.

A stage holds each block leaf and its KV cache with lead axes [pp, v, Lc] (stage, virtual
chunk, layer of the chunk), and the step that runs a layer knows its index into each as
ints or traced scalars. The Pallas kernels (decode and prefix attention, the 8-bit matmul)
see those lead axes as one, through a free reshape, and take the layer's row-major flat
index as a scalar operand: this computes it, in one place for all three.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def flat(index: Sequence, lead_shape: Sequence[int]) -> jax.Array:
  """The row-major flat index (int32 scalar) of `index` into axes of `lead_shape`."""
  if len(index) != len(lead_shape):
    raise ValueError(f"{len(index)} indices for {len(lead_shape)} lead axes {tuple(lead_shape)}")
  out = jnp.int32(0)
  for i, n in zip(index, lead_shape):
    out = out * n + jnp.asarray(i, jnp.int32)
  return out
