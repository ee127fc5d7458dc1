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
added by XLA: cheap, as M is small). float8_e4m3fn storage runs through the same code.

The model calls it through `LayerWeight` for every block projection of a decode step
(`Kernels.weights8`, attention_choice.py): `run_blocks` hands each layer a view of the
stacks (a free reshape to [layers, in, out]) and its index, and `project` multiplies.
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

MIN_TILE = 16  # the smallest dot operand dimension Triton takes (tl.dot: M, N, K >= 16)
# Automatic split-K aims for this many programs: two per SM on H100/H200 (132 SMs), so each
# SM has another program's loads in flight while one finishes.
TARGET_PROGRAMS = 264
MAX_SPLIT_K = 8


class LayerWeight(NamedTuple):
  """One layer of a stacked 8-bit projection, read in place: `stack` [L, in, out] (8-bit),
  `scale` [L, out], `layer` the layer's index (traced), `out_shape` the output dims the
  projection's einsum gives (e.g. (K, G + 2, H) for wqkv), `in_dims` how many trailing dims
  of x it contracts."""

  stack: jax.Array
  scale: jax.Array
  layer: jax.Array
  out_shape: tuple[int, ...]
  in_dims: int

  @classmethod
  def of(cls, w, scale, lead: int, index, in_dims: int) -> LayerWeight:
    """The view of layer `index` (a tuple, one per lead axis) of `w` [*lead_axes, *in,
    *out] with `scale` [*lead_axes, *out]; reshapes only (the stacks stay where they are)."""
    lead_shape, rest = w.shape[:lead], w.shape[lead:]
    ins, outs = rest[:in_dims], rest[in_dims:]
    L, n_in, n_out = math.prod(lead_shape), math.prod(ins), math.prod(outs)
    flat = jnp.int32(0)
    for i, n in zip(index, lead_shape):  # row-major flat index of the layer
      flat = flat * n + jnp.asarray(i, jnp.int32)
    return cls(w.reshape(L, n_in, n_out), scale.reshape(L, n_out), flat, tuple(outs), in_dims)


def project(x, w: LayerWeight, interpret: bool | None = None):
  """x [*rows, *in] times the layer's weight -> [*rows, *out] in x.dtype: `quant.einsum` of
  the dequantised layer, without widening it first. `interpret` defaults to "not on a
  GPU" (the CPU tests' path)."""
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  rows = x.shape[:x.ndim - w.in_dims]
  flat = x.reshape(math.prod(rows), -1)
  out = stacked_matmul(flat, w.stack, w.scale, w.layer, interpret=interpret,
                       **decode_tiles(*flat.shape, w.stack.shape[-1]))
  return out.reshape(rows + w.out_shape)


# The tiles decode uses: the weight stream probe's fastest on an H200 at 32 rows
# (docs/benchmarks.md, "Pallas int8 kernel"), with M tiles of up to 128 rows so that a
# micro-batch of 128 reads each weight tile once.
DECODE_TILES = dict(block_m=128, block_n=128, block_k=128, split_k=0, num_warps=4,
                    num_stages=4)


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
  """`stacked_matmul`'s tiles for an [M, K] x [K, N] decode product."""
  del M, K, N  # one set for every shape until measurements say otherwise
  return DECODE_TILES


def stacked_matmul(x, w, scale, layer, *, block_m: int = 64, block_n: int = 128,
                   block_k: int = 256, split_k: int = 0, num_warps: int = 4,
                   num_stages: int = 3, swap: bool = False, interpret: bool = False):
  """`(x @ w[layer].astype(x.dtype)) * scale[layer]` in x.dtype, accumulated in f32.

  x: [M, K] activations; w: [L, K, N] int8 or float8_e4m3fn; scale: [L, N]; layer: an int
  scalar, usually traced (a scan or fori_loop step). Block sizes are upper bounds, shrunk to
  powers of two that fit the shape (Triton tiles are powers of two). `split_k=0` picks the
  smallest power of two that gives TARGET_PROGRAMS programs without shrinking the K tile
  below block_k. `swap` computes w^T x^T, which puts the widened weight tile in the dot's
  register (A) operand.
  """
  M, K = x.shape
  L, K_w, N = w.shape
  if K_w != K or scale.shape != (L, N):
    raise ValueError(f"shapes do not match: x {x.shape}, w {w.shape}, scale {scale.shape}")
  if N < MIN_TILE:
    raise ValueError(f"N={N} is below the smallest tile ({MIN_TILE})")
  if 2**31 <= w.size and w.size * w.dtype.itemsize <= 2**32:
    # Pallas-Triton indexes arrays of at most 4 GiB with 32-bit offsets, which Triton's
    # pointer arithmetic sign-extends: offsets at and beyond 2^31 would wrap.
    raise ValueError(f"w {w.shape} has 2-4 Gi elements; Pallas-Triton's 32-bit offsets "
                     "would overflow: hold fewer layers per stack")
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
  out_dtype = jnp.float32 if partial else x.dtype
  kernel = functools.partial(_kernel, n=N, bm=bm, bn=bn, bk=bk, steps=K // split_k // bk,
                             swap=swap)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((split_k, m_blocks * bm, N), out_dtype),
      grid=(m_blocks, n_blocks, split_k),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="stacked_int8_matmul",
  )(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), x_pad, w, scale)
  out = out.sum(0).astype(x.dtype) if partial else out[0]
  return out[:M]


def _kernel(layer_ref, x_ref, w_ref, scale_ref, out_ref, *, n, bm, bn, bk, steps, swap):
  """One [bm, bn] output tile over one K split; refs are whole arrays, indexed here.

  Where bn does not divide N, the last N tile is shifted left to end at N rather than
  masked: it recomputes a few columns of its neighbour (identical values) and never reads
  past the layer. Where it does, the plain `j * bn` start lets Triton prove the tile's
  alignment and vectorise its loads.
  """
  i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  layer = layer_ref[0]
  rows = pl.ds(i * bm, bm)
  cols = pl.ds(j * bn if n % bn == 0 else jnp.minimum(j * bn, n - bn), bn)

  def step(t, acc):
    ks = pl.ds((s * steps + t) * bk, bk)
    x = x_ref[rows, ks]
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
