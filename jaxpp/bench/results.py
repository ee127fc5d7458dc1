"""The bench's rows as a Markdown table, in the order inference servers report them."""

from __future__ import annotations


def markdown(rows: list[dict], header: str) -> str:
  """One row a measured run; a missing figure (a baseline without a bubble) reads –."""
  cols = [("layout", "{}"), ("quant", "{}"), ("attention", "{}"), ("block_size", "{}"),
          ("max_live", "{}"),
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
    lines.append("| " + " | ".join("–" if r.get(c) is None else f.format(r[c])
                                   for c, f in cols) + " |")
  return "\n".join(lines)
