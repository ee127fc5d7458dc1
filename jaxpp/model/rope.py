"""Rotary position embeddings, plain, with Llama 3 frequency scaling, or LongRoPE (Phi-3).

Uses Hugging Face's "rotate half" convention (the first and second halves of the head dim
form the complex pairs), so weights from HF checkpoints need no permutation.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxpp.model.config import LlamaConfig


def inverse_frequencies(c: LlamaConfig) -> np.ndarray:
  """f32[H/2]: rotation speed of each pair, after `rope_scaling` when configured."""
  h = c.head_dim
  inv = 1.0 / (c.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
  s = c.rope_scaling
  if s is None:
    return inv.astype(np.float32)
  if s.kind == "longrope":  # a factor per frequency, the long set beyond the pretraining length
    factors = np.asarray(s.long_factor if s.long else s.short_factor, np.float64)
    return (inv / factors).astype(np.float32)
  # Llama 3: keep high frequencies, divide low ones by `factor`, blend in between.
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
  smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor) /
            (s.high_freq_factor - s.low_freq_factor))
  blended = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, blended, scaled).astype(np.float32)


def cos_sin_scale(c: LlamaConfig) -> float:
  """The factor on cos and sin (LongRoPE's attention factor; 1 otherwise)."""
  s = c.rope_scaling
  return s.attention_factor if s is not None and s.kind == "longrope" else 1.0


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray,
               scale: float = 1.0) -> jnp.ndarray:
  """Rotates x [B, T, n, H] by the angles of positions [B, T], cos and sin times `scale`
  (`cos_sin_scale`); computed in float32."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  cos = jnp.cos(angles)[:, :, None, :] * scale
  sin = jnp.sin(angles)[:, :, None, :] * scale
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
