"""The shipped demo checkpoint: reproducible from its script, and a real HF Llama checkpoint.

transformers + torch are the reference: if `LlamaForCausalLM` loads the files and its greedy
tokens equal jaxpp's, both the file format and jaxpp's reading of it are right.
"""

import hashlib
import pathlib
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors import safe_open

import jaxpp
from jaxpp.load import checkpoint
from jaxpp.model import params as params_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo-llama"
PROMPTS = [
    "Ticket:\nI was charged twice for my Pro plan this month.\nSummary:",
    "Hello team, CloudSync Pro crashes on macOS 14 with \"Error 502: Bad Gateway\".",
]
NEW_TOKENS = 16


def sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def test_script_reproduces_the_committed_files(tmp_path):
  out = tmp_path / "demo"
  subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_checkpoint.py"), "--out",
                  str(out)], check=True, capture_output=True, timeout=300)
  shipped = {p.name: sha256(p) for p in sorted(DEMO.iterdir())}
  rebuilt = {p.name: sha256(p) for p in sorted(out.iterdir())}
  assert rebuilt == shipped


def test_tensors_match_the_param_layout():
  cfg = checkpoint.load_config(DEMO)
  want = {}
  for path in params_lib.leaf_shapes(cfg):  # the leaves this (Llama) config has
    src = params_lib.HF_SOURCES[path]
    for i in range(cfg.num_layers if src.stacked else 1):
      want.update({name.format(i=i): shape
                   for name, shape in zip(src.names, params_lib.hf_shapes(path, cfg))})
  with safe_open(str(DEMO / "model.safetensors"), framework="numpy") as f:
    got = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
  assert got == want


@pytest.fixture(scope="module")
def hf_model():
  return transformers.LlamaForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm():
  return jaxpp.LLM(DEMO, dtype="float32", max_len=128)


def test_transformers_tokenizer_agrees(llm):
  tok = transformers.AutoTokenizer.from_pretrained(DEMO)
  for p in PROMPTS:
    assert tok(p)["input_ids"] == llm.tokenizer.encode(p)


def test_greedy_matches_transformers(hf_model, llm):
  ours = llm.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
  for prompt, completion in zip(PROMPTS, ours):
    ids = llm.tokenizer.encode(prompt)
    assert ids[0] == llm.config.bos_token_id
    with torch.no_grad():
      out = hf_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=llm.config.eos_token_ids[0])
    assert completion.token_ids == out[0, len(ids):].tolist()
    assert completion.prompt_tokens == len(ids)
