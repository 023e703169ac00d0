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
  (the same sentences, sampling generators per sentence, lossless streaming windows).
* `job.cancel()` (or a client that goes away) removes the job's rows at the next step; the other
  jobs are not disturbed. A job that fails ends with its error, raised from its iterator; the
  other jobs go on.
* `close(drain=True)` stops taking requests and returns when the jobs in flight have finished.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Protocol

import numpy as np

from pipeline_lib.errors import InputError, SopranoOnnxError
from pipeline_lib.runtime.sampling import SamplingParams

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
        """One decode step over `rows` rows took `seconds` and made `tokens` tokens; `queued`
        requests are waiting."""

    def on_first_audio(self, seconds: float) -> None:
        """A job's first chunk, `seconds` after it was submitted."""

    def on_audio(self, seconds: float) -> None:
        """`seconds` of audio were produced (any job)."""


_END = object()


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
        self._items: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._cancelled = threading.Event()

    # -- producer side (the scheduler's worker) --------------------------------------------------
    def _push(self, chunk: np.ndarray) -> None:
        if self.first_audio_at is None:
            self.first_audio_at = time.perf_counter()
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
            loop.call_soon_threadsafe(_wake, fut)

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
                await fut

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


class BatchScheduler:
    """See the module docstring. `max_batch`: rows (sentences) decoded together at most;
    `max_queue`: requests waiting for rows at most, beyond which `submit` raises QueueFullError."""

    def __init__(self, tts: Any, *, max_batch: int = 8, max_queue: int = 64, observer: SchedulerObserver | None = None) -> None:
        for name, v in (("max_batch", max_batch), ("max_queue", max_queue)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be an int >= 1, got {v!r}")
        self.tts = tts
        self.max_batch, self.max_queue = max_batch, max_queue
        self.observer: SchedulerObserver = observer or _NullObserver()
        self._queue: collections.deque[SpeechJob] = collections.deque()
        self._lock = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.active_rows = 0

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> BatchScheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="soprano-scheduler", daemon=True)
            self._thread.start()
        return self

    def submit(self, request: SpeechRequest) -> SpeechJob:
        self._validate(request)
        job = SpeechJob(request, self.tts.sample_rate)
        with self._lock:
            if self._closing:
                raise SchedulerClosedError("the server is shutting down: it takes no new requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(
                    f"{len(self._queue)} requests are already waiting (max_queue {self.max_queue}); retry later",
                    retry_after_s=1.0,
                )
            self._queue.append(job)
            self._lock.notify_all()
        return job

    def _validate(self, request: SpeechRequest) -> None:
        from pipeline_lib.runtime.generate import validate_max_new_tokens

        if not isinstance(request.text, str):
            raise InputError(f"text must be a str, got {type(request.text).__name__}")
        request.params  # noqa: B018 - SamplingParams validates
        validate_max_new_tokens(request.max_new_tokens, self.tts.spec.max_position_embeddings)
        self.tts.prepare([request.text])

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with drain, wait for the queued and running jobs to finish,
        otherwise cancel them."""
        with self._lock:
            self._closing = True
            if not drain:
                for job in self._queue:
                    job.cancel()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _work(self) -> None:
        """Interim worker: one job at a time through SopranoTTS.infer_stream."""
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
            if job.cancelled:
                job._finish(JobCancelled("cancelled"))
                continue
            r = job.request
            try:
                self.active_rows = 1
                for chunk in self.tts.infer_stream(
                    r.text, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                    top_k=r.top_k, repetition_penalty=r.repetition_penalty, seed=r.seed,
                ):
                    if job.cancelled:
                        raise JobCancelled("cancelled")
                    job._push(chunk)
                job._finish()
            except BaseException as exc:  # noqa: BLE001 - the job carries its own failure
                job._finish(exc)
            finally:
                self.active_rows = 0
