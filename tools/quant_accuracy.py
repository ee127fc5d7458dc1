"""8-bit weights against bf16 on the shipped model, on its 240 tickets and on long prompts.

    python tools/quant_accuracy.py --out=out/quant_accuracy

Why: tests/test_quant.py checks 8-bit weights on 40 short held-out prompts, and the issue
asked to "validate quantized PP paths against BF16 on representative long-context prompts":
does the error of 8-bit weights grow with context? On CPU, bf16 activations, for each weight
setting (bf16, int8, fp8, each also with the embedding/head in 8 bits; int8 and fp8 with
attention="kernel", which runs decode's 8-bit projections in int8_matmul's Pallas kernel,
interpreted here; fp32 as the scale of bf16's own rounding) this measures:

- the 240 shipped tickets (data/tickets.jsonl), cut as `tools/train.py` and the job cut
  them: category / product / exact accuracy (`train.evaluate`), greedy 32-token outputs
  identical to bf16's, and the next-token logits' relative L2 error against bf16
  (`LLM.prompt_logits`: ||x - bf16|| / ||bf16||);
- long prompts of `--long_len` tokens, each several shipped tickets concatenated (the model
  was trained on 256-token sequences; its context is 1,024): the logit error at every
  position, in position buckets, through the single-device reference forward
  (`serve/reference.forward_logits`, which every layout is tested to reproduce; prompt_logits
  gives only the last position), the last position's error through the pipeline
  (`LLM.prompt_logits`), and greedy agreement of 32 new tokens with bf16 (identical, mean
  common prefix, and bf16's top-2 logprob gap where they first differ: a near tie is
  rounding, a wide gap would be a real error);
- one pipeline layout (`--layout`, int8 on 8 virtual CPU devices): its long-prompt greedy
  tokens and last-position logits against the single-device int8 run.

Writes OUT/quant_accuracy.json and OUT/quant_accuracy.md and prints the tables.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before JAX starts: the pipeline layout needs 8 CPU devices
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

import train  # noqa: E402  (tools/train.py: prompt_ids, evaluate)

MODEL = REPO / "models" / "harbor-tiny"
TICKETS = REPO / "data" / "tickets.jsonl"
BUCKETS = (0, 256, 512, 768)  # starts of the position buckets of the long-prompt error
LAST = 64  # "the last positions" of a long prompt

# name -> jaxpp.LLM keywords, bf16 (the reference) first
SETTINGS = {
    "bf16": dict(dtype="bfloat16"),
    "fp32": dict(dtype="float32"),
    "int8": dict(dtype="bfloat16", quant="int8"),
    "int8+embed": dict(dtype="bfloat16", quant="int8", quant_embed=True),
    "fp8": dict(dtype="bfloat16", quant="fp8"),
    "fp8+embed": dict(dtype="bfloat16", quant="fp8", quant_embed=True),
    "int8 kernel": dict(dtype="bfloat16", quant="int8", attention="kernel"),
    "fp8 kernel": dict(dtype="bfloat16", quant="fp8", attention="kernel"),
    # the fp8 KV cache (per-token scales): only what reads the cache measures it, i.e. the
    # greedy outputs (the logit columns come from prefills, which read no cache)
    "fp8 cache": dict(dtype="bfloat16", kv_dtype="fp8"),
    "int8 + fp8 cache": dict(dtype="bfloat16", quant="int8", kv_dtype="fp8"),
}


# --- inputs ----------------------------------------------------------------------------------


def load_tickets(path=TICKETS) -> list[dict]:
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]


def long_prompts(tok, tickets: list[dict], n: int, length: int) -> list[list[int]]:
  """`n` prompts of exactly `length` tokens. Prompt k joins shipped tickets k*s, k*s+1, ...
  (s = len(tickets) // n, wrapping) with blank lines until they pass `length` tokens, and is
  cut by the training and job rule (`train.prompt_ids`: the start kept, the "\\nSummary:"
  cue re-appended). Equal lengths let the reference forward run them unpadded."""
  stride, out = max(len(tickets) // n, 1), []
  for k in range(n):
    parts, i = [], k * stride
    while len(tok.encode("\n\n".join(parts)).ids) <= length:
      parts.append(tickets[i % len(tickets)]["text"])
      i += 1
    out.append(train.prompt_ids(tok, "\n\n".join(parts), length))
    assert len(out[-1]) == length, len(out[-1])
  return out


# --- measures --------------------------------------------------------------------------------


def rel_l2(x, ref) -> float:
  """||x - ref|| / ||ref|| over every element."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def position_error(x, ref) -> tuple[np.ndarray, np.ndarray]:
  """Squared error and squared reference norm per position, summed over prompts and vocab,
  of logits [B, T, V]: bucket errors are sqrt(sum err / sum ref) over their positions."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return ((x - ref) ** 2).sum(axis=(0, 2)), (ref ** 2).sum(axis=(0, 2))


def bucket_errors(err2: np.ndarray, ref2: np.ndarray) -> dict[str, float]:
  T = len(err2)
  spans = {f"{a}-{b - 1}": (a, b) for a, b in zip(BUCKETS, BUCKETS[1:] + (T,)) if a < T}
  spans |= {"all": (0, T), f"last {LAST}": (T - LAST, T), "last": (T - 1, T),
            f"first {LAST}": (0, LAST)}
  return {k: float(np.sqrt(err2[a:b].sum() / ref2[a:b].sum())) for k, (a, b) in spans.items()}


def forward_logits(settings: dict, prompts: list[list[int]], batch: int = 8) -> np.ndarray:
  """f32[B, T, V]: every position's logits through the single-device reference, params in
  the plain [L, ...] layout quantised at load as the LLM quantises them."""
  import jax.numpy as jnp

  from jaxpp.load import checkpoint
  from jaxpp.model import quant
  from jaxpp.serve import reference
  cfg = checkpoint.load_config(MODEL)
  q = quant.Quant(settings.get("quant", "none"), settings.get("quant_embed", False))
  params = checkpoint.load_hf_params(MODEL, cfg, jnp.dtype(settings["dtype"]), quant=q)
  return np.concatenate([np.asarray(reference.forward_logits(
      cfg, params, jnp.asarray(prompts[i:i + batch], jnp.int32)), np.float32)
      for i in range(0, len(prompts), batch)])


def agreement(outs, refs) -> dict:
  """Greedy runs `outs` against `refs` (Completions, refs with logprobs=2): identical token
  lists, mean common prefix, and the refs' top-2 logprob gap at each first difference."""
  same, prefix, gaps = 0, [], []
  for o, r in zip(outs, refs):
    a, b = o.token_ids, r.token_ids
    j = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    same += a == b
    prefix.append(j)
    if j < min(len(a), len(b)) and r.top_logprobs and len(r.top_logprobs[j]) > 1:
      gaps.append(r.top_logprobs[j][0][1] - r.top_logprobs[j][1][1])
  return dict(identical=int(same), n=len(outs), mean_common_prefix=float(np.mean(prefix)),
              mean_length=float(np.mean([len(r.token_ids) for r in refs])),
              gaps_at_first_difference=[round(float(g), 4) for g in gaps])


# --- one setting -----------------------------------------------------------------------------


def measure(name: str, settings: dict, tickets, ticket_prompts, longs, ref, args,
            layout: str = "pp1tp1") -> tuple[dict, dict]:
  """(results, raw outputs) of one weight setting; against `ref` (bf16's raw outputs) where
  given. Kernel runs skip the logits: on CPU prefill runs no kernel, so they are XLA's."""
  import jaxpp
  t0 = time.perf_counter()
  kernel = settings.get("attention") == "kernel"
  llm = jaxpp.LLM(MODEL, max_len=args.context, layout=layout,
                  **({"attention": "xla"} | settings))
  res, raw = dict(llm=settings, layout=layout), {}
  if layout == "pp1tp1":  # the tickets, `args.slots` at a time (evaluate passes no slots)
    slots = types.SimpleNamespace(generate=functools.partial(llm.generate,
                                                             max_num_seqs=args.slots))
    ev = train.evaluate(MODEL, tickets, llm=slots, prompt_budget=args.prompt_budget,
                        max_new_tokens=args.new_tokens, batch=len(tickets))
    raw["texts"] = [o for _, o, _ in ev["rows"]]
    res["tickets"] = {k: ev[k] for k in ("n", "category", "product", "exact")}
    if not kernel:
      raw["ticket_logits"] = llm.prompt_logits(ticket_prompts)
    if ref:
      res["tickets"]["outputs_equal_bf16"] = sum(
          a == b for a, b in zip(raw["texts"], ref["texts"]))
      if not kernel:
        res["tickets"]["logit_error"] = rel_l2(raw["ticket_logits"], ref["ticket_logits"])
        res["tickets"]["first_token_equal_bf16"] = int(np.sum(
            raw["ticket_logits"].argmax(-1) == ref["ticket_logits"].argmax(-1)))
  raw["long"] = llm.generate(longs, max_new_tokens=args.new_tokens, max_num_seqs=len(longs),
                             logprobs=2)
  long = res["long"] = {}
  if not kernel:
    raw["long_last"] = llm.prompt_logits(longs)
  if layout == "pp1tp1" and not kernel:
    raw["long_logits"] = forward_logits(settings, longs)
    # the pipeline's last-position logits against the reference forward's: same weights,
    # a different program (bucketed prefill into the paged cache)
    long["pipeline_vs_forward_last"] = rel_l2(raw["long_last"], raw["long_logits"][:, -1])
    # the last position (the "\nSummary:" cue) against the average: a relative error there
    # divides by this norm
    norm2 = (raw["long_logits"].astype(np.float64) ** 2).sum(axis=(0, 2))
    long["last_position_logit_norm_vs_mean"] = float(np.sqrt(norm2[-1] / norm2.mean()))
  if ref:
    long["greedy_vs_bf16"] = agreement(raw["long"], ref["long"])
    if "long_logits" in raw:
      e2, r2 = position_error(raw["long_logits"], ref["long_logits"])
      long["logit_error"] = bucket_errors(e2, r2)
      long["logit_error_by_64"] = [round(float(np.sqrt(e2[i:i + 64].sum() /
                                                       r2[i:i + 64].sum())), 5)
                                   for i in range(0, len(e2), 64)]
      long["last_position_error_pipeline"] = rel_l2(raw["long_last"], ref["long_last"])
  res["seconds"] = round(time.perf_counter() - t0, 1)
  print(f"{name} ({layout}): {res['seconds']}s", flush=True)
  return res, raw


# --- report ----------------------------------------------------------------------------------


def pct(x, digits=2) -> str:
  return "-" if x is None else f"{100 * x:.{digits}f}%"


def gap_text(g: dict) -> str:
  return "-" if not g["gaps_at_first_difference"] else (
      f"{max(g['gaps_at_first_difference']):.3f}")


def markdown(out: dict) -> str:
  s, t, lg = out["settings"], out["tickets"], out["long"]
  rows = [f"Command: `{out['command']}` ({out['device']}, jax {out['jax']}, "
          f"{out['seconds']:.0f} s)", "",
          f"**{t['n']} shipped tickets** (prompts cut to {t['prompt_budget']} tokens, greedy "
          f"{t['new_tokens']} new tokens); logit error = ||logits - bf16's|| / ||bf16's|| "
          "of the next-token logits after each prompt (`LLM.prompt_logits`):", "",
          "| weights | category | product | exact | outputs = bf16 | first token = bf16 | "
          "logit error vs bf16 |", "|---|---|---|---|---|---|---|"]
  for name, r in s.items():
    k = r["tickets"]
    rows.append(f"| {name} | {pct(k['category'], 1)} | {pct(k['product'], 1)} | "
                f"{pct(k['exact'], 1)} | {k.get('outputs_equal_bf16', k['n'])} / {k['n']} | "
                f"{k.get('first_token_equal_bf16', '-')} | {pct(k.get('logit_error'))} |")
  names = [b for b in next(iter(
      r["long"]["logit_error"] for r in s.values() if "logit_error" in r["long"]))]
  cols = [b for b in names if b[0].isdigit()] + ["all", f"last {LAST}", "last"]
  rows += ["", f"**{lg['n']} long prompts of {lg['tokens']} tokens** (shipped tickets joined). "
           "Logit error vs bf16 at every position, by position bucket (single-device "
           "reference forward); at the last position through the pipeline "
           "(`LLM.prompt_logits`); and, for scale, the pipeline's last-position logits "
           "against the reference forward's with the same weights (two programs, one "
           "model):", "",
           "| weights | " + " | ".join(cols[:-1]) + " | last pos. | last pos. (pipeline) | "
           "pipeline vs "
           "reference, same weights |", "|---" * (len(cols) + 3) + "|"]
  for name, r in s.items():
    lo = r["long"]
    if "pipeline_vs_forward_last" not in lo:
      continue
    e = lo.get("logit_error", {})
    rows.append(f"| {name} | " + " | ".join(pct(e.get(c)) for c in cols) +
                f" | {pct(lo.get('last_position_error_pipeline'))} | "
                f"{pct(lo['pipeline_vs_forward_last'])} |")
  rows += ["", f"Greedy continuations of the long prompts (at most {lg['new_tokens']} new "
           "tokens, to EOS) against bf16's; gap = bf16's top-2 logprob gap (nats) at the "
           "first differing token, largest over the prompts that differ:", "",
           "| weights | greedy = bf16 | mean common prefix / bf16's mean length | gap |",
           "|---|---|---|---|"]
  for name, r in s.items():
    g = r["long"].get("greedy_vs_bf16")
    if g is not None:
      rows.append(f"| {name} | {g['identical']} / {g['n']} | {g['mean_common_prefix']:.1f} / "
                  f"{g['mean_length']:.1f} | {gap_text(g)} |")
  rows += ["", "**Against the same weights on one device (XLA)** (long prompts; kernel: "
           "decode's 8-bit projections in the Pallas kernel, interpreted on CPU; prefill "
           "runs no kernel on CPU, so its logits are XLA's):", "",
           "| run | against | tickets: outputs equal | long: greedy equal | mean common prefix "
           "/ length | gap | last-position logits, rel. diff. |", "|---|---|---|---|---|---|---|"]
  for c in out["checks"]:
    g = c["long_greedy"]
    rows.append(f"| {c['run']} | {c['against']} | {c.get('tickets_equal', '-')} | "
                f"{g['identical']} / {g['n']} | {g['mean_common_prefix']:.1f} / "
                f"{g['mean_length']:.1f} | {gap_text(g)} | "
                f"{pct(c.get('last_position_logit_diff'))} |")
  return "\n".join(rows) + "\n"


# --- entry point -----------------------------------------------------------------------------


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="out/quant_accuracy", help="output directory")
  p.add_argument("--settings", default=",".join(SETTINGS),
                 help="comma-separated names of SETTINGS (bf16 is always run)")
  p.add_argument("--layout", default="pp2tp2", help="pipeline layout checked in int8")
  p.add_argument("--long_prompts", type=int, default=24)
  p.add_argument("--long_len", type=int, default=896, help="tokens per long prompt")
  p.add_argument("--prompt_budget", type=int, default=224, help="ticket prompt tokens")
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--context", type=int, default=1024, help="max_len of every run")
  p.add_argument("--slots", type=int, default=64, help="sequences in flight (CPU's default "
                 "is 4 per micro-batch, which makes 240 tickets 60 rounds)")
  args = p.parse_args(argv)
  if args.long_len + args.new_tokens > args.context:
    p.error(f"--long_len + --new_tokens must fit --context={args.context}")

  import jax
  from tokenizers import Tokenizer
  t0 = time.perf_counter()
  tok = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
  tickets = load_tickets()
  ticket_prompts = [train.prompt_ids(tok, t["text"], args.prompt_budget) for t in tickets]
  longs = long_prompts(tok, tickets, args.long_prompts, args.long_len)
  names = ["bf16"] + [n for n in args.settings.split(",") if n and n != "bf16"]
  results, raw = {}, {}
  for name in names:
    ref = raw.get("bf16")
    results[name], raw[name] = measure(name, SETTINGS[name], tickets, ticket_prompts, longs,
                                       ref, args)
  checks = []
  for name in names:  # each kernel run against its XLA twin ("int8 kernel" -> "int8")
    xla = name.removesuffix(" kernel")
    if xla != name and xla in raw:
      same = sum(a == b for a, b in zip(raw[name]["texts"], raw[xla]["texts"]))
      checks.append(dict(run=f"{name} (pp1tp1)", against=f"{xla} (XLA)",
                         tickets_equal=f"{same} / {len(tickets)}",
                         long_greedy=agreement(raw[name]["long"], raw[xla]["long"])))
  if args.layout and "int8" in names:
    res, pipe = measure("int8", SETTINGS["int8"], tickets, ticket_prompts, longs, None, args,
                        layout=args.layout)
    checks.append(dict(run=f"int8 ({args.layout})", against="int8 (pp1tp1)",
                       long_greedy=agreement(pipe["long"], raw["int8"]["long"]),
                       last_position_logit_diff=rel_l2(pipe["long_last"],
                                                       raw["int8"]["long_last"]),
                       seconds=res["seconds"]))
  out = dict(command="python tools/quant_accuracy.py " + " ".join(sys.argv[1:] if argv is None
                                                                  else argv),
             device=f"{jax.devices()[0].platform}, {os.cpu_count()} cores", jax=jax.__version__,
             model=str(MODEL.relative_to(REPO)),
             tickets=dict(n=len(tickets), prompt_budget=args.prompt_budget,
                          new_tokens=args.new_tokens),
             long=dict(n=len(longs), tokens=args.long_len, new_tokens=args.new_tokens,
                       context=args.context),
             settings=results, checks=checks, seconds=time.perf_counter() - t0)
  d = pathlib.Path(args.out)
  d.mkdir(parents=True, exist_ok=True)
  (d / "quant_accuracy.json").write_text(json.dumps(out, indent=1) + "\n")
  table = markdown(out)
  (d / "quant_accuracy.md").write_text(table)
  print(table)
  return out


if __name__ == "__main__":
  main()
