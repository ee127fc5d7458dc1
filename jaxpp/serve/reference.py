"""Single-device prefill and decode: the reference every parallel layout must reproduce.

Two compiled programs over params in the plain [L, ...] layout. `plain_prefill` runs
right-padded prompts through every layer, fills the KV cache and samples each row's first
token. `plain_decode` generates `k` tokens per row inside one `lax.fori_loop`, so the host
is visited once per chunk, not once per token (a host loop of tiny per-token dispatches is
launch-bound on GPUs). The bench's GSPMD baseline runs these same programs tp-sharded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpp.model import decode_state, kv_cache, llama, sampling
from jaxpp.model import params as params_lib
from jaxpp.model.attention_choice import Kernels
from jaxpp.model.config import LlamaConfig
from jaxpp.parallel import xla_options


def _one_chunk(params):
  """The plain [L, ...] layer stack as the one chunk [1, L, ...] that run_blocks reads."""
  return jax.tree.map(lambda a: a[None], params["blocks"])


def _windows(config: LlamaConfig):
  """The one chunk's per-layer windows [1, L] when layers differ (else None: constant)."""
  if config.window is not None:
    return None
  return jnp.asarray(llama.window_table(config, range(config.num_layers)))[None]


def _tp(*args, tp: int = 1, **kwargs) -> int:
  return tp


@xla_options.jit(tp_of=_tp, static_argnames=("config", "do_sample", "tp", "kernels"),
                 donate_argnames=("cache",))
def plain_prefill(config: LlamaConfig, params, cache, tokens, lengths, knobs, *, do_sample,
                  tp: int = 1, kernels: Kernels = Kernels()):
  """tokens i32[B, T] right-padded, lengths i32[B] -> (first tokens i32[B], cache).

  `tp`: devices the params are split over, which picks the XLA options (xla_options.py);
  `kernels.prefill` runs attention in prefill_attention's kernel (with tp > 1 only under
  `jax.set_mesh` of the params' mesh, which splits it over heads).
  """
  B, T = tokens.shape
  dtype = params_lib.activation_dtype(params)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  x = llama.embed(config, params, tokens, dtype)
  x, cache = llama.run_blocks(config, _one_chunk(params), x, positions,
                              jnp.zeros((B,), jnp.int32), cache, fresh=True, kernels=kernels,
                              windows=_windows(config))
  last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
  logits = llama.logits(config, params, last)[:, 0]
  return sampling.sample(logits, lengths, knobs, do_sample=do_sample), cache


@xla_options.jit(tp_of=_tp, static_argnames=("config", "steps", "do_sample", "eos_ids", "tp",
                                             "kernels"),
                 donate_argnames=("cache",))
def plain_decode(config: LlamaConfig, params, cache, state: decode_state.DecodeState, knobs, *,
                 steps: int, do_sample: bool, eos_ids: tuple[int, ...], tp: int = 1,
                 kernels: Kernels = Kernels()):
  """Generates `steps` tokens per row in one program -> (cache, state, emitted i32[B, k]);
  `tp` as in `prefill`; `kernels.decode` runs attention in decode_attention's kernel (with
  tp > 1 only under `jax.set_mesh` of the params' mesh, which splits it over kv heads)."""
  B = state.tokens.shape[0]
  dtype = params_lib.activation_dtype(params)
  max_len = cache[0].shape[5]

  def step(i, carry):
    cache, state, out = carry
    x = llama.embed(config, params, state.tokens[:, None], dtype)
    x, cache = llama.run_blocks(config, _one_chunk(params), x, state.lengths[:, None],
                                state.lengths, cache, kernels=kernels,
                                windows=_windows(config))
    logits = llama.logits(config, params, x)[:, 0]
    new = sampling.sample(logits, state.lengths + 1, knobs, do_sample=do_sample)
    state, emitted = decode_state.advance(state, new, eos_ids, max_len)
    return cache, state, out.at[:, i].set(emitted)

  out = jnp.full((B, steps), -1, jnp.int32)
  return jax.lax.fori_loop(0, steps, step, (cache, state, out))


@functools.partial(jax.jit, static_argnames=("config",))
def forward_logits(config: LlamaConfig, params, tokens):
  """Full-sequence logits f32[B, T, V] for unpadded tokens (used to check parity)."""
  B, T = tokens.shape
  dtype = params_lib.activation_dtype(params)
  cache = kv_cache.init_cache(config, B, T, dtype)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  x = llama.embed(config, params, tokens, dtype)
  x, _ = llama.run_blocks(config, _one_chunk(params), x, positions,
                          jnp.zeros((B,), jnp.int32), cache, fresh=True,
                          windows=_windows(config))
  return llama.logits(config, params, x)


def reference_generate(config: LlamaConfig, params, prompts: list[list[int]],
                       max_new_tokens: int, knobs: sampling.SamplingParams, *,
                       max_len: int, steps: int = 16) -> list[list[int]]:
  """Generated ids per prompt on one device, params in the plain [L, ...] layout.

  The reference the pipeline is tested against: no schedule, no micro-batches, one batch.
  """
  B = len(prompts)
  lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
  tokens = jnp.asarray([p + [0] * (max(map(len, prompts)) - len(p)) for p in prompts],
                       jnp.int32)
  do_sample = knobs.needs_sampling()
  cache = kv_cache.init_cache(config, B, max_len, params_lib.activation_dtype(params))
  first, cache = plain_prefill(config, params, cache, tokens, lengths, knobs,
                         do_sample=do_sample)
  eos = config.eos_token_ids
  state = decode_state.start_state(first, lengths, jnp.full((B,), max_new_tokens, jnp.int32), eos,
                                   max_len)
  out = [first[:, None]]
  while not bool(jnp.all(state.done)):
    cache, state, emitted = plain_decode(config, params, cache, state, knobs, steps=steps,
                                         do_sample=do_sample, eos_ids=eos)
    out.append(emitted)
  rows = jnp.concatenate(out, axis=1).tolist()
  return [[t for t in row if t >= 0] for row in rows]
