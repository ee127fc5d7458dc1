"""The job on an OpenAI Batch API file: chat and completion requests in, OpenAI's batch
output form out, bad lines as error lines of that form, resumable by custom_id."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from jaxpp.job import openai_batch
from jaxpp.job import runner as job
from tests import cli
from tests.test_chat import TEMPLATES, tokenizer_dir
from tests.test_job import REPO, read_jsonl, shrunk

ENV = dict(os.environ, JAX_PLATFORMS="cpu")
ASK = "Ticket:\nThe export to CSV fails with an error.\nSummary:"


def request(cid, url=openai_batch.CHAT, **body) -> dict:
  return dict(custom_id=cid, method="POST", url=url, body=body)


def good_lines(n: int) -> list[dict]:
  out = []
  for i in range(n):
    if i % 2:
      out.append(request(f"c{i}", openai_batch.COMPLETIONS, model="tiny", prompt=ASK,
                         max_tokens=3 + i % 3))
    else:
      out.append(request(f"c{i}", model="tiny", max_completion_tokens=4,
                         messages=[dict(role="system", content="One line."),
                                   dict(role="user", content=f"ticket {i}: refund please")]))
  return out


BAD = [
    ("not json", None, "malformed JSON"),
    (json.dumps(dict(method="POST")), None, 'missing or empty "custom_id"'),
    (json.dumps(request("b1", top_logprobs=3, messages=[dict(role="user", content="x")])),
     "b1", 'body "top_logprobs" needs "logprobs": true'),
    (json.dumps(request("b2", url="/v1/embeddings", input="x")), "b2", '"url" must be'),
    (json.dumps(request("b3", messages=[dict(role="robot", content="x")])), "b3",
     "role 'robot'"),
    (json.dumps(request("b4", openai_batch.COMPLETIONS, prompt="x", n=0)), "b4",
     'body "n" must be an integer in [1, 16]'),
    (json.dumps(request("b5", openai_batch.COMPLETIONS, prompt="x", temperature=5)), "b5",
     '"temperature" must be a number in'),
    (json.dumps(request("b6", openai_batch.COMPLETIONS, prompt="x", logprobs=9)), "b6",
     'body "logprobs" must be an integer in [0, 5] or null'),
    (json.dumps(request("b7", tools=[], messages=[dict(role="user", content="x")])), "b7",
     'unsupported body field "tools"'),
    (json.dumps(request("b8", openai_batch.COMPLETIONS, prompt="x", presence_penalty=2.5)),
     "b8", 'body "presence_penalty" must be a number in [-2, 2]'),
    (json.dumps(request("b9", openai_batch.COMPLETIONS, prompt="x", repetition_penalty=0)),
     "b9", 'body "repetition_penalty" must be a finite number > 0'),
]


def write_batch(path: pathlib.Path, lines: list) -> None:
  path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines),
                  encoding="utf-8")


def batch_config(tmp_path, src, out):
  config = shrunk(src, out, max_new_tokens=4)
  config.job.format = "openai_batch"
  config.model.checkpoint = str(tokenizer_dir(tmp_path, TEMPLATES["llama3"]))
  config.mesh.pp, config.mesh.tp, config.schedule.microbatches = 1, 1, 1
  return config


def test_openai_batch_file(tmp_path):
  good = good_lines(6)
  good.insert(2, request("c0", openai_batch.COMPLETIONS, prompt=ASK))  # a duplicate id
  good += [request("lp1", model="tiny", max_tokens=4, logprobs=True, top_logprobs=2,
                   messages=[dict(role="user", content="refund please")]),
           request("lp2", openai_batch.COMPLETIONS, model="tiny", prompt=ASK, max_tokens=3,
                   logprobs=3),
           request("n3", openai_batch.COMPLETIONS, model="tiny", prompt=ASK, max_tokens=3,
                   n=3, temperature=1.0, seed=2 ** 70),  # seeds wrap to 32 bits
           request("pen", openai_batch.COMPLETIONS, model="tiny", prompt=ASK, max_tokens=4,
                   presence_penalty=1.0, frequency_penalty=-0.5, repetition_penalty=1.3)]
  src, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
  write_batch(src, good + [l for l, _, _ in BAD])
  import jax
  rep = job.run_job(batch_config(tmp_path, src, out), devices=jax.devices()[:1])
  rows, errors = read_jsonl(out), read_jsonl(tmp_path / "out.errors.jsonl")
  assert rep["reconciled"] and rep["input_lines"] == len(good) + len(BAD)
  assert sorted(r["custom_id"] for r in rows) == [f"c{i}" for i in range(6)] + ["lp1", "lp2",
                                                                                "n3", "pen"]
  for r in rows:
    body, want = r["response"]["body"], next(g for g in good if g["custom_id"] == r["custom_id"])
    assert r["error"] is None and r["response"]["status_code"] == 200
    n = want["body"].get("n", 1)
    assert body["model"] == "tiny" and len(body["choices"]) == n
    assert [c["index"] for c in body["choices"]] == list(range(n))
    usage, choice = body["usage"], body["choices"][0]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    limit = want["body"].get("max_tokens") or want["body"].get("max_completion_tokens")
    assert n <= usage["completion_tokens"] <= n * limit
    if want["url"] == openai_batch.CHAT:
      assert body["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
      assert isinstance(choice["message"]["content"], str)
    else:
      assert body["object"] == "text_completion" and isinstance(choice["text"], str)
    assert choice["finish_reason"] in ("stop", "length")
    n = usage["completion_tokens"] - (choice["finish_reason"] == "stop")  # EOS: no entry
    if r["custom_id"] == "lp1":  # greedy: the chosen token is the likeliest alternative
      content = choice["logprobs"]["content"]
      assert len(content) == n and all(len(c["top_logprobs"]) == 2 for c in content)
      for c in content:
        assert c["logprob"] <= 0 and c["bytes"] == list(c["token"].encode("utf-8"))
        top = [a["logprob"] for a in c["top_logprobs"]]
        assert top == sorted(top, reverse=True) and c["logprob"] == pytest.approx(top[0])
    elif r["custom_id"] == "lp2":
      lp = choice["logprobs"]
      assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
      assert all(1 <= len(alts) <= 3 for alts in lp["top_logprobs"])
      assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    else:
      assert choice["logprobs"] is None
  by_line = {e["line"]: e for e in errors}
  assert by_line[3]["error"]["message"].startswith('duplicate id "c0"')
  first_bad = len(good) + 1
  for (line, cid, reason), e in zip(BAD, [by_line[n] for n in range(first_bad,
                                                                   first_bad + len(BAD))]):
    assert e["custom_id"] == cid and e["response"] is None, e
    assert reason in e["error"]["message"], (reason, e)


def test_openai_batch_sigkill_and_rerun(tmp_path):
  """Killed mid-run and rerun with the same command: every custom_id exactly once."""
  src, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
  write_batch(src, good_lines(24))
  ckpt = tokenizer_dir(tmp_path, TEMPLATES["llama3"])
  cmd = [sys.executable, "-m", "jaxpp.run", "--config", "configs/harbor.py",
         "--config.job.format=openai_batch", f"--config.model.checkpoint={ckpt}",
         f"--config.job.input={src}", f"--config.job.output={out}",
         "--config.engine.max_num_seqs=4", "--config.job.progress=False"]
  rc, _, stderr = cli.signal_after_rows(cmd, out, signal.SIGKILL, cwd=REPO)
  assert rc == -signal.SIGKILL, (rc, stderr[-2000:])
  first = out.read_bytes().count(b"\n")
  assert 3 <= first < 24, first
  done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  ids = [r["custom_id"] for r in read_jsonl(out)]
  assert sorted(ids) == sorted(f"c{i}" for i in range(24)) and len(ids) == len(set(ids))
  rep = json.loads((tmp_path / "out.jsonl.report.json").read_text())
  assert rep["skipped_done"] == first and rep["reconciled"]


@pytest.mark.parametrize("fmt", ["xml"])
def test_unknown_format(tmp_path, fmt):
  src = tmp_path / "in.jsonl"
  write_batch(src, good_lines(1))
  config = batch_config(tmp_path, src, tmp_path / "o.jsonl")
  config.job.format = fmt
  with pytest.raises(job.JaxppError, match="job.format='xml'; choose one of tickets"):
    job.run_job(config)
