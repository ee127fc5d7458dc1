"""`python -m jaxpp.plan`: the planner's command line (flags in, Markdown and JSON out).

`python -m jaxpp.plan --model=llama3-70b --hardware=h100 --devices=4` prints, for every
`pp x tp` layout of the devices, each device's memory and the predicted rates, then picks
one for the workload (docs/planner.md). The formulas are `estimate.py`, the choice and its
formatting `recommend.py`; this module only turns flags into their arguments.
"""

from __future__ import annotations

import sys

from absl import app, flags

from jaxpp.errors import JaxppError
from jaxpp.model.attention_choice import CHOICES as ATTENTION_CHOICES
from jaxpp.model.quant import FORMATS as QUANT_FORMATS
from jaxpp.parallel.layout import SPLITS
from jaxpp.plan import presets
from jaxpp.plan.inputs import Assumptions, Workload
from jaxpp.plan.presets import Hardware
from jaxpp.plan.recommend import MODES, format_plan, plan_json, recommend


def define_flags() -> None:
  """The planner's flags (defined only when run: importing jaxpp defines no flags)."""
  f = flags
  f.DEFINE_string("model", "llama3-70b", f"Preset ({', '.join(presets.MODELS)}) or a HF "
                  "config.json / checkpoint directory.")
  f.DEFINE_string("hardware", "h100", f"Preset: {', '.join(presets.HARDWARE)}.")
  f.DEFINE_integer("devices", 4, "Devices of one replica; every pp x tp = devices is sized.")
  f.DEFINE_enum("mode", "batch", MODES, "batch: most tokens/s; interactive: least latency.")
  f.DEFINE_float("bytes_per_param", 2, "Bytes per weight when not quantised: 2 for bf16.")
  f.DEFINE_enum("quant", "none", QUANT_FORMATS, "8-bit block weights (1 byte each).")
  f.DEFINE_bool("quant_embed", False, "With --quant, the embedding and LM head in 8 bits too.")
  f.DEFINE_integer("virtual_stages", 1, "Layer chunks per device (interleaving).")
  f.DEFINE_integer("microbatches", 0, "Micro-batches in flight; 0 = pp.")
  f.DEFINE_integer("prefill_microbatches", 0, "Micro-batches of a prefill; 0 = 8 per stage "
                   "(at most concurrency).")
  f.DEFINE_string("layer_split", "even", f"How layers split over chunks: {', '.join(SPLITS)} "
                  "(Layout.partition) or per-chunk counts like 21,20,20,19.")
  f.DEFINE_enum("attention", "auto", ATTENTION_CHOICES, "Attention as "
                "jaxpp.LLM takes it; auto: the decode kernel at tp=1, cuDNN's flash prefill.")
  f.DEFINE_string("json", "", "Also write the plan as JSON to this path.")
  define = {float: f.DEFINE_float, int: f.DEFINE_integer, str: f.DEFINE_string}
  for name, field in Workload.__dataclass_fields__.items():
    define[type(field.default)](name, field.default, f"Workload.{name} (jaxpp/plan/inputs.py).")
  for name, field in Assumptions.__dataclass_fields__.items():
    define[type(field.default)](name, field.default, f"Assumptions.{name} (docs/planner.md).")
  for name, field in Hardware.__dataclass_fields__.items():
    if name != "name":  # None: keep the preset's figure
      define[float if field.type == "float" else int](name, None, f"Override Hardware.{name}.")


def main(argv: list[str]) -> None:
  """Flags -> recommend -> Markdown on stdout (and JSON); bad input: one error line, exit 1."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  F = flags.FLAGS
  given = lambda cls: {k: F[k].value for k in cls.__dataclass_fields__ if k != "name"}
  try:
    hw = presets.hardware(F.hardware, **given(Hardware))
    if F.quant_embed and F.quant == "none":
      raise JaxppError("--quant_embed needs --quant=int8 or --quant=fp8")
    block_bytes = 1 if F.quant != "none" else F.bytes_per_param
    plan = recommend(presets.model_config(F.model), F.devices, Workload(**given(Workload)), hw,
                     F.mode, block_bytes, Assumptions(**given(Assumptions)),
                     F.virtual_stages, F.microbatches, F.layer_split, model_name=F.model,
                     embed_bytes_per_param=1 if F.quant_embed else F.bytes_per_param,
                     prefill_microbatches=F.prefill_microbatches, attention=F.attention)
    if F.json:
      try:
        with open(F.json, "w") as out:
          out.write(plan_json(plan) + "\n")
      except OSError as e:
        raise JaxppError(f"--json={F.json}: cannot write ({e.strerror})") from None
  except JaxppError as e:
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    sys.exit(1)
  print(format_plan(plan))


if __name__ == "__main__":
  define_flags()
  app.run(main)
