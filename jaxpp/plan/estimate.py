"""Sizing before anything is allocated: memory per stage, minimum pp, predicted speed.

`python -m jaxpp.plan --model=llama3-70b --hardware=h100 --devices=4` prints, for every
`pp x tp` layout of the devices, each device's memory (weights, KV cache, activations) and
the predicted prefill and decode rates, then picks one for the workload. It predicts what
jaxpp does today, not what an ideal engine would do:

- every device holds the whole embedding [V, D] and final norm (replicated, `P()`) and the
  LM head vocab-sharded over tp (whole when tp does not divide V), on every stage;
- a device's block stack is padded to the longest chunk: it holds v * max_layers layers;
- the KV cache is paged (`Workload.block_size`): each sequence in flight holds the blocks of
  its prompt and completion; a dense one (block_size 0) holds m * ceil(B/m) slots of
  max_len positions, rounded up to a multiple of 128 (kv_cache.cache_positions);
- decode attention reads all max_len cached positions of a row (masked) in XLA's form, each
  row's own context in the fused kernel; prefill pads prompts to a power of two (>= 64)
  and, in XLA's form, materialises T x T f32 attention scores (the flash kernel keeps them
  on chip and computes only the causal half);
- pipeline ticks are lock-step: every tick lasts as long as the slowest device's chunk;
- 8-bit weights stream in decode at a byte each plus `Assumptions.kernel_bytes` through
  int8_matmul's kernel (`auto` on a GPU at tp = 1, or `kernel`), plus `widen_bytes` on
  XLA's path, which widens each layer first (`decode_weight_bytes`).

Formulas, constants and sources: docs/planner.md. Decode runs at a fitted share of the HBM
bandwidth plus fixed per-layer and per-all-reduce costs, checked against H200 runs
(docs/planner.md, "Validation"); H100 figures are not checked.
"""

from __future__ import annotations

import dataclasses

from jaxpp.errors import JaxppError
from jaxpp.model import attention_choice
from jaxpp.model.config import LlamaConfig
from jaxpp.parallel import partition
from jaxpp.parallel.layout import Layout, block_params_per_device, head_params_per_device
from jaxpp.parallel.schedule import formula_bubble
from jaxpp.plan import presets
from jaxpp.plan.inputs import Assumptions, Workload
from jaxpp.plan.presets import Hardware

H100 = presets.HARDWARE["h100"]


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
  """Rates in tokens/s (all replicas together) and times in seconds (one replica's) on the
  workload."""

  prefill_tokens_per_s: float  # prompt tokens (unpadded) through the whole model
  prefill_bubble: float  # (p-1)/(v*m+p-1)
  decode_tokens_per_s: float  # generated tokens, all sequences together
  decode_bubble: float  # per decode_chunk call of k rounds: (p-1)/(k*v*m+p-1)
  decode_step_s: float  # one token for every sequence in flight, bubble included
  latency_per_token_s: float  # the same step with a single sequence (interactive)
  total_tokens_per_s: float  # (input + output) tokens over prefill + decode time
  output_tokens_per_s: float


# --- a stage's pieces -----------------------------------------------------------------------


def kv_bytes_per_token_layer(cfg: LlamaConfig, tp: int = 1, element_bytes: float = 2) -> float:
  """K and V of one position of one layer on one device: 2 * K/tp * H * bytes (K counting
  the replicas tp > K makes, `LlamaConfig.for_tp`: one head a device; `element_bytes`:
  `Workload.kv_element_bytes`)."""
  return 2 * cfg.for_tp(tp).num_kv_heads / tp * cfg.head_dim * element_bytes


def decode_weight_bytes(stored: float, activation: float, in_kernel: bool,
                        assume: Assumptions = Assumptions()) -> float:
  """Bytes a decode step streams per weight stored in `stored` bytes. Weights narrower than
  the activations (8-bit) are read once by int8_matmul's kernel (`in_kernel`:
  `Kernels.weights8`), which streams below cuBLAS's bandwidth: `assume.kernel_bytes` more
  (fitted: 0.91x of bf16 on one H200). On XLA's path each layer is first widened into an
  activation-dtype copy in a pass of its own, which costs `assume.widen_bytes` more
  (fitted: 0.48x of bf16 on the same card; docs/planner.md, "8-bit weights")."""
  if stored >= activation:
    return stored
  return stored + (assume.kernel_bytes if in_kernel else assume.widen_bytes)


def layout_problem(cfg: LlamaConfig, layout: Layout, hw: Hardware,
                   attention: str = "auto") -> str | None:
  """Why jaxpp (`Layout.problem`, the attention choice) or the hardware cannot run this
  layout, in one line, or None."""
  problem = layout.problem(cfg)
  if problem:
    return problem
  if layout.pp * layout.tp > hw.gpus_per_node and hw.gpus_per_node % layout.tp:
    return (f"tp={layout.tp} must divide gpus_per_node={hw.gpus_per_node} when the mesh "
            "spans hosts")
  if isinstance(attention, attention_choice.Kernels):
    return None
  return attention_choice.problem(attention, cfg.head_dim)


def kernels(cfg: LlamaConfig, layout: Layout, attention: str | attention_choice.Kernels = "auto"
            ) -> attention_choice.Kernels:
  """Which phases' attention runs in its fused kernel, as `Pipeline.kernels` decides on
  Hopper GPUs (which the hardware presets are); a `Kernels` value is taken as it is (to
  model programs no choice gives today, such as runs measured before the flash prefill)."""
  if isinstance(attention, attention_choice.Kernels):
    return attention
  return attention_choice.decide(attention, on_gpu=True, cudnn=True, tp=layout.tp,
                                 head_dim=cfg.head_dim)


def layers_per_chunk(cfg: LlamaConfig, layout: Layout, hw: Hardware, attention: str = "auto"
           ) -> partition.Partition:
  """The layout's layers per chunk (`Layout.partition`: the split that runs), or a
  one-line JaxppError for a layout jaxpp would refuse."""
  problem = layout_problem(cfg, layout, hw, attention)
  if problem:
    raise JaxppError(f"layout {layout.name}: {problem}")
  return layout.partition(cfg)


def one_replica(layout: Layout, workload: Workload) -> tuple[Layout, Workload]:
  """One of `layout`'s dp replicas and its share of the sequences: replicas are whole
  pipelines on their own devices that split the workload's sequences between them."""
  if layout.dp == 1:
    return layout, workload
  share = -(-workload.concurrency // layout.dp)
  return (dataclasses.replace(layout, dp=1),
          dataclasses.replace(workload, concurrency=share))


# --- memory ---------------------------------------------------------------------------------


def memory_per_stage(cfg: LlamaConfig, layout: Layout, workload: Workload, hw: Hardware = H100,
                     bytes_per_param: float = 2, assume: Assumptions = Assumptions(),
                     embed_bytes_per_param: float | None = None,
                     attention: str = "auto") -> Memory:
  """Weights + KV cache + prefill activations on one device, against what JAX can use.

  `bytes_per_param` is for block weights, `embed_bytes_per_param` (default: the same) for
  the embedding and LM head: 8-bit weights keep those in bf16 unless asked. `attention` as
  `jaxpp.LLM(attention=...)` takes it: XLA's prefill attention holds [T, T] f32 scores.
  With dp replicas a device holds its replica's weights and its share of the sequences.
  """
  layout, workload = one_replica(layout, workload)
  part = layers_per_chunk(cfg, layout, hw)
  eb = bytes_per_param if embed_bytes_per_param is None else embed_bytes_per_param
  D, V, tp, m, a = cfg.hidden_size, cfg.vocab_size, layout.tp, layout.m, assume.dtype_bytes
  held = layout.virtual_stages * part.max_layers  # padded: every device holds the longest
  head = 0 if cfg.tie_word_embeddings else head_params_per_device(cfg, tp)
  weights = bytes_per_param * held * block_params_per_device(cfg, tp) + eb * (V * D + head) + 4 * D
  T = workload.prefill_len
  mp = layout.prefill_m(workload.concurrency)
  bp = workload.rows(mp)  # rows of a prefill micro-batch
  kv = workload.kv_positions(m) * held * kv_bytes_per_token_layer(
      cfg, tp, workload.kv_element_bytes(cfg.head_dim, a))
  scores = 0 if kernels(cfg, layout, attention).prefill else (
      bp * cfg.num_heads / tp * T * T * assume.score_bytes)
  qkv_ffn = ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
             + 2 * cfg.intermediate_size) / tp
  activations = (mp * bp * T * D * a  # the prefill inbox: one [bp, T, D] per micro-batch
                 + bp * T * (assume.activation_width * D + qkv_ffn) * a  # one layer, live
                 + scores  # XLA's [bp, N/tp, T, T] attention scores
                 + mp * bp * head_params_per_device(cfg, tp) / D * 4)  # f32 last logits
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
    if layout_problem(cfg, layout, hw) is None and memory_per_stage(
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
            embed_bytes_per_param: float | None = None, attention: str = "auto") -> Prediction:
  """Prefill (compute bound) and decode (weight + KV reads, fitted bandwidth) rates;
  `attention` as `jaxpp.LLM(attention=...)` takes it. dp replicas each run their share of
  the sequences side by side: rates add up, per-step times stay one replica's."""
  if layout.dp > 1:
    replica, share = one_replica(layout, workload)
    one = predict(cfg, replica, share, hw, bytes_per_param, assume, embed_bytes_per_param,
                  attention)
    n = workload.concurrency / share.concurrency  # busy replicas' worth of sequences
    return dataclasses.replace(
        one, prefill_tokens_per_s=n * one.prefill_tokens_per_s,
        decode_tokens_per_s=n * one.decode_tokens_per_s,
        total_tokens_per_s=n * one.total_tokens_per_s,
        output_tokens_per_s=n * one.output_tokens_per_s)
  part = layers_per_chunk(cfg, layout, hw, attention)
  eb = bytes_per_param if embed_bytes_per_param is None else embed_bytes_per_param
  w, tp, m, a = workload, layout.tp, layout.m, assume.dtype_bytes
  D, NH = cfg.hidden_size, cfg.num_heads * cfg.head_dim
  blk, head = block_params_per_device(cfg, tp), head_params_per_device(cfg, tp)
  last = len(part.counts) - 1
  b, T = w.rows(m), w.prefill_len
  context = w.input_len + w.output_len / 2  # the mean cached positions a decode step reads
  ker = kernels(cfg, layout, attention)
  fused = ker.decode  # it reads only those; XLA as kv_read says
  ctx = w.cache_len if assume.kv_read == "max_len" and not fused else context
  overhead = assume.kernel_layer_overhead_s if fused else assume.layer_overhead_s
  block_bytes = decode_weight_bytes(bytes_per_param, a, ker.weights8, assume)
  kv_elem = w.kv_element_bytes(cfg.head_dim, a)
  # an untied 8-bit head runs in the kernel with the blocks; a tied one (the embedding) never
  head_bytes = decode_weight_bytes(eb, a, ker.weights8 and not cfg.tie_word_embeddings,
                                   assume)

  def decode_round_s(rows: int) -> float:
    chunk_s = []
    for c, n in enumerate(part.counts):
      head_c = head if c == last else 0  # the last chunk also runs the LM head
      stream = hw.hbm_bandwidth * assume.decode_efficiency
      # The weight GEMMs and attention are separate kernels, each bound by its own bytes or
      # FLOPs: at hundreds of rows the GEMMs turn compute bound while attention streams KV.
      gemm_s = max((block_bytes * n * blk + head_bytes * head_c) / stream,
                   2 * rows * (n * blk + head_c) / (hw.matmul_flops * assume.prefill_efficiency))
      attn_s = max(rows * ctx * n * kv_bytes_per_token_layer(cfg, tp, kv_elem) / stream,
                   4 * rows * ctx * n * NH / tp / hw.matmul_flops)
      chunk_s.append(gemm_s + attn_s + n * overhead
                     + n * 2 * _allreduce_s(rows * D * a, tp, hw, assume))
    return _round_s(chunk_s, layout, _send_s(rows * D * a, layout, hw, assume), m)

  dec_bubble = formula_bubble(layout.pp, layout.virtual_stages, m, w.decode_chunk)
  step = decode_round_s(b) / (1 - dec_bubble)

  flops_s = hw.matmul_flops * assume.prefill_efficiency
  mp = layout.prefill_m(w.concurrency)
  bp = w.rows(mp)  # rows of a prefill micro-batch
  if kernels(cfg, layout, attention).prefill:  # causal half, at the kernel's share
    attn_s = 2 * bp * T * T * NH / tp / (hw.matmul_flops * assume.prefill_attention_efficiency)
  else:  # XLA's einsums and f32 softmax over the whole [T, T]
    attn_s = 4 * bp * T * T * NH / tp / (hw.matmul_flops * assume.xla_attention_efficiency)
  chunk_s = [2 * bp * T * n * blk / flops_s + n * attn_s
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
