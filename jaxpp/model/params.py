"""The parameter pytree of a Llama-family model: its shapes and where each leaf comes from.

Layout (dimension alphabet: L layers, D model, F ffn, N/K query/kv heads, G = N // K query
heads a kv head, H head dim, V vocab; J, in einsums, a fused leaf's parts):

    embed                 [V, D]
    blocks/attn_norm/scale [L, D]
    blocks/attn/wqkv      [L, D, K, G + 2, H]
    blocks/attn/wo        [L, N, H, D]
    blocks/attn/bqkv      [L, K, G + 2, H]   (qkv_bias)
    blocks/attn/q_norm/scale [L, H]         blocks/attn/k_norm/scale [L, H] (qk_norm)
    blocks/mlp_norm/scale [L, D]
    blocks/mlp/w_gate_up  [L, D, 2, F]       gate, then up
    blocks/mlp/w_down     [L, F, D]
    final_norm/scale      [D]
    lm_head               [D, V]            (absent when embeddings are tied)

Block leaves are stacked along a leading layer axis so a pipeline stage can `lax.scan` over
its own slice; `blocks` indexed at one layer is exactly the params of `model.llama.Block`.
Each leaf is stored input-dim first so the einsums read `'BTD,DKJH->BTKJH'` and tensor
parallelism shards the kv-head / ffn axis. Hugging Face stores `[out, in]`; `HF_SOURCES`
says which HF tensors each leaf comes from and how to turn one layer of them into ours.

The q, k and v projections are one leaf, and gate and up another, so that a decode step
runs two GEMMs where it ran five, without concatenating weights every layer: alone, an 8B
model's wk and wv `[4096, 1024]` streamed 1.0 TB/s on an H200 against 3.1-3.5 for the
other projections (docs/benchmarks.md, "Where the 8B decode step goes"). wqkv[:, k, :G]
holds kv head k's G query heads (query head n = k * G + g: the grouping attention's
`[B, T, K, G, H]` reads), wqkv[:, k, G] its key head and wqkv[:, k, G + 1] its value head,
so a tp device's slice of the K axis holds whole groups. With kv heads replicated for tp
(`LlamaConfig.for_tp`, `replicate_kv`) K counts the copies and G shrinks to match.
w_gate_up[:, 0] is the gate, [:, 1] the up projection; tp splits F, so each device holds
its own gate and up columns.

With 8-bit weights (`quant.py`) the projection leaves (and optionally embed / lm_head) hold
int8 or fp8 and each gains a `<name>_scale` sibling, e.g. `blocks/attn/wqkv_scale
[L, K, G + 2, H]`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpp.model import quant as quant_lib
from jaxpp.model.config import LlamaConfig
from jaxpp.model.quant import Quant, scale_path, scale_shape

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class HFSource:
  """One leaf's origin: the HF tensors it is built from (names with `{i}` for the layer; a
  fused leaf has several) and the conversion of one layer of them, `to_ours(*tensors, c)`."""

  names: tuple[str, ...]
  to_ours: Callable[..., np.ndarray]
  stacked: bool  # True for per-layer tensors stacked along our leading L axis


# Which axis of each per-layer block leaf (its shape above without L) tensor parallelism
# splits: wqkv [D, K, G + 2, H] and bqkv [K, G + 2, H] their kv heads (each device whole
# groups of query heads with their key and value), wo [N, H, D] its query heads, w_gate_up
# [D, 2, F] and w_down [F, D] the ffn axis. The projections' 8-bit scales follow their
# leaf's output axes (`quant.py`).
TP_AXIS = {"wqkv": 1, "wo": 0, "w_gate_up": 2, "w_down": 0, "bqkv": 0}
KV_LEAVES = ("wqkv", "bqkv")  # leaves (and their 8-bit scales) [..., K, G + 2, H]


def replicate_kv(a, c: LlamaConfig):
  """A KV leaf [..., Kc, Gc + 2, H] of the checkpoint's Kc kv heads laid out for `c`'s
  K = Kc * r kv heads (r = `c.kv_replicas`, `LlamaConfig.for_tp`): copy j of kv head k is
  kv head k * r + j, with k's key and value and query heads j * G .. j * G + G - 1 of k's
  group (G = Gc / r), so query head n still sits at [n // G, n % G]. One gather, the same
  on the host (numpy) and on a device."""
  r = c.kv_replicas
  if r == 1:
    return a
  G = c.num_heads // c.num_kv_heads
  heads, slots = np.arange(c.num_kv_heads)[:, None], np.arange(G + 2)[None, :]
  group = np.where(slots < G, heads % r * G + slots, slots - G + G * r)  # k and v after Gc
  return a[..., heads // r, group, :]


def _fuse_qkv(q, k, v, c: LlamaConfig):
  """One layer's q [..., N * H] and k, v [..., Kc * H] (output channels last) -> ours
  [..., K, G + 2, H]: each kv head's query heads, then its key head, then its value head."""
  Kc, H = c.checkpoint_kv_heads, c.head_dim
  lead = q.shape[:-1]
  parts = (q.reshape(lead + (Kc, -1, H)), k.reshape(lead + (Kc, 1, H)),
           v.reshape(lead + (Kc, 1, H)))
  return replicate_kv(jnp.concatenate(parts, axis=-2), c)


def _qkv(q, k, v, c: LlamaConfig):  # [n * H, D] each -> [D, K, G + 2, H]
  return _fuse_qkv(q.T, k.T, v.T, c)


def _qkv_rows(w, c: LlamaConfig):
  """Phi-3's qkv_proj [(N + 2Kc) * H, D] (all q rows, then all k, then all v) -> wqkv."""
  q, kv = c.num_heads * c.head_dim, c.checkpoint_kv_heads * c.head_dim
  return _qkv(w[:q], w[q:q + kv], w[q + kv:], c)


def _gate_up(gate, up, c: LlamaConfig):  # [F, D] each -> [D, 2, F]
  del c
  return jnp.stack([gate.T, up.T], axis=1)


def _gate_up_rows(w, c: LlamaConfig):  # Phi-3's gate_up_proj [2F, D]: gate's rows, then up's
  return w.T.reshape(c.hidden_size, 2, c.intermediate_size)


def _out_proj(w: np.ndarray, c: LlamaConfig) -> np.ndarray:  # [D, N*H] -> [N, H, D]
  return w.T.reshape(c.num_heads, c.head_dim, c.hidden_size)


def _transpose(w: np.ndarray, c: LlamaConfig) -> np.ndarray:
  del c
  return w.T


def _same(w: np.ndarray, c: LlamaConfig) -> np.ndarray:
  del c
  return w


_LAYER = "model.layers.{i}."
_ATTN = _LAYER + "self_attn."
HF_SOURCES: dict[Path, HFSource] = {
    ("embed",): HFSource(("model.embed_tokens.weight",), _same, False),
    ("blocks", "attn_norm", "scale"): HFSource((_LAYER + "input_layernorm.weight",), _same,
                                               True),
    ("blocks", "attn", "wqkv"): HFSource(tuple(_ATTN + f"{x}_proj.weight" for x in "qkv"),
                                         _qkv, True),
    ("blocks", "attn", "wo"): HFSource((_ATTN + "o_proj.weight",), _out_proj, True),
    ("blocks", "attn", "bqkv"): HFSource(tuple(_ATTN + f"{x}_proj.bias" for x in "qkv"),
                                         _fuse_qkv, True),
    ("blocks", "attn", "q_norm", "scale"): HFSource((_ATTN + "q_norm.weight",), _same, True),
    ("blocks", "attn", "k_norm", "scale"): HFSource((_ATTN + "k_norm.weight",), _same, True),
    ("blocks", "mlp_norm", "scale"): HFSource((_LAYER + "post_attention_layernorm.weight",),
                                              _same, True),
    ("blocks", "mlp", "w_gate_up"): HFSource(
        (_LAYER + "mlp.gate_proj.weight", _LAYER + "mlp.up_proj.weight"), _gate_up, True),
    ("blocks", "mlp", "w_down"): HFSource((_LAYER + "mlp.down_proj.weight",), _transpose,
                                          True),
    ("final_norm", "scale"): HFSource(("model.norm.weight",), _same, False),
    ("lm_head",): HFSource(("lm_head.weight",), _transpose, False),
}


def leaf_shapes(c: LlamaConfig) -> dict[Path, tuple[int, ...]]:
  """Our shape for every leaf (stacked leaves include the leading L)."""
  L, D, F, N, K, H, V = (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads,
                         c.num_kv_heads, c.head_dim, c.vocab_size)
  G = N // K
  shapes = {
      ("embed",): (V, D),
      ("blocks", "attn_norm", "scale"): (L, D),
      ("blocks", "attn", "wqkv"): (L, D, K, G + 2, H),
      ("blocks", "attn", "wo"): (L, N, H, D),
      ("blocks", "mlp_norm", "scale"): (L, D),
      ("blocks", "mlp", "w_gate_up"): (L, D, 2, F),
      ("blocks", "mlp", "w_down"): (L, F, D),
      ("final_norm", "scale"): (D,),
      ("lm_head",): (D, V),
  }
  if c.qkv_bias:
    shapes[("blocks", "attn", "bqkv")] = (L, K, G + 2, H)
  if c.qk_norm:
    shapes |= {("blocks", "attn", "q_norm", "scale"): (L, H),
               ("blocks", "attn", "k_norm", "scale"): (L, H)}
  if c.sandwich_norms:
    shapes |= {("blocks", "attn_post_norm", "scale"): (L, D),
               ("blocks", "mlp_post_norm", "scale"): (L, D)}
  if c.tie_word_embeddings:
    del shapes[("lm_head",)]
  return shapes


# Checkpoints with `fused_checkpoint` (Phi-3) hold these leaves' layers in one tensor each.
FUSED_SOURCES: dict[Path, HFSource] = {
    ("blocks", "attn", "wqkv"): HFSource((_ATTN + "qkv_proj.weight",), _qkv_rows, True),
    ("blocks", "mlp", "w_gate_up"): HFSource((_LAYER + "mlp.gate_up_proj.weight",),
                                             _gate_up_rows, True),
}


# Gemma 2's four norms a layer: its `post_attention_layernorm` is the attention output's
# (Llama's name for the MLP's input norm), `pre_feedforward_layernorm` the MLP's input's.
SANDWICH_SOURCES: dict[Path, HFSource] = {
    ("blocks", "attn_post_norm", "scale"): HFSource(
        (_LAYER + "post_attention_layernorm.weight",), _same, True),
    ("blocks", "mlp_norm", "scale"): HFSource(
        (_LAYER + "pre_feedforward_layernorm.weight",), _same, True),
    ("blocks", "mlp_post_norm", "scale"): HFSource(
        (_LAYER + "post_feedforward_layernorm.weight",), _same, True),
}


def hf_source(path: Path, c: LlamaConfig) -> HFSource:
  """Where leaf `path` comes from in `c`'s checkpoint format."""
  if c.fused_checkpoint and path in FUSED_SOURCES:
    return FUSED_SOURCES[path]
  if c.sandwich_norms and path in SANDWICH_SOURCES:
    return SANDWICH_SOURCES[path]
  return HF_SOURCES[path]


def hf_shapes(path: Path, c: LlamaConfig) -> tuple[tuple[int, ...], ...]:
  """The shape each HF tensor behind `path` must have (one layer for stacked leaves), in
  the order of `hf_source(path, c).names`."""
  D, F, H = c.hidden_size, c.intermediate_size, c.head_dim
  q, kv = c.num_heads * H, c.checkpoint_kv_heads * H  # the checkpoint holds each kv head once
  fused = c.fused_checkpoint and path in FUSED_SOURCES
  if path[-1] == "wqkv":
    return ((q + 2 * kv, D),) if fused else ((q, D), (kv, D), (kv, D))
  if path[-1] == "bqkv":
    return ((q,), (kv,), (kv,))
  if path[-1] == "w_gate_up":
    return ((2 * F, D),) if fused else ((F, D), (F, D))
  ours = leaf_shapes(c)[path]
  if hf_source(path, c).stacked:
    ours = ours[1:]
  if path[-1] == "wo":
    return ((ours[2], ours[0] * ours[1]),)
  if len(ours) == 2 and path != ("embed",):
    return ((ours[1], ours[0]),)
  return (ours,)


def nest(flat: dict[Path, object]) -> dict:
  """{('a','b'): x} -> {'a': {'b': x}}."""
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return tree


def flatten(tree: dict, prefix: Path = ()) -> dict[Path, object]:
  """Inverse of `nest`."""
  flat: dict[Path, object] = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def abstract_params(c: LlamaConfig, dtype, layer_axes: tuple[int, ...] | None = None,
                    quant: Quant = Quant()) -> dict:
  """The params pytree as `jax.ShapeDtypeStruct`s (norm scales kept in float32).

  `layer_axes` replaces the leading [L] of block leaves, e.g. (pp, v, layers_per_chunk).
  Under `quant` the leaves it covers are 8-bit and gain a `<name>_scale` sibling in `dtype`.
  """
  shapes = leaf_shapes(c)
  lead = 1
  if layer_axes is not None:
    shapes = {p: (tuple(layer_axes) + s[1:] if p[0] == "blocks" else s)
              for p, s in shapes.items()}
    lead = len(layer_axes)
  flat = {}
  for p, s in shapes.items():
    if quant.applies(p):
      stored_dtype, stored_shape = quant.stored(p, s)
      flat[p] = jax.ShapeDtypeStruct(stored_shape, stored_dtype)
      flat[scale_path(p)] = jax.ShapeDtypeStruct(
          scale_shape(p, s, lead), dtype)
    else:
      flat[p] = jax.ShapeDtypeStruct(s, np.float32 if p[-1] == "scale" else dtype)
  return nest(flat)


def activation_dtype(params) -> jnp.dtype:
  """The dtype activations run in: the embedding's, or its scale's when it is 8-bit."""
  return params.get("embed_scale", params["embed"]).dtype


def quantize_params(params: dict, quant: quant_lib.Quant) -> dict:
  """A copy of a (nested) params tree in the plain [L, ...] layout, stored as `quant` says.

  The input is left as it is (tests compare against it); loading and random weights use
  `quant.store`, which frees each wide leaf as soon as its 8-bit form exists.
  """
  out = {}
  for path, leaf in flatten(params).items():
    quant_lib.store(out, path, leaf, quant, lead=1)
  return nest(out)
