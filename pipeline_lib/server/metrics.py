"""Prometheus metrics of one server app, in its own CollectorRegistry (two apps in one process, as
in tests, do not share counters).

HTTP side (fed by the app): requests by route and status code, speech responses in flight, and
speech jobs whose client went away before the audio was done. Scheduler side (fed through the
`SchedulerObserver` hooks, from the scheduler's worker thread): queue depth, rows in the last decode
step, decode steps, tokens and decode seconds (tokens per second = rate of one over the other), time
to first audio, seconds of audio produced, and the hallucination guard's flags and retries.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServerMetrics", "CONTENT_TYPE_LATEST"]

_FIRST_AUDIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """The app's metrics; also the scheduler's observer (`on_step`, `on_first_audio`, `on_audio`, `on_hallucination`:
    quick, never raising)."""

    def __init__(self, queue_depth: Callable[[], float] = lambda: 0.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("soprano_http_requests", "HTTP requests by route and status code",
                                ["route", "code"], registry=r)
        self.in_flight = Gauge("soprano_speech_in_flight", "Speech responses being generated or sent", registry=r)
        self.cancelled = Counter("soprano_speech_cancelled", "Speech jobs cancelled because the client went away",
                                 registry=r)
        self.queue = Gauge("soprano_scheduler_queue_depth", "Requests waiting for rows in the batch", registry=r)
        self.queue.set_function(queue_depth)
        self.rows = Gauge("soprano_scheduler_batch_rows", "Rows (sentences) in the last decode step", registry=r)
        self.step_rows = Histogram("soprano_scheduler_step_rows", "Rows per decode step", buckets=_ROW_BUCKETS,
                                   registry=r)
        self.tokens = Counter("soprano_tokens", "Audio tokens generated", registry=r)
        self.decode_seconds = Counter("soprano_decode_seconds",
                                      "Seconds spent in the scheduler's steps (sampling, LM step, decoder windows)", registry=r)
        self.first_audio = Histogram("soprano_time_to_first_audio_seconds",
                                     "Seconds from a request's submission to its first audio",
                                     buckets=_FIRST_AUDIO_BUCKETS, registry=r)
        self.audio_seconds = Counter("soprano_audio_seconds", "Seconds of audio produced", registry=r)
        self.hallucinations = Counter("soprano_hallucinations", "Sentences the hallucination guard flagged (each attempt)",
                                      registry=r)
        self.hallucination_retries = Counter("soprano_hallucination_retries",
                                             "Flagged sentences generated again (retries)", registry=r)
        self._speaking = 0  # responses in flight; the app calls speech_started/ended from its event loop

    def set_queue_depth(self, queue_depth: Callable[[], float]) -> None:
        self.queue.set_function(queue_depth)

    # SchedulerObserver
    def on_step(self, rows: int, queued: int, tokens: int, seconds: float) -> None:
        self.rows.set(rows)
        if rows > 0:  # rows == 0: the batch just emptied (no step ran)
            self.step_rows.observe(rows)
        self.tokens.inc(max(0, tokens))
        self.decode_seconds.inc(max(0.0, seconds))

    def on_first_audio(self, seconds: float) -> None:
        self.first_audio.observe(max(0.0, seconds))

    def on_audio(self, seconds: float) -> None:
        self.audio_seconds.inc(max(0.0, seconds))

    def on_hallucination(self, retried: bool) -> None:
        self.hallucinations.inc()
        if retried:
            self.hallucination_retries.inc()

    # the app
    def request_done(self, route: str, code: int) -> None:
        self.requests.labels(route, str(code)).inc()

    def speech_started(self) -> None:
        self._speaking += 1
        self.in_flight.set(self._speaking)

    def speech_ended(self, cancelled: bool) -> None:
        self._speaking -= 1
        self.in_flight.set(self._speaking)
        if cancelled:
            self.cancelled.inc()
        if self._speaking <= 0:  # idle: no rows are being decoded
            self.rows.set(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
