"""A bench run: every layout of the options, on one workload, into one table.

`BenchOptions` holds what the command line sets (`python -m jaxpp.bench --help`), so tests
and scripts run the same suite without flags. The `hf_auto` baseline runs first, before any
JAX program claims the GPUs' memory; every other row is `measure.run_layout`'s, once per
quantisation and attention choice asked for.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import pathlib
import sys

import jax
import numpy as np

from jaxpp.bench import baseline_hf, measure, requests, results
from jaxpp.bench import plots as bench_plots
from jaxpp.dist import distributed
from jaxpp.errors import JaxppError
from jaxpp.llm import devices_summary
from jaxpp.model import attention_choice
from jaxpp.model import quant as quant_lib
from jaxpp.plan import presets
from jaxpp.serve import kv_pages


@dataclasses.dataclass(frozen=True)
class BenchOptions:
  """One bench run; each field is the flag of the same name (jaxpp/bench/__main__.py)."""

  model: str = "llama3-8b"
  hardware: str = "h100"
  layouts: str = "pp1tp1"
  layer_split: str = "even"
  input_len: int = 1024
  output_len: int = 128
  num_requests: int = 256
  workload: str = ""
  tokenizer: str = ""  # a job input file as --workload: the checkpoint dir to tokenize with
  prompt_template: str = "Ticket:\n{text}\nSummary:"
  max_len: int = 0  # ... and its context (the job's engine.max_len); 0: no truncation
  max_num_seqs: int = 0
  decode_chunk: int = 32
  dtype: str = "bfloat16"
  quant: tuple[str, ...] = ("none",)
  attention: tuple[str, ...] = ("auto",)
  quant_embed: bool = False
  block_size: tuple[int, ...] = (64,)  # paged KV blocks' positions per run; 0: dense
  kv_cache_memory: float = 0.0
  prefix_cache: tuple[str, ...] = ("false",)  # per run: share prompts' cached prefixes
  prefill_chunk: tuple[int, ...] = (0,)  # per run: prompt tokens a step (0: whole)
  kv_dtype: tuple[str, ...] = ("auto",)  # per run: the KV cache's storage (auto, fp8)
  kv_grow: tuple[str, ...] = ("false",)  # per run: grow blocks in decode, swap out when full
  scan_unroll: int = 1
  out: str = "out/bench"
  profile_dir: str = ""


def _measure_or_error(config, hw, text: str, prompts, args: dict) -> dict:
  """One layout's row, or a row naming its error (out of memory, a compile failure) so the
  other layouts still run. Every process of a multi-process run gets the same error, as
  they run the same programs."""
  try:
    return measure.run_layout(config, hw, text, prompts, args)
  except JaxppError:
    raise  # a bad flag or layout: the user's to fix, before anything else runs
  except Exception as e:  # noqa: BLE001 - any device or compiler failure becomes a row
    first = (str(e).strip().splitlines() or [""])[0][:300]
    print(f"layout {text} failed: {type(e).__name__}: {first}", file=sys.stderr, flush=True)
    gc.collect()  # drop the failed layout's buffers before the next one allocates
    return dict(layout=text, quant=args.get("quant", "none"),
                attention=args.get("attention", "auto"), error=f"{type(e).__name__}: {first}")


def _flag(text, name: str = "prefix_cache") -> bool:
  """A list flag's entry as a bool (true/false, 1/0)."""
  value = str(text).strip().lower()
  if value not in ("true", "false", "1", "0"):
    raise JaxppError(f"--{name} entries are true or false, not {text!r}")
  return value in ("true", "1")


def _count(text, name: str = "prefill_chunk") -> int:
  """A list flag's entry as a whole number."""
  try:
    return int(str(text).strip())
  except ValueError:
    raise JaxppError(f"--{name} entries are whole numbers, not {text!r}") from None


def _write(out: pathlib.Path, header: str, rows: list[dict]) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(dict(header=header, rows=rows), indent=1))
  (out / "results.md").write_text(results.markdown(rows, header) + "\n")


def run_suite(opts: BenchOptions, writer: bool = True) -> list[dict]:
  """Runs every layout of `opts`; the writer prints and writes results.json and .md.

  Returns the rows (on every process).
  """
  config = presets.model_config(opts.model)
  hw = presets.hardware(opts.hardware)
  rng = np.random.default_rng(0)
  if opts.workload:
    work = requests.load(opts.workload, config.vocab_size, rng, tickets=dict(
        tokenizer=opts.tokenizer, template=opts.prompt_template, output_len=opts.output_len,
        max_len=opts.max_len))
  else:
    work = requests.random(opts.num_requests, opts.input_len, opts.output_len,
                           config.vocab_size, rng)
  config = dataclasses.replace(config, max_position_embeddings=max(
      config.max_position_embeddings, work.max_len))
  prompts = work.prompts
  args = dict(output_lens=work.output_lens, workload=work.name, dtype=opts.dtype,
              decode_chunk=opts.decode_chunk, max_num_seqs=opts.max_num_seqs,
              scan_unroll=opts.scan_unroll or True, quant_embed=opts.quant_embed,
              profile_dir=opts.profile_dir, layer_split=opts.layer_split,
              kv_cache_memory=opts.kv_cache_memory)
  for mode in opts.quant:
    quant_lib.Quant(mode, opts.quant_embed)  # every entry checked before the first run
  for kv in opts.kv_dtype:
    kv_pages.check_options(0, 0.0, False, 0, where="--", kv_dtype=kv)
  for n in opts.prefill_chunk:
    _count(n)
  for impl in opts.attention:
    if impl not in attention_choice.CHOICES:
      raise JaxppError(f"--attention={impl!r} is not one of "
                       f"{', '.join(attention_choice.CHOICES)}")
  header = (f"{opts.model}, {opts.dtype} activations, {work.describe()}; "
            f"{devices_summary()}; jax {jax.__version__}; rooflines from the {hw.name} preset")
  layouts = opts.layouts.split(",")
  hf = {}  # first: JAX has not yet claimed the GPUs' memory
  if baseline_hf.NAME in layouts:
    if distributed.current().num_processes > 1:
      raise JaxppError(f"{baseline_hf.NAME} runs in one process; leave it out of "
                       "multi-process runs")
    hf = measure.hf_row(config, hw, prompts, args)
  rows = []
  if writer:
    print(header, flush=True)
  for text in layouts:
    runs = ([{}] if baseline_hf.parse(text) else
            [dict(quant=q, attention=a, block_size=int(b), prefix_cache=_flag(c), kv_dtype=k,
                  kv_grow=_flag(g, "kv_grow"), prefill_chunk=_count(n))
             for q in opts.quant for a in opts.attention for b in opts.block_size
             for c in opts.prefix_cache for k in opts.kv_dtype for g in opts.kv_grow
             for n in opts.prefill_chunk])
    for knobs in runs:
      rows.append(hf if baseline_hf.parse(text) else
                  _measure_or_error(config, hw, text, prompts, dict(args, **knobs)))
      if writer:
        print(json.dumps(rows[-1]), flush=True)
        _write(pathlib.Path(opts.out), header, rows)  # nothing measured is lost to a crash
  if not writer:
    return rows
  out = pathlib.Path(opts.out)
  table = results.markdown(rows, header)
  try:
    plots = bench_plots.write([r for r in rows if "error" not in r], out, opts.decode_chunk)
    print("plots: " + " ".join(str(p) for p in plots))
  except ImportError:
    print("plots skipped: matplotlib is not installed (pip install matplotlib)")
  print(table)
  return rows

