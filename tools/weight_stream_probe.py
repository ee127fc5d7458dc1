"""How fast XLA streams a stage's weights through decode-shaped matmuls on this device.

A decode step of one micro-batch is, to first order, `rows` activations multiplied by every
weight of the stage: a memory-bound stream. This probe times that stream alone, with no
attention, cache, sampling or pipeline, in these forms:

- `separate`: one weight array per layer, the loop unrolled by Python (the best case: every
  matmul reads its own buffer);
- `scan`: the weights stacked on a leading layer axis and `lax.scan`ned, as a jaxpp stage
  holds them (each step dynamic-slices its layer);
- `scan_int8`: the same with int8 weights and per-channel scales, dequantised in the product
  as `jaxpp.model.quant.einsum` does;
- `pallas[CONFIG]`: the int8 stream with every matmul through `jaxpp/model/int8_matmul.py`, the
  Pallas kernel that reads layer `l` of the stacks in place, `l` a fori_loop index; one row
  per kernel configuration in `--pallas_configs`, each with its largest deviation from
  `scan_int8`'s output (relative to that output's largest magnitude).

It prints achieved GB/s of weight bytes per form; the gap between `separate` and `scan` is
what the stacked layout costs, and the gap between bf16 and int8 what the dequantisation
costs (docs/benchmarks.md). Example (one GPU):

    python tools/weight_stream_probe.py --layers=32 --hidden=4096 --ffn=14336 --rows=32

A configuration is `_`-separated fields: bm, bn, bk (block rows, columns, depth), s (split-K;
0 picks one), w (warps), st (pipeline stages), and a bare `t` for the swapped dot; fields
left out keep `stacked_matmul`'s defaults. On CPU the kernel runs in the Pallas interpreter.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from jaxpp.model import int8_matmul, quant

flags.DEFINE_integer("layers", 32, "layers in the stage")
flags.DEFINE_integer("hidden", 4096, "model dimension D")
flags.DEFINE_integer("ffn", 14336, "MLP width F (each layer holds [D, F] and [F, D])")
flags.DEFINE_list("rows", ["32"], "activation rows per matmul (a micro-batch)")
flags.DEFINE_integer("repeats", 20, "timed calls per form")
# Memory-bound decode tiles for H100/H200 (132 SMs): each program keeps 16-64 KB of int8
# tiles in flight (block_k * block_n bytes per stage), enough by Little's law for ~30 KB per
# SM at HBM latency; wide N tiles read fewer activation tiles per weight byte, narrow ones
# give more programs before split-K has to; s1 shows what split-K buys.
flags.DEFINE_list("pallas_configs", [
    "bn64_bk256_s0_w4_st3", "bn64_bk512_s0_w4_st3", "bn128_bk128_s0_w4_st4",
    "bn128_bk256_s0_w4_st3", "bn128_bk256_s0_w8_st3", "bn128_bk256_s1_w4_st3",
    "bn256_bk128_s0_w8_st3", "bn64_bk256_s0_w4_st3_t", "bn128_bk256_s0_w4_st3_t"],
    "Pallas kernel configurations to time (see the module docstring); empty: none")
FLAGS = flags.FLAGS


def _layer(x, w_in, w_out, s_in=None, s_out=None):
  h = jax.nn.silu(quant.einsum("BD,DF->BF", x, w_in, s_in))
  return quant.einsum("BF,FD->BD", h, w_out, s_out)


def pallas_config(name: str) -> dict:
  """`stacked_matmul` keyword arguments from a configuration's name (`int8_matmul.tiles_of`)."""
  try:
    return int8_matmul.tiles_of(name)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def _pallas_stream(L: int, config: dict):
  """The int8 MLP stream through the Pallas kernel; the stacks are loop-invariant operands
  and the layer a fori_loop index, so no layer is sliced out before the kernel reads it."""
  matmul = functools.partial(int8_matmul.stacked_matmul, **config,
                             interpret=jax.default_backend() == "cpu")

  @jax.jit
  def stream(x, q_in, q_out, s_in, s_out):
    def layer(l, x):
      return matmul(jax.nn.silu(matmul(x, q_in, s_in, l)), q_out, s_out, l)
    return jax.lax.fori_loop(0, L, layer, x)
  return stream


def _time(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  start = time.perf_counter()
  for _ in range(FLAGS.repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / FLAGS.repeats


def _time_pallas(x, stacks, nbytes: int, configs: dict, reference) -> None:
  """One row per configuration; a configuration that fails to compile or run prints its
  error and the sweep goes on (Triton rejects some tiles, e.g. past shared memory)."""
  want = reference(x, *stacks).astype(jnp.float32)
  for name, config in configs.items():
    label = f"rows={x.shape[0]} pallas[{name}]"
    try:
      fn = _pallas_stream(FLAGS.layers, config)
      err = jnp.max(jnp.abs(fn(x, *stacks) - want)) / jnp.max(jnp.abs(want))
      t = _time(fn, x, *stacks)
    except Exception as e:  # a compile or launch failure of one configuration  # noqa: BLE001
      print(f"{label} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      continue
    print(f"{label} {t * 1e3:8.3f} ms  {nbytes / t / 1e9:8.0f} GB/s  err {float(err):.1e}")


def main(argv):
  del argv
  L, D, F = FLAGS.layers, FLAGS.hidden, FLAGS.ffn
  configs = {name: pallas_config(name) for name in FLAGS.pallas_configs}  # typos fail first
  key = jax.random.key(0)
  w_in = jax.random.normal(key, (L, D, F), jnp.bfloat16) * D ** -0.5
  w_out = jax.random.normal(jax.random.fold_in(key, 1), (L, F, D), jnp.bfloat16) * F ** -0.5
  q_in, s_in = quant.quantize(w_in, "int8", (1,), jnp.bfloat16)
  q_out, s_out = quant.quantize(w_out, "int8", (1,), jnp.bfloat16)
  separate_in, separate_out = list(w_in), list(w_out)

  @jax.jit
  def separate(x, ws_in, ws_out):
    for a, b in zip(ws_in, ws_out):
      x = _layer(x, a, b)
    return x

  @jax.jit
  def scan(x, w_in, w_out):
    return jax.lax.scan(lambda x, w: (_layer(x, *w), None), x, (w_in, w_out))[0]

  @jax.jit
  def scan_int8(x, q_in, q_out, s_in, s_out):
    return jax.lax.scan(lambda x, w: (_layer(x, *w), None), x, (q_in, q_out, s_in, s_out))[0]

  bf16_bytes = 2 * L * D * F * 2
  int8_bytes = 2 * L * D * F + (s_in.nbytes + s_out.nbytes)
  print(f"{jax.devices()[0].device_kind}; jax {jax.__version__}; L={L} D={D} F={F}; "
        f"bf16 weights {bf16_bytes / 1e9:.2f} GB")
  for rows in map(int, FLAGS.rows):
    x = jnp.ones((rows, D), jnp.bfloat16)
    for name, fn, args, nbytes in (
        ("separate", separate, (separate_in, separate_out), bf16_bytes),
        ("scan", scan, (w_in, w_out), bf16_bytes),
        ("scan_int8", scan_int8, (q_in, q_out, s_in, s_out), int8_bytes)):
      t = _time(fn, x, *args)
      print(f"rows={rows} {name:10s} {t * 1e3:8.3f} ms  {nbytes / t / 1e9:8.0f} GB/s")
    _time_pallas(x, (q_in, q_out, s_in, s_out), int8_bytes, configs, scan_int8)


if __name__ == "__main__":
  app.run(main)
