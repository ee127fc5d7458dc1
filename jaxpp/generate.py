"""Single-device prefill and decode: the reference every parallel layout must reproduce.

Two compiled programs. `prefill` runs right-padded prompts through every layer, fills the
KV cache and samples each row's first token. `decode_chunk` generates `k` tokens per row
inside one `lax.fori_loop`, so the host is visited once per chunk, not once per token (a
host loop of tiny per-token dispatches is launch-bound on GPUs).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxpp import sampling, xla_options
from jaxpp.model import llama
from jaxpp.model import params as params_lib
from jaxpp.model.config import LlamaConfig


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
  cache holds a few positions more (llama.cache_positions) and decode only knows those.
  """
  remaining = jnp.minimum(max_new - 1, max_len - lengths)  # <= 0 once lengths >= max_len
  done = is_stop(first, eos_ids) | (remaining <= 0)
  return DecodeState(first, lengths, remaining, done)


def _one_chunk(params):
  """The plain [L, ...] layer stack as the one chunk [1, L, ...] that run_blocks reads."""
  return jax.tree.map(lambda a: a[None], params["blocks"])


def _tp(*args, tp: int = 1, **kwargs) -> int:
  return tp


@xla_options.jit(tp_of=_tp, static_argnames=("config", "do_sample", "tp"),
                 donate_argnames=("cache",))
def prefill(config: LlamaConfig, params, cache, tokens, lengths, params_s, *, do_sample,
            tp: int = 1):
  """tokens i32[B, T] right-padded, lengths i32[B] -> (first tokens i32[B], cache).

  `tp`: devices the params are split over, which picks the XLA options (xla_options.py).
  """
  B, T = tokens.shape
  dtype = params_lib.activation_dtype(params)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  x = llama.embed(params, tokens, dtype)
  x, cache = llama.run_blocks(config, _one_chunk(params), x, positions,
                              jnp.zeros((B,), jnp.int32), cache, fresh=True)
  last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
  logits = llama.logits(config, params, last)[:, 0]
  return sampling.sample(logits, lengths, params_s, do_sample=do_sample), cache


@xla_options.jit(tp_of=_tp, static_argnames=("config", "steps", "do_sample", "eos_ids", "tp",
                                             "fused_decode"),
                 donate_argnames=("cache",))
def decode_chunk(config: LlamaConfig, params, cache, state: DecodeState, params_s, *,
                 steps: int, do_sample: bool, eos_ids: tuple[int, ...], tp: int = 1,
                 fused_decode: bool = False):
  """Generates `steps` tokens per row in one program -> (cache, state, emitted i32[B, k]);
  `tp` as in `prefill`; `fused_decode` runs attention in decode_attention's kernel (with
  tp > 1 only under `jax.set_mesh` of the params' mesh, which splits it over kv heads)."""
  B = state.tokens.shape[0]
  dtype = params_lib.activation_dtype(params)
  max_len = cache[0].shape[5]

  def step(i, carry):
    cache, state, out = carry
    x = llama.embed(params, state.tokens[:, None], dtype)
    x, cache = llama.run_blocks(config, _one_chunk(params), x, state.lengths[:, None],
                                state.lengths, cache, fused_decode=fused_decode)
    logits = llama.logits(config, params, x)[:, 0]
    new = sampling.sample(logits, state.lengths + 1, params_s, do_sample=do_sample)
    state, emitted = advance(state, new, eos_ids, max_len)
    return cache, state, out.at[:, i].set(emitted)

  out = jnp.full((B, steps), -1, jnp.int32)
  return jax.lax.fori_loop(0, steps, step, (cache, state, out))


@functools.partial(jax.jit, static_argnames=("config",))
def forward_logits(config: LlamaConfig, params, tokens):
  """Full-sequence logits f32[B, T, V] for unpadded tokens (used to check parity)."""
  B, T = tokens.shape
  dtype = params_lib.activation_dtype(params)
  cache = llama.init_cache(config, B, T, dtype)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  x = llama.embed(params, tokens, dtype)
  x, _ = llama.run_blocks(config, _one_chunk(params), x, positions,
                          jnp.zeros((B,), jnp.int32), cache, fresh=True)
  return llama.logits(config, params, x)


def reference_generate(config: LlamaConfig, params, prompts: list[list[int]],
                       max_new_tokens: int, params_s: sampling.SamplingParams, *,
                       max_len: int, steps: int = 16) -> list[list[int]]:
  """Generated ids per prompt on one device, params in the plain [L, ...] layout.

  The reference the pipeline is tested against: no schedule, no micro-batches, one batch.
  """
  B = len(prompts)
  lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
  tokens = jnp.asarray([p + [0] * (max(map(len, prompts)) - len(p)) for p in prompts],
                       jnp.int32)
  do_sample = params_s.needs_sampling()
  cache = llama.init_cache(config, B, max_len, params_lib.activation_dtype(params))
  first, cache = prefill(config, params, cache, tokens, lengths, params_s,
                         do_sample=do_sample)
  eos = config.eos_token_ids
  state = start_state(first, lengths, jnp.full((B,), max_new_tokens, jnp.int32), eos, max_len)
  out = [first[:, None]]
  while not bool(jnp.all(state.done)):
    cache, state, emitted = decode_chunk(config, params, cache, state, params_s, steps=steps,
                                         do_sample=do_sample, eos_ids=eos)
    out.append(emitted)
  rows = jnp.concatenate(out, axis=1).tolist()
  return [[t for t in row if t >= 0] for row in rows]
