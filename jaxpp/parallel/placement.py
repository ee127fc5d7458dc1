"""Where a pipeline's arrays live on the (dp, pp, tp) mesh: params, the KV cache, and the
specs its programs' `shard_map` takes them with.

Params are stacked `[pp, v, Lc, ...]` and split over 'pp' (each stage its own layers), the
head or FFN axis of each projection over 'tp', and replicated over 'dp' (every replica
holds the whole model). The KV cache `[pp, v, Lc, M, b, K, S, H]` splits its stages over
'pp', its rows over 'dp' (each replica owns b / dp rows of every micro-batch) and its kv
heads over 'tp'; a paged pool `[pp, v, Lc, NB, K, BS, H]` its blocks over 'dp' instead
(each replica its own pool, its rows' block tables naming local blocks). Inside the
programs 'pp' and 'dp' are manual (each replica runs its own ring on its own rows) and 'tp'
is left to GSPMD.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpp.axes import DP, PP, TP
from jaxpp.model import params as params_lib
from jaxpp.model import quant
from jaxpp.model.config import LlamaConfig
from jaxpp.parallel.layout import vocab_sharded_head


def _block_spec(name: str, ndim: int) -> P:
  dims = [None] * ndim
  if name in params_lib.TP_AXIS:
    dims[params_lib.TP_AXIS[name]] = TP
  return P(PP, None, None, *dims)


def param_shardings(config: LlamaConfig, mesh, layer_axes: tuple[int, int, int],
                    quant_cfg: quant.Quant = quant.Quant()) -> dict:
  """NamedShardings for the params tree with blocks stacked as `layer_axes` [pp, v, Lc]."""
  abstract = params_lib.flatten(params_lib.abstract_params(
      config, jnp.float32, layer_axes, quant_cfg))
  weights = {p: a for p, a in abstract.items() if not p[-1].endswith(quant.SCALE)}
  specs = {}
  for path, aval in weights.items():
    if path[0] == "blocks":
      specs[path] = _block_spec(path[-1], aval.ndim - 3)
    elif path == ("lm_head",) and vocab_sharded_head(config, mesh.shape[TP]):
      specs[path] = P(None, TP)  # vocab-parallel head (layout.vocab_sharded_head)
    else:
      specs[path] = P()
    if quant_cfg.applies(path):  # a scale keeps its weight's output axes' sharding
      dims = tuple(specs[path]) + (None,) * (aval.ndim - len(specs[path]))
      drop = quant.reduced_axes(path, aval.ndim, len(layer_axes))
      specs[quant.scale_path(path)] = P(*(d for i, d in enumerate(dims) if i not in drop))
  return params_lib.nest({p: NamedSharding(mesh, s) for p, s in specs.items()})


def rows_axis(mesh) -> str | None:
  """The mesh axis a row (sequence) axis is split over: 'dp' with replicas, else none."""
  return DP if mesh.shape[DP] > 1 else None


def manual_axes(mesh) -> set[str]:
  """The programs' manual axes: 'pp', and 'dp' with replicas (a size-1 manual axis is left
  out: XLA on CPU rejected an all-reduce over one next to a sharded 'tp')."""
  return {PP} | ({DP} if mesh.shape[DP] > 1 else set())


def cache_sharding(mesh, paged: bool = False) -> NamedSharding:
  """A dense cache [pp, v, Lc, M, b, K, S, H] over stages, replicas' rows and kv heads (a
  paged pool [pp, v, Lc, NB, K, BS, H]: over stages, replicas' blocks and kv heads),
  spelled as the programs' outputs are (no axis of size 1, no trailing None): jit keys its
  cache on the spelling, so a fresh cache would otherwise compile every program a second
  time."""
  lead = (PP, None, None) if paged else (PP, None, None, None)
  axes = [a if a is None or mesh.shape[a] > 1 else None for a in lead + (DP, TP)]
  while axes and axes[-1] is None:
    axes.pop()
  return NamedSharding(mesh, P(*axes))


def cache_spec(mesh, paged: bool = False) -> P:
  """The cache's spec inside the programs: its manual axes only (a paged pool's blocks
  split over 'dp' as a dense cache's rows are)."""
  lead = (PP, None, None) if paged else (PP, None, None, None)
  return P(*lead, rows_axis(mesh)) if rows_axis(mesh) else P(PP)


def param_specs(params) -> dict:
  """shard_map in_specs of the params: only the 'pp' part of each leaf's sharding is
  manual ('dp' replicates them)."""
  return jax.tree.map(lambda _: P(), params) | {
      "blocks": jax.tree.map(lambda _: P(PP), params["blocks"])}
