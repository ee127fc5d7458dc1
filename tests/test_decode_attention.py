"""The fused decode-attention kernel against a plain softmax, in the Pallas interpreter.

On CPU the kernel runs interpreted: the same program, grid and indexing as on a GPU, so the
arithmetic, the masking by row length, the splits and the layer indexing are checked here;
its speed is measured on GPUs (docs/benchmarks.md).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpp.axes import PP, TP
from jaxpp.errors import JaxppError
from jaxpp.model import decode_attention as da
from jaxpp.model import kv_cache, llama
from jaxpp.model.attention_choice import Kernels
from jaxpp.model.config import LlamaConfig
from jaxpp.parallel.layout import Layout
from jaxpp.parallel.mesh import make_mesh
from jaxpp.parallel.pipeline import Pipeline


def _inputs(seed, lead, B, K, G, S, H):
  rng = np.random.default_rng(seed)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return (draw(B, K, G, H) * H ** -0.5, draw(*lead, B, K, S, H), draw(*lead, B, K, S, H),
          draw(B, K, H), draw(B, K, H))


def _reference(q, keys, values, k_new, v_new, lengths, firsts=None, softcap=0.0):
  """One softmax over a row's cached positions firsts[b] .. lengths[b] - 1 and its new
  token, each score capped at +-softcap with tanh first when softcap > 0."""
  S = keys.shape[2]
  firsts = jnp.zeros_like(lengths) if firsts is None else firsts
  cap = (lambda s: s) if not softcap else (lambda s: softcap * jnp.tanh(s / softcap))
  s = cap(jnp.einsum("BKGH,BKSH->BKGS", q, keys))
  at = jnp.arange(S)
  s = jnp.where((at < lengths[:, None, None, None]) & (at >= firsts[:, None, None, None]), s,
                -jnp.inf)
  s_new = cap(jnp.einsum("BKGH,BKH->BKG", q, k_new))[..., None]
  p = jax.nn.softmax(jnp.concatenate([s, s_new], -1), -1)
  return jnp.einsum("BKGS,BKSH->BKGH", p[..., :S], values) + p[..., S:] * v_new[:, :, None]


@pytest.mark.parametrize("splits", [0, 1, 2, 3])
@pytest.mark.parametrize("G", [1, 4, 6])
def test_kernel_matches_softmax(splits, G):
  """Rows of every length kind: none cached, one, a partial block, whole blocks, full."""
  lead, B, K, S, H = (2, 3), 6, 2, 256, 16
  q, keys, values, k_new, v_new = _inputs(G, lead, B, K, G, S, H)
  lengths = jnp.asarray([0, 1, 70, 128, 255, 256], jnp.int32)
  run = jax.jit(lambda a, b: da.combine(*da.attend_cached(
      q, keys, values, (a, b), lengths, splits=splits), q, k_new, v_new, jnp.float32))
  for at in ((0, 0), (1, 2)):
    got = run(*map(jnp.int32, at))  # traced lead indices, as a layer loop passes them
    want = _reference(q, keys[at], values[at], k_new, v_new, lengths)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_kernel_reads_nothing_past_a_rows_length():
  """Junk past a row's length (finished rows, padding) never reaches the output."""
  q, keys, values, k_new, v_new = _inputs(0, (1,), 4, 2, 4, 128, 16)
  lengths = jnp.asarray([3, 64, 100, 0], jnp.int32)
  beyond = (jnp.arange(128) >= lengths[:, None])[None, :, None, :, None]
  poisoned = [jnp.where(beyond, jnp.nan, a) for a in (keys, values)]
  got = da.combine(*da.attend_cached(q, *poisoned, (0,), lengths), q, k_new, v_new,
                   jnp.float32)
  want = _reference(q, keys[0], values[0], k_new, v_new, lengths)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [0, 1, 3])
def test_a_sliding_window_reads_only_its_positions(splits):
  """Rows whose window starts mid-block, on a block edge, blocks in, or at the row's end
  (only the new token): the same numbers as the masked softmax, junk before the window
  (NaN) never read."""
  q, keys, values, k_new, v_new = _inputs(3, (2,), 5, 2, 4, 256, 16)
  lengths = jnp.asarray([70, 128, 255, 200, 9], jnp.int32)
  firsts = jnp.asarray([5, 64, 130, 199, 9], jnp.int32)
  before = (jnp.arange(256) < firsts[:, None] // 64 * 64)[None, :, None, :, None]
  poisoned = [jnp.where(before, jnp.nan, a) for a in (keys, values)]
  got = da.combine(*da.attend_cached(q, *poisoned, (1,), lengths, firsts, splits=splits), q,
                   k_new, v_new, jnp.float32)
  want = _reference(q, keys[1], values[1], k_new, v_new, lengths, firsts)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_soft_capped_scores_match_the_capped_softmax():
  """Gemma 2's cap (cap * tanh(s / cap)) on every score, cached and new, in the kernel and
  in combine: the same as capping a plain softmax's scores."""
  q, keys, values, k_new, v_new = _inputs(4, (1,), 3, 2, 4, 128, 16)
  q = q * 8  # scores large enough for a cap of 2 to bite
  lengths = jnp.asarray([5, 64, 100], jnp.int32)
  got = da.combine(*da.attend_cached(q, keys, values, (0,), lengths, softcap=2.0), q, k_new,
                   v_new, jnp.float32, softcap=2.0)
  capped = lambda s: 2.0 * jnp.tanh(s / 2.0)
  S = keys.shape[3]
  s = capped(jnp.einsum("BKGH,BKSH->BKGS", q, keys[0]))
  s = jnp.where(jnp.arange(S) < lengths[:, None, None, None], s, -jnp.inf)
  s_new = capped(jnp.einsum("BKGH,BKH->BKG", q, k_new))[..., None]
  p = jax.nn.softmax(jnp.concatenate([s, s_new], -1), -1)
  want = jnp.einsum("BKGS,BKSH->BKGH", p[..., :S], values[0]) + p[..., S:] * v_new[:, :, None]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  plain = da.combine(*da.attend_cached(q, keys, values, (0,), lengths), q, k_new, v_new,
                     jnp.float32)
  assert not np.allclose(plain, want, atol=1e-3)  # the cap changes the answer


def test_kernel_refuses_a_cache_it_cannot_tile():
  q, keys, values, _, _ = _inputs(0, (1,), 2, 2, 4, 96, 16)
  with pytest.raises(ValueError, match="S=96 are not a multiple of block_s=64"):
    da.attend_cached(q, keys, values, (0,), jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="does not match the cache"):
    da.attend_cached(q[:, :1], keys, values, (0,), jnp.zeros((2,), jnp.int32))


def test_auto_splits_fill_the_gpu_only_when_rows_are_few():
  assert da.auto_splits(512, 18) == 1  # 64 rows x 8 kv heads: enough programs
  assert da.auto_splits(256, 18) == 2
  assert da.auto_splits(128, 64) == 4  # 16 rows at 4,096 positions
  assert da.auto_splits(8, 64) == da.MAX_SPLITS
  assert da.auto_splits(8, 2) == 2  # never more splits than position blocks


def test_kernel_splits_over_tp_without_gathering_the_cache():
  """Under a mesh whose 'tp' is automatic, each tp device runs the kernel on its own kv
  heads: same numbers as one device, and no collective moves the cache."""
  mesh = make_mesh(pp=2, tp=4)
  lead, B, K, G, S, H = (2, 3), 3, 4, 2, 128, 16
  q, keys, values, k_new, v_new = _inputs(1, lead, B, K, G, S, H)
  lengths = jnp.asarray([5, 128, 60], jnp.int32)
  put = lambda a, spec: jax.device_put(jnp.stack([a, a]), NamedSharding(mesh, spec))
  kv_spec = P(PP, *(None,) * (len(lead) + 1), TP)

  def stage(q, keys, values, lengths):
    out = da.attend(q[0], keys[0], values[0], (jnp.int32(1), jnp.int32(2)), lengths)
    return jax.tree.map(lambda a: a[None], out)

  run = jax.jit(jax.shard_map(stage, mesh=mesh, in_specs=(P(PP), P(PP), P(PP), P()),
                              out_specs=P(PP), axis_names={PP}, check_vma=False))
  args = (put(q, P(PP, None, TP)), put(keys, kv_spec), put(values, kv_spec), lengths)
  got = run(*args)
  want = da.attend_cached(q, keys, values, (1, 2), lengths)
  for g, w in zip(got, want):  # both stages hold the same inputs
    for stage_out in g:
      np.testing.assert_allclose(stage_out, w, rtol=1e-6, atol=1e-6)
  hlo = run.lower(*args).compile().as_text()
  assert not [l for l in hlo.splitlines() if "all-gather" in l or "all-to-all" in l]


def _paged(seed, keys, values, BS, lengths, firsts=None):
  """The dense cache [*lead, B, K, S, H] as a pool [*lead, NB, K, BS, H] and tables [B, S/BS]:
  each row's blocks at shuffled, non-contiguous pool blocks; block 0 (NaN) belongs to no row
  and is what every table entry outside a row's [firsts, lengths) window names."""
  *lead, B, K, S, H = keys.shape
  nblk = S // BS
  ids = 1 + np.random.default_rng(seed).permutation(B * nblk).reshape(B, nblk)
  firsts = np.zeros_like(lengths) if firsts is None else np.asarray(firsts)
  j = np.arange(nblk)
  used = (j < -(-np.asarray(lengths)[:, None] // BS)) & (j >= firsts[:, None] // BS)
  tables = jnp.asarray(np.where(used, ids, 0), jnp.int32)

  def pool(dense):
    blocks = np.asarray(dense).reshape(*lead, B, K, nblk, BS, H)
    blocks = np.moveaxis(blocks, -3, -4).reshape(*lead, B * nblk, K, BS, H)
    out = np.full((*lead, 1 + B * nblk, K, BS, H), np.nan, np.float32)
    out[..., ids.ravel(), :, :, :] = blocks
    return jnp.asarray(out)

  return pool(keys), pool(values), tables


def _outside(lengths, firsts, S):
  """[1, B, 1, S, 1]: positions outside each row's [firsts, lengths) window."""
  at = jnp.arange(S)
  return ((at >= lengths[:, None]) | (at < firsts[:, None]))[None, :, None, :, None]


@pytest.mark.parametrize("splits", [0, 1, 3])
@pytest.mark.parametrize("G", [1, 4])
def test_paged_kernel_matches_the_dense_kernel_and_softmax(splits, G):
  """Rows none cached, one, a partial block, whole blocks and full, their blocks shuffled
  through the pool: the dense kernel's pieces (same block size) and the plain softmax."""
  lead, B, K, S, H, BS = (2, 3), 6, 2, 64, 16, 16
  q, keys, values, k_new, v_new = _inputs(10 + G, lead, B, K, G, S, H)
  lengths = jnp.asarray([0, 1, 20, 32, 63, 64], jnp.int32)
  pk, pv, tables = _paged(G, keys, values, BS, lengths)
  assert len(set(np.asarray(tables[-1]))) == 4 and 0 in np.asarray(tables[0])
  paged = jax.jit(lambda a, b: da.attend_cached(
      q, pk, pv, (a, b), lengths, tables=tables, splits=splits))
  dense = jax.jit(lambda a, b: da.attend_cached(
      q, keys, values, (a, b), lengths, splits=splits, block_s=BS))
  for at in ((0, 0), (1, 2)):
    got = paged(*map(jnp.int32, at))  # traced lead indices, as a layer loop passes them
    for g, w in zip(got, dense(*map(jnp.int32, at))):
      np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    want = _reference(q, keys[at], values[at], k_new, v_new, lengths)
    np.testing.assert_allclose(da.combine(*got, q, k_new, v_new, jnp.float32), want,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [0, 1, 3])
def test_paged_kernel_reads_no_junk(splits):
  """NaN at a row's positions past its length and before its window's start (mid-block, on
  a block edge, blocks in, at the row's end), and in the block its unused table entries
  name: none of it reaches the output, and each split's pieces are the dense kernel's (a
  split that read a block outside the window would have a denominator, not 0)."""
  lead, B, K, G, S, H, BS = (2,), 5, 2, 4, 128, 16, 16
  q, keys, values, k_new, v_new = _inputs(5, lead, B, K, G, S, H)
  lengths = jnp.asarray([70, 128, 100, 9, 33], jnp.int32)
  firsts = jnp.asarray([5, 64, 37, 9, 0], jnp.int32)
  junk = _outside(lengths, firsts, S)
  poisoned = [jnp.where(junk, jnp.nan, a) for a in (keys, values)]
  pk, pv, tables = _paged(1, *poisoned, BS, lengths, firsts)
  pieces = da.attend_cached(q, pk, pv, (1,), lengths, firsts, tables=tables, splits=splits)
  dense = da.attend_cached(q, *poisoned, (1,), lengths, firsts, splits=splits, block_s=BS)
  for g, w in zip(pieces, dense):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
  got = da.combine(*pieces, q, k_new, v_new, jnp.float32)
  want = _reference(q, keys[1], values[1], k_new, v_new, lengths, firsts)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_paged_soft_capped_scores_match_the_capped_softmax():
  q, keys, values, k_new, v_new = _inputs(6, (1,), 3, 2, 4, 64, 16)
  q = q * 8  # scores large enough for a cap of 2 to bite
  lengths = jnp.asarray([5, 64, 40], jnp.int32)
  pk, pv, tables = _paged(2, keys, values, 32, lengths)
  pieces = lambda cap: da.attend_cached(q, pk, pv, (0,), lengths, tables=tables, softcap=cap)
  got = da.combine(*pieces(2.0), q, k_new, v_new, jnp.float32, softcap=2.0)
  want = _reference(q, keys[0], values[0], k_new, v_new, lengths, softcap=2.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  plain = da.combine(*pieces(0.0), q, k_new, v_new, jnp.float32)
  assert not np.allclose(plain, want, atol=1e-3)  # the cap changes the answer


@pytest.mark.parametrize("BS", [8, 12, 24])
def test_paged_kernel_refuses_blocks_it_cannot_tile(BS):
  q = jnp.zeros((2, 2, 4, 16))
  pool = jnp.zeros((1, 5, 2, BS, 16))
  with pytest.raises(ValueError, match=f"^pool blocks of BS={BS} positions: .* >= 16$"):
    da.attend_cached(q, pool, pool, (0,), jnp.zeros((2,), jnp.int32),
                     tables=jnp.zeros((2, 3), jnp.int32))


def test_paged_kernel_refuses_tables_of_other_rows():
  q, pool = jnp.zeros((2, 2, 4, 16)), jnp.zeros((1, 5, 2, 16, 16))
  lengths = jnp.zeros((2,), jnp.int32)
  for tables in (jnp.zeros((3, 4), jnp.int32), jnp.zeros((2,), jnp.int32)):
    with pytest.raises(ValueError, match=r"^tables \(.*\) do not match q's B=2 rows$"):
      da.attend_cached(q, pool, pool, (0,), lengths, tables=tables)
  with pytest.raises(ValueError, match="does not match the cache"):  # a pool of 1 kv head
    da.attend_cached(q, pool[:, :, :1], pool[:, :, :1], (0,), lengths,
                     tables=jnp.zeros((2, 4), jnp.int32))


def test_paged_kernel_splits_over_tp_without_gathering_the_pool():
  """As the dense kernel: under an automatic 'tp' each device runs the paged kernel on its
  own kv heads of the pool (the tables whole on each), and no collective moves the pool."""
  mesh = make_mesh(pp=2, tp=4)
  lead, B, K, G, S, H, BS = (2, 3), 3, 4, 2, 64, 16, 16
  q, keys, values, _, _ = _inputs(7, lead, B, K, G, S, H)
  lengths = jnp.asarray([5, 64, 40], jnp.int32)
  pk, pv, tables = _paged(3, keys, values, BS, lengths)
  put = lambda a, spec: jax.device_put(jnp.stack([a, a]), NamedSharding(mesh, spec))
  kv_spec = P(PP, *(None,) * (len(lead) + 1), TP)  # the pool's K axis

  def stage(q, keys, values, lengths, tables):
    out = da.attend(q[0], keys[0], values[0], (jnp.int32(1), jnp.int32(2)), lengths,
                    tables=tables)
    return jax.tree.map(lambda a: a[None], out)

  run = jax.jit(jax.shard_map(stage, mesh=mesh, in_specs=(P(PP), P(PP), P(PP), P(), P()),
                              out_specs=P(PP), axis_names={PP}, check_vma=False))
  args = (put(q, P(PP, None, TP)), put(pk, kv_spec), put(pv, kv_spec), lengths, tables)
  got = run(*args)
  want = da.attend_cached(q, keys, values, (1, 2), lengths, block_s=BS)
  for g, w in zip(got, want):  # both stages hold the same inputs
    for stage_out in g:
      np.testing.assert_allclose(stage_out, w, rtol=1e-6, atol=1e-6)
  hlo = run.lower(*args).compile().as_text()
  assert "paged_decode_attention" in str(jax.make_jaxpr(run)(*args))
  assert not [l for l in hlo.splitlines() if "all-gather" in l or "all-to-all" in l]


def test_pipeline_resolves_attention():
  c = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16)
  pipe = lambda attention, tp=1: Pipeline.build(c, Layout(1, tp), attention=attention)
  # CPU: einsums for auto (the kernels would run as their stand-ins); kernel: every stand-in
  assert pipe("auto").kernels == Kernels()
  assert pipe("kernel").kernels == pipe("kernel", tp=2).kernels == Kernels(True, True, False,
                                                                           weights8=True)
  assert pipe("xla").kernels == Kernels()
  with pytest.raises(JaxppError, match="attention='flash' is not one of auto, kernel, xla"):
    pipe("flash")
  odd = dataclasses.replace(c, head_dim=12)
  with pytest.raises(JaxppError, match="needs head_dim a power of two >= 16, not 12"):
    Pipeline.build(odd, Layout(), attention="kernel")


def test_model_attention_takes_the_kernel_only_for_one_token_steps():
  """llama.attend: decode steps (T = 1) over a cache go to the kernel, anything else to
  XLA; both give the same numbers."""
  lead, B, K, G, S, H = (2,), 3, 2, 2, 128, 16
  q, keys, values, k_new, v_new = _inputs(2, lead, B, K, G, S, H)
  start = jnp.asarray([4, 0, 127], jnp.int32)
  cache = kv_cache.LayerCache(keys, values, (1,))

  def attend(q, k, v, fused):
    T = q.shape[1]
    positions = start[:, None] + jnp.arange(T)
    return llama.attend(q, k, v, positions, start, cache, jnp.float32,
                        kernels=Kernels(decode=fused))

  one = (q[:, None], k_new[:, None], v_new[:, None])
  two = tuple(jnp.concatenate([a, a], axis=1) for a in one)
  kernels = lambda args, fused: str(jax.make_jaxpr(
      lambda *a: attend(*a, fused))(*args)).count("pallas_call")
  assert (kernels(one, True), kernels(one, False), kernels(two, True)) == (1, 0, 0)
  np.testing.assert_allclose(attend(*one, True), attend(*one, False), rtol=1e-5, atol=1e-5)
