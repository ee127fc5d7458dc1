"""Repetition, presence and frequency penalties: the formula, the counts, transformers'
repetition penalty token for token, a host-side reference for the others, and the same
tokens on every layout."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxpp
from jaxpp.model import penalties, sampling
from tests import hf_models

PROMPTS = [[1, 5, 9, 33, 70, 12, 8], [1, 44], [1, 3, 3, 90, 61, 17, 25, 26, 40, 11, 7, 19, 2, 4]]


def numpy_penalised(logits, prompt, output, rep, pres, freq):
  """The definitions, one row at a time, as transformers / OpenAI write them."""
  out = np.array(logits, np.float64)
  for t in set(prompt) | set(output):
    out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
  for t in set(output):
    out[t] -= pres + freq * output.count(t)
  return out


def test_apply_and_counts_match_the_definitions():
  rng = np.random.default_rng(0)
  V = 11
  logits = rng.normal(size=(3, V)).astype(np.float32) * 3
  history = np.array([[4, 4, 7, 1, 9, 9], [2, 0, 0, 0, 0, 0], [5, 6, 5, 5, 3, 8]], np.int32)
  last, prompt_lens = np.array([4, 0, 5]), np.array([2, 1, 3])
  generated = np.array([[9, -1], [-1, -1], [8, 8]], np.int32)
  rep, pres, freq = np.array([1.3, 2.0, 0.7]), np.array([0.5, 0.0, -0.4]), np.array([0.2, 1.0, 0.9])
  seen = penalties.of_history(jnp.asarray(history), jnp.asarray(last), jnp.asarray(prompt_lens),
                              jnp.asarray(generated), V)
  got = np.asarray(penalties.apply(jnp.asarray(logits), seen, jnp.asarray(rep, jnp.float32),
                                   jnp.asarray(pres, jnp.float32),
                                   jnp.asarray(freq, jnp.float32)))
  for i in range(3):
    toks = history[i, :last[i] + 1].tolist()
    prompt, output = toks[:prompt_lens[i]], toks[prompt_lens[i]:] + [
        t for t in generated[i].tolist() if t >= 0]
    np.testing.assert_allclose(got[i], numpy_penalised(logits[i], prompt, output, rep[i],
                                                       pres[i], freq[i]), rtol=1e-6)
  # off is bit for bit the raw logits, whatever was seen
  ones, zeros = jnp.ones(3), jnp.zeros(3)
  assert np.array_equal(np.asarray(penalties.apply(jnp.asarray(logits), seen, ones, zeros,
                                                   zeros)), logits)
  # a packed prefill: each prompt counts its own tokens only
  tokens = jnp.asarray([[[3, 3, 5, 7, 0, 0]]], jnp.int32)
  segments = jnp.asarray([[[0, 0, 0, 1, -1, -1]]], jnp.int32)
  packed = penalties.of_packed(tokens, segments, q=3, vocab=V)
  assert np.asarray(packed.anywhere).nonzero()[0].tolist() == [0, 0, 1]
  assert np.asarray(packed.anywhere).nonzero()[1].tolist() == [3, 5, 7]
  assert not np.asarray(packed.output).any()


@pytest.mark.parametrize("kwargs, message", [
    (dict(repetition_penalty=0.0), r"repetition_penalty must be finite and > 0"),
    (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
    (dict(frequency_penalty=[0.0, -3.0]), r"frequency_penalty must be in \[-2, 2\]"),
])
def test_bad_values_are_one_line_errors(kwargs, message):
  with pytest.raises(jaxpp.JaxppError, match=message):
    sampling.SamplingParams.make(2, **kwargs)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return hf_models.make_checkpoint(tmp_path_factory.mktemp("pen"), "gqa")


@pytest.fixture(scope="module")
def llms(checkpoint):
  ckpt, _ = checkpoint
  return {name: jaxpp.LLM(ckpt, layout=name, dtype="float32", max_len=64, decode_chunk=3)
          for name in ("pp1tp1", "pp4tp2", "dp2pp2tp2")}


def test_repetition_penalty_matches_transformers(checkpoint, llms):
  """Greedy with repetition_penalty=1.8 is transformers' generate with the same, token for
  token; and it is not the unpenalised output (the check can fail)."""
  _, ref = checkpoint
  got = llms["pp1tp1"].generate(PROMPTS, max_new_tokens=20, repetition_penalty=1.8)
  free = llms["pp1tp1"].generate(PROMPTS, max_new_tokens=20)
  assert [c.token_ids for c in got] != [c.token_ids for c in free]
  for prompt, completion in zip(PROMPTS, got):
    with torch.no_grad():
      out = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                         repetition_penalty=1.8, eos_token_id=None, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    if completion.finish_reason == "stop":  # transformers was told not to stop
      expected = expected[:len(completion.token_ids)]
    assert completion.token_ids == expected


def reference_greedy(llm, prompt, n, rep, pres, freq):
  """Greedy decoding one token at a time, each from a fresh prefill's logits of the whole
  prefix, penalised on the host (numpy_penalised)."""
  out = []
  for _ in range(n):
    logits = llm.prompt_logits([prompt + out])[0]
    out.append(int(np.argmax(numpy_penalised(logits, prompt, out, rep, pres, freq))))
    if out[-1] in llm.config.eos_token_ids:
      break
  return out


def test_every_penalty_against_a_host_reference_on_every_layout(llms):
  """Per-prompt penalties in one batch, decode returning every 3 tokens (so counts cross
  calls and grow within one): greedy tokens equal the host reference on pp1tp1, and every
  layout gives the same tokens, greedy and sampled."""
  base = llms["pp1tp1"]
  knobs = dict(repetition_penalty=[1.0, 1.5, 1.2], presence_penalty=[1.5, 0.0, -0.5],
               frequency_penalty=[0.0, 0.0, 1.2])
  got = base.generate(PROMPTS, max_new_tokens=12, **knobs)
  free = base.generate(PROMPTS, max_new_tokens=12)
  for i, (prompt, completion) in enumerate(zip(PROMPTS, got)):
    want = reference_greedy(base, prompt, 12, *(knobs[k][i] for k in knobs))
    assert completion.token_ids == want, i
    assert completion.token_ids != free[i].token_ids, i
  hot = dict(temperature=1.0, seed=[3, 4, 5], **knobs)
  sampled = base.generate(PROMPTS, max_new_tokens=12, **hot)
  for name in ("pp4tp2", "dp2pp2tp2"):
    assert [c.token_ids for c in llms[name].generate(PROMPTS, max_new_tokens=12, **knobs)] \
        == [c.token_ids for c in got], name
    assert [c.token_ids for c in llms[name].generate(PROMPTS, max_new_tokens=12, **hot)] \
        == [c.token_ids for c in sampled], name
