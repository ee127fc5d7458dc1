"""Run knobs that follow the layout (`serve/defaults.py`) and the job's use of them."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpp
from jaxpp import Layout
from jaxpp.job import compile_cache
from jaxpp.model import kv_cache
from jaxpp.model import params as params_lib
from jaxpp.parallel.pipeline import Pipeline
from jaxpp.parallel.schedule import formula_bubble
from jaxpp.plan import presets
from jaxpp.serve import defaults


@pytest.mark.parametrize("layout,chunk", [
    (Layout(1), 16), (Layout(4, 2), 16), (Layout(2), 16), (Layout(8), 24),
    (Layout(4, virtual_stages=2), 16), (Layout(8, microbatches=16), 16)])
def test_decode_chunk_keeps_the_bubble_small(layout, chunk):
  k = defaults.decode_chunk(layout)
  assert k == chunk and k % 8 == 0
  assert formula_bubble(layout.pp, layout.virtual_stages, layout.m, k) <= defaults.BUBBLE_TARGET
  if k > defaults.MIN_DECODE_CHUNK:  # and no shorter multiple of 8 would do
    assert formula_bubble(layout.pp, layout.virtual_stages, layout.m, k - 8) > \
        defaults.BUBBLE_TARGET


def test_slots_without_memory_stats_are_four_per_microbatch():
  cfg = presets.MODELS["tiny"]
  for layout in (Layout(1), Layout(2, 2), Layout(4, microbatches=8)):
    pipe = Pipeline.build(cfg, layout)
    assert jax.devices()[0].memory_stats() is None  # CPU: no figures to size by
    assert defaults.max_num_seqs(pipe, 256, jnp.float32) == 4 * layout.m


def test_slots_follow_free_memory():
  """Where devices report memory: what KV_MEMORY_SHARE of the free bytes holds, a multiple
  of m, capped at MAX_AUTO_SLOTS."""
  cfg = presets.MODELS["llama3-8b"]
  real = Pipeline.build(cfg, Layout(2, microbatches=4))
  per_slot = 2 * 16 * 8 * 128 * 1024 * 2  # K and V, 16 layers a stage, 1,024 positions, bf16
  free = {"bytes_limit": 10 * per_slot, "bytes_in_use": 0}

  class Device:
    process_index = 0

    def memory_stats(self):
      return free

  pipe = types.SimpleNamespace(microbatches=4, dp=1, cache_bytes_per_slot=real.cache_bytes_per_slot,
                               mesh=types.SimpleNamespace(devices=np.array([Device()] * 2)))
  assert real.cache_bytes_per_slot(1024, jnp.bfloat16) == per_slot
  # fp8: a byte an element, and a bf16 scale per 128-element (token, kv head) entry
  fp8 = kv_cache.storage_dtype("fp8", jnp.bfloat16)
  assert real.cache_bytes_per_slot(1024, fp8) == per_slot // 2 + 2 * 16 * 8 * 1024 * 2
  assert defaults.max_num_seqs(pipe, 1024, jnp.bfloat16) == 8  # 0.8 x 10 = 8 slots, two per micro-batch
  free["bytes_limit"] = 1000 * per_slot
  assert defaults.max_num_seqs(pipe, 1024, jnp.bfloat16) == defaults.MAX_AUTO_SLOTS
  free["bytes_limit"] = per_slot
  assert defaults.max_num_seqs(pipe, 1024, jnp.bfloat16) == 4  # never fewer than m
  pipe.dp = 3  # each replica's devices hold its own slots: three replicas, three times
  assert defaults.max_num_seqs(pipe, 1024, jnp.bfloat16) == 12


def test_more_microbatches_than_stages_is_warned_about():
  assert defaults.warnings(Layout(4)) == [] and defaults.warnings(Layout(2, microbatches=2)) == []
  (line,) = defaults.warnings(Layout(1, microbatches=4))
  assert line.startswith("schedule.microbatches=4 > pp=1") and "up to 4x slower" in line


def test_llm_takes_the_layout_s_decode_chunk(tmp_path):
  cfg = dataclasses.replace(presets.MODELS["tiny"], num_layers=8)
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                        params_lib.abstract_params(cfg, np.float32))
  assert jaxpp.LLM.from_params(cfg, params, layout="pp8", max_len=64).decode_chunk == 24
  assert jaxpp.LLM.from_params(cfg, params, max_len=64, decode_chunk=5).decode_chunk == 5
  with pytest.raises(jaxpp.JaxppError, match="decode_chunk=-1 must be >= 1"):
    jaxpp.LLM.from_params(cfg, params, max_len=64, decode_chunk=-1)


def test_compile_clock_counts_compiles_only_while_open(tmp_path):
  with compile_cache.CompileClock() as clock:
    jax.jit(lambda x: x * 3 + 1)(np.arange(7.0)).block_until_ready()
  assert clock.seconds > 0
  seen = clock.seconds
  jax.jit(lambda x: x * 5 - 2)(np.arange(9.0)).block_until_ready()
  assert clock.seconds == seen
  assert compile_cache.enable("") is None
