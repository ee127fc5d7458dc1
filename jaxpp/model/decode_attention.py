"""One decode token's attention over a KV cache, fused in a Pallas kernel (Triton on GPU).

XLA runs decode attention as two batched matmuls over (row, kv head) with the softmax
between them in f32: on an H200 that took 85 µs of GEMMs plus 33 µs of softmax and padding
per 8B layer-step (the scores padded from 4 to 8 query heads, read three times), and on the
70B shape its small [8, 128] x [128, S] GEMMs streamed the cache at 39% of HBM bandwidth
(docs/benchmarks.md, "Profiles"). It also reads every cache position, however short a row.

This kernel reads each row's keys and values once, only up to the row's length, and keeps
scores and the running softmax in registers (the online softmax of flash attention); in
the 8B decode program it streams the cache at 3.9 TB/s on an H200, and decode runs 1.16x
faster than with XLA's attention (1.34x at 4,096 positions). One
program per (row, kv head, split of the row's positions) takes the G query heads that share
the kv head; `splits` > 1 cuts long rows into pieces run side by side (flash-decoding) for
when rows x kv heads are too few to fill the GPU. Each program returns its un-normalised
sum with its running max and denominator; `combine` merges the pieces with the decode
token's own key and value (which are not in the cache yet) in a few small XLA ops.

The kernel takes the whole cache and the layer's index (traced scalars are fine): given a
slice cut out of the cache inside the layer loop, XLA would copy it first, which is the
cost the pipeline's constant indices exist to avoid (pipeline.py). On other backends it runs
in the Pallas interpreter, which is how the CPU tests check it.

The cache can also be paged: a pool of blocks of BS positions that a host allocator hands
out to each sequence as it grows, so that requests of mixed lengths do not each reserve
max_len positions. A table [B, nblk] names each row's blocks in order; the paged kernel
steps one block at a time, reads the row's table entry for each block it visits (a scalar
load, as it reads the row's length) and folds the block in with the dense kernel's own
online-softmax step, so the two forms mask, split and round alike.

An fp8 cache (kv_cache.py) comes with per-token `scales`: the kernel loads each block's
scales beside its keys and values and widens them in registers as `kv_cache.widen` does,
so the cache is read once, at a byte per element and two per token and kv head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from jaxpp.axes import TP
from jaxpp.model import kv_cache, layer_index

MIN_TILE = 16  # Triton's smallest dot operand dimension: G query heads are padded to it
# Cache positions per step; kv_cache.CACHE_ALIGN keeps S a multiple of it. With 4 warps, 2
# stages and the automatic splits, 64 came within 10% of the best configuration tried on
# each decode shape on an H200 (tools/decode_attention_probe.py; docs/benchmarks.md).
BLOCK_S = 64
# Automatic splits aim for this many programs, two per SM on H100/H200 (132 SMs): with 16
# rows x 8 kv heads at 4,096 positions 4 splits read 1.4x faster than 1; with 512 programs
# splitting only added partial sums.
TARGET_PROGRAMS = 264
MAX_SPLITS = 8
NEG_INF = -1e30
HIGHEST = jax.lax.Precision.HIGHEST  # float32 operands in IEEE, not TF32 (bf16: no effect)


def attend(q, keys, values, at, lengths, firsts=None, *, tables=None, scales=None,
           **options):
  """`attend_cached`, split over kv heads where the surrounding mesh splits them over 'tp'.

  GSPMD cannot partition a custom kernel: given one, it would gather the whole cache onto
  every device. Under a mesh whose 'tp' axis is still automatic (the pipeline's stage
  programs, or the GSPMD baseline run under `jax.set_mesh`), each tp device runs the kernel
  on its own kv heads, which is where q, the cache and the output already lie. A paged
  pool's K axis sits where the cache's does; its `tables` go to every device whole, and
  `scales`' K axis (their last but one) is split as the cache's is.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if firsts is None:
    firsts = jnp.zeros_like(lengths)
  if mesh.empty or TP not in mesh.auto_axes or mesh.shape[TP] == 1:
    return attend_cached(q, keys, values, at, lengths, firsts, tables=tables,
                         scales=scales, **options)
  heads = P(*(None,) * (keys.ndim - 3), TP)  # the cache's K axis, and its scales'
  out = P(None, None, TP)
  run = jax.shard_map(
      lambda q, k, v, at, n, f, t, s: attend_cached(q, k, v, tuple(at), n, f, tables=t,
                                                    scales=s, **options),
      mesh=mesh, in_specs=(P(None, TP), heads, heads, P(), P(), P(), P(),
                           (heads, heads) if scales else None),
      out_specs=(out, out, out), axis_names={TP}, check_vma=False)
  return run(q, keys, values, [jnp.asarray(i, jnp.int32) for i in at], lengths, firsts,
             tables, scales)  # tables None: an empty pytree


def attend_cached(q, keys, values, at, lengths, firsts=None, *, tables=None, scales=None,
                  splits: int = 0,
                  block_s: int = BLOCK_S, num_warps: int = 4, num_stages: int = 2,
                  interpret: bool | None = None, softcap: float = 0.0):
  """Partial attention of q over cached positions firsts[b] .. lengths[b] - 1 of one
  layer (firsts: a sliding window's start, default 0; the blocks before it are not read),
  each score capped at +-softcap with tanh first when softcap > 0 (Gemma 2).

  q: [B, K, G, H], already scaled by H**-0.5. keys, values: the whole cache
  [*lead, B, K, S, H]; `at` indexes the lead axes (ints or traced int scalars) to pick the
  layer. Returns (acc f32[B, K, G, H] un-normalised, max f32[B, K, G], denominator
  f32[B, K, G]), each with a leading `splits` axis; rows of length 0 give max NEG_INF and
  zeros. `splits=0` picks the fewest (a power of two) that give TARGET_PROGRAMS programs.
  `interpret` defaults to "not on a GPU".

  Paged: with `tables` (int [B, nblk]) keys and values are a pool [*lead, NB, K, BS, H] of
  NB blocks, and row b's position p lies at offset p % BS of block tables[b, p // BS]. The
  kernel then steps one block, BS positions (block_s is not used), and reads the table
  entries of the blocks overlapping the row's window only: the others may name any block.

  fp8: `scales` (key_scales, value_scales) are each entry's scale, the keys' shape less H
  (kv_cache.py); None: keys and values are read as they are.
  """
  B, K, G, H = q.shape
  lead, (Bc, Kc, S, Hc) = keys.shape[:-4], keys.shape[-4:]
  if tables is not None:  # a pool: Bc counts its blocks, S is their size
    if len(tables.shape) != 2 or tables.shape[0] != B:
      raise ValueError(f"tables {tuple(tables.shape)} do not match q's B={B} rows")
    if not supports(S):
      raise ValueError(f"pool blocks of BS={S} positions: the kernel's tiles need a power "
                       f"of two >= {MIN_TILE}")
    Bc, block_s = B, S
  if (Bc, Kc, Hc) != (B, K, H) or values.shape != keys.shape or len(at) != len(lead):
    raise ValueError(f"q {q.shape} does not match the cache {keys.shape} at {len(at)} "
                     "lead indices")
  if S % block_s:
    raise ValueError(f"cache positions S={S} are not a multiple of block_s={block_s}")
  if not supports(H):
    raise ValueError(f"head_dim={H}: the kernel's tiles need a power of two >= {MIN_TILE}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  blocks = S // block_s if tables is None else tables.shape[1]
  splits = splits or auto_splits(B * K, blocks)
  Gp = max(MIN_TILE, 1 << (G - 1).bit_length())  # Triton tiles are powers of two
  q = jnp.pad(q, ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
  flat = layer_index.flat(at, lead)
  cache_shape = (-1, *keys.shape[-4:])  # a bitcast: the lead axes as one
  kernel, paged = ((_kernel, ()) if tables is None else
                   (_paged_kernel, (jnp.asarray(tables, jnp.int32),)))
  kernel = functools.partial(kernel, block_s=block_s, splits=splits, softcap=softcap,
                             scaled=scales is not None)
  scale_refs = scale_operands(scales, keys)
  acc, m, l = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((splits, B, K, Gp, H), jnp.float32),
                 jax.ShapeDtypeStruct((splits, B, K, Gp), jnp.float32),
                 jax.ShapeDtypeStruct((splits, B, K, Gp), jnp.float32)),
      grid=(splits, B, K),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="decode_attention" if tables is None else "paged_decode_attention",
  )(jnp.reshape(flat, (1,)), lengths.astype(jnp.int32),
    (jnp.zeros_like(lengths) if firsts is None else firsts).astype(jnp.int32), *paged, q,
    keys.reshape(cache_shape), values.reshape(cache_shape), *scale_refs)
  return acc[..., :G, :], m[..., :G], l[..., :G]


def _kernel(at_ref, len_ref, first_ref, q_ref, k_ref, v_ref, *refs, block_s, splits, softcap,
            scaled):
  """Program (split, row, kv head): online softmax over its share of the row's blocks;
  `refs`: the scales' refs when `scaled`, then the outputs."""
  p, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  layer, n, first = at_ref[0], len_ref[b], first_ref[b]
  scale_refs, outs = (refs[:2], refs[2:]) if scaled else (None, refs)

  def load(i):
    where = (layer, b, h, pl.ds(i * block_s, block_s))
    return widened(k_ref, v_ref, scale_refs, where, q_ref.dtype)

  lo, hi = _share(p, n, first, block_s, splits)
  out = _attend_blocks(q_ref[b, h], load, lo, hi, first, n, block_s, softcap)
  for ref, x in zip(outs, out):
    ref[p, b, h] = x


def _paged_kernel(at_ref, len_ref, first_ref, table_ref, q_ref, k_ref, v_ref, *refs, block_s,
                  splits, softcap, scaled):
  """`_kernel` over a pool: the row's i-th block is the pool's block table_ref[b, i]."""
  p, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  layer, n, first = at_ref[0], len_ref[b], first_ref[b]
  scale_refs, outs = (refs[:2], refs[2:]) if scaled else (None, refs)

  def load(i):
    where = (layer, table_ref[b, i], h, slice(None))
    return widened(k_ref, v_ref, scale_refs, where, q_ref.dtype)

  lo, hi = _share(p, n, first, block_s, splits)
  hi = jnp.minimum(hi, table_ref.shape[1])  # never an entry past the table's end
  out = _attend_blocks(q_ref[b, h], load, lo, hi, first, n, block_s, softcap)
  for ref, x in zip(outs, out):
    ref[p, b, h] = x


def scale_operands(scales, keys) -> tuple:
  """An fp8 cache's (key_scales, value_scales) as the kernels take them, their lead axes
  as one as the cache's are; () without scales; ValueError if they are not the cache's
  shape less H. prefix_attention's kernel takes its pool's so too."""
  if scales is None:
    return ()
  if any(s.shape != keys.shape[:-1] for s in scales):
    raise ValueError(f"scales {[tuple(s.shape) for s in scales]} are not the cache's "
                     f"shape less H, {tuple(keys.shape[:-1])}")
  return tuple(s.reshape((-1, *keys.shape[-4:-1])) for s in scales)


def widened(k_ref, v_ref, scale_refs, where, dtype):
  """The keys and values [C, H] at `where` (indices of the positions, C of them) in
  `dtype` by `kv_cache.widen`, times their scales [C] where the cache keeps them, so
  kernel and XLA read an fp8 cache alike (prefix_attention's kernel reads with it too)."""
  scales = (None, None) if scale_refs is None else (s[where] for s in scale_refs)
  return tuple(kv_cache.widen(r[where + (slice(None),)], scale, dtype)
               for r, scale in zip((k_ref, v_ref), scales))


def _share(p, n, first, block_s, splits):
  """Split p's blocks lo .. hi - 1 of a row's blocks that overlap [first, n)."""
  blocks = (n + block_s - 1) // block_s
  skipped = first // block_s  # blocks wholly before the window
  per = (blocks - skipped + splits - 1) // splits
  lo = skipped + p * per
  return lo, jnp.minimum(lo + per, blocks)


def _attend_blocks(q, load, lo, hi, first, n, block_s, softcap):
  """Online softmax of q [Gp, H] over blocks lo .. hi - 1, `load(i)` giving block i's keys
  and values [block_s, H] in q's dtype -> (acc [Gp, H], max [Gp], denominator [Gp]) in
  f32."""
  Gp, H = q.shape

  def step(i, carry):
    k, v = load(i)  # [block_s, H] in q's dtype
    at_s = i * block_s + jax.lax.broadcasted_iota(jnp.int32, (Gp, block_s), 1)
    # a slot's stale positions past n (an earlier request's) stay out even if not finite
    at_v = i * block_s + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0)
    v = jnp.where((at_v >= first) & (at_v < n), v, 0)
    return fold(carry, q, k, v, (at_s >= first) & (at_s < n), softcap)

  init = (jnp.zeros((Gp, H), jnp.float32), jnp.full((Gp,), NEG_INF, jnp.float32),
          jnp.zeros((Gp,), jnp.float32))
  return jax.lax.fori_loop(lo, hi, step, init)


def soft_cap(x, cap: float):
  """Gemma 2's soft cap: cap * tanh(x / cap), x itself for cap 0 (also XLA's attention's,
  `llama.attend`)."""
  return x if not cap else cap * jnp.tanh(x / cap)


def supports(head_dim: int) -> bool:
  """Whether the kernel takes this head dim (a Triton tile side: a power of two >= 16)."""
  return head_dim >= MIN_TILE and head_dim & (head_dim - 1) == 0


def auto_splits(programs: int, blocks: int) -> int:
  """Splits of a row for `programs` (row, kv head) pairs over `blocks` position blocks."""
  splits = 1
  while programs * splits < TARGET_PROGRAMS and splits < min(MAX_SPLITS, blocks):
    splits *= 2
  return splits


def combine(acc, m, l, q, k_new, v_new, dtype, softcap: float = 0.0):
  """Merges the kernel's pieces with the new token's own key/value -> out [B, K, G, H].

  q [B, K, G, H] (scaled), k_new/v_new [B, K, H] (the decode token's, not yet cached);
  `softcap` as the kernel's.
  """
  s_new = jnp.einsum("BKGH,BKH->BKG", q, k_new, preferred_element_type=jnp.float32)
  s_new = soft_cap(s_new, softcap)
  top = jnp.maximum(jnp.max(m, axis=0), s_new)
  w = jnp.exp(m - top)  # [splits, B, K, G]
  w_new = jnp.exp(s_new - top)
  denom = jnp.sum(l * w, axis=0) + w_new
  total = (jnp.sum(acc * w[..., None], axis=0) +
           w_new[..., None] * v_new.astype(jnp.float32)[:, :, None])
  return (total / denom[..., None]).astype(dtype)


def fold(carry, q, k, v, keep, softcap: float = 0.0):
  """One online-softmax step (flash attention's) of q [R, H] over keys k and values v
  [C, H] where `keep` [R, C] (None: everywhere), scores capped first as `soft_cap` caps
  them: (acc [R, H], max [R], denominator [R]), all f32, in and out. Both kernels (this
  one's and prefix_attention's) fold their tiles with it.

  A row with nothing kept so far counts exp(0) for its masked keys (against v zeroed where
  it could be junk, so finite): the first kept score sets a max above NEG_INF and its
  alpha, exp(NEG_INF - max) = 0, wipes that count. Every real token keeps itself, so only
  padding tokens, whose output is zeroed, can end with nothing kept."""
  acc, m, l = carry
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=HIGHEST,
                          preferred_element_type=jnp.float32)  # [R, C]
  s = soft_cap(s, softcap)
  if keep is not None:
    s = jnp.where(keep, s, NEG_INF)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  alpha = jnp.exp(m - m_new)
  e = jnp.exp(s - m_new[:, None])
  acc = acc * alpha[:, None] + jnp.dot(e.astype(q.dtype), v, precision=HIGHEST,
                                       preferred_element_type=jnp.float32)
  return acc, m_new, l * alpha + jnp.sum(e, axis=1)
