"""The bench wing: `python -m jaxpp.bench`, layouts measured against rooflines and baselines.

`__main__.py` (flags), `suite.py` (`BenchOptions`, every layout of a run), `measure.py`
(one layout: warm-up, timed run, rates), `random_weights.py` (a shape's weights made on the
devices), `requests.py` (fixed-length or JSONL requests), `baseline_tp.py` (plain GSPMD
tensor parallelism), `baseline_hf.py` (transformers' device_map="auto"), `results.py`,
`plots.py` and `trace_summary.py` (profiles summed per XLA op). docs/benchmarks.md holds
what it measured.
"""
