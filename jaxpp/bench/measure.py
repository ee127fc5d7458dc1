"""One layout measured: warm-up, the timed run, and its rates against the rooflines.

`run_layout` places random weights of the shape on the layout, probes every stage, compiles
every program the timed run meets (a short wave of every slot and the prefills of its waves;
with a workload file, one untimed run of the same requests) and only then times the
requests through the batch engine, or through
the plain GSPMD baseline for `gspmd_tpN`; `hf_row` measures transformers'
`device_map="auto"`. `_numbers` turns token counts and seconds into the reported rates.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
import types

import jax
import jax.numpy as jnp

from jaxpp.bench import baseline_hf, baseline_tp, trace_summary
from jaxpp.bench import plots as bench_plots
from jaxpp.bench.random_weights import random_llm
from jaxpp.dist import distributed, health
from jaxpp.errors import JaxppError
from jaxpp.job import compile_cache
from jaxpp.llm import resolve_dtype
from jaxpp.model import kv_cache
from jaxpp.model import quant as quant_lib
from jaxpp.parallel import schedule
from jaxpp.parallel.layout import Layout
from jaxpp.parallel.mesh import per_device_bytes
from jaxpp.serve import defaults, requests
from jaxpp.serve.stats import percentiles


def output_lens(prompts: list[list[int]], args) -> list[int]:
  """Each prompt's new tokens: `args["output_lens"]` (a workload file) or `output_len` each."""
  lens = args.get("output_lens") or [args["output_len"]] * len(prompts)
  if len(lens) != len(prompts):
    raise JaxppError(f"{len(lens)} output lengths for {len(prompts)} prompts")
  return list(lens)


def run_layout(config, hw, text: str, prompts: list[list[int]], args) -> dict:
  """Warm up, then time every prompt on one layout; returns the layout's numbers.

  `text` is a pipeline layout (`pp2tp2`, run by the engine) or `gspmd_tpN`, the plain
  GSPMD tensor-parallel baseline (`baseline_tp.py`, static waves of max_num_seqs).
  """
  tp_baseline = baseline_tp.parse(text)
  layout = (Layout(1, tp_baseline) if tp_baseline else
            Layout.parse(text, layer_split=args.get("layer_split", "even")))
  lens = output_lens(prompts, args)
  max_len = max(len(p) + n for p, n in zip(prompts, lens))
  rt = distributed.current()
  dog = rt.watchdog()
  start = time.perf_counter()
  llm = random_llm(config, resolve_dtype(args["dtype"]), max_len=max_len,
                   decode_chunk=args["decode_chunk"],
                   quant=quant_lib.Quant(args.get("quant", "none"),
                                         args.get("quant_embed", False)),
                   scan_unroll=args.get("scan_unroll", 1),
                   attention=args.get("attention", "auto"), layout=layout)
  rt.set_layout(llm.pipeline.mesh)
  probe_start = time.perf_counter()
  health.startup(llm.pipeline.mesh, dog, lambda line: print(line, file=sys.stderr))
  start += time.perf_counter() - probe_start  # compile_seconds leaves the probe out
  slots = args["max_num_seqs"] or len(prompts)
  pipe = llm.pipeline
  if tp_baseline:
    params = llm.params = baseline_tp.plain_params(pipe, llm.params)
    run = lambda batch, new: baseline_tp.run(pipe, params, batch, output_len=new,
                                             max_num_seqs=slots,
                                             decode_chunk=args["decode_chunk"], max_len=max_len)
    waves = {}  # a wave's programs depend on its size and longest prompt, not on lengths
    for first in range(0, len(prompts), slots):
      wave = prompts[first:first + slots]
      waves.setdefault((len(wave), max(map(len, wave))), wave)
    for wave in waves.values():  # compiles the programs of every wave shape the timed run
      run(wave, args["decode_chunk"] + 2)  # meets; two decode calls: the 2nd is its own
    compile_s, bubble_measured, microbatches, prefill_m = time.perf_counter() - start, 0.0, 1, 1
    wall = time.perf_counter()
    with compile_cache.CompileClock() as timed_compiles:
      result = run(prompts, lens)
    wall = time.perf_counter() - wall
    st = types.SimpleNamespace(**result, tick_seconds=[
        s / args["decode_chunk"] for s in result["call_seconds"]])
  else:

    def run(batch, new_tokens):
      eng = llm.engine(max_num_seqs=slots, watchdog=dog,
                       block_size=args.get("block_size", defaults.BLOCK_SIZE),
                       kv_cache_memory=args.get("kv_cache_memory", 0.0),
                       prefix_cache=args.get("prefix_cache", False),
                       prefill_chunk=args.get("prefill_chunk", 0),
                       kv_dtype=args.get("kv_dtype", "auto"),
                       kv_grow=args.get("kv_grow", False))
      for i, (p, n) in enumerate(zip(batch, new_tokens)):
        eng.submit(requests.Request(str(i), p, n))
      eng.run(lambda f: None)
      return eng

    if args.get("workload", "random") == "random":
      # One short wave of every slot compiles the decode programs the timed run meets
      # (shapes depend on the slots, not on lengths), then the prefills of its admissions:
      # full waves and the last one.
      warm = run(prompts[:slots], [2] * slots)
      waves = [n for n in {min(slots, len(prompts)), len(prompts) % slots} if n]
      warm.precompile_prefills([len(p) for p in prompts],
                               admissions=[[len(prompts[0])] * n for n in waves])
    else:
      # Requests of a workload file finish at different times, so admissions take many
      # sizes: the run itself, once untimed, compiles exactly the programs the timed run
      # meets (the engine decides alike on the same requests), where compiling every
      # admission that could happen took minutes.
      warm = run(prompts, lens)
    compile_s = time.perf_counter() - start
    microbatches = pipe.microbatches
    prefill_m = warm.prefiller.prefill_m
    del warm  # frees its KV cache before the timed engine allocates one
    wall = time.perf_counter()
    with compile_cache.CompileClock() as timed_compiles:  # the warm-up should leave none
      st = run(prompts, lens).stats
    wall = time.perf_counter() - wall
    bubble_measured = st.idle_share()  # from the timed run's own decode calls, as the job
  profile = None
  if args.get("profile_dir"):
    profile = str(trace_wave(run, prompts[:slots], lens[:slots], text, args["profile_dir"]))
  # the prompt tokens the prefills computed (a prefix served from the cache is not; the
  # GSPMD baseline computes them all)
  computed = getattr(st, "prefill_tokens", st.prompt_tokens)
  head_name = "embed" if config.tie_word_embeddings else "lm_head"
  row = _numbers(config, hw, st, wall, len(prompts), microbatches, _mean_ctx(prompts, lens),
                 devices=pipe.mesh.size, rounds=st.decode_calls * args["decode_chunk"],
                 weight_bytes=sum(x.nbytes for x in jax.tree.leaves(llm.params["blocks"])),
                 head_bytes=sum(llm.params[name].nbytes
                                for name in (head_name, head_name + quant_lib.SCALE)
                                if name in llm.params),
                 kv_bytes=kv_cache.element_bytes(kv_cache.storage_dtype(
                     args.get("kv_dtype", "auto"), llm.dtype), config.head_dim),
                 prompt_lengths=[len(p) for p in prompts], replicas=layout.dp)
  return dict(
      layout=text, devices=layout.devices, pp=pipe.pp, tp=layout.tp,
      virtual_stages=pipe.v, layer_split=list(pipe.partition.counts),
      quant=args.get("quant", "none"),
      attention=pipe.kernels.label(),
      block_size=0 if tp_baseline else args.get("block_size", defaults.BLOCK_SIZE),
      prefix_cache=bool(args.get("prefix_cache")) and not tp_baseline,
      prefill_chunk=0 if tp_baseline else args.get("prefill_chunk", 0),
      kv_dtype="auto" if tp_baseline else args.get("kv_dtype", "auto"),
      kv_grow=bool(args.get("kv_grow")) and not tp_baseline,
      kv_cache=getattr(st, "kv", {}), max_live=getattr(st, "max_live", None),
      weight_gb_per_device=max(per_device_bytes(llm.params).values()) / 1e9,
      microbatches=microbatches, prefill_microbatches=prefill_m, max_num_seqs=slots,
      requests=len(prompts), workload=args.get("workload", "random"),
      prompt_tokens=st.prompt_tokens, completion_tokens=st.completion_tokens,
      prefill_tokens=computed,
      prefill_padding=(1 - computed / st.prefill_positions
                       if getattr(st, "prefill_positions", 0) else None),
      scan_unroll=pipe.scan_unroll, compile_seconds=compile_s,
      timed_compiles=timed_compiles.compiles, wall_seconds=wall, **row,
      bubble_schedule=schedule.formula_bubble(pipe.pp, pipe.v, microbatches,
                                              args["decode_chunk"]),
      bubble_measured=bubble_measured, tick_seconds=percentiles(st.tick_seconds),
      profile=profile)


def trace_wave(run, prompts, lens, layout: str, profile_dir: str) -> pathlib.Path:
  """Runs one wave under `jax.profiler.trace`; writes the trace, where its device time went
  (`summary.json`, `summary.md`) and when (`activity.png`) to profile_dir/layout[/pN];
  returns summary.md's path.

  After the timed run, so every program is compiled and the trace holds only execution.
  """
  rt = distributed.current()
  directory = pathlib.Path(profile_dir) / layout
  if rt.num_processes > 1:
    directory = directory / f"p{rt.process_id}"
  with jax.profiler.trace(str(directory)):
    run(prompts, lens)
  evs = trace_summary.events(trace_summary.find_trace(directory))
  summary = trace_summary.summarize(evs)
  (directory / "summary.json").write_text(json.dumps(summary, indent=1))
  md = directory / "summary.md"
  title = f"{layout}: one wave of {len(prompts)} requests, {sum(lens)} new tokens"
  md.write_text(trace_summary.markdown(summary, title) + "\n")
  try:
    bench_plots.activity_png(trace_summary.activity(evs), directory / "activity.png", title)
  except ImportError:
    print("activity.png skipped: matplotlib is not installed (pip install matplotlib)")
  return md


def hf_row(config, hw, prompts: list[list[int]], args) -> dict:
  """The `hf_auto` baseline's numbers (bf16 or f32 weights as --dtype; never quantised)."""
  start, lens = time.perf_counter(), output_lens(prompts, args)
  slots = args["max_num_seqs"] or len(prompts)
  res = baseline_hf.run(config.to_hf(), prompts, output_len=lens, max_num_seqs=slots,
                        dtype=args["dtype"])
  setup = time.perf_counter() - start - res["wall_seconds"] - res["prefill_seconds"]
  st = types.SimpleNamespace(**res)
  itemsize = jnp.dtype(resolve_dtype(args["dtype"])).itemsize
  p = len(res["devices"])
  head = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
  row = _numbers(config, hw, st, res["wall_seconds"], len(prompts), 1, _mean_ctx(prompts, lens),
                 devices=p, rounds=sum(max(lens[i:i + slots]) - 1  # a wave runs to its longest
                                       for i in range(0, len(prompts), slots)),
                 weight_bytes=config.num_layers * config.block_param_count() * itemsize,
                 head_bytes=head * itemsize, kv_bytes=itemsize,
                 prompt_lengths=[len(p) for p in prompts])
  return dict(
      layout=baseline_hf.NAME, devices=p, pp=p, tp=1, virtual_stages=1, layer_split=None,
      quant="none",
      attention="transformers",
      weight_gb_per_device=config.param_count() * itemsize / p / 1e9, microbatches=1,
      prefill_microbatches=1,
      max_num_seqs=slots, requests=len(prompts), workload=args.get("workload", "random"),
      prompt_tokens=res["prompt_tokens"], completion_tokens=res["completion_tokens"],
      scan_unroll=None, compile_seconds=setup, wall_seconds=res["wall_seconds"], **row,
      bubble_schedule=(p - 1) / p,  # one device works at a time
      bubble_measured=None, tick_seconds=percentiles([]), profile=None)


def _mean_ctx(prompts: list[list[int]], lens: list[int]) -> float:
  """Mean context a generated token attends to: input + output / 2 per request, weighted by
  each request's output tokens (input_len + output_len / 2 for the fixed-length workload)."""
  return sum(n * (len(p) + n / 2) for p, n in zip(prompts, lens)) / sum(lens)


def _numbers(config, hw, st, wall: float, requests: int, microbatches: int, mean_ctx: float,
             *, devices: int, rounds: int, weight_bytes: int, head_bytes: int,
             kv_bytes: float, prompt_lengths: list[int], replicas: int = 1) -> dict:
  """Rates and roofline shares from a run's token counts and prefill / decode seconds.

  `rounds` are the decode steps of the whole batch; `weight_bytes` the blocks' stored bytes
  and `head_bytes` the LM head's, all of which each micro-batch of a round reads; `kv_bytes`
  a cached element's (`kv_cache.element_bytes`);
  `mean_ctx` the mean context (cache positions) a decode step reads per token. Prefill's
  roofline counts `2 * params` FLOPs a prompt token plus causal attention's `2 * L^2 * N * H`
  a layer for a prompt of L tokens (QK^T and PV over the lower triangle).
  """
  # the prompt tokens the prefills computed (a prefix served from the cache is not)
  n, head = getattr(st, "prefill_tokens", st.prompt_tokens), head_bytes
  kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * kv_bytes
  # every micro-batch of every replica re-reads its stage's weights each round; KV read once
  # per token
  decode_bytes = rounds * microbatches * replicas * (weight_bytes + head) + \
      st.completion_tokens * mean_ctx * kv_per_token
  attention_flops = sum(2 * L * L for L in prompt_lengths) * (
      config.num_heads * config.head_dim * config.num_layers)
  prefill_flops = 2 * config.param_count() * n + attention_flops
  tokens = st.prompt_tokens + st.completion_tokens
  return dict(
      requests_per_second=requests / wall,
      total_tokens_per_second=tokens / wall,
      output_tokens_per_second=st.completion_tokens / wall,
      tokens_per_second_per_gpu=tokens / wall / devices,
      prefill_tokens_per_second=n / st.prefill_seconds,
      decode_tokens_per_second=st.completion_tokens / st.decode_seconds,
      decode_hbm_gbps_per_gpu=decode_bytes / st.decode_seconds / devices / 1e9,
      decode_hbm_roofline=decode_bytes / st.decode_seconds / devices / hw.hbm_bandwidth,
      prefill_matmul_roofline=prefill_flops / st.prefill_seconds / devices / hw.matmul_flops)
