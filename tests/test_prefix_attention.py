"""The prefix-attention kernel against a plain softmax over [prefix | new], interpreted.

On CPU the kernel runs in the Pallas interpreter: the same program, grid, table reads and
masks as on a GPU, so the arithmetic, the prefix walk through shuffled pool blocks, the
causal diagonal, padding, windows and soft caps are checked here; its speed is measured
on GPUs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpp.axes import PP, TP
from jaxpp.model import prefix_attention as pa
from jaxpp.parallel.mesh import make_mesh


def _inputs(seed, B, T, K, G, H):
  """q [B, T, K, G, H] scaled by H**-0.5, k_new and v_new [B, T, K, H]."""
  rng = np.random.default_rng(seed)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return draw(B, T, K, G, H) * H ** -0.5, draw(B, T, K, H), draw(B, T, K, H)


def _pool(seed, lead, K, H, BS, starts, nblk, skip=None):
  """A pool [*lead, NB, K, BS, H] and tables [B, nblk]: each row's prefix blocks at
  shuffled pool blocks, random in every layer up to the row's starts and NaN past it;
  block 0 (NaN) is in no row and is what every other table entry names, including the
  entries below `skip` [B] (blocks the kernel must not read)."""
  rng = np.random.default_rng(seed)
  starts = np.asarray(starts)
  need = -(-starts // BS)
  NB = 2 + int(need.sum())  # one spare block, NaN, that no table names
  ids = 1 + rng.permutation(NB - 1)
  keys, values = (rng.standard_normal((*lead, NB, K, BS, H)).astype(np.float32)
                  for _ in range(2))
  for pool in (keys, values):
    pool[..., 0, :, :, :] = np.nan
    pool[..., ids[-1], :, :, :] = np.nan
  tables = np.zeros((len(starts), nblk), np.int32)
  used = 0
  for b, (start, n) in enumerate(zip(starts, need)):
    tables[b, :n] = ids[used:used + n]
    used += n
    if n:  # the row's last block past its prefix: another request's, or never written
      for pool in (keys, values):
        pool[..., tables[b, n - 1], :, start - (n - 1) * BS:, :] = np.nan
    if skip is not None:
      tables[b, :skip[b]] = 0
  return jnp.asarray(keys), jnp.asarray(values), jnp.asarray(tables)


def _poison_padding(lengths, *xs):
  """NaN at each row's padding tokens (t >= lengths[b]) of each x [B, T, ...]."""
  pad = lambda x: (jnp.arange(x.shape[1]) >= lengths[:, None]).reshape(
      *x.shape[:2], *(1,) * (x.ndim - 2))
  return [jnp.where(pad(x), jnp.nan, x) for x in xs]


def _reference(q, k_new, v_new, keys, values, at, tables, starts, lengths, window=0,
               softcap=0.0):
  """Gathers each row's prefix through its table into [B, K, S, H], then one masked f32
  softmax over [prefix | new] -> [B, T, K, G, H], meaningful at real tokens only."""
  B, T, K, _, H = q.shape
  dense = lambda pool: jnp.moveaxis(pool[at][tables], 2, 1).reshape(B, K, -1, H)
  kc, vc = dense(keys), dense(values)
  S = kc.shape[2]
  pos = starts[:, None] + jnp.arange(T)  # [B, T] each new token's position
  p, j = jnp.arange(S), jnp.arange(T)
  cached = p[None, None, :] < starts[:, None, None]  # [B, T, S]
  new = (j[None, None, :] <= j[None, :, None]) & (j[None, None, :] < lengths[:, None, None])
  if window:
    cached &= pos[:, :, None] - p[None, None, :] < window
    new &= j[None, :, None] - j[None, None, :] < window
  cap = (lambda s: s) if not softcap else (lambda s: softcap * jnp.tanh(s / softcap))
  s_c = jnp.where(cached[:, None, None], cap(jnp.einsum("BTKGH,BKSH->BKGTS", q, kc)),
                  -jnp.inf)
  s_n = jnp.where(new[:, None, None], cap(jnp.einsum("BTKGH,BUKH->BKGTU", q, k_new)),
                  -jnp.inf)
  probs = jax.nn.softmax(jnp.concatenate([s_c, s_n], -1), -1)
  vc = jnp.where(jnp.any(cached, axis=1)[:, None, :, None], vc, 0)  # NaN junk: weight 0
  v_new = jnp.where((j < lengths[:, None])[:, :, None, None], v_new, 0)
  return (jnp.einsum("BKGTS,BKSH->BTKGH", probs[..., :S], vc) +
          jnp.einsum("BKGTU,BUKH->BTKGH", probs[..., S:], v_new))


def _compare(got, want, lengths, tol=1e-5):
  """Real tokens match the reference; padding tokens are zeros."""
  real = np.arange(got.shape[1])[None, :] < np.asarray(lengths)[:, None]  # [B, T]
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_allclose(got[real], want[real], rtol=tol, atol=tol)
  assert np.all(got[~real] == 0)


@pytest.mark.parametrize("blocks", [(0, 0), (16, 32)])
@pytest.mark.parametrize("G", [1, 3, 4, 8])
def test_kernel_matches_the_softmax_over_prefix_and_new_tokens(G, blocks):
  """Prefixes of none, two whole blocks, a partial block, under one block and several;
  rows of T, fewer and no real tokens; T = 40 not a multiple of the tiles (padded
  inside); G padded (3) and cut over two programs (8); NaN in block 0, the spare block,
  past each prefix and in the padding tokens' keys and values; the layer picked by
  traced indices under jit."""
  lead, B, T, K, H, BS = (2, 3), 5, 40, 2, 16, 16
  block_q, block_k = blocks
  q, k_new, v_new = _inputs(G, B, T, K, G, H)
  starts = jnp.asarray([0, 32, 37, 5, 50], jnp.int32)
  lengths = jnp.asarray([40, 33, 1, 0, 17], jnp.int32)
  keys, values, tables = _pool(G, lead, K, H, BS, starts, nblk=5)
  k_new, v_new = _poison_padding(lengths, k_new, v_new)
  assert 0 in np.asarray(tables[1]) and len(set(np.asarray(tables[4]))) == 5
  run = jax.jit(lambda a, b: pa.attend_paged(q, k_new, v_new, keys, values, (a, b), tables,
                                             starts, lengths, block_q=block_q,
                                             block_k=block_k))
  for at in ((0, 0), (1, 2)):
    got = run(*map(jnp.int32, at))  # traced lead indices, as a layer loop passes them
    assert got.shape == q.shape and got.dtype == q.dtype
    want = _reference(q, k_new, v_new, keys, values, at, tables, starts, lengths)
    _compare(got, want, lengths)


@pytest.mark.parametrize("window,traced", [(8, False), (20, False), (20, True), (0, True)])
def test_sliding_windows_read_only_their_blocks(window, traced):
  """Windows that start in the prefix mid-block, on a block edge or among the new tokens;
  the table entries of blocks wholly before the first token's window name the NaN block,
  so a kernel that read them would fail. A traced 0 means no window."""
  lead, B, T, K, G, H, BS = (2,), 4, 24, 2, 2, 16, 16
  q, k_new, v_new = _inputs(7, B, T, K, G, H)
  starts = jnp.asarray([70, 37, 0, 16], jnp.int32)
  lengths = jnp.asarray([24, 20, 24, 3], jnp.int32)
  skip = np.maximum(np.asarray(starts) - window + 1, 0) // BS if window else None
  keys, values, tables = _pool(3, lead, K, H, BS, starts, nblk=6, skip=skip)
  k_new, v_new = _poison_padding(lengths, k_new, v_new)
  if window:
    assert np.asarray(tables)[0, 0] == 0  # something to skip
  run = jax.jit(lambda at, w: pa.attend_paged(
      q, k_new, v_new, keys, values, (at,), tables, starts, lengths,
      window=w if traced else window, block_q=16, block_k=16))
  got = run(jnp.int32(1), jnp.int32(window))
  want = _reference(q, k_new, v_new, keys, values, (1,), tables, starts, lengths, window)
  _compare(got, want, lengths)
  if window:  # the window changes the answer
    whole = _reference(q, k_new, v_new, keys, values, (1,), tables, starts, lengths)
    assert not np.allclose(np.asarray(got)[0], np.nan_to_num(np.asarray(whole)[0]),
                           atol=1e-3)


def test_soft_capped_scores_match_the_capped_softmax():
  """Gemma 2's cap on every score, cached and new, before the mask."""
  lead, B, T, K, G, H, BS = (1,), 3, 20, 2, 4, 16, 16
  q, k_new, v_new = _inputs(4, B, T, K, G, H)
  q = q * 8  # scores large enough for a cap of 2 to bite
  starts = jnp.asarray([0, 21, 40], jnp.int32)
  lengths = jnp.asarray([20, 9, 15], jnp.int32)
  keys, values, tables = _pool(4, lead, K, H, BS, starts, nblk=3)
  run = lambda cap: pa.attend_paged(q, k_new, v_new, keys, values, (0,), tables, starts,
                                    lengths, softcap=cap)
  got = run(2.0)
  want = _reference(q, k_new, v_new, keys, values, (0,), tables, starts, lengths,
                    softcap=2.0)
  _compare(got, want, lengths)
  assert not np.allclose(run(0.0), got, atol=1e-3)  # the cap changes the answer


@pytest.mark.parametrize("nblk", [0, 2])
def test_fresh_prompts_are_plain_causal_attention(nblk):
  """starts = 0 everywhere: the pool (NaN) is never read and each real token gets causal
  attention over the new tokens, as jax's own dot_product_attention computes it."""
  B, T, K, G, H = 3, 48, 2, 4, 32
  q, k_new, v_new = _inputs(5, B, T, K, G, H)
  pool = jnp.full((2, 3, K, 16, H), jnp.nan)
  tables = jnp.zeros((B, nblk), jnp.int32)
  starts = jnp.zeros((B,), jnp.int32)
  lengths = jnp.asarray([48, 31, 48], jnp.int32)
  got = pa.attend_paged(q, k_new, v_new, pool, pool, (1,), tables, starts, lengths)
  want = jax.nn.dot_product_attention(q.reshape(B, T, K * G, H), k_new, v_new, scale=1.0,
                                      is_causal=True, implementation="xla")
  _compare(got, want.reshape(q.shape), lengths)


def test_kernel_splits_over_tp_without_gathering_the_pool():
  """Under a mesh whose 'tp' is automatic, each tp device runs the kernel on its own kv
  heads of q, the new keys and the pool (tables, starts, lengths whole on each): the same
  numbers as one device, and no collective moves the pool."""
  mesh = make_mesh(pp=2, tp=4)
  lead, B, T, K, G, H, BS = (2, 3), 3, 20, 4, 2, 16, 16
  q, k_new, v_new = _inputs(6, B, T, K, G, H)
  starts = jnp.asarray([5, 0, 40], jnp.int32)
  lengths = jnp.asarray([20, 11, 7], jnp.int32)
  keys, values, tables = _pool(6, lead, K, H, BS, starts, nblk=3)
  put = lambda a, spec: jax.device_put(jnp.stack([a, a]), NamedSharding(mesh, spec))
  new_spec, pool_spec = P(PP, None, None, TP), P(PP, *(None,) * (len(lead) + 1), TP)

  def stage(q, kn, vn, keys, values, tables, starts, lengths, window):
    out = pa.attend(q[0], kn[0], vn[0], keys[0], values[0], (jnp.int32(1), jnp.int32(2)),
                    tables, starts, lengths, window=window)
    return out[None]

  run = jax.jit(jax.shard_map(stage, mesh=mesh, in_specs=(P(PP),) * 5 + (P(),) * 4,
                              out_specs=P(PP), axis_names={PP}, check_vma=False))
  args = (put(q, new_spec), put(k_new, new_spec), put(v_new, new_spec),
          put(keys, pool_spec), put(values, pool_spec), tables, starts, lengths,
          jnp.int32(9))  # a traced window goes to every device whole
  got = run(*args)
  want = pa.attend_paged(q, k_new, v_new, keys, values, (1, 2), tables, starts, lengths,
                         window=9)
  for stage_out in got:  # both stages hold the same inputs
    np.testing.assert_allclose(stage_out, want, rtol=1e-6, atol=1e-6)
  assert "prefix_attention" in str(jax.make_jaxpr(run)(*args))
  hlo = run.lower(*args).compile().as_text()
  assert not [l for l in hlo.splitlines() if "all-gather" in l or "all-to-all" in l]


def test_kernel_refuses_shapes_it_cannot_take():
  B, T, K, G, H = 2, 16, 2, 4, 16
  pool, n = jnp.zeros((1, 5, K, 16, H)), jnp.zeros((B,), jnp.int32)
  good = {"q": jnp.zeros((B, T, K, G, H)), "k_new": jnp.zeros((B, T, K, H)),
          "v_new": jnp.zeros((B, T, K, H)), "keys": pool, "values": pool, "at": (0,),
          "tables": jnp.zeros((B, 3), jnp.int32), "starts": n, "lengths": n}
  odd_pool = jnp.zeros((1, 5, K, 24, H))
  odd_head = {"q": jnp.zeros((B, T, K, G, 12)), "k_new": jnp.zeros((B, T, K, 12)),
              "v_new": jnp.zeros((B, T, K, 12)), "keys": jnp.zeros((1, 5, K, 16, 12)),
              "values": jnp.zeros((1, 5, K, 16, 12))}
  cases = [
      ({"tables": jnp.zeros((3, 3), jnp.int32)}, r"^tables \(3, 3\) do not match q's B=2"),
      ({"tables": jnp.zeros((B,), jnp.int32)}, r"^tables \(2,\) do not match"),
      ({"keys": odd_pool, "values": odd_pool}, r"^pool blocks of BS=24 positions: .* >= 16$"),
      (odd_head, r"^head_dim=12: .* >= 16$"),
      ({"lengths": jnp.zeros((3,), jnp.int32)}, r"^lengths \(3,\) is not one entry per row"),
      ({"starts": jnp.zeros((B, 1), jnp.int32)}, r"^starts \(2, 1\) is not one entry"),
      ({"k_new": jnp.zeros((B, T + 1, K, H))}, r"^k_new \(2, 17, 2, 16\) and v_new"),
      ({"keys": pool[:, :, :1], "values": pool[:, :, :1]}, r"^q .* does not match the pool"),
      ({"at": (0, 0)}, r"^the pool \(1, 5, 2, 16, 16\) .* with 2 lead indices$"),
      ({"block_q": 24}, r"^block_q=24: .* >= 16$"),
      ({"block_g": 8}, r"^block_g=8 does not divide G=4 rounded up to a power of two$"),
      ({"block_g": 3}, r"^block_g=3 does not divide G=4"),
      ({"window": -1}, r"^window=-1 is negative"),
  ]
  for change, message in cases:
    with pytest.raises(ValueError, match=message):
      pa.attend_paged(**{**good, **change})
  assert pa.supports(128) and not pa.supports(96) and not pa.supports(8)
