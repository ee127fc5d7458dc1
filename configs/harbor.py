"""Harbor: one-line summaries of support tickets (JSONL in, JSONL out).

Command (from the repo root):

    python -m jaxpp.run --config configs/harbor.py

Override any field on the command line, e.g. `--config.sampling.max_new_tokens=8` or
`--config.job.input=/data/tickets.jsonl`; a misspelled key is an error, not a silent no-op.

Hardware: CPU only, 8 virtual XLA CPU devices (jaxpp.run sets them when no accelerator
platform is requested), laid out as pp=4 x tp=2. The model is `models/harbor-tiny`, a
1.4M-parameter Llama trained for this job (docs/training.md): on the 240 shipped tickets its
summaries name the right category for 100% and the right product for 98.75% of tickets. It
was trained on sequences of at most 256 tokens, hence engine.max_len=256 (prompts are cut to
225 tokens, keeping the "Summary:" cue). Measured on a 2-core x86 machine (2026-12-01,
jax 0.10.2): the 240 tickets in about 9 s of wall time with JAX's compilation cache warm,
about 23 s on a first run that compiles; prefill padding 15.7% (the report's line).

pp*tp*dp must equal the device count; `--config.mesh.pp=2 --config.mesh.tp=4` is another
layout of the same 8. Micro-batches, the decode chunk and the slots are left at 0: they
follow the layout (docs/harbor.md, "Defaults that follow the layout"); on GPUs see
configs/harbor_8b_1gpu.py.
"""

import pathlib

import ml_collections

REPO = pathlib.Path(__file__).resolve().parent.parent


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.checkpoint = str(REPO / "models" / "harbor-tiny")  # HF safetensors directory
  c.model.dtype = "float32"  # float32 on CPU; "bfloat16" on accelerators
  c.model.quant = "none"  # block weights: "none", "int8" or "fp8" (8-bit, per-channel scales)
  c.model.quant_embed = False  # also store the embedding and LM head in 8 bits
  c.model.params_cache = ""  # orbax dir: placed (quantised) params saved once, then restored
  c.model.attention = "auto"  # "auto" (GPU kernels where measured faster), "kernel", "xla"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.pp = 4  # pipeline stages per replica
  c.mesh.tp = 2  # tensor-parallel devices per stage
  c.mesh.dp = 1  # independent replicas

  c.schedule = ml_collections.ConfigDict()
  c.schedule.virtual_stages = 1  # layer chunks per device (interleaving)
  c.schedule.microbatches = 0  # decode micro-batches in flight (>= pp); 0 = pp
  c.schedule.prefill_microbatches = 0  # a prefill of all slots cut this fine (0 = 8 per stage)
  c.schedule.layer_split = "even"  # "even", "balanced" or per-chunk counts "2,1,1,..."
  c.schedule.decode_chunk = 0  # tokens per return to the host; 0 = from the layout (16 here)

  c.engine = ml_collections.ConfigDict()
  c.engine.max_len = 256  # KV positions per slot: prompt + generated tokens
  c.engine.max_num_seqs = 0  # slots, spread evenly over microbatches; 0 = what memory holds
  # (up to 256 on GPUs; 4 per micro-batch, 16 here, on CPU)
  c.engine.block_size = 64  # KV positions per paged block; 0 = dense (max_len per slot)
  c.engine.kv_cache_memory = 0.0  # KV budget per device: 0 = 0.8 of free memory after the
  # weights, <= 1 = that share, > 1 = GB (CPU: what max_num_seqs dense slots would hold)
  c.engine.prefix_cache = True  # prompts that start alike (the template) share cached blocks
  c.engine.prefill_chunk = 0  # prompt tokens prefilled per step, long ones in chunks; 0 = off
  c.engine.kv_dtype = "auto"  # KV cache storage: "auto" (the activations') or "fp8" (e4m3)
  c.engine.kv_grow = False  # grow KV blocks as sequences decode, swapping the newest out when full
  c.engine.priority_reserve = ml_collections.ConfigDict()
  c.engine.priority_reserve.interactive = 0  # slots kept free for interactive requests
  c.engine.priority_reserve.batch = 0  # slots kept free for batch requests

  c.sampling = ml_collections.ConfigDict()
  c.sampling.max_new_tokens = 32
  c.sampling.temperature = 0.0  # 0 = greedy
  c.sampling.top_k = 0  # 0 = off
  c.sampling.top_p = 1.0  # 1 = off
  c.sampling.min_p = 0.0  # 0 = off; else cut tokens below min_p x the likeliest
  c.sampling.repetition_penalty = 1.0  # 1 = off; > 1 discourages tokens of prompt or output
  c.sampling.presence_penalty = 0.0  # 0 = off; subtracted once from tokens the output holds
  c.sampling.frequency_penalty = 0.0  # 0 = off; subtracted per occurrence in the output
  c.sampling.seed = 0

  c.job = ml_collections.ConfigDict()
  c.job.input = str(REPO / "data" / "tickets.jsonl")  # lines {"id": ..., "text": ...}
  c.job.output = "out/summaries.jsonl"  # relative to the working directory
  c.job.format = "tickets"  # input lines: "tickets" ({"id", "text"}) or "openai_batch"
  c.job.errors = ""  # rejected input lines; "" = <output>.errors.jsonl
  c.job.prompt_template = "Ticket:\n{text}\nSummary:"
  c.job.prompt_format = "text"  # "text": the filled template is the prompt; "chat": it is the
  # user message, laid out by the checkpoint's chat template (instruct models)
  c.job.system_prompt = ""  # with "chat": a system message before it ("" = none)
  c.job.length_policy = "truncate"  # prompt too long for max_len: "truncate" (keep its end) or "reject"
  c.job.priority = "batch"  # priority class of the job's requests: "batch" or "interactive"
  c.job.progress = True  # progress bar on stderr
  c.job.compile_cache = "~/.cache/jaxpp/xla"  # JAX's persistent compilation cache; "" = off

  c.watchdog = ml_collections.ConfigDict()  # deadline of every device step (docs/multihost.md)
  c.watchdog.multiple = 10.0  # a step may take this many times its expected (median) time
  c.watchdog.min_seconds = 30.0  # ... and never less than this (no cut-off on jitter)
  c.watchdog.max_seconds = 900.0  # absolute bound, also for a program's first (compiling) call
  return c
