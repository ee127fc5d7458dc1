"""The Harbor batch job: tickets (JSONL) in, one-line summaries (JSONL) out, nothing lost.

`run_job(config)` is everything `python -m jaxpp.run` does after parsing flags:

1. check the config, the input and the output locations (one-line errors, before any
   compile);
2. repair and read what earlier runs wrote (resume: finished ids are skipped, rejected
   lines are not rejected twice);
3. place the model on the layout, then stream tickets into the engine, keeping its queue a
   little ahead of its slots, and write each summary (whole line, flushed) the moment its
   ticket finishes; every bad line becomes an errors-file line instead;
4. report: documents, tokens/s, bubble (schedule and measured), tick latency, wall time,
   the projection for 40,000 tickets, and whether input lines = written + rejected.

In a multi-process run (`distributed.py`) every process runs all of this on the same input
and config and makes the same decisions; only process 0 reads and writes the output, the
errors file and the report, and it hands its resume state to the others. Before the
weights load, every stage passes a health probe, and every device step runs under the
watchdog (`watchdog.py`).
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
import time
from typing import Any, Iterator

import jax
import ml_collections

from jaxpp.dist import distributed, health
from jaxpp.errors import JaxppError
from jaxpp.job import compile_cache, report
from jaxpp.job import files as jobio
from jaxpp.job.prompter import TEMPLATE_SLOT, Prompter
from jaxpp.llm import LLM, devices_summary, resolve_dtype
from jaxpp.load import checkpoint, weights
from jaxpp.load.tokenizer import Tokenizer
from jaxpp.model import decode_attention, sampling
from jaxpp.model import quant as quant_lib
from jaxpp.parallel import schedule
from jaxpp.parallel.layout import Layout
from jaxpp.parallel.pipeline import Pipeline
from jaxpp.serve import defaults
from jaxpp.serve import engine as engine_lib

LENGTH_POLICIES = ("truncate", "reject")


def errors_path(config: ml_collections.ConfigDict) -> pathlib.Path:
  out = pathlib.Path(config.job.output)
  return pathlib.Path(config.job.errors) if config.job.errors else out.with_name(
      out.name.removesuffix(".jsonl") + ".errors.jsonl")


def layout_of(config: ml_collections.ConfigDict) -> Layout:
  """The run's `Layout` from the config's mesh and schedule sections (checked against the
  model when the pipeline is built)."""
  m, s = config.mesh, config.schedule
  return Layout(m.pp, m.tp, dp=m.dp, virtual_stages=s.virtual_stages,
                microbatches=s.microbatches, prefill_microbatches=s.prefill_microbatches,
                layer_split=s.layer_split)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The knobs jaxpp.LLM does not already check; each mistake is one line."""
  job = config.job
  if job.length_policy not in LENGTH_POLICIES:
    raise JaxppError(f"job.length_policy={job.length_policy!r}; choose one of "
                     f"{', '.join(LENGTH_POLICIES)}")
  if job.priority not in engine_lib.PRIORITIES:
    raise JaxppError(f"job.priority={job.priority!r}; choose one of "
                     f"{', '.join(engine_lib.PRIORITIES)}")
  if config.model.attention not in decode_attention.CHOICES:
    raise JaxppError(f"model.attention={config.model.attention!r}; choose one of "
                     f"{', '.join(decode_attention.CHOICES)}")
  if TEMPLATE_SLOT not in job.prompt_template:
    raise JaxppError(f"job.prompt_template must contain {TEMPLATE_SLOT}")
  if config.sampling.max_new_tokens < 1:
    raise JaxppError(f"sampling.max_new_tokens={config.sampling.max_new_tokens} must be >= 1")
  s = config.sampling  # validated as the engine will use them (one-line errors)
  sampling.SamplingParams.make(1, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                               seed=s.seed)
  if config.sampling.max_new_tokens >= config.engine.max_len:
    raise JaxppError(f"sampling.max_new_tokens={config.sampling.max_new_tokens} leaves no "
                     f"room for a prompt in engine.max_len={config.engine.max_len}")


def log(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


class _Discard:
  """Stands in for the output and errors writers on every process but process 0."""

  def write(self, row: dict) -> None:
    del row

  def write_rejected(self, rejected: jobio.Rejected) -> None:
    del rejected


def shared_resume(rt: distributed.Runtime, state: jobio.ResumeState | None
                  ) -> jobio.ResumeState:
  """Process 0's resume state (finished ids, rejected lines) on every process."""
  mine = None if state is None else dict(done=sorted(state.done_keys),
                                         rejected=sorted(state.rejected_lines))
  shared = rt.broadcast_json(mine)
  return state if state is not None else jobio.ResumeState(
      done_keys=set(shared["done"]), rejected_lines=set(shared["rejected"]))


def run_job(config: ml_collections.ConfigDict, devices=None) -> dict[str, Any] | None:
  """Runs (or resumes) the job; returns the report (also written next to the output).

  Processes other than 0 of a multi-process run write nothing and return None.
  """
  with contextlib.ExitStack() as stack:
    return _run(config, devices, stack)


def _run(config, devices, stack: contextlib.ExitStack) -> dict[str, Any] | None:
  started = time.perf_counter()
  check_config(config)
  # before the first compile of the process (the resume broadcast below compiles one): JAX
  # decides once whether a persistent cache is in use
  compile_cache.enable(config.job.get("compile_cache", ""))
  job = config.job
  rt = distributed.current()
  dog = rt.watchdog(**config.watchdog)
  jobio.check_input(job.input)
  output, errors = pathlib.Path(job.output), errors_path(config)
  jobio.check_distinct(input=job.input, output=output, errors=errors,
                       report=report.report_path(output))
  resume = None
  if rt.is_writer:
    output, errors = jobio.check_output_dir(output), jobio.check_output_dir(errors)
    resume = jobio.resume_state(output, errors)
  resume = shared_resume(rt, resume)

  clock = stack.enter_context(compile_cache.CompileClock())
  # layout -> health probe -> weights: nothing is read before every stage has answered
  model_cfg = checkpoint.load_config(config.model.checkpoint)
  pipe = Pipeline.build(model_cfg, layout_of(config),
                        devices=jax.devices() if devices is None else devices,
                        attention=config.model.attention)
  for line in defaults.warnings(pipe.layout):
    log(f"warning: {line}")
  rt.set_layout(pipe.mesh)
  health.startup(pipe.mesh, dog, log)
  loading = time.perf_counter()
  params = weights.load_weights(
      config.model.checkpoint, pipe, resolve_dtype(config.model.dtype),
      quant=quant_lib.Quant(config.model.quant, config.model.quant_embed),
      cache_dir=config.model.params_cache or None)
  load_seconds = time.perf_counter() - loading
  llm = LLM.on_pipeline(model_cfg, pipe, params,
                        tokenizer=Tokenizer.from_dir(config.model.checkpoint),
                        max_len=config.engine.max_len, decode_chunk=config.schedule.decode_chunk)
  prompter = Prompter.for_job(llm, config)
  eng = llm.engine(max_num_seqs=config.engine.max_num_seqs,
                   reserve=dict(config.engine.priority_reserve), watchdog=dog)
  log(f"layout {pipe.layout}: {pipe.microbatches} decode micro-batches, decode_chunk "
      f"{llm.decode_chunk}, {eng.max_num_seqs} sequences in flight, weights in "
      f"{load_seconds:.1f} s")
  bubble_measured = eng.measure_bubble() if job.measure_bubble else None
  startup_seconds = time.perf_counter() - started
  startup_compile = clock.seconds  # compiles after this are the run's, not its start-up's

  counts = dict(input_lines=0, rejected_run=0, skipped_done=0, written_run=0)
  tickets: dict[str, jobio.Ticket] = {}
  writers = ((jobio.ResultWriter(output), jobio.ErrorWriter(errors)) if rt.is_writer else
             (contextlib.nullcontext(_Discard()), contextlib.nullcontext(_Discard())))
  with writers[0] as out, writers[1] as err:

    def reject(line: int, id_, reason: str) -> None:
      if line not in resume.rejected_lines:
        err.write_rejected(jobio.Rejected(line, id_, reason))
        counts["rejected_run"] += 1

    def pending(record: bool) -> Iterator[jobio.Ticket]:
      """Tickets still to summarise; with `record`, counts lines and writes rejections."""
      for item in jobio.read_tickets(job.input, prepare=prompter):
        counts["input_lines"] += record
        if isinstance(item, jobio.Rejected):
          if record:
            reject(item.line, item.id, item.reason)
        elif item.key in resume.done_keys:
          counts["skipped_done"] += record
        else:
          yield item

    knobs = config.sampling
    total = sum(1 for _ in pending(record=False))  # cheap first pass: the progress total
    feed = pending(record=True)
    with report.Progress(total, disable=not job.progress or not rt.is_writer) as progress:
      while True:
        while eng.waiting() < 2 * eng.max_num_seqs:
          ticket = next(feed, None)
          if ticket is None:
            break
          tickets[ticket.key] = ticket
          eng.submit(engine_lib.Request(
              key=ticket.key, prompt=ticket.prompt, max_new_tokens=knobs.max_new_tokens,
              temperature=knobs.temperature, top_k=knobs.top_k, top_p=knobs.top_p, seed=knobs.seed,
              priority=job.priority))
        if not eng.waiting() and not eng.tokens:
          break
        for f in eng.step():
          ticket = tickets.pop(f.request.key)
          out.write(summary_row(llm, ticket, f))
          counts["written_run"] += 1
          progress.update(documents=1, tokens=len(f.token_ids))

  if not rt.is_writer:
    return None
  final = jobio.resume_state(output, errors)
  st, wall = eng.stats, time.perf_counter() - started
  rep = report.build_report(
      input_lines=counts["input_lines"], written_run=counts["written_run"],
      written_total=len(final.done_keys), rejected_run=counts["rejected_run"],
      rejected_total=len(final.rejected_lines), skipped_done=counts["skipped_done"],
      prompt_tokens=st.prompt_tokens, completion_tokens=st.completion_tokens,
      prefill_positions=st.prefill_positions,
      prefill_seconds=st.prefill_seconds, decode_seconds=st.decode_seconds,
      wall_seconds=wall,
      bubble_schedule=schedule.formula_bubble(pipe.pp, pipe.v, pipe.microbatches,
                                              llm.decode_chunk),
      bubble_measured=bubble_measured, tick_seconds=st.tick_seconds,
      devices=devices_summary(pipe.mesh.devices.flat),
      layout=dict(name=pipe.layout.name, pp=pipe.pp, tp=pipe.tp, dp=pipe.layout.dp,
                  virtual_stages=pipe.v, microbatches=pipe.microbatches,
                  max_num_seqs=eng.max_num_seqs, layer_split=list(pipe.partition.counts)),
      duplicate_rows=final.duplicate_rows, startup_seconds=startup_seconds,
      load_seconds=load_seconds, compile_seconds=clock.seconds,
      steady_seconds=wall - startup_seconds - (clock.seconds - startup_compile))
  rep["report_file"] = str(report.write_report(rep, output))
  rep["output"], rep["errors"] = str(output), str(errors)
  return rep


def summary_row(llm: LLM, ticket: jobio.Ticket, finished: engine_lib.Finished) -> dict:
  """The output line: the first line of the decoded completion, stop token dropped."""
  text = llm.tokenizer.decode(finished.token_ids).strip()
  return dict(id=ticket.id, summary=text.split("\n", 1)[0].strip(),
              finish_reason=finished.finish_reason,
              prompt_tokens=len(finished.request.prompt),
              completion_tokens=len(finished.token_ids))
