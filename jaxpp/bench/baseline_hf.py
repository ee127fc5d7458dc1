"""The naive layer-split pipeline: Hugging Face transformers with `device_map="auto"`.

What many people run when a model does not fit one GPU: accelerate places consecutive
decoder layers on consecutive GPUs and a forward pass walks them one device after another,
so only one GPU works at any moment (no micro-batches, no overlap). Requests run in static
waves of `max_num_seqs` through `model.generate` (greedy, left-padded, exactly
`output_len` new tokens: stop ids are ignored as the bench ignores them; with a length per
request, a wave runs to its longest and each row keeps its own).

It runs in a child process (`python -m jaxpp.bench.baseline_hf REQUEST RESULT`): torch and JAX
would compete for the same GPU memory, and JAX reserves most of each card the first time a
program touches it, so the bench runs this baseline before its own programs start.
Weights are random, placed exactly as `from_pretrained(..., device_map="auto")` places a
checkpoint, each tensor initialised on its own device (`load_model` is that call on a real
checkpoint; the tests use it to check the generation against jaxpp's).

`python -m jaxpp.bench --layouts=hf_auto,pp2tp1` puts it in the same table; it needs
`accelerate` (`pip install accelerate`), which nothing else in jaxpp uses.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile
import time

from jaxpp.errors import JaxppError

NAME = "hf_auto"


def parse(text: str) -> bool:
  """Whether a bench layout name is this baseline."""
  return text == NAME


def run(hf_config: dict, prompts: list[list[int]], *, output_len: int | list[int],
        max_num_seqs: int, dtype: str) -> dict:
  """Runs the baseline in a child process; returns `generate_waves`'s result."""
  with tempfile.TemporaryDirectory() as tmp:
    request, result = pathlib.Path(tmp, "request.json"), pathlib.Path(tmp, "result.json")
    request.write_text(json.dumps(dict(
        hf_config=hf_config, prompts=prompts, output_len=output_len,
        max_num_seqs=max_num_seqs, dtype=dtype)))
    proc = subprocess.run([sys.executable, "-m", "jaxpp.bench.baseline_hf", str(request),
                           str(result)], stderr=subprocess.PIPE, text=True)
    if proc.returncode:
      last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
      raise JaxppError(f"{NAME} baseline failed (exit {proc.returncode}): {last}")
    return json.loads(result.read_text())


def random_model(hf_config: dict, dtype):
  """A LlamaForCausalLM with random weights, laid out over the GPUs as device_map="auto"."""
  import accelerate
  import torch
  import transformers
  from accelerate.utils import get_balanced_memory, set_module_tensor_to_device

  config = transformers.LlamaConfig(**hf_config)
  with accelerate.init_empty_weights():
    model = transformers.LlamaForCausalLM(config)
  if torch.cuda.is_available():  # what from_pretrained does for "auto": balanced over GPUs
    split = dict(no_split_module_classes=model._no_split_modules, dtype=dtype)
    device_map = accelerate.infer_auto_device_map(
        model, max_memory=get_balanced_memory(model, **split), **split)
  else:
    device_map = {"": "cpu"}
  generator = torch.Generator().manual_seed(0)
  std = config.hidden_size ** -0.5
  for name, param in list(model.named_parameters()):
    device = _placement(device_map, name)
    if name.endswith("norm.weight"):
      value = torch.ones(param.shape, dtype=dtype, device=device)
    else:  # seeded on the host generator, drawn on the device: no host copy of the weights
      seed = int(torch.randint(2 ** 31, (1,), generator=generator))
      gen = torch.Generator(device=device).manual_seed(seed)
      value = torch.empty(param.shape, dtype=dtype, device=device).normal_(0, std,
                                                                           generator=gen)
    set_module_tensor_to_device(model, name, device, value=value)
  model.tie_weights()  # a tied head shares the embedding again after the replacement
  return accelerate.dispatch_model(model.eval(), device_map=device_map)


def load_model(checkpoint: str, dtype):
  """A checkpoint loaded the way people run it: `from_pretrained(device_map="auto")`."""
  import transformers
  return transformers.LlamaForCausalLM.from_pretrained(checkpoint, device_map="auto",
                                                       dtype=dtype).eval()


def _placement(device_map: dict, name: str):
  """The device of parameter `name` under an accelerate device map (longest prefix wins)."""
  best = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")),
             key=len)
  device = device_map[best]
  return f"cuda:{device}" if isinstance(device, int) else device


def generate_waves(model, prompts: list[list[int]], *, output_len: int | list[int],
                   max_num_seqs: int) -> dict:
  """Greedy `model.generate` over static waves; token ids and timings as the bench reads them.

  Each wave is also generated with one new token first: that call is the wave's prefill
  time, and the full call minus it is the decode time (`wall_seconds` counts only the full
  calls, which is the whole work). `output_len` is every prompt's new tokens or a list of
  each one's: a wave generates its longest and each row keeps (and counts) its own.
  """
  import torch

  lens = [output_len] * len(prompts) if isinstance(output_len, int) else list(output_len)

  devices = sorted({str(p.device) for p in model.parameters()})
  sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
  first_device = next(model.parameters()).device

  def call(wave, new_tokens):
    width = max(map(len, wave))
    ids = torch.zeros((len(wave), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(wave):  # left padding, as decoder-only generation expects
      ids[i, width - len(p):] = torch.tensor(p)
      mask[i, width - len(p):] = 1
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
      out = model.generate(input_ids=ids.to(first_device), attention_mask=mask.to(first_device),
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    sync()
    return out[:, width:].tolist(), time.perf_counter() - start

  call(prompts[:1], 2)  # warm-up: kernels, allocator
  result = dict(tokens=[], prefill_seconds=0.0, decode_seconds=0.0, wall_seconds=0.0,
                prompt_tokens=0, completion_tokens=0, devices=devices)
  for first in range(0, len(prompts), max_num_seqs):
    wave, wave_lens = prompts[first:first + max_num_seqs], lens[first:first + max_num_seqs]
    _, prefill = call(wave, 1)
    tokens, whole = call(wave, max(wave_lens))
    tokens = [row[:n] for row, n in zip(tokens, wave_lens)]
    result["tokens"] += tokens
    result["prefill_seconds"] += prefill
    result["decode_seconds"] += whole - prefill
    result["wall_seconds"] += whole
    result["prompt_tokens"] += sum(map(len, wave))
    result["completion_tokens"] += sum(map(len, tokens))
  return result


def main(argv: list[str]) -> int:
  import torch
  try:
    import accelerate  # noqa: F401  (device_map="auto" is accelerate's)
  except ImportError:
    print(f"error: the {NAME} baseline needs accelerate (pip install accelerate)",
          file=sys.stderr)
    return 2
  request_path, result_path = argv
  req = json.loads(pathlib.Path(request_path).read_text())
  dtype = dict(bfloat16=torch.bfloat16, float32=torch.float32)[req["dtype"]]
  model = random_model(req["hf_config"], dtype)
  result = generate_waves(model, req["prompts"], output_len=req["output_len"],
                          max_num_seqs=req["max_num_seqs"])
  pathlib.Path(result_path).write_text(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
