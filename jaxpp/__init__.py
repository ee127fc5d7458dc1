"""jaxpp: pipeline-parallel LLM inference on JAX/XLA.

`jaxpp.LLM(checkpoint, layout="pp4tp2").generate(prompts)` is the front door. The wings
underneath follow the data path, each importable on its own: `model` (layer math,
parameters, sampling), `parallel` (layouts, meshes, schedules, the pipeline executor),
`load` (checkpoints, params cache, tokenizer), `serve` (the batch engine and the
single-device reference), `dist` (multi-process runs), `job` (the Harbor batch job),
`bench` and `plan`. docs/design.md draws the map.
"""

from jaxpp.errors import JaxppError
from jaxpp.llm import LLM, Completion
from jaxpp.parallel.layout import Layout

__all__ = ["LLM", "Completion", "JaxppError", "Layout"]
__version__ = "0.1.0"
