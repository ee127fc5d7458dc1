"""Several processes, one job: JAX's multi-controller runtime, started from command-line flags.

Big models outgrow one host, and pipeline stages then sit on different machines. jaxpp uses
JAX's own runtime for that (`jax.distributed`: a coordination service in process 0, NCCL
between GPUs, gloo between CPU processes): every process runs the same program on its own
devices, and the mesh puts pp stages across processes while tp stays inside one
(`mesh.make_mesh`). There is no launcher of our own: start one process per host with the
flags below (or under SLURM / Open MPI with `--distributed`, which lets JAX detect them).

`start()` is called by `jaxpp.run` and `jaxpp.bench` before anything touches a device. It
returns the process's `Runtime`, also kept as `current()`, because the runtime is
process-wide in JAX too: the job asks it whether this process writes the output, to share
process 0's resume state, to name stages in messages, and to fail fast (`failfast.py`).
Without flags the runtime is single-process and all of that is trivial.

This is the one module that reads JAX's private distributed state
(`jax._src.distributed.global_state`): its client is the coordination service's key-value
store, which `jax.distributed` does not expose, and the process count after auto-detection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import sys
import traceback
from typing import Any, Iterator, NoReturn

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from jaxpp.dist import failfast
from jaxpp.dist.watchdog import Watchdog
from jaxpp.parallel import mesh as mesh_lib
from jaxpp.errors import JaxppError

HEARTBEAT_FACTOR = 2  # JAX's own heartbeat timeout, as a multiple of --peer_timeout
HOST_WAIT_MS = 60_000  # how long a process waits for the others to report their host


@dataclasses.dataclass(frozen=True)
class Options:
  """What the flags ask for; None fields are left to JAX's cluster detection."""
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  peer_timeout: float = 5.0


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the multi-process flags; called by the entry points (`jaxpp.run`, `jaxpp.bench`)
  before they parse, never on import, so importing jaxpp defines no absl flags."""
  f = dict(flag_values=values)
  flags.DEFINE_string("coordinator", None, "host:port of process 0's coordination service "
                      "(with --num_processes and --process_id) for a multi-process run", **f)
  flags.DEFINE_integer("num_processes", None, "number of processes of a multi-process run",
                       **f)
  flags.DEFINE_integer("process_id", None, "this process's index, 0 .. num_processes-1", **f)
  flags.DEFINE_list("local_device_ids", None, "this process's devices, e.g. 0,1,2,3 (default: "
                    "all; under SLURM/Open MPI JAX otherwise gives each process one GPU)", **f)
  flags.DEFINE_bool("distributed", False, "start a multi-process run, letting JAX detect what "
                    "the flags above leave out from SLURM or Open MPI", **f)
  flags.DEFINE_float("peer_timeout", 5.0, "seconds without a sign of life before a process "
                     "counts as lost and every other process stops", **f)


def options_from_flags(values: flags.FlagValues = flags.FLAGS) -> Options | None:
  """The parsed flags, or None for a single-process run; bad combinations raise one line."""
  explicit = dict(coordinator=values.coordinator, num_processes=values.num_processes,
                  process_id=values.process_id)
  given = [k for k, v in explicit.items() if v is not None]
  if not values.distributed and not given:
    if values.local_device_ids is not None:
      raise JaxppError("--local_device_ids needs a multi-process run (--coordinator, "
                       "--num_processes, --process_id, or --distributed)")
    return None
  if not values.distributed and len(given) < 3:
    missing = ", ".join(f"--{k}" for k in explicit if k not in given)
    raise JaxppError(f"{missing} missing: a multi-process run needs --coordinator, "
                     "--num_processes and --process_id (or --distributed under SLURM / "
                     "Open MPI)")
  opts = Options(**explicit, local_device_ids=_device_ids(values.local_device_ids),
                 peer_timeout=values.peer_timeout)
  check_options(opts)
  return opts


def _device_ids(text: list[str] | None) -> tuple[int, ...] | None:
  if text is None:
    return None
  try:
    ids = tuple(int(t) for t in text)
  except ValueError:
    raise JaxppError(f"--local_device_ids={','.join(text)}: expected integers like 0,1,2,3"
                     ) from None
  if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
    raise JaxppError(f"--local_device_ids={','.join(text)}: expected distinct ids >= 0")
  return ids


def check_options(opts: Options) -> None:
  if opts.coordinator is not None:
    host, _, port = opts.coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise JaxppError(f"--coordinator={opts.coordinator}: expected host:port")
  if opts.num_processes is not None and opts.num_processes < 1:
    raise JaxppError(f"--num_processes={opts.num_processes} must be >= 1")
  if opts.process_id is not None and not (
      0 <= opts.process_id < (opts.num_processes or opts.process_id + 1)):
    raise JaxppError(f"--process_id={opts.process_id} must be in 0 .. num_processes-1")
  if not opts.peer_timeout > 0:
    raise JaxppError(f"--peer_timeout={opts.peer_timeout} must be > 0")


def cpu_only() -> bool:
  """Whether JAX is asked for no platform but the CPU (JAX_PLATFORMS unset or 'cpu')."""
  requested = {p.strip() for p in (jax.config.jax_platforms or "").split(",") if p.strip()}
  return requested <= {"cpu"}


def use_virtual_cpu_devices(count: int, processes: int = 1) -> None:
  """Gives the CPU backend `count` devices in all unless an accelerator is requested.

  Split evenly over the processes, so a layout of `count` devices runs unchanged on one
  process or several. XLA reads the device count once, when the first backend starts; a later
  update is silently ignored, so this must run before anything calls `jax.devices()`.
  """
  if cpu_only():
    if count % processes:
      raise JaxppError(f"the {count} virtual CPU devices do not split evenly over "
                       f"{processes} processes")
    jax.config.update("jax_num_cpu_devices", count // processes)


def start(opts: Options | None) -> Runtime:
  """Starts JAX's distributed runtime as `opts` asks (before any device use); see the module.

  On CPU the processes talk through gloo. JAX's heartbeat timeout is set to
  HEARTBEAT_FACTOR x peer_timeout so that jaxpp's own, named, verdict on a lost process
  comes first and JAX's abort stays a backstop.
  """
  global _current
  if opts is None:
    _current = Runtime()
    return _current
  if cpu_only():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
        opts.coordinator, opts.num_processes, opts.process_id,
        local_device_ids=list(opts.local_device_ids) if opts.local_device_ids else None,
        heartbeat_timeout_seconds=max(1, round(HEARTBEAT_FACTOR * opts.peer_timeout)))
  except ValueError as e:  # JAX: nothing detected for what the flags left out
    raise JaxppError(f"cannot start the multi-process run: {' '.join(str(e).split())} "
                     "(no SLURM or Open MPI environment found? pass --coordinator, "
                     "--num_processes and --process_id)") from None
  except RuntimeError as e:  # e.g. the coordinator never answered within JAX's timeout
    raise JaxppError("cannot start the multi-process run: "
                     f"{' '.join(str(e).split())[:300]}") from None
  state = jax._src.distributed.global_state  # pylint: disable=protected-access
  _current = Runtime(state.process_id, state.num_processes, state.client,
                     opts.coordinator or state.coordinator_address, opts.peer_timeout)
  return _current


def current() -> Runtime:
  """This process's runtime; single-process unless `start()` began a multi-process one."""
  global _current
  if _current is None:
    _current = Runtime()
  return _current


class Runtime:
  """One process's view of the run: who it is, what it holds, how it fails."""

  def __init__(self, process_id: int = 0, num_processes: int = 1, client: Any = None,
               coordinator: str | None = None, peer_timeout: float = 5.0):
    self.process_id, self.num_processes = process_id, num_processes
    self.stages: dict[int, list[int]] = {}
    self._watchdog: Watchdog | None = None  # the device steps the peer monitor publishes
    self.hosts = {process_id: socket.gethostname()}
    self.monitor: failfast.PeerMonitor | None = None
    self.hook: failfast.AbortHook | None = None
    if num_processes == 1:
      return
    client.key_value_set(f"{failfast.PREFIX}host/{process_id}", self.hosts[process_id])
    for p in range(num_processes):
      self.hosts[p] = client.blocking_key_value_get(f"{failfast.PREFIX}host/{p}", HOST_WAIT_MS)
    self.monitor = failfast.PeerMonitor(client, process_id, num_processes, peer_timeout,
                                        self.where, self._current_step)
    self.monitor.start()
    self.hook = failfast.AbortHook(coordinator, self.where, self.monitor,
                                             coordinator_is_peer=process_id != 0)

  def watchdog(self, **bounds) -> Watchdog:
    """A watchdog over this process's device steps (`bounds`: the config's `watchdog`).

    A stall is described with this process's stages and the processes behind it, and ends
    every process; the peer monitor publishes the watchdog's step count, so a lost peer is
    named with the step it last reached. The newest watchdog is the one published.
    """
    self._watchdog = Watchdog(**bounds, describe=self.describe_stall, on_stall=self.fail)
    return self._watchdog

  def _current_step(self) -> int:
    return self._watchdog.started if self._watchdog is not None else 0

  @property
  def is_writer(self) -> bool:
    """Only process 0 writes the job's output, errors file and report."""
    return self.process_id == 0

  def set_layout(self, mesh) -> None:
    """Records which pp stages each process holds, so messages can name them."""
    self.stages = mesh_lib.stages_by_process(mesh)

  def where(self, process: int | None = None) -> str:
    """'host h, pp stages 2-3' for a process (default: this one)."""
    p = self.process_id if process is None else process
    held = self.stages.get(p)
    return f"host {self.hosts.get(p, '?')}" + (
        f", {mesh_lib.describe_stages(held)}" if held is not None else "")

  def describe(self, process: int | None = None) -> str:
    """'process 1 of 2 (host h, pp stages 2-3)'."""
    p = self.process_id if process is None else process
    return f"process {p} of {self.num_processes} ({self.where(p)})"

  def describe_stall(self, step: int) -> str:
    """This process, and the processes that have not even started device step `step`."""
    text = self.describe()
    if self.monitor is not None:
      late = self.monitor.behind(step)
      if late:
        text += "; not yet at this step: " + ", ".join(
            f"process {p} ({self.where(p)})" for p in late)
    return text

  def fail(self, line: str, code: int) -> NoReturn:
    """Ends this process with `line`; in a multi-process run every other one stops too."""
    if self.monitor is not None:
      self.monitor.fail(line, code)
    failfast.exit_now(line, code)

  @contextlib.contextmanager
  def guard(self) -> Iterator[None]:
    """Turns what escapes an entry point into one line and an exit code.

    A JaxppError is a one-line `error:` and exit 1; with several processes it also stops
    the others. A failed collective (a peer died under gloo) waits briefly for the peer
    monitor's verdict, which names the lost process, before reporting the bare error. Any
    other exception of a multi-process run keeps its traceback and stops the others too.
    """
    try:
      yield
    except JaxppError as e:
      message = " ".join(str(e).split())
      if self.num_processes == 1:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
      self.fail(f"error: process {self.process_id} ({self.where()}): {message}", 1)
    except jax.errors.JaxRuntimeError as e:
      if self.monitor is None:
        raise
      self.monitor.await_verdict()
      self.fail(f"error: a device step failed on {self.describe()}: {_first_line(e)}", 1)
    except Exception as e:  # a bug: the others must not wait for this process forever
      if self.monitor is None:
        raise
      traceback.print_exc()
      self.fail(f"error: {self.describe()} stopped on {type(e).__name__}: {_first_line(e)}",
                1)

  def broadcast_json(self, value: Any) -> Any:
    """Process 0's JSON-able `value`, on every process (the others pass None).

    Used for the resume state: only process 0 reads the output, so a multi-host run does
    not need the output on a shared filesystem, and all processes skip the same tickets.
    """
    if self.num_processes == 1:
      return value
    data = np.frombuffer(json.dumps(value).encode() if self.is_writer else b"", np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    padded = np.zeros(size, np.uint8)
    padded[:data.size] = data
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded))))

  def close(self) -> None:
    """Says this process is done, then shuts JAX's runtime down (all processes meet)."""
    if self.monitor is None:
      return
    if self.hook is not None:
      self.hook.closing = True
    self.monitor.stop()
    jax.distributed.shutdown()


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


_current: Runtime | None = None
