"""The plain GSPMD tensor-parallel baseline: what a JAX user would write instead of jaxpp.

`reference.py`'s single-device prefill and decode programs, with the params sharded
Megatron-style over 'tp' (heads, ffn and vocab split; every device holds every layer) and
the KV cache split over kv heads, left to GSPMD: no shard_map, no pipeline, no engine.
Requests run in static waves of `max_num_seqs`: a wave is prefilled together and decoded
until its last row finishes before the next wave starts (no refill), which is how a simple
JAX script batches; a row asked for fewer tokens than its wave's longest idles (emits
nothing) until then. reference.py's programs compile with the XLA options the pipeline's
programs get at the same tp degree (`xla_options.py`) and decode attention the same way
(the fused kernel on GPUs, `decode_attention.py`), so a comparison measures the parallel
structure, not the GEMM library, XLA's dot merging or the attention kernel.

`python -m jaxpp.bench --layouts=gspmd_tp4,pp2tp2` puts it in the same table.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpp.axes import TP
from jaxpp.errors import JaxppError
from jaxpp.model import decode_state, kv_cache, sampling
from jaxpp.model import params as params_lib
from jaxpp.parallel.pipeline import Pipeline
from jaxpp.serve import reference

NAME = re.compile(r"gspmd_tp(\d+)")


def parse(text: str) -> int | None:
  """tp of a baseline layout name like "gspmd_tp4", or None for a pipeline layout."""
  m = NAME.fullmatch(text)
  return int(m.group(1)) if m else None


def plain_params(pipe: Pipeline, params: dict) -> dict:
  """A pp=1, v=1 pipeline's params [1, 1, L, ...] as the plain [L, ...] tree, still tp-split.

  Consumes `params`: each leaf is donated to its own reshape, so the devices never hold the
  model twice (a 70B shape fills most of two cards).
  """
  if pipe.pp != 1 or pipe.v != 1:
    raise JaxppError("the GSPMD baseline holds every layer on every device (pp=1, v=1)")

  def spec(path, leaf):
    s = leaf.sharding.spec
    return NamedSharding(pipe.mesh, P(*s[2:]) if path[0] == "blocks" else s)

  out = {}
  for path, leaf in params_lib.flatten(params).items():
    if path[0] == "blocks":
      leaf = jax.jit(lambda a: a.reshape(a.shape[2:]), out_shardings=spec(path, leaf),
                     donate_argnums=0)(leaf)
    out[path] = leaf
  return params_lib.nest(out)


def run(pipe: Pipeline, params: dict, prompts: list[list[int]], *,
        output_len: int | Sequence[int], max_num_seqs: int, decode_chunk: int, max_len: int,
        eos_ids=()) -> dict:
  """Greedy generation in static waves; returns token ids per prompt and the timings.

  `output_len` is the new tokens of every prompt, or a list of each prompt's own. Stop ids
  are `eos_ids` (none by default: the bench generates exactly `output_len`).
  """
  lens = np.broadcast_to(np.asarray(output_len, np.int32), (len(prompts),))
  config, dtype = pipe.config, params_lib.activation_dtype(params)
  cache_sharding = NamedSharding(pipe.mesh, P(None, None, None, None, TP, None, None))
  out, stats = [], dict(prefill_seconds=0.0, decode_seconds=0.0, decode_calls=0,
                        prompt_tokens=0, completion_tokens=0, call_seconds=[])
  for first in range(0, len(prompts), max_num_seqs):
    wave = prompts[first:first + max_num_seqs]
    B = len(wave)
    lengths = np.array([len(p) for p in wave], np.int32)
    tokens = np.zeros((B, int(lengths.max())), np.int32)
    for i, p in enumerate(wave):
      tokens[i, :len(p)] = p
    cache = jax.jit(kv_cache.init_cache, static_argnums=(0, 1, 2, 3),
                    out_shardings=(cache_sharding, cache_sharding))(config, B, max_len, dtype)
    knobs = sampling.SamplingParams.make(B)
    start = time.perf_counter()
    with jax.set_mesh(pipe.mesh):  # the prefill kernel splits over its 'tp' as well
      token, cache = reference.plain_prefill(config, params, cache, jnp.asarray(tokens),
                                             jnp.asarray(lengths), knobs, do_sample=False,
                                             tp=pipe.tp, kernels=pipe.kernels)
    token.block_until_ready()
    stats["prefill_seconds"] += time.perf_counter() - start
    state = decode_state.start_state(token, jnp.asarray(lengths),
                                 jnp.asarray(lens[first:first + B]), tuple(eos_ids), max_len)
    rows = [np.asarray(token)[:, None]]
    while not bool(np.all(np.asarray(state.done))):
      start = time.perf_counter()
      with jax.set_mesh(pipe.mesh):  # the fused attention kernel splits over its 'tp'
        cache, state, emitted = reference.plain_decode(
            config, params, cache, state, knobs, steps=decode_chunk, do_sample=False,
            eos_ids=tuple(eos_ids), tp=pipe.tp, kernels=pipe.kernels)
      rows.append(np.asarray(emitted))
      seconds = time.perf_counter() - start
      stats["decode_seconds"] += seconds
      stats["decode_calls"] += 1
      stats["call_seconds"].append(seconds)
    ids = np.concatenate(rows, axis=1)
    out += [[int(t) for t in row if t >= 0] for row in ids]
    stats["prompt_tokens"] += int(lengths.sum())
  stats["completion_tokens"] = sum(len(r) for r in out)
  return dict(tokens=out, **stats)

