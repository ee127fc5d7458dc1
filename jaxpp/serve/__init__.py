"""The serve wing: requests through a pipeline's programs.

`engine.py` (continuous batching: slots per micro-batch, admission, priority reserve,
prefill into free slots, the decode ring), `stats.py` (what it measures) and `reference.py`
(the single-device programs every layout must reproduce, and the GSPMD baseline's loop).
The engine takes a pipeline and its weights, not the `jaxpp.LLM` built on top of it.
"""
