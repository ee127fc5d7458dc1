"""The parameter pytree of a Llama-family model: its shapes and where each leaf comes from.

Layout (dimension alphabet: L layers, D model, F ffn, N/K query/kv heads, H head dim, V vocab):

    embed                 [V, D]
    blocks/attn_norm/scale [L, D]
    blocks/attn/wq        [L, D, N, H]      blocks/attn/wk, wv  [L, D, K, H]
    blocks/attn/wo        [L, N, H, D]
    blocks/attn/bq        [L, N, H]         blocks/attn/bk, bv  [L, K, H]   (qkv_bias)
    blocks/attn/q_norm/scale [L, H]         blocks/attn/k_norm/scale [L, H] (qk_norm)
    blocks/mlp_norm/scale [L, D]
    blocks/mlp/w_gate     [L, D, F]         blocks/mlp/w_up     [L, D, F]
    blocks/mlp/w_down     [L, F, D]
    final_norm/scale      [D]
    lm_head               [D, V]            (absent when embeddings are tied)

Block leaves are stacked along a leading layer axis so a pipeline stage can `lax.scan` over
its own slice; `blocks` indexed at one layer is exactly the params of `model.llama.Block`.
Each leaf is stored input-dim first so the einsums read `'BTD,DNH->BTNH'` and tensor
parallelism shards the head / ffn axis. Hugging Face stores `[out, in]`; `HF_SOURCES` says
which HF tensor each leaf comes from and how to turn one layer of it into ours.

With 8-bit weights (`quant.py`) the projection leaves (and optionally embed / lm_head) hold
int8 or fp8 and each gains a `<name>_scale` sibling, e.g. `blocks/attn/wq_scale [L, N, H]`.
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
  """One leaf's origin: the HF tensor name (with `{i}` for the layer) and the conversion."""

  name: str
  to_ours: Callable[[np.ndarray, LlamaConfig], np.ndarray]
  stacked: bool  # True for per-layer tensors stacked along our leading L axis


def _heads(n_attr: str):
  def convert(w: np.ndarray, c: LlamaConfig) -> np.ndarray:  # [n*H, D] -> [D, n, H]
    return replicate_kv(w.T.reshape(c.hidden_size, _stored(c, n_attr), c.head_dim), c,
                        n_attr)
  return convert


def _bias(n_attr: str):
  def convert(b: np.ndarray, c: LlamaConfig) -> np.ndarray:  # [n*H] -> [n, H]
    return replicate_kv(b.reshape(_stored(c, n_attr), c.head_dim), c, n_attr)
  return convert


def _stored(c: LlamaConfig, n_attr: str) -> int:
  return c.checkpoint_kv_heads if n_attr == "num_kv_heads" else getattr(c, n_attr)


def replicate_kv(a, c: LlamaConfig, n_attr: str = "num_kv_heads"):
  """A kv leaf [..., K, H] with each head repeated `c.kv_replicas` times (`for_tp`)."""
  if n_attr != "num_kv_heads" or c.kv_replicas == 1:
    return a
  return a.repeat(c.kv_replicas, axis=-2)


KV_LEAVES = ("wk", "wv", "bk", "bv")  # leaves (and their 8-bit scales) with a kv-head axis


def _out_proj(w: np.ndarray, c: LlamaConfig) -> np.ndarray:  # [D, N*H] -> [N, H, D]
  return w.T.reshape(c.num_heads, c.head_dim, c.hidden_size)


def _transpose(w: np.ndarray, c: LlamaConfig) -> np.ndarray:
  del c
  return w.T


def _same(w: np.ndarray, c: LlamaConfig) -> np.ndarray:
  del c
  return w


_LAYER = "model.layers.{i}."
HF_SOURCES: dict[Path, HFSource] = {
    ("embed",): HFSource("model.embed_tokens.weight", _same, False),
    ("blocks", "attn_norm", "scale"): HFSource(_LAYER + "input_layernorm.weight", _same, True),
    ("blocks", "attn", "wq"): HFSource(_LAYER + "self_attn.q_proj.weight", _heads("num_heads"),
                                       True),
    ("blocks", "attn", "wk"): HFSource(_LAYER + "self_attn.k_proj.weight",
                                       _heads("num_kv_heads"), True),
    ("blocks", "attn", "wv"): HFSource(_LAYER + "self_attn.v_proj.weight",
                                       _heads("num_kv_heads"), True),
    ("blocks", "attn", "wo"): HFSource(_LAYER + "self_attn.o_proj.weight", _out_proj, True),
    ("blocks", "attn", "bq"): HFSource(_LAYER + "self_attn.q_proj.bias", _bias("num_heads"),
                                       True),
    ("blocks", "attn", "bk"): HFSource(_LAYER + "self_attn.k_proj.bias",
                                       _bias("num_kv_heads"), True),
    ("blocks", "attn", "bv"): HFSource(_LAYER + "self_attn.v_proj.bias",
                                       _bias("num_kv_heads"), True),
    ("blocks", "attn", "q_norm", "scale"): HFSource(_LAYER + "self_attn.q_norm.weight", _same,
                                                    True),
    ("blocks", "attn", "k_norm", "scale"): HFSource(_LAYER + "self_attn.k_norm.weight", _same,
                                                    True),
    ("blocks", "mlp_norm", "scale"): HFSource(_LAYER + "post_attention_layernorm.weight",
                                              _same, True),
    ("blocks", "mlp", "w_gate"): HFSource(_LAYER + "mlp.gate_proj.weight", _transpose, True),
    ("blocks", "mlp", "w_up"): HFSource(_LAYER + "mlp.up_proj.weight", _transpose, True),
    ("blocks", "mlp", "w_down"): HFSource(_LAYER + "mlp.down_proj.weight", _transpose, True),
    ("final_norm", "scale"): HFSource("model.norm.weight", _same, False),
    ("lm_head",): HFSource("lm_head.weight", _transpose, False),
}


def leaf_shapes(c: LlamaConfig) -> dict[Path, tuple[int, ...]]:
  """Our shape for every leaf (stacked leaves include the leading L)."""
  L, D, F, N, K, H, V = (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads,
                         c.num_kv_heads, c.head_dim, c.vocab_size)
  shapes = {
      ("embed",): (V, D),
      ("blocks", "attn_norm", "scale"): (L, D),
      ("blocks", "attn", "wq"): (L, D, N, H),
      ("blocks", "attn", "wk"): (L, D, K, H),
      ("blocks", "attn", "wv"): (L, D, K, H),
      ("blocks", "attn", "wo"): (L, N, H, D),
      ("blocks", "mlp_norm", "scale"): (L, D),
      ("blocks", "mlp", "w_gate"): (L, D, F),
      ("blocks", "mlp", "w_up"): (L, D, F),
      ("blocks", "mlp", "w_down"): (L, F, D),
      ("final_norm", "scale"): (D,),
      ("lm_head",): (D, V),
  }
  if c.qkv_bias:
    shapes |= {("blocks", "attn", "bq"): (L, N, H), ("blocks", "attn", "bk"): (L, K, H),
               ("blocks", "attn", "bv"): (L, K, H)}
  if c.qk_norm:
    shapes |= {("blocks", "attn", "q_norm", "scale"): (L, H),
               ("blocks", "attn", "k_norm", "scale"): (L, H)}
  if c.sandwich_norms:
    shapes |= {("blocks", "attn_post_norm", "scale"): (L, D),
               ("blocks", "mlp_post_norm", "scale"): (L, D)}
  if c.tie_word_embeddings:
    del shapes[("lm_head",)]
  return shapes


def _fused_qkv(part: int):
  """Phi-3's q|k|v rows [(N + 2K) * H, D] -> wq, wk or wv as every family has it."""
  def convert(w, c: LlamaConfig):
    q, kv = c.num_heads * c.head_dim, c.checkpoint_kv_heads * c.head_dim
    start, n_attr = ((0, "num_heads"), (q, "num_kv_heads"), (q + kv, "num_kv_heads"))[part]
    return _heads(n_attr)(w[start:start + (q if part == 0 else kv)], c)
  return convert


def _fused_half(part: int):
  """Phi-3's gate|up rows [2F, D] -> w_gate or w_up [D, F]."""
  def convert(w, c: LlamaConfig):
    F = c.intermediate_size
    return w[part * F:(part + 1) * F].T
  return convert


# Checkpoints with `fused_checkpoint` (Phi-3) hold these leaves inside two tensors a layer.
FUSED_SOURCES: dict[Path, HFSource] = {
    ("blocks", "attn", "wq"): HFSource(_LAYER + "self_attn.qkv_proj.weight", _fused_qkv(0),
                                       True),
    ("blocks", "attn", "wk"): HFSource(_LAYER + "self_attn.qkv_proj.weight", _fused_qkv(1),
                                       True),
    ("blocks", "attn", "wv"): HFSource(_LAYER + "self_attn.qkv_proj.weight", _fused_qkv(2),
                                       True),
    ("blocks", "mlp", "w_gate"): HFSource(_LAYER + "mlp.gate_up_proj.weight", _fused_half(0),
                                          True),
    ("blocks", "mlp", "w_up"): HFSource(_LAYER + "mlp.gate_up_proj.weight", _fused_half(1),
                                        True),
}


# Gemma 2's four norms a layer: its `post_attention_layernorm` is the attention output's
# (Llama's name for the MLP's input norm), `pre_feedforward_layernorm` the MLP's input's.
SANDWICH_SOURCES: dict[Path, HFSource] = {
    ("blocks", "attn_post_norm", "scale"): HFSource(
        _LAYER + "post_attention_layernorm.weight", _same, True),
    ("blocks", "mlp_norm", "scale"): HFSource(
        _LAYER + "pre_feedforward_layernorm.weight", _same, True),
    ("blocks", "mlp_post_norm", "scale"): HFSource(
        _LAYER + "post_feedforward_layernorm.weight", _same, True),
}


def hf_source(path: Path, c: LlamaConfig) -> HFSource:
  """Where leaf `path` comes from in `c`'s checkpoint format."""
  if c.fused_checkpoint and path in FUSED_SOURCES:
    return FUSED_SOURCES[path]
  if c.sandwich_norms and path in SANDWICH_SOURCES:
    return SANDWICH_SOURCES[path]
  return HF_SOURCES[path]


def hf_shape(path: Path, c: LlamaConfig) -> tuple[int, ...]:
  """The shape the HF tensor behind `path` must have (one layer for stacked leaves)."""
  if c.fused_checkpoint and path in FUSED_SOURCES:
    D, H = c.hidden_size, c.head_dim
    if path[-1] in ("w_gate", "w_up"):
      return (2 * c.intermediate_size, D)
    return ((c.num_heads + 2 * c.checkpoint_kv_heads) * H, D)
  ours = leaf_shapes(c)[path]
  if hf_source(path, c).stacked:
    ours = ours[1:]
  if path[-1] in KV_LEAVES:  # the checkpoint holds each kv head once
    ours = ours[:-2] + (c.checkpoint_kv_heads, ours[-1])
  if path[-1] in ("wq", "wk", "wv"):
    return (ours[1] * ours[2], ours[0])
  if path[-1] in ("bq", "bk", "bv"):
    return (ours[0] * ours[1],)
  if path[-1] == "wo":
    return (ours[2], ours[0] * ours[1])
  if len(ours) == 2 and path != ("embed",):
    return (ours[1], ours[0])
  return ours


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
      flat[p] = jax.ShapeDtypeStruct(s, quant.storage)
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
