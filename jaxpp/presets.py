"""The planner's inputs (`python -m jaxpp.plan`): model, hardware, layout and workload.

Model presets are the published Llama 3 architectures, so sizing needs no checkpoint on
disk; `model_config` also takes a HF `config.json` (or a checkpoint directory holding one)
for anything else. Hardware presets are *effective* figures — what a program reaches on the
card, measured where we could — not datasheet peaks, because the planner predicts what
jaxpp will do, and a datasheet peak would promise speed nobody gets. Each figure names its
source; every one can be overridden from the command line. `Layout.problem` holds jaxpp's
own rules for a mesh, so the planner never sizes a layout that `jaxpp.LLM` would refuse.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from jaxpp import schedule
from jaxpp.errors import JaxppError
from jaxpp.model import decode_attention, llama
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
    # For tests and quick looks at the formulas (K=2: tp=4 is refused, which tests use).
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
    # Memory: nvidia-smi 81559 MiB (KINDS.md, H100 80GB HBM3). Bandwidth: DESIGN.md "~3.0
    # TB/s copy" (datasheet 3.35). FLOPs: DESIGN.md "~790 TFLOP/s bf16 matmul" (798 seen on
    # 8192^3 here; datasheet 989 dense). Link: 1 GiB NCCL all-reduce at 355 GB/s busbw on a
    # 4 x H100 host (KINDS.md; NVLink 4 datasheet 450 GB/s per direction). Inter-node: one
    # 400 Gb/s NIC per GPU, a datasheet figure, not measured here.
    "h100": Hardware("h100", hbm_bytes=81559 * MiB, hbm_bandwidth=3.0e12,
                     matmul_flops=790e12, link_bandwidth=355e9, inter_node_bandwidth=50e9),
    # Memory: nvidia-smi 143771 MiB (KINDS.md). Bandwidth: DESIGN.md "device copy 4.2 TB/s"
    # (datasheet 4.8). FLOPs: same Hopper die, 788 TFLOP/s seen here. Link and inter-node:
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


@dataclasses.dataclass(frozen=True)
class Assumptions:
  """The planner's constants that no datasheet gives (sources in docs/planner.md)."""

  # Share of hbm_bytes JAX lets a program use: it preallocates 75% of the memory free after
  # the CUDA context. Measured with jax 0.11.2 on an H100: bytes_limit 63.76e9 of 85.52e9.
  # Raise it with XLA_PYTHON_CLIENT_MEM_FRACTION and pass the same value here.
  mem_fraction: float = 0.745
  # Fitted to jaxpp.bench on H200s with jax 0.11.2 (docs/planner.md, "Validation"): the
  # share of matmul_flops a whole prefill reaches; the share of hbm_bandwidth a decode
  # step's weight and KV reads reach (the profiled weight GEMMs ran at 93%), a fixed cost
  # per layer per tick (small kernels, softmax, attention below the stream rate), and the
  # cost of one small all-reduce inside a compiled decode step (NCCL launch and sync).
  prefill_efficiency: float = 0.65
  decode_efficiency: float = 0.93
  layer_overhead_s: float = 100e-6
  # The same with decode attention in the fused kernel (Layout.fused_decode): fitted on its
  # three one-GPU H200 runs (docs/planner.md, "Validation"); the kernel reads each row's own
  # context, near the stream rate, where XLA's attention read all max_len positions slower.
  kernel_layer_overhead_s: float = 55e-6
  collective_latency_s: float = 20e-6  # fixed cost of one all-reduce or neighbour send
  tick_overhead_s: float = 50e-6  # fixed cost of one pipeline tick (pp > 1)
  dtype_bytes: int = 2  # KV cache and activations (bf16)
  kv_read: str = "max_len"  # XLA's decode attention reads all "max_len" positions or "context"
  activation_width: float = 4.0  # live [b, T, D] tensors in a layer: x, norm, attn out, res
  score_bytes: int = 8  # per attention score element: f32 scores + f32 softmax

  def __post_init__(self):
    for name in ("mem_fraction", "prefill_efficiency", "decode_efficiency"):
      if not 0 < getattr(self, name) <= 1:
        raise JaxppError(f"{name}={getattr(self, name)} must be in (0, 1]")
    if self.kv_read not in ("max_len", "context"):
      raise JaxppError(f"kv_read={self.kv_read!r} must be 'max_len' or 'context'")


@dataclasses.dataclass(frozen=True)
class Layout:
  """One model replica's mesh and schedule: pp stages of tp devices each."""

  pp: int
  tp: int
  virtual_stages: int = 1
  microbatches: int = 0  # 0 = pp: jaxpp's default, the fewest that keep the decode ring full
  layer_split: str = "even"  # "even" or "balanced" (partition.py)
  prefill_microbatches: int = 0  # a prefill of all sequences cut this fine; 0 = default
  attention: str = "auto"  # decode attention as jaxpp.LLM(attention=...) takes it

  @property
  def m(self) -> int:
    return self.microbatches or self.pp

  def mp(self, concurrency: int | None = None) -> int:
    """Prefill micro-batches, at most one per sequence in flight when `concurrency` is given
    (schedule.prefill_microbatches)."""
    return schedule.prefill_microbatches(self.prefill_microbatches, self.pp, self.m,
                                         concurrency)

  @property
  def name(self) -> str:
    v = f"v{self.virtual_stages}" if self.virtual_stages > 1 else ""
    return (f"pp{self.pp}tp{self.tp}{v}" + (f"m{self.m}" if self.m != self.pp else "")
            + (f"p{self.prefill_microbatches}" if self.prefill_microbatches else ""))

  def fused_decode(self, cfg: LlamaConfig) -> bool:
    """Whether decode attention runs in the fused kernel (pipeline.Pipeline.fused_decode on
    GPUs, which the planner's hardware presets are)."""
    return decode_attention.fused(self.attention, on_gpu=True, tp=self.tp,
                                  head_dim=cfg.head_dim)

  def problem(self, cfg: LlamaConfig, hw: Hardware) -> str | None:
    """Why jaxpp cannot run this layout (pipeline.py, schedule.py, mesh.py rules), or None."""
    pp, tp, v = self.pp, self.tp, self.virtual_stages
    if min(pp, tp, v) < 1 or min(self.microbatches, self.prefill_microbatches) < 0:
      return "pp, tp and virtual_stages must be >= 1, (prefill_)microbatches >= 0"
    for what, n in (("num_key_value_heads", cfg.num_kv_heads), ("num_attention_heads",
                    cfg.num_heads), ("intermediate_size", cfg.intermediate_size)):
      if n % tp:
        return f"tp={tp} does not divide {what}={n}"
    if pp * v > cfg.num_layers:
      return f"pp*virtual_stages={pp * v} chunks exceed the {cfg.num_layers} layers"
    if pp > 1 and self.m < pp:
      return f"microbatches={self.m} < pp={pp}: the decode ring needs at least pp"
    if v > 1 and self.mp() < pp:
      return f"prefill_microbatches={self.mp()} < pp={pp}: interleaving needs at least pp"
    if pp * tp > hw.gpus_per_node and hw.gpus_per_node % tp:
      return f"tp={tp} must divide gpus_per_node={hw.gpus_per_node} when the mesh spans hosts"
    if self.layer_split not in ("even", "balanced"):
      return f"layer_split={self.layer_split!r} is not 'even' or 'balanced'"
    return decode_attention.choice_problem(self.attention, cfg.head_dim)


@dataclasses.dataclass(frozen=True)
class Workload:
  """What the job asks for: prompt and completion lengths and sequences in flight."""

  input_len: int = 1024
  output_len: int = 128
  concurrency: int = 64  # sequences in flight: the engine's max_num_seqs (B)
  max_len: int = 0  # KV positions per slot; 0 = input_len + output_len
  decode_chunk: int = 16  # decode rounds per return to the host; each call fills and drains

  def __post_init__(self):
    if min(self.input_len, self.output_len, self.concurrency, self.decode_chunk) < 1:
      raise JaxppError("input_len, output_len, concurrency and decode_chunk must be >= 1")
    if self.max_len and self.max_len < self.input_len + self.output_len - 1:
      raise JaxppError(f"max_len={self.max_len} < input_len + output_len - 1 = "
                       f"{self.input_len + self.output_len - 1}: jaxpp would refuse every request")

  @property
  def cache_len(self) -> int:
    """KV positions per slot as the engine allocates them (rounded up to 128)."""
    return llama.cache_positions(self.max_len or self.input_len + self.output_len)

  @property
  def prefill_len(self) -> int:
    """T of the prefill program: the engine pads prompts to a power of two, at least 64."""
    return min(max(64, 1 << (self.input_len - 1).bit_length()), self.cache_len)

  def rows(self, m: int) -> int:
    """b: slots per micro-batch (the engine's even fill)."""
    return -(-self.concurrency // m)
