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

from jaxpp.model import packed8, quant
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


@pytest.mark.parametrize("mode, N, blocks", [
    ("int8", 96, dict(block_n=64)),  # N not a multiple of the tile: the last tile shifted
    ("fp8", 160, dict(block_n=32, split_k=2, swap=True)),
    ("int8", 64, dict(block_n=16)),  # eight pairs a tile
])
def test_packed_stack_gives_the_unpacked_product(mode, N, blocks):
  """Stacks stored two values to a 16-bit element (packed8.py, as the model stores its
  blocks) unpack in the kernel's registers to the same columns: the product equals the
  unpacked stack's on every layer (a swapped byte order or a pair off by one tile would not)."""
  q, scale = _stack(3, 128, N, mode=mode)
  packed = packed8.pack(q)
  assert packed.shape == (3, 128, N // 2) and packed8.is_packed(packed)
  x = _rows(5, 128)
  for layer in range(3):
    _assert_close(matmul(x, packed, scale, jnp.int32(layer), **blocks),
                  quant.einsum("BD,DF->BF", x, q[layer], scale[layer]), 1e-5)
    _assert_close(quant.einsum("BD,DF->BF", x, packed[layer], scale[layer]),
                  quant.einsum("BD,DF->BF", x, q[layer], scale[layer]), 0)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_pairs_round_trip_in_xla_and_in_registers(mode):
  """pack, unpack (XLA's bitcast) and unpack_tile (the kernel's shifts and join) agree on
  every 8-bit value, the extremes and negative zero included; an odd axis is refused."""
  if mode == "int8":
    q = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8).reshape(16, 16)
  else:
    bits = jnp.arange(256, dtype=jnp.int32).astype(jnp.uint8)
    q = jax.lax.bitcast_convert_type(bits, jnp.float8_e4m3fn).reshape(16, 16)
  as_bits = lambda a: np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint8))
  packed = packed8.pack(q)
  assert packed.dtype == (jnp.int16 if mode == "int8" else jnp.uint16)
  assert (as_bits(packed8.unpack(packed)) == as_bits(q)).all()
  assert (as_bits(jax.jit(packed8.unpack_tile)(packed)) == as_bits(q)).all()
  with pytest.raises(ValueError, match="last axis must be even"):
    packed8.pack(q[:, :15])


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
    (2**14, 2**14, 8, 1),  # 2 Gi unpacked elements: 32-bit offsets would wrap
])
def test_rejects(K, N, L, split_k):
  args = (jax.ShapeDtypeStruct((4, K), jnp.float32), jax.ShapeDtypeStruct((L, K, N), jnp.int8),
          jax.ShapeDtypeStruct((L, N), jnp.float32), 0)
  with pytest.raises(ValueError):
    jax.eval_shape(functools.partial(matmul, split_k=split_k), *args)


def test_a_packed_stack_past_2_gib_is_taken():
  """The same 2 Gi values packed two to an element: 1 Gi 16-bit elements, which 32-bit
  offsets reach (traced only: nothing of that size is allocated)."""
  K = N = 2**14
  args = (jax.ShapeDtypeStruct((4, K), jnp.float32),
          jax.ShapeDtypeStruct((8, K, N // 2), jnp.int16),
          jax.ShapeDtypeStruct((8, N), jnp.float32), 0)
  assert jax.eval_shape(matmul, *args).shape == (4, N)


def test_tile_names_parse_and_bad_fields_are_named():
  from jaxpp.model.int8_matmul import tiles_of
  assert tiles_of("bm64_bn128_bk256_s0_w8_st3_t") == dict(
      block_m=64, block_n=128, block_k=256, split_k=0, num_warps=8, num_stages=3, swap=True)
  with pytest.raises(ValueError, match="bad field 'bq64' in tile name 'bn64_bq64'"):
    tiles_of("bn64_bq64")


@pytest.mark.parametrize("name, shape, in_dims", [
    ("wqkv", (32, 4, 4, 16), 1),  # [D, K, G + 2, H]: kv heads split (column-parallel)
    ("w_gate_up", (32, 2, 64), 1),  # [D, 2, F]: F split, not the flat output's outer axis
    ("wo", (8, 16, 32), 2),  # [N, H, D]: query heads split (row-parallel: a sum over tp)
    ("w_down", (64, 32), 1)])  # [F, D]
def test_projections_split_over_tp_without_gathering_the_weights(name, shape, in_dims,
                                                                 monkeypatch):
  """Inside a stage program whose 'tp' is automatic, each tp device runs the kernel on its
  own shard of the stage's [v, Lc, ...] stack: the layer's dequantised product, the
  kernel given a quarter of the layer, and no collective gathers a weight (a row-parallel
  projection adds one all-reduce). On a GPU the kernel is a custom call GSPMD cannot
  split; interpreted on CPU it is plain HLO, so the shard shape is what tells here."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from jaxpp.axes import PP, TP
  from jaxpp.model import int8_matmul
  from jaxpp.model import params as params_lib
  from jaxpp.parallel.mesh import make_mesh

  mesh = make_mesh(pp=2, tp=4)
  tp_axis = params_lib.TP_AXIS[name]
  seen = []
  traced = int8_matmul.stacked_matmul
  monkeypatch.setattr(int8_matmul, "stacked_matmul",
                      lambda x, w, *a, **k: seen.append(w.shape) or traced(x, w, *a, **k))
  w = np.random.default_rng(4).standard_normal((1, 2) + shape, np.float32)
  q, s = jax.jit(quant.quantize, static_argnums=(1, 2, 3))(
      w, "int8", tuple(range(2, 2 + in_dims)), jnp.float32)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 1) + shape[:in_dims]),
                  jnp.float32)
  split = lambda at: P(PP, *(None,) * at, TP)
  put = lambda a, spec: jax.device_put(jnp.stack([a, a]), NamedSharding(mesh, spec))
  column = tp_axis >= in_dims
  args = (x, put(q, split(2 + tp_axis)),
          put(s, split(2 + tp_axis - in_dims) if column else P(PP)))

  def stage(x, q, s):
    view = int8_matmul.LayerWeight(q[0], s[0], (jnp.int32(0), jnp.int32(1)), in_dims,
                                   tp_axis)
    return int8_matmul.project(x, view)[None]

  run = jax.jit(jax.shard_map(stage, mesh=mesh, in_specs=(P(), P(PP), P(PP)),
                              out_specs=P(PP), axis_names={PP}, check_vma=False))
  got = run(*args)
  want = jnp.tensordot(x, q[0, 1].astype(jnp.float32), in_dims) * s[0, 1]
  for stage_out in got:  # both stages hold the same inputs
    _assert_close(stage_out, want, 1e-5)
  assert seen == [(2, np.prod(shape[:in_dims]) // (1 if column else 4),
                   np.prod(shape[in_dims:]) // (4 if column else 1))]
  hlo = run.lower(*args).compile().as_text()
  assert not [l for l in hlo.splitlines() if "all-gather" in l or "all-to-all" in l]
  assert any("all-reduce" in l for l in hlo.splitlines()) == (not column)


def test_an_axis_tp_does_not_divide_runs_whole():
  """A head of 18 vocab columns on tp=4 (an LM head whose vocab tp does not divide): the
  kernel takes it whole on each device rather than a shard_map that cannot split it."""
  from jax.sharding import PartitionSpec as P

  from jaxpp.axes import PP
  from jaxpp.model import int8_matmul
  from jaxpp.parallel.mesh import make_mesh

  mesh = make_mesh(pp=2, tp=4)
  q, s = _stack(1, 32, 18, seed=6)
  x = _rows(3, 32)[:, None]  # [B, T, D]

  def stage(x, q, s):
    head = int8_matmul.LayerWeight(q[0], s[0], (0,), 1, tp_axis=1)
    return int8_matmul.project(x, head, out_dtype=jnp.float32)[None]

  run = jax.jit(jax.shard_map(stage, mesh=mesh, in_specs=(P(), P(PP), P(PP)),
                              out_specs=P(PP), axis_names={PP}, check_vma=False))
  got = run(x, jnp.stack([q, q]), jnp.stack([s, s]))
  assert got.dtype == jnp.float32
  _assert_close(got[0], quant.einsum("BTD,DV->BTV", x, q[0], s[0]), 1e-5)


def test_layer_index_is_row_major_over_traced_indices():
  """The flat layer index the three Pallas kernels take (`layer_index.flat`), traced."""
  from jaxpp.model import layer_index
  lead = (2, 3, 4)
  flat = jax.jit(lambda a, b, c: layer_index.flat((a, b, c), lead))
  for idx in np.ndindex(*lead):
    assert int(flat(*idx)) == np.ravel_multi_index(idx, lead)
  with pytest.raises(ValueError, match=r"^2 indices for 3 lead axes \(2, 3, 4\)$"):
    layer_index.flat((0, 1), lead)
