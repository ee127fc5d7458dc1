"""jaxpp's Llama against transformers' LlamaForCausalLM, the reference, in float32.

Logits must agree within 1e-4 relative error and greedy decoding must be token-identical
for a batch whose prompts have different lengths (so padding is exercised).
"""

import numpy as np
import pytest
import torch

import jaxpp
from jaxpp.load import checkpoint
from jaxpp.serve import reference as generate
from tests import hf_models

VARIANTS = ["gqa", "mha", "mqa", "tied", "llama3_rope", "head_dim", "qwen2", "qwen3",
            "mistral_window", "qwen2_window", "phi3", "gemma", "gemma2"]
PROMPTS = [[1, 5, 9, 33, 70, 12, 8], [1, 44], [1, 3, 3, 90, 61, 17, 25, 26, 40, 11, 7, 19, 2, 4]]


def rel_err(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module", params=VARIANTS)
def model_pair(request, tmp_path_factory):
  ckpt, ref = hf_models.make_checkpoint(tmp_path_factory.mktemp(request.param), request.param,
                                        sharded=request.param == "gqa")
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=128)
  llm.plain_params = checkpoint.load_hf_params(ckpt, llm.config, np.float32)  # [L, ...]
  return request.param, llm, ref


def test_logits_match_transformers(model_pair):
  _, llm, ref = model_pair
  tokens = np.array([PROMPTS[2]], np.int32)
  ours = np.asarray(generate.forward_logits(llm.config, llm.plain_params, tokens))
  with torch.no_grad():
    theirs = ref(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  assert ours.shape == theirs.shape
  assert rel_err(ours, theirs) < 1e-4
  # the pipeline's prefill (pp = 1 here) gives the same next-token logits per prompt
  last = np.stack([ref(torch.tensor([p])).logits[0, -1].detach().numpy() for p in PROMPTS])
  assert rel_err(llm.prompt_logits(PROMPTS), last) < 1e-4


def test_greedy_matches_transformers(model_pair):
  variant, llm, ref = model_pair
  ours = llm.generate(PROMPTS, max_new_tokens=32)
  for prompt, completion in zip(PROMPTS, ours):
    with torch.no_grad():
      out = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    got = completion.token_ids
    if completion.finish_reason == "stop":  # transformers was told not to stop
      expected = expected[:len(got)]
    assert got == expected, variant
    assert completion.prompt_tokens == len(prompt)


def test_prefill_cache_then_decode_equals_full_forward(model_pair):
  """Logits of the cached decode path equal a fresh full-sequence forward."""
  _, llm, _ = model_pair
  prompt = PROMPTS[0]
  completion, = llm.generate([prompt], max_new_tokens=6)
  full = prompt + completion.token_ids
  logits = np.asarray(generate.forward_logits(llm.config, llm.plain_params,
                                              np.array([full], np.int32)))
  greedy = logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
  assert greedy == completion.token_ids


@pytest.mark.parametrize("original,max_len", [(4, 128), (64, 48)])
def test_phi3_longrope_matches_transformers(tmp_path, original, max_len):
  """LongRoPE: with a context beyond the pretraining length the long factors (prompts
  longer than it, so transformers uses them from the first token too), within it the
  short ones; logits and greedy tokens as transformers gives them."""
  ckpt, ref = hf_models.make_checkpoint(tmp_path, "phi3_longrope",
                                        original_max_position_embeddings=original)
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=max_len)
  assert llm.pipeline.config.rope_scaling.long == (max_len > original)
  matches_transformers(llm, ref, [p for p in PROMPTS if len(p) > 4])


def matches_transformers(llm, ref, prompts, new_tokens: int = 16):
  """Last-position logits within 1e-4 and greedy tokens equal to transformers' generate."""
  with torch.no_grad():
    last = np.stack([ref(torch.tensor([p])).logits[0, -1].numpy() for p in prompts])
  assert rel_err(llm.prompt_logits(prompts), last) < 1e-4
  for prompt, completion in zip(prompts, llm.generate(prompts, max_new_tokens=new_tokens)):
    with torch.no_grad():
      out = ref.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    if completion.finish_reason == "stop":  # transformers was told not to stop
      expected = expected[:len(completion.token_ids)]
    assert completion.token_ids == expected


# Each other family again with MQA, with the head tied the other way, and (windowed ones)
# through the fused kernels' CPU paths: several configs a family, as with Llama above.
FAMILY_CONFIGS = [(f, extra) for f in ("mistral_window", "qwen2", "qwen3", "phi3", "gemma2")
                  for extra in (dict(num_key_value_heads=1), dict(tie_word_embeddings=True)
                                if not f.startswith("gemma") else dict(tie_word_embeddings=False))]


@pytest.mark.parametrize("family,extra", FAMILY_CONFIGS,
                         ids=[f"{f}-{next(iter(e))}" for f, e in FAMILY_CONFIGS])
def test_family_variants_match_transformers(tmp_path, family, extra):
  ckpt, ref = hf_models.make_checkpoint(tmp_path, family, **extra)
  attention = "kernel" if family in ("mistral_window", "gemma2") else "auto"
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=128, attention=attention)
  matches_transformers(llm, ref, PROMPTS)
