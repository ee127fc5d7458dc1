"""The bench's rows as a Markdown table, in the order inference servers report them."""

from __future__ import annotations

# A run's knobs that a bench call can list (`--kv_grow=false,true`): a column each only when
# the rows differ in it, so a table of runs says what set them apart and no more.
KNOBS = ("max_num_seqs", "kv_dtype", "prefix_cache", "prefill_chunk", "kv_grow")
# The paged cache's report (`kv_cache` in a row), a column each when some row is paged.
KV_REPORT = (("peak_blocks", "{:,}"), ("preemptions", "{:,}"), ("prefix_hit_tokens", "{:,}"),
             ("decode_rows", "{:.0f}"))


def markdown(rows: list[dict], header: str) -> str:
  """One row a measured run; a missing figure (a baseline without a bubble) reads –."""
  measured = [r for r in rows if "error" not in r]
  knobs = [(k, "{}") for k in KNOBS if len({str(r.get(k)) for r in measured}) > 1]
  paged = any(r.get("kv_cache") for r in measured)
  cols = [("layout", "{}"), ("quant", "{}"), ("attention", "{}"), ("block_size", "{}"),
          *knobs, ("max_live", "{}"), *(KV_REPORT if paged else ()),
          ("weight_gb_per_device", "{:.1f}"), ("requests_per_second", "{:.2f}"),
          ("total_tokens_per_second", "{:,.0f}"), ("output_tokens_per_second", "{:,.0f}"),
          ("tokens_per_second_per_gpu", "{:,.0f}"), ("prefill_tokens_per_second", "{:,.0f}"),
          ("decode_tokens_per_second", "{:,.0f}"), ("decode_hbm_gbps_per_gpu", "{:,.0f}"),
          ("decode_hbm_roofline", "{:.0%}"), ("prefill_matmul_roofline", "{:.0%}"),
          ("bubble_schedule", "{:.1%}"), ("bubble_measured", "{:.1%}"),
          ("compile_seconds", "{:.0f}")]
  lines = [header, "", "| " + " | ".join(c for c, _ in cols) + " |",
           "|" + "---|" * len(cols)]
  for r in rows:
    if "error" in r:  # a layout that failed (bench.suite): its error across the figures
      cells = [str(r.get(c, "")) for c, _ in cols[:3]] + [f"error: {r['error']}"]
      lines.append("| " + " | ".join(cells + [""] * (len(cols) - 4)) + " |")
      continue
    figures = {**(r.get("kv_cache") or {}), **r}
    lines.append("| " + " | ".join("–" if figures.get(c) is None else f.format(figures[c])
                                   for c, f in cols) + " |")
  return "\n".join(lines)
