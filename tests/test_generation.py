"""Stopping rules and prompt checks of `jaxpp.LLM.generate`."""

import json

import numpy as np
import pytest

import jaxpp
from jaxpp.model import kv_cache
from tests import hf_models

PROMPTS = [[1, 5, 9, 33, 70, 12, 8], [1, 44]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  path, _ = hf_models.make_checkpoint(tmp_path_factory.mktemp("gen"), "gqa", eos_token_id=None)
  return path


def test_stops_on_generation_config_eos_list(ckpt, tmp_path):
  free = jaxpp.LLM(ckpt, dtype="float32", max_len=64).generate(PROMPTS, max_new_tokens=12)
  assert all(c.finish_reason == "length" and len(c.token_ids) == 12 for c in free)
  stop = free[0].token_ids[5]
  first = free[0].token_ids.index(stop)  # the stop id may already occur earlier
  # generation_config.json's list wins over config.json, as in transformers
  (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [96, stop]}))
  try:
    out = jaxpp.LLM(ckpt, dtype="float32", max_len=64).generate(PROMPTS, max_new_tokens=12)
  finally:
    (ckpt / "generation_config.json").unlink()
  assert out[0].finish_reason == "stop"
  assert out[0].token_ids == free[0].token_ids[:first + 1]
  other = free[1].token_ids
  want = other[:other.index(stop) + 1] if stop in other else other
  assert out[1].token_ids == want


def test_generation_stops_at_the_context(ckpt):
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=16, decode_chunk=4)
  prompt = list(range(1, 11))
  c, = llm.generate([prompt], max_new_tokens=32)
  assert c.finish_reason == "length"
  assert len(c.token_ids) == 16 - len(prompt) + 1  # the last token needs no cache slot
  # ...although the cache itself is rounded up to aligned positions
  assert kv_cache.cache_positions(16) == kv_cache.CACHE_ALIGN == 128
  assert llm.pipeline.init_cache(1, 16, np.float32)[0].shape[-2] == 128


@pytest.mark.parametrize("prompts, kwargs, match", [
    ([list(range(1, 17))], {}, r"prompt 0 has 16 tokens; the context \(max_len\) is 16"),
    ([[]], {}, r"prompt 0 is empty"),
    ([[1, 500]], {}, r"token id 500 outside the vocabulary \[0, 97\)"),
    (["some text"], {}, r"text prompts need a tokenizer.json"),
    ([[1, 2]], dict(max_new_tokens=0), r"max_new_tokens=0 must be >= 1"),
    ([[1, 2]], dict(temperature=-1.0), r"temperature must be finite and >= 0"),
])
def test_bad_prompts(ckpt, prompts, kwargs, match):
  llm = jaxpp.LLM(ckpt, dtype="float32", max_len=16)
  with pytest.raises(jaxpp.JaxppError, match=match) as err:
    llm.generate(prompts, **kwargs)
  assert "\n" not in str(err.value)


def test_bad_llm_arguments(ckpt):
  with pytest.raises(jaxpp.JaxppError, match=r"max_len=1000 exceeds the model's "
                                              r"max_position_embeddings=256"):
    jaxpp.LLM(ckpt, max_len=1000)
  with pytest.raises(jaxpp.JaxppError, match=r"dtype 'float16' is not supported"):
    jaxpp.LLM(ckpt, dtype="float16")


def test_bfloat16_runs_and_mostly_agrees_with_float32(ckpt):
  f32 = jaxpp.LLM(ckpt, dtype="float32", max_len=64).prompt_logits(PROMPTS)
  bf16 = jaxpp.LLM(ckpt, dtype="bfloat16", max_len=64).prompt_logits(PROMPTS)
  assert bf16.dtype == np.float32 and np.all(np.isfinite(bf16))
  assert np.abs(bf16 - f32).max() < 0.05 * np.abs(f32).max()
  assert (bf16.argmax(-1) == f32.argmax(-1)).all()
