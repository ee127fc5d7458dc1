"""The Llama-family decoder in Flax: the repeated block plus embedding and head.

The block is a pure function of (block params, activations, cache): `Block.apply` takes
one layer's params (see `params.py`) and a view of that layer's cached keys/values, and
returns new activations plus the keys/values of its new tokens. It knows nothing about
pipelines; `run_blocks` scans a stack of layers and writes the new keys/values into the
cache in place.

Cache protocol, shared by prefill and decode: row b's cache holds valid entries at positions
< start[b]; its T new tokens sit at positions start[b] .. start[b]+T-1 and are written there
after attention. Queries see cached keys before start[b] and new keys causally, so junk
beyond a row's length (right padding, finished rows) is never read.

The cache's layouts (dense rows, or a paged pool) are `kv_cache.py`'s.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpp.model import (decode_attention, int8_matmul, kv_cache, prefill_attention,
                         prefix_attention, quant)
from jaxpp.model import params as params_lib
from jaxpp.model.attention_choice import Kernels
from jaxpp.model.config import LlamaConfig
from jaxpp.model.rope import apply_rope, cos_sin_scale, inverse_frequencies

NEG_INF = -1e30

class RMSNorm(nn.Module):
  """Root-mean-square norm, statistics in float32 (as Llama does). With `offset` (Gemma)
  the scale is 1 + w and applies in float32 before the cast, as transformers' Gemma does;
  Llama casts first, then scales."""

  eps: float
  offset: bool = False

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.offset:
      return (normed * (1.0 + scale)).astype(x.dtype)
    return (normed.astype(x.dtype) * scale).astype(x.dtype)


def _weight(module: nn.Module, name: str, shape: tuple[int, ...], quantized: bool,
            inplace: dict | None = None):
  """A matmul weight and, when the block is 8-bit, its per-output-channel scale (or None);
  with `inplace` holding `name` (a decode step's 8-bit views, `layer_views`), that view,
  which the kernel reads where the stack lies (its scale inside)."""
  if inplace and name in inplace:
    return inplace[name], None
  if not quantized:
    return module.param(name, nn.initializers.normal(0.02), shape, module.dtype), None
  # stored packed in pairs along the last axis (packed8.py); quant.einsum unpacks
  w = module.param(name, nn.initializers.normal(0.02), (*shape[:-1], shape[-1] // 2),
                   module.dtype)
  out_shape = shape[quant.INPUT_DIMS[name]:]
  return w, module.param(name + quant.SCALE, nn.initializers.ones, out_shape, module.dtype)


class Attention(nn.Module):
  """Grouped-query attention (K kv heads shared by N/K query heads each) over a KV cache."""

  config: LlamaConfig
  dtype: jnp.dtype
  quantized: bool = False
  kernels: Kernels = Kernels()  # which phases run their fused kernel (attention_choice.py)
  # the cache's storage (None: the activations' dtype). Attention returns the new keys and
  # values as the cache stores them (`kv_cache.to_cache`); with scaled e4m3 the new tokens
  # also attend to them so, and a token sees the same keys whether they were computed in
  # its pass or read back from the cache (a prefix hit, an earlier chunk)
  kv_dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x, positions, start, cache: kv_cache.LayerCache | None, segments=None,
               window=0, inplace=None):
    """cache: this layer's view of the cache, or None when nothing is cached; segments
    [B, T]: which prompt of a packed row each token belongs to (None: one per row);
    window: the layer's sliding window (an int, or a traced scalar; 0 = none); inplace:
    8-bit weights read in place by the kernel (`layer_views`), by name. Returns the output
    and the new keys' and values' stored forms (each `kv_cache.to_cache`'s tuple)."""
    c = self.config
    D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    B, T, G = x.shape[0], x.shape[1], N // K
    # one projection for q, k and v: per kv head its G query heads, its key, its value
    wqkv = _weight(self, "wqkv", (D, K, G + 2, H), self.quantized, inplace)
    wo = _weight(self, "wo", (N, H, D), self.quantized, inplace)
    inv_freq = inverse_frequencies(c)
    qkv = quant.einsum("BTD,DKJH->BTKJH", x, *wqkv)
    if c.qkv_bias:  # Qwen2
      qkv = qkv + self.param("bqkv", nn.initializers.zeros, (K, G + 2, H), self.dtype)
    q, k, v = qkv[..., :G, :].reshape(B, T, N, H), qkv[..., G, :], qkv[..., G + 1, :]
    if c.qk_norm:  # Qwen3: each head of q and k normalised over H before RoPE
      q = RMSNorm(c.rms_norm_eps, name="q_norm")(q)
      k = RMSNorm(c.rms_norm_eps, name="k_norm")(k)
    scale = cos_sin_scale(c)
    q = apply_rope(q, positions, inv_freq, scale)
    k = apply_rope(k, positions, inv_freq, scale)
    # query head n = k * G + g, as wqkv groups them; Gemma 2 scales by query_pre_attn_scalar
    q = q.reshape(B, T, K, G, H) * (c.query_scale or H ** -0.5)
    stored = tuple(kv_cache.to_cache(a, self.kv_dtype or a.dtype) for a in (k, v))
    if kv_cache.scaled(self.kv_dtype or k.dtype):
      k, v = (kv_cache.widen(*kept, k.dtype) for kept in stored)
    out = attend(q, k, v, positions, start, cache, self.dtype, segments=segments,
                 kernels=self.kernels, window=window, softcap=c.attn_softcap)
    out = quant.einsum("BTNH,NHD->BTD", out.reshape(B, T, N, H), *wo)
    return out, stored


def _within(query_pos, key_pos, window):
  """Where a key is inside the query's sliding window (True everywhere for window 0)."""
  if isinstance(window, int):
    return True if window == 0 else query_pos - key_pos < window
  return (window == 0) | (query_pos - key_pos < window)


def attend(q, k, v, positions, start, cache: kv_cache.LayerCache | None, dtype, *,
           segments=None, kernels: Kernels = Kernels(), window=0, softcap: float = 0.0):
  """Attention of T new tokens over the cache and themselves (causally) -> [B, T, K, G, H].

  q [B, T, K, G, H] (scaled by H**-0.5), k/v [B, T, K, H]: the new tokens'. One-token steps
  with `kernels.decode` run the cache's part in decode_attention's kernel, and a fresh
  prefill (nothing cached) with `kernels.prefill` runs in prefill_attention's; otherwise
  one softmax over [cached | new] by XLA, reading the cache in place, never concatenated;
  a piece continuing a prefix in a paged cache (prefix caching, chunked prefill) with
  `kernels.prefill` runs in prefix_attention's kernel, which reads the prefix's blocks
  where they lie.
  With `segments` [B, T] (a packed prefill row, nothing cached) a token attends only to
  earlier tokens of its own segment; without, a row is one causal sequence. A `window`
  (int or traced scalar, 0 = none) keeps a token to the keys less than `window` positions
  before it, in every path; the prefill kernel takes it only as an int (a traced one, from
  layers of different windows, runs XLA's attention). `softcap` (static, Gemma 2) caps
  every score at +-softcap with tanh before the mask; cuDNN's kernel has no such cap, so
  those prefills run XLA's attention too.
  """
  B, T, K, G, H = q.shape
  if cache is None and kernels.prefill and isinstance(window, int) and not softcap:
    segs = jnp.zeros((B, T), jnp.int32) if segments is None else segments
    out = prefill_attention.attend(q.reshape(B, T, K * G, H), k, v, segs, on_gpu=kernels.gpu,
                                   window=window)
    return out.reshape(B, T, K, G, H)
  if (cache is not None and cache.tables is not None and T > 1 and kernels.prefill
      and prefix_attention.supports(H)):  # a piece continuing a cached prefix (paged)
    lengths = (jnp.full((B,), T, jnp.int32) if segments is None else
               jnp.sum(segments >= 0, axis=1).astype(jnp.int32))
    return prefix_attention.attend(q, k, v, cache.keys, cache.values, cache.at, cache.tables,
                                   start, lengths, window=window, softcap=softcap,
                                   scales=cache.scales)
  if cache is not None and kernels.decode and T == 1:
    # the first cached position inside the window (the token itself is at `start`)
    first = (jnp.zeros_like(start) if isinstance(window, int) and window == 0 else
             jnp.where(window == 0, 0, jnp.maximum(start - window + 1, 0)))
    pieces = decode_attention.attend(q[:, 0], cache.keys, cache.values, cache.at, start,
                                     first, softcap=softcap, tables=cache.tables,
                                     scales=cache.scales)
    return decode_attention.combine(*pieces, q[:, 0], k[:, 0], v[:, 0], dtype,
                                    softcap=softcap)[:, None]
  causal = positions[:, None, None, None, :] <= positions[:, None, None, :, None]
  causal &= _within(positions[:, None, None, :, None], positions[:, None, None, None, :],
                    window)
  if segments is not None:
    causal &= segments[:, None, None, None, :] == segments[:, None, None, :, None]
  scores = jnp.where(causal, decode_attention.soft_cap(jnp.einsum(
      "BTKGH,BUKH->BKGTU", q, k, preferred_element_type=jnp.float32), softcap), NEG_INF)
  if cache is None:
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("BKGTU,BUKH->BTKGH", probs, v)
  old_k, old_v = kv_cache.layer_keys(cache, dtype)
  S = old_k.shape[2]
  idx = jnp.arange(S)[None, None, :]
  cached = (idx < start[:, None, None]) & _within(positions[:, :, None], idx, window)  # [B,T,S]
  old = jnp.einsum("BTKGH,BKSH->BKGTS", q, old_k, preferred_element_type=jnp.float32)
  old = jnp.where(cached[:, None, None], decode_attention.soft_cap(old, softcap), NEG_INF)
  probs = jax.nn.softmax(jnp.concatenate([old, scores], axis=-1), axis=-1).astype(dtype)
  return (jnp.einsum("BKGTS,BKSH->BTKGH", probs[..., :S], old_v) +
          jnp.einsum("BKGTU,BUKH->BTKGH", probs[..., S:], v))


class MLP(nn.Module):
  """Gated feed-forward: down(act(gate(x)) * up(x)), act SiLU (SwiGLU) or tanh-approximated
  GELU (GeGLU, Gemma)."""

  config: LlamaConfig
  dtype: jnp.dtype
  quantized: bool = False

  @nn.compact
  def __call__(self, x, inplace=None):
    D, F = self.config.hidden_size, self.config.intermediate_size
    w_gate_up = _weight(self, "w_gate_up", (D, 2, F), self.quantized, inplace)
    w_down = _weight(self, "w_down", (F, D), self.quantized, inplace)
    act = jax.nn.silu if self.config.activation == "silu" else functools.partial(
        jax.nn.gelu, approximate=True)
    gate_up = quant.einsum("BTD,DJF->BTJF", x, *w_gate_up)  # one GEMM: gate, then up
    h = act(gate_up[..., 0, :]) * gate_up[..., 1, :]
    return quant.einsum("BTF,FD->BTD", h, *w_down)


class Block(nn.Module):
  """One decoder layer: pre-norm attention and pre-norm MLP, each with a residual."""

  config: LlamaConfig
  dtype: jnp.dtype
  quantized: bool = False  # 8-bit projections with per-channel scales (quant.py)
  kernels: Kernels = Kernels()  # see Attention
  kv_dtype: jnp.dtype | None = None  # see Attention

  @nn.compact
  def __call__(self, x, positions, start, cache: kv_cache.LayerCache | None, segments=None,
               window=0, inplace=None):
    """`inplace`: {"attn": {...}, "mlp": {...}} 8-bit views (`layer_views`) or None."""
    c = self.config
    inplace = inplace or {}
    norm = functools.partial(RMSNorm, c.rms_norm_eps, c.norm_offset)
    attn_out, new_kv = Attention(c, self.dtype, self.quantized, self.kernels, self.kv_dtype,
                                 name="attn")(
        norm(name="attn_norm")(x), positions, start, cache, segments, window,
        inplace.get("attn"))
    if c.sandwich_norms:  # Gemma 2: each sublayer's output normalised before its residual
      attn_out = norm(name="attn_post_norm")(attn_out)
    x = x + attn_out
    mlp_out = MLP(c, self.dtype, self.quantized, name="mlp")(norm(name="mlp_norm")(x),
                                                            inplace.get("mlp"))
    if c.sandwich_norms:
      mlp_out = norm(name="mlp_post_norm")(mlp_out)
    return x + mlp_out, new_kv


def run_blocks(c: LlamaConfig, blocks, x, positions, start, cache: kv_cache.KVCache, *, chunk=0,
               microbatch=0, slots=None, segments=None, fresh: bool = False,
               num_layers=None, unroll: int | bool = 1, kernels: Kernels = Kernels(),
               windows=None, pages: kv_cache.Pages | None = None):
  """Scans x [b, T, D] through the Lc layers of one chunk; returns (x, cache).

  `blocks` leaves are [v, Lc, ...] and `cache` leaves [v, Lc, M, b, K, S, H] (an fp8
  cache's scales: the same less H; kv_cache.py). Layer i reads
  its weights at [chunk, i] and rows their cached keys at [chunk, i, microbatch], both
  inside the layer loop: with chunk and microbatch constants XLA (GPU) hands cuBLAS those
  slices in place; a traced chunk or micro-batch made it copy them first (pipeline.py
  therefore passes constants). After the layer loop every layer's new keys/values are
  scattered at the tokens' positions in one in-place update. `slots` = (micro-batch, row),
  each i32[b] or i32[b, T] (per token: a packed prefill row fills several slots), sends the
  writes elsewhere (prefill of new requests into free decode slots; a micro-batch of -1
  writes nothing); default: row r of `microbatch`. `segments` as in `attend`. `fresh`
  (prefill from position 0) skips reading the cache. `num_layers` (may be traced) runs
  only the first layers of the stack, so chunks shorter than the padded stack do no
  compute on padding. `unroll` is `lax.scan`'s (docs/design.md: a rolled loop over stacked
  weights can cost decode bandwidth on GPU). `kernels` says which phases' attention runs
  in its fused kernel (`attend`). `windows` i32[v, Lc] gives each layer's sliding window
  (`window_table`) when the config's layers differ (`c.window` is None); otherwise every
  layer takes the config's one window, a constant. With `pages` the cache is a paged pool
  [v, Lc, NB, K, BS, H] (`microbatch` and `slots` unused): rows read and write it through
  `pages` (see kv_cache.Pages).
  """
  if c.window is None and windows is None:
    raise ValueError("layers with different sliding windows need run_blocks' `windows`")
  quantized = "wqkv" + quant.SCALE in blocks["attn"]
  block = Block(c, x.dtype, quantized=quantized, kernels=kernels,
                kv_dtype=cache[0].dtype)
  b, T = x.shape[:2]
  # a decode step's 8-bit projections: the kernel reads each layer where its stack lies
  inplace = quantized and kernels.weights8 and T == 1
  sliced = layer_rest(blocks) if inplace else blocks
  ck, cv, *scales = cache  # scales: an fp8 cache's (key_scales, value_scales)
  k_dtype = ck.dtype
  if pages is None:
    kv_at = lambda i: kv_cache.LayerCache(ck, cv, (chunk, i, microbatch), None,
                                          tuple(scales) or None)
    write = kv_cache.dense_targets(b, T, positions, cache, microbatch, slots)
  else:
    kv_at = lambda i: kv_cache.LayerCache(ck, cv, (chunk, i), pages.tables,
                                          tuple(scales) or None)
    write = kv_cache.paged_targets(positions, pages, ck.shape[4])

  def layer(carry, _):
    x, i = carry
    params = jax.tree.map(lambda a: a[chunk, i], sliced)
    views = layer_views(blocks, (chunk, i)) if inplace else None

    def compute(_):
      kv = None if fresh else kv_at(i)
      window = c.window if c.window is not None else windows[chunk, i]
      y, ((k, *k_scale), (v, *v_scale)) = block.apply(
          {"params": params}, x, positions, start, kv, segments, window, views)
      return (y, k, v, *k_scale, *v_scale)

    def skip(_):  # K: dense or paged
      return (x,) + kv_cache.zeros((b, T, ck.shape[-3], ck.shape[-1]), k_dtype)

    if num_layers is None:
      x, *new = compute(None)
    else:
      x, *new = jax.lax.cond(i < num_layers, compute, skip, None)
    return (x, i + 1), tuple(new)

  # The loop only reads the cache; all layers' new keys/values are written after it in one
  # scatter. Writing inside the loop made XLA copy the whole cache once per layer.
  Lc = ck.shape[1]
  (x, _), new = jax.lax.scan(layer, (x, jnp.int32(0)), None, length=Lc, unroll=unroll)
  # [Lc, b, T] targets (the K axis sliced between them, so k's [Lc, b, T, K, H] fits as is,
  # and a scale's [Lc, b, T, K]); padding layers' writes land in unread slots
  at = (chunk, jnp.arange(Lc)[:, None, None]) + tuple(a[None] for a in write[:-1]) + (
      slice(None), write[-1][None])
  return x, tuple(a.at[at].set(n, mode="drop") for a, n in zip(cache, new))


def layer_views(blocks, index) -> dict:
  """{"attn": {...}, "mlp": {...}}: each 8-bit projection of `blocks` (leaves [v, Lc, ...])
  as an `int8_matmul.LayerWeight` of layer `index` = (chunk, i), for `Block`'s `inplace`
  (with the axis tp splits, so that each tp device runs the kernel on its own shard)."""
  return {part: {name: int8_matmul.LayerWeight(
                     leaves[name], leaves[name + quant.SCALE], tuple(index),
                     quant.INPUT_DIMS[name], params_lib.TP_AXIS.get(name))
                 for name in quant.INPUT_DIMS if name + quant.SCALE in leaves}
          for part, leaves in blocks.items() if part in ("attn", "mlp")}


def layer_rest(blocks) -> dict:
  """`blocks` without the leaves `layer_views` covers (8-bit projections and scales)."""
  covered = set(quant.INPUT_DIMS) | {name + quant.SCALE for name in quant.INPUT_DIMS}
  return {part: ({name: leaf for name, leaf in leaves.items() if name not in covered}
                 if part in ("attn", "mlp") else leaves)
          for part, leaves in blocks.items()}


def embed(c: LlamaConfig, params, tokens, dtype) -> jnp.ndarray:
  """tokens [B, T] -> activations [B, T, D] (an 8-bit embedding is rescaled per row; Gemma
  multiplies by its `embed_scale` in the activation dtype, as transformers does)."""
  x = params["embed"][tokens].astype(dtype)
  if "embed" + quant.SCALE in params:
    x = x * params["embed" + quant.SCALE][tokens][..., None].astype(dtype)
  return x if c.embed_scale == 1.0 else x * jnp.asarray(c.embed_scale, dtype)


def logits(c: LlamaConfig, params, x, kernels: Kernels = Kernels()) -> jnp.ndarray:
  """Final norm and LM head (the embedding when tied): [B, T, D] -> f32 [B, T, V], capped
  with `final_softcap` (Gemma 2). An 8-bit untied head (`quant_embed`) in a one-token step
  with `kernels.weights8` runs in int8_matmul's kernel, as the block projections do (XLA
  would widen all V x D weights to bf16 first, every step), split over 'tp' by vocab."""
  x = RMSNorm(c.rms_norm_eps, c.norm_offset).apply({"params": params["final_norm"]}, x)
  name, spec = ("embed", "BTD,VD->BTV") if c.tie_word_embeddings else ("lm_head", "BTD,DV->BTV")
  scale = params.get(name + quant.SCALE)
  if name == "lm_head" and scale is not None and kernels.weights8 and x.shape[1] == 1:
    head = int8_matmul.LayerWeight(params[name][None], scale[None], (0,), 1, tp_axis=1)
    out = int8_matmul.project(x, head, out_dtype=jnp.float32)
  else:
    out = jnp.einsum(spec, x, params[name].astype(x.dtype), preferred_element_type=jnp.float32)
    out = out if scale is None else out * scale.astype(jnp.float32)
  return decode_attention.soft_cap(out, c.final_softcap)


def window_table(c: LlamaConfig, layer_index) -> np.ndarray:
  """i32 windows of the model layers `layer_index` names (any shape; -1, padding: 0)."""
  windows = np.asarray(c.sliding_windows or (0,) * c.num_layers, np.int32)
  index = np.asarray(layer_index)
  return np.where(index >= 0, windows[np.maximum(index, 0)], 0).astype(np.int32)
