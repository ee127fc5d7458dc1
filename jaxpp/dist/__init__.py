"""The dist wing: one job over several processes, and failing cleanly.

`distributed.py` (JAX's multi-controller runtime started from flags; who writes, shared
resume state), `failfast.py` (every process stops, naming the lost one), `watchdog.py` (a
deadline on every device step) and `health.py` (a start-up probe of every stage). Used by
the job and the bench; the library itself runs in one process without it.
"""
