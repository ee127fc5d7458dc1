"""The pipeline's prefill program: packed prompts through every chunk once, into the cache.

Prompts travel in m micro-batches of p rows of T tokens, q prompts at most a row
(`packing.PrefillBatch`). The tick loop follows the circular schedule's table: at tick t
device s runs micro-batch j through its local chunk r (`Pipeline.run_chunk`), writing each
token's keys and values to the cache slot the batch names, and sends the activations one
device on. The LM head and sampling run once at the end, on each prompt's last token. With
a paged cache the batch's targets are each token's (block, offset) instead of its slot.
`Pipeline.prefill` is this function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxpp.axes import PP
from jaxpp.model import kv_cache, llama, sampling
from jaxpp.model import params as params_lib
from jaxpp.model import penalties as penalties_lib
from jaxpp.parallel import placement, xla_options
from jaxpp.parallel.packing import PrefillBatch
from jaxpp.parallel.schedule import circular


@xla_options.jit(tp_of=lambda pipe, *args, **kwargs: pipe.tp,
                 static_argnames=("pipe", "do_sample", "with_logits", "logprobs", "penalties"),
                 donate_argnames=("cache",))
def prefill(pipe, params, cache, batch: PrefillBatch, knobs, prefix=None, *, do_sample: bool,
            with_logits: bool = False, logprobs: int | None = None, penalties: bool = False):
  """A packed prefill on pipeline `pipe` -> (first i32[m, p, q], cache).

  With `prefix` (a paged cache only) each row is one prompt piece continuing a prefix already
  in the cache: (tables i32 [m, p, nblk], the row's blocks; starts i32 [m, p], its cached
  positions, where the row's first token sits); the piece attends to that prefix and to
  itself (prefix caching, chunked prefill).

  m is set by the shape (the engine picks it per admission, up to `prefill_mb`; p may
  differ from the cache's rows per micro-batch). Each prompt samples its first token at its
  last one, with its own `knobs` [m, p, q]; with `penalties` (static) its repetition penalty
  counts its own tokens. `with_logits` also returns those positions' logits f32[m, p, q, V]
  (for tests and parity checks; it adds a reduction of that size over 'pp'). `logprobs`
  (top alternatives, static) also returns, last, each first token's logprob [m, p, q] and
  its top alternatives' ids and logprobs [m, p, q, logprobs] (`sampling.token_logprobs`).
  """
  M, _, T = batch.tokens.shape
  q = batch.ends.shape[-1]
  paged = cache[0].ndim == 7  # a pool [pp, v, Lc, NB, K, BS, H], not [pp, v, Lc, M, b, ...]
  table = jnp.asarray(circular(pipe.pp, pipe.v, M).table)
  layers = pipe.layer_tables()
  dtype = params_lib.activation_dtype(params)
  D = pipe.config.hidden_size
  last_dev, last_chunk = pipe.pp - 1, pipe.v - 1

  def body(params, cache, layers, batch, knobs, prefix=None):
    s = jax.lax.axis_index(PP)
    blocks = jax.tree.map(lambda a: a[0], params["blocks"])
    cache = jax.tree.map(lambda a: a[0], cache)
    layers = jax.tree.map(lambda a: a[0], layers)
    b = batch.tokens.shape[1]  # this replica's rows

    def tick(t, carry):
      cache, inbox, final = carry
      j, r, _ = table[t, s]
      active = j >= 0
      j, r = jnp.maximum(j, 0), jnp.maximum(r, 0)
      x = jnp.where((s == 0) & (r == 0),
                    llama.embed(pipe.config, params, batch.tokens[j], dtype), inbox[j])
      start = jnp.zeros((b,), jnp.int32) if prefix is None else prefix[1][j]
      if paged:  # each token's (block, offset), blocks the replica's own
        pages = kv_cache.Pages(None if prefix is None else prefix[0][j],
                               (batch.targets[j][..., 0], batch.targets[j][..., 1]))
        slots = None
      else:
        targets = pipe.local_rows(batch.targets[j], cache[0].shape[3])
        pages, slots = None, (pipe.slot(targets[..., 0], s), targets[..., 1])
      y, cache = pipe.run_chunk(blocks, layers, cache, x, batch.positions[j], start, r,
                                active, fresh=prefix is None, segments=batch.segments[j],
                                slots=slots, pages=pages)
      last = jnp.take_along_axis(y, batch.ends[j][..., None], axis=1)  # [b, q, D]
      done_here = active & (s == last_dev) & (r == last_chunk)
      final = final.at[j].set(jnp.where(done_here, last, final[j]))
      (recv,) = pipe.ring(y)
      sj, _, _ = table[t, (s - 1) % pipe.pp]
      inbox = inbox.at[jnp.maximum(sj, 0)].set(
          jnp.where(sj >= 0, recv, inbox[jnp.maximum(sj, 0)]))
      return cache, inbox, final

    inbox = jnp.zeros((M, b, T, D), dtype)
    final = jnp.zeros((M, b, q, D), dtype)
    cache, _, final = jax.lax.fori_loop(0, table.shape[0], tick, (cache, inbox, final))
    # Head and sampling once per prefill: only the last device's rows are real; share
    # the sampled ids (one int per prompt) with every stage.
    n = M * b * q
    logits = llama.logits(pipe.config, params, final.reshape(n, 1, -1))[:, 0]
    flat_knobs = jax.tree.map(lambda a: a.reshape(n), knobs)
    seen = (penalties_lib.of_packed(batch.tokens, batch.segments, q, logits.shape[-1])
            if penalties else None)
    first, lps = sampling.pick(logits, batch.lengths.reshape(n), flat_knobs,
                               do_sample=do_sample, logprobs=logprobs, seen=seen)
    outs = (pipe.everywhere(first.reshape(M, b, q), s),
            jax.tree.map(lambda a: a[None], cache))
    if with_logits:
      outs += (pipe.everywhere(logits.reshape(M, b, q, -1), s),)
    if logprobs is not None:
      outs += (tuple(pipe.everywhere(a.reshape((M, b, q) + a.shape[1:]), s) for a in lps),)
    return outs

  cache_spec = placement.cache_spec(pipe.mesh, paged=paged)
  rows = P(None, placement.rows_axis(pipe.mesh))
  layer_spec = jax.tree.map(lambda _: P(PP), layers)
  knob_spec = jax.tree.map(lambda _: rows, knobs)
  batch_spec = jax.tree.map(lambda _: rows, batch)
  out_specs = ((P(), (cache_spec,) * len(cache)) + ((P(),) if with_logits else ())
               + (((P(), P(), P()),) if logprobs is not None else ()))
  args = (params, cache, layers, batch, knobs)
  in_specs = (placement.param_specs(params), (cache_spec,) * len(cache), layer_spec, batch_spec,
              knob_spec)
  if prefix is not None:  # shard_map takes no spec for an absent argument
    if not paged:
      raise ValueError("a prefill continuing a cached prefix needs a paged cache")
    args, in_specs = args + (tuple(prefix),), in_specs + ((rows, rows),)
  return pipe.shard_map(body, in_specs=in_specs, out_specs=out_specs)(*args)

