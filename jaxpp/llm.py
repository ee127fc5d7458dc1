"""`jaxpp.LLM`: load a checkpoint once, generate completions for batches of prompts.

The user-facing front of the library. It turns prompts (text or token ids) into padded
arrays, runs prefill and then decode chunks until every row is finished, and turns the
emitted ids back into `Completion`s. The programs underneath are the pipeline's
(`parallel/pipeline.py`), for every layout; the batch engine (`serve/engine.py`) streams the
prompts through its slots.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpp.errors import JaxppError
from jaxpp.load import checkpoint, weights
from jaxpp.load.chat_template import Message
from jaxpp.load.tokenizer import Tokenizer
from jaxpp.model import params as params_lib
from jaxpp.model import quant as quant_lib
from jaxpp.model import sampling
from jaxpp.model.config import LlamaConfig
from jaxpp.parallel import packing, shapes
from jaxpp.parallel.layout import Layout
from jaxpp.parallel.pipeline import Pipeline
from jaxpp.serve import defaults, requests
from jaxpp.serve import engine as engine_lib

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass
class Completion:
  """One prompt's result. `finish_reason` is "stop" (a stop token or string) or "length"."""

  token_ids: list[int]
  text: str | None
  finish_reason: str
  prompt_tokens: int
  truncated_tokens: int = 0  # prompt tokens cut from the start (length_policy="truncate")
  sample: int = 0  # which of the prompt's `n` samples this is
  # with generate(logprobs=k): each token's logprob under the model (raw logits) and its k
  # likeliest alternatives as (id, logprob), likeliest first
  logprobs: list[float] | None = None
  top_logprobs: list[list[tuple[int, float]]] | None = None


# dtype="auto": the checkpoint's own, with float16 computed in bfloat16 (jaxpp's two widths)
AUTO_DTYPES = {"bfloat16": "bfloat16", "float16": "bfloat16", "float32": "float32"}


def resolve_dtype(name: str, checkpoint_dir=None):
  """The activation and weight dtype `name` means: "bfloat16", "float32", or "auto", the
  checkpoint's (`checkpoint.checkpoint_dtype`; float16 runs in bfloat16)."""
  if name == "auto":
    if checkpoint_dir is None:
      raise JaxppError('dtype "auto" takes the checkpoint\'s dtype; there is no checkpoint')
    stored = checkpoint.checkpoint_dtype(checkpoint_dir)
    if stored not in AUTO_DTYPES:
      raise JaxppError(f"checkpoint {checkpoint_dir} declares dtype {stored!r}; pass dtype as "
                       f"one of {', '.join(DTYPES)}")
    name = AUTO_DTYPES[stored]
  if name not in DTYPES:
    raise JaxppError(f"dtype {name!r} is not supported; choose one of "
                     f"{', '.join(DTYPES)} or auto")
  return DTYPES[name]


def check_context(config: LlamaConfig, max_len: int, decode_chunk: int) -> int:
  """The context (max_len; 0 = the model's, at most 4,096) after checking it and
  decode_chunk against the model, so a job can refuse them before anything loads."""
  limit = config.max_position_embeddings
  if max_len < 0 or max_len == 1:
    raise JaxppError(f"max_len={max_len} must be >= 2 (0 = the model's, at most 4096)")
  max_len = max_len or min(limit, 4096)
  if max_len > limit:
    raise JaxppError(f"max_len={max_len} exceeds the model's max_position_embeddings={limit}")
  if decode_chunk < 0:
    raise JaxppError(f"decode_chunk={decode_chunk} must be >= 1 (0 = from the layout)")
  return max_len


def sample_seeds(seeds: np.ndarray, n: int) -> np.ndarray:
  """Seeds of `n` samples per prompt from prompt-major repeated seeds: sample 0 keeps its
  prompt's seed (so n=1 is unchanged), sample k adds k times an odd constant (mod 2**32),
  distinct for every k < 2**32."""
  k = np.tile(np.arange(n, dtype=np.uint64), len(seeds) // n)
  return ((np.asarray(seeds, np.uint64) + k * 0x9E3779B9) & 0xFFFFFFFF).astype(np.uint32)


LENGTH_POLICIES = ("error", "truncate")  # generate's, for prompts that leave no room


class LLM:
  """A model placed on a layout from a Hugging Face checkpoint, ready to generate.

  Every layout, pp = tp = 1 included, runs through the pipeline executor; the single-device
  reference (`serve/reference.py`) exists to check it. Construction is three plain steps,
  each callable on its own: `Pipeline.build` (the layout checked and placed on a mesh),
  `load.weights.load_weights`, then `LLM.on_pipeline`; the batch job runs its health probe
  between the first two.
  """

  def __init__(self, checkpoint_dir: str | pathlib.Path, *, layout: Layout | str = "pp1tp1",
               dtype: str = "bfloat16", max_len: int | None = None, decode_chunk: int = 0,
               devices=None, quant: str = "none", quant_embed: bool = False,
               params_cache_dir: str | pathlib.Path | None = None, attention: str = "auto",
               dp: int | None = None, block_size: int = defaults.BLOCK_SIZE,
               kv_cache_memory: float = 0.0, prefix_cache: bool = False,
               prefill_chunk: int = 0, kv_dtype: str = "auto", kv_grow: bool = False):
    """`layout` is a `Layout` or its name ("pp4tp2v2m8", "dp2pp2tp2"), `dp` (if given) its
    replicas, 0 = as many as the devices hold; `quant` "int8" / "fp8" stores the
    block projections in 8 bits (also the embedding and LM head with `quant_embed`);
    `params_cache_dir` keeps the placed (quantised) params with orbax so the next run
    restores them instead of re-reading the HF checkpoint; `attention` picks both phases'
    attention (model/attention_choice.py): "auto" (on GPUs the fused decode kernel at
    tp = 1 and cuDNN's flash prefill; einsums elsewhere), "kernel" or "xla". The KV cache is paged in
    blocks of `block_size` positions (0: dense, max_len per slot) within `kv_cache_memory`
    per device (0: a share of the free memory, <= 1: that share, > 1: GB); `prefix_cache`
    lets prompts that start alike share their cached blocks, and `prefill_chunk` > 0 cuts
    prefills to that many tokens a step (`serve/prompt_pieces.py`); `kv_dtype="fp8"` stores
    keys and values in e4m3 (model/kv_cache.py), "auto" in the activations' dtype;
    `kv_grow` admits a request with its prompt's blocks and grows them as it decodes,
    swapping the newest sequence out to host memory when the pool runs dry
    (`serve/kv_swap.py`)."""
    q = quant_lib.Quant(quant, quant_embed)
    dtype = resolve_dtype(dtype, checkpoint_dir)
    config = checkpoint.load_config(checkpoint_dir)
    if dp is not None:  # 0 (or a "dp0..." name): as many as the devices hold (Pipeline.build)
      layout = dataclasses.replace(Layout.of(layout), dp=dp)
    pipe = Pipeline.build(config, layout, devices=devices, attention=attention,
                          max_len=check_context(config, max_len or 0, decode_chunk))
    params = weights.load_weights(checkpoint_dir, pipe, dtype, quant=q,
                                  cache_dir=params_cache_dir)
    self._setup(config, pipe, params, Tokenizer.from_dir(checkpoint_dir), max_len,
                decode_chunk, block_size=block_size, kv_cache_memory=kv_cache_memory,
                prefix_cache=prefix_cache, prefill_chunk=prefill_chunk, kv_dtype=kv_dtype,
                kv_grow=kv_grow)

  @classmethod
  def from_params(cls, config: LlamaConfig, params, *, layout: Layout | str = "pp1tp1",
                  tokenizer: Tokenizer | None = None, max_len: int | None = None,
                  decode_chunk: int = 0, devices=None, attention: str = "auto",
                  **cache) -> "LLM":
    """Places params held in the plain [L, ...] layout (random weights, tests) on `layout`;
    `cache`: `block_size`, `kv_cache_memory` as `LLM` takes them."""
    pipe = Pipeline.build(config, layout, devices=devices, attention=attention,
                          max_len=check_context(config, max_len or 0, decode_chunk))
    return cls.on_pipeline(config, pipe, weights.place_plain(pipe, params),
                           tokenizer=tokenizer, max_len=max_len, decode_chunk=decode_chunk,
                           **cache)

  @classmethod
  def on_pipeline(cls, config: LlamaConfig, pipe: Pipeline, params, *,
                  tokenizer: Tokenizer | None = None, max_len: int | None = None,
                  decode_chunk: int = 0, **cache) -> "LLM":
    """Wraps params already placed in `pipe`'s layout (e.g. generated on the devices);
    `cache`: the KV cache's knobs as `LLM` takes them."""
    self = cls.__new__(cls)
    self._setup(config, pipe, params, tokenizer, max_len, decode_chunk, **cache)
    return self

  def _setup(self, config, pipe, params, tokenizer, max_len, decode_chunk, **cache):
    self.config, self.pipeline, self.params, self.tokenizer = config, pipe, params, tokenizer
    # the engines' KV cache: block_size, kv_cache_memory, prefix_cache, prefill_chunk,
    # kv_dtype, kv_grow
    self.cache_options = dict(block_size=defaults.BLOCK_SIZE) | cache
    self.dtype = params_lib.activation_dtype(params)
    self.max_len = check_context(config, max_len or 0, decode_chunk)
    self.decode_chunk = decode_chunk or defaults.decode_chunk(pipe.layout)
    self._engines: dict[int | None, engine_lib.Engine] = {}  # generate's, by slot count

  @property
  def layout(self) -> Layout:
    return self.pipeline.layout

  def engine(self, *, max_num_seqs: int | None = None, reserve: dict[str, int] | None = None,
             watchdog=None, **cache) -> engine_lib.Engine:
    """A batch engine over this model's pipeline, weights, context and stop ids; its KV
    cache as this LLM's, or as `cache` says (`Engine`'s block_size, kv_cache_memory,
    kv_blocks, prefix_cache, prefill_chunk, kv_dtype, kv_grow)."""
    return engine_lib.Engine(
        self.pipeline, self.params, max_len=self.max_len, decode_chunk=self.decode_chunk,
        eos_ids=self.config.eos_token_ids, max_num_seqs=max_num_seqs, reserve=reserve,
        watchdog=watchdog, detokenize=self.tokenizer.decode if self.tokenizer else None,
        **(self.cache_options | cache))

  def encode(self, prompts: Sequence[str | Sequence[int]], fit: int | None = None
             ) -> list[tuple[list[int], int]]:
    """(token ids, tokens cut) for each prompt; text needs the checkpoint's tokenizer.json.

    A prompt that leaves no room to generate in the context is an error, or with `fit`
    (new tokens to leave room for) has its start cut to `max_len - fit + 1` tokens.
    """
    out = []
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
      cut = 0
      if fit is not None and len(p) > self.max_len - fit + 1:
        keep = max(self.max_len - fit + 1, 1)
        cut, p = len(p) - keep, p[len(p) - keep:]
      if len(p) >= self.max_len:
        raise JaxppError(f"prompt {i} has {len(p)} tokens; the context (max_len) is "
                         f"{self.max_len}, leaving no room to generate (length_policy="
                         "\"truncate\" cuts its start)")
      out.append((p, cut))
    return out

  def _prefill_all(self, ids: list[list[int]], knobs: sampling.SamplingParams, *,
                   with_logits: bool = False):
    """Prefills every prompt into its own cache row (prompt i in slot (i // b, i % b) of the
    ring's m micro-batches); returns the program's outputs [m, b(, V)], lengths and knobs
    [m, b]."""
    M = self.pipeline.microbatches
    T = min(shapes.bucket(max(map(len, ids))), self.max_len)
    batch = packing.one_per_row(ids, M, T, self.pipeline.dp)
    rows = M * batch.tokens.shape[1]  # p rows a micro-batch, a multiple of dp
    mb = lambda a, fill: shapes.to_microbatches(
        np.concatenate([np.asarray(a), np.full(rows - len(ids), fill, np.asarray(a).dtype)]),
        M, fill)
    knobs = sampling.SamplingParams(*(mb(a, 0) for a in knobs))
    lengths = batch.lengths[..., 0]
    cache = self.pipeline.init_cache(lengths.shape[1], self.max_len, self.dtype)
    out = self.pipeline.prefill(self.params, cache, batch,
                                sampling.SamplingParams(*(a[..., None] for a in knobs)),
                                do_sample=knobs.needs_sampling(), with_logits=with_logits)
    out = (out[0][..., 0],) + tuple(out[1:2]) + tuple(o[:, :, 0] for o in out[2:])
    return out, jnp.asarray(lengths), knobs

  def prompt_logits(self, prompts: Sequence[str | Sequence[int]]) -> np.ndarray:
    """f32[B, V]: next-token logits after each prompt (the distribution of token one)."""
    ids = [p for p, _ in self.encode(prompts)]
    (_, _, logits), _, _ = self._prefill_all(ids, sampling.SamplingParams.make(len(ids)),
                                         with_logits=True)
    return np.asarray(logits).reshape(-1, logits.shape[-1])[:len(ids)]

  def generate(self, prompts: str | Sequence[str | Sequence[int]], *,
               max_new_tokens: int = 64, temperature=0.0, top_k=0, top_p=1.0, seed=0,
               min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
               max_num_seqs: int | None = None, length_policy: str = "error",
               stop: str | Sequence[str] = (), stop_token_ids: Sequence[int] = (),
               n: int = 1, logprobs: int | None = None) -> list[Completion]:
    """One completion per prompt (a single string is one prompt). Sampling knobs are scalars
    or one value per prompt.

    Prompts stream through a fixed number of slots (`max_num_seqs`; default: what memory
    holds, as the job's engine), so the programs' shapes, and their compiles, do not depend
    on how many prompts a call passes. A prompt with no room for `max_new_tokens` in the
    context is an error before anything runs (`length_policy="error"`), or has its start cut
    (`"truncate"`: `Completion.truncated_tokens` says how much). Generation stops at a stop
    id (the checkpoint's EOS ids and `stop_token_ids`, the stop token kept), at a `stop`
    string (matched on the text across tokens, left out of `text`; the
    token that completed it is the last of `token_ids`), after `max_new_tokens`, or when
    the context is full ("length"). With `n` > 1 each prompt is sampled n times, sample k
    seeded from (its seed, k) so every sample is reproducible; the completions come prompt
    by prompt, `completions[i * n + k]` being sample k of prompt i (`Completion.sample`).
    `logprobs=k` (0 to 20) also returns each token's logprob and its k likeliest
    alternatives, computed on the devices from the logits that sampled it (the model's own,
    before penalties and temperature). `repetition_penalty` (over prompt and output, 1 =
    off), `presence_penalty` and `frequency_penalty` (over the output, 0 = off) mean what
    they mean in transformers and OpenAI's API (`model/penalties.py`).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise JaxppError(f"n={n!r} must be an integer >= 1")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= sampling.MAX_TOP_LOGPROBS):
      raise JaxppError(f"logprobs={logprobs!r} must be an integer in [0, "
                       f"{sampling.MAX_TOP_LOGPROBS}] (alternatives per token) or None")
    if max_new_tokens < 1:
      raise JaxppError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if length_policy not in LENGTH_POLICIES:
      raise JaxppError(f"length_policy={length_policy!r}; choose one of "
                       f"{', '.join(LENGTH_POLICIES)}")
    if isinstance(prompts, str):
      prompts = [prompts]
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if stop and (self.tokenizer is None or not all(isinstance(s, str) and s for s in stop)):
      raise JaxppError(f"stop={stop!r}: stop strings are non-empty strings and need the "
                       "checkpoint's tokenizer.json")
    stop_ids = tuple(int(t) for t in stop_token_ids)
    if any(not 0 <= t < self.config.vocab_size for t in stop_ids):
      raise JaxppError(f"stop_token_ids={list(stop_ids)}: ids must lie in [0, "
                       f"{self.config.vocab_size})")
    return self._run(self.encode(prompts, fit=None if length_policy == "error" else
                                 max_new_tokens), max_new_tokens=max_new_tokens,
                     temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                     min_p=min_p, repetition_penalty=repetition_penalty,
                     presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                     max_num_seqs=max_num_seqs, stop=stop, stop_ids=stop_ids, n=n,
                     logprobs=logprobs)

  def chat(self, conversations: Sequence[Message] | Sequence[Sequence[Message]], *,
           add_generation_prompt: bool = True, **generate_kwargs) -> list[Completion]:
    """`generate` on conversations ([{"role", "content"}, ...], or a list of them), laid
    out by the checkpoint's chat template exactly as transformers' `apply_chat_template`
    lays them out (one BOS, the template's)."""
    if self.tokenizer is None:
      raise JaxppError("chat needs the checkpoint's tokenizer.json and chat template")
    if conversations and isinstance(conversations[0], dict):
      conversations = [conversations]
    ids = [self.tokenizer.apply_chat_template(c, add_generation_prompt)
           for c in conversations]
    return self.generate(ids, **generate_kwargs)

  def _run(self, encoded: list[tuple[list[int], int]], *, max_new_tokens: int,
           max_num_seqs: int | None, stop: tuple[str, ...], stop_ids: tuple[int, ...], n: int,
           logprobs: int | None = None, **knob_values) -> list[Completion]:
    knobs = sampling.SamplingParams(*sampling.SamplingParams.checked(len(encoded),
                                                                     **knob_values))
    if n > 1:  # prompt-major copies; sample k's seed is derived from (seed, k)
      encoded = [e for e in encoded for _ in range(n)]
      knobs = sampling.SamplingParams(*(np.repeat(np.asarray(a), n) for a in knobs))
      knobs = knobs._replace(seed=sample_seeds(knobs.seed, n))
    # One engine per slot count, kept: its cache and programs serve every later call. One
    # that failed mid-call may hold queued requests, so it is dropped.
    eng = self._engines.pop(max_num_seqs, None) or self.engine(max_num_seqs=max_num_seqs)
    for i, (p, _) in enumerate(encoded):
      eng.submit(requests.Request(
          key=str(i), prompt=p, max_new_tokens=min(max_new_tokens, self.max_len - len(p) + 1),
          stop=stop, stop_token_ids=stop_ids, logprobs=logprobs,
          **{f: np.asarray(a)[i].item() for f, a in knobs._asdict().items()}))
    done: dict[str, requests.Finished] = {}
    eng.run(lambda f: done.__setitem__(f.request.key, f))
    self._engines[max_num_seqs] = eng
    return [dataclasses.replace(self._completion(done[str(i)], len(p), cut), sample=i % n)
            for i, (p, cut) in enumerate(encoded)]

  def _completion(self, finished, prompt_tokens: int, truncated: int) -> Completion:
    ids = finished.token_ids
    text = finished.text
    if text is None and self.tokenizer is not None:
      text = self.tokenizer.decode(ids)
    return Completion(ids, text, finished.finish_reason, prompt_tokens, truncated,
                      logprobs=finished.logprobs, top_logprobs=finished.top_logprobs)


def devices_summary(devices=None) -> str:
  """One line naming the devices (default: all of the backend), for logs."""
  devs = list(jax.devices() if devices is None else devices)
  return f"{len(devs)} x {devs[0].platform} ({devs[0].device_kind})"
