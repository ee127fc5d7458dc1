"""8-bit block weights stored two to a 16-bit element, so that the decode kernel can address
every layer of a stage's stack.

Pallas' Triton lowering computes a load's element offsets in 32 bits whenever the array
holds at most 4 GiB, and Triton sign-extends them: in a 1-byte array of 2 to 4 GiB, an
offset at or past 2^31 wraps below the array's start. A stage's stacked 8-bit projection
lands there easily (Llama-3-8B's fused w_gate_up over 32 layers is 3.5 GiB; a 70B stage's
wqkv and wo over 40 layers are 3.1 and 2.5 GiB). Stored as 16-bit elements, no array of up
to 4 GiB has more than 2^31 of them, and larger ones get 64-bit offsets, so every layer is
reachable at any size. XLA cannot reinterpret an int8 array as int16 in place (it expands
a bitcast between widths into a pass over the data), so the packing is the stored form.

The last axis (an output axis of every block projection: the columns the scale runs
along) is packed in pairs: element c holds columns 2c (low byte) and 2c + 1 (high byte),
the byte order of `lax.bitcast_convert_type`. The container says the 8-bit type: int16
holds int8 pairs, uint16 e4m3 pairs. Unpacking back to [..., N] is a bitcast and a free
reshape in XLA, and a shift and a join in the kernel's registers. A tp split of the last
axis stays a split of whole pairs when each shard's width is even.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CONTAINER = {jnp.dtype(jnp.int8): jnp.dtype(jnp.int16),
             jnp.dtype(jnp.float8_e4m3fn): jnp.dtype(jnp.uint16)}
CONTAINED = {v: k for k, v in CONTAINER.items()}


def is_packed(a) -> bool:
  return jnp.dtype(a.dtype) in CONTAINED


def pack(q):
  """[..., N] int8 or e4m3 -> [..., N / 2] in its 16-bit container."""
  if q.shape[-1] % 2:
    raise ValueError(f"an 8-bit leaf's last axis must be even to pack in pairs: {q.shape}")
  pairs = q.reshape(*q.shape[:-1], q.shape[-1] // 2, 2)
  return jax.lax.bitcast_convert_type(pairs, CONTAINER[jnp.dtype(q.dtype)])


def unpack(w):
  """The 8-bit [..., N] a packed leaf holds; an unpacked leaf as it is."""
  if not is_packed(w):
    return w
  pairs = jax.lax.bitcast_convert_type(w, CONTAINED[jnp.dtype(w.dtype)])
  return pairs.reshape(*w.shape[:-1], w.shape[-1] * 2)


def unpack_tile(tile):
  """`unpack` in a kernel's registers: [k, n / 2] 16-bit -> [k, n] 8-bit, by shifts (Triton
  bitcasts only between types of one width) and a join of the two bytes as the last axis,
  as Pallas itself widens packed int4."""
  low = jax.lax.bitcast_convert_type(tile, jnp.int16) if tile.dtype == jnp.uint16 else tile
  high = jax.lax.shift_right_arithmetic(low, jnp.int16(8)).astype(jnp.int8)
  low = low.astype(jnp.int8)
  target = CONTAINED[jnp.dtype(tile.dtype)]
  if target != jnp.int8:
    low = jax.lax.bitcast_convert_type(low, target)
    high = jax.lax.bitcast_convert_type(high, target)
  joined = jnp.stack([low, high], axis=-1)
  return joined.reshape(*tile.shape[:-1], tile.shape[-1] * 2)


def stored(dtype, shape: tuple[int, ...]) -> tuple[jnp.dtype, tuple[int, ...]]:
  """(container dtype, packed shape) of an 8-bit leaf of `dtype` and `shape`."""
  return CONTAINER[jnp.dtype(dtype)], (*shape[:-1], shape[-1] // 2)
