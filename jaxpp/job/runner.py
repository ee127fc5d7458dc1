"""The Harbor batch job: tickets (JSONL) in, one-line summaries (JSONL) out, nothing lost.

`run_job(config)` is everything `python -m jaxpp.run` does after parsing flags:

1. check every config value against the model, the checkpoint's files (headers and
   shapes), the input and the output locations: one-line errors, before any compile;
2. take the output's lock (`lock.py`), repair and read what earlier runs wrote (resume:
   finished ids are skipped, rejected lines are not rejected twice);
3. read the input once: tickets still to do are tokenized in parallel batches, finished
   ones not at all; with nothing left to do, no model is loaded;
4. place the model on the layout, then stream tickets into the engine, keeping its queue a
   little ahead of its slots, and write each summary (whole line, flushed) the moment its
   ticket finishes; every bad line becomes an errors-file line instead; SIGTERM or SIGINT
   stops it cleanly (`stop.py`);
5. report: documents, tokens/s, bubble (schedule and measured from the run's own decode
   calls), per-stage latency (and its histogram PNG), start-up and compile time, the
   projection for 40,000 tickets, and whether input lines = written + rejected.

In a multi-process run (`distributed.py`) every process runs all of this on the same input
and config and makes the same decisions; only process 0 reads and writes the output, the
errors file and the report, and it hands its resume state to the others. Before the
weights load, every stage passes a health probe, and every device step runs under the
watchdog (`watchdog.py`).
"""

from __future__ import annotations

import contextlib
import pathlib
import signal
import sys
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from jaxpp.dist import distributed, health
from jaxpp.errors import JaxppError
from jaxpp.job import compile_cache, openai_batch, report
from jaxpp.job import files as jobio
from jaxpp.job.latency_plot import write_latency_png
from jaxpp.job.lock import OutputLock
from jaxpp.job.prompter import TEMPLATE_SLOT, Prompter
from jaxpp.job.stop import StopSignals
from jaxpp.llm import LLM, check_context, devices_summary, resolve_dtype, sample_seeds
from jaxpp.load import checkpoint, weights
from jaxpp.load.tokenizer import Tokenizer
from jaxpp.model import attention_choice, sampling
from jaxpp.model import quant as quant_lib
from jaxpp.model.config import LlamaConfig
from jaxpp.parallel import schedule
from jaxpp.parallel.layout import Layout
from jaxpp.parallel.pipeline import Pipeline
from jaxpp.serve import defaults, kv_pages, requests
from jaxpp.serve.stats import EngineStats

LENGTH_POLICIES = ("truncate", "reject")
FORMATS = ("tickets", "openai_batch")  # job.format: what an input (and output) line is


def errors_path(config: ml_collections.ConfigDict) -> pathlib.Path:
  out = pathlib.Path(config.job.output)
  return pathlib.Path(config.job.errors) if config.job.errors else out.with_name(
      out.name.removesuffix(".jsonl") + ".errors.jsonl")


def layout_of(config: ml_collections.ConfigDict, devices: int) -> Layout:
  """The run's `Layout` on `devices` devices from the config's mesh and schedule sections
  (mesh.dp = 0: as many replicas as fit; checked against the model when the pipeline is
  built)."""
  m, s = config.mesh, config.schedule
  return Layout(m.pp, m.tp, dp=m.dp, virtual_stages=s.virtual_stages,
                microbatches=s.microbatches, prefill_microbatches=s.prefill_microbatches,
                layer_split=s.layer_split).for_devices(devices)


def check_config(config: ml_collections.ConfigDict, model: LlamaConfig) -> int:
  """Every knob checked against the model before anything is probed, loaded or compiled
  (each mistake is one line); returns the context, engine.max_len resolved. The layout is
  checked by `Pipeline.build`, which the job calls next."""
  job, eng = config.job, config.engine
  if job.format not in FORMATS:
    raise JaxppError(f"job.format={job.format!r}; choose one of {', '.join(FORMATS)}")
  if job.length_policy not in LENGTH_POLICIES:
    raise JaxppError(f"job.length_policy={job.length_policy!r}; choose one of "
                     f"{', '.join(LENGTH_POLICIES)}")
  if job.priority not in requests.PRIORITIES:
    raise JaxppError(f"job.priority={job.priority!r}; choose one of "
                     f"{', '.join(requests.PRIORITIES)}")
  if config.model.attention not in attention_choice.CHOICES:
    raise JaxppError(f"model.attention={config.model.attention!r}; choose one of "
                     f"{', '.join(attention_choice.CHOICES)}")
  resolve_dtype(config.model.dtype, config.model.checkpoint)
  quant_lib.Quant(config.model.quant, config.model.quant_embed)
  if TEMPLATE_SLOT not in job.prompt_template:
    raise JaxppError(f"job.prompt_template must contain {TEMPLATE_SLOT}")
  if config.sampling.max_new_tokens < 1:
    raise JaxppError(f"sampling.max_new_tokens={config.sampling.max_new_tokens} must be >= 1")
  s = config.sampling  # validated as the engine will use them (one-line errors)
  sampling.SamplingParams.checked(1, **{f: s[f] for f in sampling.SamplingParams._fields})
  max_len = check_context(model, eng.max_len, config.schedule.decode_chunk)
  if config.sampling.max_new_tokens >= max_len:
    raise JaxppError(f"sampling.max_new_tokens={config.sampling.max_new_tokens} leaves no "
                     f"room for a prompt in engine.max_len={max_len}")
  if eng.max_num_seqs < 0:
    raise JaxppError(f"engine.max_num_seqs={eng.max_num_seqs} must be >= 1 (0 = what free "
                     "memory holds)")
  kv_pages.check_options(eng.block_size, eng.kv_cache_memory, eng.prefix_cache,
                         eng.prefill_chunk, where="engine.", kv_dtype=eng.kv_dtype,
                         kv_grow=eng.kv_grow)
  for cls, n in eng.priority_reserve.items():
    if n < 0:
      raise JaxppError(f"engine.priority_reserve.{cls}={n} must be >= 0")
  w = config.watchdog
  if min(w.multiple, w.min_seconds, w.max_seconds) <= 0 or w.min_seconds > w.max_seconds:
    raise JaxppError(f"watchdog: multiple={w.multiple}, min_seconds={w.min_seconds} and "
                     f"max_seconds={w.max_seconds} must be > 0, min_seconds <= max_seconds")
  return max_len


def log(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


class _Discard:
  """Stands in for the output and errors writers on every process but process 0."""

  def write(self, row: dict) -> None:
    del row

  def write_rejected(self, rejected: jobio.Rejected) -> None:
    del rejected

  def close(self) -> None:
    pass


def shared_resume(rt: distributed.Runtime, state: jobio.ResumeState | None
                  ) -> jobio.ResumeState:
  """Process 0's resume state (finished ids and their lines, rejected lines) everywhere."""
  mine = None if state is None else dict(done=sorted(state.done_keys),
                                         lines=state.done_lines,
                                         rejected=sorted(state.rejected_lines))
  shared = rt.broadcast_json(mine)
  return state if state is not None else jobio.ResumeState(
      done_keys=set(shared["done"]), done_lines=dict(shared["lines"]),
      rejected_lines=set(shared["rejected"]))


def read_input(path, prompter, resume: jobio.ResumeState, reject, openai: bool
               ) -> tuple[list[jobio.Ticket], dict[str, int]]:
  """One pass over the input: the tickets still to summarise, tokenized (in parallel
  batches, finished ones not at all), and the counts; each bad line goes to `reject`."""
  counts = dict(input_lines=0, skipped_done=0)
  todo = []
  for item in jobio.read_tickets(path, prepare=prompter, done=resume.done_lines,
                                 check=openai_batch.check_line if openai else None):
    counts["input_lines"] += 1
    if isinstance(item, jobio.Rejected):
      reject(item)
    elif item.done or item.key in resume.done_keys:
      counts["skipped_done"] += 1
    else:
      if not openai:
        item.doc = None  # only the id and the prompt are needed from here on
      todo.append(item)
  return todo, counts


def run_job(config: ml_collections.ConfigDict, devices=None) -> dict[str, Any] | None:
  """Runs (or resumes) the job; returns the report (also written next to the output).

  Processes other than 0 of a multi-process run write nothing and return None. A report
  whose `interrupted` names a signal comes from a run SIGTERM or SIGINT stopped; a signal
  before any row is in flight ends the process at once (`stop.py`).
  """
  with contextlib.ExitStack() as stack:
    return _run(config, devices, stack)


def _run(config, devices, stack: contextlib.ExitStack) -> dict[str, Any] | None:
  started = time.perf_counter()
  stop = stack.enter_context(StopSignals(log))
  job, rt = config.job, distributed.current()
  model_cfg = checkpoint.load_config(config.model.checkpoint)
  max_len = check_config(config, model_cfg)
  checkpoint.check_checkpoint(config.model.checkpoint, model_cfg)
  tokenizer = Tokenizer.from_dir(config.model.checkpoint)
  openai = job.format == "openai_batch"
  id_field = "custom_id" if openai else "id"  # what keys an output row
  prompter = (openai_batch.BatchPrompter(tokenizer, max_len=max_len,
                                         default_new_tokens=config.sampling.max_new_tokens,
                                         policy=job.length_policy)
              if openai and tokenizer is not None else
              Prompter.for_job(tokenizer, config, max_len))
  devices = jax.devices() if devices is None else devices
  pipe = Pipeline.build(model_cfg, layout_of(config, len(devices)),  # against the devices
                        devices=devices, attention=config.model.attention,
                        max_len=max_len)
  # before the first compile of the process (the resume broadcast below compiles one): JAX
  # decides once whether a persistent cache is in use
  compile_cache.enable(job.get("compile_cache", ""))
  dog = rt.watchdog(**config.watchdog)
  jobio.check_input(job.input)
  output, errors = pathlib.Path(job.output), errors_path(config)
  jobio.check_distinct(input=job.input, output=output, errors=errors,
                       report=report.report_path(output))
  resume = None
  if rt.is_writer:
    output, errors = jobio.check_output_dir(output), jobio.check_output_dir(errors)
    stack.enter_context(OutputLock(output))  # before the resume repair touches the output
    resume = jobio.resume_state(output, errors, id_field=id_field)
  resume = shared_resume(rt, resume)
  out, err = ((stack.enter_context(jobio.ResultWriter(output)),
               stack.enter_context(jobio.ErrorWriter(
                   errors, row=openai_batch.error_row if openai else jobio.error_row)))
              if rt.is_writer else
              (_Discard(), _Discard()))
  rejected_run = 0

  def reject(item: jobio.Rejected) -> None:
    nonlocal rejected_run
    if item.line not in resume.rejected_lines:
      err.write_rejected(item)
      rejected_run += 1

  todo, counts = read_input(job.input, prompter, resume, reject, openai)
  log(f"input {job.input}: {counts['input_lines']:,} lines, {len(todo):,} to summarise, "
      f"{counts['skipped_done']:,} already done, {rejected_run:,} newly rejected")
  run = _Run(config, pipe, tokenizer, stack, dog, log) if todo else None
  startup_seconds = time.perf_counter() - started
  startup_compile = run.clock.seconds if run else 0.0
  written, truncated = 0, 0
  with stop.deferred(), report.Progress(
      len(todo), disable=not job.progress or not rt.is_writer) as progress:
    for samples, ticket in (run.summarise(todo, stop) if run else ()):
      out.write(openai_row(tokenizer, ticket, samples, config.model.checkpoint) if openai
                else summary_row(tokenizer, ticket, samples[0]))
      written += 1
      truncated += ticket.truncated_tokens > 0
      progress.update(documents=1, tokens=len(ticket.prompt) + sum(
          len(f.token_ids) for f in samples))
  for f in (out, err):
    f.close()
  if not rt.is_writer:
    return None
  final = jobio.resume_state(output, errors, id_field=id_field)
  wall = time.perf_counter() - started
  compile_seconds = run.clock.seconds if run else 0.0
  st = run.eng.stats if run else EngineStats()
  steady_prefill, steady_decode = st.steady_rates()
  one_off = max(st.first_call_seconds(), compile_seconds - startup_compile)
  rep = report.build_report(
      input_lines=counts["input_lines"], written_run=written,
      written_total=len(final.done_keys), rejected_run=rejected_run,
      rejected_total=len(final.rejected_lines), skipped_done=counts["skipped_done"],
      prompt_tokens=st.prompt_tokens, completion_tokens=st.completion_tokens,
      prefill_tokens=st.prefill_tokens,
      prefill_positions=st.prefill_positions,
      prefill_seconds=st.prefill_seconds, decode_seconds=st.decode_seconds,
      wall_seconds=wall,
      bubble_schedule=schedule.formula_bubble(pipe.pp, pipe.v, pipe.microbatches,
                                              run.llm.decode_chunk if run else 1),
      bubble_measured=st.idle_share(), tick_seconds=st.tick_seconds,
      devices=devices_summary(pipe.mesh.devices.flat),
      layout=dict(name=pipe.layout.name, pp=pipe.pp, tp=pipe.tp, dp=pipe.layout.dp,
                  virtual_stages=pipe.v, microbatches=pipe.microbatches,
                  max_num_seqs=run.eng.max_num_seqs if run else None,  # all replicas
                  max_num_seqs_per_replica=(-(-run.eng.max_num_seqs // pipe.dp) if run
                                            else None),
                  layer_split=list(pipe.partition.counts)),
      duplicate_rows=final.duplicate_rows, startup_seconds=startup_seconds,
      load_seconds=run.load_seconds if run else 0.0, compile_seconds=compile_seconds,
      read_seconds=run.read.seconds if run else None,
      steady_seconds=wall - startup_seconds - one_off, steady_prefill_tps=steady_prefill,
      steady_decode_tps=steady_decode, first_call_seconds=st.first_call_seconds(),
      prefill_calls=st.prefill_calls, prefill_shapes=st.prefill_shapes, kv_cache=st.kv,
      truncated_run=truncated,
      interrupted=signal.Signals(stop.signum).name if stop.requested else None)
  rep["report_file"] = str(report.write_report(rep, output))
  png = write_latency_png(st.tick_seconds, output, f"{rep['layout'].get('name', '')}: "
                          f"{len(st.tick_seconds):,} timed decode calls")
  rep["latency_png"] = str(png) if png else None
  rep["output"], rep["errors"] = str(output), str(errors)
  return rep


class _Run:
  """The model and the engine, for a run with tickets to summarise: health probe, then
  weights, so nothing is read before every stage has answered."""

  def __init__(self, config, pipe: Pipeline, tokenizer, stack, dog, log_line):
    self.config, self.pipe = config, pipe
    self.clock = stack.enter_context(compile_cache.CompileClock())
    for line in defaults.warnings(pipe.layout):
      log_line(f"warning: {line}")
    distributed.current().set_layout(pipe.mesh)
    health.startup(pipe.mesh, dog, log_line)
    loading = time.perf_counter()
    self.read = checkpoint.ReadClock()
    params = weights.load_weights(
        config.model.checkpoint, pipe, resolve_dtype(config.model.dtype, config.model.checkpoint),
        quant=quant_lib.Quant(config.model.quant, config.model.quant_embed),
        cache_dir=config.model.params_cache or None, read_clock=self.read)
    self.load_seconds = time.perf_counter() - loading
    self.llm = LLM.on_pipeline(pipe.config, pipe, params, tokenizer=tokenizer,
                               max_len=config.engine.max_len,
                               decode_chunk=config.schedule.decode_chunk)
    self.eng = self.llm.engine(max_num_seqs=config.engine.max_num_seqs,
                               reserve=dict(config.engine.priority_reserve), watchdog=dog,
                               block_size=config.engine.block_size,
                               kv_cache_memory=config.engine.kv_cache_memory,
                               prefix_cache=config.engine.prefix_cache,
                               prefill_chunk=config.engine.prefill_chunk,
                               kv_dtype=config.engine.kv_dtype,
                               kv_grow=config.engine.kv_grow)
    pages = self.eng.pages
    kv = (f"KV cache of {pages.blocks - 1:,} blocks of {pages.block_size} positions per "
          "replica" if pages else "dense KV cache")
    log_line(f"layout {pipe.layout}: {pipe.microbatches} decode micro-batches, decode_chunk "
             f"{self.llm.decode_chunk}, up to {self.eng.max_num_seqs} sequences in flight, "
             f"{kv}, "
             f"weights in {self.load_seconds:.1f} s (reading files {self.read.seconds:.1f} s"
             f" of it, {self.read.bytes / 1e9:.1f} GB)")

  def summarise(self, todo: list[jobio.Ticket], stop: StopSignals
                ) -> Iterator[tuple[list[requests.Finished], jobio.Ticket]]:
    """Streams the tickets through the engine, its queue kept a little ahead of its slots;
    yields each finished one with its samples (n of them when its knobs ask, seeded as
    `jaxpp.LLM.generate` seeds them). After a stop signal nothing more is admitted and the
    rows still in flight are dropped: the rerun redoes them. Each process acts on its own signal:
    a collective per step to agree would turn a lost peer into an abort (a gloo collective
    with a dead peer does not fail, it crashes), where today it is the lost-peer exit."""
    eng, knobs, job = self.eng, self.config.sampling, self.config.job
    feed, tickets, samples = iter(todo), {}, {}
    while not stop.requested:
      while eng.waiting() < 2 * eng.max_num_seqs:
        ticket = next(feed, None)
        if ticket is None:
          break
        request = dict(max_new_tokens=knobs.max_new_tokens,
                       **{f: knobs[f] for f in sampling.SamplingParams._fields}
                       ) | (ticket.knobs or {})
        n = request.pop("n", 1)
        samples[ticket.key] = [None] * n
        seeds = sample_seeds(np.full(n, request.pop("seed") & 0xFFFFFFFF, np.uint64), n)
        for k, seed in enumerate(seeds):
          key = ticket.key if n == 1 else f"{ticket.key}\x1f{k}"
          tickets[key] = (ticket, k)
          eng.submit(requests.Request(key=key, prompt=ticket.prompt, priority=job.priority,
                                        seed=int(seed), **request))
      if not eng.busy():
        return
      for f in eng.step():
        ticket, k = tickets.pop(f.request.key)
        done = samples[ticket.key]
        done[k] = f
        if all(done):
          yield samples.pop(ticket.key), ticket
    eng.settle()  # stopped: the decode call in flight ends before the report


def openai_row(tokenizer: Tokenizer, ticket: jobio.Ticket,
               samples: list[requests.Finished], checkpoint: str) -> dict:
  """An OpenAI batch output line: a choice per sample, the whole completion, a stop string
  left out."""
  piece = lambda t: tokenizer.decode([t])
  outs = []
  for f in samples:
    text = f.text if f.text is not None else tokenizer.decode(f.token_ids)
    # a stop id ends the ids but is not in the text: its logprob is left out too
    keep = len(f.token_ids) - (f.finish_reason == "stop" and f.text is None)
    lps = None if f.logprobs is None else openai_batch.logprobs_object(
        ticket.doc["url"], [piece(t) for t in f.token_ids[:keep]], f.logprobs[:keep],
        [[(piece(t), lp) for t, lp in alts] for alts in f.top_logprobs[:keep]])
    outs.append((text, f.finish_reason, lps))
  return openai_batch.result_row(ticket, outs, len(ticket.prompt),
                                 sum(len(f.token_ids) for f in samples),
                                 model=pathlib.Path(checkpoint).name)


def summary_row(tokenizer: Tokenizer, ticket: jobio.Ticket,
                finished: requests.Finished) -> dict:
  """The output line: the first line of the decoded completion, stop token dropped; `line`
  is the ticket's input line (a rerun skips it without tokenizing it again)."""
  text = tokenizer.decode(finished.token_ids).strip()
  return dict(id=ticket.id, line=ticket.line, summary=text.split("\n", 1)[0].strip(),
              finish_reason=finished.finish_reason,
              prompt_tokens=len(finished.request.prompt),
              completion_tokens=len(finished.token_ids),
              truncated_tokens=ticket.truncated_tokens)
