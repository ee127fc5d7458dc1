"""Prefill attention on a GPU: cuDNN's packed flash kernel against the einsum reference.

What the CPU tests cannot check (tests/test_prefill_attention.py says why), on one GPU:

1. numbers: `prefill_attention.attend_local` (cuDNN, bf16) against `bounds_reference` in
   f32, on packed rows of mixed lengths with a fully padded row, for GQA, MQA and MHA:
   the largest deviation relative to the reference's largest magnitude, and NaNs;
2. memory: the compiled HLO of a layer's prefill attention (`llama.attend`) at T tokens
   a row, kernel path and XLA's, and the largest f32 buffer in each (XLA's holds
   [rows, K, G, T, T] scores; the kernel's must hold nothing of T x T);
3. speed: TFLOP/s of both at 1,024 and 8,192 tokens a row (16,384 tokens a call), one
   prompt a row or four, counting the causal FLOPs, 2 * L^2 * N * H for each prompt of L
   tokens (XLA computes twice that, all of [T, T]);
4. sliding windows (`--checks windows`): cuDNN's `sliding_window_length` on packed rows
   against the reference's window mask, and the decode kernel reading from each row's
   window start (`firsts`) against a masked softmax, both in bf16 against f32.

    JAX_PLATFORMS=cuda,cpu PYTHONPATH=. python tools/prefill_attention_check.py \
        [--checks numbers,memory,speed,windows]
"""

from __future__ import annotations

import argparse
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpp.model import decode_attention as da
from jaxpp.model import llama
from jaxpp.model import prefill_attention as pa
from jaxpp.model.attention_choice import Kernels

H = 128


def packed(rows: list[list[int]], T: int) -> jnp.ndarray:
  seg = np.full((len(rows), T), -1, np.int32)
  for b, lengths in enumerate(rows):
    at = 0
    for s, n in enumerate(lengths):
      seg[b, at:at + n] = s
      at += n
  return jnp.asarray(seg)


def qkv(B, T, N, K, dtype=jnp.bfloat16):
  ks = jax.random.split(jax.random.key(0), 3)
  q = (jax.random.normal(ks[0], (B, T, N, H)) * H ** -0.5).astype(dtype)
  k = jax.random.normal(ks[1], (B, T, K, H)).astype(dtype)
  v = jax.random.normal(ks[2], (B, T, K, H)).astype(dtype)
  return q, k, v


def numbers() -> list[dict]:
  out = []
  segments = packed([[100, 300, 50], [512], [], [7, 1, 200, 33]], 512)
  for name, (N, K) in dict(gqa=(32, 8), mqa=(8, 1), mha=(8, 8)).items():
    q, k, v = qkv(4, 512, N, K)
    got = jax.jit(lambda *a: pa.attend_local(*a, on_gpu=True))(q, k, v, segments)
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    want = jax.jit(lambda *a: pa.attend_local(*a, on_gpu=False))(*f32, segments)
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
    out.append(dict(check="numbers", heads=name, relative_error=err,
                    nan=bool(jnp.isnan(got).any()),
                    padding_zero=bool((got[2] == 0).all())))
  return out


def largest_f32(hlo: str) -> int:
  """Elements of the largest f32 array in an HLO text."""
  sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
           for dims in re.findall(r"f32\[([\d,]*)\]", hlo)]
  return max(sizes, default=0)


def memory(T: int = 8192, B: int = 2, N: int = 32, K: int = 8) -> list[dict]:
  out = []
  q, k, v = qkv(B, T, N, K)
  segments = packed([[T // 2, T // 4]] * B, T)
  positions = jnp.zeros((B, T), jnp.int32)  # not read by either form's mask here
  q5 = q.reshape(B, T, K, N // K, H)
  for label, kernels in (("kernel", Kernels(prefill=True, gpu=True)), ("xla", Kernels())):
    f = jax.jit(lambda q, k, v, s, kernels=kernels: llama.attend(
        q, k, v, positions, jnp.zeros((B,), jnp.int32), None, jnp.bfloat16, segments=s,
        kernels=kernels))
    compiled = f.lower(q5, k, v, segments).compile()
    size = largest_f32(compiled.as_text())
    stats = compiled.memory_analysis()
    out.append(dict(check="memory", attention=label, T=T, rows=B,
                    largest_f32_elements=size, t_by_t=T * T, holds_t_by_t=size >= T * T,
                    temp_gib=getattr(stats, "temp_size_in_bytes", 0) / 2 ** 30))
  return out


def timed(f, *args, n: int = 10) -> float:
  f(*args).block_until_ready()
  start = time.perf_counter()
  for _ in range(n):
    y = f(*args)
  y.block_until_ready()
  return (time.perf_counter() - start) / n


def speed() -> list[dict]:
  out = []
  for T in (1024, 8192):
    B = 16384 // T
    for per_row in (1, 4):
      L = T // per_row
      q, k, v = qkv(B, T, 32, 8)
      segments = packed([[L] * per_row] * B, T)
      flops = B * per_row * 2 * L * L * 32 * H  # causal: half of 4 L^2 N H
      row = dict(check="speed", T=T, prompts_per_row=per_row)
      for label, on_gpu in (("kernel", True), ("xla", False)):
        f = jax.jit(lambda *a, on_gpu=on_gpu: pa.attend_local(*a, on_gpu=on_gpu))
        row[f"{label}_tflops"] = flops / timed(f, q, k, v, segments, n=10 if on_gpu else 3) / 1e12
      out.append(row)
  return out


def windows() -> list[dict]:
  out = []
  segments = packed([[100, 300, 50], [512], [], [7, 1, 200, 33]], 512)
  q, k, v = qkv(4, 512, 32, 8)
  f32 = [a.astype(jnp.float32) for a in (q, k, v)]
  for window in (1, 64, 257, 4096):
    run = lambda *a, gpu, window=window: pa.attend_local(*a, on_gpu=gpu, window=window)
    try:
      got = jax.jit(lambda *a: run(*a, gpu=True))(q, k, v, segments)
    except Exception as e:  # noqa: BLE001 - the check reports what cuDNN refused
      out.append(dict(check="prefill_window", window=window, error=str(e).splitlines()[0]))
      continue
    want = jax.jit(lambda *a: run(*a, gpu=False))(*f32, segments)
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
    out.append(dict(check="prefill_window", window=window, relative_error=err,
                    nan=bool(jnp.isnan(got).any())))
  B, K, G, S = 8, 8, 4, 4096
  ks = jax.random.split(jax.random.key(1), 5)
  qd = (jax.random.normal(ks[0], (B, K, G, H)) * H ** -0.5).astype(jnp.bfloat16)
  keys = jax.random.normal(ks[1], (1, B, K, S, H)).astype(jnp.bfloat16)
  values = jax.random.normal(ks[2], (1, B, K, S, H)).astype(jnp.bfloat16)
  k_new, v_new = (jax.random.normal(kk, (B, K, H)).astype(jnp.bfloat16) for kk in ks[3:])
  lengths = jnp.asarray([1, 63, 64, 700, 2048, 3000, 4000, 4095], jnp.int32)
  for window in (16, 1024):
    firsts = jnp.maximum(lengths - window + 1, 0)
    got = jax.jit(lambda: da.combine(*da.attend_cached(qd, keys, values, (0,), lengths, firsts),
                                     qd, k_new, v_new, jnp.float32))()
    at = jnp.arange(S)
    inside = (at < lengths[:, None]) & (at >= firsts[:, None])  # [B, S]
    q32, k32, v32 = (a.astype(jnp.float32) for a in (qd, keys[0], values[0]))
    s = jnp.where(inside[:, None, None], jnp.einsum("BKGH,BKSH->BKGS", q32, k32), -jnp.inf)
    s_new = jnp.einsum("BKGH,BKH->BKG", q32, k_new.astype(jnp.float32))[..., None]
    p = jax.nn.softmax(jnp.concatenate([s, s_new], -1), -1)
    want = (jnp.einsum("BKGS,BKSH->BKGH", p[..., :S], v32)
            + p[..., S:] * v_new.astype(jnp.float32)[:, :, None])
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    out.append(dict(check="decode_window", window=window, relative_error=err,
                    nan=bool(jnp.isnan(got).any())))
  return out


CHECKS = dict(numbers=numbers, memory=memory, speed=speed, windows=windows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checks", default="numbers,memory,speed,windows",
                      help=f"comma-separated, of {', '.join(CHECKS)}")
  args = parser.parse_args()
  print(json.dumps(dict(jax=jax.__version__, device=str(jax.devices()[0]),
                        available=pa.available(jax.devices()[0]))))
  for name in args.checks.split(","):
    for row in CHECKS[name]():
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
