"""Job I/O and report: every bad line is named, nothing is lost or doubled across a kill.

`tests/data/bad_tickets.jsonl` holds one line per rejection reason among six good tickets; its
line numbers below are the contract the errors file promises a person reading it.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from jaxpp.errors import JaxppError
from jaxpp.job import files as jobio
from jaxpp.job import report

DATA = pathlib.Path(__file__).parent / "data" / "bad_tickets.jsonl"

EXPECTED_REJECTIONS = {  # line -> substring of the reason
    4: "malformed JSON (Unterminated string starting at, column 23)",
    6: 'missing "id"',
    7: 'missing "text"',
    8: "duplicate id \"T-1\" (first accepted on line 1)",
    9: '"text" is empty',
    10: '"text" is blank',
    11: "invalid UTF-8 at byte 27",
    12: "not a JSON object (got array)",
    13: '"id" must be a string or integer, got null',
    14: '"text" must be a string, got number',
    15: '"id" must be a string or integer, got 2.5',
    16: '"id" must be a string or integer, got [\"T\", 16]',
    17: '"id" must be a string or integer, got true',
    18: "not a JSON object (got string)",
    21: "duplicate id 1 (first accepted on line 2)",
    22: "unpaired surrogate",
}
GOOD_LINES = {1: "T-1", 2: 1, 3: "1", 19: "T-19", 23: "T-9", 24: "T-24"}


def test_every_rejection_reason_with_its_line():
  items = list(jobio.read_tickets(DATA))
  rejected = {r.line: r for r in items if isinstance(r, jobio.Rejected)}
  assert sorted(rejected) == sorted(EXPECTED_REJECTIONS)
  for line, reason in EXPECTED_REJECTIONS.items():
    assert reason in rejected[line].reason, (line, rejected[line].reason)
    assert "\n" not in rejected[line].reason
  assert rejected[7].id == "T-7" and rejected[8].id == "T-1" and rejected[13].id is None


def test_counts_reconcile_and_blank_lines_are_not_input():
  items = list(jobio.read_tickets(DATA))
  tickets = [t for t in items if isinstance(t, jobio.Ticket)]
  non_blank = [l for l in DATA.read_bytes().split(b"\n") if l.strip()]
  assert len(items) == len(non_blank) == 22  # lines 5 and 20 are blank
  assert {t.line: t.id for t in tickets} == GOOD_LINES
  assert len(tickets) + len(EXPECTED_REJECTIONS) == len(items)
  assert [i.line for i in items] == sorted(i.line for i in items)


def test_ticket_fields_and_key_semantics():
  tickets = {t.line: t for t in jobio.read_tickets(DATA) if isinstance(t, jobio.Ticket)}
  assert tickets[2].key == "1" and tickets[3].key == '"1"'  # int 1 and string "1" are distinct
  assert tickets[1].doc["customer"] == "acme" and tickets[19].doc["priority"] == "high"
  assert tickets[19].text.startswith("Login page: naïve café")
  assert tickets[24].text == "Last ticket, CRLF line ending."
  assert jobio.ticket_key(1) != jobio.ticket_key("1")


def test_last_line_without_newline_and_bom(tmp_path):
  p = tmp_path / "in.jsonl"
  p.write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "x"}\n\n{"id": "b", "text": "y"}')
  items = list(jobio.read_tickets(p))
  assert [(i.line, i.id) for i in items] == [(1, "a"), (3, "b")]


def test_check_input_errors(tmp_path):
  with pytest.raises(JaxppError, match=r"^job input .*missing\.jsonl: no such file$"):
    jobio.check_input(tmp_path / "missing.jsonl")
  with pytest.raises(JaxppError, match="not a regular file"):
    jobio.check_input(tmp_path)
  with pytest.raises(JaxppError, match="no such file"):
    next(jobio.read_tickets(tmp_path / "missing.jsonl"))  # raised before any line is read
  assert jobio.check_input(DATA) == DATA


def test_check_output_dir(tmp_path):
  out = tmp_path / "a" / "b" / "out.jsonl"
  assert jobio.check_output_dir(out) == out and out.parent.is_dir() and not out.exists()
  blocker = tmp_path / "file.txt"
  blocker.write_text("x")
  with pytest.raises(JaxppError, match=r"^job output .*file\.txt/out\.jsonl: not writable"):
    jobio.check_output_dir(blocker / "out.jsonl")
  with pytest.raises(JaxppError, match="not a regular file"):
    jobio.check_output_dir(tmp_path / "a")
  if os.geteuid() != 0:  # root writes through chmod; the file-as-directory case covers it
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
      with pytest.raises(JaxppError, match="not writable"):
        jobio.check_output_dir(ro / "out.jsonl")
    finally:
      ro.chmod(0o700)


def test_writer_writes_whole_flushed_lines(tmp_path):
  out = tmp_path / "out.jsonl"
  w = jobio.ResultWriter(out)
  w.write({"id": "T-1", "summary": "Drucker klemmt ✓", "finish_reason": "stop",
           "prompt_tokens": 12, "completion_tokens": 5})
  text = out.read_text(encoding="utf-8")  # read while the writer is still open
  assert text.endswith("\n") and text.count("\n") == 1 and "✓" in text
  w.write({"id": 1, "summary": "bad \ud800 surrogate"})  # never crashes; stays one valid line
  lines = out.read_text(encoding="utf-8").splitlines()
  assert [json.loads(l)["id"] for l in lines] == ["T-1", 1] and w.rows == 2
  w.close()
  with jobio.ErrorWriter(tmp_path / "err.jsonl") as e:
    e.write_rejected(jobio.Rejected(line=4, id=None, reason="malformed JSON"))
    assert json.loads((tmp_path / "err.jsonl").read_text()) == {
        "line": 4, "id": None, "reason": "malformed JSON"}


def test_resume_repairs_partial_lines_and_reads_state(tmp_path):
  out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
  out.write_bytes(b'{"id": "T-1", "summary": "a"}\n{"id": 1, "summary": "b"}\n'
                  b'{"id": "1", "summary": "c"}\n{"id": "T-19", "summ')
  err.write_bytes(b'{"line": 4, "id": null, "reason": "x"}\n{"line": 6, "id": null}\nnot json\n'
                  b'{"line": 7, "id": "T-7", "rea')
  state = jobio.resume_state(out, err)
  assert state.done_keys == {'"T-1"', "1", '"1"'}
  assert state.rejected_lines == {4, 6}
  assert state.duplicate_rows == 0 and state.output_rows == 3 and state.truncated_bytes > 0
  assert out.read_bytes().endswith(b'"c"}\n') and err.read_bytes().endswith(b"null}\n")
  again = jobio.resume_state(out, err)  # idempotent: nothing left to cut
  assert again.truncated_bytes == 0 and again.done_keys == state.done_keys
  with jobio.ResultWriter(out) as w:  # appends cleanly after the repair
    w.write({"id": "T-19", "summary": "d"})
  assert [json.loads(l)["id"] for l in out.read_text().splitlines()] == ["T-1", 1, "1", "T-19"]


def test_resume_edge_cases(tmp_path):
  out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
  assert jobio.resume_state(out, err) == jobio.ResumeState()  # first run: no files yet
  out.write_text('{"id": 1}\n{"id": 2}\n{"id": 1}\n')
  state = jobio.resume_state(out, err)  # a duplicate is reported, the file kept
  assert state.duplicate_rows == 1 and state.output_rows == 3 and len(out.read_text()) == 30
  out.write_bytes(b'{"id": "a"}\n{"id": "b"')  # a ResultWriter repairs on open as well
  jobio.ResultWriter(out).close()
  assert out.read_bytes() == b'{"id": "a"}\n'
  out.write_text("hello\n")  # not ours: refuse rather than truncate it
  with pytest.raises(JaxppError, match="holds no JSON rows"):
    jobio.resume_state(out, err)
  assert out.read_text() == "hello\n"


_KILLED_WRITER = """
import sys
from jaxpp.job import files as jobio
w = jobio.ResultWriter(sys.argv[1])
i = 0
while True:
  w.write({"id": i, "summary": "x" * (i % 5000)})
  i += 1
"""


def test_sigkill_leaves_a_repairable_file(tmp_path):
  out = tmp_path / "out.jsonl"
  proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(out)],
                          cwd=pathlib.Path(__file__).parent.parent)
  try:
    deadline = time.time() + 30
    while (not out.exists() or out.stat().st_size < 2_000_000) and time.time() < deadline:
      time.sleep(0.01)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  state = jobio.resume_state(out, tmp_path / "err.jsonl")
  ids = [json.loads(l)["id"] for l in out.read_text().splitlines()]
  assert ids == list(range(len(ids))) and len(ids) > 10
  assert state.done_keys == {str(i) for i in ids} and state.duplicate_rows == 0


def _report(**kw):
  args = dict(input_lines=212, written_run=150, written_total=200, rejected_run=2,
              rejected_total=12, skipped_done=50, prompt_tokens=30_000, completion_tokens=4_800,
              prefill_seconds=10.0, decode_seconds=40.0, wall_seconds=60.0,
              bubble_schedule=3 / 7, bubble_measured=0.45,
              tick_seconds=[0.01 * i for i in range(1, 101)], devices="8 x cpu",
              layout={"pp": 4, "tp": 2, "dp": 1})
  args.update(kw)
  return report.build_report(**args)


def test_report_numbers():
  r = _report()
  assert r["prefill_tokens_per_second"] == 3000.0 and r["decode_tokens_per_second"] == 120.0
  assert r["total_tokens_per_second"] == pytest.approx(34_800 / 60)
  assert r["documents_per_second"] == 2.5
  assert r["projected_wall_seconds_40000"] == 16_000.0 and r["projected_wall_40000"] == "4.4 h"
  assert r["tick_seconds"]["p50"] == pytest.approx(0.505) and r["tick_seconds"]["count"] == 100
  assert r["tick_seconds"]["p99"] == pytest.approx(0.9901)
  assert r["reconciled"] is True
  assert _report(written_total=199)["reconciled"] is False
  assert _report(duplicate_rows=1)["reconciled"] is False
  idle = _report(written_run=0, prefill_seconds=0.0, decode_seconds=0.0, tick_seconds=[])
  assert idle["documents_per_second"] == 0.0 and idle["projected_wall_40000"] == "n/a"
  assert idle["prefill_tokens_per_second"] is None and idle["tick_seconds"]["p50"] is None
  assert report.percentiles([1, 2, 3, 4], qs=(50,)) == {"p50": 2.5, "count": 4}
  assert report.human_duration(45) == "45 s" and report.human_duration(750) == "12.5 min"


def test_projection_counts_start_up_and_compiles_once():
  """150 documents in 60 s, of which 20 s start-up and 10 s of compiles after it: the
  steady rate is 150 / 30 s, and 40,000 documents take the 30 s once plus 8,000 s."""
  r = _report(startup_seconds=20.0, load_seconds=12.0, compile_seconds=14.0,
              steady_seconds=30.0, prefill_positions=40_000)
  assert r["steady_documents_per_second"] == 5.0
  assert r["projected_wall_seconds_40000"] == 30.0 + 8_000.0
  assert (r["startup_seconds"], r["load_seconds"], r["compile_seconds"]) == (20.0, 12.0, 14.0)
  assert r["prefill_padding"] == pytest.approx(0.25)  # 30,000 real of 40,000 computed
  text = report.format_report(r)
  assert "prefill padding 25.0%" in text and "startup     20 s (weights 12 s), compile 14 s" in text
  assert _report()["prefill_padding"] is None


def test_steady_rates_and_first_calls_in_the_report():
  """The steady rates, the first calls and the read time are reported beside the totals."""
  r = _report(steady_prefill_tps=4_000.0, steady_decode_tps=150.0, first_call_seconds=3.5,
              prefill_calls=21, prefill_shapes=7, load_seconds=12.0, read_seconds=9.0)
  assert (r["steady_prefill_tokens_per_second"], r["steady_decode_tokens_per_second"],
          r["first_call_seconds"], r["read_seconds"]) == (4_000.0, 150.0, 3.5, 9.0)
  text = report.format_report(r)
  assert ("steady      prefill 4,000.0  decode 150.0 tok/s  (programs' first calls left out: "
          "3.5 s; 21 prefills in 7 shapes)") in text
  assert "(weights 12 s, reading files 9.0 s)" in text
  assert "steady      prefill n/a  decode n/a" in report.format_report(_report())


def test_format_report_lines():
  text = report.format_report(_report())
  assert "input lines = written + rejected: 212 = 200 + 12 ✓" in text
  for part in ("prefill 3,000.0", "decode 120.0", "schedule 42.9%", "measured 45.0%",
               "p50 505.0 ms", "40,000 tickets in 4.4 h", "layout pp=4 tp=2 dp=1"):
    assert part in text, part
  bad = report.format_report(_report(written_total=199))
  assert "MISMATCH" in bad and "212 != 199 + 12" in bad and "+1 lines unaccounted" in bad
  assert "measured n/a" in report.format_report(_report(bubble_measured=None))


def test_write_report_round_trips(tmp_path):
  r = _report(bubble_measured=float("nan"))
  path = report.write_report(r, tmp_path / "out" / "summaries.jsonl")
  assert path == tmp_path / "out" / "summaries.jsonl.report.json"
  back = json.loads(path.read_text(encoding="utf-8"))
  assert back == {**r, "bubble_measured": None}
  assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_progress_counts():
  with report.Progress(total=3, disable=True) as p:
    p.update(tokens=10)
    p.update(documents=2, tokens=5)
  assert p.documents == 3 and p.tokens == 15
