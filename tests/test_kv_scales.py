"""The fp8 KV cache's per-token scales: what a write stores, and every reader (the decode
kernel dense and paged, the prefix kernel, XLA's gather) widening it alike.

A cached key or value is stored as x / scale in e4m3 with one scale per (token, kv head),
its largest magnitude over the head dim / 448 (kv_cache.py). The kernels run in the Pallas
interpreter here; each is checked against the plain softmax over `kv_cache.widen`'s keys
and values, with tokens whose magnitudes span six decades (an unscaled e4m3 cache clips
above 448 and loses its mantissa below 2^-6).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpp.model import decode_attention as da
from jaxpp.model import kv_cache
from jaxpp.model import prefix_attention as pa
from tests import test_decode_attention as dense_tests
from tests import test_prefix_attention as prefix_tests

FP8 = kv_cache.FP8


def _magnitudes(seed, shape, decades=3):
  """10**U(-decades, decades) per token: [*shape[:-1], 1] to scale tokens [*shape] (rows
  over H)."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(10.0 ** rng.uniform(-decades, decades, shape[:-1] + (1,)), jnp.float32)


def _spread(seed, shape):
  """Normal draws [..., H], each token scaled by `_magnitudes`."""
  normal = np.random.default_rng(seed + 1000).standard_normal(shape)
  return jnp.asarray(normal, jnp.float32) * _magnitudes(seed, shape)


def test_each_token_keeps_e4m3s_relative_step_at_any_magnitude():
  x = _spread(0, (4, 8, 64)).at[0, 0].set(0.0)  # an all-zero token as well
  stored, scale = kv_cache.to_cache(x, FP8)
  assert stored.dtype == FP8 and scale.shape == x.shape[:-1]
  assert scale.dtype == kv_cache.SCALE_DTYPE
  back = np.asarray(kv_cache.widen(stored, scale, jnp.float32))
  amax = np.abs(np.asarray(x)).max(-1, keepdims=True)
  assert np.all(np.isfinite(back)) and np.all(back[0, 0] == 0)
  # e4m3: 3 mantissa bits, so at most half a step of 2^-3 relative below the token's max;
  # the bf16 scale's rounding may push the max a hair past 448, which the clip takes
  err = np.abs(back - np.asarray(x))
  assert np.all(err <= amax * (2.0 ** -4 + 2.0 ** -8))
  big = np.abs(np.asarray(x)) > 448  # where an unscaled cache would have clipped
  assert big.any() and np.all(err[big] <= np.abs(np.asarray(x))[big] * 2.0 ** -4)


def _fp8_cache(seed, shape):
  """(keys, values) in e4m3 [*shape], their scales [*shape[:-1]], and both widened to f32."""
  (k, ks), (v, vs) = (kv_cache.to_cache(_spread(seed + i, shape), FP8) for i in range(2))
  return (k, v), (ks, vs), tuple(kv_cache.widen(a, s, jnp.float32)
                                 for a, s in ((k, ks), (v, vs)))


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_kernel_reads_the_scaled_cache_dense_and_paged(splits):
  lead, B, K, G, S, H, BS = (2,), 5, 2, 4, 64, 16, 16
  q, _, _, k_new, v_new = dense_tests._inputs(1, lead, B, K, G, S, H)
  (keys, values), scales, wide = _fp8_cache(2, (*lead, B, K, S, H))
  lengths = jnp.asarray([0, 1, 20, 48, 64], jnp.int32)
  want = dense_tests._reference(q, wide[0][1], wide[1][1], k_new, v_new, lengths)
  run = jax.jit(lambda layer, keys, values, scales, tables=None: da.combine(*da.attend_cached(
      q, keys, values, (layer,), lengths, tables=tables, scales=scales, splits=splits,
      block_s=BS), q, k_new, v_new, jnp.float32))
  got = run(jnp.int32(1), keys, values, scales)  # a traced layer, as the layer loop's
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # the same blocks through shuffled pool blocks; the block no row owns is NaN in the
  # keys, the values and both scales, and must not reach the output
  pk, pv, tables = dense_tests._paged(3, *(a.astype(jnp.float32) for a in (keys, values)),
                                      BS, lengths)
  ps = tuple(dense_tests._paged(3, s[..., None].astype(jnp.float32),
                                s[..., None].astype(jnp.float32), BS, lengths)[0][..., 0]
             for s in scales)
  got = run(jnp.int32(1), pk.astype(FP8), pv.astype(FP8),
            tuple(s.astype(kv_cache.SCALE_DTYPE) for s in ps), tables)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_prefix_kernel_reads_the_scaled_pool():
  B, T, K, G, H, BS = 3, 16, 2, 4, 16, 16
  starts = np.asarray([0, 20, 37])
  q, k_new, v_new = prefix_tests._inputs(4, B, T, K, G, H)
  keys, values, tables = prefix_tests._pool(5, (2,), K, H, BS, starts, nblk=3)
  # the pool's finite entries given per-token magnitudes (two decades: f32 sums of values
  # near 10^3 would round past the comparison's 1e-5), stored as fp8 with scales; its NaN
  # blocks and positions stay NaN in the entries and the scales
  junk = jnp.isnan(keys[..., 0])
  scaled = [kv_cache.to_cache(jnp.nan_to_num(a) * _magnitudes(6 + i, a.shape, 1), FP8)
            for i, a in enumerate((keys, values))]
  (pk, ks), (pv, vs) = ((a, jnp.where(junk, jnp.nan, s).astype(kv_cache.SCALE_DTYPE))
                        for a, s in scaled)
  wide = [kv_cache.widen(a, s, jnp.float32) for a, s in ((pk, ks), (pv, vs))]
  lengths = jnp.asarray([16, 9, 16], jnp.int32)
  starts = jnp.asarray(starts, jnp.int32)
  got = pa.attend_paged(q, k_new, v_new, pk, pv, (jnp.int32(1),), tables, starts, lengths,
                        scales=(ks, vs))
  want = prefix_tests._reference(q, k_new, v_new, *wide, (1,), tables, starts, lengths)
  prefix_tests._compare(got, want, lengths)


def test_xla_path_gathers_and_widens_the_scaled_pool():
  """`kv_cache.layer_keys` (the XLA reference's read) of a pool equals the dense rows the
  blocks came from, widened."""
  lead, B, K, S, H, BS = (2,), 3, 2, 32, 16, 16
  (keys, values), scales, wide = _fp8_cache(7, (*lead, B, K, S, H))
  lengths = jnp.full((B,), S, jnp.int32)
  pk, pv, tables = dense_tests._paged(8, *(a.astype(jnp.float32) for a in (keys, values)),
                                      BS, lengths)
  ps = tuple(dense_tests._paged(8, s[..., None].astype(jnp.float32),
                                s[..., None].astype(jnp.float32), BS, lengths)[0][..., 0]
             .astype(kv_cache.SCALE_DTYPE) for s in scales)
  view = kv_cache.LayerCache(pk.astype(FP8), pv.astype(FP8), (1,), tables, ps)
  for got, want in zip(kv_cache.layer_keys(view, jnp.float32), wide):
    np.testing.assert_array_equal(got, want[1])
  dense = kv_cache.LayerCache(keys, values, (1,), None, scales)
  for got, want in zip(kv_cache.layer_keys(dense, jnp.float32), wide):
    np.testing.assert_array_equal(got, want[1])
