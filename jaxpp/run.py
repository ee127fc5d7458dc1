"""Command line: `python -m jaxpp.run --config configs/harbor.py [--config.a.b=value ...]`.

A thin entry point: it parses the config, starts the (multi-process) runtime, sets up
devices and calls `job.runner.run_job`, which holds all the logic. Configs are Python files
whose `get_config()` returns a ConfigDict; fields are overridden with
`--config.sampling.max_new_tokens=8`, and a misspelled key is a flag error. Bad input of any
kind (missing checkpoint, malformed JSONL, impossible layout, bad flag combination) prints
one `error: ...` line and exits 1, without a traceback.

Several processes (docs/multihost.md): the same command on every host, plus
`--coordinator=host:port --num_processes=N --process_id=i`, or `--distributed` under SLURM
or Open MPI. Exit codes: 0 done, 1 error, 2 the report's reconciliation does not hold
(lines unaccounted for or an id written twice: `EXIT_MISMATCH`), 3 another process was lost
(`failfast.EXIT_PEER_LOST`), 4 a device step passed its deadline (`watchdog.EXIT_STALLED`),
128 + N stopped by signal N (143 SIGTERM, 130 SIGINT; `job/stop.py`), the rerun resumes.
"""

from __future__ import annotations

import pathlib
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxpp.dist import distributed
from jaxpp.errors import JaxppError
from jaxpp.job import report, runner, stop

EXIT_MISMATCH = 2  # the job ran but input lines != written + rejected, or duplicates
CPU_DEVICES = 8  # virtual XLA CPU devices when running without an accelerator (all processes)

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "harbor.py"


def parse_flags(argv: list[str]) -> list[str]:
  """Defines `--config` and parses argv; a misspelled `--config.x.y` exits 1 in one line.

  The flag is defined here rather than at import because ml_collections already applies
  the overrides while defining a flag with a default; its KeyError / AttributeError for a
  field the config lacks (with a did-you-mean hint) would otherwise escape as a traceback.
  """
  distributed.define_flags()
  try:
    config_flags.DEFINE_config_file(
        "config", str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None,
        "Run config: a Python file whose get_config() returns a ConfigDict.",
        lock_config=True)
    return flags.FLAGS(argv)
  except flags.Error as e:  # a value of the wrong type, an unknown flag: absl's FATAL form
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(1)
  except (AttributeError, KeyError) as e:
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    detail = " ".join(str(e.args[0] if e.args else e).split())
    print(f"error: --config: no such field {detail}", file=sys.stderr)
    sys.exit(1)


def loaded_config():
  """The parsed run config, or a JaxppError if there is none or its file failed to load.

  ml_collections defers a config file's load failure to the first attribute access (as an
  OSError with a multi-line report); it is turned into our one-line error here.
  """
  config = flags.FLAGS.config
  if config is None:
    raise JaxppError("no run config: pass --config configs/NAME.py")
  try:
    config.keys()
  except OSError as e:
    raise JaxppError(" ".join(str(e).split())) from None
  return config


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  with distributed.current().guard():  # flag mistakes: still the single-process runtime
    runtime = distributed.start(distributed.options_from_flags())
  with runtime.guard():
    distributed.use_virtual_cpu_devices(CPU_DEVICES, runtime.num_processes)
    rep = runner.run_job(loaded_config())
  if rep is None:
    print(f"{runtime.describe()}: done; process 0 writes the output, errors and report")
  else:
    print(report.format_report(rep))
    print(f"output {rep['output']}  errors {rep['errors']}  report {rep['report_file']}")
  runtime.close()
  if rep is not None and rep["interrupted"]:
    sys.exit(stop.exit_code(signal.Signals[rep["interrupted"]]))
  if rep is not None and not rep["reconciled"]:
    print(f"error: {report.reconciliation_line(rep)}", file=sys.stderr)
    sys.exit(EXIT_MISMATCH)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
