"""jaxpp: pipeline-parallel LLM inference on JAX/XLA.

`jaxpp.LLM(checkpoint).generate(prompts)` is the front door; the pieces underneath
(model, checkpoint loading, sampling, generation programs) are importable on their own.
"""

from jaxpp import mesh
from jaxpp.errors import JaxppError
from jaxpp.llm import LLM, Completion

__all__ = ["LLM", "Completion", "JaxppError"]
__version__ = "0.1.0"
