"""Issue 21's measurement of 8-bit decode on one GPU, in one call: the kernel's tiles tuned
per projection shape, then the engine in bf16, int8 and fp8 with those tiles.

    python tools/quant_bench.py --out=OUT [--steps=tune,long,short] [--configs=...]

- `tune` (or `--tuned=tune.json` of an earlier call): for each [K, N] of the Llama-3-8B
  block projections (wqkv, wo, w_gate_up, w_down: the fused layout of params.py), a 32-layer
  int8 stack multiplied layer by layer in a fori_loop (the layer a traced index, as a
  stage's scan gives it) at `--rows` rows, once per configuration in
  `--configs` (`weight_stream_probe.py`'s names: bm, bn, bk, s, w, st, and `t` for the
  swapped dot); prints GB/s of int8 read and keeps each shape's fastest for the runs below
  (`int8_matmul.decode_tiles`, replaced in this process only).
- `gemm`: prefill's GEMMs (`--gemm_tokens` rows) in bf16, dequantise-then-dot and fp8 x fp8,
  one layer of each fused shape: whether prefill with 8-bit weights can beat bf16's.
- `long`: `jaxpp.bench`'s 256 requests of 1,024 in / 128 out at 64 slots, `--quant=none,
  int8,fp8` (pp1tp1, `--attention=kernel`: for bf16 the same kernels as auto on one GPU,
  for 8-bit weights also the decode GEMM kernel); `short`: the same with 128-token prompts;
  `70b`: the 70B shape's 40-layer stage (docs/bench/llama3-70b-40layers.json), 1,024/128.

Writes OUT/tune.json (GB/s per shape and configuration, and the chosen tiles) and
OUT/<step>/results.json per bench step.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from jaxpp.bench.suite import BenchOptions, run_suite
from jaxpp.model import int8_matmul, packed8, quant

flags.DEFINE_string("out", "out/quant_bench", "output directory")
flags.DEFINE_list("steps", ["tune", "long", "short"], "gemm, tune, long, short, 70b")
flags.DEFINE_list("gemm_tokens", ["2048", "8192"], "the `gemm` step's rows (prefill tokens)")
flags.DEFINE_list("quant", ["none", "int8", "fp8"], "weight storage per bench run")
flags.DEFINE_list("kv_dtype", ["auto"], "the bench's --kv_dtype per run (auto, fp8)")
flags.DEFINE_list("attention", ["kernel"], "the bench's --attention per run: kernel puts "
                  "decode's 8-bit projections in int8_matmul's kernel (auto does not yet)")
flags.DEFINE_string("tuned", "", "a tune.json of an earlier call: its chosen tiles instead "
                    "of the `tune` step")
flags.DEFINE_integer("rows", 64, "activation rows (the bench's decode micro-batch)")
flags.DEFINE_list("configs", [  # the built-in tiles (decode_tiles), then what to try next
    "bm64_bn256_bk64_s0_w4_st4", "bm64_bn256_bk128_s0_w8_st3", "bm64_bn128_bk128_s0_w4_st4",
    "bm64_bn128_bk128_s0_w4_st4_t", "bm64_bn256_bk64_s0_w4_st4_t", "bm64_bn256_bk128_s0_w8_st3_t",
    "bm64_bn128_bk64_s0_w4_st4", "bm64_bn64_bk128_s0_w4_st4", "bm64_bn256_bk64_s2_w4_st4",
    "bm64_bn512_bk64_s0_w8_st3_t"], "kernel configurations to time per shape")
FLAGS = flags.FLAGS
SHAPES = {"wqkv": (4096, 6144), "wo": (4096, 4096), "w_gate_up": (4096, 28672),
          "w_down": (14336, 4096)}
LAYERS = 32


def config_of(name: str) -> dict:
  """`stacked_matmul` keywords from a configuration's name (`int8_matmul.tiles_of`)."""
  try:
    return int8_matmul.tiles_of(name)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def time_stream(x, q, s, config: dict, repeats: int = 20) -> float:
  """Seconds per pass over the stack, one product per layer."""
  matmul = functools.partial(int8_matmul.stacked_matmul, **config)

  @jax.jit
  def stream(x, q, s):
    def layer(l, acc):
      return acc + matmul(x, q, s, l).astype(jnp.float32)[:, :8].sum()
    return jax.lax.fori_loop(0, LAYERS, layer, jnp.float32(0))

  jax.block_until_ready(stream(x, q, s))
  start = time.perf_counter()
  for _ in range(repeats):
    out = stream(x, q, s)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def tune(out: pathlib.Path) -> dict:
  """{(K, N): config} of the fastest configuration per shape; writes tune.json."""
  key = jax.random.key(0)
  x = jax.random.normal(key, (FLAGS.rows, 14336), jnp.bfloat16)
  report, best = {}, {}
  for names, (K, N) in SHAPES.items():
    w = jax.random.normal(jax.random.fold_in(key, K + N), (LAYERS, K, N), jnp.bfloat16)
    q, s = jax.jit(lambda w: quant.quantize(w, "int8", (1,), jnp.bfloat16))(w)
    q = packed8.pack(q)  # as the model stores it (w_gate_up's stack is 3.5 GiB)
    del w
    rates = {}
    for name in FLAGS.configs:
      try:
        t = time_stream(x[:, :K], q, s, config_of(name))
        rates[name] = q.nbytes / t / 1e9
        print(f"{names} [{K}, {N}] {name}: {t * 1e3:.3f} ms, {rates[name]:,.0f} GB/s",
              flush=True)
      except Exception as e:  # noqa: BLE001 - a tile Triton rejects: note it, go on
        print(f"{names} {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    top = max(rates, key=rates.get) if rates else None
    if top:  # else the defaults (int8_matmul.decode_tiles) stay
      best[(K, N)] = config_of(top)
    report[names] = dict(shape=[K, N], gb_per_s=rates, best=top)
  (out / "tune.json").write_text(json.dumps(report, indent=1))
  return best


def gemm(out: pathlib.Path) -> None:
  """Prefill's GEMMs at `--gemm_tokens` rows, one layer of each fused shape, in each form
  8-bit weights could take there: bf16 (the baseline), dequantise-then-dot (today's
  prefill) for int8 and fp8, and fp8 x fp8 (the activations quantised per row, both scales
  in the epilogue: cuBLASLt's fp8 GEMM on Hopper). Prints TFLOP/s and each form's largest
  error against the f32-accumulated bf16 product; writes gemm.json."""
  key = jax.random.key(1)
  forms = {
      "bf16": lambda x, w, q, s: x @ w,
      "int8 dequantised": lambda x, w, q, s: x @ (q.astype(x.dtype) * s),
      "fp8 dequantised": lambda x, w, q, s: x @ (q.astype(x.dtype) * s),
      "fp8 x fp8": lambda x, w, q, s: fp8_product(x, q, s)}
  report = {}
  for tokens in map(int, FLAGS.gemm_tokens):
    for names, (K, N) in SHAPES.items():
      x = jax.random.normal(key, (tokens, K), jnp.bfloat16)
      w = jax.random.normal(jax.random.fold_in(key, K + N), (K, N), jnp.bfloat16) / K ** 0.5
      exact = jnp.dot(x, w, preferred_element_type=jnp.float32)
      for form, f in forms.items():
        mode = "int8" if form.startswith("int8") else "fp8"
        q, s = quant.quantize(w, mode, (0,), jnp.bfloat16)
        step = jax.jit(f)
        try:
          err = float(jnp.max(jnp.abs(step(x, w, q, s) - exact)) / jnp.max(jnp.abs(exact)))
          start = time.perf_counter()
          for _ in range(20):
            y = step(x, w, q, s)
          jax.block_until_ready(y)
          t = (time.perf_counter() - start) / 20
          rate = 2 * tokens * K * N / t / 1e12
          report[f"{tokens} {names} {form}"] = dict(tflop_per_s=rate, max_error=err)
          print(f"gemm {tokens} x [{K}, {N}] {form}: {t * 1e3:.3f} ms, {rate:,.0f} TFLOP/s, "
                f"max error {err:.1e} of the largest output", flush=True)
        except Exception as e:  # noqa: BLE001 - a form the backend refuses: note it, go on
          print(f"gemm {names} {form} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
  (out / "gemm.json").write_text(json.dumps(report, indent=1))


def fp8_product(x, q, s):
  """x @ (q * s) with x rounded to e4m3 per row: both operands fp8, f32 accumulation."""
  xs = jnp.max(jnp.abs(x), axis=1, keepdims=True).astype(jnp.float32) / 448.0
  xs = jnp.maximum(xs, 1e-12)
  xq = (x / xs).astype(jnp.float8_e4m3fn)
  y = jax.lax.dot_general(xq, q, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return (y * xs * s.astype(jnp.float32)).astype(x.dtype)


def main(argv):
  del argv
  out = pathlib.Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  gpu = jax.devices()[0].device_kind
  hw = "h200" if "H200" in gpu else "h100"
  best = None
  if "gemm" in FLAGS.steps:
    gemm(out)
  if "tune" in FLAGS.steps:
    best = tune(out)
  elif FLAGS.tuned:
    report = json.loads(pathlib.Path(FLAGS.tuned).read_text())
    best = {tuple(r["shape"]): config_of(r["best"]) for r in report.values() if r["best"]}
  if best:
    default = int8_matmul.decode_tiles
    int8_matmul.decode_tiles = lambda M, K, N: best.get((K, N)) or default(M, K, N)
  runs = dict(long=dict(model="llama3-8b", input_len=1024),
              short=dict(model="llama3-8b", input_len=128),
              **{"70b": dict(model="docs/bench/llama3-70b-40layers.json", input_len=1024)})
  for step in FLAGS.steps:
    if step in runs:
      run_suite(BenchOptions(hardware=hw, layouts="pp1tp1", output_len=128,
                             num_requests=256, max_num_seqs=64,
                             quant=tuple(FLAGS.quant), attention=tuple(FLAGS.attention),
                             kv_dtype=tuple(FLAGS.kv_dtype),
                             out=str(out / step),
                             **runs[step]))


if __name__ == "__main__":
  app.run(main)
