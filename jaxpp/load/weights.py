"""Weights onto a pipeline's devices: the one call between a checked layout and a model.

`load_weights` reads a Hugging Face checkpoint straight into the pipeline's placement (or
restores the orbax params cache built from it, `params_cache.py`), quantising as asked;
`place_plain` stacks params already in memory, in the plain [L, ...] layout (tests, random
weights, training), into the same placement. Either way the result is what the pipeline's
programs take, and nothing is read before the layout has been checked.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from jaxpp.load import checkpoint, params_cache
from jaxpp.model import params as params_lib
from jaxpp.model import quant as quant_lib
from jaxpp.parallel.pipeline import Pipeline


def load_weights(checkpoint_dir: str | pathlib.Path, pipe: Pipeline, dtype, *,
                 quant: quant_lib.Quant = quant_lib.Quant(),
                 cache_dir: str | pathlib.Path | None = None,
                 read_clock: checkpoint.ReadClock | None = None) -> dict:
  """The checkpoint's params placed as `pipe` holds them (from `cache_dir` when it has them);
  `read_clock` times the reads of the checkpoint's files (none when the cache has them)."""
  quant_lib.check_backend(quant, pipe.mesh.devices.flat[0])
  shardings, index = pipe.param_shardings(quant), pipe.partition.layer_index()
  if cache_dir:
    return params_cache.load(cache_dir, checkpoint_dir, pipe.config, dtype, shardings, index,
                             quant=quant, read_clock=read_clock)
  return checkpoint.load_hf_params(checkpoint_dir, pipe.config, dtype, shardings=shardings,
                                   layer_index=index, quant=quant, read_clock=read_clock)


def place_plain(pipe: Pipeline, params: dict) -> dict:
  """Params in the plain [L, ...] layout, stacked per stage and placed as `pipe` holds them.

  Params already quantised (`params.quantize_params`) keep their 8-bit leaves and scales;
  kv heads are replicated where the pipeline's tp exceeds them (`LlamaConfig.for_tp`).
  """
  index = pipe.partition.layer_index()

  def restack(path, leaf):
    if path[0] != "blocks":
      return leaf
    host = np.asarray(leaf)
    if path[-1].removesuffix(quant_lib.SCALE) in params_lib.KV_LEAVES:
      host = params_lib.replicate_kv(host, pipe.config)  # tp > kv heads (`for_tp`)
    return np.where((index >= 0).reshape(index.shape + (1,) * (host.ndim - 1)),
                    host[np.maximum(index, 0)], 0).astype(host.dtype)

  flat = params_lib.flatten(params)
  shardings = params_lib.flatten(pipe.param_shardings(quant_lib.detect(params)))
  return params_lib.nest({p: jax.device_put(restack(p, x), shardings[p])
                          for p, x in flat.items()})
