"""The job wing: the Harbor batch job, tickets (JSONL) in, summaries (JSONL) out.

`runner.py` (`run_job`: config -> layout -> health probe -> weights -> engine -> rows),
`prompter.py` (ticket -> prompt ids under the length policy), `files.py` (reading and
validating tickets, whole-line writers, resume repair) and `report.py` (progress bar and
the end-of-job report). `python -m jaxpp.run` is its command line (docs/harbor.md).
"""
