"""Choosing a layout: every pp x tp of the devices sized and predicted, the best picked.

`recommend` sizes and predicts each layout (`estimate.py`), skips the ones jaxpp would
refuse (saying why), finds the smallest pp that fits per tp, and picks the best that fits
for the mode: the highest total tokens/s for batch work, the lowest per-token latency for
interactive use. `format_plan` prints it as Markdown with the rules behind the choice.
"""

from __future__ import annotations

import dataclasses
import json

from jaxpp.errors import JaxppError
from jaxpp.model.config import LlamaConfig
from jaxpp.parallel.layout import Layout
from jaxpp.plan.estimate import (
  H100,
  Memory,
  Prediction,
  layout_problem,
  memory_per_stage,
  min_pp,
  predict,
)
from jaxpp.plan.inputs import Assumptions, Workload
from jaxpp.plan.presets import Hardware

MODES = ("batch", "interactive")
RULES = (
    "Decode re-reads a stage's weights for every micro-batch: pp with m >= pp micro-batches "
    "reads them m times per token round, tp once. Inside one node tp therefore decodes faster "
    "until b = B/m nears the critical batch, where decode turns compute bound.",
    "pp for batch throughput when memory or the network decides: it needs no all-reduces, "
    "and across nodes only its neighbour sends cross the network; keep tp inside a node.",
    "tp inside one NVLink node for latency: it divides each token's weight reads by tp.",
    "pp at batch depth one is useless for chat: the ring still runs m >= pp micro-batches, "
    "so a lone sequence's token reads every weight while the other stages wait.",
    "dp replicas when one replica fits fewer devices than you have: each runs a shorter "
    "pipeline on its share of the sequences, with smaller bubbles and its weights read for "
    "more rows per micro-batch; they need no collective between them.",
)


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


def recommend(cfg: LlamaConfig, devices: int, workload: Workload = Workload(),
              hw: Hardware = H100, mode: str = "batch", bytes_per_param: float = 2,
              assume: Assumptions = Assumptions(), virtual_stages: int = 1,
              microbatches: int = 0, layer_split: str = "even", model_name: str = "model",
              embed_bytes_per_param: float | None = None, prefill_microbatches: int = 0,
              attention: str = "auto") -> Plan:
  """Sizes and predicts every dp x pp x tp = devices layout (replicas of a pp x tp
  pipeline included); picks the best that fits for `mode`.

  batch: the highest total tokens/s. interactive: the lowest per-token latency at batch 1,
  ties broken by throughput.
  """
  if mode not in MODES:
    raise JaxppError(f"mode={mode!r} must be one of {', '.join(MODES)}")
  if devices < 1:
    raise JaxppError(f"devices={devices} must be >= 1")
  eb = bytes_per_param if embed_bytes_per_param is None else embed_bytes_per_param
  rows, skipped, tps = [], [], [t for t in range(1, devices + 1) if devices % t == 0]
  shapes = [(devices // (pp * tp), pp, tp) for tp in tps for pp in range(devices // tp, 0, -1)
            if (devices // tp) % pp == 0]
  for dp, pp, tp in shapes:
    layout = Layout(pp, tp, dp=dp, virtual_stages=virtual_stages,
                    microbatches=microbatches, prefill_microbatches=prefill_microbatches,
                    layer_split=layer_split)
    problem = layout_problem(cfg, layout, hw, attention)
    if problem:
      skipped.append((layout.name, problem))
      continue
    rows.append(Row(layout.name, layout,
                    memory_per_stage(cfg, layout, workload, hw, bytes_per_param, assume, eb,
                                     attention),
                    predict(cfg, layout, workload, hw, bytes_per_param, assume, eb, attention)))
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
    b = -(-w.concurrency // (r.layout.dp * m))  # a replica's rows a micro-batch
    lines.append(
        f"| {r.name} | {m} x {b} | {mem.weights / gb:.1f} | {mem.kv / gb:.1f} | "
        f"{mem.activations / gb:.1f} | {mem.total / gb:.1f} | {'yes' if mem.fits else 'NO'} | "
        f"{p.prefill_tokens_per_s:,.0f} | {p.prefill_bubble:.1%} | {p.decode_tokens_per_s:,.0f}"
        f" | {p.decode_bubble:.1%} | {p.latency_per_token_s * 1e3:.2f} | "
        f"{p.total_tokens_per_s:,.0f} |")
  lines += [""] + [f"Skipped {name}: {why}." for name, why in plan.skipped]
  mins = "; ".join(f"tp={tp}: {f'pp={p}' if p else 'none'}" for tp, p in plan.min_pp.items())
  lines += [f"Minimum pp that fits (pp*tp dividing {plan.devices}): {mins}.", "",
            f"**Recommendation: {plan.best or 'none'}** ({plan.reason}).", "", "Rules:"]
  lines += [f"- {rule}" for rule in plan.rules]
  lines += ["", "An estimate: constants fitted to H200 runs, within 5% of today's programs "
            "and 15% of older ones there (docs/planner.md, \"Validation\")."]
  return "\n".join(lines)


def plan_json(plan: Plan) -> str:
  return json.dumps(dataclasses.asdict(plan), indent=1)
