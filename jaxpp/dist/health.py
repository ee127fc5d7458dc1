"""Start-up health probe: one tiny program on every device of the layout, checked per stage.

Before the weights are read, every stage computes a known number (a small matmul on each of
its devices), sums it over its tp group and passes it to the next stage around the pp ring:
the three things the pipeline's programs rely on. A device that computes wrong, a tp link
or a stage-to-stage link (a network hop between hosts) that does not deliver, or a process
that is not where the layout expects it, then stops the job within seconds, with the stage
named, instead of surfacing as a hang or as garbage minutes into a weight load. Each
process logs its host, its devices and the stages they hold.
"""

from __future__ import annotations

import dataclasses
import functools
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec as P

from jaxpp.errors import JaxppError
from jaxpp.axes import DP, PP, TP

SIZE = 64  # the probe's matmul is [SIZE, SIZE] x [SIZE, SIZE]


@dataclasses.dataclass
class StageHealth:
  """What one stage of one replica answered; `problem` is None when it is healthy."""
  replica: int
  stage: int
  process: int
  devices: list[str]
  problem: str | None = None


def device_name(d) -> str:
  return f"{d.platform}:{d.id}"


@functools.cache  # one compile per mesh, however many jobs a process runs
def _program(mesh: Mesh):
  pp, tp = mesh.shape[PP], mesh.shape[TP]

  def body():
    s = jax.lax.axis_index(PP).astype(jnp.float32)
    a = jnp.full((SIZE, SIZE), (s + 1) / SIZE, jnp.float32)
    computed = jnp.dot(a, jnp.ones((SIZE, SIZE), jnp.float32))[0, 0]  # = s + 1
    summed = jax.lax.psum(computed, TP) / tp
    received = jax.lax.ppermute(summed, PP, [(i, (i + 1) % pp) for i in range(pp)])
    return jnp.stack([computed, summed, received]).reshape(1, 1, 1, 3)

  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(), out_specs=P(DP, PP, TP, None)))


def probe(mesh: Mesh) -> list[StageHealth]:
  """Runs the probe on every device of `mesh` (every process must call it); checks answers."""
  values = np.asarray(multihost_utils.process_allgather(_program(mesh)(), tiled=True))
  return check(mesh, values)


def check(mesh: Mesh, values: np.ndarray) -> list[StageHealth]:
  """Per-stage verdicts from the probe's [dp, pp, tp, 3] answers: each device's own matmul,
  its tp group's mean, and what arrived from the previous stage."""
  dp, pp, _ = mesh.devices.shape
  out = []
  for r in range(dp):
    for s in range(pp):
      devices = list(mesh.devices[r, s])
      names = [device_name(d) for d in devices]
      computed, summed, received = (values[r, s, :, i] for i in range(3))
      health = StageHealth(r, s, devices[0].process_index, names)
      prev = (s - 1) % pp
      wrong = [(n, v, want, what) for arr, want, what in (
          (computed, s + 1, "computed"), (summed, s + 1, "got over its tp group"),
          (received, prev + 1, f"received from pp stage {prev}"))
               for n, v in zip(names, arr) if not np.isclose(v, want)]
      if wrong:
        n, v, want, what = wrong[0]
        health.problem = f"device {n} {what} {v:g}, expected {want}"
      out.append(health)
  return out


def startup(mesh: Mesh, watchdog, log) -> None:
  """The job's and the benchmark's start-up check: probe, log this process's stages, judge.

  Raises a one-line JaxppError naming the first unhealthy stage, the same on every process
  (every process sees every stage's answers). The probe runs under the watchdog, so a stage
  that never answers is named by it instead of hanging the start.
  """
  start = time.perf_counter()
  with watchdog.step("health probe"):
    stages = probe(mesh)
  seconds = time.perf_counter() - start
  me = jax.process_index()
  for h in stages:
    if h.process == me:
      replica = f"replica {h.replica} " if mesh.devices.shape[0] > 1 else ""
      log(f"health: {replica}pp stage {h.stage} of {mesh.devices.shape[1]}: process {me} "
          f"on host {socket.gethostname()}, devices {' '.join(h.devices)}: "
          f"{'ok' if h.problem is None else 'FAILED, ' + h.problem} ({seconds:.2f} s)")
  bad = [h for h in stages if h.problem is not None]
  if bad:
    h = bad[0]
    raise JaxppError(f"health probe: pp stage {h.stage} (process {h.process}, devices "
                     f"{' '.join(h.devices)}) {h.problem}; not starting"
                     + (f" ({len(bad) - 1} more unhealthy stage(s))" if len(bad) > 1 else ""))
