"""Prefill attention for prompts that continue a cached prefix in a paged pool, in Pallas.

Two prefills start from positions another pass already cached: prefix caching (a prompt
whose first blocks another request computed) and chunked prefill (a long prompt run chunk
by chunk, each chunk attending to the ones before it). Their T new tokens attend to the
row's S cached positions and, causally, to each other. XLA's form gathers the row's blocks
out of the pool into a dense [B, K, S, H] copy and materialises f32 [B, K, G, T, S] scores
(`llama.attend`); cuDNN's flash kernel (prefill_attention.py) knows nothing of a cache.

This kernel is decode_attention's paged kernel widened to many queries, as flash attention:
one program per (tile of `block_q` new tokens, row, kv head) takes the tile's tokens times
the G query heads that share the kv head as block_q * G rows of one dot, so a kv head's
keys are read once per tile for all its query heads (GQA without a repeat; G above 4 is
cut into groups of `block_g`, each its own program, to keep 64 rows). It walks the
row's prefix one pool block (BS positions) at a time through the row's table, as the paged
decode kernel does, from the first block inside the tile's sliding window to the block
holding position starts - 1, then the new keys (`k_new`, `v_new`: not in the pool yet) in
tiles of `block_k` up to the tile's causal diagonal, keeping one online softmax (running
max, denominator, f32 accumulator) in registers across both walks. Nothing of size T x S
is ever written, and the pool is read in place at the layer `at` names (traced indices are
fine), never copied out.

Pool positions at or past a row's `starts` (another request's, or never written) and the
blocks its unused table entries name may hold anything, NaN included: they are masked out
of the scores and zeroed in the values before any dot, so they never reach the output.
New tokens at or past a row's `lengths` are padding: they attend to nothing new past the
row's length and come back as zeros. On other backends than GPUs it runs in the Pallas
interpreter, which is how the CPU tests check it. An fp8 pool's per-token `scales` are
read beside its blocks and applied in registers, as decode_attention's kernel does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from jaxpp.axes import TP
from jaxpp.model import layer_index
from jaxpp.model.decode_attention import MIN_TILE, NEG_INF, fold, scale_operands, widened
from jaxpp.model.decode_attention import supports as _tile_side

# Query rows (tokens x query heads) per program: the height of flash attention's query tile
# on Hopper with 4 warps (one warpgroup: a 64-row MMA), the f32 accumulator [64, H <= 256]
# in registers. G = 4 (Llama 3 8B) gives 16 tokens x 4 heads, G = 1 64 tokens; G = 8 (70B)
# 16 tokens x 4 heads in two programs per kv head, which read its keys twice (from L2):
# a program takes at least 16 tokens (Triton's smallest dot side), so at most 4 heads.
ROWS = 64
BLOCK_K = 64  # new keys per step of the second walk (the pool's walk steps one block, BS)
NO_WINDOW = 1 << 30  # the window that keeps every key; the kernel gets it for window 0


def supports(head_dim: int) -> bool:
  """Whether the kernel takes this head dim (a Triton tile side: a power of two >= 16)."""
  return _tile_side(head_dim)


def attend(q, k_new, v_new, keys, values, at, tables, starts, lengths, *, window=0,
           softcap: float = 0.0, scales=None, **options):
  """`attend_paged`, split over kv heads where the surrounding mesh splits them over 'tp'.

  GSPMD cannot partition a custom kernel: it would gather the whole pool onto every device.
  Under a mesh whose 'tp' axis is still automatic each tp device runs the kernel on its own
  kv heads (q, the new keys and values and the pool's K axis, where they already lie), with
  the tables, starts and lengths whole on each, as decode_attention.attend does.
  """
  mesh = jax.sharding.get_abstract_mesh()
  run = functools.partial(attend_paged, softcap=softcap, **options)
  if mesh.empty or TP not in mesh.auto_axes or mesh.shape[TP] == 1:
    return run(q, k_new, v_new, keys, values, at, tables, starts, lengths, window=window,
               scales=scales)
  static = isinstance(window, int)  # an int window stays static (0: no mask at all)
  heads = P(*(None,) * (keys.ndim - 3), TP)  # the pool's K axis, and its scales'
  new = P(None, None, TP)  # q [B, T, K, G, H], k_new/v_new [B, T, K, H], the output
  kernel = jax.shard_map(
      lambda q, kn, vn, k, v, at, t, s, n, w, sc: run(q, kn, vn, k, v, tuple(at), t, s, n,
                                                      window=window if static else w,
                                                      scales=sc),
      mesh=mesh, in_specs=(new, new, new, heads, heads, P(), P(), P(), P(), P(),
                           (heads, heads) if scales else None),
      out_specs=new, axis_names={TP}, check_vma=False)
  return kernel(q, k_new, v_new, keys, values, [jnp.asarray(i, jnp.int32) for i in at],
                tables, starts, lengths, jnp.int32(0) if static else window, scales)


def attend_paged(q, k_new, v_new, keys, values, at, tables, starts, lengths, *, window=0,
                 softcap: float = 0.0, scales=None, block_q: int = 0, block_k: int = 0,
                 block_g: int = 0,
                 num_warps: int = 4, num_stages: int = 2, interpret: bool | None = None):
  """Attention of each row's T new tokens over its cached prefix and themselves.

  q [B, T, K, G, H] (already scaled by the model's query scale); k_new, v_new [B, T, K, H]
  the new tokens' own keys and values. keys, values: the pool [*lead, NB, K, BS, H]; `at`
  indexes its lead axes (ints or traced int scalars) to pick the layer. Row b's cached
  position p lies at offset p % BS of block tables[b, p // BS] (tables int [B, nblk]); its
  new token i sits at position starts[b] + i and is real for i < lengths[b]. Token i
  attends to the cached positions p < starts[b] and the new tokens j <= i, j < lengths[b];
  with `window` > 0 (an int, or a traced int32 scalar with 0 = none) only to keys less
  than `window` positions before it; with `softcap` > 0 every score becomes
  softcap * tanh(score / softcap) first (Gemma 2). An fp8 pool comes with `scales`
  (key_scales, value_scales) [*lead, NB, K, BS] (kv_cache.py). One softmax over both in
  f32 -> [B, T, K, G, H] in q's dtype, zeros at padding tokens.

  A program takes block_q new tokens (a power of two >= 16) times block_g of the G query
  heads (a power of two dividing G rounded up to one; G is padded to that), and steps
  block_k new keys at a time (a power of two >= 16). 0 picks block_g = min(G, ROWS // 16),
  block_q = ROWS // block_g tokens and block_k = BLOCK_K keys, each at most T rounded up
  to a power of two. T that is not a multiple of block_q and block_k is padded here (a
  copy of q, k_new, v_new and the output; none when it is). `interpret` defaults to "not
  on a GPU".
  """
  B, T, K, G, H, nblk = _check(q, k_new, v_new, keys, values, at, tables, starts,
                               lengths, window, block_q, block_k)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  Gp = 1 << (G - 1).bit_length()  # Triton tiles are powers of two
  block_g = block_g or min(Gp, ROWS // MIN_TILE)
  if block_g & (block_g - 1) or Gp % block_g:
    raise ValueError(f"block_g={block_g} does not divide G={G} rounded up to a power of two")
  fit = max(MIN_TILE, 1 << (T - 1).bit_length())
  block_q = block_q or max(MIN_TILE, min(ROWS // block_g, fit))
  block_k = block_k or max(MIN_TILE, min(BLOCK_K, fit))
  Tp = -(-T // max(block_q, block_k)) * max(block_q, block_k)
  q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, Gp - G), (0, 0)))
  k_new, v_new = (jnp.pad(a, ((0, 0), (0, Tp - T), (0, 0), (0, 0))) for a in (k_new, v_new))
  if nblk == 0:  # no row has a prefix; Triton takes no empty operand
    tables = jnp.zeros((B, 1), jnp.int32)
  lead = keys.shape[:-4]
  flat = layer_index.flat(at, lead)
  windowed = not (isinstance(window, int) and window == 0)
  win = jnp.where(jnp.asarray(window) > 0, window, NO_WINDOW).astype(jnp.int32)
  pool_shape = (-1, *keys.shape[-4:])  # a bitcast: the lead axes as one
  kernel = functools.partial(_kernel, block_q=block_q, block_g=block_g, block_k=block_k,
                             windowed=windowed, softcap=softcap, scaled=scales is not None)
  scale_refs = scale_operands(scales, keys)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((B, Tp, K, Gp, H), q.dtype),
      grid=(Tp // block_q * (Gp // block_g), B, K),  # (query tile, head group) first
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="prefix_attention",
  )(jnp.reshape(flat, (1,)).astype(jnp.int32), jnp.asarray(starts, jnp.int32),
    jnp.asarray(lengths, jnp.int32), jnp.reshape(win, (1,)), jnp.asarray(tables, jnp.int32),
    q, k_new, v_new, keys.reshape(pool_shape), values.reshape(pool_shape), *scale_refs)
  return out if (Tp, Gp) == (T, G) else out[:, :T, :, :G]


def _check(q, k_new, v_new, keys, values, at, tables, starts, lengths, window, block_q,
           block_k):
  """Every shape attend_paged relies on, as one-line ValueErrors -> the sizes."""
  if q.ndim != 5:
    raise ValueError(f"q {tuple(q.shape)} is not [B, T, K, G, H]")
  B, T, K, G, H = q.shape
  if k_new.shape != (B, T, K, H) or v_new.shape != k_new.shape:
    raise ValueError(f"k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} are not "
                     f"[B, T, K, H] = {(B, T, K, H)} as q {tuple(q.shape)}")
  if keys.ndim < 4 or values.shape != keys.shape or len(at) != keys.ndim - 4:
    raise ValueError(f"the pool {tuple(keys.shape)} / {tuple(values.shape)} is not "
                     f"[*lead, NB, K, BS, H] with {len(at)} lead indices")
  _, Kc, BS, Hc = keys.shape[-4:]
  if (Kc, Hc) != (K, H):
    raise ValueError(f"q {tuple(q.shape)} does not match the pool {tuple(keys.shape)}")
  if not _tile_side(BS):
    raise ValueError(f"pool blocks of BS={BS} positions: the kernel's tiles need a power "
                     f"of two >= {MIN_TILE}")
  if not supports(H):
    raise ValueError(f"head_dim={H}: the kernel's tiles need a power of two >= {MIN_TILE}")
  if len(tables.shape) != 2 or tables.shape[0] != B:
    raise ValueError(f"tables {tuple(tables.shape)} do not match q's B={B} rows")
  for name, x in (("starts", starts), ("lengths", lengths)):
    if tuple(jnp.shape(x)) != (B,):
      raise ValueError(f"{name} {tuple(jnp.shape(x))} is not one entry per row, ({B},)")
  if isinstance(window, int) and window < 0:
    raise ValueError(f"window={window} is negative (0 = none)")
  for name, x in (("block_q", block_q), ("block_k", block_k)):
    if x and not _tile_side(x):
      raise ValueError(f"{name}={x}: the kernel's tiles need a power of two >= {MIN_TILE}")
  return B, T, K, G, H, tables.shape[1]


def _kernel(at_ref, start_ref, len_ref, win_ref, table_ref, q_ref, kn_ref, vn_ref, k_ref,
            v_ref, *refs, block_q, block_g, block_k, windowed, softcap, scaled):
  """Program (query tile and head group, row, kv head): the tile's block_q tokens x block_g
  heads as rows, one online softmax over the row's prefix blocks, then its new keys up to
  the diagonal. `refs`: the pool's scales when `scaled`, then the output."""
  scale_refs, o_ref = (refs[:2], refs[2]) if scaled else (None, refs[0])
  ig, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  layer, start, n, window = at_ref[0], start_ref[b], len_ref[b], win_ref[0]
  groups, H = q_ref.shape[-2] // block_g, q_ref.shape[-1]
  BS = k_ref.shape[-2]
  R, t0 = block_q * block_g, ig // groups * block_q
  rows = (b, pl.ds(t0, block_q), h, pl.ds(ig % groups * block_g, block_g), slice(None))
  q = q_ref[rows].reshape(R, H)
  token = lambda cols: t0 + jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (R, cols), 0),
                                        block_g)  # each row's new token, [R, cols]
  live = t0 < n  # a tile wholly of padding tokens reads nothing
  # the first position inside the window of the tile's first token (at start + t0)
  first = jnp.maximum(start + t0 - window + 1, 0) if windowed else jnp.int32(0)

  def prefix(masked):
    def step(j, carry):  # the row's prefix block j: positions j*BS .. j*BS + BS - 1
      block = table_ref[b, j]
      k, v = widened(k_ref, v_ref, scale_refs, (layer, block, h, slice(None)), q.dtype)
      if not masked:  # a block wholly inside the prefix, no window: every key counts
        return fold(carry, q, k, v, None, softcap)
      at_s = j * BS + jax.lax.broadcasted_iota(jnp.int32, (R, BS), 1)
      keep = at_s < start
      if windowed:
        keep &= start + token(BS) - at_s < window
      # junk (NaN) past the prefix; positions of a block read before the window are the
      # row's own (blocks wholly before it are not read), finite, and get weight 0
      at_v = j * BS + jax.lax.broadcasted_iota(jnp.int32, (BS, H), 0)
      return fold(carry, q, k, jnp.where(at_v < start, v, 0), keep, softcap)
    return step

  def fresh(masked):
    def step(j, carry):  # new keys j*block_k .. j*block_k + block_k - 1
      keys = pl.ds(j * block_k, block_k)
      k, v = (r[b, keys, h, :].astype(q.dtype) for r in (kn_ref, vn_ref))  # [block_k, H]
      if not masked:  # keys before every token of the tile, no window
        return fold(carry, q, k, v, None, softcap)
      at_s = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (R, block_k), 1)
      tok = token(block_k)
      keep = at_s <= tok  # so < n too for every real token; padding tokens end as zeros
      if windowed:
        keep &= tok - at_s < window
      at_v = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k, H), 0)
      v = jnp.where(at_v < n, v, 0)  # padding tokens' values may be anything, NaN too
      return fold(carry, q, k, v, keep, softcap)
    return step

  # Each walk runs its unmasked steps first (no window only: most of the work, no mask
  # arithmetic), then the masked ones: the prefix's last, partial block; the diagonal.
  loop = jax.lax.fori_loop
  lo = first // BS  # blocks wholly before the window are not read (nor their table entries)
  hi = jnp.where(live, jnp.minimum((start + BS - 1) // BS, table_ref.shape[1]), 0)
  carry = (jnp.zeros((R, H), jnp.float32), jnp.full((R,), NEG_INF, jnp.float32),
           jnp.zeros((R,), jnp.float32))
  if not windowed:
    lo = jnp.minimum(start // BS, hi)  # blocks wholly inside the prefix
    carry = loop(0, lo, prefix(False), carry)
  carry = loop(lo, hi, prefix(True), carry)
  lo = jnp.maximum(t0 - window + 1, 0) // block_k if windowed else jnp.int32(0)
  hi = jnp.where(live, jnp.minimum((t0 + block_q + block_k - 1) // block_k,
                                   (n + block_k - 1) // block_k), 0)
  if not windowed:
    lo = jnp.minimum((t0 + 1) // block_k, hi)  # tiles of keys at or before token t0
    carry = loop(0, lo, fresh(False), carry)
  acc, _, l = loop(lo, hi, fresh(True), carry)
  real = token(H) < n
  out = jnp.where(real, acc / jnp.where(real, l[:, None], 1.0), 0.0)
  o_ref[rows] = out.reshape(block_q, block_g, H).astype(o_ref.dtype)
