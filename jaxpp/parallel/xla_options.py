"""XLA options for the programs that run the layer stack, chosen per layout from measurements.

A decode step is mostly the read of each layer's weights (docs/benchmarks.md), and two XLA
GPU passes decide how well that read goes (other backends ignore both options):

- Triton GEMM fusions read a layer's weights out of the stacked [Lc, ...] array about 2.8x
  slower than cuBLAS GEMMs do (H200, jax 0.11.2: 1.26 vs 3.42 TB/s in
  tools/weight_stream_probe.py): off everywhere.
- The dot merger turns dots that share an input (x @ wq, x @ wk, x @ wv) into one dot over
  the weights concatenated, and a decode step redoes that concatenation for every layer:
  the weights are read, written and read again. Profiles showed it at 8% of a one-GPU 8B
  step and 12% of a 70B pp2 step. With a layer's weights whole or split in two (tp <= 2)
  the copy costs more than the extra kernels save: off, 1.07x on 70B pp2tp1 and 1.10x on
  8B pp1tp2 (2 x H200). Split four ways the weights are small, the step waits on kernel
  latency rather than bandwidth, and one GEMM beats three: on, as XLA ships it (off was
  0.935x on 8B pp1tp4, 4 x H200). Those measurements predate the fused projections
  (params.py stores wq|wk|wv and w_gate|w_up as one weight each), which leave a block no
  sibling dots to merge; the rule stands until a GPU measures it again.

`jit` builds one jax.jit per option set, so the layout of a call picks its program.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

BASE = {"xla_gpu_enable_triton_gemm": False}
# Largest tp degree whose programs run with XLA's dot merger off (see the module docstring).
SPLIT_DOTS_MAX_TP = 2


def for_tp(tp: int) -> dict:
  """Compiler options for a program whose layer weights are split over `tp` devices."""
  return BASE | ({"xla_gpu_dot_merger_threshold_mb": 0} if tp <= SPLIT_DOTS_MAX_TP else {})


def jit(*, tp_of: Callable[..., int], static_argnames: tuple[str, ...],
        donate_argnames: tuple[str, ...] = ()):
  """`jax.jit` with `for_tp(tp_of(*args, **kwargs))` as its compiler options.

  The decorated function keeps jit's `trace`, `lower` and `_cache_size` (summed over its
  programs).
  """

  def wrap(fn):
    programs: dict[tuple, Callable] = {}

    def program(args, kwargs):
      options = for_tp(tp_of(*args, **kwargs))
      key = tuple(sorted(options.items()))
      if key not in programs:
        programs[key] = jax.jit(fn, static_argnames=static_argnames,
                                donate_argnames=donate_argnames, compiler_options=options)
      return programs[key]

    @functools.wraps(fn)
    def run(*args, **kwargs):
      return program(args, kwargs)(*args, **kwargs)

    run.trace = lambda *args, **kwargs: program(args, kwargs).trace(*args, **kwargs)
    run.lower = lambda *args, **kwargs: program(args, kwargs).lower(*args, **kwargs)
    run._cache_size = lambda: sum(p._cache_size() for p in programs.values())
    return run

  return wrap
