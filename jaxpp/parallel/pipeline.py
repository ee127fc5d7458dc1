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

The programs live in `prefill_program.py` and `decode_program.py`; this module holds the
layout on its mesh and the pieces of a tick they share.

Shapes (local to one pp device): blocks leaves [v, Lc, ...]; cache [v, Lc, M, b, K, S, H]
with M micro-batches of b rows each; activations [b, T, D].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxpp.axes import DP, PP, TP
from jaxpp.errors import JaxppError
from jaxpp.model import attention_choice, kv_cache, llama, quant
from jaxpp.model.config import LlamaConfig
from jaxpp.parallel import decode_program, placement, prefill_program
from jaxpp.parallel import mesh as mesh_lib
from jaxpp.parallel.layout import Layout
from jaxpp.parallel.partition import Partition
from jaxpp.parallel.schedule import circular


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
            scan_unroll: int | bool = 1, attention: str = "auto",
            max_len: int | None = None) -> Pipeline:
    """The layout checked for `config`, then placed on `devices` (default: the first
    dp*pp*tp devices, so a small layout runs on a big host); dp = 0 takes as many replicas
    as those devices hold (`Layout.for_devices`). The pipeline's config is `config` as tp
    devices hold it (kv heads replicated beyond their count, `LlamaConfig.for_tp`) and, given
    the run's context `max_len`, as that context needs it (`LlamaConfig.for_context`)."""
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
    config = config.for_tp(layout.tp)
    return cls(config if max_len is None else config.for_context(max_len), mesh, layout,
               scan_unroll, attention)

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

  def cache_sharding(self, paged: bool = False) -> NamedSharding:
    return placement.cache_sharding(self.mesh, paged=paged)

  def cache_shape(self, rows_per_microbatch: int, max_len: int) -> tuple[int, ...]:
    """[pp, v, Lc, M, b, K, S, H] of the keys (and of the values); S =
    kv_cache.cache_positions(max_len)."""
    c = self.config
    return self.layer_axes + (self.microbatches, rows_per_microbatch, c.num_kv_heads,
                              kv_cache.cache_positions(max_len), c.head_dim)

  def cache_bytes_per_slot(self, max_len: int, dtype) -> int:
    """Keys and values one slot (one row of one micro-batch) holds on each device, stored
    in `dtype` (an fp8 cache's scales included)."""
    _, v, Lc, _, _, K, S, H = self.cache_shape(1, max_len)
    # K is split over tp
    return round(2 * v * Lc * (K // self.tp) * S * H * kv_cache.element_bytes(dtype, H))

  def init_cache(self, rows_per_microbatch: int, max_len: int, dtype) -> kv_cache.KVCache:
    """Zeroed KV cache `cache_shape(rows_per_microbatch, max_len)`, created already
    sharded on its stages."""
    return _zeros(self.cache_shape(rows_per_microbatch, max_len), dtype, self.cache_sharding())

  def pool_shape(self, blocks: int, block_size: int) -> tuple[int, ...]:
    """[pp, v, Lc, dp * blocks, K, BS, H] of a paged cache's keys (and values): `blocks`
    per replica (its block ids 0 .. blocks - 1, NULL_BLOCK among them)."""
    c = self.config
    return self.layer_axes + (self.dp * blocks, c.num_kv_heads, block_size, c.head_dim)

  def block_bytes(self, block_size: int, dtype) -> int:
    """Keys and values one block holds on each device (its kv heads split over tp), stored
    in `dtype` (an fp8 cache's scales included)."""
    _, v, Lc, _, K, BS, H = self.pool_shape(1, block_size)
    return round(2 * v * Lc * (K // self.tp) * BS * H * kv_cache.element_bytes(dtype, H))

  def init_pool(self, blocks: int, block_size: int, dtype) -> kv_cache.KVCache:
    """Zeroed paged cache `pool_shape(blocks, block_size)`, created already sharded."""
    return _zeros(self.pool_shape(blocks, block_size), dtype, self.cache_sharding(paged=True))

  # --- programs ---------------------------------------------------------------------------

  # The two phases' jitted programs (each in its own module); what follows are the pieces
  # of a tick they share.
  prefill = prefill_program.prefill
  decode = decode_program.decode

  def shard_map(self, body, in_specs, out_specs):
    return jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                         axis_names=placement.manual_axes(self.mesh), check_vma=False)

  def local_rows(self, targets, cache_rows: int):
    """A prefill's cache targets (micro-batch, row) as this replica's own rows: each
    replica's rows of the batch name only its own slots (-1 stays -1)."""
    if self.dp == 1:
      return targets
    row = targets[..., 1] - jax.lax.axis_index(DP) * cache_rows
    return jnp.stack([targets[..., 0], jnp.where(targets[..., 1] >= 0, row, -1)], axis=-1)

  def slot(self, microbatch, s):
    """The cache slot device s keeps a micro-batch in (see the module docstring); -1 stays."""
    return jnp.where(microbatch >= 0, (microbatch + s) % self.microbatches, microbatch)

  def layer_tables(self) -> dict:
    """Per-layer facts a tick reads, each [pp, v, ...] (split over 'pp'): `counts` [pp, v],
    the real layers of each chunk, and, when the model's layers have different sliding
    windows, `windows` [pp, v, Lc] (`llama.window_table`)."""
    tables = dict(counts=jnp.asarray(self.partition.layer_counts()))
    if self.config.window is None:
      tables["windows"] = jnp.asarray(llama.window_table(self.config,
                                                         self.partition.layer_index()))
    return tables

  def run_chunk(self, blocks, layers, cache, x, positions, start, r, active, *, fresh,
                 slot=0, slots=None, segments=None, pages=None):
    """Runs local chunk r (skipped when idle) reading cache `slot`; returns y and the cache.

    `slots` (micro-batch slot, row) per row or token redirects the writes and `segments`
    keeps a packed row's prompts apart, as in llama.run_blocks; a paged cache is read and
    written through `pages` (kv_cache.Pages) instead of slots.
    With one stage no tick idles, and with one chunk as well the tick runs no conditional
    at all (XLA's GPU conditional reads its branch index back to the host).
    """
    uneven = len(set(self.partition.counts)) > 1  # static: even splits skip the check

    def compute(chunk):
      return lambda _: llama.run_blocks(
          self.config, blocks, x, positions, start, cache, chunk=chunk, microbatch=slot,
          slots=slots, segments=segments, fresh=fresh,
          num_layers=layers["counts"][chunk] if uneven else None,
          windows=layers.get("windows"),
          unroll=self.scan_unroll, kernels=self.kernels, pages=pages)

    # One branch per chunk, so each reads its weights and cache at a constant chunk index
    # (llama.run_blocks); with more than one stage ticks idle in fill and drain: branch 0.
    branches, index = [compute(c) for c in range(self.v)], r
    if self.pp > 1:
      branches, index = [lambda _: (x, cache)] + branches, jnp.where(active, r + 1, 0)
    return branches[0](None) if len(branches) == 1 else jax.lax.switch(index, branches, None)

  def everywhere(self, a, s):
    """`a` [M, rows, ...] as each replica's last pp device holds it, on every device: shared
    over 'pp' (a psum of it and zeros), then gathered over 'dp' (a few ints a row), so every
    process's engine sees every row. With one stage nothing is shared: XLA (jax 0.10, CPU)
    rejects an all-reduce over a size-1 manual axis when 'tp' is also sharded."""
    if self.pp > 1:
      a = jax.lax.psum(jnp.where(s == self.pp - 1, a, jnp.zeros_like(a)), PP)
    return a if self.dp == 1 else jax.lax.all_gather(a, DP, axis=1, tiled=True)

  def ring(self, *arrays):
    """Each array sent one device on around the 'pp' ring (the last to the first)."""
    perm = [(i, (i + 1) % self.pp) for i in range(self.pp)]
    return [jax.lax.ppermute(a, PP, perm) for a in arrays]


def _zeros(shape: tuple[int, ...], dtype, sharding) -> kv_cache.KVCache:
  """Zeroed keys and values (and an fp8 cache's scales: `kv_cache.zeros`), each shard
  filled on its own device (no host copy). One jit of `jnp.zeros` for every call, so JAX's
  cache serves a second engine of the same shapes without compiling (a fresh lambda each
  time compiled again). The sharding's spec stops at the K axis, so it fits the scales."""
  make = jax.jit(jnp.zeros, static_argnums=(0, 1), out_shardings=sharding)
  return kv_cache.zeros(shape, dtype, make)
