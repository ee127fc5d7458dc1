"""Continuous batching on the pipeline's decode ring (host side).

The KV cache has M micro-batches (the ring's m) of b slots each. Requests wait in one queue
per priority class. At every return from the device (every `decode_chunk` tokens) finished
sequences leave their slots, waiting requests are admitted into free slots and prefilled
through the pipeline straight into those slots, and the ring goes on with the new mix.

- Even fill: a request goes to the least-loaded replica (with dp replicas, each owns b / dp
  rows of every micro-batch and runs its own ring), there to the micro-batch with the
  fewest live sequences; b = dp * ceil(max_num_seqs / (dp * m)), so no micro-batch of a
  replica ever holds more than its share. `max_num_seqs` counts all replicas together.
- KV admission: with a paged cache (`block_size` > 0, the default) a request is admitted
  into a free slot when its prompt plus max_new_tokens fit its replica's free blocks
  (`kv_pages.py`), so short requests leave room for more in flight (`kv_grow`: when its
  prompt and one decode call fit; blocks grow in decode, and the newest sequence is swapped
  out and back when they run out, `kv_swap.py`); with a dense cache (`block_size=0`) each
  slot owns max_len positions on every stage. Either way a request
  whose prompt plus max_new_tokens (less the last token, never fed back) exceeds max_len
  or the whole pool is refused at submit (the job turns that into an errors-file line),
  never truncated silently. Requests that do not fit now wait, in order: backpressure,
  not out-of-memory.
- Priority reserve: `reserve[c]` slots are kept for class c; another class may take a free
  slot only while the free slots left cover every other class's unmet reserve.
- Reproducible sampling: keys come from (request seed, token position) only (`sampling.py`),
  so a request's tokens do not depend on its slot, its neighbours or the layout.
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Callable

import numpy as np

from jaxpp.errors import JaxppError
from jaxpp.model import decode_state, kv_cache, penalties, sampling
from jaxpp.model import params as params_lib
from jaxpp.parallel import shapes
from jaxpp.parallel.pipeline import Pipeline
from jaxpp.serve import (decode_rows, defaults, kv_pages, kv_swap, logprobs, prompt_pieces,
                         requests, slots, stop_strings)
from jaxpp.serve.requests import PRIORITIES, Finished, Request
from jaxpp.serve.device_call import InFlight, StepGuard
from jaxpp.serve.prefill import Prefiller
from jaxpp.serve.stats import EngineStats
from jaxpp.serve.token_history import TokenHistory


class Engine:
  """Schedules requests onto a pipeline holding `params`: submit(), then run().

  `max_len` is each slot's context, `decode_chunk` the tokens per return to the host and
  `eos_ids` the stop ids; `jaxpp.LLM.engine()` passes its own. `block_size` positions a
  KV block (0: a dense cache), `kv_cache_memory` the pool's budget per device (0: the
  default share of free memory, <= 1: a share of it, > 1: GB; `defaults.kv_blocks`), or
  `kv_blocks` > 0 the pool's blocks per replica outright (the null block counted).
  `max_num_seqs` is then a cap on the sequences in flight. `kv_dtype` "fp8" stores keys
  and values in e4m3 (`kv_cache.py`), "auto" in the activations' dtype.

  With a `watchdog`, every device step (prefill, decode chunk) runs under its deadline.
  """

  def __init__(self, pipe: Pipeline, params, *, max_len: int, decode_chunk: int,
               eos_ids: tuple[int, ...], max_num_seqs: int | None = None,
               reserve: dict[str, int] | None = None, watchdog: StepGuard | None = None,
               detokenize: stop_strings.Detokenize | None = None,
               block_size: int = defaults.BLOCK_SIZE, kv_cache_memory: float = 0.0,
               kv_blocks: int = 0, prefix_cache: bool = False, prefill_chunk: int = 0,
               kv_dtype: str = "auto", kv_grow: bool = False):
    self.pipe, self.params, self.watchdog = pipe, params, watchdog
    self.detokenize = detokenize  # ids -> text, for requests with stop strings
    self.max_len, self.decode_chunk, self.eos_ids = max_len, decode_chunk, tuple(eos_ids)
    if decode_chunk < 1:
      raise JaxppError(f"decode_chunk={decode_chunk} must be >= 1")
    kv_pages.check_options(block_size, kv_cache_memory, prefix_cache, prefill_chunk,
                           kv_dtype=kv_dtype, kv_grow=kv_grow)
    self.prefill_chunk = prefill_chunk
    M = self.M = self.pipe.microbatches
    dtype = kv_cache.storage_dtype(kv_dtype, params_lib.activation_dtype(params))
    kv_cache.check_backend(kv_dtype, pipe.mesh.devices.flat[0])
    self.max_num_seqs = max_num_seqs or defaults.max_num_seqs(
        pipe, max_len, dtype, paged=block_size > 0)
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
    self.pages = None
    if block_size:
      blocks = kv_blocks or defaults.kv_blocks(
          pipe, block_size, dtype, kv_cache_memory,
          dense_equivalent=M * self.replica_rows * -(-max_len // block_size) + 1)
      self.pages = kv_pages.PagedSlots(M, self.rows, self.dp, max_len, blocks, block_size,
                                       prefix_cache=prefix_cache, grow=kv_grow,
                                       chunk=decode_chunk)
      self.cache = self.pipe.init_pool(blocks, block_size, dtype)
    else:
      self.cache = self.pipe.init_cache(self.rows, max_len, dtype)
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
    self.prefilling: dict[tuple[int, int], int] = {}  # slot -> its prompt's tokens cached
    self._pending: InFlight | None = None  # the decode call in flight
    self._window: decode_rows.RowWindow | None = None  # the rows that call runs
    self._decode_programs: set = set()  # keys of decode programs already run (compiled)
    self.order: dict[tuple[int, int], int] = {}  # slot -> its sequence's admission number
    self.swapped: list[kv_swap.Swapped] = []  # preempted sequences (kv_grow)

  # --- admission --------------------------------------------------------------------------

  def submit(self, request: Request) -> None:
    """Queues a request; refuses one that could never run (one-line JaxppError)."""
    requests.check(request, self.max_len, stop_strings=self.detokenize is not None)
    if self.pages is not None:
      self.pages.check(request.key, len(request.prompt), request.max_new_tokens)
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
    """Requests not in a slot: queued, or swapped out (kv_grow)."""
    return sum(map(len, self.queues.values())) + len(self.swapped)

  def settle(self) -> None:
    """Waits for the decode call in flight and takes its tokens (a caller stopping early
    leaves no device step running, and no watchdog deadline armed)."""
    if self._pending is not None:
      self._collect_decode()

  def busy(self) -> bool:
    """Whether any request is waiting, being prefilled or decoding."""
    return bool(self.waiting() or self.tokens or self.prefilling or self._pending)

  def _live_by_class(self) -> dict[str, int]:
    counts = collections.Counter(o.priority for row in self.owner for o in row if o)
    return {c: counts.get(c, 0) for c in PRIORITIES}

  def _admit(self) -> list[tuple[Request, int, int]]:
    """Moves waiting requests into free slots, interactive first, honouring reserves."""
    admitted = []
    live = self.live_by_replica()
    if self.swapped and not kv_swap.restore(self, live):
      return admitted  # nothing new overtakes a preempted sequence
    by_class = self._live_by_class()
    for cls in PRIORITIES:
      queue = self.queues[cls]
      while queue:
        free = self.max_num_seqs - int(live.sum())
        owed = sum(max(0, self.reserve[c] - by_class[c]) for c in PRIORITIES if c != cls)
        if free - owed < 1:
          break
        head = queue[0]  # a paged cache also needs free blocks for it
        at = slots.free_row(live, self.owner, self.replica_rows, lambda d: (
            self.pages is None or self.pages.takes_now(
                d, head.prompt, head.max_new_tokens, share=not requests.whole_prompt(head))))
        if at is None:
          break
        d, j, r = at
        request = queue.popleft()
        cached = 0
        if self.pages is not None:
          cached = self.pages.admit((j, r), request.prompt, request.max_new_tokens,
                                    share=not requests.whole_prompt(request)).cached
        self.prefilling[(j, r)] = cached
        self._park((j, r))  # until its last piece: a prefill budget may leave it for later
        self.owner[j][r] = request
        self.order[(j, r)] = self.stats.admissions
        self.stats.admissions += 1
        live[d, j] += 1
        by_class[cls] += 1
        admitted.append((request, j, r))
    self.stats.max_live_per_microbatch = max(self.stats.max_live_per_microbatch,
                                             int(live.max()))
    self.stats.max_live = max(self.stats.max_live, int(live.sum()))
    return admitted

  # --- device work ------------------------------------------------------------------------

  def _device_step(self, name: str, key) -> contextlib.AbstractContextManager:
    """The watchdog's deadline around one device call and its fetch.

    `key` holds the call's shapes and static arguments, i.e. it names the compiled program,
    so each program's expected time is learned from its own calls.
    """
    return self.watchdog.step(name, key) if self.watchdog else contextlib.nullcontext()

  def _prefill(self, pieces: list[prompt_pieces.Piece]) -> None:
    """Prefills this step's prompt pieces into their slots: first pieces packed, pieces that
    continue a cached prefix one a row (`prefill.py`); a prompt's last piece sets its
    decode state, an earlier one parks the row (done, writing nowhere) until the next."""
    for group in ([x for x in pieces if x.start == 0], [x for x in pieces if x.start > 0]):
      if group:
        self._prefill_group(group, continued=group[0].start > 0)

  def _prefill_group(self, pieces: list[prompt_pieces.Piece], continued: bool) -> None:
    reqs = [self.owner[j][r] for j, r in (x.slot for x in pieces)]
    knobs = []
    for req, x in zip(reqs, pieces):
      values = requests.sampling_values(req)
      for f, value in values.items():
        getattr(self.sampling, f)[x.slot] = value
      knobs.append(values)
    start = time.perf_counter()
    top = logprobs.wanted(req.logprobs for req, x in zip(reqs, pieces) if x.last)
    pages = self.pages
    writes = None if pages is None else [pages.writes(x.slot, x.start, x.end) for x in pieces]
    prefix = ([x.start for x in pieces], [pages.tables[x.slot] for x in pieces]
              ) if continued else None
    new, self.cache, lps = self.prefiller.run(
        self.params, self.cache, [req.prompt[x.start:x.end] for req, x in zip(reqs, pieces)],
        [x.slot for x in pieces], knobs, [req.max_new_tokens for req in reqs],
        lambda key: self._device_step("prefill", key), logprobs=top, writes=writes,
        prefix=prefix)
    seconds = time.perf_counter() - start
    computed = sum(x.end - x.start for x in pieces)
    self.stats.add_prefill(seconds, computed, int(np.prod(self.prefiller.last_shape)),
                           first=self.prefiller.last_first)
    self.stats.prefill_since += seconds
    for i, (req, x) in enumerate(zip(reqs, pieces)):
      if not x.last:
        self.prefilling[x.slot] = x.end
        continue
      del self.prefilling[x.slot]
      if pages is not None:
        pages.prefilled(x.slot, req.prompt)
      self.stats.prompt_tokens += len(req.prompt)
      self.stats.completion_tokens += 1  # each prompt's last piece samples one token
      self.tokens[x.slot] = [int(new.tokens[i])]
      self.history.start(x.slot, req.prompt, int(new.tokens[i]))
      if lps is not None:
        self.logprobs.add(x.slot, req.logprobs, *(a[i] for a in lps))
      for field, value in zip(self.state, new):
        field[x.slot] = value[i]

  def _park(self, slot: tuple[int, int]) -> None:
    """A row not yet prefilled: done, and past its table, so its junk writes go to the null
    block (at a stale length they would land in its new blocks, which prefix hits share)."""
    self.state.done[slot] = True
    self.state.lengths[slot] = self.max_len if self.pages is None else (
        self.pages.nblk * self.pages.block_size)

  def precompile_prefills(self, prompt_lengths, admissions=None) -> int:
    """Runs the greedy prefill program of every shape an admission of these prompt lengths
    can take (or of exactly `admissions`, lists of prompt lengths), filling no slot;
    returns how many ran.

    Admissions of different sizes and prompt lengths are different programs; a benchmark
    calls this first so that no compile lands in its timed run.
    """
    continued = self.pages is not None and (self.pages.prefix_cache or self.prefill_chunk)
    ran, self.cache = self.prefiller.precompile(
        self.params, self.cache, prompt_lengths, lambda key: self._device_step("prefill", key),
        admissions, continued_blocks=self.pages.nblk if continued else 0)
    return ran

  def _dispatch_decode(self) -> None:
    """Starts one return-to-host worth of tokens for every live slot; `_collect_decode`
    takes the results. JAX dispatches asynchronously, so whatever the caller does with the
    rows `step` returns (detokenize, write, queue more) runs while the devices decode."""
    k = self.decode_chunk
    live = ~self.state.done
    do_sample = bool(np.any(self.sampling.temperature[live] > 0))
    knobs = self.sampling
    penalised = bool(np.any(penalties.is_on(knobs.repetition_penalty, knobs.presence_penalty,
                                            knobs.frequency_penalty)[live]))
    # Host arrays go to the jitted call as they are: jit copies each straight to the devices
    # that need it, where jnp.asarray would first commit it to one device, then reshard.
    # A paged cache's call runs only the rows in use (`decode_rows.py`).
    w = self._window = decode_rows.window((r for _, r in self.tokens), self.replica_rows,
                                          self.dp, paged=self.pages is not None)
    state = decode_state.DecodeState(*map(w.take, self.state))
    knobs = sampling.SamplingParams(*map(w.take, knobs))
    history = penalties.History(*map(w.take, self.history.arrays())) if penalised else None
    tables = None if self.pages is None else w.take(self.pages.tables)
    top = logprobs.wanted(self.owner[j][r].logprobs for j, r in self.tokens)
    key = (state.tokens.shape, k, do_sample, self.eos_ids, top, penalised)
    guard = contextlib.ExitStack()
    guard.enter_context(self._device_step("decode", key))
    start = time.perf_counter()
    out = self.pipe.decode(
        self.params, self.cache, state, knobs, history, tables, steps=k,
        do_sample=do_sample, eos_ids=self.eos_ids, **({} if top is None else dict(logprobs=top)))
    self.cache = out[0]
    self._pending = InFlight(out[1:], key, start, guard)

  def _collect_decode(self) -> None:
    """Takes the dispatched decode call's tokens into every live slot."""
    pending, self._pending = self._pending, None
    state, emitted, *lps = pending.outputs
    w = self._window
    with pending.guard:
      emitted = np.asarray(emitted)
      lps = tuple(np.asarray(a) for a in lps[0]) if lps else None
      for full, part in zip(self.state, state):
        w.put(full, part)
    seconds = pending.seconds()
    self.stats.add_decode(seconds, rows=self.M * w.dp * w.n)
    first = pending.key not in self._decode_programs
    if first:  # a compiling first call would skew the timings
      self._decode_programs.add(pending.key)
      self.stats.add_first_decode(seconds)
    else:
      self.stats.add_timed_decode(pending.start, seconds,
                                  self.pipe.decode_table(self.M, self.decode_chunk))
    for (j, r), toks in self.tokens.items():
      new = [int(t) for t in emitted[j, w.index(r)] if t >= 0]
      toks.extend(new)
      self.history.extend((j, r), new)
      self.stats.completion_tokens += len(new)
      self.stats.decode_first_tokens += len(new) if first else 0
      if lps is not None:
        self.logprobs.add((j, r), self.owner[j][r].logprobs, *(a[j, w.index(r)] for a in lps),
                          n=len(new))

  def _retire(self) -> list[Finished]:
    """Frees the slots of finished sequences (a stop string ends one here too)."""
    done = []
    eos = self.eos_ids
    for (j, r), toks in list(self.tokens.items()):
      request = self.owner[j][r]
      stop = stop_strings.stop_of(toks, request.stop_token_ids, request.stop, self.detokenize)
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
        self.order.pop((j, r), None)
        if self.pages is not None:
          self.pages.release((j, r))
    return done

  def step(self) -> list[Finished]:
    """Take the last decode call's tokens, retire what finished, admit, prefill this
    step's prompt pieces and start the next decode call if anything is live; returns the
    requests that finished (the devices decode on while the caller handles them)."""
    finished = []
    if self._pending is not None:
      self._collect_decode()
      finished += self._retire()
    admitted = self._admit()
    if self.waiting() and not admitted and not self.tokens and not self.prefilling:
      raise JaxppError("requests are waiting but none can be admitted")  # __init__ guards
    pieces = prompt_pieces.plan(
        [(slot, len(req.prompt), done, requests.whole_prompt(req))
         for slot, done in self.prefilling.items()
         for req in (self.owner[slot[0]][slot[1]],)], self.prefill_chunk)
    if pieces:
      self._prefill(pieces)
      finished += self._retire()
    if self.tokens and self.pages is not None and self.pages.grow:
      kv_swap.make_room(self)
    if self.tokens:
      self._dispatch_decode()
    if self.pages is not None:
      self.stats.kv = self.pages.stats() | dict(preemptions=self.stats.preemptions,
                                                decode_rows=self.stats.mean_decode_rows())
    return finished

  def run(self, on_finished: Callable[[Finished], None]) -> EngineStats:
    """Runs until every submitted request has finished; calls back as each one does."""
    while self.busy():
      for f in self.step():
        on_finished(f)
    return self.stats

