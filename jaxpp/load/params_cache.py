"""A placed-params cache: load (and quantise) a HF checkpoint once, restore it every night.

The first run with `params_cache=DIR` reads the Hugging Face checkpoint, quantises it if asked
and saves the result with orbax under `DIR/params`, sharded as placed (each stage writes its
own layers). Later runs restore straight onto the devices, each reading only its own shard,
with no transposes and no re-quantisation.

A cache is only valid for what it was built from, so `DIR/jaxpp_params.json` records the
version of our params layout (`FORMAT`), the architecture, the checkpoint's weight files
(names and sizes), the dtype, the quantisation and the stacking of layers into stages (pp,
virtual stages, split: it fixes the arrays' shapes; tp does not, so one cache serves every
tp). A mismatch is a one-line error naming the field, never a silent reuse of the wrong
weights. The description is written after orbax has finished, so a run killed mid-save
leaves no description and the next run rebuilds.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax

from jaxpp.errors import JaxppError
from jaxpp.load import checkpoint
from jaxpp.model import params as params_lib
from jaxpp.model import quant as quant_lib
from jaxpp.model.config import LlamaConfig

DESCRIPTION = "jaxpp_params.json"
PARAMS = "params"
# The version of the params layout (`params.py`) a cache holds, bumped whenever a leaf
# changes, so that a cache of another layout is refused, never restored (2: fused wqkv,
# bqkv and w_gate_up; 3: 8-bit block leaves packed in pairs, model/packed8.py).
FORMAT = 3


def describe(ckpt_dir, config: LlamaConfig, dtype, layer_index,
             quant: quant_lib.Quant) -> dict:
  """What a cache holds; two runs may share a cache only if these are equal."""
  files = sorted(pathlib.Path(ckpt_dir).glob("*.safetensors"))
  return dict(format=FORMAT, architecture=json.loads(json.dumps(dataclasses.asdict(config))),
              weights={f.name: f.stat().st_size for f in files},
              dtype=jax.numpy.dtype(dtype).name, quant=quant.mode, quant_embed=quant.embed,
              layer_index=layer_index.tolist())


def load(cache_dir, ckpt_dir, config: LlamaConfig, dtype, shardings, layer_index,
         quant: quant_lib.Quant, read_clock: checkpoint.ReadClock | None = None) -> dict:
  """Params placed on `shardings`: restored from the cache, or built from HF and cached
  (`read_clock` times that build's reads)."""
  cache = pathlib.Path(cache_dir)
  want = describe(ckpt_dir, config, dtype, layer_index, quant)
  desc_file = cache / DESCRIPTION
  if desc_file.is_file():
    try:
      have = json.loads(desc_file.read_text())
    except json.JSONDecodeError:
      raise JaxppError(f"params cache {cache}: {DESCRIPTION} is not valid JSON") from None
    for key, value in want.items():
      if have.get(key) != value:
        raise JaxppError(f"params cache {cache} was built with a different {key} than this "
                         f"run needs ({_short(have.get(key))} vs {_short(value)}); point "
                         "params_cache elsewhere or delete it")
    abstract = params_lib.abstract_params(config, dtype, layer_index.shape, quant)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    return checkpoint.restore_params(cache / PARAMS, target)
  if cache.exists() and any(p.name != PARAMS for p in cache.iterdir()):
    raise JaxppError(f"params cache {cache} exists but is not a jaxpp params cache (no "
                     f"{DESCRIPTION}); point params_cache at a new or empty directory")
  params = checkpoint.load_hf_params(ckpt_dir, config, dtype, shardings=shardings,
                                     layer_index=layer_index, quant=quant,
                                     read_clock=read_clock)
  try:
    cache.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise JaxppError(f"params cache {cache}: cannot create it ({e.strerror})") from None
  checkpoint.save_params(cache / PARAMS, params, force=True)
  desc_file.write_text(json.dumps(want) + "\n")
  return params


def _short(value) -> str:
  text = json.dumps(value)
  return text if len(text) <= 60 else text[:57] + "..."
