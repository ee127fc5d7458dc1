"""Named model shapes and hardware for the planner and the bench (`--model`, `--hardware`).

Model presets are published architectures (Llama 3, Qwen2.5, Mistral), so sizing needs no
checkpoint on disk; `model_config` also takes a HF `config.json` (or a checkpoint directory
holding one) for anything else. Hardware presets are *effective* figures — what a program
reaches on the card, measured where we could — not datasheet peaks, because the planner
predicts what jaxpp will do, and a datasheet peak would promise speed nobody gets. Each
figure names its source; every one can be overridden from the command line.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from jaxpp.errors import JaxppError
from jaxpp.model.config import LlamaConfig

# Shared by the Llama 3.1 family (the 405B exists only as 3.1; 3.0 differs in context and rope
# scaling, which sizing ignores).
_LLAMA3 = dict(vocab_size=128256, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
               max_position_embeddings=131072)

MODELS: dict[str, LlamaConfig] = {
    "llama3-8b": LlamaConfig(num_layers=32, hidden_size=4096, intermediate_size=14336,
                             num_heads=32, **_LLAMA3),
    "llama3-70b": LlamaConfig(num_layers=80, hidden_size=8192, intermediate_size=28672,
                              num_heads=64, **_LLAMA3),
    "llama3-405b": LlamaConfig(num_layers=126, hidden_size=16384, intermediate_size=53248,
                               num_heads=128, **_LLAMA3),
    # Other families, from their published config.json files.
    "qwen2.5-7b": LlamaConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                              num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                              rope_theta=1e6, max_position_embeddings=32768, qkv_bias=True,
                              model_type="qwen2"),
    "qwen2.5-72b": LlamaConfig(vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                               num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                               rope_theta=1e6, max_position_embeddings=32768, qkv_bias=True,
                               model_type="qwen2"),
    "mistral-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                              max_position_embeddings=32768, sliding_windows=(4096,) * 32,
                              model_type="mistral"),  # v0.1, with its window
    # For tests and quick looks at the formulas (K=2: tp=4 replicates each kv head).
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4,
                        num_heads=4, num_kv_heads=2, head_dim=16),
}


def model_config(name_or_path: str) -> LlamaConfig:
  """A preset by name, else a HF `config.json` file or a checkpoint directory holding one."""
  if name_or_path in MODELS:
    return MODELS[name_or_path]
  path = pathlib.Path(name_or_path)
  if path.is_dir():
    path = path / "config.json"
  if not path.is_file():
    raise JaxppError(f"model {name_or_path!r} is neither a preset ({', '.join(MODELS)}) nor "
                     "a config.json file or checkpoint directory")
  try:
    hf = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise JaxppError(f"{path}: cannot read as JSON ({' '.join(str(e).split())})") from None
  if not isinstance(hf, dict):
    raise JaxppError(f"{path}: expected a JSON object, got {type(hf).__name__}")
  return LlamaConfig.from_hf(hf, source=str(path))


@dataclasses.dataclass(frozen=True)
class Hardware:
  """One accelerator type, as effective (reached) figures; units are bytes, seconds, FLOPs.

  `hbm_bytes` is the card's whole memory as nvidia-smi reports it; how much of it JAX lets
  a program use is the planner's `mem_fraction` assumption, not a property of the card.
  `link_bandwidth` is all-reduce *bus* bandwidth inside a node (NCCL's busbw: an all-reduce
  of n bytes over t devices takes 2(t-1)/t * n / busbw), also used for neighbour sends.
  `inter_node_bandwidth` is per GPU between hosts; tp groups never cross hosts in jaxpp,
  so only pipeline sends use it.
  """

  name: str
  hbm_bytes: float
  hbm_bandwidth: float  # bytes/s a device copy reaches
  matmul_flops: float  # bf16 FLOP/s a large matmul reaches
  link_bandwidth: float  # bytes/s, all-reduce bus bandwidth inside a node
  inter_node_bandwidth: float  # bytes/s per GPU across hosts
  gpus_per_node: int = 8


MiB = 2**20

HARDWARE: dict[str, Hardware] = {
    # Memory: nvidia-smi 81559 MiB on the H100 80GB HBM3 machines we ran on. Bandwidth: "~3.0
    # TB/s copy" (docs/design.md, "Physics"; datasheet 3.35). FLOPs: "~790 TFLOP/s bf16
    # matmul" (798 seen on 8192^3; datasheet 989 dense). Link: 1 GiB NCCL all-reduce at 355
    # GB/s busbw on a 4 x H100 host (NVLink 4 datasheet 450 GB/s per direction). Inter-node:
    # one 400 Gb/s NIC per GPU, a datasheet figure, not measured here.
    "h100": Hardware("h100", hbm_bytes=81559 * MiB, hbm_bandwidth=3.0e12,
                     matmul_flops=790e12, link_bandwidth=355e9, inter_node_bandwidth=50e9),
    # Memory: nvidia-smi 143771 MiB. Bandwidth: "device copy 4.2 TB/s" (docs/design.md,
    # "Physics"; datasheet 4.8). FLOPs: same Hopper die, 788 TFLOP/s seen here. Link and inter-node:
    # the H100 figures (same NVLink 4 and NICs), not measured on H200.
    "h200": Hardware("h200", hbm_bytes=143771 * MiB, hbm_bandwidth=4.2e12,
                     matmul_flops=790e12, link_bandwidth=355e9, inter_node_bandwidth=50e9),
}


def hardware(name: str, **overrides) -> Hardware:
  """A hardware preset with fields replaced by `overrides` (None values are ignored)."""
  if name not in HARDWARE:
    raise JaxppError(f"unknown hardware {name!r}; presets: {', '.join(HARDWARE)}")
  hw = dataclasses.replace(HARDWARE[name],
                           **{k: v for k, v in overrides.items() if v is not None})
  for field in ("hbm_bytes", "hbm_bandwidth", "matmul_flops", "link_bandwidth",
                "inter_node_bandwidth", "gpus_per_node"):
    if not getattr(hw, field) > 0:
      raise JaxppError(f"hardware {field}={getattr(hw, field)} must be > 0")
  return hw
