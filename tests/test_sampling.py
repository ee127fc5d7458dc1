"""Sampling: reproducibility per (seed, position), batch independence, and distributions.

The distribution tests draw many tokens from one logit row by varying the position (each
position gives an independent key), then compare empirical frequencies with the expected
filtered softmax; the tolerance is several standard deviations at N draws.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpp.errors import JaxppError
from jaxpp.model.sampling import SamplingParams, sample

N = 20000
TOL = 0.02  # > 5 sigma for a frequency estimate from N draws (sigma <= 0.5 / sqrt(N)).

_sample = jax.jit(sample, static_argnames="do_sample")


def _draw(logits_row, n=N, **kw):
  """Draws n tokens for one logit row at positions 0..n-1; returns token frequencies."""
  logits = jnp.broadcast_to(jnp.asarray(logits_row, jnp.float32), (n, len(logits_row)))
  params = SamplingParams.make(n, **kw)
  toks = _sample(logits, jnp.arange(n, dtype=jnp.int32), params, do_sample=True)
  return np.bincount(np.asarray(toks), minlength=len(logits_row)) / n


def _softmax(x):
  e = np.exp(np.asarray(x, np.float64) - np.max(x))
  return e / e.sum()


LOGITS = np.array([2.0, 1.0, 0.0, -1.0, -2.0], np.float32)


def test_same_seed_same_tokens_different_seed_different():
  logits = jax.random.normal(jax.random.key(0), (64, 1000))
  pos = jnp.arange(64, dtype=jnp.int32) + 7
  a = _sample(logits, pos, SamplingParams.make(64, temperature=1.0, seed=3), do_sample=True)
  b = _sample(logits, pos, SamplingParams.make(64, temperature=1.0, seed=3), do_sample=True)
  c = _sample(logits, pos, SamplingParams.make(64, temperature=1.0, seed=4), do_sample=True)
  np.testing.assert_array_equal(a, b)
  assert np.mean(np.asarray(a) != np.asarray(c)) > 0.8


def test_row_independent_of_batch_composition():
  key = jax.random.key(1)
  logits = jax.random.normal(key, (4, 50))
  params = SamplingParams.make(
    4, temperature=[1.0, 0.7, 0.0, 1.5], top_k=[0, 5, 0, 10], top_p=[1.0, 0.9, 1.0, 0.8],
    seed=[11, 22, 33, 44],
  )
  pos = jnp.array([3, 9, 4, 100], jnp.int32)
  full = np.asarray(_sample(logits, pos, params, do_sample=True))
  # Each row alone.
  for i in range(4):
    one = jax.tree.map(lambda x: x[i : i + 1], params)
    tok = _sample(logits[i : i + 1], pos[i : i + 1], one, do_sample=True)
    assert int(tok[0]) == full[i]
  # Reversed, and mixed with unrelated rows.
  perm = jnp.array([3, 2, 1, 0])
  rev = _sample(logits[perm], pos[perm], jax.tree.map(lambda x: x[perm], params), do_sample=True)
  np.testing.assert_array_equal(np.asarray(rev), full[::-1])
  other = jax.random.normal(jax.random.key(2), (3, 50))
  mixed_logits = jnp.concatenate([other, logits[1:2]])
  mixed_params = jax.tree.map(
    lambda o, p: jnp.concatenate([o, p[1:2]]), SamplingParams.make(3, temperature=2.0, seed=5),
    params,
  )
  mixed_pos = jnp.array([0, 1, 2, 9], jnp.int32)
  assert int(_sample(mixed_logits, mixed_pos, mixed_params, do_sample=True)[3]) == full[1]


def test_top_k_1_is_greedy():
  logits = jax.random.normal(jax.random.key(3), (64, 100))
  pos = jnp.arange(64, dtype=jnp.int32)
  params = SamplingParams.make(64, temperature=1.0, top_k=1, seed=list(range(64)))
  np.testing.assert_array_equal(
    _sample(logits, pos, params, do_sample=True), jnp.argmax(logits, axis=-1)
  )


def test_greedy_is_argmax_and_zero_temperature_rows_are_greedy():
  logits = jax.random.normal(jax.random.key(4), (16, 30))
  logits = logits.at[0, 5].set(9.0).at[0, 2].set(9.0)  # tie -> lowest id
  pos = jnp.zeros(16, jnp.int32)
  params = SamplingParams.make(16)
  assert not params.needs_sampling()
  want = np.asarray(jnp.argmax(logits, axis=-1))
  assert want[0] == 2
  np.testing.assert_array_equal(_sample(logits, pos, params, do_sample=False), want)
  mixed = SamplingParams.make(16, temperature=[0.0, 1.0] * 8, seed=1)
  assert mixed.needs_sampling()
  got = np.asarray(_sample(logits, pos, mixed, do_sample=True))
  np.testing.assert_array_equal(got[::2], want[::2])


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_temperature_distribution(temp):
  freq = _draw(LOGITS, temperature=temp, seed=7)
  np.testing.assert_allclose(freq, _softmax(LOGITS / temp), atol=TOL)


def test_temperature_is_not_ignored():
  freq = _draw(LOGITS, temperature=2.0, seed=8)
  assert np.max(np.abs(freq - _softmax(LOGITS))) > 0.15


def test_top_p_nucleus():
  # Sorted probs 0.35, 0.30, 0.20, 0.10, 0.05: the mass before rank 2 is 0.65 >= 0.6, so the
  # nucleus is {id 1, id 3}. Ids are shuffled so the test also checks the unsorting.
  probs = np.array([0.20, 0.35, 0.05, 0.30, 0.10])
  freq = _draw(np.log(probs), temperature=1.0, top_p=0.6, seed=9)
  assert freq[0] == freq[2] == freq[4] == 0.0
  np.testing.assert_allclose(freq[[1, 3]], [0.35 / 0.65, 0.30 / 0.65], atol=TOL)


def test_top_p_keeps_top_token():
  freq = _draw(np.log([0.1, 0.6, 0.3]), n=500, temperature=1.0, top_p=0.01, seed=1)
  np.testing.assert_array_equal(freq, [0.0, 1.0, 0.0])


def test_top_k_2():
  freq = _draw(LOGITS[::-1], temperature=1.0, top_k=2, seed=10)
  assert freq[0] == freq[1] == freq[2] == 0.0
  np.testing.assert_allclose(freq[3:], _softmax(LOGITS[:2])[::-1], atol=TOL)


def test_make_per_sequence_and_validation():
  p = SamplingParams.make(3, temperature=0.5, top_k=[0, 1, 2], seed=[1, 2, -1])
  assert p.temperature.shape == (3,) and p.temperature.dtype == jnp.float32
  assert p.top_k.tolist() == [0, 1, 2] and p.top_p.tolist() == [1.0] * 3
  assert p.seed.dtype == jnp.uint32 and int(p.seed[2]) == 2**32 - 1
  with pytest.raises(JaxppError):
    SamplingParams.make(3, seed=[1, 2])
  with pytest.raises(JaxppError):
    SamplingParams.make(2, temperature=-1.0)
  with pytest.raises(JaxppError):
    SamplingParams.make(2, top_p=0.0)
  with pytest.raises(JaxppError):
    SamplingParams.make(2, top_k=-3)


def test_min_p():
  """Probabilities 0.35, 0.30, 0.20, 0.10, 0.05 (shuffled) with min_p=0.5: only tokens at
  least half as likely as the likeliest (0.175) survive, renormalised."""
  probs = np.array([0.20, 0.35, 0.05, 0.30, 0.10])
  freq = _draw(np.log(probs), temperature=1.0, min_p=0.5, seed=11)
  kept = probs * (probs >= 0.5 * probs.max())
  np.testing.assert_allclose(freq, kept / kept.sum(), atol=TOL)
  assert freq[2] == freq[4] == 0.0
  np.testing.assert_array_equal(  # min_p=1 keeps the likeliest alone; 0 is off
      _draw(np.log(probs), n=500, temperature=1.0, min_p=1.0, seed=2), [0, 1, 0, 0, 0])
  np.testing.assert_allclose(_draw(np.log(probs), temperature=1.0, min_p=0.0, seed=3), probs,
                             atol=TOL)
  with pytest.raises(JaxppError, match=r"min_p must be in \[0, 1\]"):
    SamplingParams.make(2, min_p=1.5)
