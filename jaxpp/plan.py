"""Sizing before anything is allocated: memory per stage, minimum pp, predicted speed.

`python -m jaxpp.plan --model=llama3-70b --hardware=h100 --devices=4` prints, for every
`pp x tp` layout of the devices, each device's memory (weights, KV cache, activations) and
the predicted prefill and decode rates, then picks one for the workload. It predicts what
jaxpp does today, not what an ideal engine would do:

- every device holds the whole embedding [V, D] and final norm (replicated, `P()`) and the
  LM head vocab-sharded over tp (whole when tp does not divide V), on every stage;
- a device's block stack is padded to the longest chunk: it holds v * max_layers layers;
- the KV cache is dense and allocated up front: m * ceil(B/m) slots of max_len positions,
  rounded up to a multiple of 128 as the engine allocates them (llama.cache_positions);
- decode attention reads all max_len cached positions of a row (masked); prefill pads
  prompts to a power of two (>= 64) and materialises T x T f32 attention scores;
- pipeline ticks are lock-step: every tick lasts as long as the slowest device's chunk.

Formulas, constants and sources: docs/planner.md. Decode runs at a fitted share of the HBM
bandwidth plus fixed per-layer and per-all-reduce costs, checked against H200 runs
(docs/planner.md, "Validation"); H100 figures are not checked.
"""

from __future__ import annotations

import dataclasses
import json

from jaxpp import partition, presets
from jaxpp.errors import JaxppError
from jaxpp.model.config import LlamaConfig
from jaxpp.presets import Assumptions, Hardware, Layout, Workload  # noqa: F401 (the API)
from jaxpp.schedule import formula_bubble

MODES = ("batch", "interactive")
H100 = presets.HARDWARE["h100"]
RULES = (
    "Decode re-reads a stage's weights for every micro-batch: pp with m >= pp micro-batches "
    "reads them m times per token round, tp once. Inside one node tp therefore decodes faster "
    "until b = B/m nears the critical batch, where decode turns compute bound.",
    "pp for batch throughput when memory or the network decides: it needs no all-reduces, "
    "and across nodes only its neighbour sends cross the network; keep tp inside a node.",
    "tp inside one NVLink node for latency: it divides each token's weight reads by tp.",
    "pp at batch depth one is useless for chat: the ring still runs m >= pp micro-batches, "
    "so a lone sequence's token reads every weight while the other stages wait.",
)


@dataclasses.dataclass(frozen=True)
class Memory:
  """Bytes on one device of a layout (with jaxpp's placement all devices hold the same)."""

  weights: float
  kv: float
  activations: float  # the prefill peak; decode needs far less
  total: float
  usable: float  # hbm_bytes * mem_fraction
  fits: bool


@dataclasses.dataclass(frozen=True)
class Prediction:
  """Rates in tokens/s and times in seconds for one replica on the workload."""

  prefill_tokens_per_s: float  # prompt tokens (unpadded) through the whole model
  prefill_bubble: float  # (p-1)/(v*m+p-1)
  decode_tokens_per_s: float  # generated tokens, all sequences together
  decode_bubble: float  # per decode_chunk call of k rounds: (p-1)/(k*v*m+p-1)
  decode_step_s: float  # one token for every sequence in flight, bubble included
  latency_per_token_s: float  # the same step with a single sequence (interactive)
  total_tokens_per_s: float  # (input + output) tokens over prefill + decode time
  output_tokens_per_s: float


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  layout: Layout
  memory: Memory
  prediction: Prediction


@dataclasses.dataclass(frozen=True)
class Plan:
  model: str
  params: int
  devices: int
  mode: str
  bytes_per_param: float  # block weights
  embed_bytes_per_param: float  # embedding and LM head
  hardware: Hardware
  workload: Workload
  assumptions: Assumptions
  critical_batch: float  # rows at which a decode step turns from memory to compute bound
  rows: list[Row]
  skipped: list[tuple[str, str]]  # (layout, why jaxpp cannot run it)
  min_pp: dict[int, int | None]  # tp -> smallest pp (pp*tp dividing devices) that fits
  best: str | None
  reason: str
  rules: tuple[str, ...] = RULES


# --- a stage's pieces -----------------------------------------------------------------------


def _block_params(cfg: LlamaConfig, tp: int) -> float:
  """Per-device params of one block: projections split over tp, the two norms whole."""
  norms = 2 * cfg.hidden_size
  return (cfg.block_param_count() - norms) / tp + norms


def _head_read(cfg: LlamaConfig, tp: int) -> float:
  """Per-device params the logits read: the head is vocab-sharded when tp divides V; a tied
  embedding is replicated, so it is read whole.
  """
  whole = cfg.tie_word_embeddings or cfg.vocab_size % tp
  return cfg.vocab_size * cfg.hidden_size / (1 if whole else tp)


def kv_bytes_per_token_layer(cfg: LlamaConfig, tp: int = 1, dtype_bytes: int = 2) -> float:
  """K and V of one position of one layer on one device: 2 * K/tp * H * bytes."""
  return 2 * cfg.num_kv_heads / tp * cfg.head_dim * dtype_bytes


def _split(cfg: LlamaConfig, layout: Layout, hw: Hardware) -> partition.Partition:
  """Layers per global chunk, or a one-line JaxppError for a layout jaxpp would refuse."""
  problem = layout.problem(cfg, hw)
  if problem:
    raise JaxppError(f"layout {layout.name}: {problem}")
  L, pp, v = cfg.num_layers, layout.pp, layout.virtual_stages
  if layout.layer_split == "even":
    return partition.even(L, pp, v)
  return partition.balanced(L, pp, v, layer_cost=_block_params(cfg, layout.tp),
                            head_cost=_head_read(cfg, layout.tp))


# --- memory ---------------------------------------------------------------------------------


def memory_per_stage(cfg: LlamaConfig, layout: Layout, workload: Workload, hw: Hardware = H100,
                     bytes_per_param: float = 2, assume: Assumptions = Assumptions(),
                     embed_bytes_per_param: float | None = None) -> Memory:
  """Weights + KV cache + prefill activations on one device, against what JAX can use.

  `bytes_per_param` is for block weights, `embed_bytes_per_param` (default: the same) for
  the embedding and LM head: 8-bit weights keep those in bf16 unless asked.
  """
  part = _split(cfg, layout, hw)
  eb = bytes_per_param if embed_bytes_per_param is None else embed_bytes_per_param
  D, V, tp, m, a = cfg.hidden_size, cfg.vocab_size, layout.tp, layout.m, assume.dtype_bytes
  held = layout.virtual_stages * part.max_layers  # padded: every device holds the longest
  head = 0 if cfg.tie_word_embeddings else _head_read(cfg, tp)
  weights = bytes_per_param * held * _block_params(cfg, tp) + eb * (V * D + head) + 4 * D
  b, T = workload.rows(m), workload.prefill_len
  mp = layout.mp(workload.concurrency)
  bp = workload.rows(mp)  # rows of a prefill micro-batch
  kv = m * b * workload.cache_len * held * kv_bytes_per_token_layer(cfg, tp, a)
  qkv_ffn = ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
             + 2 * cfg.intermediate_size) / tp
  activations = (mp * bp * T * D * a  # the prefill inbox: one [bp, T, D] per micro-batch
                 + bp * T * (assume.activation_width * D + qkv_ffn) * a  # one layer, live
                 + bp * cfg.num_heads / tp * T * T * assume.score_bytes  # [bp, N/tp, T, T]
                 + mp * bp * _head_read(cfg, tp) / D * 4)  # f32 logits of last positions
  total = weights + kv + activations
  usable = hw.hbm_bytes * assume.mem_fraction
  return Memory(weights, kv, activations, total, usable, total <= usable)


def min_pp(cfg: LlamaConfig, tp: int = 1, devices: int | None = None,
           workload: Workload = Workload(), hw: Hardware = H100, bytes_per_param: float = 2,
           assume: Assumptions = Assumptions(),
           embed_bytes_per_param: float | None = None) -> int | None:
  """The smallest pp at which every stage fits: among divisors of devices/tp, or any pp."""
  if devices is not None and (devices < 1 or tp < 1 or devices % tp):
    raise JaxppError(f"tp={tp} must divide devices={devices}")
  n = devices // tp if devices else cfg.num_layers
  for pp in (p for p in range(1, n + 1) if n % p == 0 or devices is None):
    layout = Layout(pp, tp)
    if layout.problem(cfg, hw) is None and memory_per_stage(
        cfg, layout, workload, hw, bytes_per_param, assume, embed_bytes_per_param).fits:
      return pp
  return None


# --- speed ----------------------------------------------------------------------------------


def _allreduce_s(nbytes: float, tp: int, hw: Hardware, assume: Assumptions) -> float:
  """Ring all-reduce over tp devices: 2(t-1)/t of the bytes at bus bandwidth, plus latency."""
  if tp == 1:
    return 0.0
  return assume.collective_latency_s + 2 * (tp - 1) / tp * nbytes / hw.link_bandwidth


def _send_s(nbytes: float, layout: Layout, hw: Hardware, assume: Assumptions) -> float:
  """A pipeline tick's hand-off: the executor's fixed cost per tick and one ppermute to the
  next stage, over the network once the mesh spans hosts."""
  if layout.pp == 1:
    return 0.0
  bw = hw.inter_node_bandwidth if layout.pp * layout.tp > hw.gpus_per_node else hw.link_bandwidth
  return assume.tick_overhead_s + assume.collective_latency_s + nbytes / bw


def _round_s(chunk_s: list[float], layout: Layout, send_s: float, m: int) -> float:
  """v*m ticks in steady state; each waits for the slowest device's chunk, then sends."""
  pp = layout.pp
  return m * sum(max(chunk_s[r * pp:(r + 1) * pp]) + send_s
                        for r in range(layout.virtual_stages))


def predict(cfg: LlamaConfig, layout: Layout, workload: Workload, hw: Hardware = H100,
            bytes_per_param: float = 2, assume: Assumptions = Assumptions(),
            embed_bytes_per_param: float | None = None) -> Prediction:
  """Prefill (compute bound) and decode (weight + KV reads, fitted bandwidth) rates."""
  part = _split(cfg, layout, hw)
  eb = bytes_per_param if embed_bytes_per_param is None else embed_bytes_per_param
  w, tp, m, a = workload, layout.tp, layout.m, assume.dtype_bytes
  D, NH = cfg.hidden_size, cfg.num_heads * cfg.head_dim
  blk, head, last = _block_params(cfg, tp), _head_read(cfg, tp), len(part.counts) - 1
  b, T = w.rows(m), w.prefill_len
  context = w.input_len + w.output_len / 2  # the mean cached positions a decode step reads
  fused = layout.fused_decode(cfg)  # the kernel reads only those; XLA as kv_read says
  ctx = w.cache_len if assume.kv_read == "max_len" and not fused else context
  overhead = assume.kernel_layer_overhead_s if fused else assume.layer_overhead_s

  def decode_round_s(rows: int) -> float:
    chunk_s = []
    for c, n in enumerate(part.counts):
      head_c = head if c == last else 0  # the last chunk also runs the LM head
      params = n * blk + head_c
      nbytes = (bytes_per_param * n * blk + eb * head_c
                + rows * ctx * n * kv_bytes_per_token_layer(cfg, tp, a))
      flops = 2 * rows * params + 4 * rows * ctx * n * NH / tp
      chunk_s.append(max(nbytes / (hw.hbm_bandwidth * assume.decode_efficiency),
                         flops / hw.matmul_flops) + n * overhead
                     + n * 2 * _allreduce_s(rows * D * a, tp, hw, assume))
    return _round_s(chunk_s, layout, _send_s(rows * D * a, layout, hw, assume), m)

  dec_bubble = formula_bubble(layout.pp, layout.virtual_stages, m, w.decode_chunk)
  step = decode_round_s(b) / (1 - dec_bubble)

  flops_s = hw.matmul_flops * assume.prefill_efficiency
  mp = layout.mp(w.concurrency)
  bp = w.rows(mp)  # rows of a prefill micro-batch
  chunk_s = [(2 * bp * T * n * blk + 4 * bp * T * T * n * NH / tp) / flops_s
             + n * 2 * _allreduce_s(bp * T * D * a, tp, hw, assume) for n in part.counts]
  pre_bubble = formula_bubble(layout.pp, layout.virtual_stages, mp)
  head_s = 2 * mp * bp * head / flops_s  # the LM head once, on the last positions
  prefill = _round_s(chunk_s, layout, _send_s(bp * T * D * a, layout, hw, assume), mp) / (
      1 - pre_bubble) + head_s

  total_s = prefill + max(w.output_len - 1, 0) * step  # prefill samples the first token
  B = w.concurrency
  return Prediction(
      prefill_tokens_per_s=B * w.input_len / prefill, prefill_bubble=pre_bubble,
      decode_tokens_per_s=B / step, decode_bubble=dec_bubble, decode_step_s=step,
      latency_per_token_s=decode_round_s(1) / (1 - dec_bubble),
      total_tokens_per_s=B * (w.input_len + w.output_len) / total_s,
      output_tokens_per_s=B * w.output_len / total_s)


# --- choosing -------------------------------------------------------------------------------


def recommend(cfg: LlamaConfig, devices: int, workload: Workload = Workload(),
              hw: Hardware = H100, mode: str = "batch", bytes_per_param: float = 2,
              assume: Assumptions = Assumptions(), virtual_stages: int = 1,
              microbatches: int = 0, layer_split: str = "even", model_name: str = "model",
              embed_bytes_per_param: float | None = None, prefill_microbatches: int = 0,
              attention: str = "auto") -> Plan:
  """Sizes and predicts every pp x tp = devices layout; picks the best that fits for `mode`.

  batch: the highest total tokens/s. interactive: the lowest per-token latency at batch 1,
  ties broken by throughput.
  """
  if mode not in MODES:
    raise JaxppError(f"mode={mode!r} must be one of {', '.join(MODES)}")
  if devices < 1:
    raise JaxppError(f"devices={devices} must be >= 1")
  eb = bytes_per_param if embed_bytes_per_param is None else embed_bytes_per_param
  rows, skipped, tps = [], [], [t for t in range(1, devices + 1) if devices % t == 0]
  for tp in tps:
    layout = Layout(devices // tp, tp, virtual_stages, microbatches, layer_split,
                    prefill_microbatches, attention)
    problem = layout.problem(cfg, hw)
    if problem:
      skipped.append((layout.name, problem))
      continue
    rows.append(Row(layout.name, layout,
                    memory_per_stage(cfg, layout, workload, hw, bytes_per_param, assume, eb),
                    predict(cfg, layout, workload, hw, bytes_per_param, assume, eb)))
  mins = {tp: min_pp(cfg, tp, devices, workload, hw, bytes_per_param, assume, eb)
          for tp in tps}
  best, reason = _choose(rows, mode)
  critical = hw.matmul_flops * bytes_per_param / (2 * hw.hbm_bandwidth)
  return Plan(model_name, cfg.param_count(), devices, mode, bytes_per_param, eb, hw, workload,
              assume, critical, rows, skipped, mins, best, reason)


def _choose(rows: list[Row], mode: str) -> tuple[str | None, str]:
  fitting = [r for r in rows if r.memory.fits]
  if not fitting:
    need = min((r.memory.total for r in rows), default=0) / 1e9
    return None, (f"no layout fits: the smallest needs {need:.1f} GB per device; add devices, "
                  "shorten max_len, lower concurrency or use fewer bytes per param")
  p = lambda r: r.prediction
  if mode == "batch":
    ranked = sorted(fitting, key=lambda r: -p(r).total_tokens_per_s)
    rate, why = lambda r: f"{p(r).total_tokens_per_s:,.0f} tok/s", "highest total throughput"
  else:
    ranked = sorted(fitting, key=lambda r: (p(r).latency_per_token_s, -p(r).total_tokens_per_s))
    rate = lambda r: f"{p(r).latency_per_token_s * 1e3:.2f} ms/token"
    why = "lowest per-token latency at batch 1"
  if len(ranked) == 1:
    return ranked[0].name, f"{why}, {rate(ranked[0])}; the only layout that fits"
  return ranked[0].name, f"{why}, {rate(ranked[0])}; next {ranked[1].name}, {rate(ranked[1])}"


def format_plan(plan: Plan) -> str:
  """Markdown: the layouts' table, the minimum pp per tp, the choice and the rules."""
  w, hw, gb = plan.workload, plan.hardware, 1e9
  lines = [
      f"# {plan.model} ({plan.params / 1e9:.1f}B params, {plan.bytes_per_param:g} bytes per "
      f"block weight, {plan.embed_bytes_per_param:g} per embedding/head weight) "
      f"on {plan.devices} x {hw.name}, {plan.mode} mode", "",
      f"Workload: {w.concurrency} sequences in flight, {w.input_len} in / {w.output_len} out "
      f"tokens, {w.cache_len} cache positions a slot, decode_chunk {w.decode_chunk}. "
      f"Usable per device: "
      f"{hw.hbm_bytes * plan.assumptions.mem_fraction / gb:.1f} GB ({hw.hbm_bytes / gb:.1f} GB "
      f"x mem_fraction {plan.assumptions.mem_fraction:g}). Critical batch: "
      f"{plan.critical_batch:.0f} rows.", "",
      "| layout | m x b | weights GB | KV GB | act GB | total GB | fits | prefill tok/s | "
      "prefill bubble | decode tok/s | decode bubble | ms/token at b=1 | total tok/s |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in plan.rows:
    mem, p, m = r.memory, r.prediction, r.layout.m
    lines.append(
        f"| {r.name} | {m} x {w.rows(m)} | {mem.weights / gb:.1f} | {mem.kv / gb:.1f} | "
        f"{mem.activations / gb:.1f} | {mem.total / gb:.1f} | {'yes' if mem.fits else 'NO'} | "
        f"{p.prefill_tokens_per_s:,.0f} | {p.prefill_bubble:.1%} | {p.decode_tokens_per_s:,.0f}"
        f" | {p.decode_bubble:.1%} | {p.latency_per_token_s * 1e3:.2f} | "
        f"{p.total_tokens_per_s:,.0f} |")
  lines += [""] + [f"Skipped {name}: {why}." for name, why in plan.skipped]
  mins = "; ".join(f"tp={tp}: {f'pp={p}' if p else 'none'}" for tp, p in plan.min_pp.items())
  lines += [f"Minimum pp that fits (pp*tp dividing {plan.devices}): {mins}.", "",
            f"**Recommendation: {plan.best or 'none'}** ({plan.reason}).", "", "Rules:"]
  lines += [f"- {rule}" for rule in plan.rules]
  lines += ["", "An estimate: constants fitted to H200 runs, within -17% / +30% of measured "
            "decode and -16% / +15% of total tok/s there (docs/planner.md, \"Validation\")."]
  return "\n".join(lines)


def plan_json(plan: Plan) -> str:
  return json.dumps(dataclasses.asdict(plan), indent=1)


if __name__ == "__main__":  # `python -m jaxpp.plan`; the flags live in plan_cli.py
  from jaxpp import plan_cli
  plan_cli.run()
