"""Tiny random Hugging Face checkpoints (Llama, Qwen2, Qwen3), written by transformers
itself, for tests.

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
  directory.mkdir(parents=True, exist_ok=True)
  to_save = model if dtype == torch.float32 else model.to(dtype)
  to_save.save_pretrained(directory, max_shard_size="40KB" if sharded else "10GB")
  return directory, model.float()
