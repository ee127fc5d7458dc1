"""Model architecture as a frozen dataclass, read from a Hugging Face `config.json`.

Named sizes follow the project's dimension alphabet: D model, F ffn, N query heads,
K kv heads, H head dim, L layers, V vocab. Run-time knobs (dtype, mesh, batch) do not live
here; they belong to the run config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxpp.errors import JaxppError

# model_type -> the features it sets; the decoder math is Llama's plus these (sliding
# windows are read per family: `_sliding_windows`)
FAMILIES = {"llama": {}, "mistral": {}, "qwen2": dict(qkv_bias=True),
            "qwen3": dict(qk_norm=True), "phi3": dict(fused_checkpoint=True),
            "gemma": dict(norm_offset=True),
            "gemma2": dict(norm_offset=True, sandwich_norms=True)}
# HF activation names -> the MLP's (a gated MLP either way: down(act(gate) * up))
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """`rope_scaling`: `llama3` (Llama 3.1+, frequency-dependent interpolation) or `longrope`
  (Phi-3's, formerly `su`: a factor per frequency, short or long, and an attention factor
  on cos and sin). Which longrope factors a run uses depends on its context
  (`LlamaConfig.for_context`), as transformers uses the long ones for sequences beyond
  `original_max_position_embeddings`."""

  original_max_position_embeddings: int
  kind: str = "llama3"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  short_factor: tuple[float, ...] = ()
  long_factor: tuple[float, ...] = ()
  attention_factor: float = 1.0
  long: bool = False  # longrope: the long factors are in use


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama-family decoder (the fields of HF `config.json` we honour).

  Families differ by named features (`qkv_bias`, `qk_norm`), set from `model_type` in one
  place (`FAMILIES`), not by a class per family: the layer math reads the features.
  """

  vocab_size: int  # V
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  eos_token_ids: tuple[int, ...] = ()
  bos_token_id: int | None = None
  qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2 / Qwen2.5)
  qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
  # Per layer, how far back a token attends (it sees keys at most window - 1 positions
  # before it, as transformers' sliding-window mask); 0 = the whole context; () = no
  # layer has a window (Mistral's `sliding_window`, Qwen's sliding `layer_types`).
  sliding_windows: tuple[int, ...] = ()
  # Copies of each checkpoint kv head that num_kv_heads counts (`for_tp`); 1 = as stored.
  kv_replicas: int = 1
  # The checkpoint stores q|k|v as one `qkv_proj` and gate|up as one `gate_up_proj` (Phi-3);
  # they are split on loading into the leaves every family has.
  fused_checkpoint: bool = False
  # Gemma: RMSNorm scales by (1 + w); the embedding is multiplied by `embed_scale`
  # (sqrt(D)); Gemma 2 also normalises each sublayer's output before its residual
  # (`sandwich_norms`), caps attention scores and final logits at +-cap with tanh
  # (`attn_softcap`, `final_softcap`; 0 = none) and scales queries by
  # query_pre_attn_scalar**-0.5 (`query_scale`; 0 = head_dim**-0.5).
  norm_offset: bool = False
  embed_scale: float = 1.0
  sandwich_norms: bool = False
  activation: str = "silu"  # the gated MLP's: "silu" or "gelu_tanh"
  attn_softcap: float = 0.0
  final_softcap: float = 0.0
  query_scale: float = 0.0
  model_type: str = "llama"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise JaxppError(
          f"num_attention_heads={self.num_heads} is not a multiple of "
          f"num_key_value_heads={self.num_kv_heads}")
    if self.sliding_windows and len(self.sliding_windows) != self.num_layers:
      raise JaxppError(f"sliding_windows has {len(self.sliding_windows)} entries for "
                       f"{self.num_layers} layers")

  @property
  def checkpoint_kv_heads(self) -> int:
    """kv heads as the checkpoint stores them (num_kv_heads counts replicas)."""
    return self.num_kv_heads // self.kv_replicas

  def for_tp(self, tp: int) -> "LlamaConfig":
    """The architecture as `tp` devices run it: with more devices than kv heads (tp a
    multiple of them), each kv head is replicated tp / K times, as vLLM does, so that
    every device holds one kv head and its query heads; the weights and the KV cache pay
    for the copies. With tp <= K, the checkpoint's own heads."""
    K = self.checkpoint_kv_heads
    r = tp // K if tp > K and tp % K == 0 else 1
    return dataclasses.replace(self, num_kv_heads=K * r, kv_replicas=r)

  def for_context(self, max_len: int) -> "LlamaConfig":
    """The architecture for a run of contexts up to `max_len`: longrope's long factors
    when `max_len` exceeds the pretraining length (see `RopeScaling`)."""
    s = self.rope_scaling
    if s is None or s.kind != "longrope":
      return self
    long = max_len > s.original_max_position_embeddings
    return dataclasses.replace(self, rope_scaling=dataclasses.replace(s, long=long))

  @property
  def window(self) -> int | None:
    """The window every layer shares (0: none), or None when layers differ (then the
    layer stack reads each layer's from an array, `llama.window_table`)."""
    windows = set(self.sliding_windows) or {0}
    return windows.pop() if len(windows) == 1 else None

  def block_param_count(self) -> int:
    """Parameters of one repeated block (attention + MLP + two norms), kv replicas
    included (what the devices hold)."""
    d, f, n, k, h = (self.hidden_size, self.intermediate_size, self.num_heads,
                     self.num_kv_heads, self.head_dim)
    extra = (n + 2 * k) * h * self.qkv_bias + 2 * h * self.qk_norm + 2 * d * self.sandwich_norms
    return d * (n + 2 * k) * h + n * h * d + 3 * d * f + 2 * d + extra

  def param_count(self) -> int:
    """All parameters, embeddings and head included."""
    head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
    return (self.num_layers * self.block_param_count() +
            self.vocab_size * self.hidden_size + head + self.hidden_size)

  def to_hf(self) -> dict[str, Any]:
    """The HF `config.json` dict of this architecture (the inverse of `from_hf`)."""
    rope = None if self.rope_scaling is None else self.rope_scaling_hf()
    return dict(
        architectures=[_ARCHITECTURES[self.model_type]], model_type=self.model_type,
        hidden_act="silu",
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads, num_key_value_heads=self.checkpoint_kv_heads,
        head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
        rope_scaling=rope, max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
        eos_token_id=list(self.eos_token_ids) or None, attention_bias=False, mlp_bias=False,
        **self._windows_hf())

  def rope_scaling_hf(self) -> dict[str, Any]:
    s = self.rope_scaling
    if s.kind == "llama3":
      return dict(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                  high_freq_factor=s.high_freq_factor,
                  original_max_position_embeddings=s.original_max_position_embeddings)
    return dict(rope_type="longrope", short_factor=list(s.short_factor),
                long_factor=list(s.long_factor), attention_factor=s.attention_factor,
                original_max_position_embeddings=s.original_max_position_embeddings)

  def _windows_hf(self) -> dict[str, Any]:
    if not self.sliding_windows:
      return dict(sliding_window=None)
    window = max(self.sliding_windows)
    if self.model_type == "mistral":
      return dict(sliding_window=window)
    return dict(use_sliding_window=True, sliding_window=window, layer_types=[
        "sliding_attention" if w else "full_attention" for w in self.sliding_windows])

  @classmethod
  def from_hf(cls, hf: dict[str, Any], generation: dict[str, Any] | None = None,
              source: str = "config.json") -> "LlamaConfig":
    """Builds the config from HF `config.json` (and `generation_config.json`) dicts."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    experts = next((k for k in ("num_local_experts", "num_experts", "n_routed_experts")
                    if hf.get(k)), None)
    if experts:
      raise JaxppError(f"{source}: model_type={model_type!r} is a mixture-of-experts model "
                       f"({experts}={hf[experts]}); not supported yet (dense: "
                       f"{', '.join(FAMILIES)})")
    if model_type not in FAMILIES:
      if not any(a.startswith("Llama") for a in archs):
        raise JaxppError(
            f"{source}: model_type={model_type!r} (architectures={archs}) is not supported; "
            f"supported: {', '.join(FAMILIES)}")
      model_type = "llama"
    for flag in ("attention_bias", "mlp_bias"):
      if hf.get(flag):
        raise JaxppError(f"{source}: {flag}=true is not supported")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
      raise JaxppError(f"{source}: hidden_act={act!r} is not supported "
                       f"({', '.join(ACTIVATIONS)})")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
      raise JaxppError(f"{source}: missing required field(s) {', '.join(missing)}")
    n = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n
    rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5 writes this form
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or rope
    return cls(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=n,
        num_kv_heads=hf.get("num_key_value_heads") or n,
        head_dim=head_dim,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope_theta),
        rope_scaling=_rope_scaling(scaling, hf, model_type, source),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings",
                                        model_type.startswith("gemma"))),
        eos_token_ids=_eos_ids((generation or {}).get("eos_token_id", hf.get("eos_token_id"))),
        bos_token_id=hf.get("bos_token_id"),
        sliding_windows=_sliding_windows(hf, model_type, source),
        model_type=model_type,
        activation=ACTIVATIONS[act],
        **_gemma(hf, model_type),
        **FAMILIES[model_type],
    )


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "phi3": "Phi3ForCausalLM", "gemma": "GemmaForCausalLM",
                  "gemma2": "Gemma2ForCausalLM"}


def _gemma(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
  """Gemma's embedding scale; Gemma 2's soft caps and query scale."""
  if not model_type.startswith("gemma"):
    return {}
  out: dict[str, Any] = dict(embed_scale=math.sqrt(hf["hidden_size"]))
  if model_type == "gemma2":
    scalar = hf.get("query_pre_attn_scalar")
    out |= dict(attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
                final_softcap=float(hf.get("final_logit_softcapping") or 0.0),
                query_scale=float(scalar) ** -0.5 if scalar else 0.0)
  return out


def _sliding_windows(hf: dict[str, Any], model_type: str, source: str) -> tuple[int, ...]:
  """Per-layer windows as transformers reads them: Mistral applies `sliding_window` to
  every layer; Qwen2/Qwen3 to the layers `layer_types` calls sliding (derived, when absent,
  from `use_sliding_window` and `max_window_layers`); Llama ignores the field."""
  window, L = hf.get("sliding_window") or 0, hf["num_hidden_layers"]
  if model_type == "llama":
    return ()
  if model_type in ("mistral", "phi3"):
    return (window,) * L if window else ()
  if model_type == "gemma2":  # sliding and global layers alternate, sliding first
    types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]
    return tuple(window if t == "sliding_attention" else 0 for t in types) if window else ()
  if not hf.get("use_sliding_window", False):
    window = 0
  types = hf.get("layer_types") or [
      "sliding_attention" if window and i >= hf.get("max_window_layers", L) else
      "full_attention" for i in range(L)]
  unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
  if unknown or len(types) != L:
    raise JaxppError(f"{source}: layer_types {unknown or types} not supported "
                     "(sliding_attention, full_attention, one per layer)")
  windows = tuple(window if t == "sliding_attention" else 0 for t in types)
  return windows if any(windows) else ()


def _rope_scaling(scaling: dict[str, Any], hf: dict[str, Any], model_type: str,
                  source: str) -> RopeScaling | None:
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "su" or (kind == "yarn" and model_type == "phi3"):  # transformers' aliases
    kind = "longrope"
  partial = scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise JaxppError(f"{source}: partial_rotary_factor={partial} is not supported (1.0)")
  if kind in (None, "default"):
    return None
  original = scaling.get("original_max_position_embeddings",
                         hf.get("original_max_position_embeddings"))
  try:
    if kind == "llama3":
      return RopeScaling(int(scaling["original_max_position_embeddings"]), "llama3",
                         factor=float(scaling["factor"]),
                         low_freq_factor=float(scaling["low_freq_factor"]),
                         high_freq_factor=float(scaling["high_freq_factor"]))
    if kind == "longrope":
      return _longrope(scaling, int(original), hf.get("max_position_embeddings", 2048))
  except (KeyError, TypeError) as e:
    field = e.args[0] if isinstance(e, KeyError) else "original_max_position_embeddings"
    raise JaxppError(f"{source}: {kind} rope scaling lacks field {field!r}") from None
  raise JaxppError(f"{source}: rope scaling type {kind!r} is not supported "
                   "(supported: default, llama3, longrope)")


def _longrope(scaling: dict[str, Any], original: int, max_positions: int) -> RopeScaling:
  """LongRoPE as transformers computes it: the attention factor, unless given, is
  sqrt(1 + ln(factor) / ln(original)) with factor = max_positions / original."""
  factor = scaling.get("factor") or max_positions / original
  attention = scaling.get("attention_factor")
  if attention is None:
    attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
  return RopeScaling(original, "longrope", factor=float(factor),
                     short_factor=tuple(map(float, scaling["short_factor"])),
                     long_factor=tuple(map(float, scaling["long_factor"])),
                     attention_factor=float(attention))


def _eos_ids(value) -> tuple[int, ...]:
  if value is None:
    return ()
  if isinstance(value, int):
    return (value,)
  return tuple(int(v) for v in value)
