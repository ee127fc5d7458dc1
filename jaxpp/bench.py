"""`python -m jaxpp.bench`: layouts measured on the same model shape, workload and machine.

For each layout (`pp4tp1`, `pp2tp2`, `pp1tp4v1m8`, `pp4tp1m4p16`: 16 prefill micro-batches,
...) the model shape gets random weights created directly on the devices, already sharded
(no host copy), and the batch engine runs `num_requests` random-token prompts of
`input_len` tokens for exactly `output_len` new tokens each (stop ids ignored), or the
requests of a `--workload` JSONL file, each with its own prompt and output length
(`bench_workload.py`). A short warm-up wave of every slot, then every prefill an admission
can pick (`Engine.precompile_prefills`), compile the programs first; compile time is
reported separately and never timed as throughput.

Reported per layout, in the form inference servers print: requests/s, total and output
tokens/s, tokens/s per GPU, prefill and decode rates, achieved HBM GB/s and % of the HBM
roofline during decode, % of the matmul roofline during prefill, the schedule's bubble and
the measured one, and the pipeline tick time p50/p99. Written as JSON, a Markdown table and
PNG plots (`bench_plots.py`: throughput against micro-batches; each pipeline layout's
decode schedule at its measured tick time).

`gspmd_tpN` in `--layouts` adds the baseline a JAX user would write instead: the plain model
tensor-parallel over N devices by GSPMD, in static waves (`baseline_tp.py`); its "tick" is
one decode step. `hf_auto` adds the naive layer-split pipeline many people run: Hugging Face
transformers with `device_map="auto"` over the visible GPUs (`baseline_hf.py`, a child
process that runs before any JAX program touches the devices; needs `accelerate`).

Several processes take the distributed flags of `jaxpp.run` (docs/multihost.md); process 0
prints and writes the results. Each layout starts with the health probe, and every device
step runs under a watchdog with its default bounds.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxpp import baseline_hf, baseline_tp, bench_plots, bench_workload, distributed, health
from jaxpp import presets, report, trace_summary
from jaxpp import schedule
from jaxpp import engine as engine_lib
from jaxpp import pipeline as pipeline_lib
from jaxpp import watchdog as watchdog_lib
from jaxpp.errors import JaxppError
from jaxpp.llm import LLM, devices_summary, make_pipeline, parse_layout, resolve_dtype
from jaxpp.model import decode_attention
from jaxpp.model import params as params_lib
from jaxpp.model import quant as quant_lib

flags.DEFINE_string("model", "llama3-8b", "preset name or path to a HF config.json")
flags.DEFINE_string("hardware", "h100", "hardware preset for the rooflines (h100, h200)")
flags.DEFINE_string("layouts", "pp1tp1", "comma-separated ppXtpY[vZ][mW] layouts")
flags.DEFINE_integer("input_len", 1024, "prompt tokens per request")
flags.DEFINE_integer("output_len", 128, "generated tokens per request")
flags.DEFINE_integer("num_requests", 256, "requests in the timed run")
flags.DEFINE_string("workload", "", "JSONL file, one request a line: {\"output_len\": N} and "
                    "one of \"input_len\": N (random tokens) or \"prompt_ids\": [ids]; "
                    "replaces --num_requests, --input_len and --output_len")
flags.DEFINE_integer("max_num_seqs", 0, "slots (sequences in flight); 0 = num_requests")
flags.DEFINE_integer("decode_chunk", 32, "tokens per return to the host")
flags.DEFINE_string("dtype", "bfloat16", "bfloat16 or float32")
flags.DEFINE_list("quant", ["none"], "weight storage per run: none, int8, fp8; a list runs "
                  "every layout once per entry")
flags.DEFINE_list("attention", ["auto"], "decode attention per run: auto (the fused kernel "
                  "on GPUs at tp=1), kernel, xla; a list runs every layout once per entry")
flags.DEFINE_bool("quant_embed", False, "also store the embedding and LM head in 8 bits")
flags.DEFINE_integer("scan_unroll", 1, "layers per stage-scan iteration (0 = all)")
flags.DEFINE_string("out", "out/bench", "directory for results.json and results.md")
flags.DEFINE_string("profile_dir", "", "if set, trace one extra wave per layout (the first "
                    "max_num_seqs requests) with jax.profiler into DIR/<layout>/ and write "
                    "where its device time went (summary.md, summary.json; trace_summary.py) "
                    "and each device's measured activity (activity.png)")
FLAGS = flags.FLAGS


def random_llm(config, dtype, *, max_len: int, decode_chunk: int, seed: int = 0,
               quant: quant_lib.Quant = quant_lib.Quant(), **layout) -> LLM:
  """An LLM with random weights generated on their own devices, already sharded.

  One jitted program per leaf, so the devices never hold more than one leaf's temporaries
  (a 70B shape fills most of a card); a leaf `quant` covers is quantised right after, on
  the devices, as a checkpoint's would be at load.
  """
  pipe = make_pipeline(config, **layout)
  quant_lib.check_backend(quant, pipe.mesh.devices.flat[0])
  abstract = params_lib.flatten(params_lib.abstract_params(config, dtype, pipe.layer_axes))
  shardings = params_lib.flatten(pipe.param_shardings(quant))
  real = pipe.partition.layer_index() >= 0  # padding layers stay zero
  out = {}
  for i, (path, aval) in enumerate(sorted(abstract.items())):

    def init(key, path=path, aval=aval):
      if path[-1] == "scale":
        return jnp.ones(aval.shape, aval.dtype)
      w = jax.random.normal(key, aval.shape, aval.dtype) * (config.hidden_size ** -0.5)
      if path[0] == "blocks":
        w = w * jnp.asarray(real.reshape(real.shape + (1,) * (w.ndim - 3)), aval.dtype)
      return w

    leaf = jax.jit(init, out_shardings=shardings[path])(jax.random.fold_in(
        jax.random.key(seed), i))
    quant_lib.store(out, path, leaf, quant, len(pipe.layer_axes), shardings, free=True)
  return LLM.on_pipeline(config, pipe, params_lib.nest(out), max_len=max_len,
                         decode_chunk=decode_chunk)


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
  layout = dict(pp=1, tp=tp_baseline) if tp_baseline else parse_layout(text)
  lens = output_lens(prompts, args)
  max_len = max(len(p) + n for p, n in zip(prompts, lens))
  rt = distributed.current()
  dog = watchdog_lib.Watchdog(describe=rt.describe_stall, on_stall=rt.fail)
  rt.step = lambda: dog.started
  start = time.perf_counter()
  llm = random_llm(config, resolve_dtype(args["dtype"]), max_len=max_len,
                   decode_chunk=args["decode_chunk"],
                   quant=quant_lib.Quant(args.get("quant", "none"),
                                         args.get("quant_embed", False)),
                   scan_unroll=args.get("scan_unroll", 1),
                   attention=args.get("attention", "auto"), **layout)
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
    result = run(prompts, lens)
    wall = time.perf_counter() - wall
    st = types.SimpleNamespace(**result, tick_seconds=[
        s / args["decode_chunk"] for s in result["call_seconds"]])
  else:

    def run(batch, new_tokens):
      eng = engine_lib.Engine(llm, max_num_seqs=slots, watchdog=dog)
      for i, (p, n) in enumerate(zip(batch, new_tokens)):
        eng.submit(engine_lib.Request(str(i), p, n))
      eng.run(lambda f: None)
      return eng

    # One short wave of every slot compiles the decode programs the timed run meets (shapes
    # depend on the slots, not on lengths)...
    warm = run(prompts[:slots], [2] * slots)
    # ...and the prefills of every admission the timed run can meet: with a workload file
    # any size (requests finish at different times); else full waves and the last one.
    fixed = args.get("workload", "random") == "random"
    warm.precompile_prefills(map(len, prompts), admissions=(
        {min(slots, len(prompts)), len(prompts) % slots} - {0} if fixed else None))
    compile_s = time.perf_counter() - start
    bubble_measured, microbatches = warm.measure_bubble(), pipe.microbatches
    prefill_m = warm.prefill_m
    del warm  # frees its KV cache before the timed engine allocates one
    wall = time.perf_counter()
    st = run(prompts, lens).stats
    wall = time.perf_counter() - wall
  profile = None
  if args.get("profile_dir"):
    profile = str(trace_wave(run, prompts[:slots], lens[:slots], text, args["profile_dir"]))
  head_name = "embed" if config.tie_word_embeddings else "lm_head"
  row = _numbers(config, hw, st, wall, len(prompts), microbatches, _mean_ctx(prompts, lens),
                 devices=pipe.mesh.size, rounds=st.decode_calls * args["decode_chunk"],
                 weight_bytes=sum(x.nbytes for x in jax.tree.leaves(llm.params["blocks"])),
                 head_bytes=sum(llm.params[name].nbytes
                                for name in (head_name, head_name + quant_lib.SCALE)
                                if name in llm.params),
                 itemsize=jnp.dtype(llm.dtype).itemsize)
  return dict(
      layout=text, devices=layout["pp"] * layout["tp"], pp=pipe.pp, tp=layout["tp"],
      virtual_stages=pipe.v, quant=args.get("quant", "none"),
      attention="kernel" if pipe.fused_decode else "xla",
      weight_gb_per_device=max(pipeline_lib.per_device_bytes(llm.params).values()) / 1e9,
      microbatches=microbatches, prefill_microbatches=prefill_m, max_num_seqs=slots,
      requests=len(prompts), workload=args.get("workload", "random"),
      prompt_tokens=st.prompt_tokens, completion_tokens=st.completion_tokens,
      scan_unroll=pipe.scan_unroll, compile_seconds=compile_s, wall_seconds=wall, **row,
      bubble_schedule=schedule.formula_bubble(pipe.pp, pipe.v, microbatches,
                                              args["decode_chunk"]),
      bubble_measured=bubble_measured, tick_seconds=report.percentiles(st.tick_seconds),
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
                 head_bytes=head * itemsize, itemsize=itemsize)
  return dict(
      layout=baseline_hf.NAME, devices=p, pp=p, tp=1, virtual_stages=1, quant="none",
      attention="transformers",
      weight_gb_per_device=config.param_count() * itemsize / p / 1e9, microbatches=1,
      prefill_microbatches=1,
      max_num_seqs=slots, requests=len(prompts), workload=args.get("workload", "random"),
      prompt_tokens=res["prompt_tokens"], completion_tokens=res["completion_tokens"],
      scan_unroll=None, compile_seconds=setup, wall_seconds=res["wall_seconds"], **row,
      bubble_schedule=(p - 1) / p,  # one device works at a time
      bubble_measured=None, tick_seconds=report.percentiles([]), profile=None)


def _mean_ctx(prompts: list[list[int]], lens: list[int]) -> float:
  """Mean context a generated token attends to: input + output / 2 per request, weighted by
  each request's output tokens (input_len + output_len / 2 for the fixed-length workload)."""
  return sum(n * (len(p) + n / 2) for p, n in zip(prompts, lens)) / sum(lens)


def _numbers(config, hw, st, wall: float, requests: int, microbatches: int, mean_ctx: float,
             *, devices: int, rounds: int, weight_bytes: int, head_bytes: int,
             itemsize: int) -> dict:
  """Rates and roofline shares from a run's token counts and prefill / decode seconds.

  `rounds` are the decode steps of the whole batch; `weight_bytes` the blocks' stored bytes
  and `head_bytes` the LM head's, all of which each micro-batch of a round reads;
  `mean_ctx` the mean context (cache positions) a decode step reads per token.
  """
  n, head = st.prompt_tokens, head_bytes
  kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize
  # every micro-batch re-reads its stage's weights each round; KV read once per token
  decode_bytes = rounds * microbatches * (weight_bytes + head) + \
      st.completion_tokens * mean_ctx * kv_per_token
  prefill_flops = 2 * config.param_count() * n
  tokens = n + st.completion_tokens
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


def markdown(rows: list[dict], header: str) -> str:
  cols = [("layout", "{}"), ("quant", "{}"), ("attention", "{}"),
          ("weight_gb_per_device", "{:.1f}"), ("requests_per_second", "{:.2f}"),
          ("total_tokens_per_second", "{:,.0f}"), ("output_tokens_per_second", "{:,.0f}"),
          ("tokens_per_second_per_gpu", "{:,.0f}"), ("prefill_tokens_per_second", "{:,.0f}"),
          ("decode_tokens_per_second", "{:,.0f}"), ("decode_hbm_gbps_per_gpu", "{:,.0f}"),
          ("decode_hbm_roofline", "{:.0%}"), ("prefill_matmul_roofline", "{:.0%}"),
          ("bubble_schedule", "{:.1%}"), ("bubble_measured", "{:.1%}"),
          ("compile_seconds", "{:.0f}")]
  lines = [header, "", "| " + " | ".join(c for c, _ in cols) + " |",
           "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join("–" if r[c] is None else f.format(r[c])
                                   for c, f in cols) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  with distributed.current().guard():  # flag mistakes: still the single-process runtime
    runtime = distributed.start(distributed.options_from_flags())
  with runtime.guard():
    bench(runtime.is_writer)
  runtime.close()


def bench(writer: bool = True):
  """Runs every layout of the flags; the writer prints and writes results.json and .md."""
  config = presets.model_config(FLAGS.model)
  hw = presets.hardware(FLAGS.hardware)
  rng = np.random.default_rng(0)
  if FLAGS.workload:
    work = bench_workload.load(FLAGS.workload, config.vocab_size, rng)
  else:
    work = bench_workload.random(FLAGS.num_requests, FLAGS.input_len, FLAGS.output_len,
                                 config.vocab_size, rng)
  config = dataclasses.replace(config, max_position_embeddings=max(
      config.max_position_embeddings, work.max_len))
  prompts = work.prompts
  args = dict(output_lens=work.output_lens, workload=work.name, dtype=FLAGS.dtype,
              decode_chunk=FLAGS.decode_chunk, max_num_seqs=FLAGS.max_num_seqs,
              scan_unroll=FLAGS.scan_unroll or True, quant_embed=FLAGS.quant_embed,
              profile_dir=FLAGS.profile_dir)
  for mode in FLAGS.quant:
    quant_lib.Quant(mode, FLAGS.quant_embed)  # every entry checked before the first run
  for impl in FLAGS.attention:
    if impl not in decode_attention.CHOICES:
      raise JaxppError(f"--attention={impl!r} is not one of "
                       f"{', '.join(decode_attention.CHOICES)}")
  header = (f"{FLAGS.model}, {FLAGS.dtype} activations, {work.describe()}; "
            f"{devices_summary()}; jax {jax.__version__}; rooflines from the {hw.name} preset")
  layouts = FLAGS.layouts.split(",")
  hf = {}  # first: JAX has not yet claimed the GPUs' memory
  if baseline_hf.NAME in layouts:
    if distributed.current().num_processes > 1:
      raise JaxppError(f"{baseline_hf.NAME} runs in one process; leave it out of "
                       "multi-process runs")
    hf = hf_row(config, hw, prompts, args)
  rows = []
  if writer:
    print(header, flush=True)
  for text in layouts:
    runs = ([{}] if baseline_hf.parse(text) else
            [dict(quant=q, attention=a) for q in FLAGS.quant for a in FLAGS.attention])
    for knobs in runs:
      rows.append(hf if baseline_hf.parse(text) else
                  run_layout(config, hw, text, prompts, dict(args, **knobs)))
      if writer:
        print(json.dumps(rows[-1]), flush=True)
  if not writer:
    return
  out = pathlib.Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(dict(header=header, rows=rows), indent=1))
  table = markdown(rows, header)
  (out / "results.md").write_text(table + "\n")
  try:
    plots = bench_plots.write(rows, out, FLAGS.decode_chunk)
    print("plots: " + " ".join(str(p) for p in plots))
  except ImportError:
    print("plots skipped: matplotlib is not installed (pip install matplotlib)")
  print(table)


if __name__ == "__main__":
  app.run(main)
