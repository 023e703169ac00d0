"""Speech jobs for a server: many requests, one model, one worker thread.

`BatchScheduler` owns a `SopranoTTS` and drives its backends from a single worker thread. Callers
(HTTP handlers, any thread or event loop) `submit` a `SpeechRequest` and get a `SpeechJob`, whose
float32 audio chunks (at `tts.sample_rate`) arrive as the model makes them; iterate it
synchronously (`for chunk in job`) or asynchronously (`async for chunk in job`).

Contract:
* `submit` validates the request (text, sampling values, max_new_tokens) in the caller's thread and
  raises `InputError` before anything is queued; beyond `max_queue` waiting requests it raises
  `QueueFullError` (with `retry_after_s`); after `close` it raises `SchedulerClosedError`.
* A job's chunks concatenate to `SopranoTTS.synthesize(text, ...)`'s audio for the same settings
  (the same sentences, sampling generators per sentence, the runtime's streaming windows: equal for
  decoders that compute each frame alone, close for ONNX Runtime's dynamic int8 decoder; see tts).
* `job.cancel()` (or a client that goes away) removes the job's rows at the next step; the other
  jobs are not disturbed. A job that fails ends with its error, raised from its iterator; the
  other jobs go on.
* `close(drain=True)` stops taking requests and returns when the jobs in flight have finished.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Protocol, Sequence

import numpy as np

from pipeline_lib.errors import InputError, SopranoOnnxError
from pipeline_lib.runtime.generate import KV_BUCKET, validate_max_new_tokens
from pipeline_lib.runtime.sampling import SamplingParams, row_generators, select_tokens, validate_seed

__all__ = [
    "SpeechRequest",
    "SpeechJob",
    "BatchScheduler",
    "SchedulerObserver",
    "QueueFullError",
    "SchedulerClosedError",
    "JobCancelled",
]


class QueueFullError(SopranoOnnxError):
    """More requests are waiting than the scheduler's max_queue: try again later (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SchedulerClosedError(SopranoOnnxError):
    """The scheduler is shutting down or stopped: it takes no new requests (HTTP 503)."""


class JobCancelled(SopranoOnnxError):
    """The job was cancelled before it finished."""


@dataclass(frozen=True)
class SpeechRequest:
    """One text to speak, with the runtime's sampling settings (defaults: greedy, as SopranoTTS)."""

    text: str
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.2
    seed: int | None = None

    @property
    def params(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.repetition_penalty)


class SchedulerObserver(Protocol):
    """What a scheduler reports as it works (the server turns these into Prometheus metrics).
    Called from the worker thread; must be quick and must not raise."""

    def on_step(self, rows: int, queued: int, tokens: int, seconds: float) -> None:
        """One decode step over `rows` rows (the rows the step ran: the first-audio lane runs a
        subset of the batch) took `seconds` and made `tokens` tokens; `queued` requests are waiting."""

    def on_first_audio(self, seconds: float) -> None:
        """A job's first chunk, `seconds` after it was submitted."""

    def on_audio(self, seconds: float) -> None:
        """`seconds` of audio were produced (any job)."""


_END = object()

POLICIES = ("deadline", "legacy")
DEFAULT_POLICY = "deadline"
POLICY_ENV = "SOPRANO_SCHEDULER_POLICY"  # the server's switch (A/B runs): deadline | legacy


class SpeechJob:
    """The handle of one submitted request: its audio chunks, in order, and its progress.

    Thread-safe: the worker pushes, one consumer iterates (sync or async), anyone may cancel."""

    def __init__(self, request: SpeechRequest, sample_rate: int) -> None:
        self.request = request
        self.sample_rate = sample_rate
        self.submitted_at = time.perf_counter()
        self.first_audio_at: float | None = None
        self.finished_at: float | None = None
        self.samples = 0
        self.tokens = 0
        self.error: BaseException | None = None
        # The listener's playback clock, as the scheduler sees it: playing from the first chunk on, a
        # chunk that arrives after the audio before it has run out is a stall (an underrun).
        self.play_end: float | None = None  # when the audio sent so far would have finished playing
        self.stalls = 0
        self.stall_s = 0.0
        self._items: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._cancelled = threading.Event()
        # The scheduler's bookkeeping (worker thread only): token ids per sentence, sampling
        # generators, next sentence to start / to emit, rows running, finished rows not yet emitted.
        self._ids: list[list[int]] = []
        self._gens: list[np.random.Generator] | None = None
        self._next_start = 0
        self._next_emit = 0
        self._active = 0
        self._finished_rows: dict[int, Any] = {}

    # -- producer side (the scheduler's worker) --------------------------------------------------
    def _push(self, chunk: np.ndarray) -> None:
        now = time.perf_counter()
        if self.first_audio_at is None:
            self.first_audio_at = now
        if self.play_end is None:
            self.play_end = now
        elif now > self.play_end:  # the listener ran out of audio before this chunk came
            self.stalls += 1
            self.stall_s += now - self.play_end
            self.play_end = now
        self.play_end += len(chunk) / self.sample_rate
        self.samples += len(chunk)
        self._put(chunk)

    def _finish(self, error: BaseException | None = None) -> None:
        if self.finished_at is not None:
            return
        self.error = error
        self.finished_at = time.perf_counter()
        self._put(_END)

    def _put(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            waiters, self._waiters = self._waiters, []
            self._cond.notify_all()
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # that consumer's event loop is closed: nobody waits there any more
                pass

    # -- consumer side ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finished_at is not None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the scheduler to drop this job's rows at its next step (idempotent)."""
        self._cancelled.set()

    def _pop(self) -> Any:
        item = self._items.popleft()
        if item is _END:
            self._items.appendleft(_END)  # iteration stays finished
            if self.error is not None:
                raise self.error
            raise StopIteration
        return item

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                try:
                    item = self._pop()
                except StopIteration:
                    return
            yield item

    def __aiter__(self) -> AsyncIterator[np.ndarray]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[np.ndarray]:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._items:
                    try:
                        item = self._pop()
                    except StopIteration:
                        return
                    fut = None
                else:
                    fut = loop.create_future()
                    self._waiters.append((loop, fut))
            if fut is None:
                yield item
            else:
                try:
                    await fut
                finally:  # woken, or the consumer gave up (cancelled): no stale waiter stays behind
                    with self._cond:
                        if (loop, fut) in self._waiters:
                            self._waiters.remove((loop, fut))

    def audio(self) -> np.ndarray:
        """Block until the job ends; all its audio (raises the job's error)."""
        chunks = list(self)
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _NullObserver:
    def on_step(self, rows: int, queued: int, tokens: int, seconds: float) -> None: ...
    def on_first_audio(self, seconds: float) -> None: ...
    def on_audio(self, seconds: float) -> None: ...


class SlotCache:
    """The running batch's KV cache: arrays [slots, kv_heads, width, head_dim] per past input,
    whose first `rows` rows are the batch (slots double as rows join, up to `capacity`), fed as views of those rows (so a row can join or leave
    without copying the others). All rows share `used` columns, left-padded (attention_mask 0 where
    a row has no token); the width grows in steps of `bucket` columns, and leading columns no row
    attends to are dropped when it grows. A row that leaves is replaced by the last row (one
    row's copy); a row that joins is written into the next slot, right-aligned; only a prompt
    longer than `used` makes every row move (columns are prepended). A step of the batch's tail
    rows only (the scheduler's first-audio lane) leaves a masked column in the other rows: a gap
    inside a row, which attention skips like the padding; gaps go with the leading columns once no
    row attends to them."""

    def __init__(self, past_names: Sequence[str], capacity: int, kv_heads: int, head_dim: int, bucket: int) -> None:
        self.past_names = list(past_names)
        self.capacity, self.kv_heads, self.head_dim, self.bucket = capacity, kv_heads, head_dim, bucket
        self.rows = 0
        self.used = 0
        self.slots = 0
        self.arrays: list[np.ndarray] = []
        self.mask = np.zeros((0, 1), dtype=np.int64)
        self._views: dict[str, np.ndarray] | None = None

    @property
    def width(self) -> int:
        return self.mask.shape[1] - 1

    def _realloc(self, used: int, shift: int, first: int = 0, slots: int | None = None) -> None:
        """New arrays holding columns [first, self.used) of the current ones at [shift, shift + ...),
        with room for `used` columns and one more, and for `slots` rows (default: as now)."""
        width = -(-(used + 1) // self.bucket) * self.bucket
        self.slots = slots if slots is not None else self.slots
        keep = self.used - first
        arrays = []
        for i in range(len(self.past_names)):
            a = np.zeros((self.slots, self.kv_heads, width, self.head_dim), dtype=np.float32)
            if self.arrays and keep > 0:
                a[: self.rows, :, shift:shift + keep] = self.arrays[i][: self.rows, :, first:self.used]
                self.arrays[i] = None  # type: ignore[call-overload] - freed layer by layer
            arrays.append(a)
        mask = np.zeros((self.slots, width + 1), dtype=np.int64)
        if keep > 0:
            mask[: self.rows, shift:shift + keep] = self.mask[: self.rows, first:self.used]
        mask[:, width] = 1  # the new token's column
        self.arrays, self.mask, self.used = arrays, mask, used
        self._views = None

    def add(self, kv: Sequence[np.ndarray]) -> int:
        """A prefilled row ([1, kv_heads, n, head_dim] per past input) into the next slot; its index."""
        n = kv[0].shape[2]
        if self.rows >= self.capacity:
            raise RuntimeError("SlotCache is full")
        if self.rows == 0:
            self.arrays, self.used = [], 0
            self._realloc(n, 0, slots=1)
        elif n > self.used or self.rows == self.slots:  # a longer prompt, or no free slot: move once
            self._realloc(max(n, self.used), max(0, n - self.used),
                          slots=min(self.capacity, 2 * self.slots) if self.rows == self.slots else None)
        r, start = self.rows, self.used - n
        for a, k in zip(self.arrays, kv):
            a[r] = 0.0
            a[r, :, start:self.used] = k[0]
        self.mask[r, :] = 0
        self.mask[r, start:self.used] = 1
        self.mask[r, self.width] = 1
        self.rows += 1
        self._views = None
        return r

    def remove(self, r: int) -> int | None:
        """Drop row r; the last row moves into its slot. Returns the moved row's old index (None if
        r was the last)."""
        last = self.rows - 1
        moved = None
        if r != last:
            for a in self.arrays:
                a[r] = a[last]
            self.mask[r] = self.mask[last]
            moved = last
        self.rows -= 1
        self._views = None
        if self.rows == 0:  # idle: give the memory back
            self.arrays, self.used, self.slots = [], 0, 0
            self.mask = np.zeros((0, 1), dtype=np.int64)
        return moved

    def feed(self, lo: int = 0) -> dict[str, np.ndarray]:
        """past_* and attention_mask for rows [lo, rows) (for lo 0, the same view objects until the
        batch changes, so a backend that binds by address re-binds nothing)."""
        if lo:
            views = {name: a[lo:self.rows] for name, a in zip(self.past_names, self.arrays)}
            views["attention_mask"] = self.mask[lo:self.rows]
            return views
        if self._views is None:
            self._views = dict(zip(self.past_names, (a[: self.rows] for a in self.arrays)))
            self._views["attention_mask"] = self.mask[: self.rows]
        return dict(self._views)

    def swap(self, i: int, j: int) -> None:
        """Rows i and j trade slots (their cache and mask rows are copied; the views stay valid)."""
        for a in self.arrays:
            a[[i, j]] = a[[j, i]]
        self.mask[[i, j]] = self.mask[[j, i]]

    def append(self, new: Sequence[np.ndarray], lo: int = 0) -> None:
        """The step's key / value per layer ([rows - lo, kv_heads, 1, head_dim]) of rows [lo, rows)
        into column `used`; rows before `lo` did not step: their column stays masked (a gap, which
        attention skips like the left padding)."""
        col = self.used
        for a, k in zip(self.arrays, new):
            a[lo: self.rows, :, col] = k[:, :, -1]
        self.mask[lo: self.rows, col] = 1
        self.used += 1
        if self.used == self.width:
            live = self.mask[: self.rows, : self.used].any(axis=0)
            first = int(np.argmax(live)) if live.any() else 0
            self._realloc(self.used - first, 0, first)


class _Row:
    """One sentence of one job in the running batch."""

    def __init__(self, job: SpeechJob, index: int, prompt: list[int], vocab: int, hidden_size: int, first_chunk: int) -> None:
        r = job.request
        self.job, self.index = job, index
        self.params = r.params
        self.gen = job._gens[index] if job._gens is not None else None
        self.max_new_tokens = r.max_new_tokens
        self.seen = np.zeros(vocab, dtype=bool)
        self.seen[np.asarray(prompt, dtype=np.int64)] = True
        self.next_pos = len(prompt)
        self.hidden = np.zeros((r.max_new_tokens, hidden_size), dtype=np.float32)
        self.n = 0  # hidden vectors so far
        self.steps = 0  # tokens sampled so far
        self.emitted = 0  # sample blocks already decoded
        self.chunk = first_chunk
        self.logits: np.ndarray | None = None  # of the last forward, not yet sampled
        self.last_hidden: np.ndarray | None = None
        self.token = 0
        self.finished = False
        self.pending: list[np.ndarray] = []  # audio held while an earlier sentence of the job runs


class BatchScheduler:
    """Continuous batching (see the module docstring for the contract).

    Policy ("deadline", the default), one iteration between two decode steps of the running batch:
    * cancelled jobs leave (their rows at once);
    * every row samples its next token with its own settings and generator; rows that end ([STOP]
      or max_new_tokens) leave the batch at once (their slot is free for the next row), their last
      window still to be decoded;
    * the decoder's work, in the runtime's streaming windows (any window with `stream_context`
      tokens of context on each side is exact, up to a decoder's own per-call rounding; see tts and
      _decode_due):
      - a job's first audio as soon as the decoder's receptive field allows (`first_chunk` tokens
        plus the context): the window of each job that has sent nothing yet goes first;
      - a later window is due once the row has `chunk` exact blocks not yet sent (`chunk` grows
        from `first_chunk` by `chunk_growth` up to `max_chunk`), or the row ended. Each job keeps a
        playback clock (its listener playing from the first chunk on, pausing when it runs out): a
        due window whose listener has less than `margin_s` plus two iterations of audio left is
        decoded now, most urgent first; one further ahead waits while any job still waits for its
        first audio, so a new request's prefill and first window are not queued behind seconds of
        other listeners' audio. With nobody waiting, every ended row's rest and the most urgent
        other window (one per step) go. A window decodes every exact block the row has (up to
        `max_chunk`; an ended row: all of its rest), so a window that waited is a longer one and
        less context is decoded twice. A sentence behind an earlier one of its job is never urgent
        (its audio plays later);
      - an early window: when the row's next `chunk` blocks (or its end) would come after its
        listener ran dry, the blocks already exact (at least `min_window`) go out in the last
        iteration that is still in time, as long as the batch runs faster than real time (see
        _early). Without it, a listener under load heard the first block, the second window, then
        silence until the sentence ended: the chunks grow faster than a loaded row makes tokens;
    * the step: the whole batch, or, while rows wait for their job's first audio and every other
      row has audio in hand (the first-audio lane, `lane`, see _lane_start), those rows only: a
      new request's first window needs `first_chunk + stream_context` tokens after its prefill, and
      steps of one or two rows take about half the time of a full batch's;
    * free rows (up to `max_batch`) go to waiting sentences, one at a time, each to the job with the
      fewest rows running, the oldest first; requests that arrived during the decoder's work join
      this step (prefilled alone, SlotCache.add). A job's later sentences start once the job has
      sent its first audio, so they do not delay it; a long request (many sentences) cannot hold
      rows that a newer one is waiting for beyond the end of the sentences it already runs (each
      at most max_new_tokens steps);
    * a job's sentences are emitted in order (a later sentence's audio waits for the earlier ones).
    A row is never starved: its listener's clock runs down, and at `margin_s` its window is urgent.
    `SpeechJob.stalls` / `stall_s` count the times (seconds) its listener would have run dry.

    The old policy ("legacy", `policy="legacy"` or SOPRANO_SCHEDULER_POLICY=legacy, kept for A/B
    runs): new rows are prefilled at the start of the iteration; every row's first window and every
    ended row's rest at once, later windows of exactly `chunk` blocks, one per step (least audio
    ahead first); a job's sentences all start as rows free up.

    The LM must take its KV cache as inputs (ONNX, or OpenVINO's plain step IR
    soprano_lm_step.xml): a stateful LM keeps the batch's cache inside its infer request, where a
    row cannot be added without rebuilding the state, so it is refused with that advice."""

    def __init__(
        self,
        tts: Any,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        observer: SchedulerObserver | None = None,
        first_chunk: int = 1,
        chunk_growth: int = 8,
        max_chunk: int = 64,
        policy: str | None = None,
        margin_s: float = 0.15,
        min_window: int = 4,
        lane: bool = True,
    ) -> None:
        for name, v in (("max_batch", max_batch), ("max_queue", max_queue), ("first_chunk", first_chunk),
                        ("chunk_growth", chunk_growth), ("max_chunk", max_chunk), ("min_window", min_window)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be an int >= 1, got {v!r}")
        if tts.spec.stateful:
            raise InputError(
                f"{tts.lm_path}: a stateful LM (KV cache in OpenVINO state) cannot take a row into a running "
                "batch; give the server the step model that takes the cache as inputs "
                "(soprano_lm_step.xml for OpenVINO, or the .onnx)"
            )
        policy = policy if policy is not None else os.environ.get(POLICY_ENV, DEFAULT_POLICY)
        if policy not in POLICIES:
            raise InputError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if isinstance(margin_s, bool) or not isinstance(margin_s, (int, float)) or not margin_s >= 0:
            raise InputError(f"margin_s must be a number >= 0, got {margin_s!r}")
        self.policy, self.margin_s = policy, float(margin_s)
        self.tts = tts
        self.max_batch, self.max_queue = max_batch, max_queue
        self.first_chunk, self.chunk_growth, self.max_chunk = first_chunk, chunk_growth, max_chunk
        self.min_window = min_window
        if not isinstance(lane, bool):
            raise InputError(f"lane must be True or False, got {lane!r}")
        self.lane = lane
        self.lane_steps = 0  # decode steps that ran the first-audio lane only
        self.observer: SchedulerObserver = observer or _NullObserver()
        self._queue: collections.deque[SpeechJob] = collections.deque()
        self._jobs: list[SpeechJob] = []  # admitted: sentences running or still to start
        self._lock = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.rows: list[_Row] = []
        self._draining: list[_Row] = []  # deadline policy: rows that ended, their last window not decoded yet
        self._period = 0.0  # mean seconds between two decoder phases (an iteration), for the margin
        self._row_period = 0.0  # the same over iterations whose step ran the whole batch: a row's time per token
        self._lane_step = False  # the last step ran the first-audio lane only
        self._block_s = tts.samples_per_token / tts.sample_rate  # seconds of audio per token
        self._last_decode_at: float | None = None
        self.steps = 0  # decode steps run (all rows together)
        self.max_rows_seen = 0

    @property
    def queue_depth(self) -> int:
        """Requests waiting: submitted, with no sentence started yet."""
        return len(self._queue) + sum(1 for j in list(self._jobs) if j._next_start == 0)

    @property
    def active_rows(self) -> int:
        return len(self.rows)

    def start(self) -> BatchScheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="soprano-scheduler", daemon=True)
            self._thread.start()
        return self

    def submit(self, request: SpeechRequest) -> SpeechJob:
        """Queue `request` (validated here, in the caller's thread); its job."""
        if not isinstance(request.text, str):
            raise InputError(f"text must be a str, got {type(request.text).__name__}")
        params = request.params
        seed = validate_seed(request.seed)
        validate_max_new_tokens(request.max_new_tokens, self.tts.spec.max_position_embeddings)
        if request.max_new_tokens < 2:
            raise InputError(
                f"max_new_tokens {request.max_new_tokens} gives each sentence one hidden vector, and audio needs at "
                "least two: ask for 2 or more"
            )
        _, ids = self.tts.prepare([request.text])
        job = SpeechJob(request, self.tts.sample_rate)
        job._ids = ids
        job._gens = None if params.greedy else row_generators(seed, range(len(ids)))
        with self._lock:
            if self._closing:
                raise SchedulerClosedError("the server is shutting down: it takes no new requests")
            if self._thread is not None and not self._thread.is_alive():
                raise SchedulerClosedError("the scheduler's worker has stopped: restart the server")
            if self.queue_depth >= self.max_queue:
                raise QueueFullError(
                    f"{self.queue_depth} requests are already waiting (max_queue {self.max_queue}); retry later",
                    retry_after_s=1.0,
                )
            self._queue.append(job)
            self._lock.notify_all()
        return job

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with drain, return once the queued and running jobs have finished
        (or `timeout` seconds passed), otherwise cancel them."""
        with self._lock:
            self._closing = True
            if not drain:
                for job in [*self._queue, *self._jobs]:
                    job.cancel()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the worker ------------------------------------------------------------------------------
    def _work(self) -> None:
        tts = self.tts
        self._cache = self._new_cache()
        with tts.lm.stream() as lm:
            while True:
                with self._lock:
                    while not self._queue and not self._jobs and not self._closing:
                        self._lock.wait()
                    if self._closing and not self._queue and not self._jobs:
                        return
                    while self._queue:
                        self._jobs.append(self._queue.popleft())
                try:
                    self._iteration(lm)
                except BaseException as exc:  # noqa: BLE001 - a fault of the batch as a whole: its jobs end with it
                    self._fail_batch(lm, exc)

    def _fail_batch(self, lm: Any, exc: BaseException) -> None:
        """Every job in the batch ends with `exc`; the batch starts afresh. Never raises: the worker
        must outlive any one failure."""
        self.rows = []
        self._draining = []
        self._cache = self._new_cache()
        for job in list(self._jobs):
            try:
                self._jobs.remove(job)
                job._finish(exc)
            except BaseException:  # noqa: BLE001, S110 - one job's consumer must not stop the others
                pass
        _release(lm)

    def _iteration(self, lm: Any) -> None:
        for job in [j for j in self._jobs if j.cancelled]:
            self._end_job(job, JobCancelled("cancelled"))
        if self.policy == "legacy":
            self._admit(lm)
            if not self.rows:
                self.observer.on_step(0, self.queue_depth, 0, 0.0)  # the batch is empty (e.g. all cancelled)
                return
        t0 = time.perf_counter()
        sampled = sum(r.logits is not None for r in self.rows)  # tokens made this iteration (rows that stepped)
        self._sample(self.rows)
        if self.policy == "legacy":
            self._decode_windows()
            for r in [r for r in self.rows if r.finished]:
                self._drop_row(r)
        else:
            for r in [r for r in self.rows if r.finished]:
                self._leave_batch(r)  # its slot is free now; its last window is decoded by the rule below
            self._decode_due()
            # Requests that came while the windows were decoded join this step (not one step later).
            joined = self._admit(lm)
            self._sample(joined)
            sampled += len(joined)
            for r in [r for r in joined if r.finished]:  # [STOP] at once: no audio, no step
                self._leave_batch(r)
                self._decode_row(r)
            if not self.rows:  # no step to run: nothing to put a window off for
                for r in sorted(self._draining, key=lambda x: x.job.submitted_at):
                    self._decode_row(r, limit=math.inf)
                self._last_decode_at = None  # idle time is no iteration: keep it out of the period
        if not self.rows:
            _release(lm)  # idle: the context lets go of the batch's cache arrays
        stepped = 0
        if self.rows:
            lo = self._lane_start()
            rows = self.rows[lo:]
            feed = self._cache.feed(lo)
            feed["input_ids"] = np.array([[r.token] for r in rows], dtype=np.int64)
            feed["position_ids"] = np.array([[r.next_pos] for r in rows], dtype=np.int64)
            out = lm.run(feed)
            self._cache.append([out[name] for name in self.tts.spec.new_kv_names], lo)
            logits, hidden = out["logits"], out["hidden_states"]
            for i, r in enumerate(rows):
                r.logits = np.array(logits[i, -1], dtype=np.float32)
                r.last_hidden = np.array(hidden[i, -1], dtype=np.float32)
                r.next_pos += 1
            self.steps += 1
            self.lane_steps += lo > 0
            self._lane_step = lo > 0
            stepped = len(rows)
        rows = sampled if self.policy == "legacy" else stepped  # deadline: the rows of the step
        self.observer.on_step(rows, self.queue_depth, sampled, time.perf_counter() - t0)
        if not self.rows:
            self.observer.on_step(0, self.queue_depth, 0, 0.0)  # the batch is empty now

    def _sample(self, rows: list[_Row]) -> None:
        """Every row samples its next token from its last logits, with its own settings and generator."""
        for group in _by_params([r for r in rows if r.logits is not None]):
            logits = np.stack([r.logits for r in group])
            seen = np.stack([r.seen for r in group])
            gens = None if group[0].params.greedy else [r.gen for r in group]
            tokens = select_tokens(logits, seen, group[0].params, gens)
            for r, tok in zip(group, tokens):
                self._take_token(r, int(tok))

    def _admit(self, lm: Any) -> list[_Row]:
        """Free rows to waiting sentences (see the class docstring); the rows that joined."""
        if self.policy != "legacy":
            with self._lock:  # requests submitted since the iteration began
                while self._queue:
                    self._jobs.append(self._queue.popleft())
        joined: list[_Row] = []
        while len(self.rows) < self.max_batch:
            waiting = [j for j in self._jobs if j._next_start < len(j._ids)]
            if self.policy != "legacy":  # a later sentence waits until its job has sent its first audio
                waiting = [j for j in waiting if j.first_audio_at is not None or j._next_start == j._next_emit]
            if not waiting:
                return joined
            job = min(waiting, key=lambda j: (j._active, j.submitted_at))
            k = job._next_start
            job._next_start += 1
            prompt = job._ids[k]
            try:
                kv, logits, hidden = self._prefill(lm, prompt)
            except Exception as exc:  # noqa: BLE001 - this job's failure only
                self._end_job(job, exc)
                continue
            spec = self.tts.spec
            row = _Row(job, k, prompt, spec.vocab_size, spec.hidden_size, self.first_chunk)
            row.logits, row.last_hidden = logits, hidden
            self._cache.add(kv)
            self.rows.append(row)
            joined.append(row)
            job._active += 1
            self.max_rows_seen = max(self.max_rows_seen, len(self.rows))
        return joined

    def _prefill(self, lm: Any, prompt: list[int]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        spec = self.tts.spec
        ids = np.asarray(prompt, dtype=np.int64)[None]
        n = ids.shape[1]
        empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), dtype=np.float32)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(n, dtype=np.int64)[None]}
        feed.update((name, empty) for name in spec.past_names)
        out = lm.run(feed)
        kv = [np.array(out[name], dtype=np.float32) for name in spec.new_kv_names]
        return kv, np.array(out["logits"][0, -1], dtype=np.float32), np.array(out["hidden_states"][0, -1], dtype=np.float32)

    def _take_token(self, r: _Row, token: int) -> None:
        """The generation loop's rule (generate.generate_steps): the hidden state of the forward that
        produced a token other than [STOP] is kept; a row ends at [STOP] or max_new_tokens."""
        r.seen[token] = True
        r.token = token
        r.steps += 1
        r.job.tokens += 1
        if token != self.tts.spec.stop_id:
            r.hidden[r.n] = r.last_hidden
            r.n += 1
        if token == self.tts.spec.stop_id or r.steps >= r.max_new_tokens:
            r.finished = True
        r.logits = None

    def _decode_windows(self) -> None:
        """The decoder's work between two decode steps. At once: every row's first window (time to
        first audio) and the rest of every row that ended (it leaves the batch). Of the later windows
        that are due, one per step: the row whose listener has the least audio left to play, so
        that a long window of one row does not hold back another row's first chunk (later windows
        carry seconds of audio, so they can wait a step)."""
        later = []
        for r in list(self.rows):
            try:
                if r.finished or r.emitted == 0:
                    self._decode_ready(r)
                elif self._due(r):
                    later.append(r)
            except Exception as exc:  # noqa: BLE001 - this job's failure only
                self._end_job(r.job, exc)
        if later:
            r = min(later, key=self._audio_ahead_s)
            try:
                self._decode_ready(r, limit=1)
            except Exception as exc:  # noqa: BLE001 - this job's failure only
                self._end_job(r.job, exc)

    def _decode_due(self) -> None:
        """The decoder's work between two decode steps, deadline policy (see the class docstring).

        1. First audio: the window of each job that has sent nothing yet, as soon as it is exact.
        2. Later windows (the row has `chunk` exact blocks not yet sent, or it ended): a row whose
           listener has less than `margin` seconds of audio left to play is decoded now, most urgent
           first; a row further ahead waits while any job still waits for its first audio (queued
           or running), since its listener does not need more yet. With nobody waiting for first
           audio: every ended row's rest, and the most urgent of the others, one per step.
        A window decodes every exact block the row has (up to `max_chunk`; an ended row: all of the
        rest), so a window that waited is a longer one: fewer windows, less context decoded twice."""
        now = time.perf_counter()
        if self._last_decode_at is not None:  # at most 1 s a sample: a pause of the worker is no iteration
            self._period = 0.8 * self._period + 0.2 * min(1.0, now - self._last_decode_at)
            if not self._lane_step:
                self._row_period = 0.8 * self._row_period + 0.2 * min(1.0, now - self._last_decode_at)
        self._last_decode_at = now
        margin = self.margin_s + 2.0 * self._period
        later, early = [], []
        for r in [*self.rows, *self._draining]:
            if self._needs_first_audio(r):
                if r.finished or self._due(r):
                    self._decode_row(r, limit=1)
            elif r.finished or self._due(r):
                later.append(r)
            elif self._early(r, now, margin):
                early.append(r)
        waiting = bool(self._queue) or any(j.first_audio_at is None for j in self._jobs)
        slack = {id(r): self._slack_s(r, now) for r in [*later, *early]}
        later.sort(key=lambda r: slack[id(r)])
        urgent = sorted([r for r in later if slack[id(r)] < margin] + early, key=lambda r: slack[id(r)])
        if waiting:
            todo = urgent
        else:
            rest = [r for r in later if slack[id(r)] >= margin]
            todo = urgent + [r for r in rest if r.finished] + [r for r in rest if not r.finished][:1]
        for r in todo:
            self._decode_row(r, early=r in early)

    def _early(self, r: _Row, now: float, margin: float) -> bool:
        """A window before `chunk` blocks are ready (deadline policy): the row is its job's sentence
        playing next, its listener has less than `margin` seconds left, the row's next regular window
        (its `chunk` blocks, or its end) would come after the listener ran dry (at the scheduler's
        iteration period per token), at least `min_window` blocks are exact, and the batch runs faster
        than real time (slower, no early window can keep up: long windows then waste less decoding
        on context). It waits for the last iteration that still comes in time (two periods and 30 ms
        of decoding ahead of the listener's end), so the window holds as many blocks as it can."""
        if r.finished or r.index != r.job._next_emit or r.job.first_audio_at is None:
            return False
        ready = self._ready(r)
        if not self._fast() or ready < self._need(r):
            return False
        slack, p = self._slack_s(r, now), self._row_period
        wait = min(r.chunk - ready, r.max_new_tokens - r.steps) * p
        return slack < min(margin, 2.0 * p + 0.03) and slack < wait + p

    def _fast(self) -> bool:
        """Rows make tokens faster than real time (a whole-batch step per token, _row_period)."""
        return 0.0 < self._row_period < self._block_s

    def _need(self, r: _Row) -> int:
        """Exact blocks the row's next window needs: `chunk`, or at most `min_window` while early
        windows run (_fast)."""
        return min(r.chunk, self.min_window) if self._fast() else r.chunk

    def _ready(self, r: _Row) -> int:
        """Exact blocks not yet sent: block j is exact once token j + 1 + stream_context exists."""
        return r.n - 1 - self.tts.stream_context - r.emitted

    def _lane_start(self) -> int:
        """The first-audio lane (deadline policy, `lane`): while rows wait for their job's first audio
        and every other row can sit out a step (_can_skip: its listener's audio outlasts the steps it
        needs before its next window), the step runs the waiting rows only (moved to the batch's
        tail, SlotCache.swap), so their first window is exact after a few short steps instead of as
        many steps of the whole batch. Checked every step: a row that cannot wait any longer makes
        the next step a whole-batch one. The index of the first row that steps (0: the whole batch)."""
        if self.policy == "legacy" or not self.lane:
            return 0
        lane = [r for r in self.rows if self._needs_first_audio(r) and not r.finished]
        if not lane or len(lane) == len(self.rows):
            return 0
        now = time.perf_counter()
        ids = {id(r) for r in lane}
        if any(not self._can_skip(r, now) for r in self.rows if id(r) not in ids):
            return 0
        lo = len(self.rows) - len(lane)
        heads = [i for i in range(lo) if id(self.rows[i]) in ids]
        tails = [i for i in range(lo, len(self.rows)) if id(self.rows[i]) not in ids]
        for i, j in zip(heads, tails):
            self._cache.swap(i, j)
            self.rows[i], self.rows[j] = self.rows[j], self.rows[i]
        return lo

    def _can_skip(self, r: _Row, now: float) -> bool:
        """The row may sit out one lane step: its listener's audio (sent, plus the exact blocks a
        window would send now: `chunk` of them, or `min_window` when early windows run) lasts beyond
        the steps the row still needs before its next window can go (at a whole-batch step each),
        one lane step and 30 ms of decoding. A job with no audio yet has nobody listening."""
        slack = self._slack_s(r, now)
        if math.isinf(slack):
            return True
        ready, need = self._ready(r), self._need(r)
        if ready >= need:
            slack += ready * self._block_s
        return slack >= (max(0, need - ready) + 1) * self._row_period + 0.03

    def _needs_first_audio(self, r: _Row) -> bool:
        """The row is its job's sentence to emit next, and the job has sent no audio yet."""
        return r.job.first_audio_at is None and r.index == r.job._next_emit

    def _slack_s(self, r: _Row, now: float) -> float:
        """Seconds of audio the row's listener still has to play (its job's playback clock). A sentence
        behind an earlier one of its job gets its job's slack (it plays later than that, so this errs
        towards decoding it early); infinite while the job has sent nothing."""
        job = r.job
        if job.play_end is None:
            return math.inf
        return job.play_end - now

    def _decode_row(self, r: _Row, limit: int | None = None, early: bool = False) -> None:
        """Decode the row's due windows (deadline policy; `early`: one window of every exact block,
        fewer than `chunk`, see _early); a row out of the batch that has sent all its audio is done.
        A failure ends the row's job only."""
        if r.job.done:  # its job ended (failed) earlier in this decoder phase
            return
        try:
            if r.finished:
                self._decode_ready(r, limit=1 if limit is None else (None if limit == math.inf else limit))
            elif limit is not None:
                self._decode_ready(r, limit=limit)
            else:
                self._decode_ready(r, limit=1, widest=True, need=self._need(r) if early else None)
        except Exception as exc:  # noqa: BLE001 - this job's failure only
            self._end_job(r.job, exc)
            return
        if r.finished and r.emitted >= r.n - 1 and r in self._draining:
            self._draining.remove(r)
            self._complete_row(r)

    def _due(self, r: _Row, need: int | None = None) -> bool:
        """The row's next window (`need` exact blocks, default its `chunk`) can be decoded."""
        return self._ready(r) >= (r.chunk if need is None else need)

    def _audio_ahead_s(self, r: _Row) -> float:
        """Seconds of the job's audio sent but not yet played (if played from its first chunk on);
        infinite for a sentence that waits behind an earlier one of its job."""
        job = r.job
        if r.index != job._next_emit or job.first_audio_at is None:
            return float("inf")
        return job.samples / job.sample_rate - (time.perf_counter() - job.first_audio_at)

    def _decode_ready(self, r: _Row, limit: int | None = None, widest: bool = False, need: int | None = None) -> None:
        """Decode the row's windows whose samples are exact by now (at most `limit` of them; all of
        the rest once the row ended). A window is due with `need` exact blocks (default `chunk`; an
        early window: min(chunk, min_window)). `widest`: a window holds every exact block (at least
        `need`, at most `max_chunk` or `chunk`, the larger), not `chunk` blocks."""
        ctx = self.tts.stream_context
        done = 0
        if r.finished:
            # Legacy: the whole rest in one window. Deadline: windows of at most max(chunk, max_chunk)
            # blocks, `limit` of them per call, so a sentence that waited long does not become one
            # decoder call that holds every other row's step.
            while r.n - 1 > r.emitted and (limit is None or done < limit):
                end = r.n - 1 if self.policy == "legacy" else min(r.n - 1, r.emitted + max(r.chunk, self.max_chunk))
                self._emit(r, self._window(r, r.emitted, end, min(end + ctx, r.n - 1)))
                r.emitted = end
                done += 1
            return
        while self._due(r, need) and (limit is None or done < limit):
            end = r.emitted + r.chunk
            if widest:
                end = r.emitted + min(self._ready(r), max(r.chunk, self.max_chunk))
            self._emit(r, self._window(r, r.emitted, end, end + ctx))
            r.emitted = end
            r.chunk = min(self.max_chunk, r.chunk * self.chunk_growth)
            done += 1

    def _window(self, r: _Row, start: int, end: int, last: int) -> np.ndarray:
        """Sample blocks [start, end) from a window of hidden vectors [max(0, start - ctx), last]."""
        spt = self.tts.samples_per_token
        a = max(0, start - self.tts.stream_context)
        audio, _, _ = self.tts._decode(r.hidden[None, a:last + 1])
        return audio[0, (start - a) * spt:(end - a) * spt]

    def _emit(self, r: _Row, audio: np.ndarray) -> None:
        if r.index == r.job._next_emit:
            self._push(r.job, audio)
        else:
            r.pending.append(audio)

    def _push(self, job: SpeechJob, audio: np.ndarray) -> None:
        if len(audio) == 0:
            return
        first = job.first_audio_at is None
        job._push(audio)
        if first:
            self.observer.on_first_audio(job.first_audio_at - job.submitted_at)
        self.observer.on_audio(len(audio) / job.sample_rate)

    def _new_cache(self) -> SlotCache:
        spec = self.tts.spec
        return SlotCache(spec.past_names, self.max_batch, spec.num_kv_heads, spec.head_dim, KV_BUCKET)

    def _remove_row(self, r: _Row) -> None:
        """Take `r` out of the batch: the last row moves into its slot (SlotCache.remove)."""
        i = self.rows.index(r)
        moved = self._cache.remove(i)
        if moved is not None:
            self.rows[i] = self.rows[moved]
        self.rows.pop()

    def _drop_row(self, r: _Row) -> None:
        """A finished row leaves the batch; its job moves on to its next sentence's audio."""
        self._remove_row(r)
        r.job._active -= 1
        self._complete_row(r)

    def _leave_batch(self, r: _Row) -> None:
        """Deadline policy: a finished row leaves the batch (its slot, and its job's turn to start
        another sentence, are free) and waits in `_draining` until its last window is decoded."""
        self._remove_row(r)
        r.job._active -= 1
        self._draining.append(r)

    def _complete_row(self, r: _Row) -> None:
        """All of a finished row's audio is decoded: emit the job's sentences that are complete, in order."""
        job = r.job
        job._finished_rows[r.index] = r
        while job._next_emit in job._finished_rows:  # flush sentences that ended, in order
            done = job._finished_rows.pop(job._next_emit)
            for a in done.pending:
                self._push(job, a)
            done.pending = []
            job._next_emit += 1
            nxt = next((x for x in [*self.rows, *self._draining] if x.job is job and x.index == job._next_emit), None)
            if nxt is not None:  # the next sentence is running: what it has so far goes out now
                for a in nxt.pending:
                    self._push(job, a)
                nxt.pending = []
        if job._next_emit == len(job._ids):
            self._end_job(job, None)

    def _end_job(self, job: SpeechJob, error: BaseException | None) -> None:
        """Finish `job` (with `error`, if given) and take its rows out of the batch."""
        for r in [x for x in self.rows if x.job is job]:
            self._remove_row(r)
        self._draining = [x for x in self._draining if x.job is not job]
        job._active = 0
        if job in self._jobs:
            self._jobs.remove(job)
        job._finish(error)


def _release(lm: Any) -> None:
    """Let the backend context drop the arrays it still holds from the last batch (if it can)."""
    release = getattr(lm, "release", None)
    if release is not None:
        release()


def _by_params(rows: list[_Row]) -> list[list[_Row]]:
    """Rows grouped by sampling settings (greedy rows together), in batch order within a group."""
    groups: dict[SamplingParams, list[_Row]] = {}
    for r in rows:
        groups.setdefault(r.params, []).append(r)
    return list(groups.values())
