"""`python -m jaxpp.bench`: layouts measured on the same model shape, workload and machine.

This module is the command line: it defines the flags (only when run), turns them into
`suite.BenchOptions` and runs `suite.run_suite`.

For each layout (`pp4tp1`, `pp2tp2`, `pp1tp4v1m8`, `pp4tp1m4p16`: 16 prefill micro-batches,
...) the model shape gets random weights created directly on the devices, already sharded
(no host copy), and the batch engine runs `num_requests` random-token prompts of
`input_len` tokens for exactly `output_len` new tokens each (stop ids ignored), or the
requests of a `--workload` JSONL file, each with its own prompt and output length
(`requests.py`). A short warm-up wave of every slot and the prefills of its waves (with a
workload file: one untimed run of the same requests) compile the programs first; compile
time is reported separately and never timed as throughput, and `timed_compiles` counts
any compile that still fell in the timed run.

Reported per layout, in the form inference servers print: requests/s, total and output
tokens/s, tokens/s per GPU, prefill and decode rates, achieved HBM GB/s and % of the HBM
roofline during decode, % of the matmul roofline during prefill, the schedule's bubble and
the measured one, and the pipeline tick time p50/p99. Written as JSON, a Markdown table and
PNG plots (`plots.py`: throughput against micro-batches; each pipeline layout's
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

from absl import app, flags

from jaxpp.bench.suite import BenchOptions, run_suite
from jaxpp.dist import distributed


def define_flags() -> None:
  """The bench's flags, one per `BenchOptions` field (defined only when run)."""
  f = flags
  d = BenchOptions()
  f.DEFINE_string("model", d.model, "preset name or path to a HF config.json")
  f.DEFINE_string("hardware", d.hardware, "hardware preset for the rooflines (h100, h200)")
  f.DEFINE_string("layouts", d.layouts, "comma-separated [dpN]ppXtpY[vZ][mW][pN] layouts, "
                  "gspmd_tpN (the GSPMD baseline) or hf_auto (transformers)")
  f.DEFINE_string("layer_split", d.layer_split, "how layers split over chunks in every "
                  "pipeline layout: even, balanced, or per-chunk counts")
  f.DEFINE_integer("input_len", d.input_len, "prompt tokens per request")
  f.DEFINE_integer("output_len", d.output_len, "generated tokens per request")
  f.DEFINE_integer("num_requests", d.num_requests, "requests in the timed run")
  f.DEFINE_string("workload", d.workload, "JSONL file, one request a line: {\"output_len\": N} "
                  "and one of \"input_len\": N (random tokens) or \"prompt_ids\": [ids]; "
                  "replaces --num_requests, --input_len and --output_len; or a job input "
                  "file ({\"id\", \"text\"} lines: tickets made into the job's prompts, "
                  "--output_len new tokens each; needs --tokenizer)")
  f.DEFINE_string("tokenizer", d.tokenizer, "checkpoint directory whose tokenizer.json turns "
                  "a job input file's tickets into prompts")
  f.DEFINE_string("prompt_template", d.prompt_template, "the job's prompt_template, for a "
                  "job input file")
  f.DEFINE_integer("max_len", d.max_len, "the job's engine.max_len, for a job input file: "
                   "longer prompts are truncated as the job truncates them (0: never)")
  f.DEFINE_integer("max_num_seqs", d.max_num_seqs, "slots (sequences in flight); "
                   "0 = num_requests")
  f.DEFINE_integer("decode_chunk", d.decode_chunk, "tokens per return to the host")
  f.DEFINE_string("dtype", d.dtype, "bfloat16 or float32")
  f.DEFINE_list("quant", list(d.quant), "weight storage per run: none, int8, fp8; a list runs "
                "every layout once per entry")
  f.DEFINE_list("attention", list(d.attention), "attention per run: auto (on GPUs the "
                "decode kernel at tp=1 and cuDNN's flash prefill), kernel, xla; a list runs "
                "every layout once per entry")
  f.DEFINE_bool("quant_embed", d.quant_embed, "also store the embedding and LM head in 8 bits")
  f.DEFINE_list("block_size", [str(b) for b in d.block_size], "paged KV block positions per "
                "run (0: a dense cache, max_len per slot); a list runs each")
  f.DEFINE_float("kv_cache_memory", d.kv_cache_memory, "KV budget per device: 0 = 0.8 of free "
                 "memory after the weights, <= 1 = that share, > 1 = GB")
  f.DEFINE_list("prefix_cache", list(d.prefix_cache), "per run: true lets prompts that start "
                "alike share cached blocks; a list (false,true) runs each")
  f.DEFINE_list("kv_dtype", list(d.kv_dtype), "KV cache storage per run: auto (the "
                "activations' dtype), fp8 (e4m3, half the bytes); a list runs each")
  f.DEFINE_list("kv_grow", list(d.kv_grow), "per run: true admits with the prompt's blocks "
                "and grows them in decode, swapping the newest sequence out when the pool is "
                "full; a list (false,true) runs each")
  f.DEFINE_list("prefill_chunk", [str(n) for n in d.prefill_chunk], "prompt tokens "
                "prefilled a step, long prompts in chunks between decode calls (0: whole "
                "prompts); a list (0,512) runs each")
  f.DEFINE_integer("scan_unroll", d.scan_unroll, "layers per stage-scan iteration (0 = all)")
  f.DEFINE_string("out", d.out, "directory for results.json and results.md")
  f.DEFINE_string("profile_dir", d.profile_dir, "if set, trace one extra wave per layout (the "
                  "first max_num_seqs requests) with jax.profiler into DIR/<layout>/ and write "
                  "where its device time went (summary.md, summary.json; trace_summary.py) "
                  "and each device's measured activity (activity.png)")
  f.DEFINE_integer("cpu_devices", 1, "virtual CPU devices when no accelerator is asked for "
                   "(JAX_PLATFORMS unset or cpu): 8 runs pp4tp2 on a laptop as jaxpp.run does; "
                   "each layout uses the first devices it needs")
  distributed.define_flags()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  F = flags.FLAGS
  with distributed.current().guard():  # flag mistakes: still the single-process runtime
    runtime = distributed.start(distributed.options_from_flags())
  with runtime.guard():
    distributed.use_virtual_cpu_devices(F.cpu_devices, runtime.num_processes)
    opts = BenchOptions(**{k: F[k].value for k in BenchOptions.__dataclass_fields__})
    run_suite(opts, writer=runtime.is_writer)
  runtime.close()


if __name__ == "__main__":
  define_flags()
  app.run(main)
