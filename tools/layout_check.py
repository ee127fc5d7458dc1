"""Runs one random-weight model under several layouts: same tokens? how fast?

A quick look before the full benchmark (`jaxpp.bench`, later): on whatever devices exist,
build a Llama shape with random weights, generate greedily under each layout, report
whether the tokens equal the first layout's and the decode rate (compile excluded).

  python tools/layout_check.py --layouts=pp1tp1,pp2tp1,pp1tp2 --layers=16 --hidden=2048
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

import jaxpp
from jaxpp.model import params as params_lib
from jaxpp.model.config import LlamaConfig

flags.DEFINE_string("layouts", "pp1tp1,pp2tp1", "comma-separated ppXtpY[vZ][mW] layouts")
flags.DEFINE_integer("layers", 8, "L")
flags.DEFINE_integer("hidden", 512, "D")
flags.DEFINE_integer("ffn", 1536, "F")
flags.DEFINE_integer("heads", 8, "N")
flags.DEFINE_integer("kv_heads", 8, "K")
flags.DEFINE_integer("vocab", 32000, "V")
flags.DEFINE_integer("batch", 8, "prompts")
flags.DEFINE_integer("prompt_len", 64, "tokens per prompt")
flags.DEFINE_integer("new_tokens", 32, "tokens generated per prompt")
flags.DEFINE_integer("decode_chunk", 16, "tokens per host return")
flags.DEFINE_string("dtype", "bfloat16", "bfloat16 or float32")
FLAGS = flags.FLAGS


def random_params(config: LlamaConfig, dtype, seed: int = 0) -> dict:
  """Normal weights scaled by 1/sqrt(D) (activations stay O(1)); norm scales of one."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, aval in params_lib.flatten(params_lib.abstract_params(config, dtype)).items():
    if path[-1] == "scale":
      out[path] = np.ones(aval.shape, np.float32)
    else:
      w = rng.standard_normal(aval.shape, np.float32) / np.sqrt(config.hidden_size)
      out[path] = w.astype(aval.dtype)
  return params_lib.nest(out)


def main(argv):
  del argv
  config = LlamaConfig(vocab_size=FLAGS.vocab, hidden_size=FLAGS.hidden,
                       intermediate_size=FLAGS.ffn, num_layers=FLAGS.layers,
                       num_heads=FLAGS.heads, num_kv_heads=FLAGS.kv_heads,
                       head_dim=FLAGS.hidden // FLAGS.heads, max_position_embeddings=8192)
  dtype = jaxpp.llm.resolve_dtype(FLAGS.dtype)
  params = random_params(config, dtype)
  rng = np.random.default_rng(1)
  prompts = rng.integers(3, FLAGS.vocab, (FLAGS.batch, FLAGS.prompt_len)).tolist()
  max_len = FLAGS.prompt_len + FLAGS.new_tokens + FLAGS.decode_chunk
  print(f"devices: {jaxpp.llm.devices_summary()}; jax {jax.__version__}; "
        f"{config.param_count() / 1e9:.2f}B params, {FLAGS.dtype}")
  first = None
  for text in FLAGS.layouts.split(","):
    llm = jaxpp.LLM.from_params(config, params, max_len=max_len,
                                decode_chunk=FLAGS.decode_chunk, layout=text)
    llm.generate(prompts, max_new_tokens=FLAGS.new_tokens)  # compile
    start = time.perf_counter()
    out = [c.token_ids for c in llm.generate(prompts, max_new_tokens=FLAGS.new_tokens)]
    seconds = time.perf_counter() - start
    first = first or out
    same = np.mean([a == b for a, b in zip(out, first)])
    tokens = sum(map(len, out))
    print(f"{text:>12}: {tokens / seconds:9.1f} generated tok/s  {seconds:7.3f} s  "
          f"same tokens as {FLAGS.layouts.split(',')[0]}: {same:.0%} of prompts")


if __name__ == "__main__":
  app.run(main)
