"""Harbor on a 70B-class Llama over 4 GPUs: one-line ticket summaries, JSONL in, JSONL out.

Command (from the repo root; both paths are placeholders you must override):

    JAX_PLATFORMS=cuda python -m jaxpp.run --config configs/harbor_70b_4gpu.py \\
      --config.model.checkpoint=/path/to/Meta-Llama-3.1-70B-Instruct \\
      --config.job.input=/path/to/tickets.jsonl

(`--config.job.input=data/tickets.jsonl` runs the 240 shipped synthetic tickets.)
`JAX_PLATFORMS=cuda` makes a host without working GPUs fail at start-up instead of falling
back to 8 virtual CPU devices (which the 4-device layout below would then reject). On hosts
where NCCL's NVLink multicast (NVLS) is unavailable, prefix `NCCL_NVLS_ENABLE=0`, as the
commands in docs/benchmarks.md do. Any field can be overridden as in configs/harbor.py, e.g.
`--config.sampling.max_new_tokens=64`; a misspelled key is an error.

Hardware: one host with 4 x NVIDIA H100 80 GB (SXM, NVLink) or 4 x H200 141 GB. The
checkpoint is any Hugging Face Llama-architecture directory (config.json, tokenizer.json,
*.safetensors) of about 70B parameters, e.g. Llama 3.1 70B Instruct (L=80, D=8192, F=28672,
N=64, K=8, H=128, V=128256).

Expected throughput: this config's layout was chosen from the bench, not yet run as a job.
On one 4 x H200 host (2026-11-27, jax 0.11.2; docs/benchmarks.md, "4 x H200: the 70B
shape"), `python -m jaxpp.bench --model=llama3-70b --hardware=h200 --num_requests=256
--input_len=1024 --output_len=128 --max_num_seqs=64 --decode_chunk=32
--layouts=pp4tp1m4p32,pp2tp2,pp1tp4` measured, in total tok/s (prefill / decode):

    pp1tp4        9,673  (13,695 / 2,957)   <- this config
    pp2tp2        6,702  (10,240 / 1,811)
    pp4tp1m4p32   6,587  (15,300 / 1,198)

No job run on 4 GPUs has been measured yet; record one (command, card, numbers) in
docs/benchmarks.md before quoting a job figure.

Why this layout (pp=1, tp=4):
- Throughput: on one NVLink host with 64 sequences in flight, tensor parallelism decodes
  2.5x faster than the 4-stage pipeline, because each pipeline micro-batch re-reads its
  stage's weights (m = 4 reads per token round) where tp=4 reads each weight once and pays
  160 small all-reduces a step over NVLink. The pipeline prefills 12% faster, but a ticket
  job spends most of its device time in decode. The planner predicts the same order for
  the job's workload (`python -m jaxpp.plan --model=llama3-70b --hardware=h200 --devices=4
  --input_len=256 --output_len=64 --concurrency=128`: pp1tp4 10,741 tok/s, pp2tp2 9,533,
  pp4tp1 8,175; on h100 10,080 against 8,546 and 6,813). Across hosts, or with slower links
  than NVLink, pp is what scales: set --config.mesh.pp=4 --config.mesh.tp=1.
- Memory: ~70.6B parameters are ~141 GB in bf16, more than one 80 GB card holds; tp=4
  splits every layer's weights four ways, ~37 GB per card (the embedding and the head
  split over tp too). KV costs 2 (K,V) x K=8 x H=128 x 2 B x 80 layers / 4 = 80 KiB per
  token per card, i.e. 160 MiB per sequence at max_len=2048; max_num_seqs=64 slots are
  10 GiB per card. The planner predicts 128 slots would be faster still (unmeasured).
- Length: a prompt gets max_len - max_new_tokens + 1 = 1921 positions. The longest tickets
  in data/tickets.jsonl (~8,500 characters) come close to or over that; length_policy
  "truncate" cuts the ticket text and keeps the template's "Summary:" ending, "reject"
  sends such tickets to the errors file instead.
- decode_chunk=32 (the measured runs' value) halves harbor.py's host round trips: 4 per
  sequence at 128 new tokens.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  # Placeholder: override with --config.model.checkpoint=/path/to/your/checkpoint.
  c.model.checkpoint = "/path/to/Meta-Llama-3.1-70B-Instruct"  # HF safetensors directory
  c.model.dtype = "bfloat16"  # 141 GB of weights; float32 would not fit 4 x 80 GB
  c.model.quant = "none"  # "int8": 8-bit block weights, about 70 GB; "fp8" on H100/H200
  c.model.quant_embed = False  # embedding and LM head stay bf16
  c.model.params_cache = ""  # e.g. /data/cache/llama70b-tp4: quantise once, restore nightly
  c.model.attention = "auto"  # "auto" (GPU kernels where measured faster), "kernel", "xla"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.pp = 1  # one stage: measured fastest on one NVLink host (see the docstring)
  c.mesh.tp = 4  # every layer split over the 4 cards
  c.mesh.dp = 1  # one replica spans all 4 cards

  c.schedule = ml_collections.ConfigDict()
  c.schedule.virtual_stages = 1  # layer chunks per device (interleaving)
  c.schedule.microbatches = 0  # 0 = pp: the fewest that keep the decode ring full
  c.schedule.prefill_microbatches = 0  # a prefill of all slots cut this fine (0 = 8 per stage)
  c.schedule.layer_split = "even"  # with pp > 1: layers per stage ("balanced" also weighs the head)
  c.schedule.decode_chunk = 32  # tokens generated per return to the host

  c.engine = ml_collections.ConfigDict()
  c.engine.max_len = 2048  # KV positions per slot: prompt + generated tokens
  c.engine.max_num_seqs = 64  # slots, as measured; KV 64 x 160 MiB = 10 GiB per card
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
  c.sampling.max_new_tokens = 128
  c.sampling.temperature = 0.0  # 0 = greedy
  c.sampling.top_k = 0  # 0 = off
  c.sampling.top_p = 1.0  # 1 = off
  c.sampling.min_p = 0.0  # 0 = off; else cut tokens below min_p x the likeliest
  c.sampling.repetition_penalty = 1.0  # 1 = off; > 1 discourages tokens of prompt or output
  c.sampling.presence_penalty = 0.0  # 0 = off; subtracted once from tokens the output holds
  c.sampling.frequency_penalty = 0.0  # 0 = off; subtracted per occurrence in the output
  c.sampling.seed = 0

  c.job = ml_collections.ConfigDict()
  # Placeholder: override with --config.job.input=/path/to/tickets.jsonl.
  c.job.input = "/path/to/tickets.jsonl"  # lines {"id": ..., "text": ...}
  c.job.output = "out/summaries_70b.jsonl"  # relative to the working directory
  c.job.format = "tickets"  # input lines: "tickets" ({"id", "text"}) or "openai_batch"
  c.job.errors = ""  # rejected input lines; "" = <output>.errors.jsonl
  c.job.prompt_template = "Ticket:\n{text}\nSummary:"
  c.job.prompt_format = "text"  # "text": the filled template is the prompt; "chat": it is the
  # user message, laid out by the checkpoint's chat template (instruct models)
  c.job.system_prompt = ""  # with "chat": a system message before it ("" = none)
  c.job.length_policy = "truncate"  # prompt over 1921 tokens: cut the text, keep "Summary:"
  c.job.priority = "batch"  # priority class of the job's requests: "batch" or "interactive"
  c.job.progress = True  # progress bar on stderr
  c.job.compile_cache = "~/.cache/jaxpp/xla"  # JAX's persistent compilation cache; "" = off

  c.watchdog = ml_collections.ConfigDict()  # deadline of every device step (docs/multihost.md)
  c.watchdog.multiple = 10.0  # a step may take this many times its expected (median) time
  c.watchdog.min_seconds = 30.0  # ... and never less than this (no cut-off on jitter)
  c.watchdog.max_seconds = 900.0  # absolute bound, also for a program's first (compiling) call
  return c
