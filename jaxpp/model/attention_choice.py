"""Which attention a layout runs in each phase, from the one `attention` knob, and with it
whether decode's 8-bit projections run in their kernel.

One knob covers both phases (and the 8-bit matmul kernel, the other fused kernel a decode
step runs) so that a comparison (`jaxpp.bench --attention=xla,auto`) swaps every Pallas
and cuDNN kernel against XLA's einsums at once:

- "xla": einsums in both phases (`llama.attend`), the reference and the CPU path;
- "kernel": decode in decode_attention's Pallas kernel (interpreted off GPUs, which is how
  the CPU tests check it) and fresh prefill in cuDNN's flash kernel (prefill_attention.py)
  where there is one (CUDA GPUs; elsewhere prefill stays XLA's: cuDNN has no CPU form);
- "auto": what was measured faster on an H200 (docs/benchmarks.md): the decode kernel at
  tp = 1 (at tp > 1 it is checked on CPUs but not yet timed) and the prefill kernel at
  every tp (each device runs it on its own heads; it replaces [T, T] f32 scores, which at
  long prompts do not even fit).

With 8-bit weights (`quant.py`), "kernel" also runs a decode step's block projections in
`int8_matmul.py`'s kernel, which reads each layer's 8-bit weights in place, where XLA's
einsum widens them to the activation dtype in a separate pass first (docs/quantization.md).
"auto" takes it where it was measured, on a GPU at tp = 1: int8 decode 0.91x of bf16's
where XLA's path ran 0.48x (one H200, `tools/quant_bench.py`; docs/benchmarks.md).
"""

from __future__ import annotations

from typing import NamedTuple

from jaxpp.model import decode_attention, prefill_attention

CHOICES = ("auto", "kernel", "xla")


class Kernels(NamedTuple):
  """The resolved choice, static in every compiled program."""

  decode: bool = False  # one-token steps over a cache: decode_attention's kernel
  prefill: bool = False  # fresh prefill (nothing cached yet): prefill_attention's path
  gpu: bool = False  # the devices run cuDNN: prefill's path calls it (else its XLA form)
  weights8: bool = False  # decode's 8-bit projections: int8_matmul's kernel

  def label(self) -> str:
    """How result rows name it: "kernel" (both phases), "decode-kernel", "prefill-kernel"
    or "xla"."""
    if self.decode and self.prefill:
      return "kernel"
    return "decode-kernel" if self.decode else "prefill-kernel" if self.prefill else "xla"


def problem(choice: str, head_dim: int) -> str | None:
  """Why a layout cannot take attention=`choice` with this head dim, or None."""
  if choice not in CHOICES:
    return f"attention={choice!r} is not one of {', '.join(CHOICES)}"
  if choice == "kernel" and not decode_attention.supports(head_dim):
    return (f"attention='kernel' needs head_dim a power of two >= {decode_attention.MIN_TILE}"
            f", not {head_dim}; use attention='xla'")
  return None


def resolve(choice: str, *, device, tp: int, head_dim: int) -> Kernels:
  """`choice` for a layout whose devices are like `device`."""
  return decide(choice, on_gpu=device.platform == "gpu",
                cudnn=prefill_attention.available(device), tp=tp, head_dim=head_dim)


def decide(choice: str, *, on_gpu: bool, cudnn: bool, tp: int, head_dim: int) -> Kernels:
  """`resolve` from facts instead of a device (the planner's presets are Hopper GPUs):
  `cudnn` says the devices run cuDNN's packed flash attention."""
  cudnn = cudnn and prefill_attention.supports(head_dim)
  if choice == "xla":
    return Kernels()
  if choice == "kernel":  # off GPUs the kernels' stand-ins run: the CPU tests' path
    return Kernels(decode=True, prefill=cudnn or not on_gpu, gpu=cudnn, weights8=True)
  return Kernels(decode=on_gpu and tp == 1 and decode_attention.supports(head_dim),
                 prefill=cudnn, gpu=cudnn, weights8=on_gpu and tp == 1)
