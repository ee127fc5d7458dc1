"""Continuous batching on the pipeline's decode ring (host side).

The KV cache has M micro-batches (the ring's m) of b slots each. Requests wait in one queue
per priority class. At every return from the device (every `decode_chunk` tokens) finished
sequences leave their slots, waiting requests are admitted into free slots and prefilled
through the pipeline straight into those slots, and the ring goes on with the new mix.

- Even fill: a request goes to the least-loaded replica (with dp replicas, each owns b / dp
  rows of every micro-batch and runs its own ring), there to the micro-batch with the
  fewest live sequences; b = dp * ceil(max_num_seqs / (dp * m)), so no micro-batch of a
  replica ever holds more than its share. `max_num_seqs` counts all replicas together.
- KV admission: each slot owns max_len positions of cache on every stage (the dense cache is
  allocated up front), so a request is admitted only into a free slot and only if its
  prompt plus max_new_tokens (less the last token, never fed back) fits max_len; a request
  that can never fit is refused at submit (the job turns that into an errors-file line),
  never truncated silently. Requests
  that do not fit now wait: backpressure, not out-of-memory.
- Priority reserve: `reserve[c]` slots are kept for class c; another class may take a free
  slot only while the free slots left cover every other class's unmet reserve.
- Reproducible sampling: keys come from (request seed, token position) only (`sampling.py`),
  so a request's tokens do not depend on its slot, its neighbours or the layout.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from typing import Callable, Hashable, Protocol

import numpy as np

from jaxpp.errors import JaxppError
from jaxpp.model import decode_state, penalties, sampling
from jaxpp.model import params as params_lib
from jaxpp.parallel import schedule, shapes
from jaxpp.parallel.pipeline import Pipeline
from jaxpp.serve import defaults, logprobs, stop_strings
from jaxpp.serve.prefill import Prefiller
from jaxpp.serve.stats import EngineStats
from jaxpp.serve.token_history import TokenHistory


class StepGuard(Protocol):
  """What the engine needs of a watchdog (`dist.watchdog.Watchdog` is one): a context
  around each device call and its fetch, keyed by the compiled program it runs."""

  def step(self, name: str, key: Hashable = None) -> contextlib.AbstractContextManager: ...

PRIORITIES = ("interactive", "batch")  # admission order


@dataclasses.dataclass
class Request:
  key: str  # unique id of the request
  prompt: list[int]
  max_new_tokens: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  min_p: float = 0.0
  repetition_penalty: float = 1.0  # the penalties as `model/penalties.py` defines them
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  priority: str = "batch"
  stop: tuple[str, ...] = ()  # stop strings (`stop_strings.py`; needs the engine's detokenize)
  stop_token_ids: tuple[int, ...] = ()  # ids that end this request besides the EOS ids
  logprobs: int | None = None  # report each token's logprob and this many alternatives


@dataclasses.dataclass
class Finished:
  request: Request
  token_ids: list[int]
  finish_reason: str  # "stop" (a stop id or stop string) or "length"
  text: str | None = None  # set when a stop string ended it: the text before the string
  # with Request.logprobs: each token's logprob, and its top alternatives as (id, logprob)
  logprobs: list[float] | None = None
  top_logprobs: list[list[tuple[int, float]]] | None = None


class Engine:
  """Schedules requests onto a pipeline holding `params`: submit(), then run().

  `max_len` is each slot's context, `decode_chunk` the tokens per return to the host and
  `eos_ids` the stop ids; `jaxpp.LLM.engine()` passes its own.

  With a `watchdog`, every device step (prefill, decode chunk) runs under its deadline.
  """

  def __init__(self, pipe: Pipeline, params, *, max_len: int, decode_chunk: int,
               eos_ids: tuple[int, ...], max_num_seqs: int | None = None,
               reserve: dict[str, int] | None = None, watchdog: StepGuard | None = None,
               detokenize: stop_strings.Detokenize | None = None):
    self.pipe, self.params, self.watchdog = pipe, params, watchdog
    self.detokenize = detokenize  # ids -> text, for requests with stop strings
    self.max_len, self.decode_chunk, self.eos_ids = max_len, decode_chunk, tuple(eos_ids)
    if decode_chunk < 1:
      raise JaxppError(f"decode_chunk={decode_chunk} must be >= 1")
    M = self.M = self.pipe.microbatches
    self.max_num_seqs = max_num_seqs or defaults.max_num_seqs(
        pipe, max_len, params_lib.activation_dtype(params).itemsize)
    if self.max_num_seqs < 1:
      raise JaxppError(f"max_num_seqs={self.max_num_seqs} must be >= 1")
    self.dp = pipe.dp
    # b: slots per micro-batch (even fill), each replica's block of them alike
    self.replica_rows = shapes.split_rows(self.max_num_seqs, M * self.dp)
    self.rows = self.dp * self.replica_rows
    self.reserve = {c: 0 for c in PRIORITIES} | dict(reserve or {})
    unknown = set(self.reserve) - set(PRIORITIES)
    if unknown:
      raise JaxppError(f"priority reserve names unknown class(es) {sorted(unknown)}; "
                       f"classes: {', '.join(PRIORITIES)}")
    for cls in PRIORITIES:  # every class must be able to get a slot, or its queue never moves
      others = sum(n for c, n in self.reserve.items() if c != cls)
      if others >= self.max_num_seqs:
        raise JaxppError(f"priority reserves {self.reserve} leave no slot of max_num_seqs="
                         f"{self.max_num_seqs} for class {cls!r}")
    shape = (M, self.rows)
    self.prefiller = Prefiller(pipe, max_len, M * self.rows, self.eos_ids)
    self.cache = self.pipe.init_cache(self.rows, max_len, params_lib.activation_dtype(params))
    self.state = decode_state.DecodeState(np.zeros(shape, np.int32), np.ones(shape, np.int32),
                                      np.zeros(shape, np.int32), np.ones(shape, bool))
    self.sampling = sampling.SamplingParams(*(
        a.reshape(shape).copy() for a in sampling.SamplingParams.checked(M * self.rows)))
    self.owner: list[list[Request | None]] = [[None] * self.rows for _ in range(M)]
    self.tokens: dict[tuple[int, int], list[int]] = {}
    self.history = TokenHistory(M, self.rows, max_len)  # for rows with penalties
    self.logprobs = logprobs.TokenLogprobs()  # for requests that ask (Request.logprobs)
    self.queues = {c: collections.deque() for c in PRIORITIES}
    self.stats = EngineStats()
    self._decode_programs: set = set()  # keys of decode programs already run (compiled)
    self._last_decode_end: float | None = None  # host time the last timed decode returned
    self._prefill_since = 0.0  # prefill seconds since then

  # --- admission --------------------------------------------------------------------------

  def submit(self, request: Request) -> None:
    """Queues a request; refuses one that could never run (one-line JaxppError)."""
    if request.priority not in self.queues:
      raise JaxppError(f"request {request.key}: unknown priority {request.priority!r}; "
                       f"classes: {', '.join(PRIORITIES)}")
    # every token but the last is fed back, so it needs a cache position
    need = len(request.prompt) + request.max_new_tokens - 1
    if not request.prompt or request.max_new_tokens < 1 or need > self.max_len:
      raise JaxppError(f"request {request.key}: prompt of {len(request.prompt)} tokens + "
                       f"max_new_tokens={request.max_new_tokens} does not fit max_len="
                       f"{self.max_len}")
    try:  # every knob checked here, once: inside a program a bad one is silent garbage
      sampling.SamplingParams.checked(1, **{f: getattr(request, f)
                                            for f in sampling.SamplingParams._fields})
    except JaxppError as e:
      raise JaxppError(f"request {request.key}: {e}") from None
    if request.stop and self.detokenize is None:
      raise JaxppError(f"request {request.key}: stop strings need a tokenizer")
    if request.logprobs is not None and not 0 <= request.logprobs <= sampling.MAX_TOP_LOGPROBS:
      raise JaxppError(f"request {request.key}: logprobs={request.logprobs} must be in [0, "
                       f"{sampling.MAX_TOP_LOGPROBS}] (alternatives per token)")
    self.queues[request.priority].append(request)

  def live(self) -> np.ndarray:
    """int [M]: live sequences per micro-batch (all replicas)."""
    return self.live_by_replica().sum(axis=0)

  def live_by_replica(self) -> np.ndarray:
    """int [dp, M]: live sequences per replica and micro-batch."""
    b = self.replica_rows
    return np.array([[sum(o is not None for o in row[d * b:(d + 1) * b]) for row in self.owner]
                     for d in range(self.dp)])

  def waiting(self) -> int:
    return sum(map(len, self.queues.values()))

  def _live_by_class(self) -> dict[str, int]:
    counts = collections.Counter(o.priority for row in self.owner for o in row if o)
    return {c: counts.get(c, 0) for c in PRIORITIES}

  def _admit(self) -> list[tuple[Request, int, int]]:
    """Moves waiting requests into free slots, interactive first, honouring reserves."""
    admitted = []
    live = self.live_by_replica()
    by_class = self._live_by_class()
    for cls in PRIORITIES:
      queue = self.queues[cls]
      while queue:
        free = self.max_num_seqs - int(live.sum())
        owed = sum(max(0, self.reserve[c] - by_class[c]) for c in PRIORITIES if c != cls)
        if free - owed < 1:
          break
        full, b = np.iinfo(np.int32).max, self.replica_rows
        open_ = live < b  # [dp, M]: micro-batches of a replica with a free row
        if not open_.any():
          break
        d = int(np.argmin(np.where(open_.any(axis=1), live.sum(axis=1), full)))
        j = int(np.argmin(np.where(open_[d], live[d], full)))
        r = d * b + self.owner[j][d * b:(d + 1) * b].index(None)
        request = queue.popleft()
        self.owner[j][r] = request
        live[d, j] += 1
        by_class[cls] += 1
        admitted.append((request, j, r))
    self.stats.max_live_per_microbatch = max(self.stats.max_live_per_microbatch,
                                             int(live.max()))
    return admitted

  # --- device work ------------------------------------------------------------------------

  def _device_step(self, name: str, key) -> contextlib.AbstractContextManager:
    """The watchdog's deadline around one device call and its fetch.

    `key` holds the call's shapes and static arguments, i.e. it names the compiled program,
    so each program's expected time is learned from its own calls.
    """
    return self.watchdog.step(name, key) if self.watchdog else contextlib.nullcontext()

  def _prefill_admitted(self, admitted: list[tuple[Request, int, int]]) -> None:
    """Prefills newly admitted requests into their slots, packed (`prefill.py`); sets their
    decode state."""
    knobs = []
    for req, j, r in admitted:
      values = {f: getattr(req, f) & 0xFFFFFFFF if f == "seed" else getattr(req, f)
                for f in self.sampling._fields}
      for f, value in values.items():
        getattr(self.sampling, f)[j, r] = value
      knobs.append(values)
    start = time.perf_counter()
    top = logprobs.wanted(req.logprobs for req, _, _ in admitted)
    new, self.cache, lps = self.prefiller.run(
        self.params, self.cache, [req.prompt for req, _, _ in admitted],
        [(j, r) for _, j, r in admitted], knobs, [req.max_new_tokens for req, _, _ in admitted],
        lambda key: self._device_step("prefill", key), logprobs=top)
    seconds = time.perf_counter() - start
    self.stats.prefill_seconds += seconds
    self.stats.prefill_calls += 1
    self._prefill_since += seconds
    self.stats.prefill_positions += int(np.prod(self.prefiller.last_shape))
    if self.prefiller.last_first:
      self.stats.prefill_shapes += 1
      self.stats.prefill_first_seconds += seconds
      self.stats.prefill_first_tokens += sum(len(req.prompt) for req, _, _ in admitted)
    for i, (req, j, r) in enumerate(admitted):
      self.stats.prompt_tokens += len(req.prompt)
      self.tokens[(j, r)] = [int(new.tokens[i])]
      self.history.start((j, r), req.prompt, int(new.tokens[i]))
      if lps is not None:
        self.logprobs.add((j, r), req.logprobs, *(a[i] for a in lps))
      for field, value in zip(self.state, new):
        field[j, r] = value[i]

  def precompile_prefills(self, prompt_lengths, admissions=None) -> int:
    """Runs the greedy prefill program of every shape an admission of these prompt lengths
    can take (or of exactly `admissions`, lists of prompt lengths), filling no slot;
    returns how many ran.

    Admissions of different sizes and prompt lengths are different programs; a benchmark
    calls this first so that no compile lands in its timed run.
    """
    ran, self.cache = self.prefiller.precompile(
        self.params, self.cache, prompt_lengths, lambda key: self._device_step("prefill", key),
        admissions)
    return ran

  def _decode(self) -> None:
    """One return-to-host worth of tokens for every live slot."""
    k = self.decode_chunk
    live = ~self.state.done
    do_sample = bool(np.any(self.sampling.temperature[live] > 0))
    knobs = self.sampling
    penalised = bool(np.any(penalties.is_on(knobs.repetition_penalty, knobs.presence_penalty,
                                            knobs.frequency_penalty)[live]))
    # Host arrays go to the jitted call as they are: jit copies each straight to the devices
    # that need it, where jnp.asarray would first commit it to one device, then reshard.
    state = decode_state.DecodeState(*self.state)
    history = self.history.arrays() if penalised else None
    top = logprobs.wanted(self.owner[j][r].logprobs for j, r in self.tokens)
    eos, key = self.eos_ids, (live.shape, k, do_sample, self.eos_ids, top, penalised)
    start = time.perf_counter()
    with self._device_step("decode", key):
      self.cache, state, emitted, *lps = self.pipe.decode(
          self.params, self.cache, state, knobs, history, steps=k, do_sample=do_sample,
          eos_ids=eos, **({} if top is None else dict(logprobs=top)))
      emitted = np.asarray(emitted)
      lps = tuple(np.asarray(a) for a in lps[0]) if lps else None
    seconds = time.perf_counter() - start
    self.state = decode_state.DecodeState(*(np.array(a) for a in state))
    self.stats.decode_seconds += seconds
    self.stats.decode_calls += 1
    first = key not in self._decode_programs
    if first:  # a compiling first call would skew the timings
      self._decode_programs.add(key)
      self._last_decode_end = None
      self.stats.decode_first_seconds += seconds
    else:
      self._time_decode(start, seconds, self.pipe.decode_table(self.M, k))
    self._prefill_since = 0.0
    for (j, r), toks in self.tokens.items():
      new = [int(t) for t in emitted[j, r] if t >= 0]
      toks.extend(new)
      self.history.extend((j, r), new)
      self.stats.completion_tokens += len(new)
      self.stats.decode_first_tokens += len(new) if first else 0
      if lps is not None:
        self.logprobs.add((j, r), self.owner[j][r].logprobs, *(a[j, r] for a in lps),
                          n=len(new))

  def _time_decode(self, start: float, seconds: float, table: np.ndarray) -> None:
    """Per-tick time and stage occupancy of one decode call (not a program's first).

    Every tick of the ring is one synchronous step of every stage (each stage's slice is a
    collective-permute away from the next), so a call's time over its ticks is one
    stage-step's latency. The stages computed in `busy` of the table's stage-ticks; the
    rest is fill and drain. The host time since the previous timed call, less the prefills
    in between, is time the ring sat idle.
    """
    ticks = len(table)
    self.stats.tick_seconds.append(seconds / ticks)
    busy = float(np.mean(table[..., 0] != schedule.IDLE))
    self.stats.decode_timed_seconds += seconds
    self.stats.decode_busy_seconds += seconds * busy
    if self._last_decode_end is not None:
      self.stats.decode_gap_seconds += max(start - self._last_decode_end - self._prefill_since,
                                           0.0)
    self._last_decode_end = start + seconds

  def _stop(self, request: Request, toks: list[int]) -> tuple[int, str | None] | None:
    """(tokens to keep, text or None) where the request's own stop ids or strings end it."""
    at = stop_strings.first_stop_id(toks, request.stop_token_ids)
    stop = None if at is None else (at, None)
    if request.stop:
      found = stop_strings.find_stop(self.detokenize, toks[:at], request.stop)
      stop = found or stop
    return stop

  def _retire(self) -> list[Finished]:
    """Frees the slots of finished sequences (a stop string ends one here too)."""
    done = []
    eos = self.eos_ids
    for (j, r), toks in list(self.tokens.items()):
      stop = self._stop(self.owner[j][r], toks)
      if stop is not None:
        self.stats.completion_tokens -= len(toks) - stop[0]
        del toks[stop[0]:]
        self.state.done[j, r] = True  # the next decode call skips the row
      if self.state.done[j, r]:
        del self.tokens[(j, r)]
        reason = "stop" if stop is not None or (toks and toks[-1] in eos) else "length"
        done.append(Finished(self.owner[j][r], toks, reason, stop[1] if stop else None,
                             *self.logprobs.pop((j, r), len(toks))))
        self.owner[j][r] = None
    return done

  def step(self) -> list[Finished]:
    """Admit + prefill, decode one chunk if anything is live, retire what finished."""
    admitted = self._admit()
    if self.waiting() and not admitted and not self.tokens:  # guarded by __init__'s check
      raise JaxppError("requests are waiting but none can be admitted")
    finished = []
    if admitted:
      self.stats.completion_tokens += len(admitted)  # each prefill samples one token
      self._prefill_admitted(admitted)
      finished += self._retire()
    if self.tokens:
      self._decode()
      finished += self._retire()
    return finished

  def measure_bubble(self) -> float:
    """Share of a decode call not spent in steady-state rounds, timed on the device.

    Runs the ring for k and 2k tokens with every slot live (before any request is admitted;
    the junk it writes sits beyond every row's length and is never read): the difference
    is k rounds at full pipe, the rest of a k-token call is fill, drain and host overhead.
    """
    if self.tokens:
      raise JaxppError("measure_bubble runs before requests are admitted")
    k, shape = self.decode_chunk, (self.M, self.rows)
    # Host arrays, as `_decode` passes them, so the timed calls are the engine's own.
    state = decode_state.DecodeState(np.zeros(shape, np.int32), np.ones(shape, np.int32),
                                 np.full(shape, 4 * k, np.int32), np.zeros(shape, bool))
    knobs = self.sampling
    seconds = {}
    for steps in (k, 2 * k, k, 2 * k):  # first pass compiles, second is timed
      start = time.perf_counter()
      with self._device_step("decode", (shape, steps, False, ())):
        self.cache, _, out = self.pipe.decode(self.params, self.cache, state, knobs,
                                              steps=steps, do_sample=False, eos_ids=())
        np.asarray(out)
      seconds[steps] = time.perf_counter() - start
    steady = seconds[2 * k] - seconds[k]  # k rounds with the pipe full
    return float(min(max(1.0 - steady / seconds[k], 0.0), 1.0))

  def run(self, on_finished: Callable[[Finished], None]) -> EngineStats:
    """Runs until every submitted request has finished; calls back as each one does."""
    while self.waiting() or self.tokens:
      for f in self.step():
        on_finished(f)
    return self.stats
