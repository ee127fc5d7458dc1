"""Decode-shaped weight-only 8-bit matmul that reads one layer of a stacked weight in place.

A jaxpp stage stacks its layers' weights on a leading axis ([L, K, N]) and scans over them.
Under int8 storage (`quant.py`) XLA serves the product `x @ w[l].astype(bf16) * scale[l]`
badly on GPU: its cuBLAS path cannot read int8, so it widens each layer into a bf16 copy
first (reading 1 byte and writing 2 per weight before the matmul reads those 2 again), and
its Triton GEMM fusion, which does read int8, streams the stacked array far below HBM
bandwidth. Either way int8 decode ends up slower than bf16, although it moves half the bytes.

This Pallas kernel (Triton on GPU, the Pallas interpreter on CPU) takes the whole stack and
the layer index as a traced scalar, and each program loads its [block_k, block_n] tiles of
`w[layer]` straight from the stack, widens them in registers and accumulates in f32. Decode
has few rows (M), so the work is a memory-bound stream of weights: the grid spans N blocks
and, where those are too few to keep every SM loading, splits K too (partial sums in f32,
added by XLA: cheap, as M is small). float8_e4m3fn storage runs through the same code, and
so do stacks stored two 8-bit values to a 16-bit element (`packed8.py`: how every layer of
a stack past 2 GiB stays addressable), unpacked in registers.

The model calls it through `LayerWeight` for every block projection of a decode step
(`Kernels.weights8`, attention_choice.py): `run_blocks` hands each layer the stage's stacks
and its index, and `project` multiplies, seeing a stack as [layers, in, out] (a free
reshape); under tensor parallelism each tp device runs the kernel on its own shard.
`tools/weight_stream_probe.py` measures the kernel alone against cuBLAS (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from jaxpp.axes import TP
from jaxpp.model import layer_index, packed8

MIN_TILE = 16  # the smallest dot operand dimension Triton takes (tl.dot: M, N, K >= 16)
# Automatic split-K aims for this many programs: two per SM on H100/H200 (132 SMs), so each
# SM has another program's loads in flight while one finishes.
TARGET_PROGRAMS = 264
MAX_SPLIT_K = 8


class LayerWeight(NamedTuple):
  """One layer of a stacked 8-bit projection, read in place: `stack` [*lead, *in, *out]
  (8-bit) and `scale` [*lead, *out] as the stage holds them, `index` the layer's indices
  into the lead axes (traced), `in_dims` how many of the leaf's dims (and x's trailing
  ones) the projection contracts, `tp_axis` which of its per-layer dims [*in, *out]
  tensor parallelism splits (params.TP_AXIS; None: none)."""

  stack: jax.Array
  scale: jax.Array
  index: tuple
  in_dims: int
  tp_axis: int | None = None


def project(x, w: LayerWeight, interpret: bool | None = None, out_dtype=None):
  """x [*rows, *in] times the layer's weight -> [*rows, *out] in `out_dtype` (default
  x.dtype): `quant.einsum` of the dequantised layer, without widening it first.
  `interpret` defaults to "not on a GPU" (the CPU tests' path).

  GSPMD cannot partition a custom kernel: given tp-split stacks it would gather each
  layer's whole weight onto every device. Under a mesh whose 'tp' axis is still automatic
  (the pipeline's stage programs) each tp device therefore runs the kernel on its own
  shard, where weights, scales and activations already lie: a column-parallel projection
  (wqkv, w_gate_up: an output axis split) returns its output split the same way; a
  row-parallel one (wo, w_down: the contracted axis split) sums its partial products over
  'tp', as XLA's partitioned einsum does. An axis that tp does not divide is not split.
  """
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  run = functools.partial(_project_local, in_dims=w.in_dims, interpret=interpret,
                          out_dtype=out_dtype or x.dtype)
  mesh = jax.sharding.get_abstract_mesh()
  lead = len(w.index)
  if (w.tp_axis is None or mesh.empty or TP not in mesh.auto_axes or mesh.shape[TP] == 1
      or w.stack.shape[lead + w.tp_axis] % mesh.shape[TP]):
    return run(x, w.stack, w.scale, w.index)
  rows = x.ndim - w.in_dims
  split = lambda before: P(*(None,) * before, TP)
  column = w.tp_axis >= w.in_dims
  out_axis = w.tp_axis - w.in_dims  # column: the split axis among the output dims
  sharded = jax.shard_map(
      lambda x, stack, scale, index: (run(x, stack, scale, tuple(index)) if column else
                                      jax.lax.psum(run(x, stack, scale, tuple(index)), TP)),
      mesh=mesh,
      in_specs=(P() if column else split(rows + w.tp_axis), split(lead + w.tp_axis),
                split(lead + out_axis) if column else P(), P()),
      out_specs=split(rows + out_axis) if column else P(),
      axis_names={TP}, check_vma=False)
  return sharded(x, w.stack, w.scale, [jnp.asarray(i, jnp.int32) for i in w.index])


def _project_local(x, stack, scale, index, *, in_dims: int, interpret: bool, out_dtype):
  """`project` on one device: the stack seen as [layers, in, out] (a free reshape) and the
  layer's flat index, through `stacked_matmul`."""
  lead = len(index)
  lead_shape, rest = stack.shape[:lead], stack.shape[lead:]
  ins, outs = rest[:in_dims], rest[in_dims:]
  L, n_in, n_out = math.prod(lead_shape), math.prod(ins), math.prod(outs)
  if packed8.is_packed(stack):  # pairs of the last output axis (packed8.py)
    n_out, outs = n_out * 2, (*outs[:-1], outs[-1] * 2)
  layer = layer_index.flat(index, lead_shape)
  rows = x.shape[:x.ndim - in_dims]
  flat = x.reshape(math.prod(rows), n_in)
  out = stacked_matmul(flat, stack.reshape(L, n_in, -1), scale.reshape(L, n_out), layer,
                       interpret=interpret, out_dtype=out_dtype,
                       **decode_tiles(*flat.shape, n_out))
  return out.reshape(rows + tuple(outs))


# The tiles decode uses, by how many 256-column tiles the output has: the tune step's
# fastest on one H200 at 64 rows over a 32-layer packed stack (docs/benchmarks.md, "8-bit
# decode through the kernel"). Wide outputs (the 8B shape's wqkv, 24 tiles; w_gate_up, 112)
# kept most loads in flight with short K steps and 4 warps (w_gate_up 1,812 GB/s against
# 1,446 with 128 x 128 tiles); narrow ones (wo, w_down: 16) with deeper steps and 8 warps.
# M tiles reach 128 rows, so a micro-batch of 128 reads each weight tile once.
WIDE_OUTPUT_TILES = 24
WIDE_TILES = dict(block_m=128, block_n=256, block_k=64, split_k=0, num_warps=4, num_stages=4)
NARROW_TILES = dict(block_m=128, block_n=256, block_k=128, split_k=0, num_warps=8,
                    num_stages=3)


TILE_FIELDS = {"bm": "block_m", "bn": "block_n", "bk": "block_k", "s": "split_k",
               "w": "num_warps", "st": "num_stages"}


def tiles_of(name: str) -> dict:
  """`stacked_matmul` keyword arguments from a tile name like `bm64_bn128_bk256_s0_w4_st3_t`
  (the probes' `--pallas_configs` / `--configs`): bm, bn, bk block rows, columns and depth,
  s split-K (0 picks one), w warps, st pipeline stages, a bare `t` the swapped dot; fields
  left out keep the defaults. ValueError names a bad field."""
  tiles = {}
  for field in name.split("_"):
    match = re.fullmatch(r"([a-z]+)(\d*)", field)
    key, value = match.groups() if match else (field, "")
    if key == "t" and not value:
      tiles["swap"] = True
    elif key in TILE_FIELDS and value:
      tiles[TILE_FIELDS[key]] = int(value)
    else:
      raise ValueError(f"bad field {field!r} in tile name {name!r}")
  return tiles


def decode_tiles(M: int, K: int, N: int) -> dict:
  """`stacked_matmul`'s tiles for an [M, K] x [K, N] decode product (WIDE_TILES or
  NARROW_TILES by the output's width)."""
  del M, K  # measured at 64 rows on K of 4,096 and 14,336 alike
  return WIDE_TILES if N >= WIDE_OUTPUT_TILES * 256 else NARROW_TILES


def stacked_matmul(x, w, scale, layer, *, block_m: int = 64, block_n: int = 128,
                   block_k: int = 256, split_k: int = 0, num_warps: int = 4,
                   num_stages: int = 3, swap: bool = False, interpret: bool = False,
                   out_dtype=None):
  """`(x @ w[layer].astype(x.dtype)) * scale[layer]` in `out_dtype` (default x.dtype),
  accumulated in f32.

  x: [M, K] activations; w: [L, K, N] int8 or float8_e4m3fn, or [L, K, N / 2] of them
  packed in pairs (`packed8.py`); scale: [L, N]; layer: an int scalar, usually traced (a
  scan or fori_loop step). Block sizes are upper bounds, shrunk to
  powers of two that fit the shape (Triton tiles are powers of two). `split_k=0` picks the
  smallest power of two that gives TARGET_PROGRAMS programs without shrinking the K tile
  below block_k. `swap` computes w^T x^T, which puts the widened weight tile in the dot's
  register (A) operand.
  """
  M, K = x.shape
  L, K_w, N = w.shape
  packed = packed8.is_packed(w)
  N = 2 * N if packed else N
  if K_w != K or scale.shape != (L, N):
    raise ValueError(f"shapes do not match: x {x.shape}, w {w.shape}, scale {scale.shape}")
  if N < MIN_TILE:
    raise ValueError(f"N={N} is below the smallest tile ({MIN_TILE})")
  if 2**31 <= w.size and w.size * w.dtype.itemsize <= 2**32:
    # Pallas-Triton indexes arrays of at most 4 GiB with 32-bit offsets, which Triton's
    # pointer arithmetic sign-extends: offsets at and beyond 2^31 would wrap (packed8.py).
    raise ValueError(f"w {w.shape} has 2-4 Gi 8-bit elements; Pallas-Triton's 32-bit "
                     "offsets would overflow: store it packed (packed8.pack)")
  bm = min(block_m, _pow2_at_least(max(M, MIN_TILE)))
  m_blocks = -(-M // bm)
  bn = min(block_n, _pow2_at_most(N))
  n_blocks = -(-N // bn)
  split_k = split_k or _auto_split(K, block_k, m_blocks * n_blocks)
  if K % split_k:
    raise ValueError(f"split_k={split_k} does not divide K={K}")
  bk = min(block_k, _pow2_dividing(K // split_k))
  if bk < MIN_TILE:
    raise ValueError(f"K={K} / split_k={split_k} has no power-of-two tile >= {MIN_TILE}")

  x_pad = jnp.pad(x, ((0, m_blocks * bm - M), (0, 0)))
  partial = split_k > 1
  out_dtype = out_dtype or x.dtype
  store = jnp.float32 if partial else out_dtype
  kernel = functools.partial(_kernel, n=N, bm=bm, bn=bn, bk=bk, steps=K // split_k // bk,
                             swap=swap, packed=packed)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((split_k, m_blocks * bm, N), store),
      grid=(m_blocks, n_blocks, split_k),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="stacked_int8_matmul",
  )(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), x_pad, w, scale)
  out = out.sum(0).astype(out_dtype) if partial else out[0]
  return out[:M]


def _kernel(layer_ref, x_ref, w_ref, scale_ref, out_ref, *, n, bm, bn, bk, steps, swap,
            packed):
  """One [bm, bn] output tile over one K split; refs are whole arrays, indexed here. A
  packed weight's tile is loaded as [bk, bn / 2] pairs and unpacked in registers.

  Where bn does not divide N, the last N tile is shifted left to end at N rather than
  masked: it recomputes a few columns of its neighbour (identical values) and never reads
  past the layer. Where it does, the plain `j * bn` start lets Triton prove the tile's
  alignment and vectorise its loads.
  """
  i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  layer = layer_ref[0]
  rows = pl.ds(i * bm, bm)
  col0 = j * bn if n % bn == 0 else jnp.minimum(j * bn, n - bn)
  cols = pl.ds(col0, bn)
  # a packed tile's pairs start at col0 / 2 (n and bn are even), spelled as a product
  # where it can be, as `cols` is
  pairs = pl.ds(j * (bn // 2) if n % bn == 0 else col0 // 2, bn // 2)

  def step(t, acc):
    ks = pl.ds((s * steps + t) * bk, bk)
    x = x_ref[rows, ks]
    if packed:
      w = packed8.unpack_tile(w_ref[layer, ks, pairs]).astype(x.dtype)
    else:
      w = w_ref[layer, ks, cols].astype(x.dtype)
    if swap:
      return acc + jax.lax.dot_general(w, x, (((0,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32)
    return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, steps, step,
                          jnp.zeros((bn, bm) if swap else (bm, bn), jnp.float32))
  if swap:
    acc = acc.T
  acc = acc * scale_ref[layer, cols].astype(jnp.float32)[None, :]
  out_ref[s, rows, cols] = acc.astype(out_ref.dtype)


def _auto_split(K: int, block_k: int, programs: int) -> int:
  """Smallest power-of-two K split reaching TARGET_PROGRAMS that keeps whole block_k tiles.

  Capped at MAX_SPLIT_K: each split adds an [M, N] f32 partial written and read again,
  8 * M / K of the weight bytes per split, which is no longer small at M = 32, K = 4096.
  """
  split = 1
  while (programs * split < TARGET_PROGRAMS and split < MAX_SPLIT_K
         and K % (2 * split * block_k) == 0):
    split *= 2
  return split


def _pow2_at_least(n: int) -> int:
  return 1 << (n - 1).bit_length()


def _pow2_at_most(n: int) -> int:
  return 1 << (n.bit_length() - 1)


def _pow2_dividing(n: int) -> int:
  """The largest power of two dividing n."""
  return n & -n
