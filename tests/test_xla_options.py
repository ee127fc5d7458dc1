"""`xla_options`: the per-layout options and the jit that picks a program by them."""

import jax.numpy as jnp
import numpy as np

from jaxpp.parallel import xla_options


def test_dot_merger_is_off_only_where_weights_are_whole_or_halved():
  merger = "xla_gpu_dot_merger_threshold_mb"
  for tp in (1, 2):
    assert xla_options.for_tp(tp)[merger] == 0
  for tp in (4, 8):
    assert merger not in xla_options.for_tp(tp)
  assert all(o["xla_gpu_enable_triton_gemm"] is False for o in map(xla_options.for_tp, (1, 8)))


def test_jit_compiles_one_program_per_layout_and_keeps_jit_tools():
  @xla_options.jit(tp_of=lambda x, *, tp: tp, static_argnames=("tp",), donate_argnames=("x",))
  def double(x, *, tp):
    return x * 2

  assert double.__name__ == "double"
  for tp in (1, 1, 4):
    np.testing.assert_array_equal(double(jnp.arange(3.0), tp=tp), [0.0, 2.0, 4.0])
  assert double._cache_size() == 2  # tp=1 once, tp=4 once
  assert "mul" in double.lower(jnp.arange(3.0), tp=2).as_text()
