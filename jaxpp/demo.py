"""The generation demo behind `python -m jaxpp.run`: JSONL of documents in, summaries out.

A stand-in for the batch job (which arrives with the engine): it reads every document,
fills the prompt template, makes ONE `LLM.generate` call for the whole batch and writes one
output line per document. Everything it needs comes from the run config, so the entry point
stays a flag parser and tests can call `run_demo` in-process with a shrunken config.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

import jax
import ml_collections

from jaxpp.errors import JaxppError
from jaxpp.llm import LLM, devices_summary


def read_documents(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Lines `{"id": ..., "text": ...}`; blank lines are skipped, ids must be unique."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise JaxppError(f"job input {p} does not exist")
  docs, seen = [], set()
  with open(p, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        doc = json.loads(line)
      except json.JSONDecodeError as e:
        raise JaxppError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
      if not isinstance(doc, dict) or "id" not in doc or not isinstance(doc.get("text"), str):
        raise JaxppError(f'{p}:{lineno}: expected an object with "id" and a string "text"')
      key = json.dumps(doc["id"])
      if key in seen:
        raise JaxppError(f"{p}:{lineno}: duplicate id {doc['id']!r}")
      seen.add(key)
      docs.append(doc)
  if not docs:
    raise JaxppError(f"job input {p} has no documents")
  return docs


def build_prompt(template: str, doc: dict[str, Any]) -> str:
  """Fills `{text}` (or any other field of the document) into the template."""
  try:
    return template.format(**doc)
  except KeyError as e:
    raise JaxppError(f"prompt_template names {{{e.args[0]}}}, which document "
                     f"{doc['id']!r} lacks") from None
  except (IndexError, ValueError) as e:
    raise JaxppError(f"prompt_template {template!r} is not a valid format string ({e})"
                     ) from None


def _check_layout(config: ml_collections.ConfigDict) -> None:
  """Replicas (dp > 1) arrive with the batch engine: refuse them rather than ignore them."""
  if config.mesh.dp != 1:
    raise JaxppError(f"mesh.dp={config.mesh.dp}: only 1 replica is available in this version")


def write_results(path: str | os.PathLike, rows: list[dict[str, Any]]) -> pathlib.Path:
  """Writes JSONL via a temporary file, so a crash never leaves a half-written output."""
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  os.replace(tmp, out)
  return out


def run_demo(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Summarises `config.job.input` into `config.job.output`; returns run statistics."""
  _check_layout(config)
  docs = read_documents(config.job.input)
  prompts = [build_prompt(config.job.prompt_template, d) for d in docs]

  start = time.perf_counter()
  sched = config.schedule
  llm = LLM(config.model.checkpoint, pp=config.mesh.pp, tp=config.mesh.tp,
            virtual_stages=sched.virtual_stages, microbatches=sched.microbatches or None,
            layer_split=sched.layer_split, dtype=config.model.dtype,
            max_len=config.engine.max_len, decode_chunk=sched.decode_chunk,
            devices=jax.devices())  # the job uses every device: pp*tp*dp must match
  loaded = time.perf_counter()
  s = config.sampling
  completions = llm.generate(prompts, max_new_tokens=s.max_new_tokens,
                             temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                             seed=s.seed)
  generated = time.perf_counter()

  rows = [dict(id=d["id"], summary=(c.text or "").strip(), finish_reason=c.finish_reason,
               prompt_tokens=c.prompt_tokens, completion_tokens=len(c.token_ids))
          for d, c in zip(docs, completions)]
  out = write_results(config.job.output, rows)
  completion_tokens = sum(r["completion_tokens"] for r in rows)
  generate_s = generated - loaded
  return dict(
      devices=devices_summary(),
      documents=len(rows),
      prompt_tokens=sum(r["prompt_tokens"] for r in rows),
      completion_tokens=completion_tokens,
      load_s=loaded - start,
      generate_s=generate_s,
      tokens_per_s=completion_tokens / generate_s if generate_s > 0 else 0.0,
      output=str(out),
  )


def format_stats(stats: dict[str, Any]) -> str:
  """The few lines the command prints when it is done."""
  return "\n".join([
      f"devices:   {stats['devices']}",
      f"documents: {stats['documents']} -> {stats['output']}",
      f"tokens:    {stats['prompt_tokens']} prompt, {stats['completion_tokens']} generated",
      f"wall:      load {stats['load_s']:.2f} s, generate {stats['generate_s']:.2f} s "
      f"(includes compilation)",
      f"speed:     {stats['tokens_per_s']:.1f} generated tokens/s",
  ])
