"""`python -m jaxpp.plan`: the planner's command line (flags in, Markdown and JSON out).

The model, the formulas and the formatting are `jaxpp/plan.py`; this module only turns flags
into its arguments. Flags are defined when the command runs, never on import, so importing
the library defines no absl flags.
"""

from __future__ import annotations

import sys

from jaxpp import presets
from jaxpp.errors import JaxppError
from jaxpp.model.decode_attention import CHOICES as CHOICES_ATTENTION
from jaxpp.model.quant import MODES as MODES_QUANT
from jaxpp.plan import MODES, format_plan, plan_json, recommend
from jaxpp.presets import Assumptions, Hardware, Workload



def _define_flags() -> None:
  """Defined only when run as a program: importing the library must not define flags."""
  from absl import flags as f
  f.DEFINE_string("model", "llama3-70b", f"Preset ({', '.join(presets.MODELS)}) or a HF "
                  "config.json / checkpoint directory.")
  f.DEFINE_string("hardware", "h100", f"Preset: {', '.join(presets.HARDWARE)}.")
  f.DEFINE_integer("devices", 4, "Devices of one replica; every pp x tp = devices is sized.")
  f.DEFINE_enum("mode", "batch", MODES, "batch: most tokens/s; interactive: least latency.")
  f.DEFINE_float("bytes_per_param", 2, "Bytes per weight when not quantised: 2 for bf16.")
  f.DEFINE_enum("quant", "none", MODES_QUANT, "8-bit block weights (1 byte each).")
  f.DEFINE_bool("quant_embed", False, "With --quant, the embedding and LM head in 8 bits too.")
  f.DEFINE_integer("virtual_stages", 1, "Layer chunks per device (interleaving).")
  f.DEFINE_integer("microbatches", 0, "Micro-batches in flight; 0 = pp.")
  f.DEFINE_integer("prefill_microbatches", 0, "Micro-batches of a prefill; 0 = 8 per stage "
                   "(at most concurrency).")
  f.DEFINE_enum("layer_split", "even", ("even", "balanced"), "How layers split over chunks.")
  f.DEFINE_enum("attention", "auto", CHOICES_ATTENTION, "Decode attention as "
                "jaxpp.LLM takes it; auto: the fused kernel at tp=1.")
  f.DEFINE_string("json", "", "Also write the plan as JSON to this path.")
  define = {float: f.DEFINE_float, int: f.DEFINE_integer, str: f.DEFINE_string}
  for name, field in Workload.__dataclass_fields__.items():
    f.DEFINE_integer(name, field.default, f"Workload.{name} (jaxpp/presets.py).")
  for name, field in Assumptions.__dataclass_fields__.items():
    define[type(field.default)](name, field.default, f"Assumptions.{name} (docs/planner.md).")
  for name, field in Hardware.__dataclass_fields__.items():
    if name != "name":  # None: keep the preset's figure
      define[float if field.type == "float" else int](name, None, f"Override Hardware.{name}.")


def main(argv: list[str]) -> None:
  """Flags -> recommend -> Markdown on stdout (and JSON); bad input: one error line, exit 1."""
  from absl import app, flags
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


def run() -> None:
  """Defines the flags and runs `main` under absl (the entry point of `python -m jaxpp.plan`)."""
  from absl import app
  _define_flags()
  app.run(main)
