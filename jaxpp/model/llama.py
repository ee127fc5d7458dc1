"""The Llama-family decoder in Flax: the repeated block plus embedding and head.

The block is a pure function of (block params, activations, cache slice): `Block.apply`
takes one layer's params (see `params.py`) and returns new activations and the updated KV
slice. It knows nothing about pipelines; a pipeline stage calls `run_blocks` on its own
stacked slice of layers, and the single-device path calls it on all of them.

Cache protocol, shared by prefill and decode: row b writes its T new keys/values at
positions `start[b] .. start[b]+T-1` and its queries attend to every cached key at a
position <= their own. Prompts are right-padded; padded rows write junk past the prompt
that is overwritten by the next token before any query can see it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpp.model.config import LlamaConfig
from jaxpp.model.rope import apply_rope, inverse_frequencies

KVCache = tuple[jnp.ndarray, jnp.ndarray]  # keys, values: [B, S, K, H] each
NEG_INF = -1e30


class RMSNorm(nn.Module):
  """Root-mean-square norm, statistics in float32 (as Llama does)."""

  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed.astype(x.dtype) * scale).astype(x.dtype)


def _write_cache(cache: jnp.ndarray, new: jnp.ndarray, start: jnp.ndarray) -> jnp.ndarray:
  """cache [B, S, K, H] <- new [B, T, K, H] at per-row offsets start [B]."""
  def one(c, n, s):
    return jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), s, axis=0)
  return jax.vmap(one)(cache, new, start)


class Attention(nn.Module):
  """Grouped-query attention (K kv heads shared by N/K query heads each) with a KV cache."""

  config: LlamaConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, positions, start, cache: KVCache, fresh: bool):
    c = self.config
    D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    init = nn.initializers.normal(0.02)
    wq = self.param("wq", init, (D, N, H), self.dtype)
    wk = self.param("wk", init, (D, K, H), self.dtype)
    wv = self.param("wv", init, (D, K, H), self.dtype)
    wo = self.param("wo", init, (N, H, D), self.dtype)
    inv_freq = inverse_frequencies(c)
    q = apply_rope(jnp.einsum("BTD,DNH->BTNH", x, wq), positions, inv_freq)
    k = apply_rope(jnp.einsum("BTD,DKH->BTKH", x, wk), positions, inv_freq)
    v = jnp.einsum("BTD,DKH->BTKH", x, wv)
    cache_k = _write_cache(cache[0], k, start)
    cache_v = _write_cache(cache[1], v, start)
    if fresh:  # prefill from position 0: attend to this call's keys only (T x T, not T x S)
      keys, values, key_pos = k, v, positions
    else:
      keys, values = cache_k.astype(self.dtype), cache_v.astype(self.dtype)
      key_pos = jnp.arange(keys.shape[1])[None, :]
    B, T = x.shape[:2]
    q = q.reshape(B, T, K, N // K, H)  # G = N // K query heads per kv head
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, keys,
                        preferred_element_type=jnp.float32) * (H ** -0.5)
    visible = key_pos[:, None, None, None, :] <= positions[:, None, None, :, None]
    probs = jax.nn.softmax(jnp.where(visible, scores, NEG_INF), axis=-1)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(self.dtype), values)
    out = jnp.einsum("BTNH,NHD->BTD", out.reshape(B, T, N, H), wo)
    return out, (cache_k, cache_v)


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  config: LlamaConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    D, F = self.config.hidden_size, self.config.intermediate_size
    init = nn.initializers.normal(0.02)
    w_gate = self.param("w_gate", init, (D, F), self.dtype)
    w_up = self.param("w_up", init, (D, F), self.dtype)
    w_down = self.param("w_down", init, (F, D), self.dtype)
    h = jax.nn.silu(jnp.einsum("BTD,DF->BTF", x, w_gate)) * jnp.einsum("BTD,DF->BTF", x, w_up)
    return jnp.einsum("BTF,FD->BTD", h, w_down)


class Block(nn.Module):
  """One decoder layer: pre-norm attention and pre-norm MLP, each with a residual."""

  config: LlamaConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, positions, start, cache: KVCache, fresh: bool = False):
    eps = self.config.rms_norm_eps
    attn_out, cache = Attention(self.config, self.dtype, name="attn")(
        RMSNorm(eps, name="attn_norm")(x), positions, start, cache, fresh)
    x = x + attn_out
    x = x + MLP(self.config, self.dtype, name="mlp")(RMSNorm(eps, name="mlp_norm")(x))
    return x, cache


def run_blocks(c: LlamaConfig, blocks, x, positions, start, cache: KVCache, *,
               fresh: bool = False, num_layers=None):
  """Scans x through stacked block params; cache leaves are [L, B, S, K, H].

  `num_layers` (optional, may be traced) runs only the first layers of the stack and leaves
  the rest untouched: pipeline stages with fewer layers than the padded stack do no compute
  on padding.
  """
  block = Block(c, x.dtype)

  def layer(carry, inputs):
    x, i = carry
    params, ck, cv = inputs

    def compute(_):
      return block.apply({"params": params}, x, positions, start, (ck, cv), fresh)

    if num_layers is None:
      y, (ck, cv) = compute(None)
    else:
      y, (ck, cv) = jax.lax.cond(i < num_layers, compute, lambda _: (x, (ck, cv)), None)
    return (y, i + 1), (ck, cv)

  (x, _), cache = jax.lax.scan(layer, (x, jnp.int32(0)), (blocks, cache[0], cache[1]))
  return x, cache


def embed(params, tokens, dtype) -> jnp.ndarray:
  """tokens [B, T] -> activations [B, T, D]."""
  return params["embed"][tokens].astype(dtype)


def logits(c: LlamaConfig, params, x) -> jnp.ndarray:
  """Final norm and LM head (the embedding when tied): [B, T, D] -> f32 [B, T, V]."""
  x = RMSNorm(c.rms_norm_eps).apply({"params": params["final_norm"]}, x)
  if c.tie_word_embeddings:
    return jnp.einsum("BTD,VD->BTV", x, params["embed"].astype(x.dtype),
                      preferred_element_type=jnp.float32)
  return jnp.einsum("BTD,DV->BTV", x, params["lm_head"].astype(x.dtype),
                    preferred_element_type=jnp.float32)


def init_cache(c: LlamaConfig, batch: int, max_len: int, dtype, num_layers=None) -> KVCache:
  """Zeroed KV cache for `num_layers` (default all) layers: two [L, B, S, K, H] arrays."""
  shape = (num_layers or c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
  return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
