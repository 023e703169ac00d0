"""A speech request, the handle of its job, and what a scheduler reports.

`SpeechRequest` is what a caller asks for (text, sampling settings, limits); `submit` returns a
`SpeechJob`, whose float32 audio chunks arrive as the engine makes them: iterate it synchronously
(`for chunk in job`) or asynchronously (`async for chunk in job`). The job keeps its listener's
playback clock (stalls) and what its consumer has read (`unread_s`, `last_read_at`: the scheduler's
backpressure reads them). Thread-safe: the worker pushes, one consumer iterates, anyone may cancel.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Protocol

import numpy as np

from pipeline_lib.errors import SopranoOnnxError
from pipeline_lib.runtime.rules import DEFAULT_GUARD, GuardSettings
from pipeline_lib.runtime.sampling import DEFAULT_MAX_NEW_TOKENS, DEFAULTS, SamplingParams

__all__ = [
    "SpeechRequest",
    "SpeechJob",
    "SchedulerObserver",
    "NullObserver",
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
    """One text to speak, with the runtime's sampling settings (defaults: greedy, as SopranoTTS) and
    the hallucination guard's (runtime.rules: off by default; `hallucination_retries` > 0 turns it on)."""

    text: str
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULTS.temperature
    top_p: float = DEFAULTS.top_p
    top_k: int = DEFAULTS.top_k
    repetition_penalty: float = DEFAULTS.repetition_penalty
    seed: int | None = None
    hallucination_guard: bool = DEFAULT_GUARD.enabled
    hallucination_retries: int = DEFAULT_GUARD.retries

    @property
    def params(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.repetition_penalty)

    @property
    def guard(self) -> GuardSettings:
        """The guard's settings (validated: an InputError names a bad value)."""
        return GuardSettings.of(self.hallucination_guard, self.hallucination_retries)


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

    def on_hallucination(self, retried: bool) -> None:
        """The guard flagged a sentence; `retried`: it is generated again (else it ends at its clean
        blocks). Optional: a scheduler calls it only where the observer has it."""


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
        # The listener's playback clock, as the scheduler sees it: playing from the first chunk on, a
        # chunk that arrives after the audio before it has run out is a stall (an underrun).
        self.play_end: float | None = None  # when the audio sent so far would have finished playing
        self.stalls = 0
        self.stall_s = 0.0
        # Backpressure: samples the consumer has taken (a chunk counts once the consumer comes back
        # for the next one, _took), and when it last took any (or when the job started).
        self.read_samples = 0
        self.last_read_at = self.submitted_at
        self.generated_samples = 0  # audio the job's tokens stand for, decoded or not (the scheduler counts)
        # The hallucination guard (runtime.rules): sentences it flagged, and retries made, so far.
        self.hallucinations = 0
        self.retries = 0
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
        self._seed_base = 0  # the key of the job's sampling generators (rules.seed_base)
        self._retry: list[tuple[int, int]] = []  # (sentence, attempt) flagged, to generate again

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

    @property
    def unread_s(self) -> float:
        """Seconds of audio pushed that the consumer has not taken yet."""
        return (self.samples - self.read_samples) / self.sample_rate

    @property
    def ahead_s(self) -> float:
        """Seconds of audio generated (as tokens: decoded, waiting for a window, or held behind an
        earlier sentence) beyond what the consumer has taken: what backpressure bounds."""
        return (self.generated_samples - self.read_samples) / self.sample_rate

    def _pop(self) -> Any:
        item = self._items.popleft()
        if item is _END:
            self._items.appendleft(_END)  # iteration stays finished
            if self.error is not None:
                raise self.error
            raise StopIteration
        return item

    def _took(self, item: np.ndarray) -> None:
        """The consumer came back for the next chunk (or closed its iterator): `item` counts as
        read. A chunk in the consumer's hands (a server still sending it) is not read yet, so
        backpressure bounds what the client has, not what the consumer holds."""
        self.read_samples += len(item)
        self.last_read_at = time.perf_counter()

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                try:
                    item = self._pop()
                except StopIteration:
                    return
            try:
                yield item
            finally:  # the consumer came back, or dropped the iterator holding the chunk
                self._took(item)

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
                try:
                    yield item
                finally:
                    self._took(item)
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


class NullObserver:
    def on_step(self, rows: int, queued: int, tokens: int, seconds: float) -> None: ...
    def on_first_audio(self, seconds: float) -> None: ...
    def on_audio(self, seconds: float) -> None: ...
    def on_hallucination(self, retried: bool) -> None: ...
