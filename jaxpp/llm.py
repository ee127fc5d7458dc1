"""`jaxpp.LLM`: load a checkpoint once, generate completions for batches of prompts.

The user-facing front of the library. It turns prompts (text or token ids) into padded
arrays, runs prefill and then decode chunks until every row is finished, and turns the
emitted ids back into `Completion`s. The programs underneath are the pipeline's (`pipeline.py`),
for every layout.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpp import checkpoint, engine, params_cache, partition, pipeline, sampling
from jaxpp import mesh as mesh_lib
from jaxpp.errors import JaxppError
from jaxpp.model import params as params_lib
from jaxpp.model import quant as quant_lib
from jaxpp.model.config import LlamaConfig
from jaxpp.tokenizer import Tokenizer

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass
class Completion:
  """One prompt's result. `finish_reason` is "stop" (a stop token) or "length"."""

  token_ids: list[int]
  text: str | None
  finish_reason: str
  prompt_tokens: int


def resolve_dtype(name: str):
  if name not in DTYPES:
    raise JaxppError(f"dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}")
  return DTYPES[name]


class LLM:
  """A model placed on a (pp x tp) mesh from a Hugging Face checkpoint, ready to generate.

  Every layout, pp = tp = 1 included, runs through the pipeline executor; the single-device
  reference in `generate.py` exists to check it. `before_load(pipeline)` runs once the
  layout is checked and before any weight is read (the job's health probe).
  """

  def __init__(self, checkpoint_dir: str | pathlib.Path, *, pp: int = 1, tp: int = 1,
               virtual_stages: int = 1, microbatches: int | None = None,
               prefill_microbatches: int = 0, layer_split: str = "even", dtype: str = "bfloat16",
               max_len: int | None = None, decode_chunk: int = 16, devices=None,
               quant: str = "none", quant_embed: bool = False,
               params_cache_dir: str | pathlib.Path | None = None, attention: str = "auto",
               before_load: Callable[[pipeline.Pipeline], None] | None = None):
    """`quant` "int8" / "fp8" stores the block projections in 8 bits (also the embedding and
    LM head with `quant_embed`); `params_cache_dir` keeps the placed (quantised) params with
    orbax so the next run restores them instead of re-reading the HF checkpoint;
    `attention` is decode attention's implementation: "auto" (the fused Pallas kernel on
    GPUs at tp = 1, einsums elsewhere), "kernel" or "xla";
    `before_load(pipeline)` runs once the layout is checked, before any weight is read."""
    q = quant_lib.Quant(quant, quant_embed)
    config = checkpoint.load_config(checkpoint_dir)
    pipe = make_pipeline(config, pp=pp, tp=tp, virtual_stages=virtual_stages,
                         microbatches=microbatches, prefill_microbatches=prefill_microbatches,
                         layer_split=layer_split, devices=devices, attention=attention)
    quant_lib.check_backend(q, pipe.mesh.devices.flat[0])
    if before_load is not None:
      before_load(pipe)
    dtype, shardings = resolve_dtype(dtype), pipe.param_shardings(q)
    index = pipe.partition.layer_index()
    if params_cache_dir:
      params = params_cache.load(params_cache_dir, checkpoint_dir, config, dtype, shardings,
                                 index, quant=q)
    else:
      params = checkpoint.load_hf_params(checkpoint_dir, config, dtype, shardings=shardings,
                                         layer_index=index, quant=q)
    self._setup(config, pipe, params, Tokenizer.from_dir(checkpoint_dir), max_len,
                decode_chunk)

  @classmethod
  def from_params(cls, config: LlamaConfig, params, *, tokenizer: Tokenizer | None = None,
                  max_len: int | None = None, decode_chunk: int = 16, **layout) -> "LLM":
    """Places params held in the plain [L, ...] layout (random weights, tests) on a mesh.

    Params already quantised (`quant.quantize_params`) keep their 8-bit leaves and scales.
    """
    pipe = make_pipeline(config, **layout)
    index = pipe.partition.layer_index()
    q = quant_lib.detect(params)

    def restack(path, leaf):
      if path[0] != "blocks":
        return leaf
      host = np.asarray(leaf)
      return np.where((index >= 0).reshape(index.shape + (1,) * (host.ndim - 1)),
                      host[np.maximum(index, 0)], 0).astype(host.dtype)

    flat = params_lib.flatten(params)
    shardings = params_lib.flatten(pipe.param_shardings(q))
    placed = {p: jax.device_put(restack(p, x), shardings[p]) for p, x in flat.items()}
    return cls.on_pipeline(config, pipe, params_lib.nest(placed), tokenizer=tokenizer,
                           max_len=max_len, decode_chunk=decode_chunk)

  @classmethod
  def on_pipeline(cls, config: LlamaConfig, pipe: pipeline.Pipeline, params, *,
                  tokenizer: Tokenizer | None = None, max_len: int | None = None,
                  decode_chunk: int = 16) -> "LLM":
    """Wraps params already placed in `pipe`'s layout (e.g. generated on the devices)."""
    self = cls.__new__(cls)
    self._setup(config, pipe, params, tokenizer, max_len, decode_chunk)
    return self

  def _setup(self, config, pipe, params, tokenizer, max_len, decode_chunk):
    self.config, self.pipeline, self.params, self.tokenizer = config, pipe, params, tokenizer
    self.dtype = params_lib.activation_dtype(params)
    limit = config.max_position_embeddings
    self.max_len = max_len or min(limit, 4096)
    if self.max_len > limit:
      raise JaxppError(f"max_len={self.max_len} exceeds the model's "
                       f"max_position_embeddings={limit}")
    if decode_chunk < 1:
      raise JaxppError(f"decode_chunk={decode_chunk} must be >= 1")
    self.decode_chunk = decode_chunk

  def encode(self, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    """Token ids for each prompt; text needs the checkpoint's tokenizer.json."""
    ids = []
    for i, p in enumerate(prompts):
      if isinstance(p, str):
        if self.tokenizer is None:
          raise JaxppError("text prompts need a tokenizer.json in the checkpoint; "
                           "pass token ids instead")
        p = self.tokenizer.encode(p)
      p = [int(t) for t in p]
      if not p:
        raise JaxppError(f"prompt {i} is empty")
      bad = [t for t in p if not 0 <= t < self.config.vocab_size]
      if bad:
        raise JaxppError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                         f"[0, {self.config.vocab_size})")
      if len(p) >= self.max_len:
        raise JaxppError(f"prompt {i} has {len(p)} tokens; the context (max_len) is "
                         f"{self.max_len}, leaving no room to generate")
      ids.append(p)
    return ids

  def _prefill(self, ids: list[list[int]], params_s: sampling.SamplingParams, *,
               with_logits: bool = False):
    """Splits prompts into micro-batches and runs the pipeline's prefill over them."""
    B, M = len(ids), self.pipeline.microbatches
    lengths = np.array([len(p) for p in ids], np.int32)
    tokens = np.zeros((B, min(pipeline.bucket(int(lengths.max())), self.max_len)), np.int32)
    for i, p in enumerate(ids):
      tokens[i, :len(p)] = p
    mb = lambda a, fill: jnp.asarray(pipeline.to_microbatches(np.asarray(a), M, fill))
    params_s = sampling.SamplingParams(*(mb(a, 0) for a in params_s))
    lengths_mb = mb(lengths, 1)
    cache = self.pipeline.init_cache(lengths_mb.shape[1], self.max_len, self.dtype)
    slots = jnp.asarray(pipeline.identity_slots(M, lengths_mb.shape[1]))
    out = self.pipeline.prefill(self.params, cache, mb(tokens, 0), lengths_mb, slots,
                                params_s, do_sample=params_s.needs_sampling(),
                                with_logits=with_logits)
    return out, lengths_mb, params_s

  def prompt_logits(self, prompts: Sequence[str | Sequence[int]]) -> np.ndarray:
    """f32[B, V]: next-token logits after each prompt (the distribution of token one)."""
    ids = self.encode(prompts)
    (_, _, logits), _, _ = self._prefill(ids, sampling.SamplingParams.make(len(ids)),
                                         with_logits=True)
    return np.asarray(logits).reshape(-1, logits.shape[-1])[:len(ids)]

  def generate(self, prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int = 64,
               temperature=0.0, top_k=0, top_p=1.0, seed=0) -> list[Completion]:
    """One completion per prompt. Sampling knobs are scalars or one value per prompt.

    Generation stops at a stop id, after `max_new_tokens`, or when the context (max_len)
    is full ("length"). Runs on the batch engine with one slot per prompt.
    """
    if max_new_tokens < 1:
      raise JaxppError(f"max_new_tokens={max_new_tokens} must be >= 1")
    ids = self.encode(prompts)
    knobs = sampling.SamplingParams.make(len(ids), temperature=temperature, top_k=top_k,
                                         top_p=top_p, seed=seed)
    eng = engine.Engine(self, max_num_seqs=len(ids))
    for i, p in enumerate(ids):
      eng.submit(engine.Request(
          key=str(i), prompt=p, max_new_tokens=min(max_new_tokens, self.max_len - len(p) + 1),
          temperature=float(knobs.temperature[i]), top_k=int(knobs.top_k[i]),
          top_p=float(knobs.top_p[i]), seed=int(knobs.seed[i])))
    done: dict[str, engine.Finished] = {}
    eng.run(lambda f: done.__setitem__(f.request.key, f))
    return [self._completion(done[str(i)], len(p)) for i, p in enumerate(ids)]

  def _completion(self, finished, prompt_tokens: int) -> Completion:
    ids = finished.token_ids
    text = self.tokenizer.decode(ids) if self.tokenizer is not None else None
    return Completion(ids, text, finished.finish_reason, prompt_tokens)


def parse_layout(text: str) -> dict:
  """Parses a layout like "pp4tp2v2m8p16" into make_pipeline arguments (v, m, p optional;
  p: prefill micro-batches)."""
  m = re.fullmatch(r"pp(\d+)tp(\d+)(?:v(\d+))?(?:m(\d+))?(?:p(\d+))?", text)
  if not m:
    raise JaxppError(f"layout {text!r} is not of the form ppXtpY[vZ][mW][pN]")
  pp, tp, v, mb, pm = m.groups()
  return dict(pp=int(pp), tp=int(tp), virtual_stages=int(v or 1),
              microbatches=int(mb) if mb else None, prefill_microbatches=int(pm or 0))


def make_pipeline(config: LlamaConfig, *, pp: int = 1, tp: int = 1, virtual_stages: int = 1,
                  microbatches: int | None = None, prefill_microbatches: int = 0,
                  layer_split: str = "even", devices=None,
                  scan_unroll: int | bool = 1, attention: str = "auto") -> pipeline.Pipeline:
  """Checks a layout and builds its pipeline; every mistake is reported before compiling.

  `devices` defaults to the first pp*tp devices, so a small layout runs on a big host.
  `microbatches` defaults to pp (the fewest that keep the decode ring full);
  `prefill_microbatches` (0: 8 per stage, `schedule.prefill_microbatches`) is how many the
  engine cuts a prefill of every slot into.
  `layer_split` is "even", "balanced" (parameter counts: the embedding weighs on the first
  chunk and the LM head on the last), or explicit per-chunk counts like "21,20,20,19".
  `attention` is "auto" (the fused decode kernel on GPUs at tp = 1), "kernel" or "xla"
  (`pipeline.Pipeline.attention`).
  """
  m = pp if microbatches is None else microbatches
  if devices is None:
    available = jax.devices()
    if pp * tp > len(available):
      raise JaxppError(f"pp*tp = {pp}*{tp} = {pp * tp} but only {len(available)} devices "
                       "are available")
    devices = available[:pp * tp]
  mesh = mesh_lib.make_mesh(pp=pp, tp=tp, devices=devices)
  pipeline.check_microbatches(pp, m, virtual_stages)
  L = config.num_layers
  if layer_split == "even":
    part = partition.even(L, pp, virtual_stages)
  elif layer_split == "balanced":
    block = config.block_param_count()
    vocab = config.vocab_size * config.hidden_size
    part = partition.balanced(L, pp, virtual_stages, layer_cost=block, embed_cost=vocab,
                              head_cost=vocab)
  else:
    part = partition.explicit(layer_split, L, pp, virtual_stages)
  return pipeline.Pipeline(config, mesh, part, m, scan_unroll, prefill_microbatches,
                           attention)


def devices_summary(devices=None) -> str:
  """One line naming the devices (default: all of the backend), for logs."""
  devs = list(jax.devices() if devices is None else devices)
  return f"{len(devs)} x {devs[0].platform} ({devs[0].device_kind})"
