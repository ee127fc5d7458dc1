"""The pipeline's decode program: `steps` tokens for every row around the ring.

The last device samples each micro-batch's next token, which travels back to device 0 with
the ring's regular send (`Pipeline.ring`), so with m >= pp micro-batches in flight the pipe
stays full from token to token; only the first fill and the last drain of a call are
bubbles. The tick loop is unrolled by m so that every device reads its cache at a constant
slot (see `pipeline.py`). `Pipeline.decode` is this function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxpp.axes import PP
from jaxpp.model import decode_state, kv_cache, llama, penalties, sampling
from jaxpp.model import params as params_lib
from jaxpp.parallel import placement, xla_options


@xla_options.jit(tp_of=lambda pipe, *args, **kwargs: pipe.tp,
                 static_argnames=("pipe", "steps", "do_sample", "eos_ids", "logprobs"),
                 donate_argnames=("cache",))
def decode(pipe, params, cache, state: decode_state.DecodeState, knobs,
           history: penalties.History | None = None, tables=None, *, steps: int,
           do_sample: bool, eos_ids: tuple[int, ...], logprobs: int | None = None):
  """-> (cache, state, emitted i32[M, b, k]); with `logprobs` (static) also each token's
  logprob [M, b, k] and its top alternatives' ids and logprobs [M, b, k, logprobs]
  (`sampling.token_logprobs`). With a `history` the rows' penalties apply, counted over
  it and the tokens this call generates. A paged cache comes with its rows' block `tables`
  i32 [M, b, nblk]. A row stops where its cache ends (the engine's budgets stop it at
  max_len first)."""
  M = state.tokens.shape[0]  # the ring's micro-batches, m
  table = jnp.asarray(pipe.decode_table(M, steps))
  layers = pipe.layer_tables()
  dtype = params_lib.activation_dtype(params)
  # positions a row's cache holds: S, or nblk blocks of BS
  max_len = cache[0].shape[6] if tables is None else tables.shape[-1] * cache[0].shape[5]
  last_dev, last_chunk = pipe.pp - 1, pipe.v - 1

  def body(params, cache, layers, state, knobs, tables=None, history=None):
    s = jax.lax.axis_index(PP)
    blocks = jax.tree.map(lambda a: a[0], params["blocks"])
    cache = jax.tree.map(lambda a: a[0], cache)
    layers = jax.tree.map(lambda a: a[0], layers)
    lengths0 = state.lengths
    b = state.tokens.shape[1]  # this replica's rows

    def tick(t, slot, carry):
      cache, state, tok_in, act_in, out = carry
      j, r, k = table[t, s]
      active = j >= 0
      j, r, k = jnp.maximum(j, 0), jnp.maximum(r, 0), jnp.maximum(k, 0)
      pos = lengths0[j] + k
      x = jnp.where((s == 0) & (r == 0),
                    llama.embed(pipe.config, params, tok_in[j][:, None], dtype), act_in[j])
      pages = None if tables is None else kv_cache.Pages(tables[j])
      y, cache = pipe.run_chunk(blocks, layers, cache, x, pos[:, None], pos, r, active,
                                fresh=False, slot=slot, pages=pages)
      samples_here = active & (s == last_dev) & (r == last_chunk)
      st_j = jax.tree.map(lambda a: a[j], state)
      knobs_j = jax.tree.map(lambda a: a[j], knobs)

      def sample():
        logits = llama.logits(pipe.config, params, y, pipe.kernels)[:, 0]
        seen = None if history is None else penalties.of_history(
            history.tokens[j], lengths0[j], history.prompt_lens[j], out[0][j],
            logits.shape[-1])
        return sampling.pick(logits, pos + 1, knobs_j, do_sample=do_sample,
                             logprobs=logprobs, seen=seen)

      if pipe.pp == 1 and pipe.v == 1:  # every tick samples
        new, extra = sample()
      else:
        new, extra = jax.lax.cond(samples_here, sample, lambda: jax.tree.map(
            jnp.zeros_like, jax.eval_shape(sample)))
      st_new, emitted = decode_state.advance(st_j, new, eos_ids, max_len)
      state = jax.tree.map(lambda a, n, o: a.at[j].set(jnp.where(samples_here, n, o)),
                           state, st_new, st_j)
      out = tuple(o.at[j, :, k].set(jnp.where(samples_here, e, o[j, :, k]))
                  for o, e in zip(out, (emitted,) + tuple(extra)))
      recv_y, recv_tok = pipe.ring(y, new)
      sj, sr, _ = table[t, (s - 1) % pipe.pp]
      sender = jnp.maximum(sj, 0)
      act_in = act_in.at[sender].set(jnp.where(sj >= 0, recv_y, act_in[sender]))
      token_arrives = (sj >= 0) & (s == 0) & (sr == last_chunk)
      tok_in = tok_in.at[sender].set(jnp.where(token_arrives, recv_tok, tok_in[sender]))
      return cache, state, tok_in, act_in, out

    def ticks(g, carry):  # M ticks, unrolled: at tick g*M + u every device reads slot u
      for u in range(M):
        carry = tick(g * M + u, u, carry)
      return carry

    act_in = jnp.zeros((M, b, 1, pipe.config.hidden_size), dtype)
    out = (jnp.full((M, b, steps), -1, jnp.int32),)
    if logprobs is not None:
      out += (jnp.zeros((M, b, steps), jnp.float32),
              jnp.zeros((M, b, steps, logprobs), jnp.int32),
              jnp.zeros((M, b, steps, logprobs), jnp.float32))
    cache, state, _, _, out = jax.lax.fori_loop(
        0, table.shape[0] // M, ticks, (cache, state, state.tokens, act_in, out))
    # The last device holds the truth; share it (a few ints per row) with every stage.
    pick = lambda a: pipe.everywhere(a.astype(jnp.int32), s)
    state = decode_state.DecodeState(pick(state.tokens), pick(state.lengths),
                                     pick(state.remaining), pick(state.done).astype(bool))
    cache = jax.tree.map(lambda a: a[None], cache)
    if logprobs is None:
      return cache, state, pick(out[0])
    return cache, state, pick(out[0]), tuple(pipe.everywhere(a, s) for a in out[1:])

  cache_spec = placement.cache_spec(pipe.mesh, paged=tables is not None)
  rows = P(None, placement.rows_axis(pipe.mesh))
  layer_spec = jax.tree.map(lambda _: P(PP), layers)
  state_spec = decode_state.DecodeState(rows, rows, rows, rows)
  out_state = decode_state.DecodeState(P(), P(), P(), P())
  knob_spec = jax.tree.map(lambda _: rows, knobs)
  args = (params, cache, layers, state, knobs)
  in_specs = (placement.param_specs(params), (cache_spec,) * len(cache), layer_spec, state_spec,
              knob_spec)
  # shard_map takes no spec for an absent argument: the optional ones go by name
  extras = {name: (a, spec) for name, a, spec in (
      ("tables", tables, rows), ("history", history, penalties.History(rows, rows)))
      if a is not None}
  args += tuple(a for a, _ in extras.values())
  in_specs += tuple(spec for _, spec in extras.values())
  run = lambda *a: body(*a[:5], **dict(zip(extras, a[5:])))
  return pipe.shard_map(
      run, in_specs=in_specs,
      out_specs=((cache_spec,) * len(cache), out_state, P())
      + (((P(), P(), P()),) if logprobs is not None else ()))(*args)
