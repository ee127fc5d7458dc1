"""The synthetic ticket set: reproducible from its script, well-formed, and uneven in length.

Reproducibility is what lets the shipped `data/tickets.jsonl` stand in for the script (a
training run or benchmark can cite the file and anyone can regenerate it); the length spread
is the point of the data set for the pipeline (a batch that mixes 50-character and
8,000-character prompts), so it is asserted rather than assumed.
"""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "make_tickets.py"
SHIPPED = REPO / "data" / "tickets.jsonl"
FIELDS = {"id", "text", "summary", "category", "product"}


def generate(out: pathlib.Path, count: int = 240, seed: int = 0) -> bytes:
  proc = subprocess.run([sys.executable, str(SCRIPT), "--count", str(count), "--seed",
                         str(seed), "--out", str(out)], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "chars" in proc.stdout  # the length histogram
  return out.read_bytes()


@pytest.fixture(scope="module")
def tickets() -> list[dict]:
  with open(SHIPPED) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_script_is_deterministic_and_reproduces_the_shipped_file(tmp_path):
  first = generate(tmp_path / "a.jsonl")
  second = generate(tmp_path / "b" / "b.jsonl")  # also creates the missing directory
  assert first == second
  assert first == SHIPPED.read_bytes()


def test_seed_changes_the_data_and_count_keeps_a_prefix(tmp_path):
  base = generate(tmp_path / "base.jsonl", count=20).splitlines()
  assert generate(tmp_path / "other.jsonl", count=20, seed=1).splitlines() != base
  assert generate(tmp_path / "more.jsonl", count=30).splitlines()[:20] == base


def test_tickets_are_well_formed(tickets):
  assert len(tickets) >= 200
  ids = [t["id"] for t in tickets]
  assert len(set(ids)) == len(ids)
  for t in tickets:
    assert FIELDS <= set(t), t["id"]
    assert all(isinstance(t[k], str) and t[k] for k in FIELDS), t["id"]
    assert t["summary"].startswith(t["category"] + " | "), t["id"]
    assert t["product"] in t["summary"], t["id"]
    assert "\n" not in t["summary"], t["id"]


def test_labels_are_varied(tickets):
  """Enough classes that a model has to read the ticket, not guess the majority label."""
  assert len({t["category"] for t in tickets}) >= 8
  assert len({t["product"] for t in tickets}) >= 10
  assert len({t["summary"] for t in tickets}) > 0.8 * len(tickets)


def test_lengths_are_spread(tickets):
  lengths = [len(t["text"]) for t in tickets]
  assert min(lengths) < 300
  assert max(lengths) > 4000
  assert sum(n > 2000 for n in lengths) >= 0.05 * len(lengths)


def test_shipped_file_is_small():
  assert SHIPPED.stat().st_size < 400_000
