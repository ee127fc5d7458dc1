"""Per-sequence token sampling, pure and jit-friendly, for the decode loop's last stage.

Every knob is an array with one entry per sequence, so one compiled program serves a batch in
which each request has its own temperature, top-k, top-p and seed; changing a request's
settings never recompiles. The random key of a row is derived only from that request's seed
and the position of the token being generated, so a request's output does not depend on which
other requests share the batch, on its slot, or on the mesh layout — the engine may reorder
and regroup requests freely and still reproduce the same text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpp.errors import JaxppError
from jaxpp.model import penalties


def _per_seq(name: str, value, batch: int, dtype) -> np.ndarray:
  """Broadcasts a scalar, or checks a per-sequence sequence, to shape [batch]."""
  arr = np.asarray(value)
  if arr.ndim == 0:
    arr = np.full((batch,), arr)
  if arr.shape != (batch,):
    raise JaxppError(f"sampling {name} has shape {arr.shape}, expected a scalar or ({batch},)")
  if dtype == np.uint32:
    # Seeds are bit patterns: wrap negative or oversized integers instead of failing.
    return (arr.astype(np.int64) & 0xFFFFFFFF).astype(np.uint32)
  return arr.astype(dtype)


class SamplingParams(NamedTuple):
  """Sampling settings, one entry per sequence (a pytree of arrays, so it can enter jit).

  temperature: f32[B], 0 means greedy for that row.
  top_k: i32[B], 0 means off.
  top_p: f32[B], 1.0 means off.
  seed: u32[B], a request's own seed.
  min_p: f32[B], 0.0 means off; else tokens less likely than min_p times the likeliest are cut.
  repetition_penalty, presence_penalty, frequency_penalty: f32[B], 1 / 0 / 0 mean off
  (`penalties.py`).
  """

  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  seed: jax.Array
  min_p: jax.Array
  repetition_penalty: jax.Array
  presence_penalty: jax.Array
  frequency_penalty: jax.Array

  @classmethod
  def make(cls, batch: int, **knobs) -> SamplingParams:
    """Builds params from scalars (shared by all rows) or per-sequence sequences, checked
    by `checked` (the fields' names and defaults are its keyword arguments)."""
    return cls(*map(jnp.asarray, cls.checked(batch, **knobs)))

  @staticmethod
  def checked(
    batch: int,
    temperature: float | Sequence[float] = 0.0,
    top_k: int | Sequence[int] = 0,
    top_p: float | Sequence[float] = 1.0,
    seed: int | Sequence[int] = 0,
    min_p: float | Sequence[float] = 0.0,
    repetition_penalty: float | Sequence[float] = 1.0,
    presence_penalty: float | Sequence[float] = 0.0,
    frequency_penalty: float | Sequence[float] = 0.0,
  ) -> tuple[np.ndarray, ...]:
    """The fields as host arrays [batch], in field order, from scalars or per-sequence
    sequences.

    Validation happens here, on the host, because inside jit a bad value would silently
    produce garbage tokens rather than an error; a caller that only checks (the engine,
    once a request) makes no device arrays.
    """
    t = _per_seq("temperature", temperature, batch, np.float32)
    k = _per_seq("top_k", top_k, batch, np.int32)
    p = _per_seq("top_p", top_p, batch, np.float32)
    s = _per_seq("seed", seed, batch, np.uint32)
    m = _per_seq("min_p", min_p, batch, np.float32)
    pen = [_per_seq(name, value, batch, np.float32) for name, value in (
        ("repetition_penalty", repetition_penalty), ("presence_penalty", presence_penalty),
        ("frequency_penalty", frequency_penalty))]
    if not np.all(np.isfinite(t) & (t >= 0)):
      raise JaxppError(f"sampling temperature must be finite and >= 0, got {t.tolist()}")
    if np.any(k < 0):
      raise JaxppError(f"sampling top_k must be >= 0 (0 = off), got {k.tolist()}")
    if not np.all((p > 0) & (p <= 1)):
      raise JaxppError(f"sampling top_p must be in (0, 1] (1 = off), got {p.tolist()}")
    if not np.all((m >= 0) & (m <= 1)):
      raise JaxppError(f"sampling min_p must be in [0, 1] (0 = off), got {m.tolist()}")
    penalties.check(*pen)
    return t, k, p, s, m, *pen

  def needs_sampling(self) -> bool:
    """Host-side choice of `do_sample`: False when every row is greedy, so no sort is compiled."""
    return bool(np.any(np.asarray(self.temperature) > 0))

  def needs_penalties(self) -> bool:
    """Host-side: some row has a penalty on, so the programs count what rows have seen."""
    return bool(np.any(penalties.is_on(self.repetition_penalty, self.presence_penalty,
                                       self.frequency_penalty)))


def row_keys(seed: jax.Array, positions: jax.Array) -> jax.Array:
  """One key per row from (seed, position) only, so tokens do not depend on batch makeup."""
  return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(
    seed.astype(jnp.uint32), positions.astype(jnp.uint32)
  )


def _filtered_sorted_logits(logits, params: SamplingParams):
  """Temperature, top-k, top-p and min-p applied in rank order; returns (sorted ids, masked
  logits).

  One descending sort per row serves every filter: top-k is a mask on rank (k differs per
  row, so a static `lax.top_k` cannot be used), top-p a mask on the cumulative mass of the
  top-k-renormalised probabilities, and min-p a mask on each kept probability against the
  likeliest one's (rank 0). The stable sort keeps ties in id order.
  """
  vocab = logits.shape[-1]
  temp = params.temperature.astype(jnp.float32)
  safe_t = jnp.where(temp > 0, temp, 1.0)
  scaled = logits / safe_t[:, None]
  order = jnp.argsort(-scaled, axis=-1, stable=True)
  sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)

  rank = jnp.arange(vocab, dtype=jnp.int32)[None, :]
  k = params.top_k.astype(jnp.int32)[:, None]
  keep = (k <= 0) | (rank < k)
  sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)

  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  top_p = params.top_p.astype(jnp.float32)[:, None]
  # top_p >= 1 is "off" outright: rounding in the cumsum must not trim the far tail.
  keep = (mass_before < top_p) | (top_p >= 1.0) | (rank == 0)
  # min-p compares probabilities within a row, so the renormalisation cancels: the
  # top-k probabilities serve
  min_p = params.min_p.astype(jnp.float32)[:, None]
  keep &= (probs >= min_p * probs[:, :1]) | (rank == 0)
  sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
  return order, sorted_logits


def sample(
  logits: jax.Array,
  positions: jax.Array,
  params: SamplingParams,
  *,
  do_sample: bool,
) -> jax.Array:
  """Picks the next token per row: i32[B] from logits [B, V].

  `positions` i32[B] is the position of the token being generated; with the row's seed it
  fixes the random key. `do_sample` is static: when the host knows every row is greedy it
  passes False and the program is a plain argmax (ties -> lowest id), with no sort at all.
  When True, rows with temperature 0 are still greedy.
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if not do_sample:
    return greedy
  order, sorted_logits = _filtered_sorted_logits(logits, params)
  keys = row_keys(params.seed, positions)
  picked_rank = jax.vmap(jax.random.categorical)(keys, sorted_logits)
  sampled = jnp.take_along_axis(order, picked_rank[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jnp.where(params.temperature > 0, sampled, greedy)


MAX_TOP_LOGPROBS = 20  # alternatives a request may ask for (OpenAI's top_logprobs limit)


def token_logprobs(logits: jax.Array, tokens: jax.Array, top: int):
  """Each row's chosen-token logprob f32[B] and its `top` likeliest alternatives (ids
  i32[B, top], logprobs f32[B, top]), from the raw logits f32[B, V] that sampled `tokens`.

  Raw: before temperature and the filters, the model's own distribution (what OpenAI's API
  and vLLM report by default). `top` is static; 0 gives empty alternatives.
  """
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  chosen = jnp.take_along_axis(lp, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
  if top == 0:
    B = logits.shape[0]
    return chosen, jnp.zeros((B, 0), jnp.int32), jnp.zeros((B, 0), jnp.float32)
  top_lp, top_ids = jax.lax.top_k(lp, top)
  return chosen, top_ids.astype(jnp.int32), top_lp


def pick(logits: jax.Array, positions: jax.Array, params: SamplingParams, *, do_sample: bool,
         logprobs: int | None = None, seen: penalties.Seen | None = None):
  """The next token i32[B] from raw logits [B, V] -> (tokens, extras): with `seen`, the
  rows' penalties first (`penalties.py`); then `sample`; with `logprobs` (static) extras are
  `token_logprobs` of the raw logits (the model's distribution), else ()."""
  raw = logits.astype(jnp.float32)
  shaped = raw if seen is None else penalties.apply(
      raw, seen, params.repetition_penalty, params.presence_penalty, params.frequency_penalty)
  tokens = sample(shaped, positions, params, do_sample=do_sample)
  return tokens, (() if logprobs is None else token_logprobs(raw, tokens, logprobs))
