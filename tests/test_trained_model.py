"""The shipped trained model `models/harbor-tiny` (tools/train.py; docs/training.md).

(a) it summarises held-out tickets: category and product right on a sample;
(b) transformers loads the same directory and greedy-decodes the same tokens as jaxpp;
(c) training is reproducible: the same seed gives the same losses.
"""

from __future__ import annotations

import importlib
import pathlib
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "harbor-tiny"
EVAL_SEED = 3000  # held out: training uses 1001, the tokenizer 1000, data/tickets.jsonl 0

sys.path.insert(0, str(REPO / "tools"))
train = importlib.import_module("train")


@pytest.fixture(scope="module")
def held_out():
  return train.train_tokenizer.generate_tickets(40, EVAL_SEED)


def test_accuracy_on_held_out_tickets(held_out):
  result = train.evaluate(MODEL, held_out, batch=20)
  assert result["category"] >= 0.9, result
  assert result["product"] >= 0.8, result


def test_transformers_greedy_matches_jaxpp(held_out):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer

  import jaxpp
  tok = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
  prompts = [train.prompt_ids(tok, t["text"], 200) for t in held_out[:3]]
  ours = jaxpp.LLM(MODEL, dtype="float32", max_len=256).generate(prompts, max_new_tokens=24)
  hf = transformers.LlamaForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32).eval()
  eos = tok.token_to_id("</s>")
  for p, c in zip(prompts, ours):
    with torch.no_grad():
      out = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                        eos_token_id=eos, pad_token_id=eos)
    theirs = out[0, len(p):].tolist()
    assert c.token_ids == theirs, (c.token_ids, theirs)


def test_training_is_reproducible(held_out):
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
  cfg = train.TrainConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                          max_len=96, buckets=(96,), batch_size=4, steps=4, warmup_steps=1,
                          seed=7, log_every=100)
  runs = [train.train(cfg, held_out, tok, log=lambda s: None)[2] for _ in range(2)]
  assert runs[0] == runs[1]
  assert all(np.isfinite(runs[0])) and runs[0][-1] < runs[0][0]
