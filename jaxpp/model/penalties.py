"""Repetition, presence and frequency penalties: logits pushed away from tokens already seen.

The meanings are the ones vLLM and transformers give them, so a request moved between
runners keeps its meaning:

- `repetition_penalty` r (transformers' RepetitionPenaltyLogitsProcessor, after CTRL): a
  token that occurs in the prompt or the output has a positive logit divided by r and a
  negative one multiplied by r; 1 is off, r > 1 discourages repeats.
- `presence_penalty` p and `frequency_penalty` f (OpenAI's): a token the output holds c > 0
  times loses p + f * c from its logit; the prompt does not count. 0 is off; negative
  values encourage repeats.

They apply to the raw logits, before temperature and the filters, and to greedy rows as to
sampled ones; the reported logprobs stay the model's own (`sampling.token_logprobs`).

What a row has seen is counted on the device from token ids, by scatter into [B, V]: a
prefill counts each packed prompt's own tokens, a decode call the slot's history (passed
from the host, `History`) plus the tokens it generated itself. A row with every penalty off
gets its logits back bit for bit (x / 1, x * 1, x - 0), whatever its counts say, so rows
that ask for nothing need no history.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpp.errors import JaxppError

# OpenAI's (and vLLM's) range for presence_penalty and frequency_penalty.
ADDITIVE_RANGE = (-2.0, 2.0)


class Seen(NamedTuple):
  """Per row: which tokens it has seen anywhere, and how often its output holds each."""

  anywhere: jax.Array  # bool[B, V]: in the prompt or the output
  output: jax.Array  # f32[B, V]: occurrences in the output


class History(NamedTuple):
  """Each decode slot's tokens so far, passed to a decode call that applies penalties.

  tokens i32[M, b, H]: the prompt, then the generated tokens, position by position, up to
  and including the slot's last sampled token (at the decode state's `lengths`); later
  positions are ignored. prompt_lens i32[M, b]: where the output starts.
  """

  tokens: jax.Array
  prompt_lens: jax.Array


def check(repetition, presence, frequency) -> None:
  """One-line errors for out-of-range values (host arrays, before anything runs)."""
  if not np.all(np.isfinite(repetition) & (repetition > 0)):
    raise JaxppError(f"repetition_penalty must be finite and > 0 (1 = off), got "
                     f"{np.asarray(repetition).tolist()}")
  lo, hi = ADDITIVE_RANGE
  for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
    if not np.all((value >= lo) & (value <= hi)):
      raise JaxppError(f"{name} must be in [{lo:g}, {hi:g}] (0 = off), got "
                       f"{np.asarray(value).tolist()}")


def is_on(repetition, presence, frequency) -> np.ndarray:
  """bool per row: some penalty is not off."""
  return ((np.asarray(repetition) != 1) | (np.asarray(presence) != 0)
          | (np.asarray(frequency) != 0))


def count(tokens: jax.Array, rows: jax.Array, is_output: jax.Array, batch: int,
          vocab: int) -> Seen:
  """`Seen` of `batch` rows from flat token ids i32[N] (< 0: no token), the row each
  belongs to i32[N] (< 0: none) and whether it is output bool[N]."""
  valid = (tokens >= 0) & (rows >= 0)
  rows = jnp.where(valid, rows, batch)  # out of range: dropped by the scatter
  tokens = jnp.where(valid, tokens, 0)
  anywhere = jnp.zeros((batch, vocab), bool).at[rows, tokens].set(True, mode="drop")
  output = jnp.zeros((batch, vocab), jnp.float32).at[rows, tokens].add(
      is_output.astype(jnp.float32), mode="drop")
  return Seen(anywhere, output)


def of_packed(tokens: jax.Array, segments: jax.Array, q: int, vocab: int) -> Seen:
  """`Seen` of each packed prompt (prompt i of row r of micro-batch j is row (j*p + r)*q + i)
  from a prefill's tokens and segments i32[M, p, T]: its prompt, no output yet."""
  M, p, T = tokens.shape
  row = (jnp.arange(M * p, dtype=jnp.int32).reshape(M, p, 1) * q + segments)
  row = jnp.where(segments >= 0, row, -1)
  return count(tokens.reshape(-1), row.reshape(-1), jnp.zeros((M * p * T,), bool), M * p * q,
               vocab)


def of_history(tokens: jax.Array, last: jax.Array, prompt_lens: jax.Array,
               generated: jax.Array, vocab: int) -> Seen:
  """`Seen` of b decode rows from their history i32[b, H] (positions up to `last` i32[b]
  count, output from `prompt_lens` i32[b] on) and tokens generated since i32[b, k]
  (< 0: none)."""
  b, H = tokens.shape
  pos = jnp.arange(H, dtype=jnp.int32)[None, :]
  tokens = jnp.where(pos <= last[:, None], tokens, -1)
  every = jnp.concatenate([tokens, generated.astype(jnp.int32)], axis=1)
  output = jnp.concatenate([pos >= prompt_lens[:, None],
                            jnp.ones(generated.shape, bool)], axis=1)
  rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], every.shape)
  return count(every.reshape(-1), rows.reshape(-1), output.reshape(-1), b, vocab)


def apply(logits: jax.Array, seen: Seen, repetition: jax.Array, presence: jax.Array,
          frequency: jax.Array) -> jax.Array:
  """f32[B, V] logits with each row's penalties (f32[B] each) applied."""
  rep = repetition.astype(jnp.float32)[:, None]
  logits = jnp.where(seen.anywhere, jnp.where(logits > 0, logits / rep, logits * rep), logits)
  held = (seen.output > 0).astype(jnp.float32)
  return (logits - frequency.astype(jnp.float32)[:, None] * seen.output
          - presence.astype(jnp.float32)[:, None] * held)
