"""What a request asks beyond its prompt: stop strings (matched on the text across token
boundaries, left out of the output), its own stop ids, and n samples; the same on every
layout."""

import pathlib

import pytest

import jaxpp
from jaxpp.serve.stop_strings import find_stop

TINY = pathlib.Path(__file__).resolve().parent.parent / "models" / "harbor-tiny"
PIECES = {1: "The ", 2: "bill", 3: "ing pa", 4: "ge fails", 5: "."}


def detok(ids):
  return "".join(PIECES[i] for i in ids)


def test_find_stop_across_tokens():
  assert find_stop(detok, [1, 2, 3, 4, 5], ["ing page"]) == (4, "The bill")  # 3 tokens span it
  assert find_stop(detok, [1, 2, 3, 4, 5], ["fails", "bill"]) == (2, "The ")  # the earliest
  assert find_stop(detok, [1, 2, 3, 4, 5], ["nope"]) is None
  assert find_stop(detok, [], ["x"]) is None and find_stop(detok, [1], []) is None


@pytest.fixture(scope="module")
def llms():
  return {name: jaxpp.LLM(TINY, layout=name, dtype="float32", max_len=256)
          for name in ("pp1tp1", "pp4tp2", "dp2pp2tp2")}


PROMPTS = ["Ticket:\nI was charged twice for my subscription this month.\nSummary:",
           "Ticket:\nThe export to CSV fails with an error.\nSummary:"]


def test_stop_string_split_across_two_tokens_on_every_layout(llms):
  base = llms["pp1tp1"]
  free = base.generate(PROMPTS, max_new_tokens=24)
  tok = base.tokenizer
  ids = free[0].token_ids
  # a stop string made of the end of one token's text and the start of the next's
  cut = next(i for i in range(2, len(ids) - 1)
             if len(tok.decode(ids[:i])) - len(tok.decode(ids[:i - 1])) >= 2
             and len(tok.decode(ids[:i + 1])) - len(tok.decode(ids[:i])) >= 2)
  before, upto = tok.decode(ids[:cut]), tok.decode(ids[:cut + 1])
  stop = before[-1] + upto[len(before)]
  want = find_stop(tok.decode, ids, [stop])
  assert want is not None and want[0] <= cut + 1
  for name, llm in llms.items():
    first, second = llm.generate(PROMPTS, max_new_tokens=24, stop=stop)
    assert first.finish_reason == "stop", name
    assert first.token_ids == ids[:want[0]] and first.text == want[1], name
    assert stop not in first.text
    if stop not in free[1].text:  # the other prompt is untouched
      assert second.token_ids == free[1].token_ids, name


def test_bad_stop_strings(llms):
  with pytest.raises(jaxpp.JaxppError, match="stop strings are non-empty strings"):
    llms["pp1tp1"].generate(PROMPTS, stop=[""])


def test_stop_token_ids_on_every_layout(llms):
  """A request's own stop id ends it where it is first generated (the token kept), as the
  checkpoint's EOS does, on every layout; the other prompts are untouched."""
  free = llms["pp1tp1"].generate(PROMPTS, max_new_tokens=16)
  ids = free[0].token_ids
  at = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
  for name, llm in llms.items():
    first, second = llm.generate(PROMPTS, max_new_tokens=16, stop_token_ids=[ids[at]])
    assert first.token_ids == ids[:at + 1] and first.finish_reason == "stop", name
    if ids[at] not in free[1].token_ids:
      assert second.token_ids == free[1].token_ids, name
  with pytest.raises(jaxpp.JaxppError, match=r"stop_token_ids=\[100000\]"):
    llms["pp1tp1"].generate(PROMPTS, stop_token_ids=[100000])


def test_n_samples_are_distinct_reproducible_and_layout_free(llms):
  """n=3 at temperature 1: three samples per prompt, prompt-major, not all equal, the same
  on a second call and on another layout; sample 0 is the n=1 completion."""
  kw = dict(max_new_tokens=8, temperature=1.0, seed=[5, 6])
  got = llms["pp1tp1"].generate(PROMPTS, n=3, **kw)
  assert [c.sample for c in got] == [0, 1, 2, 0, 1, 2]
  ids = [c.token_ids for c in got]
  assert len({tuple(t) for t in ids[:3]}) > 1 and len({tuple(t) for t in ids[3:]}) > 1
  assert [c.token_ids for c in llms["pp1tp1"].generate(PROMPTS, n=3, **kw)] == ids
  assert [c.token_ids for c in llms["pp4tp2"].generate(PROMPTS, n=3, **kw)] == ids
  assert [c.token_ids for c in llms["dp2pp2tp2"].generate(PROMPTS, n=3, **kw)] == ids
  one = llms["pp1tp1"].generate(PROMPTS, **kw)
  assert [c.token_ids for c in one] == [ids[0], ids[3]]
  with pytest.raises(jaxpp.JaxppError, match="n=0 must be an integer >= 1"):
    llms["pp1tp1"].generate(PROMPTS, n=0)


def test_logprobs_equal_a_log_softmax_reference_on_every_layout(llms):
  """logprobs=3: each token's logprob and top-3 alternatives equal log_softmax of the
  next-token logits after its prefix (computed apart, one prefill per prefix), the same on
  every layout; a stop string's cut cuts them too; none asked, none given."""
  import numpy as np

  base = llms["pp1tp1"]
  got = base.generate(PROMPTS, max_new_tokens=6, logprobs=3)
  hot = base.generate(PROMPTS[:1], max_new_tokens=6, logprobs=3, temperature=1.5, seed=3)
  for prompt, c in zip(PROMPTS + PROMPTS[:1], got + hot):  # greedy, then a sampled one
    ids = base.tokenizer.encode(prompt)
    prefixes = [ids + c.token_ids[:i] for i in range(len(c.token_ids))]
    logits = base.prompt_logits(prefixes).astype(np.float64)
    ref = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                               keepdims=True))
    ref -= logits.max(-1, keepdims=True)
    assert len(c.logprobs) == len(c.top_logprobs) == len(c.token_ids)
    for i, t in enumerate(c.token_ids):
      assert abs(c.logprobs[i] - ref[i, t]) < 1e-4
      want = np.argsort(-ref[i])[:3]
      assert [a for a, _ in c.top_logprobs[i]] == want.tolist()
      np.testing.assert_allclose([p for _, p in c.top_logprobs[i]], ref[i, want], atol=1e-4)
  for name in ("pp4tp2", "dp2pp2tp2"):
    other = llms[name].generate(PROMPTS, max_new_tokens=6, logprobs=3)
    for a, b in zip(got, other):
      assert a.token_ids == b.token_ids, name
      np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
      assert [[t for t, _ in alt] for alt in a.top_logprobs] == \
          [[t for t, _ in alt] for alt in b.top_logprobs], name
  plain = base.generate(PROMPTS, max_new_tokens=6)
  assert plain[0].logprobs is None and plain[0].top_logprobs is None
  chosen_only = base.generate(PROMPTS, max_new_tokens=6, logprobs=0)
  assert chosen_only[0].logprobs == pytest.approx(got[0].logprobs, abs=1e-5)
  assert all(alt == [] for alt in chosen_only[0].top_logprobs)
  stop = base.tokenizer.decode(got[0].token_ids[2:4])
  cut = base.generate(PROMPTS[:1], max_new_tokens=6, logprobs=1, stop=stop)[0]
  assert len(cut.logprobs) == len(cut.token_ids) == len(cut.top_logprobs)
  with pytest.raises(jaxpp.JaxppError, match=r"logprobs=21 must be an integer in \[0, 20\]"):
    base.generate(PROMPTS, logprobs=21)
