"""How fast one decode token's attention reads a stage's KV cache, XLA against the kernel.

A decode step's attention is a memory-bound read of every row's cached keys and values.
This probe times that read alone, for `--layers` layers in a fori_loop (as a stage runs
them, the layer a loop index into the whole cache), in two forms:

- `xla`: `llama.attend` as XLA runs it (two batched matmuls with an f32 softmax between,
  every cache position read);
- `kernel[CONFIG]`: `decode_attention.attend_cached` + `combine`, one row per configuration
  in `--configs`, each with its largest deviation from an f32 reference (relative to the
  reference's largest magnitude).

Rows' lengths are drawn from [positions - spread, positions]; GB/s counts the keys and
values of those lengths only (what a decode step must read), for both forms. Example (one
GPU; the 8B shape, then a 70B pp=2 stage's micro-batch):

    python tools/decode_attention_probe.py --shapes=32x64x8x4x1152,40x32x8x8x1152

A shape is LxBxKxGxS (layers, rows, kv heads, query heads per kv head, cache positions),
head dim `--head_dim`. A configuration is `_`-separated fields: bs (positions per step),
sp (splits of a row; 0 picks them as the model does), w (warps), st (pipeline stages);
`bs64_sp0_w4_st2` is what the model runs. On CPU the kernel is interpreted.
"""

from __future__ import annotations

import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxpp.model import decode_attention, kv_cache, llama

flags.DEFINE_list("shapes", ["32x64x8x4x1152"], "LxBxKxGxS shapes to time")
flags.DEFINE_integer("head_dim", 128, "head dim H")
flags.DEFINE_integer("spread", 128, "row lengths are drawn from [S - spread, S]")
flags.DEFINE_integer("repeats", 20, "timed calls per form")
flags.DEFINE_list("configs", [
    "bs64_sp0_w4_st2", "bs64_sp1_w4_st2", "bs64_sp1_w4_st4", "bs128_sp1_w4_st2",
    "bs128_sp1_w8_st2", "bs64_sp2_w4_st2", "bs64_sp4_w4_st2", "bs32_sp1_w2_st2"],
    "kernel configurations (see the module docstring)")
FLAGS = flags.FLAGS

FIELDS = {"bs": "block_s", "sp": "splits", "w": "num_warps", "st": "num_stages"}


def kernel_config(name: str) -> dict:
  config = {}
  for field in name.split("_"):
    match = re.fullmatch(r"([a-z]+)(\d+)", field)
    if not match or match.group(1) not in FIELDS:
      raise app.UsageError(f"bad field {field!r} in config {name!r}")
    config[FIELDS[match.group(1)]] = int(match.group(2))
  return config


def _stream(attend_one, L: int):
  """Sums one layer's attention output over L layers; the cache a loop-invariant operand."""

  @jax.jit
  def run(q, kn, vn, ck, cv, lengths):
    def layer(l, acc):
      out = attend_one(q[l], kn[l], vn[l], kv_cache.LayerCache(ck, cv, (l,)), lengths)
      return acc + out.astype(jnp.float32)
    return jax.lax.fori_loop(0, L, layer, jnp.zeros(q.shape[1:], jnp.float32))
  return run


def _xla(q, kn, vn, cache, lengths):
  pos = lengths[:, None]
  return llama.attend(q[:, None], kn[:, None], vn[:, None], pos, lengths, cache,
                      q.dtype)[:, 0]


def _kernel(config, q, kn, vn, cache, lengths):
  pieces = decode_attention.attend_cached(q, cache.keys, cache.values, cache.at, lengths,
                                          **config)
  return decode_attention.combine(*pieces, q, kn, vn, q.dtype)


def _time(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def probe(shape: str, configs: dict) -> None:
  L, B, K, G, S = map(int, shape.split("x"))
  H = FLAGS.head_dim
  key = jax.random.key(0)
  draw = lambda i, s: jax.random.normal(jax.random.fold_in(key, i), s, jnp.bfloat16)
  q = draw(0, (L, B, K, G, H)) * H ** -0.5
  kn, vn = draw(1, (L, B, K, H)), draw(2, (L, B, K, H))
  ck, cv = draw(3, (L, B, K, S, H)), draw(4, (L, B, K, S, H))
  rng = np.random.default_rng(0)
  lengths = jnp.asarray(rng.integers(S - FLAGS.spread, S + 1, B), jnp.int32)
  nbytes = L * int(lengths.sum()) * K * H * 2 * 2
  args = (q, kn, vn, ck, cv, lengths)
  want = _stream(lambda q, kn, vn, c, n: _xla(q.astype(jnp.float32), kn.astype(jnp.float32),
                                              vn.astype(jnp.float32), c, n), L)(*args)
  scale = float(jnp.max(jnp.abs(want)))
  print(f"{shape} (H={H}): {nbytes / 1e9:.3f} GB of keys and values over {L} layers")
  forms = {"xla": _stream(_xla, L)}
  forms.update({f"kernel[{n}]": _stream(functools.partial(_kernel, c), L)
                for n, c in configs.items()})
  for name, fn in forms.items():
    try:
      err = float(jnp.max(jnp.abs(fn(*args) - want))) / scale
      t = _time(fn, *args)
    except Exception as e:  # one configuration failing to compile  # noqa: BLE001
      print(f"  {name:28s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      continue
    print(f"  {name:28s} {t / L * 1e6:8.1f} us/layer  {nbytes / t / 1e9:7.0f} GB/s  "
          f"err {err:.1e}")


def main(argv):
  del argv
  configs = {name: kernel_config(name) for name in FLAGS.configs}
  print(f"{jax.devices()[0].device_kind}; jax {jax.__version__}")
  for shape in FLAGS.shapes:
    probe(shape, configs)


if __name__ == "__main__":
  app.run(main)
