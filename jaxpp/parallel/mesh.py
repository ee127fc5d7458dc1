"""The device mesh over the axes of `jaxpp/axes.py`.

Axes, outermost first: `dp` (independent replicas), `pp` (pipeline stages), `tp` (tensor
parallel inside a stage). Device order follows JAX's own mesh utilities: `tp` is the
innermost axis, so each tp group sits on the closest devices (one NVLink island). With
several processes (hosts) the devices are laid out process by process, so tp groups stay
inside a process and stage boundaries (and replicas) fall between processes, where only
neighbour sends travel; a layout that would split a tp group across processes is refused.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from jaxpp.axes import AXES
from jaxpp.errors import JaxppError


def make_mesh(pp: int = 1, tp: int = 1, dp: int = 1, devices=None) -> Mesh:
  """A (dp, pp, tp) mesh over `devices` (default: all); the sizes must multiply out.

  With several processes every process must hold the same number of the devices and tp
  must divide it, so that pp (not tp) is what crosses between processes.
  """
  devices = list(jax.devices() if devices is None else devices)
  if min(pp, tp, dp) < 1:
    raise JaxppError(f"pp={pp}, tp={tp}, dp={dp} must all be >= 1")
  if pp * tp * dp != len(devices):
    raise JaxppError(f"pp*tp*dp = {pp}*{tp}*{dp} = {pp * tp * dp} but there are "
                     f"{len(devices)} devices; the layout must use every device")
  per_process = collections.Counter(d.process_index for d in devices)
  left_out = sorted(set(range(jax.process_count())) - set(per_process))
  if left_out:
    raise JaxppError(f"process(es) {left_out} hold no device of the layout; in a "
                     "multi-process run every process must hold stages")
  if len(per_process) > 1:
    counts = sorted(set(per_process.values()))
    if len(counts) > 1:
      raise JaxppError(f"the layout's processes hold different numbers of devices "
                       f"({dict(sorted(per_process.items()))}); give every process the same")
    if counts[0] % tp:
      raise JaxppError(f"tp={tp} must divide the {counts[0]} devices of each process: tensor "
                       "parallelism stays inside a process, pp spans processes")
    grid = _host_major(devices, dp, pp, tp)
  else:
    try:
      grid = mesh_utils.create_device_mesh((dp, pp, tp), devices=devices)
    except (AssertionError, NotImplementedError, ValueError):
      grid = np.array(devices).reshape(dp, pp, tp)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * 3)


def _host_major(devices, dp: int, pp: int, tp: int) -> np.ndarray:
  """Orders devices host by host, local id within a host: tp groups never span hosts."""
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  return np.array(ordered, dtype=object).reshape(dp, pp, tp)


def stages_by_process(mesh: Mesh) -> dict[int, list[int]]:
  """Which pp stages each process holds devices of, for logs and failure messages."""
  held: dict[int, set[int]] = {}
  for (_, stage, _), device in np.ndenumerate(mesh.devices):
    held.setdefault(device.process_index, set()).add(stage)
  return {p: sorted(s) for p, s in sorted(held.items())}


def describe_stages(stages: list[int]) -> str:
  """'pp stage 2', 'pp stages 2-3', 'pp stages 0, 2'."""
  if not stages:
    return "no pp stage"
  if len(stages) == 1:
    return f"pp stage {stages[0]}"
  if stages == list(range(stages[0], stages[-1] + 1)):
    return f"pp stages {stages[0]}-{stages[-1]}"
  return "pp stages " + ", ".join(map(str, stages))


def per_device_bytes(tree) -> dict:
  """{device: bytes} of a pytree of jax arrays, counting only each device's own shards."""
  out: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out
