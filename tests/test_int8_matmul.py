"""The stacked 8-bit Pallas matmul (interpreted on CPU) against `quant.einsum` on one layer.

Bounds: with f32 activations both sides compute the same products in f32 and differ only
in summation order (and where the scale is applied), a relative error of a few K * 2^-24;
1e-5 of the output's scale leaves room for that and nothing else: a wrong layer, tile,
split or scale is off by O(1). With bf16 activations `quant.einsum` rounds to bf16 twice
(product, then scaled product) and the kernel once, so they may differ by about two bf16
steps (2^-8 relative); the bound is 2^-6 of the output's scale.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpp.model import quant
from jaxpp.model.int8_matmul import stacked_matmul

matmul = functools.partial(stacked_matmul, interpret=True)


def _stack(L: int, K: int, N: int, mode: str = "int8", dtype=jnp.float32, seed: int = 0):
  """A quantised [L, K, N] stack and its [L, N] scales, each layer distinct (jitted: one
  compile rather than one per op keeps the tests fast)."""
  w = np.random.default_rng(seed).standard_normal((L, K, N), np.float32) * K ** -0.5
  return jax.jit(quant.quantize, static_argnums=(1, 2, 3))(w, mode, (1,), dtype)


def _rows(M: int, K: int, dtype=jnp.float32, seed: int = 1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((M, K), np.float32), dtype)


def _assert_close(got, want, rel: float):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=rel * np.max(np.abs(want)))


@pytest.mark.parametrize("M, K, N, layer, blocks", [
    (1, 128, 64, 0, dict(block_k=32)),  # one row, automatic split-K (4)
    (5, 96, 80, 2, dict(block_n=32, block_k=32, split_k=3)),  # N, K, split not powers of 2
    (20, 256, 48, 1, dict(block_m=16, swap=True)),  # two M blocks, swapped dot
    (16, 192, 160, 3, dict(block_n=64, split_k=2, swap=True)),
    (33, 64, 16, 1, dict(split_k=1)),  # M padded to 64, one N tile of 16
])
def test_matches_einsum_f32(M, K, N, layer, blocks):
  q, scale = _stack(4, K, N)
  x = _rows(M, K)
  want = quant.einsum("BD,DF->BF", x, q[layer], scale[layer])
  got = matmul(x, q, scale, jnp.int32(layer), **blocks)
  assert got.dtype == x.dtype
  _assert_close(got, want, 1e-5)


@pytest.mark.parametrize("split_k", [1, 4])
def test_matches_einsum_bf16(split_k):
  q, scale = _stack(3, 512, 192, dtype=jnp.bfloat16)
  x = _rows(8, 512, jnp.bfloat16)
  want = quant.einsum("BD,DF->BF", x, q[2], scale[2])
  got = matmul(x, q, scale, 2, split_k=split_k)
  assert got.dtype == jnp.bfloat16
  _assert_close(got, want, 2**-6)


def test_fp8_storage():
  q, scale = _stack(2, 128, 96, mode="fp8")
  x = _rows(3, 128)
  _assert_close(matmul(x, q, scale, 1, block_n=32), quant.einsum("BD,DF->BF", x, q[1], scale[1]),
                1e-5)


def test_traced_layer_in_fori_loop():
  """An MLP stream over the stacks with the layer index a loop variable, as a stage runs it."""
  L, D, F = 3, 64, 96
  q_in, s_in = _stack(L, D, F, seed=2)
  q_out, s_out = _stack(L, F, D, seed=3)
  x = _rows(4, D)

  def layer(l, x):
    h = jax.nn.silu(matmul(x, q_in, s_in, l, block_n=32))
    return matmul(h, q_out, s_out, l, block_k=32, split_k=3)

  got = jax.jit(lambda x: jax.lax.fori_loop(0, L, layer, x))(x)
  want = x
  for l in range(L):
    h = jax.nn.silu(quant.einsum("BD,DF->BF", want, q_in[l], s_in[l]))
    want = quant.einsum("BF,FD->BD", h, q_out[l], s_out[l])
  _assert_close(got, want, 1e-5)


@pytest.mark.parametrize("K, N, L, split_k", [
    (24, 32, 1, 1),  # K has no power-of-two tile >= 16
    (64, 8, 1, 1),  # N below the smallest tile
    (96, 32, 1, 5),  # split_k does not divide K
    (2**14, 2**14, 8, 1),  # 2 Gi elements: 32-bit offsets would wrap
])
def test_rejects(K, N, L, split_k):
  args = (jax.ShapeDtypeStruct((4, K), jnp.float32), jax.ShapeDtypeStruct((L, K, N), jnp.int8),
          jax.ShapeDtypeStruct((L, N), jnp.float32), 0)
  with pytest.raises(ValueError):
    jax.eval_shape(functools.partial(matmul, split_k=split_k), *args)


def test_tile_names_parse_and_bad_fields_are_named():
  from jaxpp.model.int8_matmul import tiles_of
  assert tiles_of("bm64_bn128_bk256_s0_w8_st3_t") == dict(
      block_m=64, block_n=128, block_k=256, split_k=0, num_warps=8, num_stages=3, swap=True)
  with pytest.raises(ValueError, match="bad field 'bq64' in tile name 'bn64_bq64'"):
    tiles_of("bn64_bq64")
