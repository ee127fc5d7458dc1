"""Tiny random Hugging Face checkpoints (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, Gemma 2),
written by transformers itself, for tests.

transformers + torch are the reference implementation: the checkpoints are produced by
`LlamaForCausalLM.save_pretrained`, exactly as real ones are, so the loader reads the real
format. Weights use a wide init so logits are well separated and greedy decoding is stable.
"""

from __future__ import annotations

import pathlib

import torch
import transformers

BASE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
)

VARIANTS = {
    "gqa": {},
    "mha": dict(num_key_value_heads=4),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "llama3_rope": dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0,
                                          original_max_position_embeddings=32)),
    "head_dim": dict(head_dim=24),  # head_dim != hidden / heads (64 / 4 = 16)
    "deep": dict(num_hidden_layers=8),
}


# Other families: (config class, model class, their variant's fields).
FAMILIES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=24)),
    # windows shorter than the test prompts, so prefill and decode both cut keys off:
    # every layer's (Mistral), and only the layers from max_window_layers on (Qwen2)
    "mistral_window": (transformers.MistralConfig, transformers.MistralForCausalLM,
                       dict(sliding_window=5)),
    "qwen2_window": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                     dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)),
    # fused qkv_proj and gate_up_proj, and a window as Phi-3-mini-4k has one (2047)
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
             dict(sliding_window=6, pad_token_id=0)),
    # LongRoPE with a pretraining length of 4: prompts beyond it take the long factors
    "phi3_longrope": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(
        pad_token_id=0, original_max_position_embeddings=4, rope_scaling=dict(
            rope_type="longrope", short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
            long_factor=[1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0]))),
    # (1 + w) norms, scaled embedding, GeGLU; Gemma 2 adds sandwich norms, soft caps low
    # enough to bite, a query scale apart from head_dim, and sliding layers alternating
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM,
              dict(head_dim=16, pad_token_id=0)),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(
        head_dim=16, pad_token_id=0, query_pre_attn_scalar=12, sliding_window=4,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
}


def hf_config(variant: str = "gqa", **overrides) -> transformers.PretrainedConfig:
  if variant in FAMILIES:
    config_cls, _, fields = FAMILIES[variant]
    return config_cls(**{**BASE, **fields, **overrides})
  return transformers.LlamaConfig(**{**BASE, **VARIANTS[variant], **overrides})


def make_checkpoint(directory: pathlib.Path, variant: str = "gqa", *, sharded: bool = False,
                    dtype: torch.dtype = torch.float32, seed: int = 0,
                    **overrides) -> tuple[pathlib.Path, transformers.LlamaForCausalLM]:
  """Writes a random checkpoint to `directory`; returns it and the torch model (fp32, eval)."""
  torch.manual_seed(seed)
  model_cls = FAMILIES[variant][1] if variant in FAMILIES else transformers.LlamaForCausalLM
  model = model_cls(hf_config(variant, **overrides)).eval()
  with torch.no_grad():  # transformers starts biases at 0 and norms at 1: make them count
    for name, p in model.named_parameters():
      if name.endswith("proj.bias"):
        p.normal_(0.0, 0.5)
      elif name.endswith(("q_norm.weight", "k_norm.weight")):
        p.normal_(1.0, 0.3)
      elif variant.startswith("gemma") and name.endswith("norm.weight"):
        p.normal_(0.0, 0.3)  # Gemma's norms scale by 1 + w, w starting at 0
  directory.mkdir(parents=True, exist_ok=True)
  to_save = model if dtype == torch.float32 else model.to(dtype)
  to_save.save_pretrained(directory, max_shard_size="40KB" if sharded else "10GB")
  return directory, model.float()
