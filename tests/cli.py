"""Running jaxpp's command lines in a child process on CPU devices, as users run them."""

import json
import os
import subprocess
import sys

# The smallest bench workload that still exercises prefill, decode and the report.
TINY_BENCH = ("--model=tiny", "--input_len=8", "--output_len=4", "--num_requests=4",
              "--decode_chunk=2", "--dtype=float32")


def run_module(module: str, *flags: str, timeout: int = 300) -> subprocess.CompletedProcess:
  """`python -m module flags` with JAX on the CPU; output captured as text."""
  return subprocess.run([sys.executable, "-m", module, *flags],
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=timeout)


def bench_rows(out, *flags: str) -> list[dict]:
  """Runs `jaxpp.bench` on TINY_BENCH plus `flags`, writing to `out`; returns its JSON rows."""
  proc = run_module("jaxpp.bench", *TINY_BENCH, *flags, f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads((out / "results.json").read_text())["rows"]
