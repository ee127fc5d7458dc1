"""Per-row decode state and how one sampled token moves it on.

Every executor keeps the same four arrays per row (the pipeline's ring, the single-device
reference, the GSPMD baseline) and moves them with the same two functions, so "when does a
row stop" has one answer: at a stop id, after its token budget, or when its context is full.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp


class DecodeState(NamedTuple):
  """Per-row decode state; rows are independent sequences."""

  tokens: jnp.ndarray  # i32[B]: last sampled token, not yet in the cache
  lengths: jnp.ndarray  # i32[B]: tokens in the cache == position of `tokens`
  remaining: jnp.ndarray  # i32[B]: tokens this row may still generate
  done: jnp.ndarray  # bool[B]: finished (stop token, length limit or cache full)


def is_stop(tokens: jnp.ndarray, eos_ids: tuple[int, ...]) -> jnp.ndarray:
  """bool[B]: the token is one of the stop ids."""
  if not eos_ids:
    return jnp.zeros(tokens.shape, bool)
  return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


def advance(state: DecodeState, new_tokens: jnp.ndarray, eos_ids: tuple[int, ...],
            max_len: int) -> tuple[DecodeState, jnp.ndarray]:
  """Moves every live row one token on; returns the new state and what each row emitted.

  Finished rows emit -1 and keep their length, so their work (they still ride along in
  the batch) never touches a live row's state. Shared by every executor.
  """
  live = ~state.done
  emitted = jnp.where(live, new_tokens, -1)
  lengths = state.lengths + live.astype(jnp.int32)
  remaining = state.remaining - live.astype(jnp.int32)
  done = state.done | is_stop(emitted, eos_ids) | (remaining <= 0) | (lengths >= max_len)
  return DecodeState(jnp.where(live, new_tokens, state.tokens), lengths, remaining,
                     done), emitted


def start_state(first: jnp.ndarray, lengths: jnp.ndarray, max_new: jnp.ndarray,
                eos_ids: tuple[int, ...], max_len: int) -> DecodeState:
  """State after prefill sampled `first` at position `lengths` (one token generated).

  `remaining` is capped at max_len - lengths, so a row stops at max_len even though the
  cache holds a few positions more (kv_cache.cache_positions) and decode only knows those.
  """
  remaining = jnp.minimum(max_new - 1, max_len - lengths)  # <= 0 once lengths >= max_len
  done = is_stop(first, eos_ids) | (remaining <= 0)
  return DecodeState(first, lengths, remaining, done)
