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
from jaxpp.model import llama
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


def _reference(q, keys, values, k_new, v_new, lengths, firsts=None):
  """One softmax over a row's cached positions firsts[b] .. lengths[b] - 1 and its new
  token."""
  S = keys.shape[2]
  firsts = jnp.zeros_like(lengths) if firsts is None else firsts
  s = jnp.einsum("BKGH,BKSH->BKGS", q, keys)
  at = jnp.arange(S)
  s = jnp.where((at < lengths[:, None, None, None]) & (at >= firsts[:, None, None, None]), s,
                -jnp.inf)
  s_new = jnp.einsum("BKGH,BKH->BKG", q, k_new)[..., None]
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


def test_pipeline_resolves_attention():
  c = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16)
  pipe = lambda attention, tp=1: Pipeline.build(c, Layout(1, tp), attention=attention)
  # CPU: einsums for auto (the kernels would run as their stand-ins); kernel: both stand-ins
  assert pipe("auto").kernels == Kernels()
  assert pipe("kernel").kernels == pipe("kernel", tp=2).kernels == Kernels(True, True, False)
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
  cache = llama.LayerCache(keys, values, (1,))

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
