"""What a layout is: one frozen value, its name, its rules and its layer split.

A `Layout` is how one model is spread over devices and scheduled: `dp` replicas of a
`pp` x `tp` mesh, `virtual_stages` layer chunks per device, `microbatches` in the decode
ring, `prefill_microbatches` for a prefill of every slot, and how layers split over chunks.
The runtime (`pipeline.Pipeline`), the job's config, the bench and the planner all take this
one value, so a rule changed here changes everywhere and the planner sizes exactly the
layout that runs.

Names: `pp4tp2v2m8p32` (pp 4, tp 2, 2 virtual stages, 8 decode micro-batches, 32 prefill
micro-batches), `dp2pp2tp2`; every part is optional (`pp4` is `pp4tp1`) and left out of the
printed name when it is the default. The layer split is not part of the name.

`problem(config)` holds every rule jaxpp has for a layout on a model, as one line naming
what is wrong; `check(config)` raises it. Device counts are the mesh's business
(`mesh.make_mesh`), hardware limits the planner's.
"""

from __future__ import annotations

import dataclasses
import re

from jaxpp.errors import JaxppError
from jaxpp.model.config import LlamaConfig
from jaxpp.parallel import partition as partition_lib
from jaxpp.parallel.schedule import prefill_microbatches

SPLITS = ("even", "balanced")  # or explicit per-chunk counts like "21,20,20,19"
_NAME = re.compile(r"(?:dp(\d+))?(?:pp(\d+))?(?:tp(\d+))?(?:v(\d+))?(?:m(\d+))?(?:p(\d+))?")


@dataclasses.dataclass(frozen=True)
class Layout:
  """One model replica's mesh and schedule, and how many replicas; see the module."""

  pp: int = 1
  tp: int = 1
  _: dataclasses.KW_ONLY
  virtual_stages: int = 1
  microbatches: int = 0  # 0 = pp: the fewest that keep the decode ring full
  prefill_microbatches: int = 0  # 0 = schedule.prefill_microbatches's default
  layer_split: str = "even"  # "even", "balanced" or explicit counts "21,20,20,19"
  dp: int = 1

  @classmethod
  def parse(cls, text: str, **fields) -> Layout:
    """`pp4tp2v2m8p32`-style name -> Layout; `fields` (e.g. layer_split) fill the rest."""
    m = _NAME.fullmatch(text.strip())
    if not text.strip() or not m:
      raise JaxppError(f"layout {text!r} is not of the form [dpN]ppXtpY[vZ][mW][pN]")
    dp, pp, tp, v, mb, pm = (int(g) if g else None for g in m.groups())
    named = dict(dp=dp, pp=pp, tp=tp, virtual_stages=v, microbatches=mb,
                 prefill_microbatches=pm)
    return cls(**(fields | {k: x for k, x in named.items() if x is not None}))

  @classmethod
  def of(cls, layout: Layout | str) -> Layout:
    """A Layout as given, or parsed from its name."""
    return layout if isinstance(layout, Layout) else cls.parse(layout)

  @property
  def name(self) -> str:
    """The layout's name; `Layout.parse(name)` gives it back (less the layer split)."""
    return ((f"dp{self.dp}" if self.dp != 1 else "") + f"pp{self.pp}tp{self.tp}"
            + (f"v{self.virtual_stages}" if self.virtual_stages != 1 else "")
            + (f"m{self.microbatches}" if self.microbatches not in (0, self.pp) else "")
            + (f"p{self.prefill_microbatches}" if self.prefill_microbatches else ""))

  def __str__(self) -> str:
    return self.name + ("" if self.layer_split == "even" else f" ({self.layer_split} split)")

  @property
  def m(self) -> int:
    """Micro-batches of the decode ring."""
    return self.microbatches or self.pp

  @property
  def devices(self) -> int:
    return self.dp * self.pp * self.tp

  def for_devices(self, n: int) -> Layout:
    """This layout on n devices: dp = 0 takes as many replicas as fit (n / (pp*tp)); any
    other count that does not use every device is a one-line error naming the nearest
    layouts that would."""
    replica = self.pp * self.tp
    if min(self.pp, self.tp) < 1 or self.dp < 0:
      raise JaxppError(f"pp={self.pp}, tp={self.tp} must be >= 1 and dp={self.dp} >= 0 "
                       "(0 = as many replicas as fit)")
    if self.dp == 0 and n % replica == 0:
      return dataclasses.replace(self, dp=n // replica)
    if self.devices == n:
      return self
    what = (f"replicas of pp{self.pp}tp{self.tp} ({replica} devices) cannot fill {n} devices"
            if self.dp == 0 else f"layout {self.name} uses {self.devices} of {n} devices")
    raise JaxppError(f"{what}; layouts that use all {n}: "
                     f"{', '.join(nearest_layouts(n, self.pp, self.tp))} (dp=0: as many "
                     "replicas as fit)")

  def prefill_m(self, slots: int | None = None) -> int:
    """Micro-batches a prefill of every slot is cut into (at most one per slot)."""
    return prefill_microbatches(self.prefill_microbatches, self.pp, self.m, slots)

  # --- rules ------------------------------------------------------------------------------

  def problem(self, config: LlamaConfig) -> str | None:
    """Why jaxpp cannot run this layout for `config`, in one line, or None."""
    pp, tp, v = self.pp, self.tp, self.virtual_stages
    for what, n in (("pp", pp), ("tp", tp), ("dp", self.dp), ("virtual_stages", v)):
      if n < 1:
        return f"{what}={n} must be >= 1"
    for what, n in (("microbatches", self.microbatches),
                    ("prefill_microbatches", self.prefill_microbatches)):
      if n < 0:
        return f"{what}={n} must be >= 0 (0 = the default)"
    for what, n in (("num_attention_heads", config.num_heads),
                    ("intermediate_size", config.intermediate_size)):
      if n % tp:
        return f"tp={tp} does not divide {what}={n}; choose tp among the divisors of {n}"
    K = config.checkpoint_kv_heads
    if K % tp and tp % K:  # tp > K replicates each kv head tp / K times (for_tp)
      return (f"tp={tp} neither divides num_key_value_heads={K} nor is a multiple of it "
              "(beyond the kv heads each is replicated tp/K times)")
    if pp * v > config.num_layers:
      return (f"{config.num_layers} layers cannot fill pp*virtual_stages={pp * v} chunks "
              "(each chunk needs at least one layer)")
    if pp > 1 and self.m < pp:
      return (f"microbatches={self.m} < pp={pp}: the decode ring needs at least pp "
              "micro-batches in flight")
    if v > 1 and self.prefill_m() < pp:
      return (f"prefill_microbatches={self.prefill_m()} < pp={pp}: virtual_stages > 1 "
              "(interleaving) needs at least pp micro-batches in flight")
    try:
      self.partition(config)
    except JaxppError as e:
      return str(e)
    return None

  def check(self, config: LlamaConfig) -> Layout:
    """This layout, or a JaxppError naming the first rule it breaks."""
    problem = self.problem(config)
    if problem:
      raise JaxppError(f"layout {self.name}: {problem}")
    return self

  def partition(self, config: LlamaConfig) -> partition_lib.Partition:
    """Layers per chunk, as `layer_split` asks.

    "balanced" minimises the costliest chunk counted in parameters one device reads per
    decode step: its share of each block's weights, plus the LM head on the last chunk. The
    embedding costs no chunk anything: every device holds it, and a lookup reads only the
    rows of the batch's tokens.
    """
    L, pp, v = config.num_layers, self.pp, self.virtual_stages
    if self.layer_split == "even":
      return partition_lib.even(L, pp, v)
    if self.layer_split == "balanced":
      return partition_lib.balanced(L, pp, v,
                                    layer_cost=block_params_per_device(config, self.tp),
                                    head_cost=head_params_per_device(config, self.tp))
    if re.fullmatch(r"[\d,\s]+", self.layer_split):
      return partition_lib.explicit(self.layer_split, L, pp, v)
    raise JaxppError(f"layer_split={self.layer_split!r} is not one of {', '.join(SPLITS)} "
                     "or per-chunk counts like 21,20,20,19")


# --- what one device of a stage holds and reads ---------------------------------------------


def vocab_sharded_head(config: LlamaConfig, tp: int) -> bool:
  """Whether the LM head is split over tp by vocabulary (when tp divides V and the head is
  its own weight); a tied embedding, or a V that tp does not divide, stays whole."""
  return not config.tie_word_embeddings and config.vocab_size % tp == 0


def block_params_per_device(config: LlamaConfig, tp: int) -> float:
  """Params of one block on one device: projections split over tp, the two norms whole,
  kv heads replicated where tp exceeds them (`LlamaConfig.for_tp`)."""
  norms = 2 * config.hidden_size
  return (config.for_tp(tp).block_param_count() - norms) / tp + norms


def head_params_per_device(config: LlamaConfig, tp: int) -> float:
  """Params the logits read on one device (the head, or the tied embedding)."""
  whole = config.vocab_size * config.hidden_size
  return whole / tp if vocab_sharded_head(config, tp) else whole


def nearest_layouts(n: int, pp: int, tp: int) -> list[str]:
  """Names of layouts that use exactly n devices, closest to pp x tp first: replicas of it,
  then the same tp with another pp (dp = 1), then the same pp with another tp."""
  out = []
  if n % (pp * tp) == 0:
    out.append(Layout(pp, tp, dp=n // (pp * tp)).name)
  if n % tp == 0:
    out.append(Layout(n // tp, tp).name)
  if n % pp == 0:
    out.append(Layout(pp, n // pp).name)
  out.append(Layout(1, 1, dp=n).name)
  return list(dict.fromkeys(out))[:3]

