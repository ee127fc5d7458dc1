"""The KV cache's layouts, the view of one layer that attention reads, and where new keys
and values are written.

Cache layouts, per device:
- dense [v, Lc, M, b, K, S, H] (virtual chunk, layer in chunk, micro-batch, row, kv head,
  position, head dim): every row owns S positions; the single-device reference uses
  v = M = 1. Row and kv head lead a layer's [b, K, S, H] slice so that attention's two
  products are plain batched matmuls over (b, K) reading the cache where it lies: with
  positions before heads, GPU matmul libraries need a transposed copy of the whole slice
  per layer and step first.
- paged [v, Lc, NB, K, BS, H]: a pool of NB blocks of BS positions that a host allocator
  hands out per sequence (`serve/kv_blocks.py`), so a short request holds a few blocks, not
  max_len positions. A row's block table (`Pages.tables`) names the block of each of its
  BS positions; block NULL_BLOCK is never handed out and takes the writes of padding and
  of positions no block was allocated for. A (block, kv head) tile is contiguous, which is
  what the decode kernel streams.

The cache holds keys and values in the activations' dtype, or with `kv_dtype="fp8"` in
float8 e4m3, half of bf16's bytes: twice the sequences in the same memory, and half the
bytes a decode step reads per cached position. No scale is kept (a scale of 1, as vLLM's
uncalibrated fp8 cache): e4m3 keeps 3 mantissa bits over +-448, which covers keys and
values after the projections; writes clip to that range first, since e4m3 has no
infinity and an overflow would become NaN. Every reader widens what it loads back to
the activations' dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from jaxpp.errors import JaxppError
from jaxpp.model import quant
from jaxpp.model.config import LlamaConfig

KVCache = tuple[jnp.ndarray, jnp.ndarray]  # keys, values
NULL_BLOCK = 0  # a paged pool's block that no sequence owns: writes with nowhere to go
KV_DTYPES = ("auto", "fp8")  # the cache's storage: the activations' dtype, or e4m3
FP8 = quant.STORAGE["fp8"]
FP8_MAX = quant.LARGEST["fp8"]  # e4m3's largest finite magnitude


def storage_dtype(kv_dtype: str, activation_dtype):
  """The dtype the cache stores for the knob `kv_dtype` (one of KV_DTYPES)."""
  return jnp.dtype(FP8) if kv_dtype == "fp8" else jnp.dtype(activation_dtype)


def check_backend(kv_dtype: str, device) -> None:
  """An fp8 cache needs float8_e4m3fn conversions on the device: a one-line error where
  its XLA backend has none."""
  if kv_dtype == "fp8" and not quant.runs_fp8(device):
    raise JaxppError(f"kv_dtype='fp8' is not supported on {device.platform}: its XLA "
                     "backend cannot convert float8_e4m3fn; use kv_dtype='auto'")


def to_cache(a, dtype):
  """New keys or values `a` as the cache stores them (clipped into e4m3's range for fp8)."""
  if jnp.dtype(dtype) == jnp.dtype(FP8):
    a = jnp.clip(a, -FP8_MAX, FP8_MAX)
  return a.astype(dtype)


class LayerCache(NamedTuple):
  """One layer's view of the whole cache: `keys[at]` is its [B, K, S, H] slice (dense), or
  its [NB, K, BS, H] pool whose blocks `tables` [B, nblk] name for each row (paged).

  The view, not the slice, travels to the attention, so that the fused decode kernel can
  read the layer where it lies (a slice cut inside the layer loop is a copy on GPU).
  """

  keys: jnp.ndarray  # [*lead, B, K, S, H] or [*lead, NB, K, BS, H]
  values: jnp.ndarray
  at: tuple  # indices of the lead axes (ints or traced int scalars)
  tables: jnp.ndarray | None = None  # paged: i32 [B, nblk]


class Pages(NamedTuple):
  """How a micro-batch's rows address a paged cache: `tables` i32 [b, nblk] (see
  LayerCache), and `write_at` (blocks, offsets) i32 [b, T] each, where the new tokens' keys
  and values go (a negative block: nowhere, i.e. NULL_BLOCK); without it they go through
  the tables at the tokens' positions (decode)."""

  tables: jnp.ndarray
  write_at: tuple | None = None


def layer_keys(cache: LayerCache) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The layer's cached keys and values as dense rows [B, K, S, H]: a dense cache's slice,
  or a paged one's blocks gathered through the tables (a copy: the XLA path's price, which
  the decode kernel avoids by reading the blocks where they lie)."""
  if cache.tables is None:
    return cache.keys[cache.at], cache.values[cache.at]
  B, nblk = cache.tables.shape

  def gather(pool):
    blocks = pool[cache.at + (cache.tables,)]  # [B, nblk, K, BS, H]
    K, BS, H = blocks.shape[2:]
    return blocks.transpose(0, 2, 1, 3, 4).reshape(B, K, nblk * BS, H)

  return gather(cache.keys), gather(cache.values)


# Cache positions are allocated in multiples of this. cuBLAS wants aligned strides: with a
# max_len of 1234 XLA copied every layer's cached keys and values into an aligned buffer
# before each attention product (two ~95 µs copies a layer for the 8B shape on one H200,
# 43% of the decode step in a profile; docs/benchmarks.md). Positions past a row's length
# are never read, so the extra ones cost memory only.
CACHE_ALIGN = 128


def dense_targets(b, T, positions, cache: KVCache, microbatch, slots):
  """(micro-batch, row, position) [b, T] each where a dense cache takes each new token;
  `slots` as in run_blocks, default row r of `microbatch`; a micro-batch of -1 goes to
  column S, which the write drops."""
  S = cache[0].shape[5]
  if slots is None:
    slots = (jnp.full((b,), microbatch, jnp.int32), jnp.arange(b, dtype=jnp.int32))
  mb, rows = (jnp.broadcast_to(a if a.ndim == 2 else a[:, None], (b, T)) for a in slots)
  return jnp.maximum(mb, 0), rows, jnp.where(mb >= 0, positions, S)


def paged_targets(positions, pages: Pages, block_size: int):
  """(block, offset) [b, T] each where a paged pool takes each new token: `write_at`, or
  the rows' tables at the tokens' positions; nowhere (a negative block, a position past
  the table) is NULL_BLOCK."""
  if pages.write_at is not None:
    blocks, offsets = pages.write_at
  else:
    index = positions // block_size
    nblk = pages.tables.shape[1]
    blocks = jnp.take_along_axis(pages.tables, jnp.clip(index, 0, nblk - 1), axis=1)
    blocks = jnp.where(index < nblk, blocks, NULL_BLOCK)
    offsets = positions % block_size
  return jnp.where(blocks >= 0, blocks, NULL_BLOCK), jnp.where(blocks >= 0, offsets, 0)


def cache_positions(max_len: int) -> int:
  """Positions a KV cache holds for max_len tokens: max_len rounded up to CACHE_ALIGN."""
  return -(-max_len // CACHE_ALIGN) * CACHE_ALIGN


def init_cache(c: LlamaConfig, batch: int, max_len: int, dtype) -> KVCache:
  """Zeroed single-device cache: two [1, L, 1, B, K, S, H] arrays (v = M = 1), S =
  cache_positions(max_len)."""
  shape = (1, c.num_layers, 1, batch, c.num_kv_heads, cache_positions(max_len), c.head_dim)
  return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
