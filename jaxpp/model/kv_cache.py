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
float8 e4m3, about half of bf16's bytes: twice the sequences in the same memory, and half
the bytes a decode step reads per cached position. An fp8 cache keeps one scale per token
and kv head (its largest magnitude over the head dim / 448, in bf16) beside each entry:
`key_scales`/`value_scales` of the keys' shape without the head dim, so a cache is the
tuple (keys, values) or (keys, values, key_scales, value_scales). Per-token scales need no
calibration and follow each token's own range: a key of Qwen2 (biased projections, keys in
the hundreds) keeps e4m3's 3 mantissa bits instead of clipping at +-448, and a small value
keeps them instead of sinking into e4m3's subnormals. The scale costs 2 bytes per 128
(1.6% of the cache at head dim 128). Every reader (decode kernel, prefix kernel, XLA)
widens an entry as `widen` does: e4m3 to f32, times its scale, to the activations' dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from jaxpp.errors import JaxppError
from jaxpp.model import quant
from jaxpp.model.config import LlamaConfig

KVCache = tuple  # (keys, values), or with an fp8 cache (keys, values, key_scales, value_scales)
NULL_BLOCK = 0  # a paged pool's block that no sequence owns: writes with nowhere to go
KV_DTYPES = ("auto", "fp8")  # the cache's storage: the activations' dtype, or scaled e4m3
FP8 = quant.STORAGE["fp8"]
FP8_MAX = quant.LARGEST["fp8"]  # e4m3's largest finite magnitude
SCALE_DTYPE = jnp.bfloat16  # an fp8 entry's scale: x is stored as x / scale, |x / scale| <= 448


def storage_dtype(kv_dtype: str, activation_dtype):
  """The dtype the cache stores for the knob `kv_dtype` (one of KV_DTYPES)."""
  return jnp.dtype(FP8) if kv_dtype == "fp8" else jnp.dtype(activation_dtype)


def scaled(dtype) -> bool:
  """Whether a cache stored in `dtype` keeps per-token scales (fp8 does)."""
  return jnp.dtype(dtype) == jnp.dtype(FP8)


def element_bytes(dtype, head_dim: int) -> float:
  """Bytes a cached key (or value) element costs in `dtype`, its share of a scale included."""
  extra = jnp.dtype(SCALE_DTYPE).itemsize / head_dim if scaled(dtype) else 0.0
  return jnp.dtype(dtype).itemsize + extra


def check_backend(kv_dtype: str, device) -> None:
  """An fp8 cache needs float8_e4m3fn conversions on the device: a one-line error where
  its XLA backend has none."""
  if kv_dtype == "fp8" and not quant.runs_fp8(device):
    raise JaxppError(f"kv_dtype='fp8' is not supported on {device.platform}: its XLA "
                     "backend cannot convert float8_e4m3fn; use kv_dtype='auto'")


def to_cache(a, dtype) -> tuple:
  """New keys or values `a` [..., H] as the cache stores them: (a in `dtype`,) or, for
  fp8, (a / scale in e4m3, scale [...]) with each token's scale its largest magnitude over
  H / 448 (rounded to SCALE_DTYPE, so the quotient is clipped into e4m3's range)."""
  if not scaled(dtype):
    return (a.astype(dtype),)
  amax = jnp.max(jnp.abs(a.astype(jnp.float32)), axis=-1)
  # an all-zero token gets the smallest normal scale, not 0 (0 / 0 would store NaN)
  scale = jnp.maximum(amax / FP8_MAX, jnp.finfo(SCALE_DTYPE).tiny).astype(SCALE_DTYPE)
  q = jnp.clip(a.astype(jnp.float32) / scale[..., None].astype(jnp.float32), -FP8_MAX, FP8_MAX)
  return q.astype(dtype), scale


def widen(stored, scale, dtype):
  """Cached entries [..., H] back in the activations' `dtype`: times their per-token scale
  [...] where the cache keeps one (`scale` None: a plain conversion)."""
  if scale is None:
    return stored.astype(dtype)
  return (stored.astype(jnp.float32) * scale[..., None].astype(jnp.float32)).astype(dtype)


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
  scales: tuple | None = None  # fp8: (key_scales, value_scales), the keys' shape less H


class Pages(NamedTuple):
  """How a micro-batch's rows address a paged cache: `tables` i32 [b, nblk] (see
  LayerCache), and `write_at` (blocks, offsets) i32 [b, T] each, where the new tokens' keys
  and values go (a negative block: nowhere, i.e. NULL_BLOCK); without it they go through
  the tables at the tokens' positions (decode)."""

  tables: jnp.ndarray
  write_at: tuple | None = None


def layer_keys(cache: LayerCache, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The layer's cached keys and values as dense rows [B, K, S, H] in `dtype` (`widen`ed):
  a dense cache's slice, or a paged one's blocks gathered through the tables (a copy: the
  XLA path's price, which the decode kernel avoids by reading the blocks where they lie)."""
  scales = cache.scales or (None, None)
  if cache.tables is None:
    pick = lambda a: None if a is None else a[cache.at]
  else:
    B, nblk = cache.tables.shape

    def pick(pool):
      if pool is None:
        return None
      blocks = pool[cache.at + (cache.tables,)]  # [B, nblk, K, BS(, H)]
      blocks = jnp.moveaxis(blocks, 2, 1)
      return blocks.reshape(B, blocks.shape[1], nblk * blocks.shape[3], *blocks.shape[4:])

  return tuple(widen(pick(a), pick(s), dtype)
               for a, s in ((cache.keys, scales[0]), (cache.values, scales[1])))


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
  cache_positions(max_len), and their scales [1, L, 1, B, K, S] when `dtype` is fp8."""
  shape = (1, c.num_layers, 1, batch, c.num_kv_heads, cache_positions(max_len), c.head_dim)
  return zeros(shape, dtype)


def zeros(shape, dtype, make=jnp.zeros) -> KVCache:
  """A zeroed cache whose keys and values are `shape` in `dtype`: (keys, values), and their
  scales (`shape` less H) for fp8; `make(shape, dtype)` builds each array."""
  kv = (make(shape, dtype), make(shape, dtype))
  if not scaled(dtype):
    return kv
  return kv + (make(shape[:-1], SCALE_DTYPE), make(shape[:-1], SCALE_DTYPE))
