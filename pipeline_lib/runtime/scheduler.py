"""Continuous batching for a server: many requests, one model, one worker thread.

`BatchScheduler` owns a `SopranoTTS` and drives its backends from a single worker thread. Callers
(HTTP handlers, any thread or event loop) `submit` a `SpeechRequest` and get a `SpeechJob`
(pipeline_lib.runtime.jobs), whose float32 audio chunks (at `tts.sample_rate`) arrive as the model
makes them. The rules about time (windows, playback clocks, pacing, admission) are pure functions in
pipeline_lib.runtime.pacing; the batch's KV cache is kv_cache.SlotCache; the window cut and decode is
SopranoTTS.decode_window, the same as `infer_stream`'s. This module is the worker's loop, admission
and backpressure; two mixins hold the rest: rows.RowPhase (a row's tokens, its end and the guard's
retry, its job's sentences emitted in order) and windows.WindowPhase (which windows are decoded
when, the first-audio lane).

Contract:
* `submit` checks the queue's room first (a full queue answers `QueueFullError`, with
  `retry_after_s`, before any text preparation), then validates the request (text, sampling values,
  max_new_tokens) in the caller's thread and raises `InputError` before anything is queued; after
  `close` it raises `SchedulerClosedError`.
* A job's chunks concatenate to `SopranoTTS.synthesize(text, ...)`'s audio for the same settings
  (the same sentences, sampling generators per sentence, the runtime's streaming windows: equal for
  decoders that compute each frame alone, close for ONNX Runtime's dynamic int8 decoder; see tts).
* `job.cancel()` (or a client that goes away) removes the job's rows at the next step; the other
  jobs are not disturbed. A job that fails ends with its error, raised from its iterator; the
  other jobs go on.
* Backpressure (off unless asked for; the server asks): a job that has generated `max_unread_s`
  or more audio beyond what its consumer read (SpeechJob.ahead_s: a chunk counts as read once the
  consumer comes back for the next) has its rows parked (out of the batch, each with its own KV
  history, so it resumes without a prefill; only the sentence playing next steps on, and only
  while its consumer has read all that was sent) and starts no sentence until the consumer has
  read it down; a job whose consumer read nothing for `read_timeout_s` while audio waited for it
  (pushed and unread, or parked rows) is cancelled.
* The hallucination guard (a request's `hallucination_guard` / `hallucination_retries`; the rule,
  the holdback and the retry draw are runtime.rules'): a row's audio goes out only as far as
  `holdback` releases it; a flagged sentence none of which was sent is generated again (a new row,
  a new draw) while retries are left, otherwise it ends at its clean blocks. `SpeechJob.hallucinations`
  / `retries` count them; the observer's `on_hallucination` (where it has one) hears of each.
* `close(drain=True)` stops taking requests and returns when the jobs in flight have finished.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from typing import Any

import numpy as np

from pipeline_lib.errors import InputError
from pipeline_lib.runtime.backend_base import release_free_heap
from pipeline_lib.runtime.generate import validate_max_new_tokens
from pipeline_lib.runtime.jobs import (
    JobCancelled,
    NullObserver,
    QueueFullError,
    SchedulerClosedError,
    SchedulerObserver,
    SpeechJob,
    SpeechRequest,
)
from pipeline_lib.runtime.kv_cache import KV_BUCKET, SlotCache, prefill_row
from pipeline_lib.runtime.pacing import StepCosts, first_window_blocks, wants_next_sentence
from pipeline_lib.runtime.rows import Row as _Row
from pipeline_lib.runtime.rows import RowPhase
from pipeline_lib.runtime.rules import (
    DEFAULT_HOLDBACK,
    GuardSettings,
    RowRules,
    retry_generator,
    retry_params,
    seed_base,
)
from pipeline_lib.runtime.sampling import row_generators, validate_seed
from pipeline_lib.runtime.windows import WindowPhase

__all__ = [
    "SpeechRequest",
    "SpeechJob",
    "BatchScheduler",
    "SchedulerObserver",
    "QueueFullError",
    "SchedulerClosedError",
    "JobCancelled",
    "SlotCache",
]

_IDLE_POLL_S = 0.01  # the worker's wait while every job waits on its client: a read does not wake it


class BatchScheduler(RowPhase, WindowPhase):
    """Continuous batching (see the module docstring for the contract).

    One iteration between two decode steps of the running batch:
    * cancelled jobs leave (their rows at once); jobs whose consumer stopped reading are cancelled
      (`read_timeout_s`); rows of jobs `max_unread_s` ahead of their reader are parked, parked rows whose job
      was read down rejoin (SlotCache.take / add: the row's own columns, no prefill);
    * every row samples its next token with its own settings and generator; rows that end ([STOP]
      or max_new_tokens) leave the batch at once (their slot is free for the next row), their last
      window still to be decoded (rows.RowPhase);
    * the decoder's work, in the runtime's streaming windows (SopranoTTS.decode_window; see
      _decode_due): a job's first audio as soon as it is exact (`first_chunk` blocks, more under
      load with `sized_first_window`: pacing.first_window_blocks); a later window when the row has
      `chunk` exact blocks (`chunk` grows from `first_chunk` by `chunk_growth` up to `max_chunk`) or
      ended, most urgent listener first (playback clocks, `margin_s`); early windows when the
      next regular one would come after the listener ran dry (pacing.early_window);
    * the step: the whole batch, or, while rows wait for their job's first audio (or, with
      `priority`, their listener runs dry: pacing.running_dry) and every other row has audio in
      hand, those rows only (the first-audio lane, `lane`, pacing.can_skip);
    * admission (_admit): free rows (up to `max_batch`) go to waiting sentences, the job with the
      fewest rows running first, the oldest first. A job's later sentence starts when its listener
      needs it (pacing.wants_next_sentence, `lead_s`). Capacity (pacing.StepCosts): while the
      measured iteration period at one more row leaves every row faster than real time by
      `headroom`, any of these may join; beyond it, only a running job's next sentence when the
      job has no row (its listener needs it, so running streams are served first); a new request,
      or a second row of a job, waits (a new request in the queue, where max_queue and 429 apply).
      A job alone on the engine takes free rows within capacity too, so a newcomer finds room.
      Prefill is bounded: at most `max_prefill_tokens` prompt tokens per iteration (at least one
      row), so a burst of arrivals is prefilled over several iterations; a job alone takes one more
      row per iteration, so a request that arrives meanwhile waits for one prefill, not a burst of
      that job's sentences; with `priority`, while a listener runs dry, a job whose listener has
      `lead_s` or more ahead starts no sentence.
      Priority and admission: priority orders the work of streams already admitted (the dry first,
      the well supplied wait a step or a prefill); admission decides who is admitted at all
      (capacity). A response read slowly or not at all (a download, a non-streaming client) is
      well supplied by the same clock, so it yields to any listener running dry, and is never
      starved: once its own clock runs down it is a dry listener too;
    * a job's sentences are emitted in order (a later sentence's audio waits for the earlier ones).
    A row is never starved: its listener's clock runs down, and at `margin_s` its window is urgent.
    `SpeechJob.stalls` / `stall_s` count the times (seconds) its listener would have run dry.

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
        margin_s: float = 0.15,
        min_window: int = 4,
        lane: bool = True,
        priority: bool = True,
        sized_first_window: bool = True,
        lead_s: float = 1.5,
        headroom: float = 0.25,
        max_prefill_tokens: int = 256,
        max_unread_s: float | None = None,
        read_timeout_s: float | None = None,
        holdback: str = DEFAULT_HOLDBACK,
    ) -> None:
        for name, v in (("max_batch", max_batch), ("max_queue", max_queue), ("first_chunk", first_chunk),
                        ("chunk_growth", chunk_growth), ("max_chunk", max_chunk), ("min_window", min_window),
                        ("max_prefill_tokens", max_prefill_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be an int >= 1, got {v!r}")
        for name, v in (("margin_s", margin_s), ("lead_s", lead_s), ("headroom", headroom)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise InputError(f"{name} must be a number >= 0, got {v!r}")
        for name, v in (("max_unread_s", max_unread_s), ("read_timeout_s", read_timeout_s)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise InputError(f"{name} must be a number > 0 (or None: off), got {v!r}")
        if tts.spec.stateful:
            raise InputError(
                f"{tts.lm_path}: a stateful LM (KV cache in OpenVINO state) cannot take a row into a running "
                "batch; give the server the step model that takes the cache as inputs "
                "(soprano_lm_step.xml for OpenVINO, or the .onnx)"
            )
        self.holdback = GuardSettings(holdback=holdback).holdback  # validated: rules.HOLDBACKS
        for name, v in (("lane", lane), ("priority", priority), ("sized_first_window", sized_first_window)):
            if not isinstance(v, bool):
                raise InputError(f"{name} must be True or False, got {v!r}")
        self.tts = tts
        self.max_batch, self.max_queue = max_batch, max_queue
        self.first_chunk, self.chunk_growth, self.max_chunk = first_chunk, chunk_growth, max_chunk
        self.margin_s, self.min_window, self.lane, self.priority = float(margin_s), min_window, lane, priority
        self.sized_first_window = sized_first_window
        self.lead_s, self.headroom, self.max_prefill_tokens = float(lead_s), float(headroom), max_prefill_tokens
        # Backpressure (None: off, the library's default: an in-process caller may read a job late;
        # the server turns both on, Settings.max_unread_s / read_timeout_s).
        self.max_unread_s = math.inf if max_unread_s is None else float(max_unread_s)
        self.read_timeout_s = math.inf if read_timeout_s is None else float(read_timeout_s)
        self.lane_steps = 0  # decode steps that ran the first-audio lane only
        self.observer: SchedulerObserver = observer or NullObserver()
        self._queue: collections.deque[SpeechJob] = collections.deque()
        self._jobs: list[SpeechJob] = []  # taken from the queue: sentences running or still to start
        self._lock = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.rows: list[_Row] = []
        self._draining: list[_Row] = []  # rows that ended, their last window not decoded yet
        self._parked: list[_Row] = []  # rows out of the batch while their job's client catches up
        self.costs = StepCosts()
        self._period = 0.0  # mean seconds between two decoder phases (an iteration), for the margin
        self._row_period = 0.0  # the same over iterations whose step ran the whole batch: a row's time per token
        self._lane_step = False  # the last step ran the first-audio lane only
        self._stepped = 0  # rows in the last step
        self._block_s = tts.samples_per_token / tts.sample_rate  # seconds of audio per token
        self._last_decode_at: float | None = None
        self.steps = 0  # decode steps run (all rows together)
        self.max_rows_seen = 0
        self.parks = 0  # rows parked so far (backpressure)

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

    def check_room(self) -> None:
        """Raise if no request can be queued now (closing, stopped: SchedulerClosedError; full:
        QueueFullError). Cheap: a front door calls it before any work on a request."""
        with self._lock:
            self._check_open()

    def _check_open(self) -> None:
        if self._closing:
            raise SchedulerClosedError("the server is shutting down: it takes no new requests")
        if self._thread is not None and not self._thread.is_alive():
            raise SchedulerClosedError("the scheduler's worker has stopped: restart the server")
        if self.queue_depth >= self.max_queue:
            raise QueueFullError(
                f"{self.queue_depth} requests are already waiting (max_queue {self.max_queue}); retry later",
                retry_after_s=1.0,
            )

    def submit(self, request: SpeechRequest) -> SpeechJob:
        """Queue `request`; its job. The queue's room is checked before the text is prepared (a
        refusal costs no tokenizing), and again when the job is queued."""
        self.check_room()
        if not isinstance(request.text, str):
            raise InputError(f"text must be a str, got {type(request.text).__name__}")
        params = request.params
        _ = request.guard  # validated here: a bad value is the caller's InputError
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
        job._seed_base = seed_base(seed)
        job._gens = None if params.greedy else row_generators(job._seed_base, range(len(ids)))
        with self._lock:
            self._check_open()
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
                if not self.rows and not self._draining:
                    with self._lock:  # jobs wait on their clients (backpressure): no busy loop
                        if not self._queue and self._jobs and not self._closing:
                            self._lock.wait(_IDLE_POLL_S)

    def _fail_batch(self, lm: Any, exc: BaseException) -> None:
        """Every job in the batch ends with `exc`; the batch starts afresh. Never raises: the worker
        must outlive any one failure."""
        self.rows = []
        self._draining = []
        self._parked = []
        self._cache = self._new_cache()
        for job in list(self._jobs):
            try:
                self._jobs.remove(job)
                job._finish(exc)
            except BaseException:  # noqa: BLE001, S110 - one job's consumer must not stop the others
                pass
        _release(lm)

    def _iteration(self, lm: Any) -> None:
        now = time.perf_counter()
        for job in list(self._jobs):
            if job.cancelled:
                self._end_job(job, JobCancelled("cancelled"))
            elif ((job.unread_s > 0 or job.ahead_s >= self.max_unread_s)  # audio waits for its reader
                  and now - job.last_read_at > self.read_timeout_s):
                self._end_job(job, JobCancelled(f"the client read no audio for {self.read_timeout_s:g} s "
                                                "(read_timeout_s)"))
        t0 = time.perf_counter()
        sampled = sum(r.logits is not None for r in self.rows)  # tokens made this iteration (rows that stepped)
        self._sample(self.rows)
        for r in [r for r in self.rows if r.finished]:
            self._leave_batch(r)  # its slot is free now; its last window is decoded by the rule below
        self._decode_due()
        self._backpressure()
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
        self._stepped = stepped
        self.observer.on_step(stepped, self.queue_depth, sampled, time.perf_counter() - t0)
        if not self.rows:
            self.observer.on_step(0, self.queue_depth, 0, 0.0)  # the batch is empty now

    def _backpressure(self) -> None:
        """Park the rows of jobs that have generated `max_unread_s` of audio beyond what their client
        read (SpeechJob.ahead_s): they leave the batch with their own KV history (no slot, no step,
        no gap columns growing the others' cache; their due windows are still decoded). One row
        is spared: the job's sentence playing next while its client has read all that was sent
        (unread_s 0), since only its next tokens can give the client more. Parked rows come back
        when their client read below half of `max_unread_s`, and the playing row when its client
        read all that was sent. (Every row coming back on "all read" let a job's later sentences
        step for as long as the playing one took to make its next window: a minute of audio with a
        client that read nothing.) Parking ends with `release_free_heap` (glibc's malloc_trim, a few
        ms, once per parking): the heap pages the job's long prefills and decoder windows freed would
        otherwise stay resident while its client reads nothing."""
        def waited_on(r: _Row) -> bool:
            return r.index == r.job._next_emit and r.job.unread_s == 0

        def over(job: SpeechJob) -> bool:
            return job.ahead_s >= self.max_unread_s

        parking = [r for r in self.rows if over(r.job) and not waited_on(r) and not r.finished]
        for r in parking:
            i = self.rows.index(r)
            r.kv, moved = self._cache.take(i)
            if moved is not None:
                self.rows[i] = self.rows[moved]
            self.rows.pop()
            self._parked.append(r)
            self.parks += 1
        if parking:  # a job stops stepping: what its prefills and windows freed goes back to the OS
            release_free_heap()
        for r in [r for r in self._parked if r.job.ahead_s < 0.5 * self.max_unread_s or waited_on(r)]:
            if len(self.rows) >= self.max_batch:
                break
            self._parked.remove(r)
            self._cache.add(r.kv)
            r.kv = None
            self.rows.append(r)

    def _wants_row(self, job: SpeechJob, now: float, alone: bool) -> bool:
        """The job has a sentence to start now: a flagged one to generate again, or the next
        (pacing.wants_next_sentence)."""
        if job._retry:
            return True
        if job._next_start >= len(job._ids):
            return False
        ahead = self._job_slack_s(job, now)
        return wants_next_sentence(
            first_audio_sent=job.first_audio_at is not None, next_is_emitting=job._next_start == job._next_emit,
            active=job._active, alone=alone, ahead_s=ahead, lead_s=self.lead_s,
            unread_s=job.ahead_s, max_unread_s=self.max_unread_s, dry=self._listener_dry(job, now),
            sent_s=job.samples / job.sample_rate)

    def _admit(self, lm: Any) -> list[_Row]:
        """Free rows to waiting sentences (see the class docstring); the rows that joined. A job alone
        on the engine takes one more row per iteration, so a request that arrives while it prefills
        waits for that one prefill and the rest of the iteration (then is the next candidate within
        capacity: it has no row), not for a burst of them."""
        with self._lock:  # requests submitted since the iteration began
            while self._queue:
                self._jobs.append(self._queue.popleft())
        joined: list[_Row] = []
        budget = self.max_prefill_tokens
        now = time.perf_counter()
        alone = len(self._jobs) == 1
        dry = any(self._dry(r, now) for r in self.rows)
        while len(self.rows) < self.max_batch and (budget > 0 or not joined) and not (alone and joined):
            running = [j for j in self._jobs if j._next_start > 0 and self._wants_row(j, now, alone)]
            if dry:  # priority: a listener runs dry; jobs with lead_s ahead start nothing now
                running = [j for j in running if j.play_end is None or j.play_end - now < self.lead_s]
            new = [j for j in self._jobs if j._next_start == 0]
            if not self.costs.admits(len(self.rows), self._block_s, self.headroom):
                # At capacity: a running stream's next sentence (it has no row: its listener needs
                # it) still starts; a second row of a stream, or a new request, waits.
                running = [j for j in running if j._active == 0]
                new = []
            waiting = running + new
            if not waiting:
                return joined
            job = min(waiting, key=lambda j: (j._active, j.submitted_at))
            k, attempt = job._retry.pop(0) if job._retry else (job._next_start, 0)
            job._next_start += attempt == 0
            prompt = job._ids[k]
            budget -= len(prompt)
            try:
                kv, logits, hidden = self._prefill(lm, prompt)
            except Exception as exc:  # noqa: BLE001 - this job's failure only
                self._end_job(job, exc)
                continue
            spec = self.tts.spec
            first = self.first_chunk
            if self.sized_first_window and k == 0:  # the job's first audio: enough to reach the next window
                first = first_window_blocks(self.first_chunk, self._row_period, self._block_s, self.min_window)
            row = _Row(job, k, prompt, spec.vocab_size, spec.hidden_size, first)
            row.rules = RowRules(1, spec.hidden_size, spec.stop_id, row.max_new_tokens, job.request.guard.enabled)
            if attempt:  # a retry of a flagged sentence: a new draw (rules)
                row.attempt, row.params = attempt, retry_params(row.params)
                row.gen = retry_generator(job._seed_base, k, attempt)
            row.logits, row.last_hidden = logits, hidden
            self._cache.add(kv)
            self.rows.append(row)
            joined.append(row)
            job._active += 1
            self.max_rows_seen = max(self.max_rows_seen, len(self.rows))
        return joined

    def _prefill(self, lm: Any, prompt: list[int]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        return prefill_row(lm, self.tts.spec, prompt)

    def _new_cache(self) -> SlotCache:
        return SlotCache.for_spec(self.tts.spec, self.max_batch, KV_BUCKET)


def _release(lm: Any) -> None:
    """Let the backend context drop the arrays it still holds from the last batch (if it can)."""
    release = getattr(lm, "release", None)
    if release is not None:
        release()
