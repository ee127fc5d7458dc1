"""Running jaxpp's command lines in a child process on CPU devices, as users run them."""

import json
import os
import pathlib
import subprocess
import sys
import time

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


def signal_after_rows(cmd: list[str], out: pathlib.Path, signum: int, *, cwd, rows: int = 3
                      ) -> tuple[int, str, str]:
  """Runs `cmd` (a job) on the CPU, sends `signum` once `out` holds `rows` whole lines (or
  after 240 s); returns (exit code, stdout, stderr)."""
  proc = subprocess.Popen(cmd, cwd=cwd, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
      if out.exists() and out.read_bytes().count(b"\n") >= rows:
        break
      time.sleep(0.02)
  finally:
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
  return proc.returncode, stdout, stderr
