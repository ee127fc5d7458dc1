"""Trains the byte-level BPE tokenizer of `models/harbor-tiny` on synthetic support tickets.

    python tools/train_tokenizer.py --out models/harbor-tiny/tokenizer.json

The corpus is `--count` tickets from `tools/make_tickets.py` (seed `--seed`, 1000 by default so
it shares no ticket stream with `data/tickets.jsonl`'s seed 0), each laid out exactly as the
model is trained on it: "Ticket:\\n{text}\\nSummary: {summary}". Special tokens `<unk>`, `<s>`,
`</s>` get ids 0, 1, 2 (the Llama convention) and the post-processor prepends `<s>`.

Deterministic: the ticket stream is seeded and the trainer runs single-threaded, so the merges
do not depend on how rayon splits the word counts.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import random

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"

from absl import app, flags  # noqa: E402

# The demo checkpoint's BPE recipe (byte-level, <unk>/<s>/</s>, BOS post-processor) is ours.
from make_demo_checkpoint import train_tokenizer  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
PROMPT_TEMPLATE = "Ticket:\n{text}\nSummary:"  # configs/harbor.py's job.prompt_template


def make_tickets_module():
  """tools/make_tickets.py imported as a module (tools/ is not a package)."""
  spec = importlib.util.spec_from_file_location("make_tickets", REPO / "tools" / "make_tickets.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def generate_tickets(count: int, seed: int) -> list[dict]:
  """The same tickets as `make_tickets.py --count count --seed seed` writes."""
  mt = make_tickets_module()
  r = random.Random(seed)
  return [mt.ticket(r, i + 1) for i in range(count)]


def training_text(t: dict) -> str:
  return PROMPT_TEMPLATE.format(text=t["text"]) + " " + t["summary"]


FLAGS = flags.FLAGS


def define_flags() -> None:  # only when run as a script: tools/train.py imports this module
  flags.DEFINE_integer("count", 2000, "tickets in the corpus")
  flags.DEFINE_integer("seed", 1000, "make_tickets seed of the corpus")
  flags.DEFINE_integer("vocab_size", 1536, "BPE vocabulary size, special tokens included")
  flags.DEFINE_string("out", str(REPO / "models" / "harbor-tiny" / "tokenizer.json"),
                      "where to write tokenizer.json")


def main(argv):
  del argv
  tok = train_tokenizer([training_text(t) for t in generate_tickets(FLAGS.count, FLAGS.seed)],
                        FLAGS.vocab_size)
  out = pathlib.Path(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tok.save(str(out))
  print(f"wrote {out}: {tok.get_vocab_size()} tokens")


if __name__ == "__main__":
  define_flags()
  app.run(main)
