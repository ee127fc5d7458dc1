"""Model architecture as a frozen dataclass, read from a Hugging Face `config.json`.

Named sizes follow the project's dimension alphabet: D model, F ffn, N query heads,
K kv heads, H head dim, L layers, V vocab. Run-time knobs (dtype, mesh, batch) do not live
here; they belong to the run config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxpp.errors import JaxppError

# model_type -> the features it sets; the decoder math is Llama's plus these (mistral
# without a sliding window)
FAMILIES = {"llama": {}, "mistral": {}, "qwen2": dict(qkv_bias=True),
            "qwen3": dict(qk_norm=True)}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """`rope_scaling` of type `llama3` (Llama 3.1+): frequency-dependent interpolation."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


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
  model_type: str = "llama"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise JaxppError(
          f"num_attention_heads={self.num_heads} is not a multiple of "
          f"num_key_value_heads={self.num_kv_heads}")

  def block_param_count(self) -> int:
    """Parameters of one repeated block (attention + MLP + two norms)."""
    d, f, n, k, h = (self.hidden_size, self.intermediate_size, self.num_heads,
                     self.num_kv_heads, self.head_dim)
    extra = (n + 2 * k) * h * self.qkv_bias + 2 * h * self.qk_norm
    return d * (n + 2 * k) * h + n * h * d + 3 * d * f + 2 * d + extra

  def param_count(self) -> int:
    """All parameters, embeddings and head included."""
    head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
    return (self.num_layers * self.block_param_count() +
            self.vocab_size * self.hidden_size + head + self.hidden_size)

  def to_hf(self) -> dict[str, Any]:
    """The HF `config.json` dict of this architecture (the inverse of `from_hf`)."""
    rope = None if self.rope_scaling is None else dict(
        rope_type="llama3", **dataclasses.asdict(self.rope_scaling))
    return dict(
        architectures=[_ARCHITECTURES[self.model_type]], model_type=self.model_type,
        hidden_act="silu",
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
        head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
        rope_scaling=rope, max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
        eos_token_id=list(self.eos_token_ids) or None, attention_bias=False, mlp_bias=False)

  @classmethod
  def from_hf(cls, hf: dict[str, Any], generation: dict[str, Any] | None = None,
              source: str = "config.json") -> "LlamaConfig":
    """Builds the config from HF `config.json` (and `generation_config.json`) dicts."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type not in FAMILIES:
      if not any(a.startswith("Llama") for a in archs):
        raise JaxppError(
            f"{source}: model_type={model_type!r} (architectures={archs}) is not supported; "
            f"supported: {', '.join(FAMILIES)}")
      model_type = "llama"
    sliding = hf.get("sliding_window") not in (None, 0) and hf.get("use_sliding_window",
                                                                     True)
    if sliding or any(t != "full_attention" for t in hf.get("layer_types") or ()):
      raise JaxppError(f"{source}: sliding-window attention is not supported")
    for flag in ("attention_bias", "mlp_bias"):
      if hf.get(flag):
        raise JaxppError(f"{source}: {flag}=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
      raise JaxppError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (silu)")
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
        rope_scaling=_rope_scaling(scaling, source),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        eos_token_ids=_eos_ids((generation or {}).get("eos_token_id", hf.get("eos_token_id"))),
        bos_token_id=hf.get("bos_token_id"),
        model_type=model_type,
        **FAMILIES[model_type],
    )


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _rope_scaling(scaling: dict[str, Any], source: str) -> RopeScaling | None:
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind in (None, "default"):
    return None
  if kind != "llama3":
    raise JaxppError(f"{source}: rope scaling type {kind!r} is not supported "
                     "(supported: default, llama3)")
  try:
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
  except KeyError as e:
    raise JaxppError(f"{source}: llama3 rope scaling lacks field {e.args[0]!r}") from None


def _eos_ids(value) -> tuple[int, ...]:
  if value is None:
    return ()
  if isinstance(value, int):
    return (value,)
  return tuple(int(v) for v in value)
