"""The pipeline executor: one jitted program per phase over a (dp, pp, tp) mesh.

Inside `jax.shard_map`, manual over 'pp' (and over 'dp' with replicas: each replica runs its
own ring on its own rows, `placement.py`), every device runs the same tick loop over a
`schedule.Schedule` table. At tick t device s looks up (micro-batch j, local chunk r, round
k), scans its own layers of chunk r for micro-batch j (tensor parallelism over 'tp' is left
to GSPMD inside the stage), and `ppermute`s the result one device on around the ring. Stage
params and the KV cache never leave their devices.

Prefill pushes each micro-batch's prompt through all chunks once. Decode is a ring: the
last device samples the next token, which travels back to device 0 with the ring's regular
send, so with m >= pp micro-batches in flight the pipe stays full from token to token and
only the first fill and the last drain of a `steps`-token call are bubbles.

Weights and cache are read at constant chunk and slot indices, because XLA (GPU) hands
cuBLAS a slice in place only then; with indices read from the table it copied each layer's
cache slice (14% of a 70B pp=2 decode step) and, interleaved, a chunk's weights every tick
(docs/benchmarks.md). So a tick switches over its local chunks, one branch each, and
device s keeps micro-batch j's KV cache in slot (j + s) mod m: at tick t of the ring it
runs j = (t - s) mod m, so the slot is t mod m on every device, a constant once the tick
loop is unrolled by m.

Shapes (local to one pp device): blocks leaves [v, Lc, ...]; cache [v, Lc, M, b, K, S, H]
with M micro-batches of b rows each; activations [b, T, D].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpp.axes import DP, PP, TP
from jaxpp.errors import JaxppError
from jaxpp.model import attention_choice, decode_state, llama, quant, sampling
from jaxpp.model import params as params_lib
from jaxpp.model.config import LlamaConfig
from jaxpp.parallel import mesh as mesh_lib
from jaxpp.parallel import placement, xla_options
from jaxpp.parallel.layout import Layout
from jaxpp.parallel.packing import PrefillBatch
from jaxpp.parallel.partition import Partition
from jaxpp.parallel.schedule import circular


def _layout_tp(self: "Pipeline", *args, **kwargs) -> int:
  """The tp degree of a program call (`self` is its pipeline): picks its XLA options."""
  return self.tp


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """A model's layout on a mesh: who holds which layers, how micro-batches flow.

  Build one with `Pipeline.build(config, layout)`; the layout's rules are checked first
  (`Layout.check`), so every mistake is one line before anything compiles.
  """

  config: LlamaConfig
  mesh: jax.sharding.Mesh
  layout: Layout
  scan_unroll: int | bool = 1  # layers per iteration of the stage scan (True: all)
  # Attention in both phases: "auto", "kernel" or "xla" (model/attention_choice.py).
  attention: str = "auto"
  partition: Partition = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    self.layout.check(self.config)
    shape = {a: self.mesh.shape[a] for a in (DP, PP, TP)}
    want = dict(dp=self.layout.dp, pp=self.layout.pp, tp=self.layout.tp)
    if shape != want:
      raise JaxppError(f"the mesh {shape} does not match layout {self.layout.name} ({want})")
    problem = attention_choice.problem(self.attention, self.config.head_dim)
    if problem:
      raise JaxppError(problem)
    object.__setattr__(self, "partition", self.layout.partition(self.config))

  @classmethod
  def build(cls, config: LlamaConfig, layout: Layout | str, *, devices=None,
            scan_unroll: int | bool = 1, attention: str = "auto") -> Pipeline:
    """The layout checked for `config`, then placed on `devices` (default: the first
    dp*pp*tp devices, so a small layout runs on a big host); dp = 0 takes as many replicas
    as those devices hold (`Layout.for_devices`)."""
    layout = Layout.of(layout)
    n = len(jax.devices() if devices is None else devices)
    layout = (layout.for_devices(n) if layout.dp == 0 else layout).check(config)
    if devices is None:
      available = jax.devices()
      if layout.devices > len(available):
        raise JaxppError(f"layout {layout.name} needs dp*pp*tp = {layout.devices} devices "
                         f"but only {len(available)} devices are available")
      devices = available[:layout.devices]
    mesh = mesh_lib.make_mesh(pp=layout.pp, tp=layout.tp, dp=layout.dp, devices=devices)
    return cls(config, mesh, layout, scan_unroll, attention)

  @property
  def pp(self) -> int:
    return self.layout.pp

  @property
  def tp(self) -> int:
    return self.layout.tp

  @property
  def dp(self) -> int:
    """Replicas: each a whole pipeline on its own devices, with its own rows."""
    return self.layout.dp

  @property
  def v(self) -> int:
    return self.layout.virtual_stages

  @property
  def microbatches(self) -> int:
    """m: micro-batches of the decode ring (the KV cache's micro-batch axis)."""
    return self.layout.m

  @property
  def prefill_mb(self) -> int:
    """Micro-batches of a prefill of every slot (the engine caps it at its slot count)."""
    return self.layout.prefill_m()

  @property
  def kernels(self) -> attention_choice.Kernels:
    """Which phases' attention runs in its fused kernel (`attention`, resolved)."""
    return attention_choice.resolve(self.attention, device=self.mesh.devices.flat[0],
                                    tp=self.tp, head_dim=self.config.head_dim)

  def decode_table(self, microbatches: int, steps: int) -> np.ndarray:
    """The decode ring's schedule table, padded to whole groups of m ticks (the tick loop
    is unrolled by m); its length is the ticks one decode call runs."""
    return circular(self.pp, self.v, microbatches, rounds=steps).padded(microbatches)

  # --- placement --------------------------------------------------------------------------

  def param_shardings(self, quant_cfg: quant.Quant = quant.Quant()) -> dict:
    """NamedShardings for the params tree with blocks stacked as [pp, v, Lc, ...]."""
    return placement.param_shardings(self.config, self.mesh, self.layer_axes, quant_cfg)

  @property
  def layer_axes(self) -> tuple[int, int, int]:
    return (self.pp, self.v, self.partition.max_layers)

  def cache_sharding(self) -> NamedSharding:
    return placement.cache_sharding(self.mesh)

  def cache_shape(self, rows_per_microbatch: int, max_len: int) -> tuple[int, ...]:
    """[pp, v, Lc, M, b, K, S, H] of the keys (and of the values); S =
    llama.cache_positions(max_len)."""
    c = self.config
    return self.layer_axes + (self.microbatches, rows_per_microbatch, c.num_kv_heads,
                              llama.cache_positions(max_len), c.head_dim)

  def cache_bytes_per_slot(self, max_len: int, dtype_bytes: int) -> int:
    """Keys and values one slot (one row of one micro-batch) holds on each device."""
    _, v, Lc, _, _, K, S, H = self.cache_shape(1, max_len)
    return 2 * v * Lc * (K // self.tp) * S * H * dtype_bytes  # K is split over tp

  def init_cache(self, rows_per_microbatch: int, max_len: int, dtype) -> llama.KVCache:
    """Zeroed KV cache `cache_shape(rows_per_microbatch, max_len)`, created already
    sharded on its stages."""
    shape = self.cache_shape(rows_per_microbatch, max_len)
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self.cache_sharding())
    return make(), make()

  # --- programs ---------------------------------------------------------------------------

  def _shard_map(self, body, in_specs, out_specs):
    return jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                         axis_names=placement.manual_axes(self.mesh), check_vma=False)

  def _local_rows(self, targets, cache_rows: int):
    """A prefill's cache targets (micro-batch, row) as this replica's own rows: each
    replica's rows of the batch name only its own slots (-1 stays -1)."""
    if self.dp == 1:
      return targets
    row = targets[..., 1] - jax.lax.axis_index(DP) * cache_rows
    return jnp.stack([targets[..., 0], jnp.where(targets[..., 1] >= 0, row, -1)], axis=-1)

  def _slot(self, microbatch, s):
    """The cache slot device s keeps a micro-batch in (see the module docstring); -1 stays."""
    return jnp.where(microbatch >= 0, (microbatch + s) % self.microbatches, microbatch)

  def _run_chunk(self, blocks, counts, cache, x, positions, start, r, active, *, fresh,
                 slot=0, slots=None, segments=None):
    """Runs local chunk r (skipped when idle) reading cache `slot`; returns y and the cache.

    `slots` (micro-batch slot, row) per row or token redirects the writes and `segments`
    keeps a packed row's prompts apart, as in llama.run_blocks.
    With one stage no tick idles, and with one chunk as well the tick runs no conditional
    at all (XLA's GPU conditional reads its branch index back to the host).
    """
    uneven = len(set(self.partition.counts)) > 1  # static: even splits skip the check

    def compute(chunk):
      return lambda _: llama.run_blocks(
          self.config, blocks, x, positions, start, cache, chunk=chunk, microbatch=slot,
          slots=slots, segments=segments, fresh=fresh,
          num_layers=counts[chunk] if uneven else None,
          unroll=self.scan_unroll, kernels=self.kernels)

    # One branch per chunk, so each reads its weights and cache at a constant chunk index
    # (llama.run_blocks); with more than one stage ticks idle in fill and drain: branch 0.
    branches, index = [compute(c) for c in range(self.v)], r
    if self.pp > 1:
      branches, index = [lambda _: (x, cache)] + branches, jnp.where(active, r + 1, 0)
    return branches[0](None) if len(branches) == 1 else jax.lax.switch(index, branches, None)

  def _everywhere(self, a, s):
    """`a` [M, rows, ...] as each replica's last pp device holds it, on every device: shared
    over 'pp' (a psum of it and zeros), then gathered over 'dp' (a few ints a row), so every
    process's engine sees every row. With one stage nothing is shared: XLA (jax 0.10, CPU)
    rejects an all-reduce over a size-1 manual axis when 'tp' is also sharded."""
    if self.pp > 1:
      a = jax.lax.psum(jnp.where(s == self.pp - 1, a, jnp.zeros_like(a)), PP)
    return a if self.dp == 1 else jax.lax.all_gather(a, DP, axis=1, tiled=True)

  def _ring(self, *arrays):
    perm = [(i, (i + 1) % self.pp) for i in range(self.pp)]
    return [jax.lax.ppermute(a, PP, perm) for a in arrays]

  @xla_options.jit(tp_of=_layout_tp,
                   static_argnames=("self", "do_sample", "with_logits", "logprobs"),
                   donate_argnames=("cache",))
  def prefill(self, params, cache, batch: PrefillBatch, knobs, *, do_sample: bool,
              with_logits: bool = False, logprobs: int | None = None):
    """A packed prefill (`packing.PrefillBatch`) -> (first i32[m, p, q], cache).

    Prompts travel in m micro-batches of p rows of T tokens, q prompts at most a row, m set
    by the shape (the engine picks it per admission, up to `prefill_mb`; p may differ from
    the cache's rows per micro-batch). Every token's keys and values go to the cache slot
    `batch.targets` names, at its position; each prompt samples its first token at its last
    one, with its own `knobs` [m, p, q]. `with_logits` also returns those positions' logits
    f32[m, p, q, V] (for tests and parity checks; it adds a reduction of that size over 'pp').
    `logprobs` (top alternatives, static) also returns, last, each first token's logprob
    [m, p, q] and its top alternatives' ids and logprobs [m, p, q, logprobs]
    (`sampling.token_logprobs`).
    """
    M, _, T = batch.tokens.shape
    q = batch.ends.shape[-1]
    table = jnp.asarray(circular(self.pp, self.v, M).table)
    counts = jnp.asarray(self.partition.layer_counts())
    dtype = params_lib.activation_dtype(params)
    last_dev, last_chunk = self.pp - 1, self.v - 1

    def body(params, cache, counts, batch, knobs):
      s = jax.lax.axis_index(PP)
      blocks = jax.tree.map(lambda a: a[0], params["blocks"])
      cache = jax.tree.map(lambda a: a[0], cache)
      counts = counts[0]
      b = batch.tokens.shape[1]  # this replica's rows
      start = jnp.zeros((b,), jnp.int32)

      def tick(t, carry):
        cache, inbox, final = carry
        j, r, _ = table[t, s]
        active = j >= 0
        j, r = jnp.maximum(j, 0), jnp.maximum(r, 0)
        x = jnp.where((s == 0) & (r == 0), llama.embed(params, batch.tokens[j], dtype),
                      inbox[j])
        targets = self._local_rows(batch.targets[j], cache[0].shape[3])
        y, cache = self._run_chunk(blocks, counts, cache, x, batch.positions[j], start, r,
                                   active, fresh=True, segments=batch.segments[j],
                                   slots=(self._slot(targets[..., 0], s), targets[..., 1]))
        last = jnp.take_along_axis(y, batch.ends[j][..., None], axis=1)  # [b, q, D]
        done_here = active & (s == last_dev) & (r == last_chunk)
        final = final.at[j].set(jnp.where(done_here, last, final[j]))
        (recv,) = self._ring(y)
        sj, _, _ = table[t, (s - 1) % self.pp]
        inbox = inbox.at[jnp.maximum(sj, 0)].set(
            jnp.where(sj >= 0, recv, inbox[jnp.maximum(sj, 0)]))
        return cache, inbox, final

      inbox = jnp.zeros((M, b, T, self.config.hidden_size), dtype)
      final = jnp.zeros((M, b, q, self.config.hidden_size), dtype)
      cache, _, final = jax.lax.fori_loop(0, table.shape[0], tick, (cache, inbox, final))
      # Head and sampling once per prefill: only the last device's rows are real; share
      # the sampled ids (one int per prompt) with every stage.
      n = M * b * q
      logits = llama.logits(self.config, params, final.reshape(n, 1, -1))[:, 0]
      flat_knobs = jax.tree.map(lambda a: a.reshape(n), knobs)
      first = sampling.sample(logits, batch.lengths.reshape(n), flat_knobs,
                              do_sample=do_sample)
      outs = (self._everywhere(first.reshape(M, b, q), s),
              jax.tree.map(lambda a: a[None], cache))
      if with_logits:
        outs += (self._everywhere(logits.reshape(M, b, q, -1), s),)
      if logprobs is not None:
        lps = sampling.token_logprobs(logits, first, logprobs)
        outs += (tuple(self._everywhere(a.reshape((M, b, q) + a.shape[1:]), s) for a in lps),)
      return outs

    cache_spec, rows = placement.cache_spec(self.mesh), P(None, placement.rows_axis(self.mesh))
    knob_spec = jax.tree.map(lambda _: rows, knobs)
    batch_spec = jax.tree.map(lambda _: rows, batch)
    out_specs = ((P(), (cache_spec, cache_spec)) + ((P(),) if with_logits else ())
                 + (((P(), P(), P()),) if logprobs is not None else ()))
    return self._shard_map(
        body, in_specs=(placement.param_specs(params), (cache_spec, cache_spec), P(PP),
                        batch_spec, knob_spec),
        out_specs=out_specs)(params, cache, counts, batch, knobs)

  @xla_options.jit(tp_of=_layout_tp,
                   static_argnames=("self", "steps", "do_sample", "eos_ids", "logprobs"),
                   donate_argnames=("cache",))
  def decode(self, params, cache, state: decode_state.DecodeState, knobs, *, steps: int,
             do_sample: bool, eos_ids: tuple[int, ...], logprobs: int | None = None):
    """`steps` tokens for every row around the ring -> (cache, state, emitted i32[M, b, k]);
    with `logprobs` (static) also each token's logprob [M, b, k] and its top alternatives'
    ids and logprobs [M, b, k, logprobs] (`sampling.token_logprobs`)."""
    M = state.tokens.shape[0]  # the ring's micro-batches, m
    table = jnp.asarray(self.decode_table(M, steps))
    counts = jnp.asarray(self.partition.layer_counts())
    dtype = params_lib.activation_dtype(params)
    max_len = cache[0].shape[6]
    last_dev, last_chunk = self.pp - 1, self.v - 1

    def body(params, cache, counts, state, knobs):
      s = jax.lax.axis_index(PP)
      blocks = jax.tree.map(lambda a: a[0], params["blocks"])
      cache = jax.tree.map(lambda a: a[0], cache)
      counts = counts[0]
      lengths0 = state.lengths
      b = state.tokens.shape[1]  # this replica's rows

      def tick(t, slot, carry):
        cache, state, tok_in, act_in, out = carry
        j, r, k = table[t, s]
        active = j >= 0
        j, r, k = jnp.maximum(j, 0), jnp.maximum(r, 0), jnp.maximum(k, 0)
        pos = lengths0[j] + k
        x = jnp.where((s == 0) & (r == 0), llama.embed(params, tok_in[j][:, None], dtype),
                      act_in[j])
        y, cache = self._run_chunk(blocks, counts, cache, x, pos[:, None], pos, r, active,
                                   fresh=False, slot=slot)
        samples_here = active & (s == last_dev) & (r == last_chunk)
        st_j = jax.tree.map(lambda a: a[j], state)
        knobs_j = jax.tree.map(lambda a: a[j], knobs)
        def sample():
          logits = llama.logits(self.config, params, y)[:, 0]
          new = sampling.sample(logits, pos + 1, knobs_j, do_sample=do_sample)
          return new, (() if logprobs is None else
                       sampling.token_logprobs(logits, new, logprobs))

        if self.pp == 1 and self.v == 1:  # every tick samples
          new, extra = sample()
        else:
          new, extra = jax.lax.cond(samples_here, sample, lambda: jax.tree.map(
              jnp.zeros_like, jax.eval_shape(sample)))
        st_new, emitted = decode_state.advance(st_j, new, eos_ids, max_len)
        state = jax.tree.map(lambda a, n, o: a.at[j].set(jnp.where(samples_here, n, o)),
                             state, st_new, st_j)
        out = tuple(o.at[j, :, k].set(jnp.where(samples_here, e, o[j, :, k]))
                    for o, e in zip(out, (emitted,) + tuple(extra)))
        recv_y, recv_tok = self._ring(y, new)
        sj, sr, _ = table[t, (s - 1) % self.pp]
        sender = jnp.maximum(sj, 0)
        act_in = act_in.at[sender].set(jnp.where(sj >= 0, recv_y, act_in[sender]))
        token_arrives = (sj >= 0) & (s == 0) & (sr == last_chunk)
        tok_in = tok_in.at[sender].set(jnp.where(token_arrives, recv_tok, tok_in[sender]))
        return cache, state, tok_in, act_in, out

      def ticks(g, carry):  # M ticks, unrolled: at tick g*M + u every device reads slot u
        for u in range(M):
          carry = tick(g * M + u, u, carry)
        return carry

      act_in = jnp.zeros((M, b, 1, self.config.hidden_size), dtype)
      out = (jnp.full((M, b, steps), -1, jnp.int32),)
      if logprobs is not None:
        out += (jnp.zeros((M, b, steps), jnp.float32),
                jnp.zeros((M, b, steps, logprobs), jnp.int32),
                jnp.zeros((M, b, steps, logprobs), jnp.float32))
      cache, state, _, _, out = jax.lax.fori_loop(
          0, table.shape[0] // M, ticks, (cache, state, state.tokens, act_in, out))
      # The last device holds the truth; share it (a few ints per row) with every stage.
      pick = lambda a: self._everywhere(a.astype(jnp.int32), s)
      state = decode_state.DecodeState(pick(state.tokens), pick(state.lengths),
                                   pick(state.remaining), pick(state.done).astype(bool))
      cache = jax.tree.map(lambda a: a[None], cache)
      if logprobs is None:
        return cache, state, pick(out[0])
      return cache, state, pick(out[0]), tuple(self._everywhere(a, s) for a in out[1:])

    cache_spec, rows = placement.cache_spec(self.mesh), P(None, placement.rows_axis(self.mesh))
    state_spec = decode_state.DecodeState(rows, rows, rows, rows)
    out_state = decode_state.DecodeState(P(), P(), P(), P())
    knob_spec = jax.tree.map(lambda _: rows, knobs)
    return self._shard_map(
        body, in_specs=(placement.param_specs(params), (cache_spec, cache_spec), P(PP),
                        state_spec, knob_spec),
        out_specs=((cache_spec, cache_spec), out_state, P())
        + (((P(), P(), P()),) if logprobs is not None else ()))(
            params, cache, counts, state, knobs)
