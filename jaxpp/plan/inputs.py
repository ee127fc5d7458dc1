"""What the planner is asked about (`Workload`) and what it assumes (`Assumptions`).

A workload is the job's shape: prompt and completion lengths, sequences in flight, the
context each slot is given and the decode chunk. Assumptions are the constants no datasheet
gives, fitted to measured runs (docs/planner.md, "Validation"); every one can be overridden
from the command line.
"""

from __future__ import annotations

import dataclasses

from jaxpp.errors import JaxppError
from jaxpp.model import kv_cache
from jaxpp.parallel import shapes


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
  prefill_efficiency: float = 0.71
  decode_efficiency: float = 0.93
  layer_overhead_s: float = 100e-6
  # The same with decode attention in the fused kernel (`estimate.kernels`): fitted on its
  # three one-GPU H200 runs (docs/planner.md, "Validation"); the kernel reads each row's own
  # context, near the stream rate, where XLA's attention read all max_len positions slower.
  kernel_layer_overhead_s: float = 55e-6
  # Prefill attention in the flash kernel, as a share of matmul_flops for its causal FLOPs
  # (2 T^2 N H per row and layer): fitted with prefill_efficiency on three one-H200 runs
  # at 1,024, 8,192 and 32,768-token prompts (docs/planner.md, "Validation"); alone cuDNN
  # ran 272 TFLOP/s at T = 1,024 and 571 at 8,192 (docs/benchmarks.md, "Prefill attention").
  prefill_attention_efficiency: float = 0.76
  # XLA's prefill attention (einsums around f32 [T, T] scores), as a share of matmul_flops
  # for all 4 T^2 N H FLOPs: alone it ran 44 TFLOP/s at T = 1,024 and 47 at 8,192 on an
  # H200 (docs/benchmarks.md, "Prefill attention"); fitted on the same runs' XLA rows.
  xla_attention_efficiency: float = 0.065
  # Stream bytes per 8-bit weight, beyond reading it, when XLA runs a decode projection:
  # it widens each layer into a bf16 copy in a pass of its own (writing 2 bytes, the GEMM
  # reading them again) that runs below the GEMM's share of bandwidth (449 GB/s of int8 on
  # an H200, docs/quantization.md). Fitted to the 8B int8 run on one H200 and the 70B pp=2
  # run on two (docs/planner.md, "8-bit weights"); int8_matmul's kernel reads a weight once.
  widen_bytes: float = 5.5
  # The same through int8_matmul's kernel, which reads each weight once but streams below
  # cuBLAS's bandwidth (0.7-1.8 TB/s of int8 per projection at 64 rows on an H200, where
  # bf16's GEMMs stream about 3): fitted to the 8B int8 run through the kernel on one H200
  # (docs/planner.md, "8-bit weights").
  kernel_bytes: float = 1.4
  collective_latency_s: float = 20e-6  # fixed cost of one all-reduce or neighbour send
  tick_overhead_s: float = 50e-6  # fixed cost of one pipeline tick (pp > 1)
  dtype_bytes: int = 2  # KV cache and activations (bf16)
  kv_read: str = "max_len"  # XLA's decode attention reads all "max_len" positions or "context"
  activation_width: float = 4.0  # live [b, T, D] tensors in a layer: x, norm, attn out, res
  # Per element of XLA's attention scores: f32 scores and the bf16 probabilities (a [2, 32,
  # 8192, 8192] prefill attention compiled to 24.0 GiB of temporaries on an H200).
  score_bytes: int = 6

  def __post_init__(self):
    for name in ("mem_fraction", "prefill_efficiency", "decode_efficiency",
                 "prefill_attention_efficiency", "xla_attention_efficiency"):
      if not 0 < getattr(self, name) <= 1:
        raise JaxppError(f"{name}={getattr(self, name)} must be in (0, 1]")
    for name in ("widen_bytes", "kernel_bytes"):
      if getattr(self, name) < 0:
        raise JaxppError(f"{name}={getattr(self, name)} must be >= 0")
    if self.kv_read not in ("max_len", "context"):
      raise JaxppError(f"kv_read={self.kv_read!r} must be 'max_len' or 'context'")


@dataclasses.dataclass(frozen=True)
class Workload:
  """What the job asks for: prompt and completion lengths and sequences in flight."""

  input_len: int = 1024
  output_len: int = 128
  concurrency: int = 64  # sequences in flight: the engine's max_num_seqs (B)
  max_len: int = 0  # KV positions per slot; 0 = input_len + output_len
  decode_chunk: int = 16  # decode rounds per return to the host; each call fills and drains
  block_size: int = 64  # positions of a paged KV block, as the engine's; 0 = a dense cache
  kv_dtype: str = "auto"  # the cache's storage, as the engine's: auto (= dtype_bytes) or fp8

  def __post_init__(self):
    if self.kv_dtype not in kv_cache.KV_DTYPES:
      raise JaxppError(f"kv_dtype={self.kv_dtype!r} is not one of "
                       f"{', '.join(kv_cache.KV_DTYPES)}")
    if min(self.input_len, self.output_len, self.concurrency, self.decode_chunk) < 1:
      raise JaxppError("input_len, output_len, concurrency and decode_chunk must be >= 1")
    if self.block_size < 0:
      raise JaxppError(f"block_size={self.block_size} must be >= 0 (0 = a dense cache)")
    if self.max_len and self.max_len < self.input_len + self.output_len - 1:
      raise JaxppError(f"max_len={self.max_len} < input_len + output_len - 1 = "
                       f"{self.input_len + self.output_len - 1}: jaxpp would refuse every request")

  @property
  def cache_len(self) -> int:
    """KV positions per slot as the engine allocates them (rounded up to 128)."""
    return kv_cache.cache_positions(self.max_len or self.input_len + self.output_len)

  def kv_positions(self, m: int) -> int:
    """KV positions one replica's cache holds for the sequences in flight: a dense cache's
    m * b slots of `cache_len`, a paged one's blocks for each sequence's prompt and
    completion (jaxpp allocates a request's blocks when it admits it)."""
    if not self.block_size:
      return m * self.rows(m) * self.cache_len
    blocks = -(-(self.input_len + self.output_len) // self.block_size)
    return self.concurrency * blocks * self.block_size

  def kv_element_bytes(self, head_dim: int, dtype_bytes: float) -> float:
    """Bytes a cached key or value element takes: the activations' `dtype_bytes`, or fp8's
    byte plus its share of a per-token scale (`kv_cache.element_bytes`)."""
    if self.kv_dtype == "fp8":
      return kv_cache.element_bytes(kv_cache.FP8, head_dim)
    return dtype_bytes

  @property
  def prefill_len(self) -> int:
    """T of the prefill program, padded as the engine pads it (shapes.prefill_len)."""
    return shapes.prefill_len(self.input_len, self.max_len or self.input_len + self.output_len)

  def rows(self, m: int) -> int:
    """b: slots per micro-batch (the engine's even fill)."""
    return shapes.split_rows(self.concurrency, m)
