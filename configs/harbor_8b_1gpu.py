"""Harbor on an 8B-class Llama on one GPU: one-line ticket summaries, JSONL in, JSONL out.

Command (from the repo root; the checkpoint path is a placeholder you must override):

    JAX_PLATFORMS=cuda,cpu python -m jaxpp.run --config configs/harbor_8b_1gpu.py \\
      --config.model.checkpoint=/path/to/Meta-Llama-3.1-8B-Instruct \\
      --config.job.input=/path/to/tickets.jsonl

(`cpu` next to `cuda`: the safetensors reader stages tensors through JAX's CPU backend.)
Hardware: one NVIDIA H200 (or H100; an 8B model in bf16 is 16 GB). Any Hugging Face
Llama-architecture checkpoint of about 8B parameters, e.g. Llama 3.1 8B (L=32, D=4096,
F=14336, N=32, K=8, H=128, V=128256).

Measured (2026-12-01, one H200, jax 0.11.2; docs/benchmarks.md, "The job at the engine's
speed"): this config as shipped on a random-weight checkpoint of that shape and
data/tickets.jsonl repeated 167 times (40,080 tickets, 7.6M prompt tokens, mean 189), 64 new
tokens each, compile cache cold (`bash tools/job_speed.sh OUT 167 0 config`): 40,080
tickets in 8.6 min, prefill 26,633 tok/s, decode 14,643 tok/s, start-up 51 s of which 42 s
reading the 16 GB checkpoint. The same command again on the finished output: 8 s, no model
loaded.

Layout: pp=1 x tp=1 (the model fits one card; no pipeline bubble), as many replicas as there
are GPUs (mesh.dp=0: on one GPU one replica; on eight, eight, which the planner predicts
fastest for this shape but no several-GPU run has measured), one decode micro-batch
(microbatches=0 = pp), decode_chunk 0 = from the layout (16), 128 sequences in flight as
measured (0 would size them from free memory, up to 256), prompts of up to 961 tokens.
"""

import pathlib

import ml_collections

REPO = pathlib.Path(__file__).resolve().parent.parent


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  # Placeholder: override with --config.model.checkpoint=/path/to/your/checkpoint.
  c.model.checkpoint = "/path/to/Meta-Llama-3.1-8B-Instruct"  # HF safetensors directory
  c.model.dtype = "bfloat16"
  c.model.quant = "none"  # block weights: "none", "int8" or "fp8" (8-bit, per-channel scales)
  c.model.quant_embed = False  # also store the embedding and LM head in 8 bits
  c.model.params_cache = ""  # orbax dir: placed (quantised) params saved once, then restored
  c.model.attention = "auto"  # "auto" (GPU kernels where measured faster), "kernel", "xla"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.pp = 1  # the model fits one card
  c.mesh.tp = 1  # tensor-parallel devices per stage
  c.mesh.dp = 0  # independent replicas; 0 = as many as the devices hold (one per GPU)

  c.schedule = ml_collections.ConfigDict()
  c.schedule.virtual_stages = 1  # layer chunks per device (interleaving)
  c.schedule.microbatches = 0  # decode micro-batches in flight (>= pp); 0 = pp
  c.schedule.prefill_microbatches = 0  # a prefill of all slots cut this fine (0 = 8 per stage)
  c.schedule.layer_split = "even"  # "even", "balanced" or per-chunk counts "2,1,1,..."
  c.schedule.decode_chunk = 0  # tokens per return to the host; 0 = from the layout (16)

  c.engine = ml_collections.ConfigDict()
  c.engine.max_len = 1024  # KV positions per slot: prompt + generated tokens
  # slots as measured on one GPU, counted over all replicas (with dp GPUs set dp x 128 to
  # keep 128 per GPU); 0 = what free memory holds (up to 256 a replica)
  c.engine.max_num_seqs = 128
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
  c.sampling.max_new_tokens = 64
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
  c.job.output = "out/summaries_8b.jsonl"  # relative to the working directory
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
