"""Where the device time of a traced run goes, read from a `jax.profiler` trace.

`jax.profiler.trace(dir)` writes an XSpace (`*.xplane.pb`); TensorBoard can draw it, but a
benchmark wants numbers it can print and diff. This reads the XSpace with
`jax.profiler.ProfileData` and sums, per device and per compiled program (XLA module), the
time of every XLA op the device ran, in four classes: matmuls (cuBLAS / cuDNN kernels and
dots), collectives (NCCL all-reduce, collective-permute, ...), copies (copies, slices and
scatters that move bytes without arithmetic) and other fusions (element-wise, reductions,
attention's softmax, ...). A device's *busy* time is the union of its kernels' intervals;
*window* runs from its first kernel's start to its last one's end, so busy / window is the
share of the traced run the device had work (the rest: host time, waits, launch gaps).

GPU traces carry one event per kernel on the device's plane; CPU traces carry one per XLA
op on the host plane, tagged with the device ordinal. Both name the op (`hlo_op`) and the
program (`hlo_module`), which is all this needs. On CPU a loop's or a conditional's event
encloses its body's, so ops are charged their self time (less the events inside them). On
GPU, kernels of one CUDA graph may run side by side, so a program's summed kernel time can
exceed its busy time.
"""

from __future__ import annotations

import collections
import pathlib
import re
from typing import NamedTuple

KERNEL_KINDS = (
    ("collective", re.compile(r"all-reduce|all-gather|reduce-scatter|collective-permute|"
                              r"all-to-all|ppermute|psum|nccl|send|recv", re.I)),
    ("matmul", re.compile(r"gemm|gemv|cublas|cutlass|nvjet|xmma|cudnn|\bdot|matmul|conv", re.I)),
    ("copy", re.compile(r"^copy|dynamic-slice|dynamic_slice|dynamic-update-slice|"
                        r"dynamic_update_slice|scatter|transpose|memcpy|memset", re.I)),
)
OTHER = "other"
# Lines the profiler derives from the kernels themselves (on GPU planes): counting them too
# would count each kernel twice.
_DERIVED_LINES = ("XLA Ops", "XLA Modules", "Steps", "XLA TraceMe", "Framework Ops",
                  "Framework Name Scope", "Source code")

# XLA runs runs of ops as one CUDA graph ("command buffer"); its kernels carry the graph's
# name as their op and their own (the fusion's) name as the event's.
_COMMAND_BUFFER = "command_buffer"


def op_class(op: str, kernel: str) -> str:
  """The class of an op from its HLO name and its kernel's name (a GEMM hides in a
  `custom-call.N` whose kernel is named `...gemm...`)."""
  for name, pattern in KERNEL_KINDS:
    if pattern.search(kernel) or pattern.search(op):
      return name
  return OTHER


def find_trace(directory) -> pathlib.Path:
  """The newest `*.xplane.pb` under `directory` (jax.profiler nests it in a timestamp)."""
  found = sorted(pathlib.Path(directory).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  if not found:
    raise FileNotFoundError(f"no *.xplane.pb under {directory}: was jax.profiler.trace run?")
  return found[-1]


class Event(NamedTuple):
  device: str
  module: str  # the compiled program
  op: str  # the HLO op
  kernel: str  # the event's own name (a GPU kernel's name)
  start_ns: float
  duration_ns: float
  self_ns: float  # duration less the events nested inside it


def _self_times(line: list[Event]) -> list[Event]:
  """Events of one timeline with each one's self time: less the events nested inside it."""
  order = sorted(range(len(line)), key=lambda i: (line[i].start_ns, -line[i].duration_ns))
  own = [e.duration_ns for e in line]
  stack: list[int] = []  # enclosing events, innermost last
  for i in order:
    while stack and line[stack[-1]].start_ns + line[stack[-1]].duration_ns <= line[i].start_ns:
      stack.pop()
    if stack:
      own[stack[-1]] -= line[i].duration_ns
    stack.append(i)
  return [e._replace(self_ns=max(t, 0.0)) for e, t in zip(line, own)]


def events(path) -> list[Event]:
  """Every XLA op event of a trace file, with self times."""
  from jax.profiler import ProfileData  # jaxlib's reader, no TensorBoard needed

  data = ProfileData.from_file(str(path))
  out = []
  for plane in data.planes:
    on_device = plane.name.startswith("/device:")
    for line in plane.lines:
      if on_device and line.name in _DERIVED_LINES:
        continue
      found = []
      for e in line.events:
        stats = dict(e.stats)
        if "hlo_op" not in stats or "hlo_module" not in stats:
          continue
        device = plane.name if on_device else f"cpu:{stats.get('device_ordinal', 0)}"
        op = str(stats["hlo_op"])
        if op.startswith(_COMMAND_BUFFER):  # a CUDA graph of many ops: name its kernels
          op = e.name
        found.append(Event(device, str(stats["hlo_module"]), op, e.name,
                           float(e.start_ns), float(e.duration_ns), float(e.duration_ns)))
      # On a GPU, kernels never enclose one another (a CUDA graph's branches may overlap in
      # time, which is not nesting): each keeps its own duration.
      out += found if on_device else _self_times(found)
  return out


def _merged(intervals: list[tuple[float, float]], gap: float = 0.0) -> list[list[float]]:
  """Sorted intervals with overlaps (and gaps up to `gap`) joined."""
  out: list[list[float]] = []
  for start, stop in sorted(intervals):
    if out and start <= out[-1][1] + gap:
      out[-1][1] = max(out[-1][1], stop)
    else:
      out.append([start, stop])
  return out


def _union_ns(intervals: list[tuple[float, float]]) -> float:
  return sum(stop - start for start, stop in _merged(intervals))


def activity(evs: list[Event], gap_ns: float = 2e3) -> dict[str, dict[str, list]]:
  """{device: {program: [[start_ns, stop_ns], ...]}}: when each device ran each program's
  kernels, gaps shorter than `gap_ns` closed (launch gaps inside a step, not idle time)."""
  spans = collections.defaultdict(lambda: collections.defaultdict(list))
  for e in evs:
    spans[e.device][e.module].append((e.start_ns, e.start_ns + e.duration_ns))
  return {d: {m: _merged(s, gap_ns) for m, s in progs.items()}
          for d, progs in sorted(spans.items())}


def first_call(intervals: list[list[float]], gap_ns: float = 1e6) -> tuple[float, float]:
  """(start, stop) of the first call of a program: its intervals up to the first gap of
  `gap_ns` or more, over all devices together."""
  runs = _merged([tuple(i) for i in intervals], gap_ns)
  return runs[0][0], runs[0][1]


def summarize(evs: list[Event]) -> dict:
  """Per-device busy / window time and per-program op times (ms) of one trace's `events`.

  {"devices": {device: {"busy_ms", "window_ms"}},
   "programs": {module: {"ms": {device: ms}, "classes": {class: ms summed over devices},
                         "ops": [{"op", "class", "count", "ms"}] (summed over devices)}}}
  """
  spans = collections.defaultdict(list)
  ms = collections.defaultdict(lambda: collections.defaultdict(float))
  ops = collections.defaultdict(lambda: collections.defaultdict(lambda: [None, 0, 0.0]))
  for e in evs:
    spans[e.device].append((e.start_ns, e.start_ns + e.duration_ns))
    ms[e.module][e.device] += e.self_ns / 1e6
    entry = ops[e.module][e.op]
    entry[0] = entry[0] or op_class(e.op, e.kernel)
    entry[1] += 1
    entry[2] += e.self_ns / 1e6
  if not spans:
    raise ValueError("the trace holds no XLA op events (was anything run inside it?)")
  devices = {d: dict(busy_ms=_union_ns(s) / 1e6,
                     window_ms=(max(e for _, e in s) - min(b for b, _ in s)) / 1e6)
             for d, s in sorted(spans.items())}
  programs = {}
  for module in sorted(ms, key=lambda m: -sum(ms[m].values())):
    rows = sorted(({"op": op, "class": c, "count": n, "ms": t}
                   for op, (c, n, t) in ops[module].items()), key=lambda r: -r["ms"])
    classes = collections.defaultdict(float)
    for r in rows:
      classes[r["class"]] += r["ms"]
    programs[module] = dict(ms=dict(ms[module]), classes=dict(classes), ops=rows)
  return dict(devices=devices, programs=programs)


def markdown(summary: dict, title: str, top: int = 12, min_share: float = 0.01) -> str:
  """The summary as Markdown: devices' busy share, then the classes and top ops of each
  program with at least `min_share` of the kernel time (the rest named on one line)."""
  lines = [f"### {title}", "", "| device | busy ms | window ms | busy share |", "|---|---|---|---|"]
  for d, t in summary["devices"].items():
    share = t["busy_ms"] / t["window_ms"] if t["window_ms"] else 0.0
    lines.append(f"| {d} | {t['busy_ms']:,.1f} | {t['window_ms']:,.1f} | {share:.0%} |")
  totals = {m: sum(p["classes"].values()) for m, p in summary["programs"].items()}
  small = [m for m, t in totals.items() if t < min_share * sum(totals.values())]
  for module, prog in summary["programs"].items():
    if module in small:
      continue
    total = totals[module]
    per_dev = prog["ms"].values()
    lines += ["", f"**{module}**: {total:,.1f} ms over {len(prog['ms'])} device(s) "
              f"(max {max(per_dev):,.1f}, min {min(per_dev):,.1f} ms a device); " +
              ", ".join(f"{c} {t / total:.0%}" for c, t in
                        sorted(prog["classes"].items(), key=lambda kv: -kv[1])),
              "", "| op | class | count | ms | µs each | share |", "|---|---|---|---|---|---|"]
    for r in prog["ops"][:top]:
      lines.append(f"| `{r['op']}` | {r['class']} | {r['count']:,} | {r['ms']:,.2f} | "
                   f"{1e3 * r['ms'] / r['count']:,.1f} | {r['ms'] / total:.1%} |")
  if small:
    lines += ["", "Also ran (under {:.0%} of the kernel time each): ".format(min_share) +
              ", ".join(f"{m} {totals[m]:,.1f} ms" for m in small) + "."]
  return "\n".join(lines)
