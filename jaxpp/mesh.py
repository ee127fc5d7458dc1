"""The device mesh, and the names of its axes (declared here once, used everywhere).

Axes, outermost first: `dp` (independent replicas), `pp` (pipeline stages), `tp` (tensor
parallel inside a stage). Device order follows JAX's own mesh utilities: `tp` is the
innermost axis, so each tp group sits on the closest devices (one NVLink island); on several
hosts `create_hybrid_device_mesh` keeps tp groups inside a host and puts stage boundaries
(and replicas) across hosts, where only neighbour sends travel.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from jaxpp.errors import JaxppError

DP, PP, TP = "dp", "pp", "tp"
AXES = (DP, PP, TP)


def make_mesh(pp: int = 1, tp: int = 1, dp: int = 1, devices=None) -> Mesh:
  """A (dp, pp, tp) mesh over `devices` (default: all); the sizes must multiply out."""
  devices = list(jax.devices() if devices is None else devices)
  if min(pp, tp, dp) < 1:
    raise JaxppError(f"pp={pp}, tp={tp}, dp={dp} must all be >= 1")
  if pp * tp * dp != len(devices):
    raise JaxppError(f"pp*tp*dp = {pp}*{tp}*{dp} = {pp * tp * dp} but there are "
                     f"{len(devices)} devices; the layout must use every device")
  hosts = sorted({d.process_index for d in devices})
  if len(hosts) > 1:
    per_host = len(devices) // len(hosts)
    if tp > per_host or per_host % tp:
      raise JaxppError(f"tp={tp} must divide the {per_host} devices of each host "
                       "(tensor parallelism stays inside a host)")
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
