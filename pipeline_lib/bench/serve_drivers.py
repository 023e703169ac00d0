"""The two ways the load benchmark loads a server, level by level.

Closed loop (`run_levels`, LoadSettings): C clients, each posts a request (the texts of TEXTS in
turn, one or two sentences each), reads the streamed body and posts the next. A client starts no
new request once `max_requests` have been started or `level_s` has passed.

Open loop (`run_open_levels`, OpenLoopSettings): requests arrive as a Poisson process at a given
rate, whatever the server's state (as listeners do), for `level_s` seconds. The arrival times and the
texts come from one seeded generator per rate (`arrival_schedule`: reproducible): each request is a
long text (LONG_TEXTS, several sentences) with probability `long_share`, else a short one (TEXTS).

In both, requests in flight at the time bound run to their end, for at most `drain_s` more, after
which they are cut (see pipeline_lib.bench.serve_summary). Each level starts on an idle server
(`wait_idle`, at most `idle_timeout_s`): upstream's server finishes every request it took, even one
whose client has gone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pipeline_lib.bench.serve_process import wait_idle
from pipeline_lib.bench.serve_request import (
    LONG_SENTENCES,
    LONG_TEXTS,
    TEXTS,
    AudioGeometry,
    RequestResult,
    Target,
    expected_samples,
    one_request,
    sentence_count,
)
from pipeline_lib.bench.serve_summary import NAN, LevelResult, summarize_level, summarize_open_level
from pipeline_lib.errors import InputError, SopranoOnnxError

log = logging.getLogger(__name__)

CLIENT_LEVELS = (1, 2, 4, 8, 16)
OPEN_STREAMS = (4.0, 8.0, 12.0)  # open-loop levels, as offered real-time streams (rates_for_streams)


@dataclass(frozen=True)
class LoadSettings:
    """The closed loop's levels: `clients` concurrent clients each, the texts in turn."""

    clients: tuple[int, ...] = CLIENT_LEVELS
    max_requests: int = 96          # per level
    level_s: float = 12.0           # per level: no new requests after this
    drain_s: float = 8.0            # per level: requests still running this long after level_s are cut
    max_new_tokens: int = 64
    warmup_requests: int = 2        # per server, one after another before the first level, not counted
    idle_timeout_s: float = 15.0    # per level: wait at most this long for the server to go idle before it
    request_timeout_s: float = 120.0
    texts: tuple[str, ...] = TEXTS

    def __post_init__(self) -> None:
        if not self.clients or any(int(c) < 1 for c in self.clients):
            raise InputError(f"clients must be counts >= 1, got {self.clients!r}")
        for name in ("max_requests", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_new_tokens < 2:
            raise InputError("max_new_tokens must be >= 2: one token decodes to no audio")
        if not self.texts:
            raise InputError("texts is empty")


@dataclass(frozen=True)
class OpenLoopSettings:
    """The open loop's levels: Poisson arrivals at each of `rates` (new requests per second) for
    `level_s` seconds; texts from `texts`, a long one (LONG_SENTENCES or more) with probability
    `long_share`."""

    rates: tuple[float, ...] = ()
    level_s: float = 20.0           # per level: arrivals during this many seconds
    drain_s: float = 8.0            # per level: requests still running this long after level_s are cut
    long_share: float = 0.2
    seed: int = 0
    max_new_tokens: int = 64
    warmup_requests: int = 2        # per server, before the first level (none after closed-loop levels)
    idle_timeout_s: float = 15.0
    request_timeout_s: float = 120.0
    texts: tuple[str, ...] = TEXTS + LONG_TEXTS

    def __post_init__(self) -> None:
        if not self.rates or any(not (float(r) > 0 and math.isfinite(float(r))) for r in self.rates):
            raise InputError(f"open-loop rates must be positive requests per second, got {self.rates!r}")
        if not self.level_s > 0 or self.drain_s < 0:
            raise InputError(f"open loop: level_s must be > 0 and drain_s >= 0, got {self.level_s!r}, {self.drain_s!r}")
        if not 0.0 <= self.long_share <= 1.0:
            raise InputError(f"long_share must be within [0, 1], got {self.long_share!r}")
        if self.max_new_tokens < 2:
            raise InputError("max_new_tokens must be >= 2: one token decodes to no audio")
        long_, short = self.long_indices(), self.short_indices()
        if (self.long_share > 0 and not long_) or (self.long_share < 1 and not short):
            raise InputError(f"texts: long_share {self.long_share} needs long texts ({LONG_SENTENCES}+ sentences: "
                             f"{len(long_)}) and short ones ({len(short)})")

    def long_indices(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.texts) if sentence_count(t) >= LONG_SENTENCES)

    def short_indices(self) -> tuple[int, ...]:
        long_ = set(self.long_indices())
        return tuple(i for i in range(len(self.texts)) if i not in long_)


def mean_audio_s(settings: OpenLoopSettings, geometry: AudioGeometry) -> float:
    """The text mix's mean audio length in seconds: long_share x the long texts' mean + the rest x the
    short texts' mean (every sentence runs to max_new_tokens, as random weights do)."""

    def mean(indices: Sequence[int]) -> float:
        if not indices:
            return 0.0
        return float(np.mean([expected_samples(settings.texts[i], settings.max_new_tokens, geometry.samples_per_token)
                              for i in indices])) / geometry.sample_rate

    return settings.long_share * mean(settings.long_indices()) + (1 - settings.long_share) * mean(settings.short_indices())


def rates_for_streams(streams: Sequence[float], settings: OpenLoopSettings, geometry: AudioGeometry) -> tuple[float, ...]:
    """Arrival rates that offer `streams` real-time streams: streams / the mix's mean audio length."""
    mean = mean_audio_s(settings, geometry)
    return tuple(float(s) / mean for s in streams)


def arrival_schedule(rate: float, settings: OpenLoopSettings) -> list[tuple[float, int]]:
    """(seconds after the level's start, text index) of each arrival before level_s: a Poisson process
    of `rate` (exponential gaps of mean 1/rate), each arrival a long text with probability long_share
    (uniform among the long, else among the short). Every rate scales one sequence drawn from `seed`
    (unit-rate gaps divided by the rate; the same texts in the same order): the same schedule every
    run, and a higher rate is the same arrivals, closer together (common random numbers: the levels
    differ by their rate, not by their draws)."""
    rng = np.random.default_rng(int(settings.seed))
    long_, short = settings.long_indices(), settings.short_indices()
    out: list[tuple[float, int]] = []
    unit_t = 0.0
    while True:
        unit_t += float(rng.exponential(1.0))
        pool = long_ if rng.random() < settings.long_share else short
        index = int(pool[int(rng.integers(len(pool)))])
        if unit_t / rate >= settings.level_s:
            return out
        out.append((unit_t / rate, index))


async def run_level(target: Target, clients: int, settings: LoadSettings, geometry: AudioGeometry,
                    first_text: int = 0) -> LevelResult:
    """C clients in a closed loop until max_requests have started or level_s has passed, then the
    requests in flight finish (cut after drain_s more)."""
    import httpx

    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else NAN
    results: list[RequestResult] = []
    counter = itertools.count()
    started = time.perf_counter()
    deadline = started + settings.level_s
    timeout = httpx.Timeout(settings.request_timeout_s, connect=10.0)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            while True:
                i = next(counter)
                if i >= settings.max_requests or time.perf_counter() >= deadline:
                    return
                await one_request(client, target, (first_text + i) % len(settings.texts), settings, geometry, results)

        tasks = [asyncio.create_task(worker()) for _ in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline + settings.drain_s - time.perf_counter()))
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return LevelResult(clients, started, deadline, results, load_avg, time.perf_counter())


async def run_open_level(target: Target, rate: float, settings: OpenLoopSettings, geometry: AudioGeometry,
                         schedule: Sequence[tuple[float, int]] | None = None) -> LevelResult:
    """Post each request of `schedule` (default: arrival_schedule(rate)) at its time, whatever is in
    flight (one connection each), then let the requests in flight finish (cut after drain_s more)."""
    import httpx

    schedule = arrival_schedule(rate, settings) if schedule is None else schedule
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else NAN
    results: list[RequestResult] = []
    started = time.perf_counter()
    deadline = started + settings.level_s
    timeout = httpx.Timeout(settings.request_timeout_s, connect=10.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        tasks = []
        for at, text_index in schedule:
            delay = started + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(client, target, text_index, settings, geometry, results)))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline + settings.drain_s - time.perf_counter()))
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return LevelResult(0, started, deadline, results, load_avg, time.perf_counter(), rate=rate)


async def warm_up(target: Target, settings: LoadSettings | OpenLoopSettings, geometry: AudioGeometry) -> None:
    """`warmup_requests` requests one after another (first-call costs stay out of the levels); an
    error here stops the benchmark: the server does not work."""
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(settings.request_timeout_s)) as client:
        for i in range(settings.warmup_requests):
            res = await one_request(client, target, i % len(settings.texts), settings, geometry, [])
            if not res.ok:
                raise SopranoOnnxError(
                    f"{target.name} server at {target.base_url}: warm-up request failed ({res.error}, status "
                    f"{res.status}, {res.samples} of {res.expected} samples); see its log")


async def _settle(target: Target, timeout_s: float) -> float:
    """Wait for the server to go idle before a level (when we started it); the seconds waited."""
    if target.pid is None:
        return 0.0
    waited = await asyncio.to_thread(wait_idle, target.pid, timeout_s)
    if waited > 2.0:
        log.info("%s: waited %.1f s for the server to finish earlier work", target.name, waited)
    return waited


def run_levels(target: Target, settings: LoadSettings, geometry: AudioGeometry) -> list[dict[str, Any]]:
    """Warm up, then every level of settings.clients in order, each on an idle server (wait_idle,
    when the target has a pid); one summary per level."""

    async def main() -> list[dict[str, Any]]:
        await warm_up(target, settings, geometry)
        rows, first = [], settings.warmup_requests
        for c in settings.clients:
            waited = await _settle(target, settings.idle_timeout_s)
            level = await run_level(target, int(c), settings, geometry, first_text=first)
            first += len(level.requests)
            row = summarize_level(level, geometry.sample_rate)
            row["settle_s"] = waited
            log.info("%s, %d clients: %d ok, %d errors, %d cut; x%.2f real time, TTFA p50 %.0f / p95 %.0f ms, "
                     "latency p95 %.0f ms; playback stalls p50 %.0f / p95 %.0f ms (%.0f%% of responses)", target.name, c,
                     row["requests_ok"], row["errors"], row["cut"], row["xrt"], row["ttfa_p50_ms"], row["ttfa_p95_ms"],
                     row["latency_p95_ms"], row["stall_p50_ms"], row["stall_p95_ms"], 100 * row["stalled_share"])
            rows.append(row)
        return rows

    return asyncio.run(main())


def run_open_levels(target: Target, settings: OpenLoopSettings, geometry: AudioGeometry) -> list[dict[str, Any]]:
    """Warm up (settings.warmup_requests), then every rate of settings.rates in increasing order,
    each on an idle server (wait_idle, when the target has a pid); one summary per rate (with
    mean_audio_s and offered_streams)."""
    mean = mean_audio_s(settings, geometry)
    long_ = frozenset(settings.long_indices())

    async def main() -> list[dict[str, Any]]:
        await warm_up(target, settings, geometry)
        rows = []
        for rate in sorted(float(r) for r in settings.rates):
            waited = await _settle(target, settings.idle_timeout_s)
            level = await run_open_level(target, rate, settings, geometry)
            row = summarize_open_level(level, geometry.sample_rate, long_)
            row.update(settle_s=waited, mean_audio_s=mean, offered_streams=rate * mean, long_share=settings.long_share,
                       seed=settings.seed, level_s=settings.level_s)
            log.info("%s, %.3g requests/s (%.1f streams offered): %d sent (%d long), %d ok, %d errors (%d 429), "
                     "%d cut, peak %d in flight; x%.2f real time, TTFA p50 %.0f / p95 %.0f ms; stalls p95 %.0f ms, "
                     "%.0f%% played without a stall over the limit%s", target.name, rate, rate * mean,
                     row["requests_sent"], row["long_sent"], row["requests_ok"], row["errors"], row["rejected_429"],
                     row["cut"], row["peak_in_flight"], row["xrt"], row["ttfa_p50_ms"], row["ttfa_p95_ms"],
                     row["stall_p95_ms"], 100 * row["smooth_share"],
                     "" if row["within_capacity"] else " (beyond capacity)")
            rows.append(row)
        return rows

    return asyncio.run(main())
